"""Open-set 1:N identification: a gallery of enrolled templates, probes searched in it.

The measures (as the IJB-B/C 1:N protocol and NIST's face-search reports
define them), for probe and gallery features with subject ids:

* A probe is **mated** when its subject has a template in the gallery,
  **non-mated** otherwise. Its scores are the cosines to every gallery
  template.
* **Rank-k** (closed set, mated probes only): the fraction whose mate (the
  best-scoring gallery template of its own subject) is among the ``k``
  best-scoring templates. A gallery template of another subject scoring the
  same as the mate counts as ahead of it: ties are not hits.
* **TPIR at FPIR f** (open set): with ``n`` non-mated probes, ``floor(f n)``
  of them may raise an alarm. The threshold ``t`` is the
  ``(floor(f n) + 1)``-th highest non-mated top score, and a search returns
  a candidate only when its top score is ``> t``, so at most ``floor(f n)``
  non-mated probes return one (fewer when their scores tie at ``t``). TPIR
  is the fraction of mated probes whose mate is at rank 1 *and* scores
  ``> t``. This is the 1:1 ``tar_at_far_scores`` rule with the mate's score
  as the positive (or no hit when the mate is not at rank 1) and the top
  score of each non-mated probe as the negative.

IJB-C has two disjoint galleries (G1, G2; IJB-B: S1, S2) searched with one
probe set ("mixed"): for each gallery the probes of the other gallery's
subjects are the non-mated ones. :func:`identify` scores one gallery; the
IJB runner reports each and their mean. Scores are computed in probe chunks
on the host (the IJB-C similarity matrix is about 19.6k x 1.8k).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from pfc_jax.evaluate.verification import l2_normalize, roc_curve, tar_at_fars_scores

FPIRS = (1e-2, 1e-1)
RANKS = (1, 5, 10)
_CHUNK = 2048


@dataclasses.dataclass(frozen=True)
class SearchScores:
    """Per probe: ``mate_score`` (NaN when non-mated), ``mate_rank`` (0 when
    non-mated; 1 = best) and ``top_score`` (the highest score over the gallery)."""

    mate_score: np.ndarray
    mate_rank: np.ndarray
    top_score: np.ndarray

    @property
    def mated(self) -> np.ndarray:
        return self.mate_rank > 0


@dataclasses.dataclass(frozen=True)
class IdentificationResult:
    """``tpir_at_fpir {f: tpir}``, ``rank {k: rate}``, the probe counts and the
    TPIR-FPIR curve ``(fpir, tpir)`` (None without non-mated probes)."""

    tpir_at_fpir: dict[float, float]
    rank: dict[int, float]
    num_mated: int
    num_nonmated: int
    curve: tuple[np.ndarray, np.ndarray] | None


def search(probe_feats: np.ndarray, probe_subjects: np.ndarray, gallery_feats: np.ndarray,
           gallery_subjects: np.ndarray, chunk: int = _CHUNK) -> SearchScores:
    """Scores every probe against the gallery (rows L2-normalised here; cosine scores)."""
    p = l2_normalize(np.asarray(probe_feats, np.float64))
    g = l2_normalize(np.asarray(gallery_feats, np.float64))
    ps = np.asarray(probe_subjects).ravel()
    gs = np.asarray(gallery_subjects).ravel()
    if p.ndim != 2 or g.ndim != 2 or p.shape[1] != g.shape[1]:
        raise ValueError(f"probe features {p.shape} and gallery features {g.shape} must be "
                         "[n, D] with the same D")
    if ps.shape[0] != p.shape[0] or gs.shape[0] != g.shape[0]:
        raise ValueError(f"{ps.shape[0]} probe subjects for {p.shape[0]} probes, "
                         f"{gs.shape[0]} gallery subjects for {g.shape[0]} templates")
    if g.shape[0] == 0 or p.shape[0] == 0:
        raise ValueError("identification needs at least one probe and one gallery template")
    for name, a in (("probe", p), ("gallery", g)):
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        if bad.size:
            raise ValueError(f"{bad.size} {name} features are not finite (first: row "
                             f"{bad[0]})")
    mate_score = np.full(p.shape[0], np.nan)
    mate_rank = np.zeros(p.shape[0], np.int64)
    top = np.empty(p.shape[0])
    for s in range(0, p.shape[0], chunk):
        sim = p[s:s + chunk] @ g.T                        # [c, G]
        own = ps[s:s + chunk, None] == gs[None, :]        # [c, G]
        top[s:s + chunk] = sim.max(axis=1)
        mated = own.any(axis=1)
        best_own = np.where(own, sim, -np.inf).max(axis=1)
        ahead = ((sim >= best_own[:, None]) & ~own).sum(axis=1)
        mate_score[s:s + chunk] = np.where(mated, best_own, np.nan)
        mate_rank[s:s + chunk] = np.where(mated, ahead + 1, 0)
    return SearchScores(mate_score, mate_rank, top)


def evaluate(scores: SearchScores, fpirs: Sequence[float] = FPIRS,
             ranks: Sequence[int] = RANKS) -> IdentificationResult:
    """Rank-k and TPIR at FPIR from :func:`search`'s scores."""
    mated = scores.mated
    n_m, n_nm = int(mated.sum()), int((~mated).sum())
    rank = {int(k): (float(np.mean(scores.mate_rank[mated] <= k)) if n_m else float("nan"))
            for k in ranks}
    # A mated probe's candidate is a hit only when it is its mate (rank 1).
    hit = np.where(scores.mate_rank[mated] == 1, scores.mate_score[mated], -np.inf)
    nonmated_top = scores.top_score[~mated]
    tpir = {float(f): g[0] for f, g in zip(fpirs, tar_at_fars_scores(hit, nonmated_top, fpirs))}
    curve = roc_curve(hit, nonmated_top) if n_m and n_nm else None
    return IdentificationResult(tpir, rank, n_m, n_nm, curve)


def identify(probe_feats, probe_subjects, gallery_feats, gallery_subjects,
             fpirs: Sequence[float] = FPIRS, ranks: Sequence[int] = RANKS
             ) -> IdentificationResult:
    """:func:`search` then :func:`evaluate`."""
    return evaluate(search(probe_feats, probe_subjects, gallery_feats, gallery_subjects),
                    fpirs, ranks)


def read_template_subjects(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 1:N protocol CSV (``TEMPLATE_ID,SUBJECT_ID,...`` per image, a header line
    first): returns the unique ``(template_ids, subject_ids)``, sorted by template.

    Raises:
      ValueError: naming the file and line of a malformed record, or a template
        listed with two subjects.
    """
    path = os.fspath(path)
    subject_of: dict[int, tuple[int, int]] = {}
    first = True
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of a field
        for lineno, line in enumerate(f, start=1):
            fields = [x.strip() for x in line.split(",")]
            if not line.strip():
                continue
            if first and not fields[0].lstrip("-").isdigit():
                first = False
                continue  # the header: the first non-blank line, when it is not a record
            first = False
            if len(fields) < 2:
                raise ValueError(f"{path}, line {lineno}: expected TEMPLATE_ID,SUBJECT_ID,..., "
                                 f"got {line.strip()!r}")
            try:
                t, sub = int(fields[0]), int(fields[1])
            except ValueError:
                raise ValueError(f"{path}, line {lineno}: template and subject ids must be "
                                 f"integers, got {fields[0]!r}, {fields[1]!r}") from None
            if t in subject_of and subject_of[t][0] != sub:
                raise ValueError(f"{path}, line {lineno}: template {t} has subject {sub} but "
                                 f"line {subject_of[t][1]} gave {subject_of[t][0]}")
            subject_of.setdefault(t, (sub, lineno))
    if not subject_of:
        raise ValueError(f"{path}: no records")
    tids = np.array(sorted(subject_of), np.int64)
    return tids, np.array([subject_of[t][0] for t in tids], np.int64)


def format_result(name: str, r: IdentificationResult) -> str:
    """One line, e.g. ``IJBC 1:N G1: TPIR@FPIR=0.01 0.9012 | ... | rank-1 0.96 | ...``."""
    parts = [f"TPIR@FPIR={f:g} {v:.4f}" for f, v in r.tpir_at_fpir.items()]
    parts += [f"rank-{k} {v:.4f}" for k, v in r.rank.items()]
    parts.append(f"{r.num_mated} mated / {r.num_nonmated} non-mated probes")
    return f"{name}: " + " | ".join(parts)
