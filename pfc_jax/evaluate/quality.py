"""Face quality as error versus discard: does a score know which matches to distrust?

``error_vs_discard(similarity, issame, quality)`` is the error-versus-discard
curve (EDC) of a quality score on verification pairs:

1. the decision threshold ``t`` is fixed once, on *all* impostor pairs, at the
   false match rate ``fmr``: ``t`` is the ``k``-th highest impostor
   similarity, ``k = floor(fmr * impostors)``, and a pair matches when its
   similarity is above ``t`` (so at most ``fmr`` of impostors match);
2. a pair's quality is the lower of its two images' (``pair_quality``);
3. for each discard fraction ``x``, the ``floor(x * genuine)`` genuine pairs
   of lowest quality are set aside (ties broken by pair order) and the
   false non-match rate ``FNMR(x)`` is the fraction of the rest that does
   not match at ``t``.

A useful score makes FNMR fall as ``x`` grows; a random one leaves it flat on
average. ``area`` is the trapezoid integral of ``FNMR`` over the fractions
(the same grid for every score, so smaller is better, comparably).
``baselines`` adds the two scores every quality method is compared with:
the embedding's norm before normalisation, and a seeded random score.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

DEFAULT_FRACTIONS = tuple(np.round(np.linspace(0.0, 0.5, 11), 6))


def pair_quality(quality: np.ndarray) -> np.ndarray:
    """Per-image quality [2P] (images 2i, 2i + 1 form pair i) -> per-pair [P]: the minimum."""
    q = np.asarray(quality, np.float64)
    if q.ndim != 1 or len(q) % 2:
        raise ValueError(f"quality must be one score per image of the pairs, got {q.shape}")
    return np.minimum(q[0::2], q[1::2])


def threshold_at_fmr(similarity: np.ndarray, issame: np.ndarray, fmr: float) -> float:
    imp = np.sort(np.asarray(similarity, np.float64)[~np.asarray(issame, bool)])[::-1]
    if len(imp) == 0:
        raise ValueError("no impostor pairs: the threshold at a false match rate is undefined")
    if not 0.0 <= fmr < 1.0:
        raise ValueError(f"fmr must be in [0, 1), got {fmr}")
    return float(imp[min(int(np.floor(fmr * len(imp))), len(imp) - 1)])


def error_vs_discard(similarity: np.ndarray, issame: np.ndarray, quality: np.ndarray,
                     fmr: float = 1e-2,
                     fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict:
    """The EDC (module docstring). ``quality``: one score per *pair* (see ``pair_quality``).

    Returns ``dict(fractions, fnmr, threshold, fmr, area)`` (lists of floats).
    """
    sim = np.asarray(similarity, np.float64)
    same = np.asarray(issame, bool)
    q = np.asarray(quality, np.float64)
    if not (sim.shape == same.shape == q.shape) or sim.ndim != 1:
        raise ValueError(f"similarity, issame and quality must be [P] alike, got "
                         f"{sim.shape}, {same.shape}, {q.shape}")
    if not np.all(np.isfinite(q)):
        raise ValueError(f"quality has {int(np.sum(~np.isfinite(q)))} non-finite scores")
    t = threshold_at_fmr(sim, same, fmr)
    gen_sim, gen_q = sim[same], q[same]
    if len(gen_sim) == 0:
        raise ValueError("no genuine pairs: FNMR is undefined")
    order = np.argsort(gen_q, kind="stable")          # lowest quality first
    miss = (gen_sim[order] <= t).astype(np.float64)
    fr = [float(x) for x in fractions]
    if any(not 0.0 <= x < 1.0 for x in fr) or fr != sorted(fr):
        raise ValueError(f"fractions must be ascending in [0, 1), got {fr}")
    fnmr = [float(miss[int(np.floor(x * len(miss))):].mean()) for x in fr]
    y, x = np.asarray(fnmr), np.asarray(fr)
    area = float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))  # trapezoids; 0 for one point
    return dict(fractions=fr, fnmr=fnmr, threshold=t, fmr=float(fmr), area=area)


def baselines(raw_embeddings: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-image baseline scores: ``norm`` (of the un-normalised embedding) and ``random``."""
    raw = np.asarray(raw_embeddings, np.float64)
    return dict(norm=np.linalg.norm(raw, axis=1),
                random=np.random.default_rng(seed).random(len(raw)))


def compare(similarity: np.ndarray, issame: np.ndarray, scores: Mapping[str, np.ndarray],
            fmr: float = 1e-2, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict:
    """``error_vs_discard`` of several per-image scores on the same pairs."""
    return {name: error_vs_discard(similarity, issame, pair_quality(s), fmr, fractions)
            for name, s in scores.items()}


def edc_figure(curves: Mapping[str, dict], title: str):
    """A matplotlib figure of several EDCs (``compare``'s result)."""
    from pfc_jax import plots
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, c in curves.items():
        ax.plot(c["fractions"], c["fnmr"], marker="o", ms=3,
                label=f"{name} (area {c['area']:.4f})")
    any_curve = next(iter(curves.values()))
    ax.set_xlabel("fraction of lowest-quality genuine pairs discarded")
    ax.set_ylabel(f"FNMR at FMR {any_curve['fmr']:g}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def format_curves(curves: Mapping[str, dict]) -> str:
    lines = []
    for name, c in curves.items():
        pts = "  ".join(f"{x:.2f}:{y:.4f}" for x, y in zip(c["fractions"], c["fnmr"]))
        lines.append(f"  {name:<10} area {c['area']:.4f}  FNMR at discard {pts}")
    return "\n".join(lines)
