"""Probable mislabels and duplicate identities of a training set, from any run.

    pfc-suspects --workdir W --out DIR [--duplicate-cos 0.5] [--top 1000] [--drop-fraction 0.3]
    python -m pfc_jax.suspects --workdir W --out DIR

Works for K = 1 runs as well as sub-centre runs. One pass over the run's
training source (noise and keep-list included) embeds every image and, on
the mesh against the sharded class table (never gathered), finds per image

* ``target_cos``: the cosine to its own class (max over the K sub-centres),
  the head's per-sample target cosine;
* ``nearest_cos``, ``nearest_class``: the largest cosine to any *other*
  class, over the whole table (not just a step's sampled classes), scanned
  block by block on every head shard and reduced with a ``pmax``.

**Mislabels** are ranked by ``margin = target_cos - nearest_cos``, lowest
first: an image nearer to another class than to its own is the first
suspect. ``mislabels.csv``: rank, record, record name, label, the three
numbers, and the class it looks like.

**Duplicate identities** (one person under two labels) are pairs of classes
(a, b) whose centres are close: every pair that is some image's nearest other
class is a candidate; its centre cosine (max over sub-centre pairs, read for
those rows only) and the fraction of each class's images pointing at the
other are reported, pairs above ``--duplicate-cos`` ranked by centre cosine
(``duplicates.csv``).

With ``--drop-fraction f``, ``keep.npz`` is the keep-list of the training
set without the fraction ``f`` of images ranked first (for
``--config.data.keep_list``; on noisy data at small budgets this cleans better
than the sub-centre angle, ``docs/noise.md``).

``report.json`` holds the counts and, when the workdir holds injected-noise
ground truth, how well each list finds it: the share of flipped records among
the first ``n_flipped`` mislabel suspects (precision at the true count) and
the share of planted twin pairs among the reported duplicates.
"""

from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from pfc_jax import clean as clean_lib
from pfc_jax import logs, platform

DEFAULT_DUPLICATE_COS = 0.5


def scan(reader, table_scan, embed, table, progress=None) -> dict:
    n = reader.n
    target = np.full((n,), np.nan, np.float32)
    near = np.full((n,), np.nan, np.float32)
    near_cls = np.full((n,), -1, np.int64)
    labels = np.full((n,), -1, np.int64)
    bar = logs.Progress("scanning", n, progress)
    for lo, images, y in reader:
        x = embed(images)
        own = table_scan.own_cosines(table, x, y)
        best, cls = table_scan.nearest_other(table, x, y)
        hi = min(lo + reader.batch, n)
        k = hi - lo
        target[lo:hi] = clean_lib._to_host(jnp.max(own, axis=-1))[:k]
        near[lo:hi] = clean_lib._to_host(best)[:k]
        near_cls[lo:hi] = clean_lib._to_host(cls)[:k]
        labels[lo:hi] = clean_lib._to_host(y)[:k]
        bar.update(hi)
    ok = labels >= 0
    return dict(labels=labels, readable=ok, target_cos=np.where(ok, target, np.nan),
                nearest_cos=np.where(ok, near, np.nan), nearest_class=near_cls,
                margin=np.where(ok, target - near, np.nan))


def centre_cosines(table: jax.Array, pairs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Max cosine over sub-centre pairs for each class pair ``[n, 2]``; reads those rows only."""

    @jax.jit
    def cos(t, a, b):
        ra, rb = clean_lib._unit(t[a]), clean_lib._unit(t[b])       # [c, K, D]
        return jnp.max(jnp.einsum("ckd,cld->ckl", ra, rb), axis=(1, 2))

    out = np.zeros((len(pairs),), np.float32)
    for lo in range(0, len(pairs), chunk):
        p = np.zeros((chunk, 2), np.int32)
        got = pairs[lo:lo + chunk]
        p[:len(got)] = got
        out[lo:lo + len(got)] = np.asarray(cos(table, jnp.asarray(p[:, 0]),
                                               jnp.asarray(p[:, 1])))[:len(got)]
    return out


def duplicate_pairs(result: dict, table: jax.Array, threshold: float) -> dict:
    """Candidate class pairs from the nearest-other-class of every image, scored."""
    ok = result["readable"] & (result["nearest_class"] >= 0)
    a, b = result["labels"][ok], result["nearest_class"][ok]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs, inverse = np.unique(np.stack([lo, hi], 1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    sizes = np.bincount(result["labels"][result["readable"]])
    # images of the pair's first / second class whose nearest other class is the other
    from_lo = np.bincount(inverse, weights=(a == lo), minlength=len(pairs))
    from_hi = np.bincount(inverse, weights=(a == hi), minlength=len(pairs))
    cc = centre_cosines(table, pairs) if len(pairs) else np.zeros(0, np.float32)
    keep = cc > threshold
    order = np.argsort(-cc[keep], kind="stable")
    p = pairs[keep][order]
    return dict(pairs=p, centre_cos=cc[keep][order],
                frac_a=from_lo[keep][order] / np.maximum(sizes[p[:, 0]], 1),
                frac_b=from_hi[keep][order] / np.maximum(sizes[p[:, 1]], 1),
                candidates=int(len(pairs)))


def find(workdir: str, out: str, *, duplicate_cos: float = DEFAULT_DUPLICATE_COS,
         top: int | None = None, drop_fraction: float | None = None,
         step: int | None = None, batch_size: int = 256, mesh=None, progress=None) -> dict:
    from pfc_jax import train
    from pfc_jax.data import noise as noise_lib

    config, source, mesh, embed, table, step, head_axes = clean_lib.load_run(
        workdir, step, mesh)
    ts = clean_lib.TableScan(mesh, table.shape, config.head.num_classes, head_axes)
    reader = clean_lib.BatchReader(source, mesh, -(-batch_size // mesh.size) * mesh.size)
    try:
        result = scan(reader, ts, embed, table, progress)
    finally:
        reader.close()
    dup = duplicate_pairs(result, table, duplicate_cos)
    readable = result["readable"]
    order = np.flatnonzero(readable)[np.argsort(result["margin"][readable], kind="stable")]
    report = dict(workdir=os.path.abspath(workdir), step=int(step),
                  num_subcenters=int(table.shape[1]), records=int(len(readable)),
                  nearer_to_another_class=int(np.sum(result["margin"][readable] < 0)),
                  duplicate_cos=duplicate_cos, duplicate_candidates=dup["candidates"],
                  duplicate_pairs=int(len(dup["pairs"])))
    truth_path = os.path.join(workdir, train.NOISE_TRUTH)
    truth = noise_lib.load_truth(truth_path) if os.path.exists(truth_path) else None
    drop = None
    if drop_fraction is not None:
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError(f"--drop-fraction must be in [0, 1), got {drop_fraction}")
        drop = np.zeros(len(readable), bool)
        drop[order[: int(round(drop_fraction * len(order)))]] = True
        report.update(drop_fraction=drop_fraction, images_dropped=int(drop.sum()),
                      images_kept=int((readable & ~drop).sum()))
        if truth is not None:
            report["dropped_vs_truth"] = clean_lib.score_drops(
                drop, np.asarray(truth.flipped, bool), readable)
    if truth is not None:
        flipped = np.asarray(truth.flipped, bool)
        n_flip = int(flipped[readable].sum())
        report["mislabels_vs_truth"] = dict(
            flipped=n_flip,
            precision_at_n_flipped=float(flipped[order[:n_flip]].mean()) if n_flip else None)
        twins = {tuple(sorted(map(int, t))) for t in truth.twins}
        found = {tuple(map(int, p)) for p in dup["pairs"]}
        report["duplicates_vs_truth"] = dict(
            twin_pairs=len(twins), reported=len(found), twins_reported=len(twins & found),
            recall=len(twins & found) / max(len(twins), 1),
            precision=len(twins & found) / max(len(found), 1))
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        name = getattr(source, "record_name", lambda i: f"record {i}")
        rows = order if top is None else order[:top]
        with open(os.path.join(out, "mislabels.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rank", "record", "record_name", "label", "target_cos", "nearest_cos",
                        "margin", "looks_like_class"])
            for rank, i in enumerate(rows):
                w.writerow([rank, int(i), name(int(i)), int(result["labels"][i]),
                            f"{result['target_cos'][i]:.5f}", f"{result['nearest_cos'][i]:.5f}",
                            f"{result['margin'][i]:.5f}", int(result["nearest_class"][i])])
        with open(os.path.join(out, "duplicates.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class_a", "class_b", "centre_cos", "frac_a_nearest_b",
                        "frac_b_nearest_a"])
            for (a, b), c, fa, fb in zip(dup["pairs"], dup["centre_cos"], dup["frac_a"],
                                         dup["frac_b"]):
                w.writerow([int(a), int(b), f"{c:.5f}", f"{fa:.4f}", f"{fb:.4f}"])
        np.savez(os.path.join(out, "scan.npz"), **result)
        if drop is not None:
            from pfc_jax.data import keep as keep_lib
            summary = keep_lib.write_keep_list(os.path.join(out, "keep.npz"), source,
                                               readable & ~drop)
            report["keep_list"] = os.path.abspath(os.path.join(out, "keep.npz"))
            report["classes_kept"] = int(summary["num_classes"])
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
    report["order"] = order
    report["duplicates"] = dup
    return report


def format_report(r: dict) -> str:
    lines = [f"suspects of {r['workdir']} step {r['step']} (K = {r['num_subcenters']})",
             f"  {r['nearer_to_another_class']:,} of {r['records']:,} images are nearer to "
             "another class than to their own",
             f"  {r['duplicate_pairs']:,} class pairs with centre cosine > "
             f"{r['duplicate_cos']:g} (of {r['duplicate_candidates']:,} candidates)"]
    if "mislabels_vs_truth" in r:
        m, d = r["mislabels_vs_truth"], r["duplicates_vs_truth"]
        lines.append(f"  injected noise: {m['flipped']:,} flipped, precision of the first "
                     f"{m['flipped']:,} suspects {m['precision_at_n_flipped']}")
        lines.append(f"  planted twins: {d['twins_reported']} of {d['twin_pairs']} reported "
                     f"(precision {d['precision']:.3f})")
    if "keep_list" in r:
        lines.append(f"  dropped the {r['drop_fraction']:g} lowest-margin images: kept "
                     f"{r['images_kept']:,} in {r['classes_kept']:,} classes; train on it: "
                     f"--config.data.keep_list={r['keep_list']}")
        if "dropped_vs_truth" in r:
            v = r["dropped_vs_truth"]
            lines.append(f"  against the injected flips: precision {v['precision']:.3f} "
                         f"recall {v['recall']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = clean_lib.run_arguments(__doc__.splitlines()[0])
    ap.add_argument("--duplicate-cos", type=float, default=DEFAULT_DUPLICATE_COS,
                    help="report class pairs whose centres are closer than this cosine")
    ap.add_argument("--top", type=int, default=None, help="mislabel rows to write (default all)")
    ap.add_argument("--drop-fraction", type=float, default=None,
                    help="also write keep.npz without this fraction of lowest-margin images "
                         "(for --config.data.keep_list)")
    args = ap.parse_args(argv)
    r = find(args.workdir, args.out, duplicate_cos=args.duplicate_cos, top=args.top,
             drop_fraction=args.drop_fraction,
             step=args.step, batch_size=args.batch_size)
    print(format_report(r))
    return r


run = platform.entry_point(main, __name__)  # pfc-suspects; also python -m
