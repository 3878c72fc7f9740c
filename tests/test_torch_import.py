"""arcface_torch IResNet weights imported into pfc_jax give the same embeddings.

The PyTorch model below is written here from the published layer definitions
(arcface_torch's ``backbones/iresnet.py``: the block order, the strides, the
``downsample.0/1`` and ``features`` names), so its ``state_dict`` has the
published names and layouts. Random weights, BatchNorm statistics set from
real face images (one training-mode pass, then eval), and a feature BN
weight off 1 so the variance folding is exercised. Bound: 1e-4 max abs on
L2-normalised embeddings, the export issue's; both sides are float32 over
about 40 layers with their own summation orders (measured near 1e-6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from pfc_jax import export, torch_import  # noqa: E402
from pfc_jax.data.augment import normalize  # noqa: E402
from pfc_jax.data.synthetic import SyntheticFaces  # noqa: E402
from pfc_jax.evaluate import verification  # noqa: E402

TOL = 1e-4


class Block(nn.Module):
    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class TorchIResNet(nn.Module):
    def __init__(self, layers, num_features=512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            mods = []
            for j in range(blocks):
                down = None
                if j == 0:
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False),
                                         nn.BatchNorm2d(planes, eps=1e-5))
                mods.append(Block(inplanes, planes, 2 if j == 0 else 1, down))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.fc(self.dropout(torch.flatten(self.bn2(x), 1)))
        return self.features(x)


@pytest.fixture(scope="module")
def torch_r18(tmp_path_factory):
    torch.manual_seed(0)
    net = TorchIResNet((2, 2, 2, 2))
    for m in net.modules():  # small weights keep 18 random layers finite
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, 0.05)
    faces = SyntheticFaces(4, 2, seed=3)
    images = np.stack([faces[i]["image"] for i in range(8)])
    x = np.asarray(normalize(jnp.asarray(images)))  # NHWC, (x - 127.5) / 127.5
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one pass sets the images' statistics
    net.train()
    with torch.no_grad():
        net(xt)
        net.features.weight.uniform_(0.5, 2.0)  # != 1: the variance carries it
        net.features.bias.normal_(0, 0.1)
        for m in net.modules():
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.0, 0.5)
    net.eval()
    with torch.no_grad():
        want = net(xt).numpy()
    path = tmp_path_factory.mktemp("torch") / "backbone.pth"
    torch.save(net.state_dict(), path)
    return str(path), x, want


def _unit(a):
    return verification.l2_normalize(np.asarray(a, np.float64))


def test_an_arcface_torch_state_dict_imports_and_embeds_the_same(torch_r18, tmp_path):
    path, x, want = torch_r18
    out = torch_import.main(["--torch", path, "--out", str(tmp_path / "imp"),
                             "--network", "r18"])
    model, v = export.load_backbone(out)
    assert type(model).__name__ == "IResNet" and model.layers == (2, 2, 2, 2)
    got = jax.jit(lambda x: model.apply(v, x, train=False))(x)
    np.testing.assert_allclose(_unit(got), _unit(want), rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="is r18, not r50"):
        torch_import.from_state_dict(torch_import.load_state_dict(path), "r50")


def test_the_import_exports_to_onnx_with_the_same_embeddings(torch_r18, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from pfc_jax import onnx_export
    path, x, want = torch_r18
    model, v = torch_import.from_state_dict(torch_import.load_state_dict(path))
    onnx_path = onnx_export.export_onnx(model, v, str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
    np.testing.assert_allclose(_unit(got), _unit(want), rtol=0, atol=TOL)


def test_a_state_dict_that_is_not_an_iresnet_is_named():
    sd = {"layer1.0.conv1.weight": np.zeros((64, 64, 3, 3)), "fc.weight": np.zeros((512, 1))}
    with pytest.raises(ValueError, match=r"blocks per stage \(1, 0, 0, 0\)"):
        torch_import.network_of(sd)


# ------------------------------------------------------------ MobileFaceNet
class ConvBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=1, stride=1, padding=0, groups=1, prelu=True):
        super().__init__()
        mods = [nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                nn.BatchNorm2d(out_c)]
        if prelu:
            mods.append(nn.PReLU(out_c))
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    def __init__(self, in_c, out_c, residual, stride, groups):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBlock(in_c, groups),
                                    ConvBlock(groups, groups, 3, stride, 1, groups=groups),
                                    ConvBlock(groups, out_c, prelu=False))

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    def __init__(self, c, n, groups):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, 1, groups) for _ in range(n)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, num_features):
        super().__init__()
        self.layers = nn.Sequential(ConvBlock(512, 512, 7, 1, 0, groups=512, prelu=False),
                                    nn.Flatten(), nn.Linear(512, num_features, bias=False),
                                    nn.BatchNorm1d(num_features))

    def forward(self, x):
        return self.layers(x)


class TorchMobileFaceNet(nn.Module):
    """The published layout: layers[0..7], conv_sep, features = GDC (LinearBlock 7x7
    depthwise, Flatten, Linear without bias, BatchNorm1d)."""

    def __init__(self, num_features=512):
        super().__init__()
        self.layers = nn.ModuleList([
            ConvBlock(3, 128, 3, 2, 1), ConvBlock(128, 128, 3, 1, 1, groups=64),
            DepthWise(128, 128, False, 2, 128), Residual(128, 4, 128),
            DepthWise(128, 256, False, 2, 256), Residual(256, 6, 256),
            DepthWise(256, 256, False, 2, 512), Residual(256, 2, 256)])
        self.conv_sep = ConvBlock(256, 512)
        self.features = GDC(num_features)

    def forward(self, x):
        for f in self.layers:
            x = f(x)
        return self.features(self.conv_sep(x))


def _faces_bn_and_embeddings(net, n):
    """``n`` synthetic faces (normalised NHWC); ``net``'s BN statistics set from them
    (one training-mode pass), its BN weights and biases moved off (1, 0); then its
    eval-mode embeddings of them."""
    faces = SyntheticFaces(4, 2, seed=3)
    x = np.asarray(normalize(jnp.asarray(np.stack([faces[i]["image"] for i in range(n)]))))
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None
    net.train()
    with torch.no_grad():
        net(xt)
        for m in bns:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
    net.eval()
    with torch.no_grad():
        return x, net(xt).numpy()


def test_an_arcface_torch_mobilefacenet_imports_and_embeds_the_same(tmp_path):
    torch.manual_seed(1)
    net = TorchMobileFaceNet()
    x, want = _faces_bn_and_embeddings(net, 8)
    path = tmp_path / "mbf.pth"
    torch.save(net.state_dict(), path)
    out = torch_import.main(["--torch", str(path), "--out", str(tmp_path / "imp")])
    model, v = export.load_backbone(out)
    model = model.clone(conv_impl="conv")  # equal to the tap-by-tap form (test_models.py)
    got = jax.jit(lambda x: model.apply(v, x, train=False))(x)
    np.testing.assert_allclose(_unit(got), _unit(want), rtol=0, atol=TOL)


# ---------------------------------------------------------------------- ViT
class TorchViTBlock(nn.Module):
    """arcface_torch's pre-norm Block: norm1, attn.qkv (no bias), attn.proj, norm2,
    mlp.fc1 / ReLU6 / mlp.fc2."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        h = self.norm1(x)
        qkv = self.attn.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((a @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp.fc2(nn.functional.relu6(self.mlp.fc1(self.norm2(x))))


class TorchViT(nn.Module):
    """arcface_torch's VisionTransformer at 112x112, 9x9 patches, no class token, eval form."""

    def __init__(self, dim, depth, heads=8, num_features=512):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 9, 9)
        self.pos_embed = nn.Parameter(torch.randn(1, 144, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList([TorchViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(nn.Linear(dim * 144, dim, bias=False),
                                     nn.BatchNorm1d(dim, eps=2e-5),
                                     nn.Linear(dim, num_features, bias=False),
                                     nn.BatchNorm1d(num_features, eps=2e-5))

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.feature(self.norm(x).reshape(x.shape[0], -1))


def test_an_arcface_torch_vit_imports_and_embeds_the_same(tmp_path):
    torch.manual_seed(2)
    net = TorchViT(256, 12)  # vit_t's width and depth
    for m in net.modules():
        if isinstance(m, nn.LayerNorm):  # off the identity, so the mapping of scale matters
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
    x, want = _faces_bn_and_embeddings(net, 6)
    path = tmp_path / "vit.pth"
    torch.save(net.state_dict(), path)
    out = torch_import.main(["--torch", str(path), "--out", str(tmp_path / "imp")])
    model, v = export.load_backbone(out)
    assert type(model).__name__ == "VisionTransformer" and model.config.embed_dim == 256
    got = jax.jit(lambda x: model.apply(v, x, train=False))(x)
    np.testing.assert_allclose(_unit(got), _unit(want), rtol=0, atol=TOL)
    sd = torch_import.load_state_dict(str(path))
    del sd["blocks.11.norm1.weight"], sd["blocks.11.norm1.bias"]
    with pytest.raises(KeyError, match="blocks.11.norm1.weight"):
        torch_import.from_state_dict(sd)
    sd = {k: v for k, v in torch_import.load_state_dict(str(path)).items()
          if not k.startswith("blocks.11.")}
    with pytest.raises(ValueError, match="width 256 and depth 11 is none of pfc_jax's"):
        torch_import.network_of(sd)


# ---------------------------------------------- InsightFace model-zoo ONNX in
def _zoo_onnx(net, path, x):
    """``net`` written as the model zoo's files are: PyTorch's TorchScript ONNX exporter
    in eval mode (BatchNorms after convolutions folded into them), opset 11."""
    import warnings
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.from_numpy(np.ascontiguousarray(x[:1].transpose(0, 3, 1, 2))),
                          str(path), input_names=["input.1"], output_names=["fc1"],
                          dynamic_axes={"input.1": {0: "None"}}, opset_version=11,
                          do_constant_folding=True, dynamo=False)
    import onnx
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    return ops


def test_a_model_zoo_onnx_iresnet_imports_and_embeds_the_same(torch_r18, tmp_path):
    pytest.importorskip("onnxruntime")
    from pfc_jax import onnx_import
    path, x, want = torch_r18
    net = TorchIResNet((2, 2, 2, 2))
    net.load_state_dict(torch.load(path))
    ops = _zoo_onnx(net, tmp_path / "r18.onnx", x)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert ops.count("Conv") == 21 and ops.count("BatchNormalization") < n_bn  # folded
    out = torch_import.main(["--onnx", str(tmp_path / "r18.onnx"), "--out",
                             str(tmp_path / "imp")])
    model, v = export.load_backbone(out)
    assert type(model).__name__ == "IResNet" and model.layers == (2, 2, 2, 2)
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    np.testing.assert_allclose(_unit(fwd(v, x)), _unit(want), rtol=0, atol=TOL)

    # Calibration: the folded BNs hold the statistics of their convolution's output on
    # the calibration faces (checked for the stem against a float64 convolution here), and
    # training mode on those faces lands closer to inference than the pass-through form.
    imgs = onnx_import.calibration_images(None)
    xc = np.asarray(normalize(jnp.asarray(imgs)), np.float64)
    k = np.asarray(v["params"]["conv1"]["kernel"], np.float64)
    y = jax.lax.conv_general_dilated(jnp.asarray(xc, jnp.float32), jnp.asarray(k, jnp.float32),
                                     (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision="highest")
    y = np.asarray(y, np.float64).reshape(-1, k.shape[-1])
    np.testing.assert_allclose(v["batch_stats"]["bn1"]["mean"], y.mean(0), rtol=1e-4,
                               atol=1e-5 * np.abs(y).max())
    np.testing.assert_allclose(v["batch_stats"]["bn1"]["var"], y.var(0), rtol=1e-3)
    events, _, _ = onnx_import.read_events(str(tmp_path / "r18.onnx"))
    plain, _ = onnx_import.fill(model, events)

    @jax.jit
    def both(vv, xx):
        return (model.apply(vv, xx, train=True, mutable=["batch_stats"])[0],
                model.apply(vv, xx, train=False))

    def train_vs_eval(vv):
        tr, ev = both(vv, jnp.asarray(xc[:8], jnp.float32))
        return float(np.mean(np.sum(_unit(tr) * _unit(ev), axis=1)))

    assert train_vs_eval(v) > train_vs_eval(plain)

    # A fine-tune from the import runs: two SGD steps on synthetic faces, a fresh head.
    import importlib.util
    import os

    from pfc_jax import train
    spec = importlib.util.spec_from_file_location("tiny_cpu", os.path.join(
        os.path.dirname(__file__), "..", "configs", "tiny_cpu.py"))
    cfg_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg_mod)
    c = cfg_mod.get_config("test")
    c.model.name, c.model.embedding_dim, c.init_from = "r18", 512, out
    c.max_steps, c.batch_size, c.checkpoint.every_steps = 2, 8, 2
    work = str(tmp_path / "finetune")
    train.train_and_evaluate(c, work)
    _, tuned, step = export.restore_backbone(work)
    from pfc_jax import plots
    losses = [r["train/loss"] for r in plots.read_metrics(work) if "train/loss" in r]
    assert step == 2 and losses and all(np.isfinite(losses))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(v["params"]), jax.tree.leaves(tuned["params"]))]
    assert any(moved)


def test_a_model_zoo_onnx_mobilefacenet_imports_and_embeds_the_same(tmp_path):
    pytest.importorskip("onnxruntime")
    from pfc_jax import onnx_import
    torch.manual_seed(3)
    net = TorchMobileFaceNet()
    faces = SyntheticFaces(4, 2, seed=3)
    x = np.asarray(normalize(jnp.asarray(np.stack([faces[i]["image"] for i in range(8)]))))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        want = net.eval()(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    ops = _zoo_onnx(net, tmp_path / "mbf.onnx", x)
    assert "BatchNormalization" in ops  # the GDC's BatchNorm1d after the linear layer
    model, v, name, dim, diff = onnx_import.from_onnx(str(tmp_path / "mbf.onnx"))
    assert (name, dim) == ("mbf", 512) and diff < 1e-4
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    np.testing.assert_allclose(_unit(fwd(v, x)), _unit(want.numpy()), rtol=0, atol=TOL)

    class SelfNormalising(nn.Module):  # a file that takes raw pixels: (x - 127.5) / 127.5
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner((x - 127.5) / 127.5)

    _zoo_onnx(SelfNormalising(net), tmp_path / "raw.onnx", x)
    model2, v2, _, _, diff2 = onnx_import.from_onnx(str(tmp_path / "raw.onnx"))
    assert diff2 < 1e-4  # ONNX Runtime fed raw pixels, pfc_jax normalised ones
    np.testing.assert_allclose(_unit(fwd(v2, x)), _unit(want.numpy()), rtol=0, atol=TOL)


def test_onnx_graphs_pfc_jax_cannot_read_are_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    from pfc_jax import onnx_import
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.zeros(108, np.float32))
    c = helper.make_tensor("c", TensorProto.FLOAT, [1], [100.0])
    nodes = [helper.make_node("Sub", ["x", "c"], ["xs"]),
             helper.make_node("Conv", ["xs", "w"], ["y"], name="stem")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [None, 3, 112, 112])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, c])
    onnx.save(helper.make_model(g), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match=r"maps its input x to 1 x \+ -100"):
        onnx_import.read_events(str(tmp_path / "a.onnx"))
    events = [onnx_import.Event("conv", "stem", np.zeros((3, 3, 3, 64), np.float32),
                                np.zeros(64, np.float32))]
    with pytest.raises(ValueError, match="0 linear layers: not an IResNet"):
        onnx_import.network_of(events)
    from pfc_jax import models
    with pytest.raises(ValueError, match=r"ends before pfc_jax's prelu \(prelu\)"):
        onnx_import.fill(models.get_model("r18", embedding_dim=8), events)
    (tmp_path / "b.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="b.onnx: not an ONNX model"):
        onnx_import.read_events(str(tmp_path / "b.onnx"))
