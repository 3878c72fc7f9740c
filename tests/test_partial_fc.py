"""The sharded head against the float64 reference, across meshes and options."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats as sps

from pfc_jax import mesh as mesh_lib
from pfc_jax import partial_fc as pf
from reference import head_loss

C, D, B = 37, 16, 16  # 37 classes on 8 shards: Cl = 5, 3 padding rows


def _make(mesh=None, head_axes=None, **overrides):
    cfg = pf.HeadConfig(**{**dict(num_classes=C, embedding_dim=D, scale=16.0), **overrides})
    return pf.PartialFC(cfg, mesh or mesh_lib.make_mesh(), optax.sgd(0.1), head_axes)


def _inputs(seed=0, n=B, d=D, classes=C, spread=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    return x, y


def _centers(head, seed=1, std=1.0):
    """A well-spread table (larger than init's) so margins and filtering matter."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=head.table_shape).astype(np.float32) * std
    w[head.config.num_classes:] = 0
    return jax.device_put(w, head.table_sharding)


def _run(head, centers, x, y, rng):
    @jax.jit
    def f(centers, x, y, rng):
        idx, rows = head.sample_and_gather(centers, y, rng)
        return (*head.grads(rows, idx, x, y), idx)

    xs, ys = head.shard_batch(x, y)
    loss, stats, g_rows, g_emb, idx = f(centers, xs, ys, rng)
    return (float(loss), jax.tree.map(np.asarray, stats), np.asarray(g_emb),
            np.asarray(g_rows), np.asarray(idx))


def _row_grads_by_class(head, idx, g_rows):
    """Maps per-shard slot gradients to {global class: grad}."""
    cl = head.local_classes
    idx = idx.reshape(head.num_shards, -1)
    g = g_rows.reshape(head.num_shards, idx.shape[1], *g_rows.shape[1:])
    out = {}
    for p in range(head.num_shards):
        for slot, i in enumerate(idx[p]):
            if i < cl:
                out[p * cl + int(i)] = g[p, slot]
            else:
                np.testing.assert_array_equal(g[p, slot], 0)
    return out


def _check_against_reference(head, centers, x, y, rng, tol=2e-5, grad_tol=None):
    cfg = head.config
    loss, stats, g_emb, g_rows, idx = _run(head, centers, x, y, rng)
    sampled = head.sampled_classes(idx)
    W = np.asarray(centers)[:cfg.num_classes]
    ref = head_loss(W, x, y, sampled, s=cfg.scale, margins=cfg.margins,
                    grad_mode=cfg.grad_mode, filter_threshold=cfg.filter_threshold,
                    filter_mode=cfg.filter_mode)
    grad_tol = grad_tol or tol
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, ref["loss"], rtol=tol, atol=tol)
    np.testing.assert_allclose(stats["loss"], ref["per_sample"], rtol=tol, atol=tol)
    np.testing.assert_allclose(stats["target_cos"], ref["target_cos"], atol=tol)
    np.testing.assert_allclose(stats["max_neg_cos"], ref["max_neg_cos"], atol=tol)
    scale = np.abs(ref["dX"]).max()
    np.testing.assert_allclose(g_emb, ref["dX"], atol=grad_tol * scale)
    by_class = _row_grads_by_class(head, idx, g_rows)
    assert sorted(by_class) == list(sampled)
    got = np.stack([by_class[c] for c in sampled])
    scale = np.abs(ref["dW"]).max()
    np.testing.assert_allclose(got, ref["dW"][sampled], atol=grad_tol * scale)
    return loss, ref, stats, sampled


CASES = {
    "arcface-exact-k1-r1": dict(),
    "arcface-st-k3-r03-mask": dict(grad_mode="straight_through", num_subcenters=3,
                                   sample_rate=0.3, filter_threshold=0.2),
    "cosface-k1-r0": dict(margins=(1.0, 0.0, 0.4), sample_rate=0.0),
    "combined-exact-k3-r03-zero": dict(margins=(0.9, 0.4, 0.15), num_subcenters=3,
                                       sample_rate=0.3, filter_threshold=0.2,
                                       filter_mode="zero"),
    "combined-st-k1-r1-mask": dict(margins=(0.9, 0.4, 0.15), grad_mode="straight_through",
                                   filter_threshold=0.2),
    "arcface-exact-k3-r0-zero": dict(num_subcenters=3, sample_rate=0.0,
                                     filter_threshold=0.2, filter_mode="zero"),
    "cosface-st-k1-r03": dict(margins=(1.0, 0.0, 0.4), grad_mode="straight_through",
                              sample_rate=0.3),
    "combined-exact-k1-r03-mask-many": dict(margins=(0.9, 0.4, 0.15), num_classes=203,
                                            sample_rate=0.3, filter_threshold=0.25),
}


@pytest.mark.parametrize("softmax", ["full", "blockwise"])
@pytest.mark.parametrize("name", list(CASES))
def test_head_matches_float64_reference(name, softmax):
    # Blocks of 2 columns: several blocks per shard, the last one clamped.
    head = _make(softmax=softmax, block_size=2, **CASES[name])
    x, y = _inputs(classes=head.config.num_classes)
    _check_against_reference(head, _centers(head), x, y, jax.random.key(3))


def test_bf16_matmul_close_to_reference():
    head = _make(matmul_dtype="bfloat16", num_subcenters=3, sample_rate=0.3)
    x, y = _inputs()
    _check_against_reference(head, _centers(head), x, y, jax.random.key(4), tol=2e-2,
                             grad_tol=5e-2)


def test_cosines_at_plus_minus_one_stay_finite():
    """Embeddings equal to their own centre (c = 1) or its negation (c = -1)."""
    head = _make(num_subcenters=1, margins=(0.9, 0.4, 0.15))
    centers = _centers(head)
    x, y = _inputs()
    W = np.asarray(centers)[:, 0]
    x = W[y].copy()
    x[::2] *= -1.0  # half at c = -1 against their own centre
    loss, stats, g_emb, g_rows, _ = _run(head, centers, x, y, jax.random.key(0))
    assert np.isfinite(loss) and np.all(np.isfinite(g_emb)) and np.all(np.isfinite(g_rows))
    np.testing.assert_allclose(stats["target_cos"][1::2], 1.0, atol=1e-5)
    np.testing.assert_allclose(stats["target_cos"][::2], -1.0, atol=1e-5)
    sampled = np.arange(C)
    ref = head_loss(W[:C, None], x, y, sampled, s=16.0, margins=(0.9, 0.4, 0.15))
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-4)
    for mode in ("straight_through",):
        head_st = _make(num_subcenters=1, margins=(1.0, 0.5, 0.0), grad_mode=mode)
        loss, _, g_emb, g_rows, _ = _run(head_st, centers, x, y, jax.random.key(0))
        assert np.isfinite(loss) and np.all(np.isfinite(g_emb)) and np.all(np.isfinite(g_rows))


def test_full_softmax_agrees_across_meshes():
    """r = 1 equals a full softmax over all C classes, on 1, 2, 4, 8 devices and 2x4."""
    x, y = _inputs()
    rng = np.random.default_rng(7)
    W = rng.normal(size=(C, 3, D)).astype(np.float32)
    ref = head_loss(W, x, y, np.arange(C), s=16.0, margins=(0.9, 0.4, 0.15))
    devices = jax.devices()
    layouts = [({"data": 1}, None), ({"data": 2}, None), ({"data": 4}, None),
               ({"data": 8}, None), ({"data": 2, "model": 4}, ("model",))]
    for shape, head_axes in layouts:
        n = int(np.prod(list(shape.values())))
        mesh = mesh_lib.make_mesh(shape, devices[:n])
        head = _make(mesh, head_axes, num_subcenters=3, margins=(0.9, 0.4, 0.15))
        padded = np.zeros(head.table_shape, np.float32)
        padded[:C] = W
        centers = jax.device_put(padded, head.table_sharding)
        loss, stats, g_emb, g_rows, idx = _run(head, centers, x, y, jax.random.key(0))
        assert head.sampled_classes(idx).tolist() == list(range(C)), shape
        np.testing.assert_allclose(loss, ref["loss"], rtol=2e-5, err_msg=str(shape))
        np.testing.assert_allclose(g_emb, ref["dX"], atol=2e-5 * np.abs(ref["dX"]).max(),
                                   err_msg=str(shape))
        by_class = _row_grads_by_class(head, idx, g_rows)
        got = np.stack([by_class[c] for c in range(C)])
        np.testing.assert_allclose(got, ref["dW"], atol=2e-5 * np.abs(ref["dW"]).max(),
                                   err_msg=str(shape))


def test_replicated_head_groups_match_reference_with_sampling():
    """Head over 'model' only on a 2x4 mesh, r < 1: groups share one sampled set."""
    mesh = mesh_lib.make_mesh({"data": 2, "model": 4})
    head = _make(mesh, ("model",), num_classes=203, sample_rate=0.3, num_subcenters=3)
    x, y = _inputs(classes=203)
    _check_against_reference(head, _centers(head), x, y, jax.random.key(5))


@pytest.mark.parametrize("r,expected", [(1.0, 26), (0.3, 8), (0.0, 8), (0.1, 8), (0.9, 24)])
def test_num_sampled(r, expected):
    # Cl = ceil(203 / 8) = 26; B = 8 -> lower bound min(8, 26) = 8.
    assert pf.num_sampled(r, 26, 8) == expected
    assert pf.num_sampled(0.1, 1000, 16) == 100
    assert pf.num_sampled(0.1, 1000, 512) == 512
    assert pf.num_sampled(0.1, 100, 512) == 100


@pytest.mark.parametrize("sampler", pf.SAMPLERS)
def test_sampling_properties_and_uniformity(sampler):
    classes, batch, steps = 203, 8, 3000
    head = _make(num_classes=classes, sample_rate=0.3, sampler=sampler)
    cl, ns = head.local_classes, head.num_sampled(batch)
    assert (cl, ns) == (26, 8)
    # Labels with a repeat; shard 7 holds only 203 - 182 = 21 real classes.
    y = np.array([3, 3, 30, 57, 58, 190, 202, 100], np.int32)
    ys = jax.device_put(y, mesh_lib.batch_sharding(head.mesh))
    keys = jax.random.split(jax.random.key(11), steps)
    idx = np.asarray(jax.jit(jax.vmap(head.sample, in_axes=(None, 0)))(ys, keys))
    idx = idx.reshape(steps, head.num_shards, ns)
    positives = set(y.tolist())
    counts = np.zeros(head.padded_classes)
    for p in range(head.num_shards):
        n_valid = min(cl, classes - p * cl)
        shard_pos = {c - p * cl for c in positives if p * cl <= c < (p + 1) * cl}
        for s in range(steps):
            row = idx[s, p]
            used = row[row < cl]
            assert len(set(used.tolist())) == len(used), "duplicate class in a shard"
            assert np.all(used < n_valid), "padding row sampled"
            assert shard_pos <= set(used.tolist()), "positive missing"
            assert len(used) == min(ns, n_valid)
            assert np.all(np.diff(used) > 0)
            counts[p * cl + used] += 1
        negatives = np.array(sorted(set(range(n_valid)) - shard_pos)) + p * cl
        expected = steps * (ns - len(shard_pos)) / len(negatives)
        assert counts[negatives].sum() == pytest.approx(expected * len(negatives))
        pvalue = sps.chisquare(counts[negatives]).pvalue
        assert pvalue > 1e-3, (p, pvalue, counts[negatives])
    # Positives are drawn every step, exactly once.
    assert np.all(counts[sorted(positives)] == steps)


def test_positive_only_sampling_and_padding_shards():
    """r = 0: positives only. 10 classes on 8 shards: shards 5-7 hold no class."""
    head = _make(num_classes=10, sample_rate=0.0)
    assert head.local_classes == 2
    y = np.array([0, 0, 3, 9, 9, 4, 1, 3], np.int32)
    ys = jax.device_put(y, mesh_lib.batch_sharding(head.mesh))
    idx = np.asarray(jax.jit(head.sample)(ys, jax.random.key(0)))
    assert head.sampled_classes(idx).tolist() == sorted(set(y.tolist()))


def test_sampling_is_reproducible_and_varies_with_rng():
    head = _make(num_classes=203, sample_rate=0.3)
    y = jax.device_put(np.arange(8, dtype=np.int32) * 25, mesh_lib.batch_sharding(head.mesh))
    f = jax.jit(head.sample)
    a, b = np.asarray(f(y, jax.random.key(1))), np.asarray(f(y, jax.random.key(1)))
    c = np.asarray(f(y, jax.random.key(2)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_select_uniform_handles_extremes():
    eligible = jnp.array([True, False, True, True, False, True])
    key = jax.random.key(0)
    f = jax.jit(pf.select_uniform)
    assert not np.any(np.asarray(f(eligible, 0, key)))
    np.testing.assert_array_equal(f(eligible, 4, key), eligible)
    np.testing.assert_array_equal(f(eligible, 99, key), eligible)
    got = np.asarray(f(eligible, 2, key))
    assert got.sum() == 2 and np.all(np.asarray(eligible)[got])


def test_out_of_range_labels_are_reported_and_not_trained():
    head = _make(sample_rate=0.3)
    centers = _centers(head)
    x, y = _inputs()
    bad = y.copy()
    bad[[2, 9]] = [C, -1]  # C lands in a padding row's range; -1 is nowhere
    loss, stats, g_emb, _, idx = _run(head, centers, x, bad, jax.random.key(0))
    np.testing.assert_array_equal(stats["label_ok"], (bad >= 0) & (bad < C))
    assert stats["loss"][2] == 0 and stats["loss"][9] == 0
    np.testing.assert_array_equal(g_emb[[2, 9]], 0)
    assert np.all(head.sampled_classes(idx) < C)
    ref = head_loss(np.asarray(centers)[:C], x, bad, head.sampled_classes(idx), s=16.0)
    np.testing.assert_allclose(loss, ref["loss"], rtol=2e-5)


@pytest.mark.parametrize("field,value,match", [
    ("num_classes", 0, "num_classes"),
    ("num_classes", 2**31, "int32"),
    ("num_subcenters", 0, "num_subcenters"),
    ("sample_rate", 1.5, "sample_rate"),
    ("sample_rate", -0.1, "sample_rate"),
    ("scale", 0.0, "scale"),
    ("scale", -64.0, "scale"),
    ("grad_mode", "fast", "grad_mode"),
    ("filter_mode", "drop", "filter_mode"),
    ("margins", (1.0, 4.0, 0.0), "m2"),
    ("softmax", "chunked", "softmax"),
    ("block_size", -1, "block_size"),
    ("logits_budget_mib", 0.0, "logits_budget_mib"),
    ("cosine_stash_mib", -1.0, "cosine_stash_mib"),
    ("block_budget_mib", -1.0, "block_budget_mib"),
])
def test_bad_config_is_rejected_before_compiling(field, value, match):
    with pytest.raises(ValueError, match=match):
        _make(**{field: value})


def test_bad_batch_is_rejected_before_compiling():
    head = _make()
    state = head.init(jax.random.key(0))
    x, y = _inputs(n=12)  # 12 is not divisible by 8 devices
    with pytest.raises(ValueError, match="not divisible by the 8"):
        head.step(state, x, y, jax.random.key(0))
    x, y = _inputs(n=16, d=D + 1)
    with pytest.raises(ValueError, match="embeddings must be"):
        head.step(state, x, y, jax.random.key(0))


def test_init_is_sharded_padded_and_mesh_independent():
    head8 = _make(num_subcenters=3)
    head2 = _make(mesh_lib.make_mesh({"data": 2}, jax.devices()[:2]), num_subcenters=3)
    a = head8.init(jax.random.key(42)).centers
    b = head2.init(jax.random.key(42)).centers
    assert a.shape == (40, 3, D) and b.shape == (38, 3, D)
    assert a.sharding.spec == jax.sharding.PartitionSpec(("data",))
    assert {s.data.shape for s in a.addressable_shards} == {(5, 3, D)}
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_array_equal(a[:C], b[:C])
    assert np.all(a[C:] == 0) and np.all(b[C:] == 0)
    assert 0.008 < a[:C].std() < 0.012


def test_init_never_builds_the_whole_table_on_one_device():
    """The jitted init's per-device buffers hold one shard, not the whole table."""
    head = _make(num_classes=8000, embedding_dim=64)
    full = 4 * head.padded_classes * 64
    compiled = head._init.lower(jax.random.key(0)).compile()
    ma = compiled.memory_analysis()
    per_device = ma.output_size_in_bytes + ma.temp_size_in_bytes
    assert ma.output_size_in_bytes <= full // 8 + 1024
    # The random bits and their float conversion need a few shard-sized
    # temporaries; a whole-table intermediate would need 8 shards.
    assert per_device <= 5 * (full // 8), (per_device, full)


def test_explicit_padding_keeps_results_and_is_validated():
    """A 40-row table (8 shards x 5) used on 4 shards with 10 rows each."""
    x, y = _inputs()
    mesh4 = mesh_lib.make_mesh({"data": 4}, jax.devices()[:4])
    cfg = pf.HeadConfig(num_classes=C, embedding_dim=D, scale=16.0, sample_rate=0.3)
    head = pf.PartialFC(cfg, mesh4, optax.sgd(0.1), padded_classes=48)
    assert (head.local_classes, head.padded_classes) == (12, 48)
    _check_against_reference(head, _centers(head), x, y, jax.random.key(9))
    with pytest.raises(ValueError, match="multiple of the 4 head shards"):
        pf.PartialFC(cfg, mesh4, optax.sgd(0.1), padded_classes=42)
    with pytest.raises(ValueError, match=">= num_classes"):
        pf.PartialFC(cfg, mesh4, optax.sgd(0.1), padded_classes=36)
