"""Inversion: the BatchNorm prior against float64 NumPy, its fixed point and
gradient, and inversion of a tiny trained model through ``pfc-invert``."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pfc_jax import invert
from pfc_jax import mesh as mesh_lib
from pfc_jax import models

EPS1, EPS2 = 1e-5, 1e-3


class BnDenseBn(nn.Module):
    """BN -> Dense -> BN on [N, F]: small enough for a NumPy reference."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.BatchNorm(use_running_average=not train, epsilon=EPS1, name="bn1")(x)
        x = nn.Dense(4, name="fc")(x)
        return nn.BatchNorm(use_running_average=not train, epsilon=EPS2, name="bn2")(x)


def _bn_dense_bn(seed=0):
    rng = np.random.default_rng(seed)
    model = BnDenseBn()
    v = model.init(jax.random.key(seed), jnp.zeros((1, 3)))
    v = jax.tree.map(lambda a: np.asarray(a, np.float64), v)
    v["params"]["bn1"]["scale"] = rng.uniform(0.5, 2.0, 3)
    v["params"]["bn1"]["bias"] = rng.normal(size=3)
    v["params"]["fc"]["kernel"] = rng.normal(size=(3, 4))
    v["params"]["fc"]["bias"] = rng.normal(size=4)
    for name, f in (("bn1", 3), ("bn2", 4)):
        v["batch_stats"][name]["mean"] = rng.normal(size=f)
        v["batch_stats"][name]["var"] = rng.uniform(0.2, 3.0, f)
    return model, v


def _numpy_prior(v, x):
    """Float64 reference: the two layers' terms, the model in inference form."""
    def term(h, stats, eps):
        mean, var = h.mean(0), h.var(0)
        return (np.sum((mean - stats["mean"]) ** 2)
                + np.sum((np.sqrt(var + eps) - np.sqrt(stats["var"] + eps)) ** 2))

    p, s = v["params"], v["batch_stats"]
    t1 = term(x, s["bn1"], EPS1)
    y = (x - s["bn1"]["mean"]) / np.sqrt(s["bn1"]["var"] + EPS1) * p["bn1"]["scale"] \
        + p["bn1"]["bias"]
    h2 = y @ p["fc"]["kernel"] + p["fc"]["bias"]
    return t1 + term(h2, s["bn2"], EPS2)


def test_bn_prior_equals_a_float64_numpy_computation_and_its_gradient_finite_differences():
    model, v = _bn_dense_bn()
    x = np.random.default_rng(1).normal(size=(6, 3)) * 1.5 + 0.3
    with jax.enable_x64(True):
        def prior(x):
            _, terms = invert.embed_with_bn_prior(model, v, x)
            assert len(terms) == 2  # one per BatchNorm layer, nothing else sown
            return sum(terms.values())

        got = float(prior(jnp.asarray(x)))
        grad = np.asarray(jax.grad(prior)(jnp.asarray(x)))
    want = _numpy_prior(v, x)
    # Both float64: the only difference is summation order (~1e-15 relative).
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # Central differences of the NumPy reference: truncation O(h^2 f''') with
    # h = 1e-5 on O(1) inputs, rounding eps64 * f / h ~ 1e-11; 1e-7 covers both.
    h = 1e-5
    fd = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        fd[idx] = (_numpy_prior(v, x + e) - _numpy_prior(v, x - e)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7 * np.abs(fd).max())


def _stats_interceptor(next_fun, args, kwargs, context):
    """Independent of invert's: sow each BN input's batch mean and variance."""
    m = context.module
    if isinstance(m, nn.BatchNorm) and context.method_name == "__call__":
        h = args[0].astype(jnp.float32)
        axes = tuple(range(h.ndim - 1))
        m.sow("intermediates", "mean", jnp.mean(h, axes))
        m.sow("intermediates", "var", jnp.var(h, axes))
    return next_fun(*args, **kwargs)


def test_bn_prior_is_zero_when_the_running_statistics_are_the_batch_statistics():
    model = models.get_model("r_tiny", embedding_dim=16)
    x = jax.random.normal(jax.random.key(3), (4, 112, 112, 3))
    v = model.init(jax.random.key(0), x[:1], train=False)
    v = {"params": v["params"], "batch_stats": v["batch_stats"]}

    @jax.jit
    def batch_stats_of(v):
        with nn.intercept_methods(_stats_interceptor):
            _, st = model.apply(v, x, train=False, mutable=["intermediates"])
        return jax.tree.map(lambda t: t[0], st["intermediates"],
                            is_leaf=lambda t: isinstance(t, tuple))

    @jax.jit
    def prior(v):
        return sum(invert.embed_with_bn_prior(model, v, x)[1].values())

    layers = len(jax.tree.leaves(v["batch_stats"])) // 2
    before = float(prior(v))
    assert before > 1.0  # init running stats (0, 1) are far from a random input's
    # Layer l's input depends only on the running statistics of layers < l, so
    # writing the batch statistics back once per layer reaches the fixed point.
    for _ in range(layers + 1):
        stats = batch_stats_of(v)
        v = {"params": v["params"], "batch_stats": stats}
    stats = batch_stats_of(v)
    # What is left is rounding: jnp.var vs the prior's mean of squares, a few
    # float32 ulps of each statistic; (8 eps |stat|)^2 summed bounds it.
    bound = sum(float(jnp.sum((8 * np.finfo(np.float32).eps * jnp.abs(s)) ** 2))
                for s in jax.tree.leaves(stats)) + 1e-12
    after = float(prior(v))
    assert after <= bound, (after, bound, before)


def test_run_refuses_targets_it_cannot_serve(tmp_path):
    out = str(tmp_path / "never")
    with pytest.raises(ValueError, match="class targets need workdir"):
        invert.run(model_dir="/m", classes=[1], out=out)
    with pytest.raises(ValueError, match="one of classes= and embedding_file="):
        invert.run(workdir="/w", out=out)
    with pytest.raises(ValueError, match="one of workdir= and model_dir="):
        invert.run(workdir="/w", model_dir="/m", classes=[1], out=out)
    assert not os.path.exists(out)


def test_total_variation_and_the_grid_on_hand_made_images():
    x = np.zeros((2, 3, 4, 1), np.float32)
    x[0, :, 2:] = 1.0            # one vertical edge, 3 rows tall: TV_w = sqrt(3)
    x[1, 1:] = 2.0               # one horizontal edge, 4 wide, height 2: TV_h = sqrt(16)
    np.testing.assert_allclose(np.asarray(invert.total_variation(jnp.asarray(x))),
                               [np.sqrt(3.0), 4.0], rtol=1e-6)
    ims = np.stack([np.full((5, 5, 3), i * 40, np.uint8) for i in range(5)])
    g = invert.grid(ims)  # 3 columns, 2 rows, 2-px gutters
    assert g.shape == (2 * 7 + 2, 3 * 7 + 2, 3)
    assert (g[2:7, 2 + 7:7 + 7] == 40).all() and (g[9:14, 2:7] == 120).all()
    assert (g[9:14, 16:21] == 255).all()  # the empty sixth cell
    np.testing.assert_array_equal(invert.to_uint8(np.array([-1.0, 0.0, 1.0, 3.0])),
                                  [0, 128, 255, 255])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pfc_jax import train
    from pfc_jax.config import load_recipe
    workdir = str(tmp_path_factory.mktemp("invert") / "run")
    cfg = load_recipe(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_cpu.py"),
                      "test")
    train.train_and_evaluate(cfg, workdir)
    return workdir, cfg


def test_inversion_beats_the_genuine_pair_cosine_and_the_command_writes_its_images(
        trained, tmp_path):
    from pfc_jax import export, train
    from pfc_jax.data.augment import normalize
    workdir, cfg = trained
    model, variables, _ = export.restore_backbone(workdir)
    src = train.build_source(cfg)
    classes = [3, 11, 20, 41]
    real = np.stack([src.render(c, j) for c in classes for j in range(2)])
    emb = np.asarray(model.apply(variables, normalize(real), train=False), np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    genuine = np.sum(emb[0::2] * emb[1::2], axis=1)  # two images of each class
    targets = np.repeat(emb[0::2], 2, axis=0)         # 8 images: 2 per target
    mesh = mesh_lib.make_mesh({"data": 8})
    cfg_inv = invert.InvertConfig(steps=40)
    # The images inversion starts from (the same key).
    x0 = np.asarray(jax.random.normal(jax.random.key(cfg_inv.seed), (8, 112, 112, 3)))
    emb0 = np.asarray(model.apply(variables, x0, train=False))
    start = invert.cosines(emb0, targets)
    x, terms = invert.invert(model, variables,
                             invert.embedding_loss(jnp.asarray(targets, jnp.float32)), 8, mesh,
                             cfg_inv)
    assert x.shape == (8, 112, 112, 3) and np.all(np.abs(x) <= 1.0)
    got = invert.cosines(np.asarray(model.apply(variables, x, train=False)), targets)
    # A 4-step model: the best genuine pair is the level to beat (the mean of
    # its genuine pairs is below what random noise already scores).
    assert np.mean(start) < genuine.max() < np.mean(got), (got, genuine, start)
    assert np.all(got > start), (got, start)
    assert set(terms) == {"identity", "bn_prior", "tv", "l2"}

    # The command, to class centres read from the sharded table.
    out = str(tmp_path / "inv")
    result = invert.main(["--workdir", workdir, "--class", "3", "--class", "11", "--out", out,
                          "--steps", "40"])
    assert result["targets"] == ["class_3", "class_11"]
    with open(os.path.join(out, "result.json")) as f:
        assert json.load(f)["cosine"] == result["cosine"]
    for name in ("class_3.png", "class_11.png", "grid.png"):
        with Image.open(os.path.join(out, name)) as im:
            assert im.mode == "RGB"
    with Image.open(os.path.join(out, "class_3.png")) as im:
        assert im.size == (112, 112)
    # Cosine to the class's own centre: above the best cosine of a real image of
    # another class to that centre.
    from pfc_jax import clean
    table = np.asarray(jax.device_get(clean.load_table(workdir)[2]), np.float64)[:, 0]
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    others = emb[[4, 6]] @ table[[3, 11]].T  # classes 20, 41 against centres 3, 11
    assert min(result["cosine"]) > others.max(), (result["cosine"], others)
    with pytest.raises(SystemExit):
        invert.main(["--model", out, "--class", "3", "--out", out])  # a class needs a table

    # From an export, to target embeddings (3 targets, padded to the 8 devices).
    model_dir = export.export_backbone(workdir, str(tmp_path / "export"))
    np.save(tmp_path / "t.npy", emb[0:6:2])  # classes 3, 11, 20
    result = invert.main(["--model", model_dir, "--embedding", str(tmp_path / "t.npy"),
                          "--out", str(tmp_path / "emb"), "--steps", "40"])
    assert result["targets"] == ["embedding_0", "embedding_1", "embedding_2"]
    start = invert.cosines(emb0[:3], emb[0:6:2])
    assert np.mean(start) < genuine.max() < np.mean(result["cosine"]), (result, start)
    np.save(tmp_path / "bad.npy", emb[:3, :5])
    with pytest.raises(ValueError, match=r"bad.npy: targets must be finite \[N, 128\]"):
        invert.main(["--model", model_dir, "--embedding", str(tmp_path / "bad.npy"),
                     "--out", str(tmp_path / "bad")])
