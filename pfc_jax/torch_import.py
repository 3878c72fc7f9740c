"""Import of ``arcface_torch`` IResNet, MobileFaceNet and ViT weights into pfc_jax.

    pfc-import --torch backbone.pth --out /models/r50_from_torch [--network r50]
    pfc-import --onnx w600k_r50.onnx --out /models/w600k_r50    # pfc_jax.onnx_import

reads the state_dict an ``arcface_torch`` run saves (``backbone.pth``) and
writes a pfc_jax export (``backbone.msgpack`` + ``model.json``), which
``pfc-eval --model`` scores, ``pfc-export``-style ONNX can be made from, and
``pfc-train --config.init_from=DIR`` starts from. The network (r18 ... r200,
mbf, vit_t/s/b/l) and the embedding size are read from the tensors' names
and shapes;
``--network`` only checks them.

What changes on the way in (the function and the numbers it computes stay
the same):

- layout: convolution kernels ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]``; the FC
  weight ``[E, C*H*W]`` is re-ordered for pfc_jax's NHWC flattening
  (``(H, W, C)``) and transposed;
- names: ``layer2.0.downsample.0`` -> ``layer2_0/downsample_conv``, mbf's
  ``layers.3.layers.1.layers.2`` (Sequential indices) -> ``res1_1/project``;
  BatchNorm ``weight/bias/running_mean/running_var`` -> ``scale/bias/mean/var``;
  PReLU ``weight`` -> ``slope``;
- ViT: ``patch_embed.proj`` -> ``patch_embed``, ``blocks.i.attn.qkv`` ->
  ``block{i}/attn/qkv``, ``blocks.i.mlp.fc1`` -> ``block{i}/fc1``, LayerNorm
  ``weight`` -> ``scale``, ``feature.0..3`` -> ``feature_fc1 / feature_bn1 /
  feature_fc2 / feature_bn2``; Linear weights ``[out, in]`` transposed. Tokens
  are flattened in the same (token, channel) order on both sides. The heads
  count is not in the weights; every arcface_torch ViT uses 8, as pfc_jax's;
- the final BatchNorm1d: arcface_torch freezes its weight at 1 and pfc_jax has
  no such parameter. A weight ``w != 1`` is carried exactly by the variance:
  ``(x - m) / sqrt(v + eps) * w == (x - m) / sqrt(v' + eps)`` with
  ``v' = (v + eps) / w**2 - eps`` (``w > 0``).

Reading a ``.pth`` needs PyTorch (``pip install torch``, the CPU build is
enough); ``from_state_dict`` takes plain NumPy arrays.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping

import numpy as np

from pfc_jax import platform
from pfc_jax.models.iresnet import BN_EPS, STAGE_LAYERS

_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """A ``torch.save``d state_dict (or ``{"state_dict": ...}``) as NumPy arrays."""
    try:
        import torch
    except ImportError:
        raise ImportError("reading a .pth needs PyTorch: pip install torch") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"],
                                                                       Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: not a state_dict (got {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k  # DistributedDataParallel
        if hasattr(v, "detach"):
            out[k] = v.detach().float().numpy() if v.is_floating_point() else v.numpy()
    return out


_MBF_RES = {1: 3, 2: 5, 3: 7}  # our residual stage s -> its index in arcface_torch's layers
MBF_BLOCKS = (1, 4, 6, 2)


def _mbf_blocks(sd) -> tuple[int, ...]:
    def count(i):
        pat = re.compile(rf"^layers\.{i}\.layers\.(\d+)\.layers\.0\.")
        return 1 + max((int(m.group(1)) for k in sd if (m := pat.match(k))), default=-1)
    first = 1 if "layers.1.layers.0.weight" in sd else count(1)
    return (first, count(3), count(5), count(7))


def _vit_network(sd) -> tuple[str, int]:
    from pfc_jax.models.vit import CONFIGS, NUM_PATCHES
    dim = int(np.shape(sd["pos_embed"])[-1])
    if np.shape(sd["pos_embed"])[1] != NUM_PATCHES:
        raise ValueError(f"pos_embed has {np.shape(sd['pos_embed'])[1]} tokens; pfc_jax's ViT "
                         f"has {NUM_PATCHES} (112x112 images, 9x9 patches)")
    pat = re.compile(r"^blocks\.(\d+)\.")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := pat.match(k))), default=-1)
    for name, cfg in CONFIGS.items():
        if (cfg.embed_dim, cfg.depth) == (dim, depth):
            break
    else:
        raise ValueError(f"a ViT of width {dim} and depth {depth} is none of pfc_jax's "
                         f"{ {n: (c.embed_dim, c.depth) for n, c in CONFIGS.items()} }")
    if "feature.2.weight" not in sd:
        raise ValueError("state_dict has no feature.2.weight (the ViT's embedding layer)")
    return name, int(np.shape(sd["feature.2.weight"])[0])


def network_of(sd: Mapping[str, np.ndarray]) -> tuple[str, int]:
    """(r18 ... r200, mbf or vit_*, embedding size) from a state_dict's names and shapes."""
    if "pos_embed" in sd and "patch_embed.proj.weight" in sd:  # arcface_torch's ViT
        return _vit_network(sd)
    if "layers.0.layers.0.weight" in sd:  # arcface_torch's MobileFaceNet
        blocks = _mbf_blocks(sd)
        if blocks != MBF_BLOCKS:
            raise ValueError(f"MobileFaceNet blocks {blocks}: pfc_jax's mbf is {MBF_BLOCKS}")
        if "features.layers.2.weight" not in sd:
            raise ValueError("state_dict has no features.layers.2.weight (the GDC linear)")
        return "mbf", int(sd["features.layers.2.weight"].shape[0])
    counts = [0, 0, 0, 0]
    for k in sd:
        m = _BLOCK.match(k)
        if m:
            stage, i = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], i + 1)
    for name, layers in STAGE_LAYERS.items():
        if tuple(counts) == layers:
            break
    else:
        raise ValueError(f"blocks per stage {tuple(counts)} are none of the IResNets "
                         f"{dict(STAGE_LAYERS)} (is this an arcface_torch IResNet state_dict?)")
    if "fc.weight" not in sd:
        raise ValueError("state_dict has no fc.weight: not an arcface_torch IResNet")
    return name, int(sd["fc.weight"].shape[0])


def _take(sd, key, shape=None):
    if key not in sd:
        raise KeyError(f"state_dict lacks {key!r}")
    a = np.asarray(sd[key], np.float32)
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"state_dict {key}: shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a


def _conv(sd, key):
    return np.transpose(_take(sd, key + ".weight"), (2, 3, 1, 0))  # O I kh kw -> kh kw I O


def _bn(sd, key, params, stats, scale=True):
    if scale:
        params["scale"] = _take(sd, key + ".weight")
    params["bias"] = _take(sd, key + ".bias")
    stats["mean"] = _take(sd, key + ".running_mean")
    stats["var"] = _take(sd, key + ".running_var")


def _slot(params: dict, stats: dict, path) -> tuple[dict, dict]:
    """The nested dicts at ``path`` (module names) in ``params`` and ``stats``, made."""
    for name in path:
        params, stats = params.setdefault(name, {}), stats.setdefault(name, {})
    return params, stats


def _mbf(sd, dim):
    """MobileFaceNet: arcface_torch's Sequential indices -> pfc_jax's block names."""
    params: dict = {}
    stats: dict = {}

    def block(tp, ours, prelu=True):
        p, st = _slot(params, stats, ours)
        p["conv"] = {"kernel": _conv(sd, f"{tp}.layers.0")}
        p["bn"], st["bn"] = {}, {}
        _bn(sd, f"{tp}.layers.1", p["bn"], st["bn"])
        if prelu:
            p["prelu"] = {"slope": _take(sd, f"{tp}.layers.2.weight")}

    def depthwise(tp, ours):
        block(f"{tp}.layers.0", [ours, "expand"])
        block(f"{tp}.layers.1", [ours, "depthwise"])
        block(f"{tp}.layers.2", [ours, "project"], prelu=False)

    block("layers.0", ["stem"])
    block("layers.1", ["stem_dw"])
    for s, idx in _MBF_RES.items():
        depthwise(f"layers.{idx - 1}", f"down{s}")
        for i in range(MBF_BLOCKS[s]):
            depthwise(f"layers.{idx}.layers.{i}", f"res{s}_{i}")
    block("conv_sep", ["conv_sep"])
    block("features.layers.0", ["gdc_dw"], prelu=False)
    params["gdc_fc"] = {"kernel": np.ascontiguousarray(
        _take(sd, "features.layers.2.weight", (dim, 512)).T)}
    params["gdc_bn"], stats["gdc_bn"] = {}, {}
    _bn(sd, "features.layers.3", params["gdc_bn"], stats["gdc_bn"])
    return {"params": params, "batch_stats": stats}


def _linear(sd, key, bias=True):
    out = {"kernel": np.ascontiguousarray(_take(sd, key + ".weight").T)}
    if bias:
        out["bias"] = _take(sd, key + ".bias")
    return out


def _ln(sd, key):
    return {"scale": _take(sd, key + ".weight"), "bias": _take(sd, key + ".bias")}


def _vit(sd, depth):
    """ViT: ModuleList / Sequential indices -> pfc_jax's names, Linear weights transposed."""
    params: dict = {
        "patch_embed": {"kernel": _conv(sd, "patch_embed.proj"),
                        "bias": _take(sd, "patch_embed.proj.bias")},
        "pos_embed": _take(sd, "pos_embed"),
        "mask_token": _take(sd, "mask_token"),
        "norm": _ln(sd, "norm"),
        "feature_fc1": _linear(sd, "feature.0", bias=False),
        "feature_fc2": _linear(sd, "feature.2", bias=False),
    }
    stats: dict = {}
    for i in range(depth):
        t = f"blocks.{i}"
        params[f"block{i}"] = {
            "norm1": _ln(sd, f"{t}.norm1"), "norm2": _ln(sd, f"{t}.norm2"),
            "attn": {"qkv": _linear(sd, f"{t}.attn.qkv", bias=False),
                     "proj": _linear(sd, f"{t}.attn.proj")},
            "fc1": _linear(sd, f"{t}.mlp.fc1"), "fc2": _linear(sd, f"{t}.mlp.fc2")}
    for k, ours in (("feature.1", "feature_bn1"), ("feature.3", "feature_bn2")):
        params[ours], stats[ours] = {}, {}
        _bn(sd, k, params[ours], stats[ours])
    return {"params": params, "batch_stats": stats}


def from_state_dict(sd: Mapping[str, np.ndarray], network: str | None = None):
    """(model, variables) of pfc_jax's IResNet, mbf or ViT holding the state_dict's weights."""
    from pfc_jax import models
    name, dim = network_of(sd)
    if network is not None and network != name:
        raise ValueError(f"the state_dict is {name}, not {network}")
    model = models.get_model(name, embedding_dim=dim)
    if name in ("mbf",) or name.startswith("vit_"):
        variables = _mbf(sd, dim) if name == "mbf" else _vit(sd, model.config.depth)
        _check_tree(model, variables)
        return model, variables
    params: dict = {}
    stats: dict = {}

    def bn(key, ours, scale=True):
        _bn(sd, key, *_slot(params, stats, ours), scale)

    params["conv1"] = {"kernel": _conv(sd, "conv1")}
    bn("bn1", ["bn1"])
    params["prelu"] = {"slope": _take(sd, "prelu.weight")}
    for stage, blocks in enumerate(STAGE_LAYERS[name]):
        for i in range(blocks):
            t, ours = f"layer{stage + 1}.{i}", f"layer{stage + 1}_{i}"
            blk = params.setdefault(ours, {})
            for c in ("conv1", "conv2"):
                blk[c] = {"kernel": _conv(sd, f"{t}.{c}")}
            for b in ("bn1", "bn2", "bn3"):
                bn(f"{t}.{b}", [ours, b])
            blk["prelu"] = {"slope": _take(sd, f"{t}.prelu.weight")}
            if f"{t}.downsample.0.weight" in sd:
                blk["downsample_conv"] = {"kernel": _conv(sd, f"{t}.downsample.0")}
                bn(f"{t}.downsample.1", [ours, "downsample_bn"])
    bn("bn2", ["bn2"])
    w = _take(sd, "fc.weight")  # [E, C * H * W], PyTorch's (C, H, W) flattening
    c = params["layer4_0"]["conv2"]["kernel"].shape[-1]
    hw = int(round((w.shape[1] // c) ** 0.5))
    if c * hw * hw != w.shape[1]:
        raise ValueError(f"fc.weight has {w.shape[1]} inputs, not {c} x H x W")
    kernel = w.reshape(dim, c, hw, hw).transpose(2, 3, 1, 0).reshape(hw * hw * c, dim)
    params["fc"] = {"kernel": np.ascontiguousarray(kernel), "bias": _take(sd, "fc.bias")}
    feat_p, feat_s = {}, {}
    _bn(sd, "features", feat_p, feat_s, scale=False)
    scale = _take(sd, "features.weight")
    if np.any(scale <= 0):
        raise ValueError("features.weight has entries <= 0: pfc_jax's last BatchNorm has no "
                         "scale to carry them")
    feat_s["var"] = ((feat_s["var"] + BN_EPS) / scale**2 - BN_EPS).astype(np.float32)
    params["features"], stats["features"] = feat_p, feat_s
    variables = {"params": params, "batch_stats": stats}
    _check_tree(model, variables)
    return model, variables


def _check_tree(model, variables) -> None:
    """Every parameter pfc_jax's model has, with its shape, and nothing else."""
    import jax
    from pfc_jax import models
    want = models.abstract_variables(model)
    flat_want = {jax.tree_util.keystr(p): a.shape
                 for p, a in jax.tree_util.tree_leaves_with_path(want)}
    flat_got = {jax.tree_util.keystr(p): np.shape(a)
                for p, a in jax.tree_util.tree_leaves_with_path(variables)}
    missing = sorted(set(flat_want) - set(flat_got))
    extra = sorted(set(flat_got) - set(flat_want))
    if missing or extra:
        raise ValueError(f"imported tree differs from pfc_jax's: missing {missing[:5]}, "
                         f"extra {extra[:5]}")
    for k, shape in flat_want.items():
        if tuple(flat_got[k]) != tuple(shape):
            raise ValueError(f"imported {k}: shape {flat_got[k]}, pfc_jax wants {shape}")


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description="Import arcface_torch IResNet / mbf / ViT "
                                             "weights, or an InsightFace recognition ONNX model.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--torch", metavar="PTH", help="an arcface_torch backbone.pth (state_dict)")
    src.add_argument("--onnx", metavar="FILE", help="an InsightFace recognition .onnx "
                     "(pfc_jax.onnx_import)")
    ap.add_argument("--calibrate", metavar="BIN", help="with --onnx: a verification .bin whose "
                    "faces set the statistics of folded BatchNorms (default: synthetic faces)")
    ap.add_argument("--out", required=True, help="the pfc_jax export directory to write")
    from pfc_jax.models.vit import CONFIGS as VIT_CONFIGS
    ap.add_argument("--network", choices=sorted(STAGE_LAYERS) + ["mbf"] + sorted(VIT_CONFIGS),
                    help="check the state_dict is this network")
    args = ap.parse_args(argv)
    if args.onnx:
        from pfc_jax import onnx_import
        return onnx_import.main(["--onnx", args.onnx, "--out", args.out]
                                + (["--network", args.network] if args.network else [])
                                + (["--calibrate", args.calibrate] if args.calibrate else []))
    sd = load_state_dict(args.torch)
    model, variables = from_state_dict(sd, args.network)
    name, dim = network_of(sd)
    from pfc_jax import export
    out = export.write_export(name, dim, variables, args.out,
                              imported_from=os.path.abspath(args.torch))
    print(f"{args.torch}: {name}, {dim}-d embeddings -> {out}")
    return out


run = platform.entry_point(main, __name__)
