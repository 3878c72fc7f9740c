"""Sub-centre cleaning of a training set (ArcFace TPAMI; ``METHODS.md`` §2).

    pfc-clean --workdir W --out DIR [--angle 75] [--mad 0.5] [--recordio]
    python -m pfc_jax.clean --workdir W --out DIR

After a run with ``head.num_subcenters = K`` (3 in the paper; K = 1 works
too, cleaning against the single centre), this embeds every training image
of the run's own source (noise and keep-list included; normalised, no flip,
no augmentation), finds each image's nearest sub-centre *of its own class*,
takes each class's dominant sub-centre (the one most of its images are
nearest to; ties to the lowest index), and drops an image whose angle to the
dominant sub-centre is not below ``--angle`` degrees (with ``--mad k``, also
one above its class's median angle + k * 1.4826 * MAD: a rule relative to
how tight the run left each class, for runs whose angles all lie above the
paper's 75 degrees; ``docs/noise.md``). Classes left empty are
dropped and labels re-indexed. Then retrain with K = 1 from scratch:

    pfc-train --config RECIPE --workdir W2 --config.data.keep_list=DIR/keep.npz

Scale: the class table stays sharded as the run left it and is never
gathered: each batch of embeddings is all-gathered to the head shards (as
the head does), every shard scores the samples of its own classes against
their K rows, and a ``psum`` gives each sample its K cosines. The per-class
counts that pick the dominant sub-centre are a sharded ``[C, K]`` int32
table. Device memory beyond the table is O(batch · K · D) plus the counts
(1/D of the table); host memory is O(images · K). Only the table is restored
from the checkpoint (not its optimizer state). With several processes each
one reads the images of its own devices' rows.

Writes, in ``--out``:

* ``keep.npz``: the keep-list (:mod:`pfc_jax.data.keep`) every source kind
  accepts through ``data.keep_list``;
* ``scan.npz``: per record, the cosines to its class's K sub-centres, the
  nearest and the dominant sub-centre and the angle to it;
* ``report.json``: images and classes kept and dropped, the kept fraction at
  other thresholds, and, when the workdir holds injected-noise ground truth
  (``noise_truth.npz``), the precision and recall of the dropped set against
  the flipped records at each threshold;
* ``angles.png``: the histogram of angles to the dominant sub-centre (split
  into flipped and clean records when the ground truth is known);
* with ``--recordio``: ``train.rec/.idx/property``, the cleaned set as a
  RecordIO folder, labels re-indexed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pfc_jax import embed as embed_lib
from pfc_jax import logs
from pfc_jax import mesh as mesh_lib
from pfc_jax import platform

DEFAULT_ANGLE = 75.0
SWEEP_ANGLES = (60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0)
_NORM_EPS = 1e-12


def _unit(v: jax.Array) -> jax.Array:
    sq = jnp.sum(v * v, axis=-1, keepdims=True)
    return v * lax.rsqrt(jnp.maximum(sq, _NORM_EPS**2))


class TableScan:
    """Per-sample look-ups against a class table sharded over ``head_axes``.

    The table is ``[P * Cl, K, D]`` with rows split over the head axes (as
    :class:`pfc_jax.partial_fc.PartialFC` keeps it); labels ``>= num_classes``
    or ``< 0`` are invalid (padding rows, masked records). Batches are split
    over every device (``mesh_lib.batch_sharding``); each method returns
    arrays split the same way.
    """

    def __init__(self, mesh: Mesh, table_shape: tuple[int, int, int], num_classes: int,
                 head_axes=None, block_rows: int = 2048):
        self.mesh = mesh
        self.head_axes = mesh_lib.resolve_head_axes(mesh, head_axes)
        self.batch_axes = mesh_lib.batch_axes(mesh)
        self.replica_axes = tuple(a for a in self.batch_axes if a not in self.head_axes)
        self.n_shards = mesh_lib.axes_size(mesh, self.head_axes)
        padded, self.k, self.d = (int(s) for s in table_shape)
        if padded % self.n_shards:
            raise ValueError(f"table rows {padded} are not a multiple of the "
                             f"{self.n_shards} head shards")
        self.cl, self.padded, self.num_classes = padded // self.n_shards, padded, int(num_classes)
        self.block = max(1, min(int(block_rows), self.cl))
        self.table_sharding = mesh_lib.table_sharding(mesh, self.head_axes)
        self.batch_sharding = mesh_lib.batch_sharding(mesh)
        hs, bs = P(self.head_axes), P(self.batch_axes)
        smap = lambda f, i, o: jax.shard_map(f, mesh=mesh, in_specs=i, out_specs=o)  # noqa: E731
        self.own_cosines = jax.jit(smap(self._own_cosines, (hs, bs, bs), bs))
        self.add_counts = jax.jit(smap(self._add_counts, (hs, bs, bs), hs), donate_argnums=0)
        self.lookup = jax.jit(smap(self._lookup, (hs, bs), bs))
        al = P(self.batch_axes)   # per-device partial results: each device its own
        self._nearest_init = jax.jit(smap(self._other_init, (bs, bs), (al,) * 4))
        self._nearest_block = jax.jit(
            smap(self._other_block, (hs, al, al, al, al, P()), (al, al)), donate_argnums=(3, 4))
        self._nearest_reduce = jax.jit(smap(self._other_reduce, (al, al), (bs, bs)))
        self.dominant = jax.jit(lambda c: jnp.argmax(c, axis=-1).astype(jnp.int32),
                                out_shardings=self.table_sharding)

    def zero_counts(self) -> jax.Array:
        return jax.jit(lambda: jnp.zeros((self.padded, self.k), jnp.int32),
                       out_shardings=self.table_sharding)()

    # ----------------------------------------------------------- inside shard_map
    def _group(self, *local):
        """The head group's whole batch, and where this shard's slice of it starts."""
        full = [lax.all_gather(a, self.head_axes, tiled=True) for a in local]
        b = local[0].shape[0]
        return full, lax.axis_index(self.head_axes) * b, b

    def _here(self, y):
        shard = lax.axis_index(self.head_axes)
        local = y - shard * self.cl
        ok = (y >= 0) & (y < self.num_classes) & (local >= 0) & (local < self.cl)
        return jnp.clip(local, 0, self.cl - 1), ok, shard

    def _own_cosines(self, table, x_local, y_local):
        (x, y), start, b = self._group(x_local, y_local)
        local, here, _ = self._here(y)
        rows = _unit(jnp.take(table, local, axis=0))              # [Bg, K, D]
        cos = jnp.einsum("bd,bkd->bk", _unit(x.astype(jnp.float32)), rows)
        cos = lax.psum(jnp.where(here[:, None], cos, 0.0), self.head_axes)
        label_ok = (y >= 0) & (y < self.num_classes)
        cos = jnp.where(label_ok[:, None], cos, -2.0)
        return lax.dynamic_slice_in_dim(cos, start, b)

    def _add_counts(self, counts, y_local, k_local):
        (y, k), _, _ = self._group(y_local, k_local)
        local, here, _ = self._here(y)
        inc = jnp.zeros_like(counts).at[local, jnp.clip(k, 0, self.k - 1)].add(
            here.astype(counts.dtype))
        if self.replica_axes:  # each replica group saw another slice of the batch
            inc = lax.psum(inc, self.replica_axes)
        return counts + inc

    def _lookup(self, values, y_local):
        (y,), start, b = self._group(y_local)
        local, here, _ = self._here(y)
        v = lax.psum(jnp.where(here, jnp.take(values, local, axis=0), 0), self.head_axes)
        return lax.dynamic_slice_in_dim(v, start, b)

    def _other_block(self, table, x, y, best, best_cls, lo):
        """Folds rows ``[lo, lo + block)`` of this shard into its running best
        (max cosine over sub-centres to a valid class other than the label).

        ``best``/``best_cls`` are this device's partial results for its group's
        batch, ``x``/``y`` its group's batch (gathered once, by ``_other_init``),
        so that a block call has no collective: dispatched many at a time, calls
        with collectives can starve XLA:CPU's emulated devices of threads. One
        call per block, looped on the host; the temporaries are the block's rows
        and its ``[Bg, block, K]`` cosines, per device.
        """
        first = lax.axis_index(self.head_axes) * self.cl
        rows = lax.dynamic_slice_in_dim(table, lo, self.block).astype(jnp.float32)
        inv = lax.rsqrt(jnp.maximum(jnp.sum(rows * rows, axis=-1), _NORM_EPS**2))  # [blk, K]
        cos = jnp.max(jnp.einsum("bd,nkd->bnk", x, rows) * inv[None], axis=-1)  # [Bg, blk]
        cls = first + lo + jnp.arange(self.block)
        ok = (cls[None, :] < self.num_classes) & (cls[None, :] != y[:, None])
        cos = jnp.where(ok, cos, -2.0)
        j = jnp.argmax(cos, axis=-1)
        m = jnp.take_along_axis(cos, j[:, None], axis=-1)[:, 0]
        better = m > best
        return jnp.where(better, m, best), jnp.where(better, cls[j], best_cls)

    def _other_init(self, x_local, y_local):
        (x, y), _, _ = self._group(x_local, y_local)
        return (_unit(x.astype(jnp.float32)), y, jnp.full(y.shape, -2.0, jnp.float32),
                jnp.full(y.shape, -1, jnp.int32))

    def _other_reduce(self, best, best_cls):
        """The best over the head shards, and this device's own rows of it."""
        b = best.shape[0] // self.n_shards
        start = lax.axis_index(self.head_axes) * b
        top = lax.pmax(best, self.head_axes)
        big = jnp.iinfo(jnp.int32).max
        cls = lax.pmin(jnp.where(best == top, best_cls, big), self.head_axes)
        cls = jnp.where(cls == big, -1, cls)
        return (lax.dynamic_slice_in_dim(top, start, b),
                lax.dynamic_slice_in_dim(cls, start, b))

    def nearest_other(self, table, x, y):
        """Max cosine (over sub-centres) of each sample to any valid class other than
        its label, and that class (ties: the lowest id), over the whole table.

        Scanned in blocks of ``block_rows`` rows per shard: the temporaries are
        ``[group batch, block, K]`` per device, never ``[B, Cl]``.
        """
        xg, yg, best, cls = self._nearest_init(x, y)
        for i in range(-(-self.cl // self.block)):
            lo = min(i * self.block, self.cl - self.block)  # the last block overlaps: same max
            best, cls = self._nearest_block(table, xg, yg, best, cls, np.int32(lo))
        return self._nearest_reduce(best, cls)


# ------------------------------------------------------------------ reading
def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class BatchReader:
    """Global batches of ``source`` records (images, labels) placed on the mesh.

    Each process reads only the rows its own devices hold; the last batch is
    padded with label -1. An unreadable record (``None`` from a
    ``skip_corrupt`` source) becomes a zero image with label -1. The next
    batch is read in the background while the current one is on the device.
    """

    def __init__(self, source: Any, mesh: Mesh, batch_size: int, image_shape=(112, 112, 3),
                 threads: int = 8):
        mesh_lib.check_batch_size(batch_size, mesh)
        self.source, self.mesh, self.batch = source, mesh, int(batch_size)
        self.image_shape = tuple(image_shape)
        self.n = len(source)
        self.num_batches = -(-self.n // self.batch)
        self.sharding = mesh_lib.batch_sharding(mesh)
        shape = (self.batch, *self.image_shape)
        slices = [s[0] for s in self.sharding.addressable_devices_indices_map(shape).values()]
        # the rows of each batch that this process's devices hold
        self._rows = sorted({r for s in slices for r in range(*s.indices(self.batch))})
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)

    def _read(self, b: int):
        lo = b * self.batch
        images = np.zeros((self.batch, *self.image_shape), np.uint8)
        labels = np.full((self.batch,), -1, np.int32)
        want = [r for r in self._rows if lo + r < self.n]

        def one(r):
            ex = self.source[lo + r]
            if ex is None:
                return r, None
            img = np.asarray(ex["image"])
            if img.shape != self.image_shape or img.dtype != np.uint8:
                name = getattr(self.source, "record_name", lambda i: f"record {i}")(lo + r)
                raise ValueError(f"{name}: image of shape {img.shape} {img.dtype}, "
                                 f"expected uint8 {self.image_shape} (aligned crops)")
            return r, (img, int(ex["label"]))

        for r, got in self._pool.map(one, want):
            if got is not None:
                images[r], labels[r] = got
        return images, labels

    def _place(self, host: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(host.shape, self.sharding, lambda i: host[i])

    def __iter__(self):
        ahead = self._pool.submit(self._read, 0) if self.num_batches else None
        for b in range(self.num_batches):
            images, labels = ahead.result()
            if b + 1 < self.num_batches:
                ahead = self._pool.submit(self._read, b + 1)
            yield b * self.batch, self._place(images), self._place(labels)

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------ restore
def load_table(workdir: str, step: int | None = None, mesh: Mesh | None = None):
    """(config, mesh, table, step, head_axes): a workdir's class table alone.

    ``table`` is restored from checkpoint ``step`` (default the latest) into
    its sharding on ``mesh`` (default the run's, or the most devices that
    split its rows); its optimizer state stays on disk.
    """
    import orbax.checkpoint as ocp

    from pfc_jax import checkpoint as ckpt_lib
    from pfc_jax import export, train

    config = export.load_workdir_config(workdir)
    ckpts = ckpt_lib.Checkpoints(workdir, with_data=False)
    step = ckpts.latest_step() if step is None else step
    if step is None:
        ckpts.close()
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    meta = ckpts.meta(step)
    ckpts.close()
    if mesh is None:
        mesh = train.make_mesh(config)
        if int(meta["padded_classes"]) % mesh.size:
            # Trained on another device count: the most devices that split the rows.
            n = max(d for d in range(1, mesh.size + 1) if int(meta["padded_classes"]) % d == 0)
            mesh = mesh_lib.make_mesh({"data": n}, jax.devices()[:n])
    head_axes = mesh_lib.resolve_head_axes(mesh, config.get("head_axes"))
    shape = (int(meta["padded_classes"]), int(config.head.num_subcenters),
             int(config.model.embedding_dim))
    abstract = jax.ShapeDtypeStruct(shape, jnp.float32,
                                    sharding=mesh_lib.table_sharding(mesh, head_axes))
    item = {"head": {"centers": abstract}}   # its optimizer state stays on disk
    path = os.path.join(workdir, "checkpoints", str(step), "train")
    with ocp.PyTreeCheckpointer() as cp:
        restored = cp.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))
    table = restored["head"]["centers"]
    if not isinstance(table, jax.Array):
        raise ValueError(f"{path}: no class table (head.centers) in this checkpoint")
    return config, mesh, table, step, head_axes


def load_run(workdir: str, step: int | None = None, mesh: Mesh | None = None):
    """(config, source, mesh, embed, table, step, head_axes) of a training workdir.

    ``embed(images)`` maps a batch-sharded uint8 batch to embeddings on the
    mesh; ``table`` is ``load_table``'s.
    """
    from pfc_jax import export, train

    config, mesh, table, step, head_axes = load_table(workdir, step, mesh)
    model, variables, _ = export.restore_backbone(workdir, step)
    embedder = embed_lib.Embedder(model, mesh)
    embed = functools.partial(embedder.apply, embedder.place(variables))

    source = train.build_source(config)
    return config, source, mesh, embed, table, step, head_axes


# ------------------------------------------------------------------ cleaning
def scan_own_centres(reader: BatchReader, scan: TableScan, embed, table,
                     progress: bool | None = None) -> dict:
    """Pass over the data: per record its K cosines, its nearest own sub-centre, the
    dominant sub-centre of its class and the cosine to it; plus the class counts."""
    n, k = reader.n, scan.k
    cos = np.full((n, k), -2.0, np.float32)
    labels = np.full((n,), -1, np.int64)
    counts = scan.zero_counts()
    bar = logs.Progress("embedding", n, progress)
    for lo, images, y in reader:
        c = scan.own_cosines(table, embed(images), y)
        kstar = jnp.argmax(c, axis=-1).astype(jnp.int32)
        counts = scan.add_counts(counts, y, kstar)
        hi = min(lo + reader.batch, n)
        cos[lo:hi] = _to_host(c)[: hi - lo]
        labels[lo:hi] = _to_host(y)[: hi - lo]
        bar.update(hi)
    dominant_of_class = scan.dominant(counts)
    dominant = np.zeros((n,), np.int32)
    b = reader.batch
    for lo in range(0, n, b):
        y = np.full((b,), -1, np.int32)
        y[: min(b, n - lo)] = labels[lo:lo + b]
        dominant[lo:lo + b] = _to_host(scan.lookup(dominant_of_class, reader._place(y)))[
            : min(b, n - lo)]
    readable = labels >= 0
    cos_dom = np.where(readable, np.take_along_axis(cos, dominant[:, None].astype(np.int64),
                                                   axis=1)[:, 0], -2.0)
    angle = np.degrees(np.arccos(np.clip(cos_dom, -1.0, 1.0)))
    return dict(cos=cos, labels=labels, readable=readable,
                nearest=np.argmax(cos, axis=1).astype(np.int32), dominant=dominant,
                angle=np.where(readable, angle, np.nan).astype(np.float32),
                counts_total=int(_to_host(jnp.sum(counts))))


def score_drops(drop: np.ndarray, flipped: np.ndarray, readable: np.ndarray) -> dict:
    """Precision and recall of a dropped set against the flipped records."""
    drop, flipped = drop & readable, flipped & readable
    hit = int(np.sum(drop & flipped))
    return dict(dropped=int(drop.sum()), flipped=int(flipped.sum()), dropped_and_flipped=hit,
                precision=hit / max(int(drop.sum()), 1), recall=hit / max(int(flipped.sum()), 1))


def class_median_mad(values: np.ndarray, labels: np.ndarray, ok: np.ndarray):
    """Per-record median and MAD of ``values`` over the record's class (records ``ok``),
    vectorised: one sort by (label, value), no loop over classes."""
    idx = np.flatnonzero(ok)

    def grouped_median(v):
        order = idx[np.lexsort((v[idx], labels[idx]))]
        lab = labels[order]
        first = np.searchsorted(lab, lab, side="left")
        size = np.searchsorted(lab, lab, side="right") - first
        vals = v[order]
        lo, hi = first + (size - 1) // 2, first + size // 2
        med = np.full(v.shape, np.nan)
        med[order] = 0.5 * (vals[lo] + vals[hi])
        return med

    med = grouped_median(values)
    mad = grouped_median(np.where(ok, np.abs(values - med), np.nan))
    return med, mad


def summarize(result: dict, num_classes: int, angle: float, truth=None,
              mad: float | None = None) -> dict:
    """The keep mask and report. ``mad=None``: keep angles below ``angle`` (the
    paper's absolute rule). ``mad=k``: keep angles at most ``median + k * 1.4826 *
    MAD`` of the image's class (relative to how tight the run left each class),
    and below ``angle`` as well."""
    readable, a = result["readable"], result["angle"]
    labels = result["labels"]
    keep = readable & (a < angle)
    if mad is not None:
        med, dev = class_median_mad(a, labels, readable)
        keep &= a <= med + float(mad) * 1.4826 * dev
    classes_before = np.unique(labels[readable])
    classes_after = np.unique(labels[keep])
    report = dict(
        angle=angle, mad=mad, records=int(len(labels)), unreadable=int((~readable).sum()),
        images_kept=int(keep.sum()), images_dropped=int((readable & ~keep).sum()),
        classes=int(num_classes), classes_with_images=int(len(classes_before)),
        classes_kept=int(len(classes_after)),
        classes_dropped=int(len(classes_before) - len(classes_after)),
        angle_quantiles={f"{q:g}": float(np.nanquantile(a[readable], q))
                         for q in (0.01, 0.1, 0.5, 0.9, 0.99)} if readable.any() else {},
        sweep=[dict(angle=t, kept_fraction=float(np.mean(a[readable] < t)))
               for t in SWEEP_ANGLES] if readable.any() else [])
    if truth is not None:
        flipped = np.asarray(truth.flipped, bool)
        if flipped.shape != labels.shape:
            raise ValueError(f"noise ground truth has {flipped.shape[0]} records, the source "
                             f"{labels.shape[0]}")
        report["noise"] = score_drops(readable & ~keep, flipped, readable)
        if "nearest" in result:  # the sub-centre claim: noise attaches elsewhere
            on_dom = result["nearest"] == result["dominant"]
            report["noise"]["on_dominant_clean"] = float(np.mean(on_dom[readable & ~flipped]))
            report["noise"]["on_dominant_flipped"] = float(np.mean(on_dom[readable & flipped]))
        for row in report["sweep"]:
            row.update({k: v for k, v in score_drops(readable & ~(a < row["angle"]), flipped,
                                                     readable).items()
                        if k in ("precision", "recall")})
    return report, keep


def plot_angles(path: str, angle: np.ndarray, threshold: float, flipped=None) -> None:
    from pfc_jax import plots
    plt = plots.pyplot()
    ok = np.isfinite(angle)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    bins = np.linspace(0, 180, 91)
    if flipped is not None:
        ax.hist(angle[ok & ~flipped], bins, alpha=0.7, label="clean labels")
        ax.hist(angle[ok & flipped], bins, alpha=0.7, label="flipped labels")
        ax.legend()
    else:
        ax.hist(angle[ok], bins)
    ax.axvline(threshold, color="k", ls="--", lw=1)
    ax.set_xlabel("angle to the class's dominant sub-centre (degrees)")
    ax.set_ylabel("images")
    ax.set_title(f"keep < {threshold:g}°: {int(np.sum(angle[ok] < threshold))} of {int(ok.sum())}")
    fig.tight_layout()
    plots.save(fig, path)


def write_recordio(folder: str, source: Any, keep_summary: dict) -> int:
    from pfc_jax.data.recordio_writer import RecordIOWriter
    indices, labels = keep_summary["indices"], keep_summary["labels"]
    order = np.argsort(labels, kind="stable")  # identity records want each label's run
    raw = True  # encoded bytes verbatim where the source stores them

    def image_of(i):
        nonlocal raw
        if raw:
            try:
                return source.read_raw(i)[0]
            except AttributeError:  # a view over a source without stored bytes
                raw = False
        return source[i]["image"]

    with RecordIOWriter(folder) as w:
        for j in order:
            w.add_image(image_of(int(indices[j])), int(labels[j]))
        w.close(num_classes=int(keep_summary["num_classes"]))
    return len(order)


def clean(workdir: str, out: str, *, angle: float = DEFAULT_ANGLE, mad: float | None = None,
          step: int | None = None,
          batch_size: int = 256, recordio: bool = False, mesh: Mesh | None = None,
          progress: bool | None = None) -> dict:
    from pfc_jax import train
    from pfc_jax.data import keep as keep_lib
    from pfc_jax.data import noise as noise_lib

    if not 0.0 < angle <= 180.0:
        raise ValueError(f"--angle must be in (0, 180] degrees, got {angle}")
    config, source, mesh, embed, table, step, head_axes = load_run(workdir, step, mesh)
    scan = TableScan(mesh, table.shape, config.head.num_classes, head_axes)
    batch_size = -(-int(batch_size) // mesh.size) * mesh.size
    reader = BatchReader(source, mesh, batch_size)
    try:
        result = scan_own_centres(reader, scan, embed, table, progress)
    finally:
        reader.close()
    truth_path = os.path.join(workdir, train.NOISE_TRUTH)
    truth = noise_lib.load_truth(truth_path) if os.path.exists(truth_path) else None
    report, keep = summarize(result, config.head.num_classes, angle, truth, mad)
    report.update(workdir=os.path.abspath(workdir), step=int(step),
                  num_subcenters=int(table.shape[1]))
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        summary = keep_lib.write_keep_list(os.path.join(out, "keep.npz"), source, keep)
        np.savez(os.path.join(out, "scan.npz"), **{k: result[k] for k in (
            "cos", "labels", "nearest", "dominant", "angle")})
        plot_angles(os.path.join(out, "angles.png"), result["angle"], angle,
                    None if truth is None else np.asarray(truth.flipped, bool))
        if recordio:
            report["recordio_images"] = write_recordio(out, source, summary)
        report["keep_list"] = os.path.abspath(os.path.join(out, "keep.npz"))
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


def format_report(r: dict) -> str:
    rule = f"{r['angle']:g} degrees" + (
        f" and class median + {r['mad']:g} MAD" if r.get("mad") is not None else "")
    lines = [f"cleaned {r['workdir']} step {r['step']} (K = {r['num_subcenters']}) at {rule}",
             f"  images  kept {r['images_kept']:,}  dropped {r['images_dropped']:,}  "
             f"unreadable {r['unreadable']:,}",
             f"  classes kept {r['classes_kept']:,}  dropped {r['classes_dropped']:,} "
             f"(of {r['classes_with_images']:,} with images)"]
    if "noise" in r:
        n = r["noise"]
        lines.append(f"  against the injected flips: precision {n['precision']:.3f}  "
                     f"recall {n['recall']:.3f} ({n['dropped_and_flipped']:,} of "
                     f"{n['flipped']:,} flipped records dropped)")
        if "on_dominant_clean" in n:
            lines.append(f"  nearest to the dominant sub-centre: {n['on_dominant_clean']:.3f} of "
                         f"clean, {n['on_dominant_flipped']:.3f} of flipped records")
    lines.append("  train on it: --config.data.keep_list=" + r.get("keep_list", "OUT/keep.npz"))
    return "\n".join(lines)


def run_arguments(description: str) -> argparse.ArgumentParser:
    """The options of a command that reads a run: --workdir, --out, --step, --batch-size."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--workdir", required=True, help="a training workdir")
    ap.add_argument("--out", required=True, help="where the outputs and the report go")
    ap.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    ap.add_argument("--batch-size", type=int, default=256, help="images per embedding call")
    return ap


def main(argv=None) -> dict:
    ap = run_arguments(__doc__.splitlines()[0])
    ap.add_argument("--angle", type=float, default=DEFAULT_ANGLE,
                    help="keep images below this angle to the dominant sub-centre (degrees)")
    ap.add_argument("--mad", type=float, default=None,
                    help="also drop images above median + MAD * 1.4826 * MAD of their class's "
                         "angles (a rule relative to the run; see docs/noise.md)")
    ap.add_argument("--recordio", action="store_true",
                    help="also write the cleaned set as a RecordIO folder in --out")
    args = ap.parse_args(argv)
    report = clean(args.workdir, args.out, angle=args.angle, mad=args.mad, step=args.step,
                   batch_size=args.batch_size, recordio=args.recordio)
    print(format_report(report))
    return report


run = platform.entry_point(main, __name__)  # pfc-clean; also python -m
