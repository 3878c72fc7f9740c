"""The per-shard margin softmax cross-entropy of the head, in two layouts.

Everything here runs inside ``shard_map`` on one head shard. Inputs: the
shard's sampled rows (raw centres ``[Ns, K, D]``), the normalised embeddings
of its group ``x [Bg, D]`` (all-gathered over the head axes), each sample's
target slot on this shard (``tslot``, -1 when the target lives elsewhere or
was not sampled), ``valid [Ns]`` (False for sentinel slots) and ``label_ok``.
The softmax's max, exp-sum and target logit are reduced across shards
(``pmax`` / ``psum``); each shard returns the slice of per-sample loss and
statistics for the rows its device holds.

* ``full``: the ``[Bg, Ns]`` logits at once; the backward recomputes the
  softmax from the saved cosines (one pass and two matmuls).
* ``blockwise``: the sampled columns in blocks of ``block`` inside a
  loop, an online max / log-sum-exp over the blocks, and a backward
  that recomputes each block's logits. Nothing ``[Bg, Ns]`` exists; the
  temporaries are ``[Bg, block]``. When ``block`` does not divide ``Ns`` the
  last block starts at ``Ns - block`` and its columns already seen are
  masked out (no padded copy of the rows).
* ``fused_update``: the blockwise forward and backward with the optimizer
  update of each block's rows done inside the backward loop, on rows read
  from (and written back to) the table itself. No gathered copy of the
  sampled rows, their gradient or their optimizer state ever exists beyond
  one block: at r = 1 the head step needs the table, its state and
  O(block * K * D) more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from pfc_jax.margins import Margin

NORM_EPS = 1e-12


def _with_vjp(forward, backward) -> Callable:
    """``ce(rows, x, tslot, valid, label_ok)`` with the hand-written backward."""

    @jax.custom_vjp
    def ce(rows, x, tslot, valid, label_ok):
        return forward(rows, x, tslot, valid, label_ok)[0]

    ce.defvjp(forward, backward)
    return ce


@dataclasses.dataclass(frozen=True)
class ShardCE:
    """What the per-shard kernels need to know, fixed at trace time."""

    ns: int                 # sampled slots per shard
    num_subcenters: int
    scale: float
    margin: Margin
    filter_threshold: float
    zero_mode: bool         # filter_mode == "zero"
    matmul_dtype: Any
    head_axes: tuple[str, ...]
    replica_axes: tuple[str, ...]  # batch axes outside the head axes (groups)
    num_head_shards: int

    # ----------------------------------------------------------- shared pieces
    def _inv_norms(self, rows):
        """rows [n, K, D] raw -> 1 / |w| [n, K]."""
        n, k = rows.shape[0], self.num_subcenters
        flat = rows.reshape(n * k, -1)
        sq = jnp.einsum("nd,nd->n", flat, flat).reshape(n, k)
        return lax.rsqrt(jnp.maximum(sq, NORM_EPS**2))

    def _cosines(self, rows, x):
        """rows [n, K, D] raw, x [Bg, D] -> inv_w [n, K], cos_pre [Bg, n], kstar."""
        n, k = rows.shape[0], self.num_subcenters
        mm = jnp.dtype(self.matmul_dtype)
        flat = rows.reshape(n * k, -1)
        inv_w = self._inv_norms(rows)
        raw = jnp.dot(x.astype(mm), flat.astype(mm).T, preferred_element_type=jnp.float32)
        cos_k = raw.reshape(x.shape[0], n, k) * inv_w[None]
        if k > 1:
            return inv_w, jnp.max(cos_k, axis=-1), jnp.argmax(cos_k, axis=-1).astype(jnp.int8)
        return inv_w, cos_k[..., 0], None

    def _logits(self, cos, phi, is_t, neg):
        """Masked logits z; also the kept-negative and filtered-to-zero masks."""
        s, thr = self.scale, self.filter_threshold
        keep, zeroed = neg, jnp.zeros_like(neg)
        if thr > 0:
            dirty = neg & (cos > thr)
            if self.zero_mode:
                cos, zeroed = jnp.where(dirty, 0.0, cos), dirty
            else:
                keep = neg & ~dirty
        z = jnp.where(is_t, s * phi[:, None], s * cos)
        return jnp.where(keep | is_t, z, -jnp.inf), keep, zeroed

    def _grads(self, rows, x, cos_pre, kstar, inv_w, is_t, neg, phi, dphi, log_z, d_loss):
        """d x and d rows of one set of columns, from the softmax's log-partition."""
        s, k_sub = self.scale, self.num_subcenters
        mm = jnp.dtype(self.matmul_dtype)
        cos = jnp.clip(cos_pre, -1.0, 1.0)
        z, _, zeroed = self._logits(cos, phi, is_t, neg)
        d_z = d_loss[:, None] * (jnp.exp(z - log_z[:, None]) - is_t)
        d_cos = s * d_z * jnp.where(is_t, dphi[:, None], jnp.where(zeroed, 0.0, 1.0))
        d_cos = jnp.where((cos_pre > -1.0) & (cos_pre < 1.0), d_cos, 0.0)
        if k_sub > 1:
            pick = kstar[..., None] == jnp.arange(k_sub, dtype=jnp.int8)
            d_cos_k = jnp.where(pick, d_cos[..., None], 0.0)
        else:
            d_cos_k = d_cos[..., None]
        d_raw = d_cos_k * inv_w[None]                    # [Bg, n, K]
        n = rows.shape[0]
        flat_rows = rows.reshape(n * k_sub, -1)
        d_raw_flat = d_raw.reshape(x.shape[0], n * k_sub)
        d_x = jnp.dot(d_raw_flat.astype(mm), flat_rows.astype(mm),
                      preferred_element_type=jnp.float32)
        d_rows = jnp.dot(d_raw_flat.astype(mm).T, x.astype(mm),
                         preferred_element_type=jnp.float32).reshape(rows.shape)
        # Through the row normalisation: d cos / d w = (x - cos w_hat) / |w|.
        radial = jnp.sum(d_raw * cos_pre[..., None], axis=0) * inv_w  # not a matmul
        d_rows = d_rows - rows * radial[..., None]
        if self.replica_axes:  # rows are shared by the groups: sum their gradients
            d_rows = lax.psum(d_rows, self.replica_axes)
        return d_x, d_rows

    def _finish(self, neg_max, neg_sum, c_t, max_neg_cos, tslot, label_ok):
        """Cross-shard softmax from this shard's negatives (online max and sum) and target.

        ``neg_sum`` is ``sum exp(z - neg_max)`` over the kept negatives.
        """
        head_axes, s = self.head_axes, self.scale
        has_t = tslot >= 0
        phi = self.margin(c_t)
        z_t = jnp.where(has_t, s * phi, -jnp.inf)
        row_max = lax.pmax(jnp.maximum(neg_max, z_t), head_axes)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        sum_exp = lax.psum(neg_sum * jnp.exp(neg_max - row_max) + jnp.exp(z_t - row_max),
                           head_axes)
        target = lax.psum(jnp.where(has_t, s * phi, 0.0), head_axes)
        log_z = jnp.log(jnp.maximum(sum_exp, 1e-30)) + row_max
        loss_i = jnp.where(label_ok, log_z - target, 0.0)
        stats = dict(
            target_cos=lax.psum(jnp.where(has_t, c_t, 0.0), head_axes),
            max_neg_cos=lax.pmax(max_neg_cos, head_axes),
            target_is_max=label_ok & (target >= lax.pmax(neg_max, head_axes)),
            label_ok=label_ok)
        return loss_i, stats, log_z

    def _own(self, a):
        """This device's slice of a group-wide per-sample array."""
        b = a.shape[0] // self.num_head_shards
        return lax.dynamic_slice_in_dim(a, lax.axis_index(self.head_axes) * b, b)

    def _margin_and_slope(self, c_t):
        return jax.jvp(self.margin, (c_t,), (jnp.ones_like(c_t),))

    # -------------------------------------------------------------- full
    def full(self) -> Callable:
        """``ce(rows, x, tslot, valid, label_ok) -> (own loss, own stats)``, custom VJP."""
        ns = self.ns

        def forward(rows, x, tslot, valid, label_ok):
            inv_w, cos_pre, kstar = self._cosines(rows, x)
            cos = jnp.clip(cos_pre, -1.0, 1.0)
            is_t = jnp.arange(ns)[None, :] == tslot[:, None]
            neg = valid[None, :] & ~is_t
            c_t = jnp.sum(jnp.where(is_t, cos, 0.0), axis=-1)
            z, keep, _ = self._logits(cos, self.margin(c_t), is_t, neg)
            z_neg = jnp.where(keep, z, -jnp.inf)
            neg_max = jnp.max(z_neg, axis=-1)
            safe = jnp.where(jnp.isfinite(neg_max), neg_max, 0.0)
            neg_sum = jnp.sum(jnp.exp(z_neg - safe[:, None]), axis=-1)
            max_neg_cos = jnp.max(jnp.where(neg, cos, -2.0), axis=-1)
            loss_i, stats, log_z = self._finish(neg_max, neg_sum, c_t, max_neg_cos, tslot,
                                                label_ok)
            residuals = (rows, x, tslot, valid, label_ok, inv_w, cos_pre, kstar, c_t, log_z)
            return (self._own(loss_i), {k: self._own(v) for k, v in stats.items()}), residuals

        def backward(residuals, cotangents):
            rows, x, tslot, valid, label_ok, inv_w, cos_pre, kstar, c_t, log_z = residuals
            # Each shard returned its own slice of the group's rows; the loss of
            # every row depends on every shard's logits.
            d_loss = lax.all_gather(cotangents[0], self.head_axes, tiled=True)
            d_loss = jnp.where(label_ok, d_loss, 0.0)
            is_t = jnp.arange(ns)[None, :] == tslot[:, None]
            neg = valid[None, :] & ~is_t
            phi, dphi = self._margin_and_slope(c_t)
            d_x, d_rows = self._grads(rows, x, cos_pre, kstar, inv_w, is_t, neg, phi, dphi,
                                      log_z, d_loss)
            return d_rows.astype(rows.dtype), d_x.astype(x.dtype), None, None, None

        return _with_vjp(forward, backward)

    # --------------------------------------------------------- blockwise
    def _blocks(self, block: int):
        """(number of blocks, block); block i covers [start_i, start_i + block)."""
        block = max(1, min(block, self.ns))
        return -(-self.ns // block), block

    def _columns(self, i, block, tslot, valid):
        """Block i's start, its live columns (valid and not seen before) and the
        target / negative masks."""
        start = jnp.minimum(i * block, self.ns - block)
        cols = start + jnp.arange(block)
        fresh = cols >= i * block  # the clamped last block re-covers some columns
        is_t = (cols[None, :] == tslot[:, None]) & fresh[None, :]
        live = lax.dynamic_slice_in_dim(valid, start, block) & fresh
        return start, live, is_t, live[None, :] & ~is_t

    def _forward_blocks(self, rows_at, x, tslot, valid, label_ok, block, stash=False):
        """Online pass over the blocks: the softmax's log-partition and the stats.

        ``stash``: also keep every block's cosines (and the chosen
        sub-centre), stacked by block (``[n_blocks, Bg, block]``, the scan's
        outputs, which the backward reads back a block at a time as
        contiguous slices), for a backward that then needs no matmul to
        recompute them; returned as a last element, else ``None``.
        """
        n_blocks, block = self._blocks(block)
        bg = x.shape[0]

        def body(carry, i):
            neg_max, neg_sum, c_t, max_neg_cos = carry
            start, _, is_t, neg = self._columns(i, block, tslot, valid)
            _, cos_pre, kstar = self._cosines(rows_at(start), x)
            saved = ((cos_pre,) + ((kstar,) if self.num_subcenters > 1 else ())
                     if stash else None)
            cos = jnp.clip(cos_pre, -1.0, 1.0)
            c_t = c_t + jnp.sum(jnp.where(is_t, cos, 0.0), axis=-1)
            max_neg_cos = jnp.maximum(max_neg_cos,
                                      jnp.max(jnp.where(neg, cos, -2.0), axis=-1))
            # Negatives only; phi is unused where is_t is False.
            z, keep, _ = self._logits(cos, jnp.zeros((bg,)), jnp.zeros_like(is_t), neg)
            z = jnp.where(keep, z, -jnp.inf)
            new_max = jnp.maximum(neg_max, jnp.max(z, axis=-1))
            safe = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            neg_sum = (neg_sum * jnp.exp(neg_max - safe)
                       + jnp.sum(jnp.exp(z - safe[:, None]), axis=-1))
            return (new_max, neg_sum, c_t, max_neg_cos), saved

        vary = (tslot * 0).astype(jnp.float32)  # device-varying zeros, like the carry
        init = (vary - jnp.inf, vary, vary, vary - 2.0)
        # Where no negative was kept neg_max stays -inf and neg_sum 0.
        (neg_max, neg_sum, c_t, max_neg_cos), saved = lax.scan(
            body, init, jnp.arange(n_blocks))
        out = self._finish(neg_max, neg_sum, c_t, max_neg_cos, tslot, label_ok) + (c_t,)
        return out + (saved,)

    def blockwise(self, block: int) -> Callable:
        """``full``'s function and gradients, never holding ``[Bg, Ns]``."""
        n_blocks, block = self._blocks(block)

        def forward(rows, x, tslot, valid, label_ok):
            loss_i, stats, log_z, c_t, _ = self._forward_blocks(
                lambda start: lax.dynamic_slice_in_dim(rows, start, block), x, tslot, valid,
                label_ok, block)
            residuals = (rows, x, tslot, valid, label_ok, c_t, log_z)
            return (self._own(loss_i), {k: self._own(v) for k, v in stats.items()}), residuals

        def backward(residuals, cotangents):
            rows, x, tslot, valid, label_ok, c_t, log_z = residuals
            d_loss = lax.all_gather(cotangents[0], self.head_axes, tiled=True)
            d_loss = jnp.where(label_ok, d_loss, 0.0)
            phi, dphi = self._margin_and_slope(c_t)

            def body(i, carry):
                d_x, d_rows = carry
                start, _, is_t, neg = self._columns(i, block, tslot, valid)
                rows_b = lax.dynamic_slice_in_dim(rows, start, block)
                inv_w, cos_pre, kstar = self._cosines(rows_b, x)
                dx_b, dr_b = self._grads(rows_b, x, cos_pre, kstar, inv_w, is_t, neg, phi,
                                         dphi, log_z, d_loss)
                # Re-covered columns got zero gradient: adding keeps them right.
                acc = lax.dynamic_slice_in_dim(d_rows, start, block) + dr_b
                return d_x + dx_b, lax.dynamic_update_slice_in_dim(d_rows, acc, start, 0)

            d_x, d_rows = lax.fori_loop(
                0, n_blocks, body, (jnp.zeros_like(x), jnp.zeros_like(rows, jnp.float32)))
            return d_rows.astype(rows.dtype), d_x.astype(x.dtype), None, None, None

        return _with_vjp(forward, backward)

    # ------------------------------------------------------ fused update
    def fused_update(self, block: int, tx: optax.GradientTransformation,
                     local_classes: int, is_row: list[bool], treedef,
                     contiguous: bool = False, stash: bool = False) -> Callable:
        """Loss, embedding gradient and the lazy optimizer update in one blockwise pass.

        ``step(table, leaves, idx, x, tslot, valid, label_ok, d_loss) -> ((own
        loss, own stats), d_x [Bg, D], table, leaves, sum of squared row
        gradients)``: ``leaves`` are the optimizer state's leaves
        (``treedef``), those marked ``is_row`` shaped like the local table;
        ``d_loss`` is the cotangent of each sample's loss (the mean's 1 / B).
        Rows are read from and written to ``table`` by ``idx``; the sentinel
        ``local_classes`` is never written. ``contiguous``: slot j is row j
        (every class of the shard sampled), and blocks are read and written
        with dynamic slices instead of gathers and scatters. Measured
        (compiled memory): the TPU compiler copies a ``[C, K, D]`` table for
        a row scatter but updates slices in place; XLA:CPU keeps the
        gather/scatter form in place, while with slices it fuses the
        optimizer's arithmetic into the writes, reads each buffer's rows
        after the other was written, and copies both tables. So
        ``contiguous`` is for TPU. ``stash``: the forward keeps the
        ``[Bg, Ns]`` cosines and the backward reads them instead of
        recomputing each block's matmul (for when they fit the budget).
        """
        n_blocks, block = self._blocks(block)
        cl = local_classes

        def read(a, idx, start):
            if contiguous:
                return lax.dynamic_slice_in_dim(a, start, block)
            return jnp.take(a, lax.dynamic_slice_in_dim(idx, start, block), axis=0, mode="clip")

        def write(a, idx, start, new, keep):
            """Block rows where ``keep``; re-covered and sentinel slots untouched."""
            new = new.astype(a.dtype)
            if contiguous:
                old = lax.dynamic_slice_in_dim(a, start, block)
                mask = keep.reshape((block,) + (1,) * (a.ndim - 1))
                return lax.dynamic_update_slice_in_dim(a, jnp.where(mask, new, old), start, 0)
            rows = jnp.where(keep, lax.dynamic_slice_in_dim(idx, start, block), cl)
            return a.at[rows].set(new, mode="drop")

        def step(table, opt_leaves, idx, x, tslot, valid, label_ok, d_loss):
            loss_i, stats, log_z, c_t, saved = self._forward_blocks(
                lambda start: read(table, idx, start), x, tslot, valid, label_ok, block, stash)
            d_loss = jnp.where(label_ok, d_loss, 0.0)
            phi, dphi = self._margin_and_slope(c_t)

            def body(i, carry):
                d_x, table, leaves, gsq = carry
                start, keep, is_t, neg = self._columns(i, block, tslot, valid)
                rows_b = read(table, idx, start)
                if stash:  # re-covered columns read updated rows: masked out below
                    inv_w = self._inv_norms(rows_b)
                    cos_pre, *rest = (lax.dynamic_index_in_dim(a, i, keepdims=False)
                                      for a in saved)
                    kstar = rest[0] if rest else None
                else:
                    inv_w, cos_pre, kstar = self._cosines(rows_b, x)
                dx_b, g_b = self._grads(rows_b, x, cos_pre, kstar, inv_w, is_t, neg, phi,
                                        dphi, log_z, d_loss)
                g_b = g_b.astype(table.dtype)
                # Scalars (step counts) come from the step's input state in every
                # block, so every block sees the same count and the last one's
                # result is the step's.
                state_b = [read(leaf, idx, start) if r else orig
                           for leaf, orig, r in zip(leaves, opt_leaves, is_row)]
                updates, new_state = tx.update(
                    g_b, jax.tree.unflatten(treedef, state_b), rows_b)
                new_rows, new_leaves = (optax.apply_updates(rows_b, updates),
                                        jax.tree.leaves(new_state))
                table = write(table, idx, start, new_rows, keep)
                leaves = [write(leaf, idx, start, new, keep) if r else new.astype(leaf.dtype)
                          for leaf, new, r in zip(leaves, new_leaves, is_row)]
                gsq = gsq + jnp.sum(jnp.where(keep[:, None, None], g_b, 0.0) ** 2)
                return d_x + dx_b, table, leaves, gsq

            gsq0 = jnp.sum(jnp.zeros_like(table[:1, :1, :1]))
            d_x, table, leaves, gsq = lax.fori_loop(
                0, n_blocks, body, (jnp.zeros_like(x), table, list(opt_leaves), gsq0))
            own = (self._own(loss_i), {k: self._own(v) for k, v in stats.items()})
            return own, d_x, table, leaves, gsq

        return step
