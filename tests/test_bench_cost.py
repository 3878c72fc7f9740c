"""bench/xla_cost.py: which XLA counts are exact, and the loop trip counts it reads."""

import os
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import xla_cost  # noqa: E402


def _loop(n):
    w = jnp.ones((64, 64), jnp.float32)
    return jax.jit(lambda x: jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ w), x))


def test_loop_trips_and_exactness():
    x = jnp.ones((32, 64), jnp.float32)
    costs = {n: xla_cost.cost(_loop(n).lower(x).compile()) for n in (4, 16)}
    for n, c in costs.items():
        assert xla_cost.loop_trips(_loop(n).lower(x).compile().as_text()) in ([n], [None])
        assert c["exact"] is False, (n, c)
    # XLA's count of a loop's body is once whatever the trip count (the reason
    # for the flag): the 16-trip count is far below 16 bodies' matmuls.
    # If this fails, XLA now counts trips: bench/xla_cost.py's docstring and
    # docs/benchmarks.md say otherwise.
    assert costs[16]["flops"] < 16 * 2 * 32 * 64 * 64
    # A loop-free program's count is exact and is its matmul's 2 M K N FLOPs
    # (plus tanh's one per element, which XLA may or may not count).
    w = jnp.ones((64, 64), jnp.float32)
    free = xla_cost.cost(jax.jit(lambda x: jnp.tanh(x @ w)).lower(x).compile())
    assert free["exact"] is True and free["loops"] == []
    assert 2 * 32 * 64 * 64 <= free["flops"] <= 2 * 32 * 64 * 64 + 32 * 64 * 8


def test_median_seconds_is_the_median_after_a_warm_up(monkeypatch):
    durations = iter([5.0, 1.0, 3.0])  # the three timed calls
    now = [0.0]
    calls = []

    def step():
        calls.append(now[0])
        if len(calls) > 1:  # the first call is the untimed warm-up
            now[0] += next(durations)

    monkeypatch.setattr(xla_cost, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    assert xla_cost.median_seconds(step, 3) == 3.0
    assert len(calls) == 4
