"""Lazy and dense head updates: touched rows only, bit-identical elsewhere, donated."""

import jax
import numpy as np
import optax
import pytest

from pfc_jax import mesh as mesh_lib
from pfc_jax import partial_fc as pf
from pfc_jax import sparse

C, D, B = 203, 8, 16
LR, MOM, WD = 0.1, 0.9, 5e-4


def _head(tx, update="lazy", sample_rate=0.2):
    cfg = pf.HeadConfig(num_classes=C, embedding_dim=D, scale=16.0, sample_rate=sample_rate,
                        row_update=update)
    return pf.PartialFC(cfg, mesh_lib.make_mesh(), tx)


def _batch(seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, D)).astype(np.float32),
            rng.integers(0, C, B).astype(np.int32))


def _host(tree):
    return jax.tree.map(lambda a: np.array(a), tree)


def _grads(head, centers, x, y, rng):
    """Sampled global rows and their gradients, from the same pieces the step uses."""
    xs, ys = head.shard_batch(x, y)

    @jax.jit
    def f(centers, xs, ys, rng):
        idx, rows = head.sample_and_gather(centers, ys, rng)
        return idx, head.grads(rows, idx, xs, ys)[2]

    idx, row_grads = f(centers, xs, ys, rng)
    return np.asarray(idx), np.asarray(row_grads)


def _global_rows(head, idx):
    """(global row ids, slot positions) of the used slots of idx."""
    cl = head.local_classes
    idx = idx.reshape(head.num_shards, -1)
    ids, slots = [], []
    for p in range(head.num_shards):
        for j, i in enumerate(idx[p]):
            if i < cl:
                ids.append(p * cl + int(i))
                slots.append(p * idx.shape[1] + j)
    return np.array(ids), np.array(slots)


SGD = optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOM))
ADAMW = optax.adamw(1e-2, weight_decay=0.1)


def test_table_sized_state_leaves_are_rows_and_others_rejected():
    shape = (40, 1, D)
    state = jax.eval_shape(ADAMW.init, jax.ShapeDtypeStruct(shape, np.float32))
    mask = jax.tree.leaves(sparse.row_leaf_mask(state, shape))
    assert sorted(mask) == [False, True, True]  # count; mu, nu
    bad = jax.eval_shape(optax.adafactor(1e-2).init, jax.ShapeDtypeStruct((40, D), np.float32))
    with pytest.raises(ValueError, match="row-wise head optimizer"):
        sparse.row_leaf_mask(bad, (40, D))


@pytest.mark.parametrize("name,tx", [("sgd_momentum", SGD), ("adamw", ADAMW)])
def test_lazy_update_touches_sampled_rows_only(name, tx):
    head = _head(tx)
    state = head.init(jax.random.key(0))
    for step in range(3):
        x, y = _batch(step)
        rng = jax.random.fold_in(jax.random.key(1), step)
        before = _host(state)
        idx, row_grads = _grads(head, state.centers, x, y, rng)
        ids, slots = _global_rows(head, idx)
        xs, ys = head.shard_batch(x, y)
        state, _, stats = head.step(state, xs, ys, rng)
        after = _host(state)
        assert set(ids) >= set(y.tolist())
        untouched = np.setdiff1d(np.arange(head.padded_classes), ids)
        # Untouched rows and their optimizer state: bit-identical.
        np.testing.assert_array_equal(after.centers[untouched], before.centers[untouched])
        for a, b in zip(jax.tree.leaves(after.opt_state), jax.tree.leaves(before.opt_state)):
            if a.shape == head.table_shape:
                np.testing.assert_array_equal(a[untouched], b[untouched])
        # Touched rows: optax applied to those rows alone.
        sub_state = jax.tree.map(lambda a: a[ids] if a.shape == head.table_shape else a,
                                 before.opt_state)
        g = row_grads[slots]
        upd, new_sub = tx.update(g, sub_state, before.centers[ids])
        np.testing.assert_allclose(after.centers[ids],
                                   np.asarray(optax.apply_updates(before.centers[ids], upd)),
                                   rtol=1e-6, atol=1e-7)
        for a, b in zip(jax.tree.leaves(after.opt_state), jax.tree.leaves(new_sub)):
            got = a[ids] if a.shape == head.table_shape else a
            np.testing.assert_allclose(got, np.asarray(b), rtol=1e-6, atol=1e-7)
        assert int(stats["num_bad_labels"]) == 0


def test_lazy_sgd_matches_hand_computed_momentum():
    """Step 1: w - lr (g + wd w); step 2 on a row touched twice: momentum carries."""
    head = _head(SGD, sample_rate=1.0)  # every row touched: the hand formula covers all
    state = head.init(jax.random.key(0))
    w0 = np.asarray(state.centers, np.float64)
    x, y = _batch(0)
    rng = jax.random.key(2)
    _, g1 = _grads(head, state.centers, x, y, rng)
    ids, slots = _global_rows(head, _grads(head, state.centers, x, y, rng)[0])
    xs, ys = head.shard_batch(x, y)
    state, _, _ = head.step(state, xs, ys, rng)
    w1 = np.asarray(state.centers, np.float64)
    G1 = np.zeros_like(w0)
    G1[ids] = g1[slots]
    t1 = G1 + WD * w0
    np.testing.assert_allclose(w1[:C], (w0 - LR * t1)[:C], rtol=1e-5, atol=1e-8)
    _, g2 = _grads(head, state.centers, x, y, rng)
    state, _, _ = head.step(state, xs, ys, rng)
    G2 = np.zeros_like(w0)
    G2[ids] = g2[slots]
    t2 = (G2 + WD * w1) + MOM * t1
    np.testing.assert_allclose(np.asarray(state.centers)[:C], (w1 - LR * t2)[:C],
                               rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(state.centers)[C:], 0)  # padding stays zero


@pytest.mark.parametrize("name,tx", [("sgd_momentum", SGD), ("adamw", ADAMW)])
def test_dense_update_equals_plain_optax_on_whole_table(name, tx):
    head = _head(tx, update="dense")
    state = head.init(jax.random.key(0))
    for step in range(2):
        x, y = _batch(step)
        rng = jax.random.fold_in(jax.random.key(3), step)
        before = _host(state)
        idx, row_grads = _grads(head, state.centers, x, y, rng)
        ids, slots = _global_rows(head, idx)
        full = np.zeros(head.table_shape, np.float32)
        full[ids] = row_grads[slots]
        upd, expect_state = tx.update(full, before.opt_state, before.centers)
        expect = np.asarray(optax.apply_updates(before.centers, upd))
        xs, ys = head.shard_batch(x, y)
        state, _, _ = head.step(state, xs, ys, rng)
        np.testing.assert_allclose(np.asarray(state.centers), expect, rtol=1e-6, atol=1e-7)
        for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(expect_state)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # Dense semantics: rows never sampled still moved (weight decay).
    untouched = np.setdiff1d(np.arange(C), ids)
    assert not np.array_equal(np.asarray(state.centers)[untouched], before.centers[untouched])


def test_step_donates_the_head_state():
    head = _head(SGD)
    state = head.init(jax.random.key(0))
    x, y = head.shard_batch(*_batch(0))
    old = state
    state, g, _ = head.step(state, x, y, jax.random.key(0))
    assert old.centers.is_deleted()
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.opt_state)
               if leaf.shape == head.table_shape)
    assert g.shape == (B, D) and g.sharding == mesh_lib.batch_sharding(head.mesh)
    # The compiled step writes the new table and its momentum over the donated
    # ones: per device, the aliased bytes cover both table-sized shards (the
    # rest of the head state is a few scalars, far smaller than one shard).
    compiled = head._step.lower(state, x, y, jax.random.key(0)).compile()
    shard = state.centers.addressable_shards[0].data
    shard_bytes = shard.size * shard.dtype.itemsize
    momentum = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.shape == head.table_shape]
    assert len(momentum) == 1, "SGD with momentum keeps one table-sized state"
    aliased = compiled.memory_analysis().alias_size_in_bytes
    assert aliased >= 2 * shard_bytes, (aliased, shard_bytes)
