"""Import of InsightFace recognition ONNX models (the model zoo's format) into pfc_jax.

    pfc-import --onnx w600k_r50.onnx --out /models/w600k_r50 [--calibrate lfw.bin]

The model zoo's recognition files (``w600k_r50.onnx``, ``glintr100.onnx``,
``w600k_mbf.onnx`` ...) are arcface_torch IResNets and MobileFaceNets
written by PyTorch's ONNX exporter in eval mode. Their initializers carry
the exporter's names (``onnx::Conv_683``), not the layers', and every
BatchNorm that follows a convolution is folded into it (a convolution with a
bias). So the import goes by the graph, not by names:

1. the parametrised nodes are read in graph order: ``Conv`` (weight, bias),
   ``BatchNormalization``, ``PRelu``, ``Gemm`` / ``MatMul`` (+ ``Add``);
   constants reached through ``Identity`` / ``Constant`` nodes are resolved;
2. the network is found from them (grouped convolutions: MobileFaceNet;
   otherwise the IResNet whose convolution count matches; the embedding size
   from the last linear layer);
3. pfc_jax's own layers of that network, in the order its forward calls them
   (recorded with ``flax.linen.intercept_methods``), are filled one by one
   from the ONNX sequence, every shape checked. A convolution with a bias
   followed in pfc_jax by a BatchNorm is a folded pair: the kernel is the
   folded kernel, and the BatchNorm is set to add the bias and otherwise
   pass its input through. ``BatchNormalization`` epsilons other than
   pfc_jax's are carried by the variance, a missing BN scale (IResNet's last
   BN) likewise, a linear layer's bias before a bias-free BN by its mean;
   IResNet's FC weight is re-ordered from the ``(C, H, W)`` flattening.
4. **calibration**: a folded BatchNorm reproduces the model exactly in
   inference, but in training mode it would normalise by batch statistics
   the original never saw at that point. So the statistics of every folded
   pair's convolution output are measured on calibration images (a ``.bin``
   set with ``--calibrate``, else synthetic faces) and written into the BN
   as mean and variance, with scale ``sqrt(var + eps)`` and bias ``mean +
   folded bias`` (every folded pair of IResNet and MobileFaceNet; a folded BN
   without a scale would keep the pass-through form): inference is unchanged (the algebra is exact), and a
   fine-tune (``--config.init_from``) starts with training-mode outputs
   close to the inference ones on such images.
5. With onnxruntime installed, the file and the import are run on the
   calibration images and the largest difference of normalised embeddings
   is printed; above 1e-3 the import fails.

A graph that begins by normalising its own input, ``(x - 127.5) / 127.5``,
has that step dropped (pfc_jax's caller normalises); any other leading
arithmetic on the input is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np

from pfc_jax import platform

VERIFY_TOL = 1e-3


@dataclasses.dataclass
class Event:
    """One parametrised ONNX node, in pfc_jax's layouts."""

    kind: str                     # conv | bn | prelu | dense
    node: str                     # the ONNX node's name (for messages)
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    group: int = 1
    bn: tuple | None = None       # (scale, bias, mean, var, eps)


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
        elif node.op_type == "Identity" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    return consts


def _attr(node, name, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def read_events(path: str) -> tuple[list[Event], str, bool]:
    """The parametrised nodes of an ONNX file in graph order, its input's name, and
    whether the graph normalises its own input (then fed raw pixels)."""
    import onnx
    try:
        model = onnx.load(path)
    except Exception as e:  # noqa: BLE001 - onnx raises several kinds
        raise ValueError(f"{path}: not an ONNX model ({e})") from None
    g = model.graph
    consts = _constants(g)
    inputs = [i.name for i in g.input if i.name not in consts]
    if len(inputs) != 1:
        raise ValueError(f"{path}: expected one image input, found {inputs}")
    events: list[Event] = []
    pending_matmul: Event | None = None
    seen_conv = False
    norm = [1.0, 0.0]  # leading (x * a + b) applied to the input

    def const(name, node):
        if name not in consts:
            raise ValueError(f"{path}: node {node.name or node.op_type} takes {name!r}, "
                             "which is not a constant (an unsupported graph)")
        return np.asarray(consts[name], np.float32)

    for node in g.node:
        op, where = node.op_type, node.name or node.op_type
        if op == "Conv":
            seen_conv = True
            w = const(node.input[1], node)
            b = const(node.input[2], node) if len(node.input) > 2 and node.input[2] else None
            events.append(Event("conv", where, np.transpose(w, (2, 3, 1, 0)), b,
                                group=int(_attr(node, "group", 1))))
        elif op == "BatchNormalization":
            s, bb, m, v = (const(n, node) for n in node.input[1:5])
            events.append(Event("bn", where, bn=(s, bb, m, v,
                                                 float(_attr(node, "epsilon", 1e-5)))))
        elif op == "PRelu":
            events.append(Event("prelu", where, const(node.input[1], node).reshape(-1)))
        elif op == "Gemm":
            w = const(node.input[1], node)
            if not _attr(node, "transB", 0):
                w = w.T
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 \
                    or _attr(node, "beta", 1.0) != 1.0:
                raise ValueError(f"{path}: Gemm {where} with transA/alpha/beta is not supported")
            b = const(node.input[2], node) if len(node.input) > 2 and node.input[2] else None
            events.append(Event("dense", where, np.ascontiguousarray(w.T), b))
        elif op == "MatMul" and node.input[1] in consts:
            pending_matmul = Event("dense", where, const(node.input[1], node), None)
            events.append(pending_matmul)
        elif op == "Add" and pending_matmul is not None and node.input[1] in consts \
                and events[-1] is pending_matmul:
            pending_matmul.bias = const(node.input[1], node).reshape(-1)
            pending_matmul = None
        elif op in ("Sub", "Mul", "Div", "Add") and seen_conv and any(
                n in consts for n in node.input):
            raise ValueError(f"{path}: node {where} ({op} with a constant) between the layers "
                             "is not part of an IResNet or MobileFaceNet as pfc_jax reads them")
        elif op in ("Sub", "Mul", "Div", "Add") and not seen_conv and any(
                n in consts for n in node.input):
            c = float(np.asarray(const(next(n for n in node.input if n in consts), node)).mean())
            if op == "Sub":
                norm[1] -= c
            elif op == "Add":
                norm[1] += c
            elif op == "Mul":
                norm = [norm[0] * c, norm[1] * c]
            else:
                norm = [norm[0] / c, norm[1] / c]
    if norm != [1.0, 0.0] and not np.allclose(norm, [1 / 127.5, -1.0], rtol=1e-4):
        raise ValueError(f"{path}: the graph maps its input x to {norm[0]:.6g} x + "
                         f"{norm[1]:.6g}; pfc_jax models take (x - 127.5) / 127.5")
    return events, inputs[0], norm != [1.0, 0.0]


def network_of(events: list[Event]) -> tuple[str, int]:
    """(r18 ... r200 or mbf, embedding size) from the parametrised nodes."""
    from pfc_jax.models.iresnet import STAGE_LAYERS
    convs = [e for e in events if e.kind == "conv"]
    dense = [e for e in events if e.kind == "dense"]
    if not convs or not dense:
        raise ValueError(f"{len(convs)} convolutions and {len(dense)} linear layers: not an "
                         "IResNet or MobileFaceNet recognition model")
    dim = int(dense[-1].weight.shape[1])
    if any(e.group > 1 for e in convs):
        return "mbf", dim
    for name, layers in STAGE_LAYERS.items():
        if 1 + 2 * sum(layers) + 4 == len(convs):
            return name, dim
    raise ValueError(f"{len(convs)} convolutions match no IResNet "
                     f"({ {n: 1 + 2 * sum(l) + 4 for n, l in STAGE_LAYERS.items()} })")


def _layer_calls(model) -> list[tuple[tuple[str, ...], str, float | None]]:
    """pfc_jax's parametrised layers ``(path, kind, BN epsilon)`` in the order the
    forward calls them."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from pfc_jax.models.grouped_conv import GroupedConv
    from pfc_jax.models.iresnet import PReLU
    kinds = {nn.Conv: "conv", GroupedConv: "conv", nn.BatchNorm: "bn", PReLU: "prelu",
             nn.Dense: "dense"}
    calls: list = []

    def record(next_fun, args, kwargs, ctx):
        kind = kinds.get(type(ctx.module))
        at = tuple(ctx.module.path)
        if ctx.method_name == "__call__" and kind and at not in {c[0] for c in calls}:
            calls.append((at, kind, getattr(ctx.module, "epsilon", None)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)),
                                          train=False))
    return calls


def _get(tree: dict, path):
    for p in path:
        tree = tree[p]
    return tree


def fill(model, events: list[Event], path: str = "model"):
    """pfc_jax variables from the events; returns ``(variables, folded)`` where
    ``folded`` maps each folded BN's path to (its convolution's path, the folded
    bias, the BN's epsilon)."""
    import jax

    from pfc_jax import models
    target = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                    models.abstract_variables(model))
    params, stats = target["params"], target.get("batch_stats", {})
    folded: dict = {}
    i, last_channels = 0, None
    pending = None  # (kind, path, bias) of a conv / linear layer whose bias is not yet placed

    def take(kind, at):
        nonlocal i
        if i >= len(events):
            raise ValueError(f"{path}: the ONNX graph ends before pfc_jax's {'/'.join(at)} "
                             f"({kind})")
        e = events[i]
        if e.kind != kind:
            raise ValueError(f"{path}: node {e.node} is a {e.kind} where pfc_jax's "
                             f"{'/'.join(at)} wants a {kind}")
        i += 1
        return e

    def put(tree, at, name, value):
        slot = _get(tree, at)
        if tuple(slot[name].shape) != tuple(np.shape(value)):
            raise ValueError(f"{path}: {'/'.join(at)}/{name} has shape {slot[name].shape}, "
                             f"the ONNX node gives {np.shape(value)}")
        slot[name] = np.asarray(value, slot[name].dtype)

    def weights_with_bias(kind, at, e, p):
        """Puts a bias where the layer has one; else it waits for the next BN."""
        if "bias" in p:
            put(params, at, "bias", e.bias if e.bias is not None else 0 * p["bias"])
            return None
        return (kind, at, e.bias) if e.bias is not None else None

    for at, kind, eps in _layer_calls(model):
        p = _get(params, at)
        if pending is not None and kind != "bn":
            raise ValueError(f"{path}: the bias of pfc_jax's {'/'.join(pending[1])} has no "
                             f"BatchNorm after it to carry it (next: {'/'.join(at)})")
        if kind == "conv":
            e = take("conv", at)
            put(params, at, "kernel", e.weight)
            pending = weights_with_bias("conv", at, e, p)
            last_channels = e.weight.shape[-1]
        elif kind == "bn":
            if pending is not None and pending[0] == "conv":  # a BN folded into the conv
                _, conv_at, b = pending
                if "scale" in p:
                    put(params, at, "scale", np.ones_like(b))
                put(params, at, "bias", b)
                put(stats, at, "mean", np.zeros_like(b))
                put(stats, at, "var", np.full_like(b, 1.0 - eps))
                folded[at] = (conv_at, b, eps)
            else:
                e = take("bn", at)
                scale, bias, mean, var, e_eps = e.bn
                if pending is not None:  # a linear layer's bias before this BN: into the mean
                    mean = mean - pending[2]
                var = var + e_eps - eps
                if "scale" in p:
                    put(params, at, "scale", scale)
                else:
                    if np.any(scale <= 0):
                        raise ValueError(f"{path}: node {e.node} has scale entries <= 0 that "
                                         f"pfc_jax's scale-free {'/'.join(at)} cannot carry")
                    var = (var + eps) / scale**2 - eps
                put(params, at, "bias", bias)
                put(stats, at, "mean", mean)
                put(stats, at, "var", var)
            pending = None
        elif kind == "prelu":
            put(params, at, "slope", take("prelu", at).weight)
        else:  # dense
            e = take("dense", at)
            w = e.weight
            c = last_channels or w.shape[0]
            hw = w.shape[0] // c
            if hw > 1 and c * hw == w.shape[0]:  # (C, H, W) flattening -> (H, W, C)
                w = w.reshape(c, hw, w.shape[1]).transpose(1, 0, 2).reshape(w.shape)
            put(params, at, "kernel", w)
            last_channels = w.shape[1]
            pending = weights_with_bias("dense", at, e, p)
    if pending is not None:
        raise ValueError(f"{path}: the bias of pfc_jax's {'/'.join(pending[1])} has no "
                         "BatchNorm after it to carry it")
    if i != len(events):
        raise ValueError(f"{path}: {len(events) - i} parametrised nodes left over after "
                         f"pfc_jax's layers (first: {events[i].node}, a {events[i].kind})")
    return target, folded


def calibrate(model, variables, folded: dict, images: np.ndarray):
    """Folded BNs get the statistics of their convolution's output on ``images``
    (mean, var; scale ``sqrt(var + eps)``, bias ``mean + b``): inference unchanged."""
    import jax

    from pfc_jax.data.augment import normalize
    if not folded:
        return variables
    convs = {v[0] for v in folded.values()}

    def keep(mdl, method):
        return method == "__call__" and tuple(mdl.path) in convs

    _, state = jax.jit(lambda v, x: model.apply(v, normalize(x), train=False,
                                                capture_intermediates=keep,
                                                mutable=["intermediates"]))(variables, images)
    inter = state["intermediates"]
    for bn_at, (conv_at, b, eps) in folded.items():
        y = np.asarray(_get(inter, conv_at)["__call__"][0], np.float64)
        y = y.reshape(-1, y.shape[-1])
        m, v = y.mean(0), y.var(0)
        p, s = _get(variables["params"], bn_at), _get(variables["batch_stats"], bn_at)
        if "scale" not in p:  # no scale to undo the variance: keep the pass-through form
            continue
        s["mean"], s["var"] = m.astype(np.float32), v.astype(np.float32)
        p["scale"] = np.sqrt(v + eps).astype(np.float32)
        p["bias"] = (m + b).astype(np.float32)
    return variables


def calibration_images(bin_path: str | None, n: int = 32) -> np.ndarray:
    """``n`` uint8 faces: from a verification ``.bin``, else synthetic ones."""
    if bin_path:
        from pfc_jax.evaluate import verification
        return verification.load_bin(bin_path).images[:n]
    from pfc_jax.data.synthetic import SyntheticFaces
    faces = SyntheticFaces((n + 1) // 2, 2, seed=0)
    return np.stack([faces[i]["image"] for i in range(n)])


def onnx_difference(path: str, input_name: str, model, variables, images,
                    raw_input: bool = False) -> float:
    """Largest |a - b| of L2-normalised embeddings: ONNX Runtime (fed normalised
    images, or uint8 values as float32 with ``raw_input``) against pfc_jax."""
    import jax
    import onnxruntime as ort

    from pfc_jax.data.augment import normalize
    from pfc_jax.evaluate import verification
    x = np.asarray(normalize(images), np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = np.asarray(images, np.float32) if raw_input else x
    want = sess.run(None, {input_name: np.ascontiguousarray(feed.transpose(0, 3, 1, 2))})[0]
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    return float(np.abs(verification.l2_normalize(np.asarray(got, np.float64))
                        - verification.l2_normalize(np.asarray(want, np.float64))).max())


def from_onnx(path: str, network: str | None = None, calibrate_bin: str | None = None,
              verify: bool = True, calibrate_count: int = 32):
    """(model, variables, name, dim, measured difference or None) of an ONNX file."""
    from pfc_jax import models
    events, input_name, self_normalising = read_events(path)
    name, dim = network_of(events)
    if network is not None and network != name:
        raise ValueError(f"{path} is {name}, not {network}")
    model = models.get_model(name, embedding_dim=dim)
    if name == "mbf":
        model = model.clone(conv_impl="conv")  # the import's forwards; same parameters
    variables, folded = fill(model, events, path)
    images = calibration_images(calibrate_bin, calibrate_count)
    variables = calibrate(model, variables, folded, images)
    diff = None
    if verify:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            verify = False
    if verify:
        diff = onnx_difference(path, input_name, model, variables, images[:8],
                               raw_input=self_normalising)
        if diff > VERIFY_TOL:
            raise ValueError(f"{path}: imported as {name}, but its embeddings differ from "
                             f"ONNX Runtime's by {diff:.2e} (> {VERIFY_TOL:g}); the graph is "
                             "not the layout pfc_jax reads")
    return model, variables, name, dim, diff


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description="Import an InsightFace recognition ONNX model.")
    ap.add_argument("--onnx", required=True, help="the .onnx file")
    ap.add_argument("--out", required=True, help="the pfc_jax export directory to write")
    ap.add_argument("--network", help="check the file is this network (r50, mbf, ...)")
    ap.add_argument("--calibrate", metavar="BIN", help="a verification .bin whose faces set "
                    "the statistics of folded BatchNorms (default: synthetic faces)")
    args = ap.parse_args(argv)
    model, variables, name, dim, diff = from_onnx(args.onnx, args.network, args.calibrate)
    from pfc_jax import export
    out = export.write_export(name, dim, variables, args.out,
                              imported_from=os.path.abspath(args.onnx))
    check = ("not checked (onnxruntime is not installed)" if diff is None
             else f"max difference to ONNX Runtime {diff:.1e}")
    print(f"{args.onnx}: {name}, {dim}-d embeddings -> {out} ({check})")
    return out
