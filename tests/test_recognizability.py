"""Recognizability: the index and index diversion against float64 NumPy on 1 and 8
devices, the UI centre (EMA, checkpoint), the quality head's stop-gradient target,
perceptibility attention, degradations, error versus discard, the commands."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pfc_jax import mesh as mesh_lib
from pfc_jax import models
from pfc_jax import partial_fc as pf
from pfc_jax import recognizability as rec
from pfc_jax import train
from pfc_jax.config import load_recipe
from pfc_jax.data.degrade import Degradation, degrade
from pfc_jax.evaluate import quality
from pfc_jax.evaluate import verification

ROOT = os.path.join(os.path.dirname(__file__), "..")
EPS32 = float(np.finfo(np.float32).eps)
C, D, B = 301, 16, 16  # 8 shards of 38 rows: 16 of them sampled, a proper subset


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _head_stats(mesh, x, y, table, sample_rate):
    cfg = pf.HeadConfig(num_classes=C, embedding_dim=D, scale=16.0, sample_rate=sample_rate)
    head = pf.PartialFC(cfg, mesh, optax.sgd(0.1))
    w = np.zeros(head.table_shape, np.float32)
    w[:C] = table
    centers = jax.device_put(w, head.table_sharding)

    @jax.jit
    def f(centers, x, y, key):
        idx, rows = head.sample_and_gather(centers, y, key)
        loss, stats, _, _ = head.grads(rows, idx, x, y)
        return stats, idx

    xs, ys = head.shard_batch(x, y)
    stats, idx = f(centers, xs, ys, jax.random.key(3))
    return jax.tree.map(np.asarray, stats), head.sampled_classes(np.asarray(idx))


@pytest.mark.parametrize("devices", [8, 1])
def test_index_and_diversion_equal_float64_with_the_nearest_sampled_negative(devices):
    """The head's nearest negative is the max over the *sampled* classes of every
    shard (a pmax); the index and the diversion loss built on it equal NumPy's."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, D)).astype(np.float32)
    y = rng.integers(0, C, B).astype(np.int32)
    table = rng.normal(size=(C, 1, D)).astype(np.float32)
    mesh = mesh_lib.make_mesh({"data": devices}, jax.devices()[:devices])
    stats, sampled = _head_stats(mesh, x, y, table, sample_rate=0.4)
    sampled = np.asarray(sampled)
    assert len(sampled) < C  # the nearest negative is over a proper subset

    f = _unit(x.astype(np.float64))
    w = _unit(table[:, 0].astype(np.float64))
    cos = f @ w.T
    target = cos[np.arange(B), y]
    neg = np.array([max(cos[i, j] for j in sampled if j != y[i]) for i in range(B)])
    np.testing.assert_allclose(stats["target_cos"], target, atol=8 * D * EPS32)
    np.testing.assert_allclose(stats["max_neg_cos"], neg, atol=8 * D * EPS32)

    u = _unit(f[:4].mean(0))  # a UI centre near some of the samples
    xi_ref = (np.arccos(f @ u) + np.arccos(neg) - np.arccos(target)) / np.pi
    xi = np.asarray(rec.index(jnp.asarray(f, jnp.float32), jnp.asarray(u, jnp.float32),
                              jnp.asarray(stats["target_cos"]),
                              jnp.asarray(stats["max_neg_cos"])))
    # cosines good to 8 D eps; arccos amplifies an error e by 1 / sqrt(1 - c^2)
    amp = sum(1 / np.sqrt(1 - np.clip(c, -1, 1) ** 2) for c in (f @ u, neg, target))
    np.testing.assert_array_less(np.abs(xi - xi_ref), 8 * D * EPS32 * amp / np.pi + 1e-7)

    valid = np.ones(B, bool)
    valid[-1] = False
    thr, tau = float(np.median(xi_ref)), 80.0
    hard = (xi_ref < thr) & valid
    ref = np.sum(hard * np.maximum(f @ u - np.cos(np.radians(tau)), 0)) / valid.sum()
    assert hard.sum() >= 3 and ref > 0
    got = rec.diversion_loss(jnp.asarray(f, jnp.float32), jnp.asarray(u, jnp.float32),
                             jnp.asarray(xi_ref), jnp.asarray(valid), tau, thr)
    np.testing.assert_allclose(float(got), ref, atol=8 * D * EPS32)


def test_diversion_gradient_equals_float64_finite_differences():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(6, 5))
    u = _unit(e[:2].mean(0))
    xi = np.array([0.1, 0.2, 0.9, 0.3, 0.8, 0.05])
    valid = np.array([True] * 5 + [False])

    def np_loss(e):
        f = _unit(e)
        hard = (xi < 0.5) & valid
        return np.sum(hard * np.maximum(f @ u - np.cos(np.radians(70.0)), 0)) / valid.sum()

    with jax.enable_x64(True):
        g = jax.grad(lambda e: rec.diversion_loss(rec._unit(e), jnp.asarray(u), jnp.asarray(xi),
                                                  jnp.asarray(valid), 70.0, 0.5))(jnp.asarray(e))
    num = np.zeros_like(e)
    for idx in np.ndindex(e.shape):  # central differences: error ~ h^2, far below 1e-7
        ep, em = e.copy(), e.copy()
        ep[idx] += 1e-6
        em[idx] -= 1e-6
        num[idx] = (np_loss(ep) - np_loss(em)) / 2e-6
    np.testing.assert_allclose(np.asarray(g), num, atol=1e-7)
    assert np.any(num != 0) and np.all(num[~((xi < 0.5) & valid)] == 0)


def test_ui_centre_is_an_ema_of_mean_unit_embeddings():
    rng = np.random.default_rng(2)
    batches = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3)]
    c, s = jnp.zeros(4), jnp.zeros((), jnp.int32)
    ref = None
    for b in batches:
        c, s = rec.ema_centre(c, s, jnp.asarray(b), 0.9)
        mean = _unit(b.astype(np.float64)).mean(0)
        ref = mean if ref is None else 0.9 * ref + 0.1 * mean
        np.testing.assert_allclose(np.asarray(c), ref, atol=4 * EPS32)
    assert int(s) == 3


def test_quality_target_is_stop_gradient():
    """With the backbone gradient on (detach False) and no diversion, d loss / d emb is
    the smooth-L1 slope through the Dense head alone: the index is a constant target."""
    cfg = load_recipe(os.path.join(ROOT, "configs", "vlr.py"), "tiny").recognizability
    cfg.update(detach=False, diversion_weight=0.0, dropout=0.0)
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    branch = rec.RecognizabilityBranch(cfg, 8, optax.sgd(0.1), mesh)
    state = branch.init(jax.random.key(0))
    rng = np.random.default_rng(3)
    emb = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
    ui = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    stats = dict(target_cos=jnp.asarray(rng.uniform(0.2, 0.9, 6), jnp.float32),
                 max_neg_cos=jnp.asarray(rng.uniform(-0.2, 0.5, 6), jnp.float32),
                 label_ok=jnp.ones(6, bool))
    valid = jnp.ones(6, bool)
    loss, g_emb, _, centre, _, m = branch.loss_and_grads(state, emb, ui, stats, None, valid,
                                                        jax.random.key(1))
    k = np.asarray(state.params["fc"]["kernel"])[:, 0].astype(np.float64)
    b = float(np.asarray(state.params["fc"]["bias"])[0])
    e = np.asarray(emb, np.float64)
    u = _unit(_unit(np.asarray(ui, np.float64)).mean(0))
    xi = (np.arccos(_unit(e) @ u) + np.arccos(np.asarray(stats["max_neg_cos"], np.float64))
          - np.arccos(np.asarray(stats["target_cos"], np.float64))) / np.pi
    d = e @ k + b - xi
    slope = np.where(np.abs(d) < rec.SMOOTH_L1_BETA, d / rec.SMOOTH_L1_BETA, np.sign(d))
    np.testing.assert_allclose(np.asarray(g_emb), slope[:, None] * k[None] / 6, atol=1e-5)
    np.testing.assert_allclose(float(m["quality_loss"]), np.mean(
        np.where(np.abs(d) < 0.75, 0.5 * d * d / 0.75, np.abs(d) - 0.375)), rtol=1e-5)
    cfg.detach = True  # the default: nothing reaches the backbone
    detached = rec.RecognizabilityBranch(cfg, 8, optax.sgd(0.1), mesh)
    g = detached.loss_and_grads(state, emb, ui, stats, None, valid, jax.random.key(1))[1]
    assert np.all(np.asarray(g) == 0)


def test_ui_images_come_from_the_first_of_each_group_or_are_noise():
    colours = np.arange(16, dtype=np.uint8)[:, None, None, None] * 10 + 5
    images = jnp.asarray(np.broadcast_to(colours, (16, 112, 112, 3)))
    out = np.asarray(rec.ui_images(images, jax.random.key(0), every=4, side=3,
                                   noise_fraction=0.5))
    assert out.shape == (4, 112, 112, 3) and out.min() >= 0 and out.max() <= 255
    for j in range(2):  # faces: a constant image stays constant through any resize
        np.testing.assert_allclose(out[j], colours[4 * j, 0, 0, 0], atol=1e-3)
    for j in range(2, 4):  # noise
        assert out[j].std() > 10


# ------------------------------------------------------------------ attention
def test_attention_map_has_the_feature_map_shape_sums_to_one_and_starts_as_identity():
    from pfc_jax.models.attention import attention_maps
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 112, 112, 3)), jnp.float32)
    # r_tiny: stem stride 2 (56), four stride-2 stages: 28, 14, 7, 4; mbf: 112 / 16 = 7
    with_att = models.get_model("r_tiny", 32, attention=True)
    plain = models.get_model("r_tiny", 32)
    v = with_att.init({"params": jax.random.key(0)}, x, train=False)
    a = np.asarray(attention_maps(with_att, v, x))
    assert a.shape == (2, 4, 4)
    np.testing.assert_allclose(a.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a, 1.0 / 16, rtol=1e-5)  # the zero-initialised score
    pv = {"params": {k: p for k, p in v["params"].items() if k != "attention"},
          "batch_stats": v.get("batch_stats", {})}
    np.testing.assert_allclose(np.asarray(with_att.apply(v, x)),
                               np.asarray(plain.apply(pv, x)), rtol=1e-4, atol=1e-4)
    mbf = models.get_model("mbf", 32, attention=True)  # shapes only: no compile
    shape = jax.eval_shape(lambda: attention_maps(
        mbf, mbf.init({"params": jax.random.key(0)}, x, train=False), x)).shape
    assert shape == (2, 7, 7)
    with pytest.raises(ValueError, match="no perceptibility attention"):
        models.get_model("vit_t", 32, attention=True)
    # the per-position gate: sigmoid(0) = 1/2 everywhere, times 2: the identity again
    sig = models.get_model("r_tiny", 32, attention=True, attention_gate="sigmoid")
    a = np.asarray(attention_maps(sig, v, x))
    assert a.shape == (2, 4, 4)
    np.testing.assert_allclose(a, 0.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sig.apply(v, x)), np.asarray(plain.apply(pv, x)),
                               rtol=1e-4, atol=1e-4)
    # a non-zero score: each position gated on its own, map in (0, 1), not summing to 1
    v2 = jax.tree.map(lambda t: t, v)
    v2["params"]["attention"]["score"]["bias"] = jnp.asarray([1.5])
    a2 = np.asarray(attention_maps(sig, v2, x))
    np.testing.assert_allclose(a2, 1 / (1 + np.exp(-1.5)), rtol=1e-6)
    with pytest.raises(ValueError, match="attention_gate must be one of"):
        models.get_model("r_tiny", 32, attention=True, attention_gate="relu")


# --------------------------------------------------------------- degradations
def test_degradation_is_deterministic_and_a_fixed_side_is_degrade():
    img = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    fixed = Degradation(prob=1.0, sides=(16, 16))
    np.testing.assert_array_equal(fixed(img, np.random.default_rng(5)), degrade(img, 16))
    varied = Degradation(prob=1.0, sides=(8, 32), blur_prob=0.5, jpeg_prob=0.5)
    a = varied(img, np.random.default_rng([1, 2]))
    np.testing.assert_array_equal(a, varied(img, np.random.default_rng([1, 2])))
    np.testing.assert_array_equal(Degradation()(img, np.random.default_rng(0)), img)
    # a 16 px face keeps its colour but loses its detail
    d = degrade(img, 16).astype(float)
    assert abs(d.mean() - img.mean()) < 3 and d.std() < 0.5 * img.std()
    with pytest.raises(ValueError, match="Degradation.sides"):
        Degradation(sides=(0, 8))


# ------------------------------------------------------------- error vs discard
def test_error_vs_discard_of_a_hand_made_case():
    sim = np.array([0.9, 0.1, 0.15, 0.3, 0.5, 0.2, 0.1, 0.05])
    same = np.array([1, 0, 1, 0, 1, 0, 1, 0], bool)
    q = np.array([0.8, 0.5, 0.1, 0.5, 0.6, 0.5, 0.3, 0.5])
    c = quality.error_vs_discard(sim, same, q, fmr=0.25, fractions=(0, 0.25, 0.5, 0.75))
    # impostors 0.3 0.2 0.1 0.05: k = 1 -> t = 0.2; genuine misses: 0.15 and 0.1
    assert c["threshold"] == 0.2
    np.testing.assert_allclose(c["fnmr"], [0.5, 1 / 3, 0.0, 0.0])
    np.testing.assert_allclose(c["area"], (0.5 + 1 / 3) / 2 * 0.25 + (1 / 3) / 2 * 0.25)
    np.testing.assert_array_equal(quality.pair_quality(np.array([1, 2, 5, 3.0])), [1, 3])


def test_error_vs_discard_equals_a_direct_numpy_count():
    rng = np.random.default_rng(4)
    n = 400
    same = rng.random(n) < 0.5
    sim = np.where(same, rng.normal(0.5, 0.2, n), rng.normal(0.0, 0.2, n))
    q = rng.random(n)
    fr = (0.0, 0.1, 0.3)
    c = quality.error_vs_discard(sim, same, q, fmr=0.05, fractions=fr)
    imp = np.sort(sim[~same])
    t = imp[len(imp) - 1 - int(0.05 * len(imp))]
    assert np.mean(sim[~same] > t) <= 0.05
    for x, got in zip(fr, c["fnmr"]):
        g = np.flatnonzero(same)
        keep = g[np.argsort(q[g], kind="stable")][int(x * len(g)):]
        assert got == pytest.approx(np.mean(sim[keep] <= t))


# ------------------------------------------------------------------- trainer
SMALL = {"max_steps": 4, "checkpoint.every_steps": 2, "log_every_steps": 1,
         "eval.every_steps": 0, "batch_size": 16, "data.synthetic_identities": 64,
         "head.num_classes": 64, "data.synthetic_images_per_identity": 4,
         "data.num_images": 256, "recognizability.ui_every": 2}


def _vlr_config(**kw):
    return load_recipe(os.path.join(ROOT, "configs", "vlr.py"), "tiny", {**SMALL, **kw})


def _losses(workdir):
    from pfc_jax.plots import read_metrics
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def vlr_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("vlr") / "straight")
    last = train.train_and_evaluate(_vlr_config(), workdir)
    return workdir, last


def test_a_resumed_run_continues_exactly_with_its_ui_centre(vlr_run, tmp_path):
    workdir, last = vlr_run
    assert last["loss"] == pytest.approx(
        last["head_loss"] + last["diversion_loss"] + last["quality_loss"], rel=1e-5)
    resumed = str(tmp_path / "resumed")
    train.train_and_evaluate(_vlr_config(), resumed, stop_after=2)
    from pfc_jax import export
    mid = export.restore_quality(resumed)["ui_centre"]
    train.train_and_evaluate(_vlr_config(), resumed)
    a, b = _losses(workdir), _losses(resumed)
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]
    end_a = export.restore_quality(workdir)["ui_centre"]
    end_b = export.restore_quality(resumed)["ui_centre"]
    np.testing.assert_array_equal(np.asarray(end_a), np.asarray(end_b))
    assert not np.array_equal(np.asarray(mid), np.asarray(end_b))  # it moved after step 2


def test_eval_lowres_quality_and_heat_maps_from_the_run(vlr_run, tmp_path):
    from pfc_jax import export
    from pfc_jax.data.synthetic import SyntheticFaces
    from pfc_jax.evaluate.__main__ import main as eval_main
    from pfc_jax.heatmap import main as heat_main
    workdir, _ = vlr_run
    images, issame = SyntheticFaces(20, 4, seed=9, identity_offset=64).verification_pairs(
        40, seed=1)
    path = str(tmp_path / "pairs.bin")
    verification.write_bin(path, images, issame)
    out = eval_main(["--workdir", workdir, "--bin", path, "--lowres", "16", "--quality",
                     "--fmr", "0.1", "--edc", str(tmp_path / "edc")])
    assert set(out) == {"pairs", "pairs@16px"}
    curves = out["pairs@16px"]["error_vs_discard"]
    assert set(curves) == {"learned", "norm", "random"}
    assert os.path.exists(tmp_path / "edc" / "edc_pairs@16px.png")
    # the export carries the quality head and the attention flag
    model_dir = str(tmp_path / "model")
    export.export_backbone(workdir, model_dir)
    meta = json.load(open(os.path.join(model_dir, "model.json")))
    assert meta["attention"] is True and meta["quality"]["file"] == export.QUALITY_FILE
    q1, q2 = export.load_quality(workdir), export.load_quality(model_dir)
    for a, b in zip(jax.tree.leaves(q1), jax.tree.leaves(q2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # heat maps: one PNG per image, maps equal the model's own
    folder = tmp_path / "faces"
    folder.mkdir()
    from PIL import Image
    for i in range(3):
        Image.fromarray(images[i]).save(folder / f"f{i}.png")
    heat_main(["--model", model_dir, "--images", str(folder), "--out", str(tmp_path / "heat")])
    maps = np.load(tmp_path / "heat" / "maps.npy")
    assert maps.shape == (3, 4, 4) and os.path.exists(tmp_path / "heat" / "f0.png")
    from pfc_jax.data.augment import normalize
    from pfc_jax.models.attention import attention_maps
    model, variables = export.load_backbone(model_dir)
    want = attention_maps(model, variables, normalize(images[:3]))
    np.testing.assert_allclose(maps, np.asarray(want), rtol=1e-5, atol=1e-7)
