"""Contrastive SSL: the losses against float64 NumPy, on 1 and 8 devices; the two
views; pre-training, resuming it, starting Partial FC from it; the diagnostics."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pfc_jax import diagnose, ssl, train
from pfc_jax import mesh as mesh_lib
from pfc_jax.config import load_recipe
from pfc_jax.data.augment import AugmentConfig, augment, crop_window
from pfc_jax.data.pipeline import PipelineConfig, make_loader
from pfc_jax.data.synthetic import SyntheticFaces

ROOT = os.path.join(os.path.dirname(__file__), "..")
EPS32 = float(np.finfo(np.float32).eps)


# ------------------------------------------------------------- float64 references
def np_info_nce(za, zb, t, valid):
    """SimCLR's NT-Xent written the textbook way: z = [za; zb], positives i <-> i + N."""
    n = len(za)
    z = np.concatenate([za, zb]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    ok = np.concatenate([valid, valid])
    s = z @ z.T / t
    total, count = 0.0, 0
    for i in range(2 * n):
        if not ok[i]:
            continue
        pos = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i and ok[j]]
        total += -s[i, pos] + np.log(np.sum(np.exp(s[i, others])))
        count += 1
    return total / count


def np_barlow(za, zb, lam, valid):
    a, b = za[valid].astype(np.float64), zb[valid].astype(np.float64)
    a = (a - a.mean(0)) / np.sqrt(a.var(0) + ssl.BN_EPS)
    b = (b - b.mean(0)) / np.sqrt(b.var(0) + ssl.BN_EPS)
    c = a.T @ b / len(a)
    p = c.shape[0]
    return sum((1 - c[i, i]) ** 2 for i in range(p)) + lam * sum(
        c[i, j] ** 2 for i in range(p) for j in range(p) if i != j)


def np_grad(f, x, h=1e-6):
    """Central differences in float64: truncation ~h² f''' and rounding ~eps64 |f| / h,
    both under 1e-8 here."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


N, PDIM = 8, 5
RNG = np.random.default_rng(0)
ZA, ZB = RNG.normal(size=(N, PDIM)), RNG.normal(size=(N, PDIM))
VALID = np.array([True] * (N - 1) + [False])  # a corrupt record: in no term at all
CASES = {
    "infonce": (lambda a, b, v: ssl.info_nce(a, b, 0.2, v),
                lambda a, b, v: np_info_nce(a, b, 0.2, v), 1 / 0.2),
    "barlow": (lambda a, b, v: ssl.barlow_twins(a, b, 5e-3, v),
               lambda a, b, v: np_barlow(a, b, 5e-3, v), float(PDIM)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_gradients_equal_the_float64_reference(name):
    fn, ref, _ = CASES[name]
    with jax.enable_x64(True):
        loss, (ga, gb) = jax.value_and_grad(fn, argnums=(0, 1))(
            jnp.asarray(ZA), jnp.asarray(ZB), jnp.asarray(VALID))
        np.testing.assert_allclose(float(loss), ref(ZA, ZB, VALID), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(ga), np_grad(lambda a: ref(a, ZB, VALID), ZA),
                                   atol=1e-7)
        np.testing.assert_allclose(np.asarray(gb), np_grad(lambda b: ref(ZA, b, VALID), ZB),
                                   atol=1e-7)
    # the invalid row receives no gradient
    assert np.all(np.asarray(ga)[~VALID] == 0) and np.all(np.asarray(gb)[~VALID] == 0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_8_devices_give_the_1_device_loss_global_negatives_and_statistics(name):
    """The batch split over 8 devices (one row each): every row still sees all the
    others. Per-device negatives or statistics would change the loss by O(1)."""
    fn, ref, scale = CASES[name]
    mesh = mesh_lib.make_mesh({"data": 8})
    sh = NamedSharding(mesh, P("data"))
    za, zb = ZA.astype(np.float32), ZB.astype(np.float32)
    vg = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    one = vg(jnp.asarray(za), jnp.asarray(zb), jnp.asarray(VALID))
    eight = vg(jax.device_put(za, sh), jax.device_put(zb, sh), jax.device_put(VALID, sh))
    assert eight[1][0].sharding.is_equivalent_to(sh, 2)
    # float32 sums of N * PDIM terms of magnitude <= scale, in another order
    tol = 4 * N * PDIM * EPS32 * scale
    np.testing.assert_allclose(float(eight[0]), float(one[0]), atol=tol)
    np.testing.assert_allclose(float(one[0]), ref(ZA, ZB, VALID), atol=tol)
    for a, b in zip(eight[1], one[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol)


def test_interleave_is_undone_and_keeps_rows_on_their_device():
    mesh = mesh_lib.make_mesh({"data": 8})
    sh = NamedSharding(mesh, P("data"))
    a = jax.device_put(np.arange(16.0).reshape(16, 1), sh)
    b = jax.device_put(-np.arange(16.0).reshape(16, 1), sh)
    x = jax.jit(ssl.interleave)(a, b)
    np.testing.assert_array_equal(np.asarray(x)[:4, 0], [0, 0, 1, -1])
    ra, rb = jax.jit(ssl.deinterleave)(x)
    np.testing.assert_array_equal(np.asarray(ra), np.asarray(a))
    np.testing.assert_array_equal(np.asarray(rb), np.asarray(b))
    # device 0 holds records 0 and 1 of each view: their four interleaved rows
    shard = x.addressable_shards[0]
    np.testing.assert_array_equal(np.asarray(shard.data)[:, 0], [0, 0, 1, -1])


# ------------------------------------------------------------------------- views
def test_crop_window_hand_cases():
    cfg = AugmentConfig(crop_prob=1.0, crop_scale=(0.25, 1.0), crop_ratio=(1.0, 1.0))
    assert crop_window(112, 112, cfg, np.array([0.0, 0.5, 0.0, 0.0])) == (0, 0, 56, 56)
    assert crop_window(112, 112, cfg, np.array([0.0, 0.5, 0.999, 0.999])) == (56, 56, 56, 56)
    assert crop_window(112, 112, cfg, np.array([1.0, 0.5, 0.3, 0.7])) == (0, 0, 112, 112)
    wide = AugmentConfig(crop_prob=1.0, crop_scale=(0.5, 0.5), crop_ratio=(4.0, 4.0))
    top, left, h, w = crop_window(100, 100, wide, np.array([0.0, 0.0, 0.5, 0.5]))
    assert (h, w) == (35, 100)  # sqrt(5000 * 4) = 141 wide: clipped to the image


def test_two_views_differ_are_reproducible_and_the_first_is_the_one_view_stream():
    src = SyntheticFaces(8, 4, seed=3)
    aug = AugmentConfig(**{k: v for k, v in ssl.view_augmentation(1.0).items()})
    two = PipelineConfig(global_batch=8, seed=5, augment=aug, views=2)
    b1 = make_loader(src, two).batch(1)
    b2 = make_loader(src, two).batch(1)
    one = make_loader(src, PipelineConfig(global_batch=8, seed=5, augment=aug)).batch(1)
    np.testing.assert_array_equal(b1["image2"], b2["image2"])
    np.testing.assert_array_equal(b1["image"], one["image"])
    assert "image2" not in one
    differ = [not np.array_equal(a, b) for a, b in zip(b1["image"], b1["image2"])]
    assert all(differ)
    # a different seed draws different second views
    other = make_loader(src, PipelineConfig(global_batch=8, seed=6, augment=aug, views=2))
    assert not np.array_equal(other.batch(1)["image2"], b1["image2"])


def test_a_one_view_iterator_state_does_not_resume_a_two_view_stream():
    src = SyntheticFaces(8, 4, seed=3)
    it = iter(make_loader(src, PipelineConfig(global_batch=8, views=2)))
    next(it)
    one = iter(make_loader(src, PipelineConfig(global_batch=8)))
    with pytest.raises(ValueError, match="views is 2 in the state but None"):
        one.set_state(it.get_state())


# ------------------------------------------------------------------ trainer runs
SMALL = {"max_steps": 6, "checkpoint.every_steps": 3, "log_every_steps": 1,
         "eval.every_steps": 0, "batch_size": 16, "data.synthetic_identities": 64,
         "data.synthetic_images_per_identity": 4, "data.num_images": 256,
         "ssl.projector": (64, 32)}


def _ssl_config(**kw):
    return load_recipe(os.path.join(ROOT, "configs", "ssl.py"), "tiny", {**SMALL, **kw})


def _losses(workdir):
    from pfc_jax.plots import read_metrics
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ssl") / "straight")
    last = train.train_and_evaluate(_ssl_config(), workdir)
    return workdir, last


def test_pretraining_runs_without_a_head_and_lowers_the_loss(pretrained):
    workdir, last = pretrained
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, 7))
    assert "num_bad_labels" not in last and "top1" not in last
    assert last["ssl_loss"] == last["loss"]
    # 2N = 32 projections: chance is log(31); the run learns something
    assert losses[1] > losses[6] and losses[1] == pytest.approx(np.log(31), rel=0.3)


def test_a_resumed_pretraining_continues_exactly(pretrained, tmp_path):
    workdir, _ = pretrained
    resumed = str(tmp_path / "resumed")
    train.train_and_evaluate(_ssl_config(), resumed, stop_after=3)
    train.train_and_evaluate(_ssl_config(), resumed)
    a, b = _losses(workdir), _losses(resumed)
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]


def test_8_device_step_equals_the_1_device_step():
    """A train step of the same global batch on 8 devices and on 1: the loss (global
    negatives) and the projector's BN statistics (global moments) agree."""
    out = {}
    for n in (8, 1):
        cfg = _ssl_config(mesh_devices=n)
        trainer = train.Trainer(cfg, train.make_mesh(cfg))
        state = trainer.init(trainer.base_key)
        host = train.make_loader(cfg, train.build_source(cfg)).batch(0)
        batch = mesh_lib.host_local_to_global(
            {k: host[k] for k in train.batch_keys(cfg)}, trainer.mesh)
        state, metrics = trainer.train_step(state, batch)
        out[n] = (float(metrics["loss"]), jax.device_get(state.ssl.batch_stats))
    # float32 reductions in another order: 32 rows of logits up to 1 / t = 10
    np.testing.assert_allclose(out[8][0], out[1][0], atol=64 * EPS32 * 10 * 32)
    for a, b in zip(jax.tree.leaves(out[8][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_partial_fc_starts_from_the_pretraining_workdir_with_an_aux_loss(pretrained, tmp_path):
    workdir, _ = pretrained
    cfg = load_recipe(os.path.join(ROOT, "configs", "tiny_cpu.py"), "test", {
        "init_from": workdir, "ssl.mode": "aux", "ssl.weight": 0.5,
        "ssl.projector": (64, 32), "optimizer.lr": 0.0, "optimizer.weight_decay": 0.0})
    out = str(tmp_path / "pfc")
    last = train.train_and_evaluate(cfg, out)
    assert last["loss"] == pytest.approx(last["head_loss"] + 0.5 * last["ssl_loss"], rel=1e-6)
    assert last["num_bad_labels"] == 0
    from pfc_jax import export
    _, ssl_vars, _ = export.restore_backbone(workdir)
    _, pfc_vars, _ = export.restore_backbone(out)
    for a, b in zip(jax.tree.leaves(ssl_vars["params"]), jax.tree.leaves(pfc_vars["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # lr 0: unchanged


def test_diagnose_command_on_the_pretrained_workdir(pretrained, tmp_path):
    workdir, _ = pretrained
    out = tmp_path / "r.json"
    report = diagnose.main(["--workdir", workdir, "--data", "synthetic", "--max-classes",
                            "12", "--views", "3", "--json", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["num_classes"] == 12 and report["views"] == 3
    assert 0 <= report["alignment"] <= 4 and 0 <= report["knn_top1"] <= 1
    assert -1 <= report["divergence_mean"] <= report["divergence_max"] <= 1
    c = report["concentration"]
    assert c["1"]["one_minus_sigma"] <= c["0.5"]["one_minus_sigma"]  # monotone in delta
    assert report["augment"]["crop_prob"] == 1.0  # the run's configured views


# ------------------------------------------------------------------- diagnostics
def _hand_made(theta_a=0.3, theta_b=0.5):
    """Two classes of three images, two views each, in R^6 (module docstring of
    diagnose): class A = two core images (views cos t e0 +- sin t e4) and an outlier
    (cos t e1 +- sin t e4); class B likewise on e1 / e2 with e5 and angle t_b."""
    e = np.eye(6)
    views, labels, clean = [], [], []
    for t, core, outlier, side, label, clean_out in (
            (theta_a, e[0], e[1], e[4], 0, (e[1] + e[3]) / np.sqrt(2)),
            (theta_b, e[1], e[2], e[5], 1, (e[2] + 0.5 * e[1]) / np.linalg.norm(
                e[2] + 0.5 * e[1]))):
        for centre, c in ((core, core), (core, core), (outlier, clean_out)):
            views.append([np.cos(t) * centre + np.sin(t) * side,
                          np.cos(t) * centre - np.sin(t) * side])
            labels.append(label)
            clean.append(c)
    return np.array(views), np.array(labels), np.array(clean)


@pytest.mark.parametrize("blocks", [{}, {"row_block": 1, "elements_per_chunk": 1},
                                    {"row_block": 4, "mesh": 1}])
def test_diagnostics_of_a_hand_made_set_equal_their_closed_forms(blocks):
    """On 8 devices (classes, centres and images padded to a multiple of 8), in
    one-row Gram blocks and one-class chunks, and on one device."""
    if blocks.get("mesh") == 1:
        blocks = dict(blocks, mesh=mesh_lib.make_mesh({"data": 1}, jax.devices()[:1]))
    ta, tb = 0.3, 0.5
    views, labels, clean = _hand_made(ta, tb)
    d_a, d_b = np.sqrt(2) * np.cos(ta), np.sqrt(2) * np.cos(tb)  # core <-> outlier d_A
    assert d_b < d_a
    deltas = (0.5 * d_b, 0.5 * (d_a + d_b), 1.01 * d_a)
    r = diagnose.diagnostics(views, labels, deltas, clean, **blocks)
    tol = 1e-6  # float32 dot products of unit vectors in R^6
    assert r["alignment"] == pytest.approx(2 * (np.sin(ta) ** 2 + np.sin(tb) ** 2), abs=tol)
    # mu_A = cos ta (2 e0 + e1) / 3, mu_B = cos tb (2 e1 + e2) / 3
    assert r["divergence_max"] == pytest.approx(2 * np.cos(ta) * np.cos(tb) / 9, abs=tol)
    assert r["divergence_mean"] == pytest.approx(2 * np.cos(ta) * np.cos(tb) / 9, abs=tol)
    assert r["one_minus_min_centre_norm2"] == pytest.approx(1 - 5 * np.cos(tb) ** 2 / 9,
                                                            abs=tol)
    got = [(c["one_minus_sigma"], c["mean_one_minus_sigma"])
           for c in r["concentration"].values()]
    np.testing.assert_allclose(got, [(1 / 3, 1 / 3), (1 / 3, 1 / 6), (0, 0)], atol=tol)
    assert r["knn_top1"] == pytest.approx(5 / 6)  # A's outlier looks like B's core


def test_diagnostics_reject_what_they_cannot_measure():
    views, labels, _ = _hand_made()
    with pytest.raises(ValueError, match="V >= 2"):
        diagnose.diagnostics(views[:, :1], labels)
    with pytest.raises(ValueError, match="1 class"):
        diagnose.diagnostics(views, np.zeros_like(labels))


def test_bad_ssl_configs_are_explained():
    from pfc_jax.config import validate
    for overrides, match in (({"ssl.mode": "simclr"}, "ssl.mode 'simclr'"),
                             ({"ssl.loss": "byol"}, "ssl.loss 'byol'"),
                             ({"ssl.temperature": 0.0}, "ssl.temperature"),
                             ({"ssl.projector": (64, 0)}, "ssl.projector")):
        with pytest.raises(ValueError, match=match):
            validate(_ssl_config(**overrides), 8)
    aux = load_recipe(os.path.join(ROOT, "configs", "tiny_cpu.py"), "test",
                      {"ssl.mode": "aux", "grad_accum_steps": 2})
    with pytest.raises(ValueError, match="grad_accum_steps = 1"):
        validate(aux, 8)
    validate(_ssl_config(), 8)  # pre-training needs no head.num_classes
    assert _ssl_config().head.num_classes is None
    with pytest.raises(ValueError, match="unknown argument 'big'"):
        load_recipe(os.path.join(ROOT, "configs", "ssl.py"), "tiny,big")
