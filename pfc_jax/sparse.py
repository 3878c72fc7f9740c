"""Row-wise ("lazy") optax updates of a sharded table.

The head touches a few rows of a huge table per step. ``lazy_update`` gathers
those rows and the matching rows of every per-row optimizer-state leaf, runs
the optax transform on them alone, and scatters the results back in place;
every other row, and its state, stays bit-identical. ``dense_update`` runs
the transform on the whole table with a gradient that is zero outside the
touched rows (the reference's V2 semantics: momentum and weight decay move
every row every step).

Works with any optax transform whose update is element-wise and whose state
leaves are either shaped like the table (moments, traces) or scalars (step
counts): sgd (momentum, nesterov), adam/adamw, lion, rmsprop, ... Transforms
that mix rows (global-norm clipping, factored second moments) are not
row-separable and are rejected where their state shows it.

Row indices come per head shard: ``idx`` is ``[P * Ns]`` split over the head
axes; each shard's entries index its own local rows, and the sentinel value
``Cl`` (one past the last local row) marks an unused slot: gathers clip it,
scatters drop it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

UPDATE_MODES = ("lazy", "dense")


def row_leaf_mask(opt_state_shapes, table_shape: tuple[int, ...]):
    """True for state leaves shaped like the table, False for scalars; errors otherwise."""

    def classify(path, leaf):
        shape = tuple(leaf.shape)
        if shape == tuple(table_shape):
            return True
        if shape == ():
            return False
        raise ValueError(
            f"optimizer state leaf {jax.tree_util.keystr(path)} has shape {shape}; a row-wise "
            f"head optimizer needs leaves shaped like the table {tuple(table_shape)} or "
            "scalars (use an element-wise transform such as sgd, adamw or lion)")

    return jax.tree_util.tree_map_with_path(classify, opt_state_shapes)


class RowOps:
    """Gather / scatter of local rows inside shard_map, for one mesh and head axes."""

    def __init__(self, mesh: Mesh, head_axes: Sequence[str]):
        self.mesh = mesh
        self.spec = P(tuple(head_axes))

    def _map(self, fn, n_in: int):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(self.spec,) * n_in,
                             out_specs=self.spec)

    def gather(self, table: jax.Array, idx: jax.Array) -> jax.Array:
        return self._map(lambda t, i: jnp.take(t, i, axis=0, mode="clip"), 2)(table, idx)

    def scatter(self, table: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
        return self._map(lambda t, i, r: t.at[i].set(r, mode="drop"), 3)(table, idx, rows)

    def scatter_add(self, table: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
        return self._map(lambda t, i, r: t.at[i].add(r, mode="drop"), 3)(table, idx, rows)


def lazy_update(tx: optax.GradientTransformation, ops: RowOps, table, opt_state, idx,
                row_grads, rows=None):
    """Updates only the rows named by ``idx``; returns (table, opt_state)."""
    if rows is None:
        rows = ops.gather(table, idx)
    is_row = row_leaf_mask(opt_state, table.shape)
    state_rows = jax.tree.map(lambda leaf, r: ops.gather(leaf, idx) if r else leaf,
                              opt_state, is_row)
    updates, new_state_rows = tx.update(row_grads, state_rows, rows)
    new_rows = optax.apply_updates(rows, updates)
    table = ops.scatter(table, idx, new_rows.astype(table.dtype))
    opt_state = jax.tree.map(
        lambda leaf, new, r: ops.scatter(leaf, idx, new.astype(leaf.dtype)) if r else new,
        opt_state, new_state_rows, is_row)
    return table, opt_state


def dense_update(tx: optax.GradientTransformation, ops: RowOps, table, opt_state, idx,
                 row_grads):
    """Updates every row, with zero gradient outside ``idx``; returns (table, opt_state)."""
    grads = ops.scatter_add(jnp.zeros_like(table), idx, row_grads.astype(table.dtype))
    updates, opt_state = tx.update(grads, opt_state, table)
    return optax.apply_updates(table, updates), opt_state
