"""Generalisation diagnostics of a backbone: ``pfc-diagnose``.

    pfc-diagnose --workdir /ckpt/ssl_r50 --data recordio:/data/eval_faces --json report.json
    pfc-diagnose --model /models/r50 --data folder:/data/ids --strength 0.5
    pfc-diagnose --workdir /tmp/pfc_ssl --data synthetic          # the run's held-out ids

Huang, Yi and Zhao (ICLR 2023) bound the downstream error of a contrastive
encoder by three measurable factors; on a labelled set this reports them for
the model's embeddings ``f`` (L2-normalised) under an augmentation (the
workdir's configured one, or ``ssl.view_augmentation(--strength)``), each
image drawn ``--views`` times (METHODS.md §4):

* ``alignment``: ``E_x E_{v != w} ||f(x_v) - f(x_w)||²`` over the pairs of
  views of an image (two views: the paper's ``E||f(x1) - f(x2)||²``);
* class-centre divergence: the centres ``mu_k = E_{x in C_k} E_v f(x_v)``
  (not normalised), ``divergence_max = max_{k != l} mu_kᵀ mu_l`` and
  ``divergence_mean`` (the mean over ordered pairs k != l);
* ``one_minus_min_centre_norm2 = 1 - min_k ||mu_k||²``;
* concentration: the augmentation distance of two images is ``d_A(i, j) =
  min_{v, w} ||f(x_iv) - f(x_jw)||`` (0 for i = j). A class is (sigma,
  delta)-concentrated when a fraction sigma of it lies within one set of
  ``d_A``-diameter delta. Finding the largest such set is a clique problem;
  the estimate here takes, per class, the largest fraction within ``d_A <=
  delta`` of one of its members, ``sigma_k``, and reports ``1 - min_k
  sigma_k`` (``one_minus_sigma``, the paper's worst-class form) and the mean
  of ``1 - sigma_k`` per ``--delta``. (A ball of radius delta around a member
  holds every diameter-delta set through that member, so the estimate errs
  towards concentration; its ordering across models is what the experiment
  in ``docs/ssl.md`` uses.)

It also reports ``knn_top1``: leave-one-out nearest-neighbour identity
accuracy of the *un-augmented* images' embeddings (cosine), the downstream
number the diagnostics are meant to predict.

The embeddings are computed on the devices (``pfc_jax.embed``); the centre
Gram matrix and the per-class distances are computed there too, in blocks of
rows and of classes, so sets of many classes fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from pfc_jax import platform

DEFAULT_DELTAS = (0.5, 1.0)


# ------------------------------------------------------------------- the quantities
def _unit(x):
    import jax.numpy as jnp
    return x * jnp.reciprocal(jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12))


def group_by_class(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes [K], members [K, m]): the row indices of each class, padded with -1."""
    labels = np.asarray(labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    members = np.full((len(classes), int(counts.max())), -1, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for k, (s, c) in enumerate(zip(starts, counts)):
        members[k, :c] = order[s:s + c]
    return classes, members


def _row_blocks(x, block: int):
    """Rows of ``x`` [n, d] zero-padded to whole blocks: [n / block, block, d]."""
    import jax.numpy as jnp
    pad = -x.shape[0] % block
    return jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block, x.shape[1])


def _centre_stats(rows, cols, k: int):
    """(max, sum) of mu_k . mu_l over k != l. ``rows``: the centres padded to a
    multiple of the devices, sharded over them; ``cols``: the centres in blocks
    (replicated), one block of Gram columns per loop step."""
    import jax
    import jax.numpy as jnp
    i = jnp.arange(rows.shape[0])[:, None]

    def one(carry, args):
        b, c = args
        g = rows @ c.T                                  # [K', block]: rows stay put
        j = b * c.shape[0] + jnp.arange(c.shape[0])[None, :]
        off = (i != j) & (i < k) & (j < k)
        return (jnp.maximum(carry[0], jnp.max(jnp.where(off, g, -jnp.inf))),
                carry[1] + jnp.sum(jnp.where(off, g, 0.0))), None

    init = (jnp.array(-jnp.inf, rows.dtype), jnp.array(0.0, rows.dtype))
    (mx, sm), _ = jax.lax.scan(one, init, (jnp.arange(cols.shape[0]), cols))
    return mx, sm


def _sigma_chunk(f, mask, deltas):
    """sigma_k per delta for a chunk of classes: f [c, m, V, d] unit, mask [c, m]."""
    import jax.numpy as jnp
    c, m, v, d = f.shape
    flat = f.reshape(c, m * v, d)
    g = jnp.einsum("cid,cjd->cij", flat, flat).reshape(c, m, v, m, v)
    best = jnp.max(g, axis=(2, 4))                     # max cosine over view pairs [c, m, m]
    dist = jnp.sqrt(jnp.maximum(2.0 - 2.0 * best, 0.0))
    eye = jnp.eye(m, dtype=bool)[None]
    dist = jnp.where(eye, 0.0, dist)
    pair = mask[:, :, None] & mask[:, None, :]
    n = jnp.maximum(jnp.sum(mask, axis=1), 1)
    out = []
    for delta in deltas:
        within = jnp.sum(pair & (dist <= delta), axis=2)   # [c, m], 0 for padding rows
        out.append(jnp.max(within, axis=1) / n)
    return jnp.stack(out, axis=1)                       # [c, len(deltas)]


def _knn_labels(rows, cols, labels, n: int):
    """The label of each row's nearest other image (cosine); rows sharded, columns
    [n / block, block, d] one block per loop step."""
    import jax
    import jax.numpy as jnp
    i = jnp.arange(rows.shape[0])[:, None]
    col_labels = jnp.pad(labels, (0, cols.size // cols.shape[-1] - n)).reshape(cols.shape[:2])

    def one(carry, args):
        best, lab = carry
        b, c, cl = args
        s = rows @ c.T
        j = b * c.shape[0] + jnp.arange(c.shape[0])[None, :]
        s = jnp.where((i == j) | (j >= n), -jnp.inf, s)
        top = jnp.argmax(s, axis=1)
        val = jnp.max(s, axis=1)
        better = val > best                             # ties keep the earlier image
        return (jnp.where(better, val, best), jnp.where(better, cl[top], lab)), None

    init = (jnp.full((rows.shape[0],), -jnp.inf, rows.dtype),
            jnp.full((rows.shape[0],), -1, labels.dtype))
    (_, nearest), _ = jax.lax.scan(one, init, (jnp.arange(cols.shape[0]), cols, col_labels))
    return nearest


def diagnostics(views: np.ndarray, labels: np.ndarray, deltas: Sequence[float] = DEFAULT_DELTAS,
                clean: np.ndarray | None = None, *, mesh=None, row_block: int = 1024,
                elements_per_chunk: int = 1 << 24) -> dict[str, Any]:
    """The report (module docstring) of embeddings ``views`` [n, V, d] with ``labels`` [n].

    ``clean`` [n, d]: the un-augmented images' embeddings, for ``knn_top1``
    (left out when None). Embeddings need not be normalised. ``mesh``: where
    the Gram blocks and the per-class distances run (default: every device on
    one axis); rows of centres, images and classes are split over it.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pfc_jax import mesh as mesh_lib
    views = np.asarray(views, np.float32)
    labels = np.asarray(labels)
    if views.ndim != 3 or views.shape[1] < 2 or len(labels) != len(views):
        raise ValueError(f"diagnostics: views must be [n, V >= 2, d] with n labels, got "
                         f"{views.shape} and {labels.shape[0]} labels")
    n, v, d = views.shape
    classes, members = group_by_class(labels)
    if len(classes) < 2:
        raise ValueError(f"diagnostics: {len(classes)} class(es); centre divergence needs two")
    mesh = mesh if mesh is not None else mesh_lib.make_mesh({"data": -1})
    ndev = mesh.size
    split = NamedSharding(mesh, P(mesh.axis_names))     # first axis over every device

    def sharded_rows(x):  # [r, ...] zero-padded to a multiple of the devices, split
        pad = -x.shape[0] % ndev
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return jax.device_put(x, split)

    f = _unit(jnp.asarray(views))

    # alignment: mean over the V(V-1) ordered view pairs of each image, then images
    g = jnp.einsum("nvd,nwd->nvw", f, f)
    off = 1.0 - jnp.eye(v)
    alignment = jnp.mean(jnp.sum((2.0 - 2.0 * g) * off, axis=(1, 2)) / (v * (v - 1)))

    # class centres and their Gram matrix, a block of columns at a time
    idx = jnp.asarray(np.maximum(members, 0))
    mask = jnp.asarray(members >= 0)
    per_image = jnp.mean(f, axis=1)                                  # [n, d]
    mu = jnp.sum(per_image[idx] * mask[..., None], axis=1) / jnp.sum(mask, 1)[:, None]
    k = mu.shape[0]
    mx, sm = jax.jit(_centre_stats, static_argnums=2)(
        sharded_rows(mu), _row_blocks(mu, min(row_block, k)), k)
    norms2 = jnp.sum(mu * mu, axis=1)

    # concentration: chunks of classes split over the devices (one compile: the
    # last chunk is padded with empty classes)
    m = members.shape[1]
    chunk = max(1, min(k, elements_per_chunk // max(1, m * m * v * v)))
    chunk = -(-chunk // ndev) * ndev
    sigma_fn = jax.jit(lambda ff, mm: _sigma_chunk(ff, mm, tuple(float(x) for x in deltas)))
    sigmas = []
    for start in range(0, k, chunk):
        ids = members[start:start + chunk]
        fill = chunk - len(ids)
        ids = np.concatenate([ids, np.full((fill, m), -1, np.int64)]) if fill else ids
        ff = jax.device_put(f[jnp.asarray(np.maximum(ids, 0))], split)  # [chunk, m, V, d]
        sigmas.append(np.asarray(sigma_fn(ff, jax.device_put(ids >= 0, split)))[:len(ids) - fill])
    sigma = np.concatenate(sigmas)                                   # [K, len(deltas)]

    report = dict(
        num_images=int(n), num_classes=int(k), views=int(v),
        alignment=float(alignment),
        divergence_max=float(mx), divergence_mean=float(sm) / (k * (k - 1)),
        one_minus_min_centre_norm2=float(1.0 - jnp.min(norms2)),
        concentration={f"{float(dl):g}": dict(one_minus_sigma=float(1.0 - sigma[:, i].min()),
                                               mean_one_minus_sigma=float(
                                                   1.0 - sigma[:, i].mean()))
                       for i, dl in enumerate(deltas)})
    if clean is not None:
        c = _unit(jnp.asarray(np.asarray(clean, np.float32)))
        lab = jnp.asarray(labels.astype(np.int32))
        nearest = jax.jit(_knn_labels, static_argnums=3)(
            sharded_rows(c), _row_blocks(c, min(row_block, n)), lab, n)
        report["knn_top1"] = float(np.mean(np.asarray(nearest)[:n] == labels))
    return report


# --------------------------------------------------------------------- embedding views
def embed_views(embed_fn, images: np.ndarray, augment, views: int, seed: int = 0,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(views [n, V, d], clean [n, d]) for uint8 images [n, H, W, 3]: view ``v`` of
    image ``i`` is ``augment(image, default_rng([seed, i, v]))``."""
    from pfc_jax.data.augment import augment as run_augment
    from pfc_jax.evaluate import verification
    n = len(images)
    clean = verification.embed(embed_fn, images, batch_size, flip=False)
    out = np.zeros((n, views, clean.shape[1]), np.float32)
    for v in range(views):
        aug = np.stack([run_augment(images[i], augment, np.random.default_rng([seed, i, v]))
                        for i in range(n)])
        out[:, v] = verification.embed(embed_fn, aug, batch_size, flip=False)
    return out, clean.astype(np.float32)


def load_labelled(spec: str, config=None, max_classes: int | None = None,
                  max_per_class: int | None = None, seed: int = 0):
    """(uint8 images [n, 112, 112, 3], labels [n]) of ``--data``: ``KIND:PATH`` or
    ``synthetic`` (the run's held-out synthetic identities)."""
    from pfc_jax.data.augment import resize
    if spec == "synthetic":
        from pfc_jax.data.synthetic import SyntheticFaces
        if config is not None and config.data.kind == "synthetic":
            from pfc_jax import train
            src = train.build_source(config, held_out=True)
        else:
            src = SyntheticFaces(200, 8, seed=1, identity_offset=1000)
    else:
        kind, sep, path = spec.partition(":")
        if not sep:
            raise ValueError(f"--data {spec!r}: expected KIND:PATH (recordio, folder, "
                             "arrayrecord, tfds) or 'synthetic'")
        from pfc_jax.data.sources import open_source
        src = open_source(kind, path)
    labels = np.asarray(src.labels()) if hasattr(src, "labels") else \
        np.array([int(src[i]["label"]) for i in range(len(src))])
    rng = np.random.default_rng(seed)
    keep = np.unique(labels)
    if max_classes is not None and len(keep) > max_classes:
        keep = np.sort(rng.choice(keep, max_classes, replace=False))
    rows = []
    for c in keep:
        r = np.flatnonzero(labels == c)
        if max_per_class is not None and len(r) > max_per_class:
            r = np.sort(rng.choice(r, max_per_class, replace=False))
        if len(r) >= 1:
            rows.append(r)
    rows = np.concatenate(rows)
    images = []
    for i in rows:
        rec = src[int(i)]
        if rec is None:
            raise ValueError(f"--data {spec}: record {int(i)} could not be decoded")
        images.append(resize(rec["image"], 112))
    return np.stack(images), labels[rows]


def format_report(r: dict) -> str:
    lines = [f"{r['num_images']} images of {r['num_classes']} classes, {r['views']} views each",
             f"  alignment E|f(x1)-f(x2)|^2   {r['alignment']:.4f}",
             f"  centre divergence max / mean {r['divergence_max']:.4f} / "
             f"{r['divergence_mean']:.4f}",
             f"  1 - min |mu_k|^2             {r['one_minus_min_centre_norm2']:.4f}"]
    for delta, c in r["concentration"].items():
        lines.append(f"  1 - sigma at delta {delta:<6}    {c['one_minus_sigma']:.4f} "
                     f"(mean over classes {c['mean_one_minus_sigma']:.4f})")
    if "knn_top1" in r:
        lines.append(f"  1-NN identity accuracy       {r['knn_top1']:.4f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from pfc_jax.export import add_model_args
    add_model_args(ap)
    ap.add_argument("--data", required=True,
                    help="KIND:PATH (recordio, folder, arrayrecord, tfds) or 'synthetic'")
    ap.add_argument("--strength", type=float, default=None,
                    help="augment as ssl.view_augmentation(S) (default: the workdir's "
                         "configured augmentation; with --model, strength 1)")
    ap.add_argument("--views", type=int, default=4, help="augmented views per image (>= 2)")
    ap.add_argument("--delta", default=",".join(f"{d:g}" for d in DEFAULT_DELTAS),
                    help="comma list of concentration radii")
    ap.add_argument("--max-classes", type=int, default=None)
    ap.add_argument("--max-per-class", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args(argv)
    if args.views < 2:
        ap.error(f"--views must be >= 2, got {args.views}")
    try:
        deltas = tuple(float(x) for x in args.delta.split(","))
    except ValueError:
        ap.error(f"--delta {args.delta!r}: expected a comma list of numbers")

    from pfc_jax import export, ssl
    from pfc_jax.evaluate.__main__ import make_embed_fn
    config = export.load_workdir_config(args.workdir) if args.workdir else None
    model, variables, _ = export.load_from_args(args)
    if args.strength is not None or config is None:
        from pfc_jax.config import base_config
        data = base_config().data
        data.update(ssl.view_augmentation(1.0 if args.strength is None else args.strength))
        augment = ssl.augment_config(data)
    else:
        augment = ssl.augment_config(config.data)
    images, labels = load_labelled(args.data, config, args.max_classes, args.max_per_class,
                                   args.seed)
    fn = make_embed_fn(model, variables, args.batch_size)
    views, clean = embed_views(fn, images, augment, args.views, args.seed, args.batch_size)
    report = diagnostics(views, labels, deltas, clean)
    report["augment"] = augment.fingerprint()
    print(format_report(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"report -> {args.json}", file=sys.stderr)
    return report


run = platform.entry_point(main, __name__)
