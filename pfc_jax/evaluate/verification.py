"""Pair verification on InsightFace-style ``.bin`` sets (LFW, CFP-FP, AgeDB-30, ...).

Protocol (METHODS.md, "Evaluation protocols"):

* A ``.bin`` file is ``pickle((bins, issame))``: ``2N`` encoded images and ``N``
  booleans; pair ``i`` is images ``2i`` and ``2i + 1``.
* Each image is embedded as ``f(img) + f(horizontal flip of img)``, then
  L2-normalised (:func:`embed`).
* The score of a pair is the squared L2 distance of its two normalised
  embeddings (``0`` = identical, ``4`` = opposite); a pair is predicted
  "same" when ``distance < threshold``.
* 10-fold cross-validation with folds contiguous in pair order: for each fold
  the threshold (grid ``0, 0.01, ..., 3.99``) with the best accuracy on the
  other folds is applied to the held-out fold; the result is mean and
  (population) std of the fold accuracies (:func:`evaluate`).

Everything here is NumPy; the embedding function supplied by the caller does
any device work.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

DEFAULT_THRESHOLDS = np.arange(0, 4, 0.01)
"""The threshold grid of the protocol: 0 to 3.99 in steps of 0.01."""

DEFAULT_FARS = (1e-3,)

# Slack when turning ``far * num_negatives`` into a count of allowed false
# accepts, so that e.g. 0.29 * 100 = 28.999999999999996 still allows 29.
_FAR_COUNT_SLACK = 1e-9


@dataclasses.dataclass(frozen=True)
class VerificationSet:
    """A decoded verification set.

    Attributes:
      name: set name (the file stem for :func:`load_bin`).
      images: uint8 ``[2N, H, W, 3]`` RGB; pair ``i`` is rows ``2i`` and ``2i + 1``.
      issame: bool ``[N]``, True where the two images of a pair share an identity.
    """

    name: str
    images: np.ndarray
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.issame.shape[0])


@dataclasses.dataclass(frozen=True)
class VerificationResult:
    """Outcome of :func:`evaluate` on one set.

    Attributes:
      accuracy_mean: mean of ``fold_accuracies``.
      accuracy_std: population std (``ddof=0``) of ``fold_accuracies``.
      fold_accuracies: ``[nfolds]`` accuracy of each held-out fold.
      best_thresholds: ``[nfolds]`` threshold chosen on the other folds for each fold.
      tar_at_far: ``{far: tar}``; see :func:`tar_at_far_distances`.
      num_pairs: number of pairs evaluated.
      roc: ``(far, tar)`` over all pairs (:func:`roc_curve`), for plots.
    """

    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    best_thresholds: np.ndarray
    tar_at_far: dict[float, float]
    num_pairs: int
    roc: tuple[np.ndarray, np.ndarray] | None = None


# ---------------------------------------------------------------------------
# .bin files


def _as_bytes(blob: object, path: str, index: int) -> bytes:
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return bytes(blob)
    if isinstance(blob, np.ndarray) and blob.dtype == np.uint8:
        return blob.tobytes()
    if isinstance(blob, str):
        # A Python 2 ``str`` read back with encoding="latin1" (see load_bin).
        return blob.encode("latin1")
    raise ValueError(
        f"{path}: image {index} is a {type(blob).__name__}, expected encoded image bytes")


def _decode_image(blob: bytes, size: tuple[int, int], path: str, index: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img = img.convert("RGB")
            if img.size != (size[1], size[0]):  # PIL sizes are (width, height)
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception as err:  # Pillow raises several types for corrupt data
        raise ValueError(
            f"{path}: image {index} does not decode ({type(err).__name__}: {err})") from err


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size}")
    return size  # type: ignore[return-value]


def load_bin(path: str | os.PathLike, image_size: int | Sequence[int] = 112,
             name: str | None = None) -> VerificationSet:
    """Reads an InsightFace verification ``.bin`` file.

    Pickles written by Python 2 (where the images are ``str``) are read with
    ``encoding="latin1"`` and their strings turned back into the original
    bytes, so both Python 2 and Python 3 files load. Images are decoded with
    Pillow to RGB and resized (bilinear) to ``image_size`` when they differ.
    Unpickling can run code: load only files from a trusted source.

    Args:
      path: the ``.bin`` file.
      image_size: output side length, or ``(height, width)``.
      name: set name; defaults to the file name without extension.

    Raises:
      ValueError: the file is not a ``(bins, issame)`` pickle of a list of
        images and a 1-D list of booleans, it holds no pairs, the number of
        images is not twice the number of pairs, or an image does not decode
        (the message names the file and the image index).
    """
    path = os.fspath(path)
    size = _image_size(image_size)
    with open(path, "rb") as f:
        try:
            obj = pickle.load(f, encoding="latin1")
        except Exception as err:
            raise ValueError(f"{path}: not a readable pickle ({err})") from err
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (bins, issame) pair, got {type(obj).__name__}"
                         + (f" of length {len(obj)}" if hasattr(obj, "__len__") else ""))
    bins, issame_list = obj
    if not isinstance(bins, (list, tuple, np.ndarray)):
        raise ValueError(f"{path}: images must be a list of encoded images, "
                         f"got {type(bins).__name__}")
    try:
        issame = np.asarray(issame_list)
    except ValueError as err:  # ragged nesting
        raise ValueError(f"{path}: issame is not a flat list of booleans ({err})") from err
    if issame.ndim != 1:
        raise ValueError(f"{path}: issame must be 1-D, got shape {issame.shape}")
    if len(bins) != 2 * issame.shape[0]:
        raise ValueError(
            f"{path}: {len(bins)} images but {issame.shape[0]} issame labels; "
            f"expected 2 images per pair ({2 * issame.shape[0]} images)")
    if issame.shape[0] == 0:
        raise ValueError(f"{path}: no pairs")
    if issame.dtype != np.bool_:
        if not np.isin(issame, (0, 1)).all():
            raise ValueError(f"{path}: issame must hold booleans (or 0/1)")
        issame = issame.astype(bool)
    images = np.empty((len(bins), size[0], size[1], 3), dtype=np.uint8)
    for i, blob in enumerate(bins):
        images[i] = _decode_image(_as_bytes(blob, path, i), size, path, i)
    if name is None:
        name = os.path.splitext(os.path.basename(path))[0]
    return VerificationSet(name=name, images=images, issame=issame)


def write_bin(path: str | os.PathLike, images: np.ndarray, issame: Sequence[bool] | np.ndarray,
              fmt: str = "jpeg", quality: int = 95) -> None:
    """Writes a verification ``.bin`` file that :func:`load_bin` (and InsightFace) read.

    Args:
      path: output file.
      images: uint8 ``[2N, H, W, 3]`` RGB; pair ``i`` is rows ``2i`` and ``2i + 1``.
      issame: ``[N]`` booleans.
      fmt: ``"jpeg"`` (lossy, ``quality``) or ``"png"`` (lossless).
      quality: JPEG quality.
    """
    images = np.asarray(images)
    issame_arr = np.asarray(issame)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 [2N, H, W, 3], got {images.dtype} {images.shape}")
    if issame_arr.ndim != 1 or images.shape[0] != 2 * issame_arr.shape[0]:
        raise ValueError(
            f"{images.shape[0]} images but {issame_arr.shape} issame labels; "
            "expected 2 images per pair")
    fmt_l = fmt.lower()
    if fmt_l not in ("jpeg", "jpg", "png"):
        raise ValueError(f"fmt must be 'jpeg' or 'png', got {fmt!r}")
    bins = []
    for img in images:
        buf = io.BytesIO()
        if fmt_l == "png":
            Image.fromarray(img).save(buf, format="PNG")
        else:
            Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        bins.append(buf.getvalue())
    issame_list = [bool(x) for x in issame_arr]
    with open(os.fspath(path), "wb") as f:
        pickle.dump((bins, issame_list), f, protocol=pickle.HIGHEST_PROTOCOL)


# ---------------------------------------------------------------------------
# Embedding


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)


def embed(embed_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
          batch_size: int = 64, flip: bool = True, progress: bool | None = False,
          what: str = "embedding", normalize: bool = True) -> np.ndarray:
    """Embeds images batch by batch and L2-normalises the result.

    ``embed_fn`` receives uint8 ``[batch_size, H, W, 3]`` batches (always this
    shape: the last batch is zero-padded and the padding rows dropped, so a
    jitted function compiles once) and returns ``[batch_size, D]``; input
    normalisation and device placement are its business. With ``flip`` the
    embedding of an image is ``embed_fn(img) + embed_fn(img flipped left-right)``
    before normalisation. ``progress``: a progress line on stderr
    (``logs.Progress``; None: when stderr is a terminal).

    Returns:
      float64 ``[num_images, D]``, rows of unit norm (raw sums with
      ``normalize=False``).
    """
    from pfc_jax import logs
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [n, H, W, C], got shape {images.shape}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("no images to embed")

    def run(batch: np.ndarray) -> np.ndarray:
        out = np.asarray(embed_fn(batch), dtype=np.float64)
        if out.ndim != 2 or out.shape[0] != batch.shape[0]:
            raise ValueError(
                f"embed_fn returned shape {out.shape} for a batch of {batch.shape[0]}; "
                "expected [batch, D]")
        return out

    chunks = []
    bar = logs.Progress(what, n, progress)
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        count = batch.shape[0]
        if count < batch_size:
            pad = np.zeros((batch_size - count,) + images.shape[1:], dtype=images.dtype)
            batch = np.concatenate([batch, pad], axis=0)
        feats = run(batch)
        if flip:
            feats = feats + run(np.ascontiguousarray(batch[:, :, ::-1]))
        chunks.append(feats[:count])
        bar.update(start + count)
    out = np.concatenate(chunks, axis=0)
    return l2_normalize(out) if normalize else out


def lowres(vset: VerificationSet, side: int, which: str = "both") -> VerificationSet:
    """The set with images degraded to ``side`` px and back (bicubic,
    ``pfc_jax.data.degrade``): ``both`` images of each pair, or ``one`` (the
    second, as when a gallery photo meets a surveillance probe)."""
    from pfc_jax.data.degrade import degrade
    if which not in ("both", "one"):
        raise ValueError(f"lowres: which must be 'both' or 'one', got {which!r}")
    images = np.array(vset.images, copy=True)
    rows = range(len(images)) if which == "both" else range(1, len(images), 2)
    for i in rows:
        images[i] = degrade(images[i], side, "bicubic")
    return VerificationSet(f"{vset.name}@{side}px" + ("" if which == "both" else "-one"),
                           images, vset.issame)


# ---------------------------------------------------------------------------
# Scoring


def fold_bounds(num_pairs: int, nfolds: int) -> np.ndarray:
    """Boundaries ``[nfolds + 1]`` of contiguous folds over ``num_pairs`` pairs.

    Fold ``k`` is ``[bounds[k], bounds[k + 1])``. The first ``num_pairs % nfolds``
    folds hold one pair more than the rest (the split of an unshuffled k-fold).
    """
    if nfolds < 1:
        raise ValueError(f"nfolds must be >= 1, got {nfolds}")
    if num_pairs < nfolds:
        raise ValueError(f"{num_pairs} pairs cannot be split into {nfolds} folds")
    sizes = np.full(nfolds, num_pairs // nfolds, dtype=np.int64)
    sizes[: num_pairs % nfolds] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance ``[N]`` between rows ``2i`` and ``2i + 1`` (rows L2-normalised first)."""
    emb = l2_normalize(np.asarray(embeddings, dtype=np.float64))
    diff = emb[0::2] - emb[1::2]
    return np.sum(diff * diff, axis=1)


def tar_at_far_scores(pos_scores: np.ndarray, neg_scores: np.ndarray,
                      far: float) -> tuple[float, float, float]:
    """TAR at the most permissive threshold whose false accept rate is at most ``far``.

    Higher score = more similar; a pair is accepted when ``score > t``. With
    ``k = floor(far * num_negatives)`` false accepts allowed, ``t`` is the
    ``(k + 1)``-th highest negative score, so at most ``k`` negatives are
    accepted (fewer when scores tie at ``t``: ties are never split) and no
    higher threshold accepts more positives under that limit. When ``k`` covers
    all negatives everything is accepted (``t = -inf``). This is the ROC point
    with the largest TPR among those with FPR <= ``far``.

    Returns:
      ``(tar, achieved_far, threshold)``; ``tar`` is NaN when there are no
      positives, and everything is NaN when there are no negatives.
    """
    return tar_at_fars_scores(pos_scores, neg_scores, (far,))[0]


def tar_at_fars_scores(pos_scores: np.ndarray, neg_scores: np.ndarray,
                       fars) -> list[tuple[float, float, float]]:
    """:func:`tar_at_far_scores` at each of ``fars``, sorting the scores once."""
    pos = np.sort(np.asarray(pos_scores, dtype=np.float64).ravel())
    neg = np.sort(np.asarray(neg_scores, dtype=np.float64).ravel())
    for name, a in (("positive", pos), ("negative", neg)):
        if a.size and np.isnan(a[-1]):  # sorting puts NaNs last
            raise ValueError(f"{int(np.isnan(a).sum())} {name} scores are NaN (a NaN "
                             "embedding?); TAR at FAR is undefined")
    out = []
    for far in fars:
        if not 0.0 <= far <= 1.0:
            raise ValueError(f"far must lie in [0, 1], got {far}")
        if neg.size == 0:
            out.append((math.nan, math.nan, math.nan))
            continue
        k = int(math.floor(far * neg.size + _FAR_COUNT_SLACK))
        threshold = -math.inf if k >= neg.size else float(neg[neg.size - 1 - k])
        # counts of scores > threshold, from the sorted arrays
        tar = (float(pos.size - np.searchsorted(pos, threshold, side="right")) / pos.size
               if pos.size else math.nan)
        achieved = float(neg.size - np.searchsorted(neg, threshold, side="right")) / neg.size
        out.append((tar, achieved, threshold))
    return out


def roc_curve(pos_scores: np.ndarray, neg_scores: np.ndarray,
              max_points: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The ROC, ``(far, tar)`` with FAR ascending, for "accept when score > t".

    Every distinct threshold gives one point, from nothing accepted (0, 0)
    to everything (1, 1); TAR never falls as FAR grows. With more than
    ``max_points`` points the curve is read at ``max_points`` FARs spaced
    evenly in log10 from ``1 / #negatives`` to 1 (plus 0), each with the
    largest TAR whose FAR does not exceed it: the :func:`tar_at_far_scores`
    value at that FAR.
    """
    pos = np.sort(np.asarray(pos_scores, dtype=np.float64).ravel())
    neg = np.sort(np.asarray(neg_scores, dtype=np.float64).ravel())
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"roc_curve needs both kinds of pair, got {pos.size} same and "
                         f"{neg.size} different")
    t = np.concatenate([[np.inf], np.unique(np.concatenate([pos, neg]))[::-1], [-np.inf]])
    far = (neg.size - np.searchsorted(neg, t, side="right")) / neg.size
    tar = (pos.size - np.searchsorted(pos, t, side="right")) / pos.size
    if far.size > max_points:
        grid = np.concatenate([[0.0], np.logspace(math.log10(1.0 / neg.size), 0.0,
                                                  max_points - 1)])
        # The last point with far <= g (and the largest tar among equal fars).
        at = np.searchsorted(far, grid * (1 + _FAR_COUNT_SLACK), side="right") - 1
        far, tar = grid, tar[at]
    return far, tar


def tar_at_far_distances(dist: np.ndarray, issame: np.ndarray,
                         fars: Sequence[float] = DEFAULT_FARS) -> dict[float, float]:
    """TAR at FAR over all pairs, for distances where ``dist < t`` means "same".

    For each ``far``: the threshold ``t`` is the ``(k + 1)``-th smallest
    different-identity distance with ``k = floor(far * num_different)``, so at
    most a fraction ``far`` of different-identity pairs has ``dist < t``; TAR is
    the fraction of same-identity pairs with ``dist < t`` (see
    :func:`tar_at_far_scores`, used with ``score = -dist``).

    This differs from the per-fold "VAL@FAR" of the original evaluation
    scripts, which picks the threshold on the training folds from the grid
    ``0, 0.001, ..., 3.999`` by linear interpolation of FAR against threshold,
    applies it to the held-out fold (whose FAR can then exceed the target) and
    averages over folds. Here the threshold is exact and pooled, and the
    target FAR is never exceeded on the evaluated pairs. With few negative
    pairs the rate is coarse: LFW's 3000 allow 3 false accepts at FAR 1e-3.
    """
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    return {float(far): tar_at_far_scores(-dist[issame], -dist[~issame], far)[0]
            for far in fars}


def evaluate(embeddings: np.ndarray, issame: Sequence[bool] | np.ndarray, nfolds: int = 10,
             thresholds: np.ndarray = DEFAULT_THRESHOLDS,
             fars: Sequence[float] = DEFAULT_FARS) -> VerificationResult:
    """k-fold verification accuracy and TAR at FAR.

    Args:
      embeddings: ``[2N, D]``; pair ``i`` is rows ``2i`` and ``2i + 1``. Rows are
        L2-normalised here (a no-op for the output of :func:`embed`).
      issame: ``[N]`` booleans.
      nfolds: number of contiguous folds (:func:`fold_bounds`). For each fold
        the threshold with the most correct predictions on the other folds is
        chosen; ties go to the first in ``thresholds`` order, i.e. the smallest
        threshold for an ascending grid. ``nfolds = 1`` chooses and tests on
        all pairs.
      thresholds: candidate thresholds on the squared distance; a pair is
        predicted "same" when ``distance < threshold``.
      fars: target false accept rates for ``tar_at_far``
        (:func:`tar_at_far_distances`).
    """
    embeddings = np.asarray(embeddings)
    issame = np.asarray(issame)
    if issame.ndim != 1:
        raise ValueError(f"issame must be 1-D, got shape {issame.shape}")
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * issame.shape[0]:
        raise ValueError(
            f"embeddings have shape {embeddings.shape} but issame has {issame.shape[0]} "
            f"pairs; expected [{2 * issame.shape[0]}, D]")
    issame = issame.astype(bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1 or thresholds.size == 0:
        raise ValueError(f"thresholds must be a non-empty 1-D array, got {thresholds.shape}")
    num_pairs = issame.shape[0]
    bounds = fold_bounds(num_pairs, nfolds)
    dist = pair_distances(embeddings)

    # correct[k, i]: threshold k classifies pair i correctly. Per-fold counts
    # give every fold's train/test counts without re-scanning the pairs.
    correct = (dist[None, :] < thresholds[:, None]) == issame[None, :]
    per_fold = np.stack([correct[:, a:b].sum(axis=1) for a, b in zip(bounds[:-1], bounds[1:])],
                        axis=1)  # [K, nfolds]
    total = per_fold.sum(axis=1)
    sizes = np.diff(bounds)

    fold_acc = np.empty(nfolds)
    best = np.empty(nfolds)
    for f in range(nfolds):
        train_correct = total - per_fold[:, f] if nfolds > 1 else total
        k = int(np.argmax(train_correct))  # first maximum = smallest ascending threshold
        best[f] = thresholds[k]
        fold_acc[f] = per_fold[k, f] / sizes[f]
    return VerificationResult(
        accuracy_mean=float(np.mean(fold_acc)),
        accuracy_std=float(np.std(fold_acc)),
        fold_accuracies=fold_acc,
        best_thresholds=best,
        tar_at_far=tar_at_far_distances(dist, issame, fars),
        num_pairs=num_pairs,
        roc=roc_curve(-dist[issame], -dist[~issame]) if issame.any() and (~issame).any()
        else None,
    )


def verify(embed_fn: Callable[[np.ndarray], np.ndarray], sets: Mapping[str, VerificationSet],
           batch_size: int = 64, flip: bool = True, nfolds: int = 10,
           fars: Sequence[float] = DEFAULT_FARS,
           progress: bool | None = False) -> dict[str, VerificationResult]:
    """Embeds (:func:`embed`) and evaluates (:func:`evaluate`) each set; keys as in ``sets``."""
    results = {}
    for name, vset in sets.items():
        emb = embed(embed_fn, vset.images, batch_size=batch_size, flip=flip,
                    progress=progress, what=f"embedding {name}")
        results[name] = evaluate(emb, vset.issame, nfolds=nfolds, fars=fars)
    return results


def format_results(results: Mapping[str, VerificationResult]) -> str:
    """One log line per set.

    For example ``lfw: acc 0.99500 +- 0.00300 | TAR@FAR=0.001 0.98000 | 6000 pairs``.
    """
    lines = []
    for name, res in results.items():
        parts = [f"{name}: acc {res.accuracy_mean:.5f} +- {res.accuracy_std:.5f}"]
        for far, tar in res.tar_at_far.items():
            parts.append(f"TAR@FAR={far:g} {tar:.5f}")
        parts.append(f"{res.num_pairs} pairs")
        lines.append(" | ".join(parts))
    return "\n".join(lines)
