"""The blockwise softmax and the fused row update against today's whole-logits head.

Blockwise and whole compute the same float32 maths with sums in another
order. Reordering a sum of n float32 terms moves it by at most n * u of the
sum of magnitudes (u = 2**-24); the log-partition also carries the rounding
of its own size (~ s, the largest logit), and each of the four roundings on
a gradient's path (sum, exp, log, product) adds one such bound. Hence the
tolerance ``4 * (Ns_total + s) * u`` relative to each quantity's largest
magnitude.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pfc_jax import mesh as mesh_lib
from pfc_jax import partial_fc as pf

C, D, B = 37, 16, 16
U = 2.0**-24
LAYOUTS = [({"data": 1}, None), ({"data": 2}, None), ({"data": 4}, None), ({"data": 8}, None),
           ({"data": 2, "model": 4}, ("model",))]
MARGINS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4)}


def _combo(i: int) -> dict:
    """Combination i of margin x K x filter x r (4 binary factors)."""
    margin = ("arcface", "cosface")[i >> 3 & 1]
    k = (1, 3)[i >> 2 & 1]
    filt = (i >> 1) & 1
    r = (1.0, 0.3)[i & 1]
    kw = dict(margins=MARGINS[margin], num_subcenters=k, sample_rate=r)
    if filt:  # mask for ArcFace, zero for CosFace: both filter modes
        kw.update(filter_threshold=0.2, filter_mode="mask" if margin == "arcface" else "zero")
    return kw


# Mesh m takes combinations 4j + (j + m) % 4: every factor's both values on every
# mesh, all 16 combinations over the four 1-D meshes; the 2x4 mesh takes four that
# also cover every value.
CASES = [(m, 4 * j + (j + m) % 4) for m in range(4) for j in range(4)]
CASES += [(4, i) for i in (0, 15, 6, 9)]


def _tx(i: int):
    # Momentum + weight decay, or Adam (whose step count is a scalar state leaf).
    if i % 2:
        return optax.adamw(1e-2, weight_decay=1e-3)
    return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))


def _tol(head) -> float:
    ns_total = head.num_sampled(B) * head.num_shards * head.config.num_subcenters
    return 4 * (ns_total + head.config.scale) * U


def _close(a, b, tol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("mesh_i,combo", CASES)
def test_blockwise_and_fused_equal_the_whole_logits_head(mesh_i, combo):
    shape, head_axes = LAYOUTS[mesh_i]
    n = int(np.prod(list(shape.values())))
    mesh = mesh_lib.make_mesh(shape, jax.devices()[:n])
    kw = dict(num_classes=C, embedding_dim=D, scale=16.0, **_combo(combo))
    tx = _tx(combo)
    whole = pf.PartialFC(pf.HeadConfig(softmax="full", **kw), mesh, tx, head_axes)
    # block 3 does not divide Ns (37, 19, 10, 5 or 12 per shard): the clamped last
    # block is exercised everywhere. Half the cases (on each mesh) stash the forward's
    # cosines for the fused backward, half (no stash budget) recompute them.
    stash = (mesh_i + combo) % 2 == 0
    blocked = pf.PartialFC(pf.HeadConfig(softmax="blockwise", block_size=3,
                                         cosine_stash_mib=32.0 if stash else 0.0, **kw),
                           mesh, tx, head_axes)
    assert blocked.softmax_plan(B) == ("blockwise", 3) and blocked.fuses_update(B)
    assert blocked.stashes_cosines(B) == stash
    assert not whole.fuses_update(B)
    rng = np.random.default_rng(combo)
    x = rng.normal(size=(B, D)).astype(np.float32)
    y = rng.integers(0, C, B).astype(np.int32)
    w = rng.normal(size=whole.table_shape).astype(np.float32)
    w[C:] = 0
    centers = jax.device_put(w, whole.table_sharding)
    xs, ys = whole.shard_batch(x, y)
    key = jax.random.key(combo)

    @jax.jit
    def run(centers, x, y, key):
        def loss_and_grads(head, centers, k):
            idx, rows = head.sample_and_gather(centers, y, k)
            return (*head.grads(rows, idx, x, y), idx, rows)

        a = loss_and_grads(whole, centers, key)[:4]
        b = loss_and_grads(blocked, centers, key)[:4]
        # Two steps, so the optimizer state written by the first is read by the second.
        st = pf.HeadState(centers, tx.init(centers))
        s_ref, s_fused = st, st
        for step in range(2):
            k = jax.random.fold_in(key, step)
            loss, stats, g_rows, g_emb, idx, rows = loss_and_grads(whole, s_ref.centers, k)
            s_ref = whole.update(s_ref, idx, g_rows, rows)
            f_loss, f_stats, f_emb, s_fused, f_norm = blocked.fused_step(
                s_fused, blocked.sample(y, k), x, y)
        return a, b, (loss, stats, g_emb, optax.tree.norm(g_rows), s_ref), (
            f_loss, f_stats, f_emb, f_norm, s_fused)

    a, b, ref, fused = jax.tree.map(np.asarray, run(centers, xs, ys, key))
    tol = _tol(whole)
    for name, va, vb in zip(("loss", "stats", "row grads", "embedding grads"), a, b):
        for (path, la), lb in zip(jax.tree_util.tree_leaves_with_path(va),
                                  jax.tree.leaves(vb)):
            if la.dtype == bool:
                np.testing.assert_array_equal(la, lb, err_msg=f"{name}{path}")
            else:
                _close(lb, la, tol, f"blockwise {name}{jax.tree_util.keystr(path)}")
    names = ("loss", "stats", "embedding grads", "row grad norm", "state")
    for name, va, vb in zip(names, ref, fused):
        for (path, la), lb in zip(jax.tree_util.tree_leaves_with_path(va),
                                  jax.tree.leaves(vb)):
            if la.dtype == bool or np.issubdtype(la.dtype, np.integer):
                np.testing.assert_array_equal(la, lb, err_msg=f"fused {name}{path}")
            else:
                _close(lb, la, tol, f"fused {name}{jax.tree_util.keystr(path)}")
    # Padding rows and their state stay exactly zero.
    for leaf in jax.tree.leaves(fused[4]):
        if leaf.shape == whole.table_shape:
            np.testing.assert_array_equal(leaf[C:], 0)


def _temporaries(n: int, **kw) -> int:
    """Compiled temporary bytes per device of the donated head step, n devices."""
    mesh = mesh_lib.make_mesh({"data": n}, jax.devices()[:n])
    # Weak scaling: 512 classes and 4 images per device.
    head = pf.PartialFC(pf.HeadConfig(num_classes=512 * n, embedding_dim=8, **kw), mesh,
                        optax.sgd(0.1, momentum=0.9))
    state = jax.eval_shape(head.init, jax.random.key(0))
    sh = mesh_lib.batch_sharding(mesh)
    x = jax.ShapeDtypeStruct((4 * n, 8), jnp.float32, sharding=sh)
    y = jax.ShapeDtypeStruct((4 * n,), jnp.int32, sharding=sh)
    compiled = head._step.lower(state, x, y, jax.random.key(1)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_temporaries_stay_flat_as_devices_and_batch_grow(rate):
    """Per-device batch and classes fixed, 2 -> 8 devices: the global batch grows 4x.

    Blocks of 1024 logits: 128 columns for a group batch of 8, 32 for 32 (several
    blocks at every size: a single-block loop compiles differently); only the
    [B, D] embeddings (768 bytes here) grow. No cosine stash: it is [Bg, Ns],
    bounded by its own budget instead (test_cosine_stash_is_bounded_by_its_budget)."""
    budget = dict(logits_budget_mib=4 * 1024 * 4 / 2**20, sample_rate=rate,
                  cosine_stash_mib=0.0)
    blocked = {n: _temporaries(n, softmax="blockwise", **budget) for n in (2, 8)}
    whole = {n: _temporaries(n, softmax="full", sample_rate=rate) for n in (2, 8)}
    unfused = {n: _temporaries(n, softmax="blockwise", fused_update=False, **budget)
               for n in (2, 8)}
    assert blocked[8] <= 1.1 * blocked[2], blocked
    assert unfused[8] <= 1.1 * unfused[2], unfused
    assert whole[8] >= 2 * whole[2], whole  # [B_global, Ns]: 4x the rows


def test_cosine_stash_is_bounded_by_its_budget():
    """The fused step keeps its forward's [Bg, Ns] float32 cosines while they fit
    ``cosine_stash_mib``: kept at exactly their size, not one byte below, and kept
    they add their size to the temporaries, within a block's [Bg, block] cosines
    (the backward's recomputed block, which the stash replaces)."""
    n, rate = 8, 1.0
    group_batch, ns = 4 * n, 512  # 4 images and 512 classes a device, head on all 8
    stash_bytes = group_batch * ns * 4
    kw = dict(softmax="blockwise", logits_budget_mib=4 * 1024 * 4 / 2**20, sample_rate=rate)
    mesh = mesh_lib.make_mesh({"data": n}, jax.devices()[:n])
    for mib, kept in ((stash_bytes / 2**20, True), ((stash_bytes - 1) / 2**20, False)):
        head = pf.PartialFC(pf.HeadConfig(num_classes=512 * n, embedding_dim=8,
                                          cosine_stash_mib=mib, **kw), mesh, optax.sgd(0.1))
        assert head.num_sampled(group_batch) == ns
        assert head.stashes_cosines(group_batch) is kept
        block = head.softmax_plan(group_batch)[1]
    on = _temporaries(n, cosine_stash_mib=stash_bytes / 2**20, **kw)
    off = _temporaries(n, cosine_stash_mib=0.0, **kw)
    block_bytes = group_batch * block * 4
    assert stash_bytes - block_bytes <= on - off <= stash_bytes + block_bytes, (on, off)


def test_fused_full_softmax_needs_little_beyond_the_table():
    """r = 1: the fused step's temporaries are a few blocks of rows whatever the
    table's size; the gathering step's are at least a table."""
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    out = {}
    for classes in (8192, 32768):
        for fused in (True, False):
            head = pf.PartialFC(
                pf.HeadConfig(num_classes=classes, embedding_dim=64, sample_rate=1.0,
                              softmax="blockwise", logits_budget_mib=1.0,
                              cosine_stash_mib=0.0, fused_update=fused),
                mesh, optax.sgd(0.1, momentum=0.9))
            assert head.softmax_plan(16) == ("blockwise", 1024)  # 2**16 elements / 64 wide
            state = jax.eval_shape(head.init, jax.random.key(0))
            x = jax.ShapeDtypeStruct((16, 64), jnp.float32)
            y = jax.ShapeDtypeStruct((16,), jnp.int32)
            ma = head._step.lower(state, x, y, jax.random.key(1)).compile().memory_analysis()
            held = sum(np.prod(leaf.shape) * leaf.dtype.itemsize
                       for leaf in jax.tree.leaves(state))
            assert ma.alias_size_in_bytes >= held  # table and state updated in place
            out[classes, fused] = ma.temp_size_in_bytes
    block_rows = 1024 * 64 * 4
    # Rows, their gradient, momentum rows, the updates and new values: a handful of blocks.
    assert out[8192, True] <= 8 * block_rows, out
    assert out[32768, True] <= 1.1 * out[8192, True], out
    for classes in (8192, 32768):
        assert out[classes, False] >= classes * 64 * 4, out


@pytest.mark.parametrize("batch,dim,k,budget_mib,expected", [
    # Blocks hold 2**21 elements (a quarter of 32 MiB) over max(Bg, D) * K: cols,
    # down to a multiple of 128, then Ns = 125000 split evenly, up to a multiple of 128.
    (128, 512, 1, 32.0, ("blockwise", 4096)),   # cols 4096: 31 blocks of 4033 -> 4096
    (1024, 512, 1, 32.0, ("blockwise", 2048)),  # cols 2048: 62 blocks of 2017 -> 2048
    (128, 512, 3, 32.0, ("blockwise", 1280)),   # cols 1365 -> 1280: 98 blocks of 1276
    (16, 16, 1, 32.0, ("full", 125000)),        # 16 x 125000 logits fit in 2**23
    (16, 16, 1, 1024 / 2**20, ("blockwise", 4)),  # 64 / 16 wide: under 256, kept as is
])
def test_softmax_plan_follows_the_budget(monkeypatch, batch, dim, k, budget_mib, expected):
    """Unfused (dense rows) the budget decides whole or blocks; the lazy head always
    takes the fused blockwise step, with the same blocks (one block of Ns where the
    logits fit: Ns = 125000 is under the 131072 columns of 2**21 / 16). The rule
    accelerators get: the CPU cap is lifted here (test_cpu_blocks_are_cache_sized)."""
    monkeypatch.setattr(pf, "_CPU_BLOCK_BYTES", 2**62)
    mesh = mesh_lib.make_mesh({"data": 8})
    kw = dict(num_classes=1_000_000, embedding_dim=dim, num_subcenters=k,
              logits_budget_mib=budget_mib)
    dense = pf.PartialFC(pf.HeadConfig(row_update="dense", **kw), mesh, optax.sgd(0.1))
    lazy = pf.PartialFC(pf.HeadConfig(**kw), mesh, optax.sgd(0.1))
    assert dense.num_sampled(batch) == 125000
    assert dense.softmax_plan(batch) == expected and not dense.fuses_update(batch)
    assert lazy.softmax_plan(batch, fused=False) == expected
    assert lazy.fuses_update(batch)
    assert lazy.softmax_plan(batch) == ("blockwise", expected[1])


@pytest.mark.parametrize("batch,budget_mib,block_mib,expected", [
    # 2 MiB = 2**19 elements over max(Bg, D) = 512 wide: cols 1024, 123 blocks of 1017
    (128, 32.0, 0.0, 1024),
    (1024, 32.0, 0.0, 512),   # 1024 wide: cols 512, 245 blocks of 511 -> 512
    (128, 1.0, 0.0, 128),     # a quarter of 1 MiB is under the cap: cols 128 as before
    (128, 32.0, 8.0, 4096),   # an explicit block budget: 2**21 / 512, as accelerators get
])
def test_cpu_blocks_are_cache_sized(batch, budget_mib, block_mib, expected):
    """On a CPU mesh an automatic block's logits are at most 2 MiB (Ns = 125000 per
    shard at C = 1M on 8 devices, D = 512, r = 1)."""
    mesh = mesh_lib.make_mesh({"data": 8})
    head = pf.PartialFC(pf.HeadConfig(num_classes=1_000_000, embedding_dim=512,
                                      logits_budget_mib=budget_mib,
                                      block_budget_mib=block_mib), mesh, optax.sgd(0.1))
    assert head.softmax_plan(batch) == ("blockwise", expected)


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_fused_update_by_slices_equals_by_gathers(monkeypatch, rate):
    """The slice form TPUs get at r = 1 (or any rate that samples every class),
    run here on the CPU mesh against the gather form; at r = 0.3 the slice form
    must not be chosen."""
    mesh = mesh_lib.make_mesh({"data": 8})
    tx = _tx(0)
    classes = 203  # 26 per shard: r = 0.3 samples 16 of them (B = 16), r = 1 all
    head = pf.PartialFC(pf.HeadConfig(num_classes=classes, embedding_dim=D, scale=16.0,
                                      num_subcenters=3, sample_rate=rate,
                                      softmax="blockwise", block_size=3), mesh, tx)
    rng = np.random.default_rng(5)
    x, y = head.shard_batch(rng.normal(size=(B, D)).astype(np.float32),
                            rng.integers(0, classes, B).astype(np.int32))
    w = rng.normal(size=head.table_shape).astype(np.float32)
    w[classes:] = 0

    def run():
        centers = jax.device_put(w, head.table_sharding)
        state = pf.HeadState(centers, tx.init(centers))
        f = jax.jit(lambda s, a, b: head.fused_step(s, head.sample(b, jax.random.key(0)), a, b))
        return jax.tree.map(np.asarray, f(state, x, y))

    gathered = run()
    seen = []
    monkeypatch.setattr(head, "_slices_rows",
                        lambda ns: seen.append(ns) or ns == head.local_classes)
    sliced = run()
    assert seen and (seen[0] == head.local_classes) == (rate == 1.0)
    tol = _tol(head)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gathered),
                            jax.tree.leaves(sliced)):
        if a.dtype == bool:
            np.testing.assert_array_equal(a, b)
        else:
            _close(b, a, tol, jax.tree_util.keystr(path))
    for leaf in jax.tree.leaves(sliced[3]):  # padding rows stay zero
        if leaf.shape == head.table_shape:
            np.testing.assert_array_equal(leaf[classes:], 0)
