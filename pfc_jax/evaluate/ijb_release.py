"""IJB-B / IJB-C end to end from the release layout: images to 1:1 and 1:N numbers.

    pfc-eval --model M --ijb /data/IJB_release/IJBC --target IJBC [--roc plots/]

The layout (the one the field's evaluation packs use)::

    IJBC/
      loose_crop/<image_name>             the face crops, as listed in the meta files
      meta/ijbc_face_tid_mid.txt          image template media
      meta/ijbc_name_5pts_score.txt       image x1 y1 ... x5 y5 detector_score
      meta/ijbc_template_pair_label.txt   template template same(1)/different(0)
      meta/ijbc_1N_gallery_G1.csv         1:N galleries (IJB-B: ..._gallery_S1/S2.csv)
      meta/ijbc_1N_gallery_G2.csv
      meta/ijbc_1N_probe_mixed.csv        1:N probes

``--ijb`` takes the ``IJBC`` folder or the folder above it. Each image is
decoded, aligned onto the ArcFace template from its five landmarks
(:func:`pfc_jax.align.align`) and embedded with its mirror image (the two
summed, not normalised: the norm is a quality weight in the pooling);
decoding runs in a thread pool one chunk ahead of the devices. The image
embeddings go to a cache file keyed by the model's parameters, the image
list and the landmarks, written chunk by chunk, so a second protocol or a
second run reads them instead of embedding again, and a run stopped half
way resumes where it stopped. Template pooling and the 1:1 scores are
:mod:`pfc_jax.evaluate.ijb`'s; 1:N is :mod:`pfc_jax.evaluate.identification`
on each gallery with the mixed probes, their mean, and the closed-set ranks
on the two galleries together ("G1+G2", every probe mated).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable

import numpy as np

from pfc_jax.evaluate import identification, ijb

GALLERIES = {"IJBB": ("S1", "S2"), "IJBC": ("G1", "G2")}
CHUNK = 1024            # images decoded (and cached) at a time
ALIGN_VERSION = 1       # bump when the alignment changes: old caches then miss


@dataclasses.dataclass(frozen=True)
class Release:
    target: str
    image_dir: str
    meta_dir: str


@dataclasses.dataclass(frozen=True)
class IJBRun:
    """``one_to_one`` (:class:`ijb.IJBResult`), ``identification`` ``{gallery:
    IdentificationResult}`` (empty when the release has no 1:N files; with two
    galleries a ``"mean"`` entry averages their TPIR and ranks, and
    ``"G1+G2"`` holds the closed-set ranks over both), the 1:1 ROC ``(far,
    tar)`` and where the image embeddings came from."""

    one_to_one: ijb.IJBResult
    identification: dict
    roc: tuple[np.ndarray, np.ndarray]
    cache: str | None
    embedded: int


def find_release(path: str, target: str) -> Release:
    """The image and meta folders of ``target`` at ``path`` (the target's folder or its parent)."""
    tgt = target.upper()
    if tgt not in ijb.TARGETS:
        raise ValueError(f"--target must be one of {ijb.TARGETS}, got {target!r}")
    for root in (path, os.path.join(path, tgt)):
        meta, crops = os.path.join(root, "meta"), os.path.join(root, "loose_crop")
        if os.path.isdir(meta) and os.path.isdir(crops):
            return Release(tgt, crops, meta)
    raise FileNotFoundError(f"{path}: no loose_crop/ and meta/ folders in it or in "
                            f"{os.path.join(path, tgt)} (the IJB release layout)")


def load_aligned(image_dir: str, name: str, landmarks: np.ndarray, where: str) -> np.ndarray:
    """uint8 ``[112, 112, 3]``: ``image_dir/name`` decoded and aligned from its landmarks."""
    from PIL import Image

    from pfc_jax import align
    path = os.path.join(image_dir, name)
    try:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read image {path}: {e}") from None
    try:
        return align.align(img, landmarks)
    except ValueError as e:
        raise ValueError(f"{where}: {path}: {e}") from None


def model_fingerprint(variables, model=None) -> str:
    """sha256 of the model's definition (its repr: network, dtype, attention...) and of
    every leaf's path, dtype, shape and bytes."""
    import jax
    h = hashlib.sha256()
    if model is not None:
        h.update(repr(model).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def cache_key(model_key: str, meta: ijb.IJBMeta, flip: bool) -> str:
    h = hashlib.sha256()
    h.update(f"{model_key}|{meta.target}|flip={flip}|align={ALIGN_VERSION}|".encode())
    h.update("\n".join(map(str, meta.image_names)).encode())
    h.update(np.ascontiguousarray(meta.landmarks, np.float32).tobytes())
    return h.hexdigest()


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pfc_jax", "ijb")


class _Cache:
    """``[n, D]`` float32 embeddings in ``NAME.npy`` (a memory map) with ``NAME.json``
    saying whose they are and how many rows are done; rows are flushed before the
    count moves, so a killed run never counts a row it did not write. A process
    holds ``NAME.lock`` (an exclusive ``flock``) while it reads or writes the entry,
    so two evaluations of one model wait for each other instead of mixing rows."""

    def __init__(self, cache_dir: str | None, target: str, key: str, n: int):
        self.n, self.key, self.done, self.array = n, key, 0, None
        self.path, self._lock = None, None
        if cache_dir is None:
            return
        os.makedirs(cache_dir, exist_ok=True)
        stem = os.path.join(cache_dir, f"{target.lower()}_{key[:16]}")
        self.path, self._side = stem + ".npy", stem + ".json"
        import fcntl
        self._lock = open(stem + ".lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            with open(self._side) as f:
                side = json.load(f)
            done = int(side["done"])
            if side.get("key") == key and side.get("images") == n and 0 <= done <= n:
                array = np.load(self.path, mmap_mode="r" if done == n else "r+")
                if array.shape != (n, int(side["dim"])) or array.dtype != np.float32:
                    raise ValueError("shape")
                self.array, self.done = array, done
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            self.array, self.done = None, 0

    def _write_side(self, done: int, dim: int) -> None:
        tmp = self._side + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(key=self.key, images=self.n, dim=dim, done=done), f)
        os.replace(tmp, self._side)

    def write(self, start: int, feats: np.ndarray) -> None:
        if self.array is None:
            if self.path is None:
                self.array = np.zeros((self.n, feats.shape[1]), np.float32)
            else:
                self._write_side(0, int(feats.shape[1]))  # no stale count over a new file
                self.array = np.lib.format.open_memmap(self.path, "w+", np.float32,
                                                       (self.n, feats.shape[1]))
        self.array[start:start + feats.shape[0]] = feats
        self.done = start + feats.shape[0]
        if self.path is not None:
            self.array.flush()
            self._write_side(self.done, int(feats.shape[1]))

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None


def embed_images(embed_fn: Callable[[np.ndarray], np.ndarray], meta: ijb.IJBMeta,
                 release: Release, *, batch_size: int = 64, flip: bool = True,
                 model_key: str = "", cache_dir: str | None = None, workers: int = 8,
                 progress: bool | None = None, chunk: int = CHUNK
                 ) -> tuple[np.ndarray, str | None, int]:
    """Flip-summed, unnormalised float32 ``[n, D]`` embeddings of ``meta``'s images.

    Returns ``(feats, cache file or None, images embedded in this call)``.
    """
    from pfc_jax import logs
    from pfc_jax.evaluate import verification
    n = meta.image_names.shape[0]
    cache = _Cache(cache_dir, meta.target, cache_key(model_key, meta, flip), n)
    start0 = cache.done
    names_file = os.path.join(release.meta_dir, f"{meta.target.lower()}_name_5pts_score.txt")

    def load(i: int) -> np.ndarray:
        return load_aligned(release.image_dir, str(meta.image_names[i]), meta.landmarks[i],
                            f"{names_file}, record {i + 1}")

    bar = logs.Progress(f"{meta.target}: embedding images", n, progress)
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            def submit(s):
                return [pool.submit(load, i) for i in range(s, min(s + chunk, n))]

            pending = submit(start0) if start0 < n else []
            for s in range(start0, n, chunk):
                images = np.stack([f.result() for f in pending])
                pending = submit(s + chunk) if s + chunk < n else []  # decode ahead
                feats = verification.embed(embed_fn, images, batch_size, flip=flip,
                                           normalize=False)
                cache.write(s, feats.astype(np.float32))
                bar.update(s + images.shape[0])
        if cache.array is None:
            raise ValueError(f"{meta.target}: no images to embed")
        return np.array(cache.array), cache.path, n - start0
    finally:
        cache.close()  # the lock is held until the rows are copied out


def _template_rows(all_tids: np.ndarray, wanted: np.ndarray, path: str) -> np.ndarray:
    pos, missing = ijb.lookup_sorted(all_tids, wanted)
    if missing.size:
        tid_mid = os.path.join(os.path.dirname(path), os.path.basename(path).split("_1N_")[0]
                               + "_face_tid_mid.txt")
        raise ValueError(f"{path}: template {wanted[missing[0]]} has no image in {tid_mid}")
    return pos


def identification_protocol(release: Release, all_tids: np.ndarray, feats: np.ndarray
                            ) -> dict:
    """1:N on each gallery with the mixed probes; ``{}`` when the files are absent."""
    prefix = os.path.join(release.meta_dir, release.target.lower() + "_1N_")
    names = GALLERIES[release.target]
    paths = [f"{prefix}gallery_{g}.csv" for g in names] + [f"{prefix}probe_mixed.csv"]
    missing = [p for p in paths if not os.path.isfile(p)]
    if len(missing) == len(paths):
        return {}  # a 1:1-only release
    if missing:
        raise FileNotFoundError(f"{release.target} 1:N: {', '.join(missing)} missing (the "
                                f"others are there)")
    sets = [identification.read_template_subjects(p) for p in paths]
    rows = [_template_rows(all_tids, t, p) for (t, _), p in zip(sets, paths)]
    probe_feats, probe_subjects = feats[rows[-1]], sets[-1][1]
    out = {}
    for g, r, (_, subjects) in zip(names, rows[:-1], sets[:-1]):
        out[g] = identification.identify(probe_feats, probe_subjects, feats[r], subjects)
    a, b = (out[g] for g in names)
    out["mean"] = identification.IdentificationResult(
        {f: (a.tpir_at_fpir[f] + b.tpir_at_fpir[f]) / 2 for f in a.tpir_at_fpir},
        {k: (a.rank[k] + b.rank[k]) / 2 for k in a.rank},
        a.num_mated + b.num_mated, a.num_nonmated + b.num_nonmated, None)
    both = identification.identify(
        probe_feats, probe_subjects, np.concatenate([feats[r] for r in rows[:-1]]),
        np.concatenate([s for _, s in sets[:-1]]), fpirs=())
    out["+".join(names)] = both
    return out


def run(embed_fn, release: Release, *, batch_size: int = 64, flip: bool = True,
        model_key: str = "", cache_dir: str | None = None, use_det_scores: bool = True,
        rule: str = "at_most", workers: int = 8, progress: bool | None = None) -> IJBRun:
    """Reads, aligns, embeds (or reads the cache) and scores 1:1 and 1:N."""
    from pfc_jax.evaluate import verification
    meta = ijb.load_ijb_meta(release.meta_dir, release.target)
    img_feats, cache_path, embedded = embed_images(
        embed_fn, meta, release, batch_size=batch_size, flip=flip,
        model_key=model_key, cache_dir=cache_dir, workers=workers, progress=progress)
    tids, feats = ijb.template_features(img_feats, meta.det_scores if use_det_scores else None,
                                        meta.media_ids, meta.template_ids)
    one = ijb.score_template_pairs(tids, feats, meta, rule=rule)
    labels = meta.pair_labels.astype(bool)
    roc = verification.roc_curve(one.scores[labels], one.scores[~labels])
    return IJBRun(one, identification_protocol(release, tids, feats), roc, cache_path, embedded)


def to_json(r: IJBRun) -> dict:
    def ident(x: identification.IdentificationResult) -> dict:
        return dict(tpir_at_fpir={str(k): v for k, v in x.tpir_at_fpir.items()},
                    rank={str(k): v for k, v in x.rank.items()}, num_mated=x.num_mated,
                    num_nonmated=x.num_nonmated,
                    curve=None if x.curve is None else dict(fpir=x.curve[0].tolist(),
                                                            tpir=x.curve[1].tolist()))
    return dict(tar_at_far={str(k): v for k, v in r.one_to_one.tar_at_far.items()},
                num_pairs=r.one_to_one.num_pairs, num_templates=r.one_to_one.num_templates,
                roc=dict(far=r.roc[0].tolist(), tar=r.roc[1].tolist()),
                identification={g: ident(x) for g, x in r.identification.items()})


def format_run(r: IJBRun, target: str) -> str:
    lines = [ijb.format_ijb(f"{target} 1:1", r.one_to_one)]
    for g, x in r.identification.items():
        if g.count("+"):
            lines.append(f"{target} 1:N {g} (closed set): " + " | ".join(
                f"rank-{k} {v:.4f}" for k, v in x.rank.items()))
        else:
            lines.append(identification.format_result(f"{target} 1:N {g}", x))
    return "\n".join(lines)
