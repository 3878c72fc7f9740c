"""What the benchmarks share: a median step time, and XLA's cost counts with their limits.

XLA's ``compiled.cost_analysis()`` counts the body of each ``while`` loop
once, whatever its trip count (measured with JAX 0.10: a ``fori_loop`` of
4 and of 16 trips over the same body reports the same FLOPs and bytes; see
``tests/test_bench_cost.py``). The head's blockwise step, the sampler's
bisection and the CPU chunk loops of the grouped convolutions are such
loops, so a program that has them is undercounted by up to their trip
counts. ``cost`` says which loops there are, so a benchmark can report a
count as exact only when no loop runs more than once, and use model FLOPs
(counted from the shapes) where it is not.

No JAX import at module level: the PyTorch children of the benchmarks use
``median_seconds`` too.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_WHILE = re.compile(r"\swhile\(")


def median_seconds(step: Callable[[], object], n: int, *, warm: bool = True) -> float:
    """Median wall seconds of ``n`` calls of ``step`` (after one untimed call if
    ``warm``); ``step`` itself waits for its results."""
    if warm:
        step()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def loop_trips(hlo_text: str) -> list[int | None]:
    """Trip count of every ``while`` loop in an optimized HLO module's text
    (``compiled.as_text()``), ``None`` where XLA does not know it."""
    trips = []
    for line in hlo_text.splitlines():
        if _WHILE.search(line) and "body=" in line:
            m = _TRIPS.search(line)
            trips.append(int(m.group(1)) if m else None)
    return trips


def cost(compiled) -> dict:
    """XLA's FLOPs and bytes accessed for one device's program, and whether they
    are exact: ``exact`` is False when some loop runs more than once (or an
    unknown number of times), since XLA counts its body once. ``loops``: the
    trip counts (``None``: unknown)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        analysis = None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    analysis = analysis or {}
    try:
        trips = loop_trips(compiled.as_text())
    except Exception:  # noqa: BLE001
        trips = [None]
    flops = float(analysis.get("flops", 0.0) or 0.0)
    nbytes = float(analysis.get("bytes accessed", 0.0) or 0.0)
    return dict(flops=flops or None, bytes=nbytes or None, loops=trips,
                exact=all(t is not None and t <= 1 for t in trips))
