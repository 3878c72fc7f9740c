"""Backbones: parameter counts, forward passes, and building blocks against numpy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import models
from pfc_jax.models.iresnet import IBasicBlock, IResNet, PReLU
from pfc_jax.models.mobilefacenet import ConvBlock, DepthWise
from pfc_jax.models.vit import Attention, random_masking

# Parameter counts of the reference implementations (PyTorch, sum of numel over
# model.parameters(); for the IResNets this includes the final BN1d's scale,
# which the reference freezes at 1 and which our models do not have).
REFERENCE_COUNTS = {
    "r18": 24_025_600, "r34": 34_139_328, "r50": 43_590_848, "r100": 65_156_160,
    "r200": 118_833_920, "mbf": 2_059_520, "vit_t": 19_137_792, "vit_s": 76_023_296,
    "vit_b": 113_833_472, "vit_l": 255_684_352,
}
IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3),
                  "r100": (3, 13, 30, 3), "r200": (6, 26, 60, 6)}
FROZEN_BN_SCALE = 512  # the IResNet head's BN1d scale, frozen in the reference

REAL_FORWARD = ("r18", "r34", "r50", "mbf", "vit_t", "vit_s")
SHAPE_ONLY = ("r100", "r200", "vit_b", "vit_l")  # compile too slow for the CPU suite

KEY = jax.random.PRNGKey(0)
RNGS = {"params": KEY, "dropout": KEY}


def images(batch: int = 2, seed: int = 1) -> jax.Array:
    """Normalised face-crop-shaped inputs in [-1, 1]."""
    return jax.random.uniform(jax.random.PRNGKey(seed), (batch, 112, 112, 3), minval=-1.0,
                              maxval=1.0)


@functools.cache
def init_variables(name: str) -> dict:
    """Real variables of backbone ``name`` (compiled once per test session)."""
    model = models.get_model(name)
    return jax.jit(functools.partial(model.init, train=False))(RNGS, images())


@functools.cache
def eval_output(name: str) -> np.ndarray:
    model = models.get_model(name)
    apply = jax.jit(functools.partial(model.apply, train=False))
    return np.asarray(apply(init_variables(name), images()))


# ---------------------------------------------------------------- numpy references

def np_conv(x: np.ndarray, w: np.ndarray, stride: int = 1, pad: int = 0,
            groups: int = 1) -> np.ndarray:
    """Grouped 2-D cross-correlation, NHWC input, HWIO kernel, symmetric zero padding."""
    b, h, wd, c = x.shape
    kh, kw, cg, o = w.shape
    assert cg * groups == c
    og = o // groups
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((b, ho, wo, o))
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, i:i + stride * ho:stride, j:j + stride * wo:stride,
                           g * cg:(g + 1) * cg]
                out[..., g * og:(g + 1) * og] += patch @ w[i, j, :, g * og:(g + 1) * og]
    return out


def np_bn(x: np.ndarray, p: dict, s: dict, eps: float = 1e-5) -> np.ndarray:
    """Inference-mode batch norm from running statistics."""
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p.get("scale", 1.0) + p["bias"]


def np_prelu(x: np.ndarray, p: dict) -> np.ndarray:
    return np.where(x >= 0, x, p["slope"] * x)


def randomise(variables: dict, seed: int) -> dict:
    """Replace every leaf by random values (positive for variances) so BN is not identity."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        if "var" in jax.tree_util.keystr(path):
            out.append(rng.uniform(0.5, 2.0, leaf.shape))
        else:
            out.append(rng.normal(0.0, 0.5, leaf.shape))
    out = [jnp.asarray(v, jnp.float32) for v in out]
    return jax.tree_util.tree_unflatten(tree, out)


def to_np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


# ---------------------------------------------------------------- parameter counts

def iresnet_trainable_count(layers: tuple[int, ...], emb: int = 512) -> int:
    """Trainable parameters of an IResNet, counted by hand from its description."""
    n = 3 * 3 * 3 * 64 + 2 * 64 + 64            # stem conv, BN, PReLU
    cin = 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        for i in range(blocks):
            n += 2 * cin                          # bn1
            n += 9 * cin * planes + 2 * planes    # conv1, bn2
            n += planes                           # PReLU
            n += 9 * planes * planes + 2 * planes  # conv2 (stride), bn3
            if i == 0:                            # stride 2: 1x1 conv + BN shortcut
                n += cin * planes + 2 * planes
            cin = planes
    n += 2 * 512                                  # bn2
    n += 7 * 7 * 512 * emb + emb                  # fc
    n += emb                                      # features BN1d offset (scale frozen)
    return n


@pytest.mark.parametrize("name", models.NAMES)
def test_param_count_matches_reference(name):
    model = models.get_model(name)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), RNGS, images())
    count = models.count_params(shapes["params"])
    want = REFERENCE_COUNTS[name]
    assert abs(count - want) <= 0.01 * want, (name, count, want)
    if name in IRESNET_LAYERS:
        # Exact: everything the reference has except the frozen BN scale.
        assert count == want - FROZEN_BN_SCALE
        assert count == iresnet_trainable_count(IRESNET_LAYERS[name])
        assert "scale" not in shapes["params"]["features"]
        assert shapes["params"]["fc"]["kernel"].shape == (7 * 7 * 512, 512)
    else:
        assert count == want
    for leaf in jax.tree_util.tree_leaves(shapes["params"]):
        assert leaf.dtype == jnp.float32


def test_vit_t_count_by_hand():
    d, n_tok, depth, emb = 256, 144, 12, 512
    block = 2 * d + 3 * d * d + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    total = (3 * 81 * d + d) + n_tok * d + d + depth * block + 2 * d \
        + n_tok * d * d + 2 * d + d * emb + 2 * emb
    model = models.get_model("vit_t")
    shapes = jax.eval_shape(functools.partial(model.init, train=False), RNGS, images())
    assert models.count_params(shapes["params"]) == total


# ---------------------------------------------------------------- forward passes

@pytest.mark.parametrize("name", REAL_FORWARD)
def test_forward_eval(name):
    y = eval_output(name)
    assert y.shape == (2, 512) and y.dtype == np.float32
    assert np.isfinite(y).all()
    # The two samples differ (relative to the output scale, which at init can be tiny
    # or huge: running statistics are still 0/1).
    assert np.abs(y[0] - y[1]).max() > 1e-3 * np.abs(y).max() > 0


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t"])
def test_forward_train_updates_batch_stats(name):
    model = models.get_model(name)
    variables = init_variables(name)
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    y, updates = apply(variables, images(), rngs={"dropout": jax.random.PRNGKey(3)})
    y = np.asarray(y)
    assert y.shape == (2, 512) and y.dtype == np.float32 and np.isfinite(y).all()
    assert np.abs(y[0] - y[1]).max() > 0.1
    # Every backbone ends in a train-mode BN1d with unit scale and zero offset at init.
    # Per feature y = (z - mean) / sqrt(var + eps): zero batch mean, and a mean square
    # var / (var + eps) <= 1, close to 1 unless the two samples nearly coincide.
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
    ms = (y ** 2).mean(0)
    assert (ms <= 1.0 + 1e-5).all() and np.median(ms) > 0.9
    old, new = variables["batch_stats"], updates["batch_stats"]
    assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
    if name == "r18":
        # Stem BN running stats move 10% towards the batch stats of conv1(x).
        feat = np_conv(np.asarray(images(), np.float64),
                       np.asarray(variables["params"]["conv1"]["kernel"], np.float64), pad=1)
        np.testing.assert_allclose(new["bn1"]["mean"], 0.1 * feat.mean((0, 1, 2)),
                                   rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(new["bn1"]["var"], 0.9 + 0.1 * feat.var((0, 1, 2)),
                                   rtol=1e-3)


def test_vit_train_mode_is_stochastic():
    """Token masking and stochastic depth draw from the dropout rng in training only."""
    model = models.get_model("vit_t")
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    x, v = images(), init_variables("vit_t")
    y1, _ = apply(v, x, rngs={"dropout": jax.random.PRNGKey(1)})
    y1b, _ = apply(v, x, rngs={"dropout": jax.random.PRNGKey(1)})
    y2, _ = apply(v, x, rngs={"dropout": jax.random.PRNGKey(2)})
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y1b))
    assert np.abs(np.asarray(y1) - np.asarray(y2)).max() > 1e-3


@pytest.mark.parametrize("name", SHAPE_ONLY)
def test_forward_shape_only_large(name):
    model = models.get_model(name)
    x = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
    v = jax.eval_shape(functools.partial(model.init, train=False), RNGS, x)
    y = jax.eval_shape(functools.partial(model.apply, train=False), v, x)
    assert y.shape == (2, 512) and y.dtype == jnp.float32
    y, upd = jax.eval_shape(
        functools.partial(model.apply, train=True, mutable=["batch_stats"]), v, x,
        rngs={"dropout": KEY})
    assert y.shape == (2, 512) and y.dtype == jnp.float32
    assert jax.tree_util.tree_structure(upd["batch_stats"]) == \
        jax.tree_util.tree_structure(v["batch_stats"])


def test_bf16_compute_close_to_f32():
    model = models.get_model("r18", dtype=jnp.bfloat16)
    v = init_variables("r18")  # float32 params serve both compute dtypes
    y = np.asarray(jax.jit(functools.partial(model.apply, train=False))(v, images()))
    ref = eval_output("r18")
    assert y.shape == (2, 512) and y.dtype == np.float32 and np.isfinite(y).all()
    for a, b in zip(y, ref):
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos > 0.999, cos
        assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(b)
    assert not np.array_equal(y, ref)  # bf16 really was used


def test_iresnet_head_dropout():
    model = IResNet(layers=(1, 1, 1, 1), dropout=0.5)
    x = images(4)
    v = jax.jit(functools.partial(model.init, train=False))(RNGS, x)
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    ya, _ = apply(v, x, rngs={"dropout": jax.random.PRNGKey(1)})
    yb, _ = apply(v, x, rngs={"dropout": jax.random.PRNGKey(2)})
    assert np.abs(np.asarray(ya) - np.asarray(yb)).max() > 1e-2
    ev = jax.jit(functools.partial(model.apply, train=False))
    np.testing.assert_array_equal(np.asarray(ev(v, x)), np.asarray(ev(v, x)))


# ---------------------------------------------------------------- building blocks

def test_prelu_per_channel_hand_computed():
    x = jnp.array([[-2.0, 3.0], [1.0, -4.0]])
    v = PReLU().init(KEY, x)
    np.testing.assert_array_equal(np.asarray(v["params"]["slope"]), [0.25, 0.25])
    y = PReLU().apply({"params": {"slope": jnp.array([0.25, 0.5])}}, x)
    np.testing.assert_allclose(np.asarray(y), [[-0.5, 3.0], [1.0, -2.0]])


def test_ibasicblock_matches_numpy():
    """Stride-2 block with a projection shortcut; the even input size tells PyTorch-style
    symmetric padding (1, 1) apart from "SAME" (0, 1)."""
    block = IBasicBlock(planes=8, stride=2)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    v = randomise(block.init(KEY, x, train=False), seed=1)
    y = np.asarray(block.apply(v, x, train=False))
    p, s = to_np(v["params"]), to_np(v["batch_stats"])
    x64 = x.astype(np.float64)
    out = np_bn(x64, p["bn1"], s["bn1"])
    out = np_conv(out, p["conv1"]["kernel"], pad=1)
    out = np_prelu(np_bn(out, p["bn2"], s["bn2"]), p["prelu"])
    out = np_conv(out, p["conv2"]["kernel"], stride=2, pad=1)
    out = np_bn(out, p["bn3"], s["bn3"])
    short = np_conv(x64, p["downsample_conv"]["kernel"], stride=2)
    short = np_bn(short, p["downsample_bn"], s["downsample_bn"])
    assert y.shape == (2, 4, 4, 8)
    np.testing.assert_allclose(y, out + short, rtol=1e-4, atol=1e-4)


def test_mbf_grouped_convblock_matches_numpy():
    """A 3x3 conv with 4 groups of 2 channels (as mbf's stem uses), BN, PReLU."""
    blk = ConvBlock(8, kernel=3, padding=1, groups=4)
    x = np.random.default_rng(2).normal(size=(2, 5, 5, 8)).astype(np.float32)
    v = randomise(blk.init(KEY, x, train=False), seed=3)
    y = np.asarray(blk.apply(v, x, train=False))
    p, s = to_np(v["params"]), to_np(v["batch_stats"])
    want = np_prelu(np_bn(np_conv(x.astype(np.float64), p["conv"]["kernel"], pad=1, groups=4),
                          p["bn"], s["bn"]), p["prelu"])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_mbf_depthwise_residual_matches_numpy():
    blk = DepthWise(features=6, groups=12, stride=1, residual=True)
    x = np.random.default_rng(4).normal(size=(2, 5, 5, 6)).astype(np.float32)
    v = randomise(blk.init(KEY, x, train=False), seed=5)
    y = np.asarray(blk.apply(v, x, train=False))
    p, s = to_np(v["params"]), to_np(v["batch_stats"])
    x64 = x.astype(np.float64)
    h = np_prelu(np_bn(np_conv(x64, p["expand"]["conv"]["kernel"]), p["expand"]["bn"],
                       s["expand"]["bn"]), p["expand"]["prelu"])
    h = np_prelu(np_bn(np_conv(h, p["depthwise"]["conv"]["kernel"], pad=1, groups=12),
                       p["depthwise"]["bn"], s["depthwise"]["bn"]), p["depthwise"]["prelu"])
    h = np_bn(np_conv(h, p["project"]["conv"]["kernel"]), p["project"]["bn"],
              s["project"]["bn"])
    np.testing.assert_allclose(y, h + x64, rtol=1e-4, atol=1e-4)


def test_attention_matches_numpy():
    attn = Attention(dim=8, num_heads=2)
    x = np.random.default_rng(6).normal(size=(2, 5, 8)).astype(np.float32)
    v = randomise(attn.init(KEY, x, train=False), seed=7)
    y = np.asarray(attn.apply(v, x, train=False))
    p = to_np(v["params"])
    qkv = x.astype(np.float64) @ p["qkv"]["kernel"]           # [B, N, 3D]
    q, k, val = (qkv[..., i * 8:(i + 1) * 8] for i in range(3))
    out = np.zeros((2, 5, 8))
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        sc = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / 2.0  # sqrt(head_dim) = 2
        w = np.exp(sc - sc.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[..., sl] = w @ val[..., sl]
    want = out @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_random_masking_restores_positions():
    b, length, d = 3, 144, 2
    x = jnp.broadcast_to(jnp.arange(length, dtype=jnp.float32)[None, :, None], (b, length, d))
    kept, ids_restore = random_masking(jax.random.PRNGKey(9), x, 0.1)
    assert kept.shape == (b, int(length * 0.9), d)
    full = jnp.concatenate([kept, jnp.full((b, length - kept.shape[1], d), -1.0)], axis=1)
    restored = np.asarray(jnp.take_along_axis(full, ids_restore[:, :, None], axis=1))[..., 0]
    for row, k in zip(restored, np.asarray(kept)[..., 0]):
        masked = row == -1
        assert masked.sum() == length - kept.shape[1]
        np.testing.assert_array_equal(row[~masked], np.arange(length)[~masked])
        assert len(set(k.tolist())) == kept.shape[1]   # no token kept twice
    assert not np.array_equal(restored[0] == -1, restored[1] == -1)  # per-sample masks


# ---------------------------------------------------------------- errors

def test_unknown_name_lists_names():
    with pytest.raises(ValueError, match="r18.*vit_l") as err:
        models.get_model("resnet50")
    assert "resnet50" in str(err.value)


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="dropout"):
        models.get_model("mbf", dropout=0.1)
    with pytest.raises(ValueError, match="dropout"):
        models.get_model("r18", dropout=1.5)
    model = models.get_model("r18")
    with pytest.raises(ValueError, match=r"r18.*\(2, 3, 112, 112\)"):
        jax.eval_shape(functools.partial(model.init, train=False), RNGS,
                       jnp.zeros((2, 3, 112, 112)))


# (name, input shape, features, kernel, stride, pad, groups): mbf's grouped convs.
GROUPED_CASES = [
    ("depthwise 3x3", (2, 6, 6, 5), 5, 3, 1, 1, 5),
    ("depthwise 3x3 stride 2", (2, 7, 7, 4), 4, 3, 2, 1, 4),
    ("2 channels per group (stem_dw)", (2, 5, 5, 8), 8, 3, 1, 1, 4),
    ("GDC 7x7 to 1x1", (3, 7, 7, 6), 6, 7, 1, 0, 6),
    ("6 channels per group (per-group products)", (2, 5, 5, 12), 8, 3, 1, 1, 2),
]


@pytest.mark.parametrize("case", GROUPED_CASES, ids=[c[0] for c in GROUPED_CASES])
def test_shifted_grouped_conv_equals_nn_conv_with_feature_groups(case):
    """Same parameter, same output and gradients (input and kernel) as nn.Conv."""
    import flax.linen as nn

    from pfc_jax.models.grouped_conv import GroupedConv
    _, shape, feats, k, stride, pad, groups = case
    conv = nn.Conv(feats, (k, k), strides=stride, padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=False)
    mine = GroupedConv(feats, (k, k), strides=stride, padding=((pad, pad), (pad, pad)),
                       feature_group_count=groups, impl="shifted", dtype=None,
                       param_dtype=jnp.float64)
    rng = np.random.default_rng(7)
    x = rng.normal(size=shape)
    v = conv.init(KEY, jnp.zeros(shape))
    with jax.enable_x64(True):
        assert jax.tree.map(jnp.shape, mine.init(KEY, jnp.zeros(shape))) == \
            jax.tree.map(jnp.shape, v)
    kernel = rng.normal(size=v["params"]["kernel"].shape)
    g = rng.normal(size=conv.apply(v, jnp.zeros(shape)).shape)
    with jax.enable_x64(True):
        @functools.partial(jax.jit, static_argnums=0)
        def run(module, x, kernel, g):
            out, vjp = jax.vjp(lambda x, w: module.apply({"params": {"kernel": w}}, x), x, kernel)
            return (out, *vjp(g))

        x64, k64, g64 = jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(g)
        want = run(conv, x64, k64, g64)
        got = run(mine, x64, k64, g64)
        # The same linear maps of |x|, |kernel|, |g| bound every sum's terms; a
        # reordered float64 sum of n terms differs by at most n * eps * that.
        bound = run(conv, jnp.abs(x64), jnp.abs(k64), jnp.abs(g64))
        n = k * k * (shape[-1] // groups) * shape[0] * shape[1] * shape[2]
    eps = np.finfo(np.float64).eps
    for name, a, b, c in zip(("output", "input grad", "kernel grad"), got, want, bound):
        assert a.shape == b.shape, name
        np.testing.assert_array_less(np.abs(np.asarray(a) - np.asarray(b)),
                                     n * eps * np.asarray(c) + 1e-300, err_msg=name)
    # The conv form is nn.Conv's own computation, to the bit.
    same = GroupedConv(feats, (k, k), strides=stride, padding=((pad, pad), (pad, pad)),
                       feature_group_count=groups, impl="conv")
    x32 = jnp.asarray(x, jnp.float32)
    vk = {"params": {"kernel": jnp.asarray(kernel, jnp.float32)}}
    np.testing.assert_array_equal(np.asarray(same.apply(vk, x32)), np.asarray(conv.apply(vk, x32)))


@pytest.mark.parametrize("case", GROUPED_CASES, ids=[c[0] for c in GROUPED_CASES])
def test_shifted_conv_by_chunks_equals_xla(case):
    """The chunk loop (forward and its custom backward) against XLA's grouped
    convolution, one and two images per chunk, float64."""
    from jax import lax
    from pfc_jax.models.grouped_conv import shifted_conv
    _, shape, feats, k, stride, p, groups = case
    shape = (4, *shape[1:])
    rng = np.random.default_rng(3)
    pad = ((p, p), (p, p))
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal(shape))
        w = jnp.asarray(rng.standard_normal((k, k, shape[-1] // groups, feats)))
        ref = lambda x, w: lax.conv_general_dilated(
            x, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups)
        y0, v0 = jax.vjp(ref, x, w)
        g = jnp.asarray(rng.standard_normal(y0.shape))
        for chunk in (1, 2):
            y1, v1 = jax.vjp(lambda x, w, c=chunk: shifted_conv(x, w, stride, pad, groups, c),
                             x, w)
            # sums of <= 4 * 7 * 7 * 6 unit-scale float64 products: 1e-12 is > 1e3 ulps
            for name, a, b in zip(("output", "input grad", "kernel grad"), (y1, *v1(g)),
                                  (y0, *v0(g))):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12,
                                           err_msg=f"{name}, chunk {chunk}")
    with pytest.raises(ValueError, match="chunk of 3 images does not divide the batch of 4"):
        shifted_conv(jnp.zeros(shape), jnp.zeros((k, k, shape[-1] // groups, feats)), stride,
                     pad, groups, 3)


def test_chunk_size_rule():
    """The largest dividing chunk under the byte budget, two images at least where
    the batch is even."""
    from pfc_jax.models.grouped_conv import _CHUNK_BYTES, chunk_size
    assert _CHUNK_BYTES == 2 << 20  # the cases below are worked for 2 MiB
    assert chunk_size((32, 14, 14, 256), 4) == 8           # 0.2 MB an image
    assert chunk_size((32, 28, 28, 128), 4) == 4           # 0.4 MB
    assert chunk_size((32, 56, 56, 128), 4) == 2           # 1.6 MB
    assert chunk_size((9, 112, 112, 128), 4) == 1          # odd batch, 6.4 MB an image
    assert chunk_size((4, 7, 7, 8), 4) == 4                # all of it fits
    for shape in [(32, 56, 56, 128), (24, 28, 28, 256), (30, 40, 40, 96), (64, 7, 7, 8)]:
        c = chunk_size(shape, 4)
        image = 4 * int(np.prod(shape[1:]))
        assert shape[0] % c == 0
        assert c * image <= _CHUNK_BYTES or c == 2
        assert not any(shape[0] % d == 0 and d * image <= _CHUNK_BYTES
                       for d in range(c + 1, shape[0] + 1))  # no larger chunk fits


def test_mbf_shifted_and_conv_forms_give_the_same_model():
    """Whole MobileFaceNet: the same parameters and embeddings with either form of
    its grouped convolutions (their gradients: per form, in the test above)."""
    from pfc_jax.models.mobilefacenet import MobileFaceNet
    a, b = MobileFaceNet(conv_impl="shifted"), MobileFaceNet(conv_impl="conv")
    x = images(4)
    va = jax.jit(lambda: a.init(RNGS, x, train=False))()
    # The same parameter tree (names, shapes): checkpoints load into either form.
    assert jax.tree.map(jnp.shape, va) == jax.tree.map(
        jnp.shape, jax.eval_shape(lambda: b.init(RNGS, x, train=False)))
    # Training mode: each BN renormalises with batch statistics, so activations
    # stay O(1) and the forms' rounding differences do not grow through depth.
    ea, eb = (np.asarray(jax.jit(lambda v, m=m: m.apply(v, x, train=True,
                                                         mutable=["batch_stats"])[0])(va))
              for m in (a, b))
    grouped = [path for path, _ in jax.tree_util.tree_leaves_with_path(va["params"])
               if any(k in jax.tree_util.keystr(path) for k in ("depthwise", "_dw"))
               and "kernel" in jax.tree_util.keystr(path)]
    # Per grouped conv a float32 reordering of <= 49 terms: 49 eps of the scale;
    # added over the grouped convs, each carried forward at O(1) gain.
    tol = len(grouped) * 49 * np.finfo(np.float32).eps * np.abs(eb).max()
    np.testing.assert_allclose(ea, eb, rtol=0, atol=tol)


@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (5, 3, 2)])
def test_dense_conv_kernel_gradient_by_taps_equals_xla(k, s, p):
    """grouped_conv.dense_conv: XLA's forward and input gradient, the kernel gradient
    as one product per tap; float64, so any indexing error is far above rounding."""
    from jax import lax
    from pfc_jax.models.grouped_conv import dense_conv
    rng = np.random.default_rng(k * 10 + s)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 11, 10, 3)))
        w = jnp.asarray(rng.standard_normal((k, k, 3, 4)))
        pad = ((p, p), (p, p))
        ref = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pad,
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y0, v0 = jax.vjp(ref, x, w)
        g = jnp.asarray(rng.standard_normal(y0.shape))
        for chunk in (2, 1):  # the whole batch; one image per chunk, summed in a loop
            y1, v1 = jax.vjp(lambda x, w, c=chunk: dense_conv(x, w, s, pad, c), x, w)
            np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
            for a, b in zip(v1(g), v0(g)):  # sums of <= 220 unit-scale products: 1e-12 ~1e4 ulps
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)
