"""IJB-B / IJB-C 1:1 template verification on precomputed image embeddings.

Protocol (METHODS.md, "Evaluation protocols"):

1. Per image: the embedding of the aligned crop plus that of its horizontal
   flip (summed by the caller, not normalised, so the norm acts as a quality
   weight), multiplied by the detector score of the face.
2. Per template: images of the same media (video or still) within the template
   are averaged; the media features are summed and the sum L2-normalised
   (:func:`template_features`).
3. The score of a template pair is the cosine of the two template features
   (:func:`verify_pairs`).
4. TAR at FAR 1e-6 ... 1e-1 from the ROC of the scores (:func:`tar_at_far`).

Meta files (``{target}`` is ``ijbb`` or ``ijbc``; one record per line, fields
separated by spaces):

* ``{target}_face_tid_mid.txt``: ``image_name template_id media_id``.
* ``{target}_template_pair_label.txt``: ``template_id_1 template_id_2 label``
  with label 1 for the same subject, 0 otherwise.
* ``{target}_name_5pts_score.txt``: ``image_name x1 y1 ... x5 y5 det_score``
  (five landmarks: eyes, nose, mouth corners), in the same image order as
  ``face_tid_mid``.

Aligning and embedding the images is left to the caller; this module starts
from the image embeddings.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from pfc_jax.evaluate.verification import l2_normalize, tar_at_fars_scores

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TARGETS = ("IJBB", "IJBC")
_POOL_CHUNK = 32_768   # images pooled at a time
_GRAM_ENTRIES = 1 << 25  # template-pair scores computed at a time (256 MiB of float64)


@dataclasses.dataclass(frozen=True)
class IJBMeta:
    """The three meta files of one IJB benchmark, rows aligned by image.

    Attributes:
      target: ``"IJBB"`` or ``"IJBC"``.
      image_names: ``[n]`` file names (``loose_crop/<name>``).
      template_ids: int64 ``[n]``.
      media_ids: int64 ``[n]``.
      landmarks: float32 ``[n, 5, 2]`` (x, y) in the loose crop.
      det_scores: float32 ``[n]`` detector scores.
      pair_t1: int64 ``[P]`` first template of each pair.
      pair_t2: int64 ``[P]`` second template of each pair.
      pair_labels: int8 ``[P]``, 1 = same subject.
    """

    target: str
    image_names: np.ndarray
    template_ids: np.ndarray
    media_ids: np.ndarray
    landmarks: np.ndarray
    det_scores: np.ndarray
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class IJBResult:
    """Outcome of :func:`evaluate_ijb`.

    Attributes:
      tar_at_far: ``{far: tar}``.
      scores: ``[P]`` cosine score of each template pair.
      num_templates: number of templates pooled.
      num_pairs: number of template pairs scored.
    """

    tar_at_far: dict[float, float]
    scores: np.ndarray
    num_templates: int
    num_pairs: int


# ---------------------------------------------------------------------------
# Meta files


def _read_fields(path: str, num_fields: int) -> tuple[list[list[str]], list[int]]:
    """Whitespace-split records of a text file and their 1-based line numbers.

    Blank lines are skipped.
    """
    rows, linenos = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != num_fields:
                raise ValueError(
                    f"{path}, line {lineno}: expected {num_fields} fields, "
                    f"got {len(fields)}: {line.strip()!r}")
            rows.append(fields)
            linenos.append(lineno)
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows, linenos


def _column(rows: list[list[str]], linenos: list[int], col: int, dtype: type, path: str,
            what: str) -> np.ndarray:
    try:
        return np.array([dtype(r[col]) for r in rows])
    except ValueError:
        for r, lineno in zip(rows, linenos):  # find the offending record for the message
            try:
                dtype(r[col])
            except ValueError:
                raise ValueError(
                    f"{path}, line {lineno}: {what} {r[col]!r} is not a "
                    f"{dtype.__name__}") from None
        raise


def _read_template_media(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    rows, linenos = _read_fields(path, 3)
    names = np.array([r[0] for r in rows])
    tids = _column(rows, linenos, 1, int, path, "template id").astype(np.int64)
    mids = _column(rows, linenos, 2, int, path, "media id").astype(np.int64)
    return names, tids, mids, linenos


def read_template_media(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads ``*_face_tid_mid.txt``: returns ``(image_names, template_ids, media_ids)``."""
    return _read_template_media(os.fspath(path))[:3]


def read_template_pairs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads ``*_template_pair_label.txt``: returns ``(t1, t2, labels)``.

    Uses NumPy's text reader (the IJB-C file has about 15.7 million lines).
    """
    path = os.fspath(path)
    try:
        pairs = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    if pairs.shape[0] == 0:
        raise ValueError(f"{path}: no records")
    if pairs.shape[1] != 3:
        raise ValueError(f"{path}: expected 3 fields per line (t1 t2 label), "
                         f"got {pairs.shape[1]}")
    labels = pairs[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise ValueError(f"{path}, record {bad[0] + 1} (blank lines not counted): "
                         f"label {labels[bad[0]]} is not 0 or 1")
    return pairs[:, 0].copy(), pairs[:, 1].copy(), labels.astype(np.int8)


def _read_name_5pts_score(path: str
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    rows, linenos = _read_fields(path, 12)
    names = np.array([r[0] for r in rows])
    coords = np.stack([_column(rows, linenos, c, float, path, "landmark coordinate")
                       for c in range(1, 11)], axis=1)
    scores = _column(rows, linenos, 11, float, path, "detector score").astype(np.float32)
    return names, coords.reshape(-1, 5, 2).astype(np.float32), scores, linenos


def read_name_5pts_score(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads ``*_name_5pts_score.txt``: returns ``(image_names, landmarks [n,5,2], det_scores)``."""
    return _read_name_5pts_score(os.fspath(path))[:3]


def load_ijb_meta(meta_dir: str | os.PathLike, target: str = "IJBC") -> IJBMeta:
    """Reads the three meta files of ``target`` (``"IJBB"`` or ``"IJBC"``) from ``meta_dir``.

    Raises:
      ValueError: unknown target, malformed files, or the landmark file does
        not list the same images in the same order as ``*_face_tid_mid.txt``.
    """
    tgt = target.upper()
    if tgt not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    meta_dir = os.fspath(meta_dir)
    prefix = os.path.join(meta_dir, tgt.lower())
    tid_mid_path = f"{prefix}_face_tid_mid.txt"
    pts_path = f"{prefix}_name_5pts_score.txt"
    names, tids, mids, lines = _read_template_media(tid_mid_path)
    pts_names, landmarks, scores, pts_lines = _read_name_5pts_score(pts_path)
    if pts_names.shape[0] != names.shape[0]:
        raise ValueError(f"{pts_path} lists {pts_names.shape[0]} images but {tid_mid_path} "
                         f"lists {names.shape[0]}")
    mismatch = np.flatnonzero(pts_names != names)
    if mismatch.size:
        i = int(mismatch[0])
        raise ValueError(f"{pts_path}, line {pts_lines[i]}: image {str(pts_names[i])!r} but "
                         f"{tid_mid_path}, line {lines[i]} has {str(names[i])!r}")
    t1, t2, labels = read_template_pairs(f"{prefix}_template_pair_label.txt")
    return IJBMeta(target=tgt, image_names=names, template_ids=tids, media_ids=mids,
                   landmarks=landmarks, det_scores=scores, pair_t1=t1, pair_t2=t2,
                   pair_labels=labels)


# ---------------------------------------------------------------------------
# Templates and scores


def template_features(img_feats: np.ndarray, det_scores: np.ndarray | None,
                      media_ids: np.ndarray, template_ids: np.ndarray, *,
                      normalize_images: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pools image embeddings into L2-normalised template features.

    Each image embedding is multiplied by its detector score (when given);
    within a template, images sharing a media id are averaged; the media
    averages are summed and the sum L2-normalised. A media id shared by two
    templates is averaged separately in each.

    Args:
      img_feats: ``[n, D]`` image embeddings (flip-summed by the caller).
      det_scores: ``[n]`` detector scores, or None for no scaling.
      media_ids: ``[n]``.
      template_ids: ``[n]``.
      normalize_images: L2-normalise image embeddings before scaling (off by
        default: the protocol keeps the embedding norm as a quality weight).

    Returns:
      ``(template_ids_unique, feats)``: sorted unique ids ``[T]`` and float64
      ``[T, D]`` features in that order.
    """
    feats = np.asarray(img_feats)
    media_ids = np.asarray(media_ids).ravel()
    template_ids = np.asarray(template_ids).ravel()
    if feats.ndim != 2:
        raise ValueError(f"img_feats must be [n, D], got shape {feats.shape}")
    n = feats.shape[0]
    if n == 0:
        raise ValueError("no image features")
    for name, arr in (("media_ids", media_ids), ("template_ids", template_ids)):
        if arr.shape[0] != n:
            raise ValueError(f"{name} has {arr.shape[0]} entries for {n} image features")
    weight = np.ones(n)
    if det_scores is not None:
        det_scores = np.asarray(det_scores, dtype=np.float64).ravel()
        if det_scores.shape[0] != n:
            raise ValueError(f"det_scores has {det_scores.shape[0]} entries for {n} "
                             "image features")
        weight = det_scores

    # A template's feature is sum over its media of the media's mean, i.e.
    # sum_i weight_i / |media group of i| * feat_i over its images: one weighted
    # sum per template, taken in image chunks sorted by template (no [n, D]
    # float64 copy of the features).
    uniq_t, t_idx = np.unique(template_ids, return_inverse=True)
    t_idx = t_idx.reshape(-1)
    _, m_idx = np.unique(media_ids, return_inverse=True)
    group = t_idx.astype(np.int64) * (int(m_idx.max()) + 1) + m_idx.reshape(-1)
    _, g_idx, g_count = np.unique(group, return_inverse=True, return_counts=True)
    weight = weight / g_count[g_idx.reshape(-1)]
    order = np.argsort(t_idx, kind="stable")
    pooled = np.zeros((uniq_t.shape[0], feats.shape[1]))
    for s in range(0, n, _POOL_CHUNK):
        rows = order[s:s + _POOL_CHUNK]
        x = np.asarray(feats[rows], np.float64)
        if normalize_images:
            x = l2_normalize(x)
        x *= weight[rows, None]
        t = t_idx[rows]
        starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
        pooled[t[starts]] += np.add.reduceat(x, starts, axis=0)
    return uniq_t, l2_normalize(pooled)


def lookup_sorted(sorted_ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``wanted`` in the sorted, unique ``sorted_ids``, and the indices of
    ``wanted`` that are not there (their positions are meaningless)."""
    pos = np.clip(np.searchsorted(sorted_ids, wanted), 0, sorted_ids.shape[0] - 1)
    return pos, np.flatnonzero(sorted_ids[pos] != wanted)


def verify_pairs(template_feats: np.ndarray, template_ids: np.ndarray,
                 p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """Cosine scores ``[P]`` of template pairs ``(p1[i], p2[i])``.

    ``template_feats[j]`` is the feature of template ``template_ids[j]`` (ids
    unique, any order). Rows are L2-normalised here, so the score is the
    cosine whatever their norm. Pairs are scored in blocks of first templates (a matmul each) to bound memory.

    Raises:
      ValueError: a pair names a template without a feature (the message
        gives the pair index and id).
    """
    feats = l2_normalize(np.asarray(template_feats, dtype=np.float64))
    template_ids = np.asarray(template_ids).ravel()
    p1 = np.asarray(p1).ravel()
    p2 = np.asarray(p2).ravel()
    if feats.ndim != 2 or feats.shape[0] != template_ids.shape[0]:
        raise ValueError(f"template_feats {feats.shape} do not match {template_ids.shape[0]} "
                         "template ids")
    if p1.shape != p2.shape:
        raise ValueError(f"p1 has {p1.shape[0]} entries but p2 has {p2.shape[0]}")
    order = np.argsort(template_ids, kind="stable")
    sorted_ids = template_ids[order]
    if np.any(sorted_ids[1:] == sorted_ids[:-1]):
        raise ValueError("template_ids are not unique")

    def rows(p: np.ndarray, name: str) -> np.ndarray:
        pos, missing = lookup_sorted(sorted_ids, p)
        if missing.size:
            i = int(missing[0])
            raise ValueError(f"{name}[{i}] = {p[i]} is not a template with a feature")
        return order[pos]

    r1, r2 = rows(p1, "p1"), rows(p2, "p2")
    # Blocks of first templates against every template (a matmul each), then
    # the pairs of the block read out: pairs are dense among templates (IJB-C:
    # 15.7M pairs of 23k templates), so this beats gathering two rows per pair.
    scores = np.empty(p1.shape[0], dtype=np.float64)
    block = max(1, _GRAM_ENTRIES // feats.shape[0])
    by_first = np.argsort(r1, kind="stable")
    bounds = np.searchsorted(r1[by_first], np.arange(0, feats.shape[0] + block, block))
    for b in range(bounds.shape[0] - 1):
        lo, hi = bounds[b], bounds[b + 1]
        if lo == hi:
            continue
        gram = feats[b * block:(b + 1) * block] @ feats.T
        idx = by_first[lo:hi]
        scores[idx] = gram[r1[idx] - b * block, r2[idx]]
    return scores


def roc_curve(scores: np.ndarray, labels: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full ROC for "accept when ``score >= threshold``".

    Returns ``(fpr, tpr, thresholds)``: one point per distinct score, in
    decreasing threshold order, preceded by ``(0, 0)`` at ``+inf``. No point is
    dropped (collinear points are kept).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores but {labels.shape[0]} labels")
    n_pos = int(labels.sum())
    n_neg = labels.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs both classes; got {n_pos} positives, {n_neg} negatives")
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = labels[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.shape[0] - 1]  # end of each tie run
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last]]


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = IJB_FARS,
               rule: str = "at_most") -> dict[float, float]:
    """TAR at each FAR of the score ROC (higher score = more similar).

    Rules:

    * ``"at_most"`` (default): the largest TPR among ROC points with
      FPR <= far (:func:`pfc_jax.evaluate.verification.tar_at_far_scores`).
      The reported rate never rests on more false accepts than allowed.
    * ``"nearest"``: the ROC point whose FPR is nearest to ``far`` (the largest
      TPR among equally near points), as the commonly used IJB evaluation
      script reads its tables. Its FPR may exceed ``far``; with few negatives
      (FAR 1e-6 of IJB-C's ~15.6 M negative pairs allows 15) the two rules can
      differ visibly. The
      ROC here keeps every point, whereas some plotting code drops collinear
      ones, which can move the nearest point.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores but {labels.shape[0]} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0/1 or boolean")
    labels = labels.astype(bool)
    if rule == "at_most":
        got = tar_at_fars_scores(scores[labels], scores[~labels], fars)
        return {float(far): g[0] for far, g in zip(fars, got)}
    if rule == "nearest":
        fpr, tpr, _ = roc_curve(scores, labels)
        out = {}
        for far in fars:
            gap = np.abs(fpr - far)
            out[float(far)] = float(tpr[gap == gap.min()].max())
        return out
    raise ValueError(f"rule must be 'at_most' or 'nearest', got {rule!r}")


def evaluate_ijb(img_feats: np.ndarray, meta: IJBMeta, use_det_scores: bool = True,
                 fars: Sequence[float] = IJB_FARS, rule: str = "at_most") -> IJBResult:
    """Pools templates, scores every pair of ``meta`` and reads TAR at FAR.

    Args:
      img_feats: ``[n, D]`` flip-summed embeddings, rows in the order of ``meta``.
      meta: from :func:`load_ijb_meta`.
      use_det_scores: scale image embeddings by ``meta.det_scores``.
      fars: target false accept rates.
      rule: see :func:`tar_at_far`.
    """
    img_feats = np.asarray(img_feats)
    if img_feats.ndim != 2 or img_feats.shape[0] != meta.template_ids.shape[0]:
        raise ValueError(f"img_feats have shape {img_feats.shape} but {meta.target} meta "
                         f"lists {meta.template_ids.shape[0]} images")
    tids, feats = template_features(img_feats, meta.det_scores if use_det_scores else None,
                                    meta.media_ids, meta.template_ids)
    return score_template_pairs(tids, feats, meta, fars, rule)


def score_template_pairs(tids: np.ndarray, feats: np.ndarray, meta: IJBMeta,
                         fars: Sequence[float] = IJB_FARS, rule: str = "at_most") -> IJBResult:
    """Scores every template pair of ``meta`` from pooled features
    (:func:`template_features`' output) and reads TAR at FAR."""
    scores = verify_pairs(feats, tids, meta.pair_t1, meta.pair_t2)
    return IJBResult(tar_at_far=tar_at_far(scores, meta.pair_labels, fars, rule=rule),
                     scores=scores, num_templates=int(tids.shape[0]),
                     num_pairs=int(scores.shape[0]))


def format_ijb(name: str, result: IJBResult) -> str:
    """One log line, e.g. ``IJBC: TAR@FAR=1e-06 0.8912 | ... | 15658489 pairs``."""
    parts = [f"TAR@FAR={far:g} {tar:.4f}" for far, tar in result.tar_at_far.items()]
    return f"{name}: " + " | ".join(parts + [f"{result.num_pairs} pairs"])
