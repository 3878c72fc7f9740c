"""The Partial FC head: sharded class centres, sampling, margin softmax, sparse update.

Layout (METHODS.md §1). The table ``centers`` is ``[C_pad, K, D]``; head
shard ``p`` (an index over the head axes of the mesh) owns classes
``[p * Cl, (p + 1) * Cl)`` with ``Cl = ceil(C / P)``. Rows ``>= C`` are
padding: zero, never positive, never sampled, never in a softmax, never
updated.

One step, all under one ``jax.jit``:

1. ``sample``: every shard sees the global labels (jit all-gathers these
   few integers), marks its positives and draws ``Ns - #positives`` negatives
   uniformly without replacement from its other valid classes. The result is
   ``idx [P * Ns]``: per shard, local row numbers in increasing order, with
   the sentinel ``Cl`` in unused slots (only when a shard has fewer than
   ``Ns`` usable classes, or when ``sample_rate == 0``).
2. gather the ``Ns`` rows of each shard (``sparse.RowOps``).
3. ``loss``: inside ``shard_map``, all-gather the normalised embeddings over
   the head axes, cosine logits against the sampled rows (max over the K
   sub-centres), margin on the target column, inter-class filtering, and a
   softmax cross-entropy whose max, exp-sum and target logit are reduced
   across shards (``pmax`` / ``psum``) in float32.
4. gradients of (3) with respect to the gathered rows and the embeddings
   (autodiff turns the all-gather into a reduce-scatter).
5. the optax update of the touched rows only (``lazy``) or of the whole
   table (``dense``), written back in place into the donated table.

With lazy updates steps 2-5 fuse (``fused_step``): the shard's softmax runs
in blocks of sampled columns (``softmax_ce.ShardCE.fused_update``: online
log-sum-exp; the backward reads the forward's cosines while they fit the
budget and recomputes them past it) and each block's rows are read from the
table, differentiated and updated in place inside the backward loop, so the
step needs the table, its optimizer state and a few blocks more, and no
``[B_global, Ns]`` array exists. Unfused (dense updates, gradient
accumulation's ``grads``) the logits stay whole up to ``logits_budget_mib``
and go blockwise past it (``softmax_ce.ShardCE.blockwise``).

Sampling. Negatives are the ``k`` smallest of i.i.d. uniform 32-bit keys
among a shard's eligible classes. The ``k``-th smallest key is found by a
32-step bisection over the key range (each step one masked count over the
shard), so the cost is O(32 * Cl) element-wise work and no sort; keys equal
to the threshold are broken by a random rotation of the class order. This is
an exact uniform draw without replacement (up to those rare ties). A
``top_k`` sampler is kept for comparison (``sampler="topk"``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pfc_jax import mesh as mesh_lib
from pfc_jax import softmax_ce, sparse
from pfc_jax.margins import Margin

FILTER_MODES = ("mask", "zero")
SAMPLERS = ("select", "topk")
MATMUL_DTYPES = ("float32", "bfloat16")
SOFTMAX_MODES = ("auto", "full", "blockwise")
MAX_CLASSES = 2**31 - 1  # labels and row ids are int32
_NORM_EPS = softmax_ce.NORM_EPS
_CPU_BLOCK_BYTES = 2 * 2**20  # the largest automatic block of logits on a CPU mesh
_INIT_BLOCK_ROWS = 4096
# Per-sample statistics returned by the step, each [B] and sharded like the batch.
SAMPLE_STATS = ("loss", "target_cos", "max_neg_cos", "target_is_max", "label_ok")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Everything that defines the head; validated before anything compiles."""

    num_classes: int
    embedding_dim: int = 512
    num_subcenters: int = 1
    sample_rate: float = 1.0
    scale: float = 64.0
    margins: tuple[float, float, float] = (1.0, 0.5, 0.0)
    grad_mode: str = "exact"
    filter_threshold: float = 0.0  # 0 disables inter-class filtering
    filter_mode: str = "mask"
    matmul_dtype: str = "float32"
    row_update: str = "lazy"      # lazy: sampled rows only | dense: the whole table
    sampler: str = "select"
    init_std: float = 0.01
    softmax: str = "auto"          # full | blockwise | auto (fused if lazy, else by the budget)
    block_size: int = 0            # columns per block; 0 = from logits_budget_mib
    logits_budget_mib: float = 32.0  # per-shard logits kept whole up to this; blocks: 1/4
    cosine_stash_mib: float = 256.0  # fused: forward cosines kept for the backward up to this
    block_budget_mib: float = 0.0  # one [Bg, block] buffer; 0 = budget / 4, <= 2 MiB on CPU
    fused_update: bool = True      # lazy: update rows inside the blockwise backward

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"head config: {msg}")

        need(isinstance(self.num_classes, (int, np.integer)) and self.num_classes >= 1,
             f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        need(self.num_classes <= MAX_CLASSES,
             f"num_classes {self.num_classes:,} exceeds {MAX_CLASSES:,}: labels and row "
             "ids are int32")
        need(isinstance(self.embedding_dim, (int, np.integer)) and self.embedding_dim >= 1,
             f"embedding_dim must be an integer >= 1, got {self.embedding_dim!r}")
        need(isinstance(self.num_subcenters, (int, np.integer)) and self.num_subcenters >= 1,
             f"num_subcenters (K) must be an integer >= 1, got {self.num_subcenters!r}")
        need(0.0 <= self.sample_rate <= 1.0,
             f"sample_rate must be in [0, 1], got {self.sample_rate!r}")
        need(math.isfinite(self.scale) and self.scale > 0,
             f"scale s must be > 0, got {self.scale!r}")
        need(len(self.margins) == 3, f"margins must be (m1, m2, m3), got {self.margins!r}")
        need(0.0 <= self.filter_threshold < 1.0,
             f"filter_threshold must be in [0, 1) (0 = off), got {self.filter_threshold!r}")
        need(self.filter_mode in FILTER_MODES,
             f"filter_mode {self.filter_mode!r} is not one of {FILTER_MODES}")
        need(self.matmul_dtype in MATMUL_DTYPES,
             f"matmul_dtype {self.matmul_dtype!r} is not one of {MATMUL_DTYPES}")
        need(self.row_update in sparse.UPDATE_MODES,
             f"row_update {self.row_update!r} is not one of {sparse.UPDATE_MODES}")
        need(self.sampler in SAMPLERS, f"sampler {self.sampler!r} is not one of {SAMPLERS}")
        need(self.init_std > 0, f"init_std must be > 0, got {self.init_std!r}")
        need(self.softmax in SOFTMAX_MODES,
             f"softmax {self.softmax!r} is not one of {SOFTMAX_MODES}")
        need(isinstance(self.block_size, (int, np.integer)) and self.block_size >= 0,
             f"block_size must be an integer >= 0 (0 = automatic), got {self.block_size!r}")
        need(self.logits_budget_mib > 0,
             f"logits_budget_mib must be > 0, got {self.logits_budget_mib!r}")
        need(self.cosine_stash_mib >= 0,
             f"cosine_stash_mib must be >= 0 (0 = never), got {self.cosine_stash_mib!r}")
        need(self.block_budget_mib >= 0,
             f"block_budget_mib must be >= 0 (0 = automatic), got {self.block_budget_mib!r}")
        self.margin  # validates m1, m2, m3 and grad_mode

    @property
    def margin(self) -> Margin:
        m1, m2, m3 = self.margins
        return Margin(float(m1), float(m2), float(m3), self.grad_mode)


class HeadState(NamedTuple):
    centers: jax.Array  # [C_pad, K, D], split over the head axes
    opt_state: Any      # optax state: table-shaped leaves split like centers, scalars replicated


def num_sampled(sample_rate: float, local_classes: int, global_batch: int) -> int:
    """Ns = clamp(ceil(r * Cl), min(B, Cl), Cl); r = 1 is every class."""
    if sample_rate >= 1.0:
        return local_classes
    want = math.ceil(round(sample_rate * local_classes, 6))
    return int(min(max(want, min(global_batch, local_classes)), local_classes))


def _normalize(x: jax.Array) -> jax.Array:
    return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _NORM_EPS**2))


def select_uniform(eligible: jax.Array, k: jax.Array, key: jax.Array) -> jax.Array:
    """Mask of ``min(k, #eligible)`` eligible entries drawn uniformly without replacement.

    The chosen entries are those with the smallest i.i.d. uint32 keys; the
    threshold key is found by bisection, ties at it broken in a randomly
    rotated index order.
    """
    n = eligible.shape[0]
    key_bits, key_rot = jax.random.split(key)
    bits = jax.random.bits(key_bits, (n,), jnp.uint32)
    k = jnp.clip(k, 0, jnp.sum(eligible, dtype=jnp.int32))

    def bisect(_, lohi):  # smallest t with #(eligible & bits <= t) >= k
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(eligible & (bits <= mid), dtype=jnp.int32) >= k
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    zero = (k * 0).astype(jnp.uint32)  # shares k's device-variance inside shard_map
    t, _ = lax.fori_loop(0, 32, bisect, (zero, zero + jnp.uint32(0xFFFFFFFF)))
    below = eligible & (bits < t)
    need = k - jnp.sum(below, dtype=jnp.int32)
    tie = (eligible & (bits == t)).astype(jnp.int32)
    shift = jax.random.randint(key_rot, (), 0, n)
    rolled = jnp.roll(tie, -shift)
    tie_rank = jnp.roll(jnp.cumsum(rolled) - rolled, shift)
    return below | ((tie > 0) & (tie_rank < need))


def select_topk(eligible: jax.Array, k: jax.Array, key: jax.Array, budget: int) -> jax.Array:
    """Same distribution as ``select_uniform`` via ``lax.top_k`` (for comparison)."""
    n = eligible.shape[0]
    keys = jnp.where(eligible, jax.random.uniform(key, (n,)), -1.0)
    top_vals, top_idx = lax.top_k(keys, budget)
    take = (jnp.arange(budget) < k) & (top_vals >= 0)
    return jnp.zeros((n,), bool).at[top_idx].set(take)


class PartialFC:
    """The sharded Partial FC head for one mesh, config and head optimizer.

    ``padded_classes`` (default: the least multiple of the shard count >= C)
    lets a table saved on one mesh be used on another whose shard count
    divides it.

    ``step(state, embeddings, labels, rng) -> (state, embedding_grads, stats)``
    is the jitted, donating head step; ``apply`` is the same function
    un-jitted, for use inside a larger jitted train step. A trainer that
    interleaves the head with its backbone (gradient accumulation) uses the
    pieces ``apply`` is made of, all un-jitted:

    - ``init_state(rng)``: the state, inside a larger jitted init;
    - ``sample_and_gather(centers, labels, rng) -> (idx, rows)``: once per step;
    - ``grads(rows, idx, embeddings, labels) -> (loss, stats, row_grads,
      embedding_grads)``: one micro-batch;
    - ``update(state, idx, row_grads, rows) -> state``: once per step;
    - or, when ``fuses_update(global_batch)``, ``sample`` and ``fused_step``,
      which does the last three in one pass.
    """

    def __init__(self, config: HeadConfig, mesh: Mesh,
                 optimizer: optax.GradientTransformation,
                 head_axes: Sequence[str] | None = None,
                 padded_classes: int | None = None):
        config.validate()
        self.config = config
        self.mesh = mesh
        self.tx = optimizer
        self.head_axes = mesh_lib.resolve_head_axes(mesh, head_axes)
        self.batch_axes = mesh_lib.batch_axes(mesh)
        self.num_shards = mesh_lib.axes_size(mesh, self.head_axes)
        if padded_classes is None:  # the least padding for this mesh
            padded_classes = -(-config.num_classes // self.num_shards) * self.num_shards
        if padded_classes < config.num_classes or padded_classes % self.num_shards:
            raise ValueError(
                f"padded_classes={padded_classes} must be >= num_classes={config.num_classes} "
                f"and a multiple of the {self.num_shards} head shards")
        self.local_classes = padded_classes // self.num_shards
        self.padded_classes = padded_classes
        self.table_shape = (self.padded_classes, config.num_subcenters, config.embedding_dim)
        self.ops = sparse.RowOps(mesh, self.head_axes)
        self.margin = config.margin
        self._head_spec = P(self.head_axes)
        self._batch_spec = P(self.batch_axes)

        table_sh = mesh_lib.table_sharding(mesh, self.head_axes)
        repl = mesh_lib.replicated(mesh)
        abstract_table = jax.ShapeDtypeStruct(self.table_shape, jnp.float32)
        state_shapes = jax.eval_shape(optimizer.init, abstract_table)
        is_row = sparse.row_leaf_mask(state_shapes, self.table_shape)
        self.state_shardings = HeadState(
            table_sh, jax.tree.map(lambda r: table_sh if r else repl, is_row))
        batch_sh = mesh_lib.batch_sharding(mesh)
        stats_sh = {name: batch_sh for name in SAMPLE_STATS}
        stats_sh.update(mean_loss=repl, num_bad_labels=repl)
        self._init = jax.jit(self.init_state, out_shardings=self.state_shardings)
        self._step = jax.jit(
            self.apply,
            in_shardings=(self.state_shardings, batch_sh, batch_sh, repl),
            out_shardings=(self.state_shardings, batch_sh, stats_sh),
            donate_argnums=0)

    # ------------------------------------------------------------------ init
    def init(self, rng: jax.Array) -> HeadState:
        """N(0, init_std) centres, padding rows zero, built shard by shard.

        Row c's values depend only on (rng, c), not on the mesh or padding,
        so the same seed gives the same table on any number of devices.
        """
        return self._init(rng)

    def init_state(self, rng: jax.Array) -> HeadState:
        """``init`` un-jitted, for use inside a larger jitted init."""
        c, std, cl = self.config.num_classes, self.config.init_std, self.local_classes
        row_shape = self.table_shape[1:]

        def shard_rows(rng):
            # Row by row from fold_in(rng, row id), a block of rows at a time
            # written in place into the shard (the last block re-writes some
            # rows with their same values), so the only temporary is one block.
            first = lax.axis_index(self.head_axes) * cl
            blk = min(cl, _INIT_BLOCK_ROWS)

            def one_row(row):
                w = std * jax.random.normal(jax.random.fold_in(rng, row), row_shape)
                return jnp.where(row < c, w, 0.0)

            def block(i, w):
                start = jnp.minimum(i * blk, cl - blk)
                rows = jax.vmap(one_row)(first + start + jnp.arange(blk))
                return lax.dynamic_update_slice_in_dim(w, rows, start, 0)

            w0 = lax.pcast(jnp.zeros((cl, *row_shape), jnp.float32), self.head_axes,
                           to="varying")
            return lax.fori_loop(0, -(-cl // blk), block, w0)

        w = jax.shard_map(shard_rows, mesh=self.mesh, in_specs=P(),
                          out_specs=self._head_spec)(rng)
        return HeadState(w, self.tx.init(w))

    def num_sampled(self, global_batch: int) -> int:
        return num_sampled(self.config.sample_rate, self.local_classes, global_batch)

    def check_batch(self, embeddings, labels) -> None:
        """Shape checks; run at trace time, so a bad batch fails before compiling."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.config.embedding_dim:
            raise ValueError(f"embeddings must be [B, {self.config.embedding_dim}], "
                             f"got shape {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must be [B] = [{embeddings.shape[0]}], "
                             f"got shape {tuple(labels.shape)}")
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        mesh_lib.check_batch_size(embeddings.shape[0], self.mesh)

    # -------------------------------------------------------------- sampling
    def sample(self, labels: jax.Array, rng: jax.Array) -> jax.Array:
        """Sampled local rows per shard: ``idx [P * Ns]``, sentinel ``Cl`` if unused."""
        cfg, cl = self.config, self.local_classes
        ns = self.num_sampled(labels.shape[0])
        r = cfg.sample_rate

        def body(labels, rng):  # labels: the whole global batch on every device
            shard = lax.axis_index(self.head_axes)
            start = shard * cl
            local = labels - start
            is_pos = (labels >= 0) & (labels < cfg.num_classes) & (local >= 0) & (local < cl)
            pos = jnp.zeros((cl,), bool).at[jnp.where(is_pos, local, cl)].set(
                True, mode="drop")
            classes = jnp.arange(cl)
            valid = classes < jnp.clip(cfg.num_classes - start, 0, cl)
            if r == 0.0:
                chosen = pos
            elif ns == cl:
                chosen = valid
            else:
                key = jax.random.fold_in(rng, shard)
                eligible = valid & ~pos
                k = ns - jnp.sum(pos, dtype=jnp.int32)
                if cfg.sampler == "topk":
                    chosen = pos | select_topk(eligible, k, key, ns)
                else:
                    chosen = pos | select_uniform(eligible, k, key)
            slot = jnp.cumsum(chosen, dtype=jnp.int32) - 1
            return jnp.full((ns,), cl, jnp.int32).at[jnp.where(chosen, slot, ns)].set(
                classes.astype(jnp.int32), mode="drop")

        return jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P()),
                             out_specs=self._head_spec)(labels, rng)

    def sampled_classes(self, idx) -> np.ndarray:
        """Host helper: the global class ids in ``idx`` (sentinels dropped), sorted."""
        idx = np.asarray(idx).reshape(self.num_shards, -1)
        offsets = np.arange(self.num_shards)[:, None] * self.local_classes
        return np.sort((idx + offsets)[idx < self.local_classes])

    # ------------------------------------------------------------------ loss
    def loss(self, rows: jax.Array, idx: jax.Array, embeddings: jax.Array,
             labels: jax.Array):
        """Mean margin softmax CE over the sampled classes, and per-sample stats.

        Differentiable in ``rows`` ([P * Ns, K, D], split over the head axes)
        and ``embeddings`` ([B, D], split over the batch). The softmax is
        computed whole or blockwise as ``softmax_plan(B, fused=False)`` says.
        """
        ns = idx.shape[0] // self.num_shards
        global_batch = labels.shape[0]
        shard_ce = self._shard_softmax_ce(ns, global_batch)

        def body(rows, idx, x_local, y_local):
            x, tslot, label_ok = self._group_targets(idx, x_local, y_local)
            loss_own, stats = shard_ce(rows, x, tslot, idx < self.local_classes, label_ok)
            loss = lax.psum(jnp.sum(loss_own), self.batch_axes) / global_batch
            return loss, dict(stats, loss=loss_own)

        x = _normalize(embeddings.astype(jnp.float32))
        stats_spec = {name: self._batch_spec for name in SAMPLE_STATS}
        return jax.shard_map(
            body, mesh=self.mesh,
            in_specs=(self._head_spec, self._head_spec, self._batch_spec, self._batch_spec),
            out_specs=(P(), stats_spec))(rows, idx, x, labels)

    def _group_targets(self, idx, x_local, y_local):
        """Inside shard_map: the group's embeddings, each one's target slot here, label_ok."""
        cfg, cl = self.config, self.local_classes
        ns = idx.shape[0]
        x = lax.all_gather(x_local, self.head_axes, tiled=True)  # this group's batch
        y = lax.all_gather(y_local, self.head_axes, tiled=True)
        local = y - lax.axis_index(self.head_axes) * cl
        label_ok = (y >= 0) & (y < cfg.num_classes)
        here = label_ok & (local >= 0) & (local < cl)
        slot_of = jnp.full((cl,), -1, jnp.int32).at[idx].set(
            jnp.arange(ns, dtype=jnp.int32), mode="drop")
        tslot = jnp.where(here, slot_of[jnp.clip(local, 0, cl - 1)], -1)
        return x, tslot, label_ok

    def softmax_plan(self, global_batch: int, *, fused: bool | None = None
                     ) -> tuple[str, int]:
        """("full" | "blockwise", columns per block) for a global batch size.

        A shard's logits are ``[Bg, Ns * K]`` with ``Bg`` its group's batch
        (the global batch over the replica groups). ``fused`` (default:
        ``fuses_update``) asks for the plan of the fused step, which is
        always blockwise. Otherwise ``auto`` keeps the logits whole while
        they fit in ``logits_budget_mib`` and past it takes blocks. A block's
        ``[Bg, cols * K]`` logits hold ``block_elements`` (a quarter of the
        budget; on CPU at most 2 MiB), so the temporaries stay flat however
        the global batch grows; a block's rows ``[cols * K, D]`` (and, fused,
        their gradient and optimizer rows) are held to the same size. The
        blocks split ``Ns`` evenly (a multiple of 128 columns when there is
        room), so the clamped last block re-covers few columns.
        """
        cfg = self.config
        ns = self.num_sampled(global_batch)
        group_batch = global_batch * self.num_shards // self.mesh.size
        if fused is None:
            fused = self.fuses_update(global_batch)
        kind = "blockwise" if fused else cfg.softmax
        if kind == "auto":
            kind = "full" if self._logits_fit(global_batch) else "blockwise"
        if kind == "full":
            return kind, ns
        if cfg.block_size:
            return kind, max(1, min(cfg.block_size, ns))
        width = max(group_batch, cfg.embedding_dim) * cfg.num_subcenters
        cols = max(1, self.block_elements() // width)
        if cols >= 256:
            cols = cols // 128 * 128
        n_blocks = -(-ns // cols)
        block = -(-ns // n_blocks)
        if cols >= 256:
            block = -(-block // 128) * 128  # still <= cols, a multiple of 128
        return kind, max(1, min(block, ns))

    def stashes_cosines(self, global_batch: int) -> bool:
        """Whether the fused step keeps its forward's ``[Bg, Ns * K]`` cosines.

        It does while they fit ``cosine_stash_mib`` (float32, plus the int8
        sub-centre choice when K > 1); its backward then reads them instead
        of recomputing each block's matmul, one of the four matmuls a
        recomputing step does. A budget of its own, above the blocks' (a
        quarter of ``logits_budget_mib``): measured on one CPU device at
        C = 1M, r = 0.1, B = 512 (205 MB of cosines) the three matmuls took
        655 ms of the step against 925 ms for four (docs/benchmarks.md).
        """
        group_batch = global_batch * self.num_shards // self.mesh.size
        per_column = 4 + (1 if self.config.num_subcenters > 1 else 0)
        stash = group_batch * self.num_sampled(global_batch) * self.config.num_subcenters
        return stash * per_column <= self.config.cosine_stash_mib * 2**20

    def block_elements(self) -> int:
        """Float32 elements of one block's ``[Bg, cols * K]`` logits.

        ``block_budget_mib`` if set; else a quarter of ``logits_budget_mib``,
        and on a CPU mesh at most 2 MiB: there blocks whose buffers fit the
        core's cache ran faster, in less memory (C = 1M, r = 0.1, D = 512:
        blocks of 512-1,024 columns against 3,200-4,096, B = 128 and 512, one
        and 8 devices; docs/benchmarks.md). Accelerators keep the larger
        blocks (fewer, larger matmuls).
        """
        cfg = self.config
        if cfg.block_budget_mib:
            return max(1, int(cfg.block_budget_mib * 2**20) // 4)
        quarter = self._budget_elements() // 4
        if self.mesh.devices.flat[0].platform == "cpu":
            return min(quarter, _CPU_BLOCK_BYTES // 4)
        return quarter

    def _budget_elements(self) -> int:
        return int(self.config.logits_budget_mib * 2**20) // 4  # float32 elements

    def _logits_fit(self, global_batch: int) -> bool:
        """Whether a shard's ``[Bg, Ns * K]`` logits fit ``logits_budget_mib``."""
        group_batch = global_batch * self.num_shards // self.mesh.size
        return (group_batch * self.num_sampled(global_batch) * self.config.num_subcenters
                <= self._budget_elements())

    def _slices_rows(self, ns: int) -> bool:
        """Whether the fused update reads and writes blocks of rows as slices.

        When every class of the shard is sampled slot j is row j (``sample``
        puts the valid rows first, in order, sentinels after); slices rather
        than gathers are in place on TPU only (see ShardCE.fused_update).
        """
        return (ns == self.local_classes and self.config.sample_rate > 0
                and self.mesh.devices.flat[0].platform == "tpu")

    def fuses_update(self, global_batch: int) -> bool:
        """Whether ``apply`` does the row update inside the blockwise backward.

        Lazy updates fuse unless ``fused_update`` is off or ``softmax`` is
        ``full``; ``auto`` fuses whether or not the logits would fit whole.
        Measured side by side on the CPU mesh (docs/benchmarks.md): the fused
        step is faster at B = 128 (it neither gathers the sampled rows nor
        scatters their update as whole copies) and faster at B = 512 with the
        forward's cosines kept (``stashes_cosines``), in less memory.
        The global batch does not enter; the argument keeps the call sites'
        shape.
        """
        del global_batch
        cfg = self.config
        return cfg.fused_update and cfg.row_update == "lazy" and cfg.softmax != "full"

    def _kernel(self, ns: int) -> softmax_ce.ShardCE:
        cfg = self.config
        return softmax_ce.ShardCE(
            ns=ns, num_subcenters=cfg.num_subcenters, scale=float(cfg.scale),
            margin=self.margin, filter_threshold=cfg.filter_threshold,
            zero_mode=cfg.filter_mode == "zero", matmul_dtype=cfg.matmul_dtype,
            head_axes=self.head_axes,
            replica_axes=tuple(a for a in self.batch_axes if a not in self.head_axes),
            num_head_shards=self.num_shards)

    def _shard_softmax_ce(self, ns: int, global_batch: int):
        """The unfused kernel (``loss`` / ``grads``: gathered rows), by the budget."""
        kind, block = self.softmax_plan(global_batch, fused=False)
        kernel = self._kernel(ns)
        return kernel.full() if kind == "full" else kernel.blockwise(block)

    # ------------------------------------------------------------------ step
    def sample_and_gather(self, centers, labels, rng):
        """Samples the step's classes and gathers their rows: ``(idx, rows)``.

        ``rows [P * Ns, K, D]`` is split over the head axes like ``idx``;
        sentinel slots hold zeros.
        """
        idx = self.sample(labels, rng)
        return idx, self.ops.gather(centers, idx)

    def grads(self, rows, idx, embeddings, labels):
        """``loss`` and its gradients for one (micro-)batch.

        Returns ``(loss, stats, row_grads, embedding_grads)``; ``row_grads``
        is shaped and split like ``rows``.
        """
        self.check_batch(embeddings, labels)
        (loss, stats), (row_grads, emb_grads) = jax.value_and_grad(
            self.loss, argnums=(0, 2), has_aux=True)(rows, idx, embeddings, labels)
        return loss, stats, row_grads, emb_grads

    def update(self, state: HeadState, idx, row_grads, rows=None) -> HeadState:
        """Applies the head optimizer to the sampled rows (lazy) or the table (dense)."""
        if self.config.row_update == "dense":
            centers, opt_state = sparse.dense_update(
                self.tx, self.ops, state.centers, state.opt_state, idx, row_grads)
        else:
            centers, opt_state = sparse.lazy_update(
                self.tx, self.ops, state.centers, state.opt_state, idx, row_grads, rows)
        return HeadState(centers, opt_state)

    def fused_step(self, state: HeadState, idx, embeddings, labels):
        """Loss, embedding gradient and the lazy row update in one blockwise pass.

        Equal to ``loss`` + its gradients + ``update`` (lazy), for the mean
        loss over the batch, without gathering the sampled rows, their
        gradients or their optimizer state beyond one block at a time.
        Returns ``(loss, stats, embedding_grads, state, row_grad_norm)``.
        """
        self.check_batch(embeddings, labels)
        ns = idx.shape[0] // self.num_shards
        global_batch = labels.shape[0]
        _, block = self.softmax_plan(global_batch, fused=True)
        leaves, treedef = jax.tree.flatten(state.opt_state)
        is_row = [tuple(leaf.shape) == self.table_shape for leaf in leaves]
        step = self._kernel(ns).fused_update(block, self.tx, self.local_classes, is_row,
                                             treedef, self._slices_rows(ns),
                                             self.stashes_cosines(global_batch))

        def body(table, leaves, idx, x_local, y_local):
            x, tslot, label_ok = self._group_targets(idx, x_local, y_local)
            d_loss = jnp.full(label_ok.shape, 1.0 / global_batch, jnp.float32)
            (loss_own, stats), d_x, table, leaves, gsq = step(
                table, leaves, idx, x, tslot, idx < self.local_classes, label_ok, d_loss)
            loss = lax.psum(jnp.sum(loss_own), self.batch_axes) / global_batch
            # The all-gather's transpose: each device keeps its rows' gradient.
            d_x = lax.psum_scatter(d_x, self.head_axes, scatter_dimension=0, tiled=True)
            gsq = lax.psum(gsq, self.head_axes)  # rows are whole per shard after psum
            return loss, dict(stats, loss=loss_own), d_x, table, leaves, gsq

        x, norm_vjp = jax.vjp(_normalize, embeddings.astype(jnp.float32))
        leaf_specs = [self._head_spec if r else P() for r in is_row]
        stats_spec = {name: self._batch_spec for name in SAMPLE_STATS}
        loss, stats, d_x, centers, leaves, gsq = jax.shard_map(
            body, mesh=self.mesh,
            in_specs=(self._head_spec, leaf_specs, self._head_spec, self._batch_spec,
                      self._batch_spec),
            out_specs=(P(), stats_spec, self._batch_spec, self._head_spec, leaf_specs, P()),
        )(state.centers, leaves, idx, x, labels)
        (emb_grads,) = norm_vjp(d_x)
        new_state = HeadState(centers, jax.tree.unflatten(treedef, leaves))
        return loss, stats, emb_grads.astype(embeddings.dtype), new_state, jnp.sqrt(gsq)

    def apply(self, state: HeadState, embeddings, labels, rng):
        """One head step (un-jitted): returns (state, embedding_grads, stats)."""
        self.check_batch(embeddings, labels)
        if self.fuses_update(labels.shape[0]):
            idx = self.sample(labels, rng)
            loss, stats, emb_grads, state, _ = self.fused_step(state, idx, embeddings, labels)
        else:
            idx, rows = self.sample_and_gather(state.centers, labels, rng)
            loss, stats, row_grads, emb_grads = self.grads(rows, idx, embeddings, labels)
            state = self.update(state, idx, row_grads, rows)
        stats = dict(stats, mean_loss=loss,
                     num_bad_labels=jnp.sum(~stats["label_ok"], dtype=jnp.int32))
        return state, emb_grads, stats

    def step(self, state: HeadState, embeddings, labels, rng):
        """The jitted head step; the head state is donated (updated in place)."""
        self.check_batch(embeddings, labels)
        return self._step(state, embeddings, labels, rng)

    # -------------------------------------------------------------- helpers
    def shard_batch(self, embeddings, labels):
        """Places host arrays (whole global batch, single process) on the mesh."""
        sh = mesh_lib.batch_sharding(self.mesh)
        return jax.device_put(embeddings, sh), jax.device_put(labels, sh)

    @property
    def table_sharding(self) -> NamedSharding:
        return self.state_shardings.centers
