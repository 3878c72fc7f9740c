"""ONNX export of a backbone, by translating its inference jaxpr op by op.

    pfc-export --workdir W --out DIR --format onnx      # DIR/model.onnx (+ the msgpack export)

The file follows the InsightFace recognition convention, so its tools take
it as it is: one input ``[N, 3, 112, 112]`` float32 RGB in NCHW, normalised
by the caller as ``(x - 127.5) / 127.5``, a dynamic batch ``N``, one output
``[N, D]`` (the embedding, not normalised). Inference form only: BatchNorm
uses its running statistics, dropout is off.

How. The backbone's ``apply(variables, x, train=False)`` is traced once with
a symbolic batch (``jax.export.symbolic_shape``) to a jaxpr, and each of its
primitives becomes the ONNX operator(s) with the same semantics; the
variables become initializers. Anything computed only from variables (BN's
``scale * rsqrt(var + eps)``, broadcasts of parameters) is evaluated here
once and stored as a constant, so the graph holds the arithmetic the input
flows through. Convolutions are NCHW in ONNX and NHWC here: each is wrapped
in the two transposes its dimension numbers ask for, which ONNX Runtime's
optimiser cancels between consecutive convolutions. Grouped convolutions
are exported as XLA convolutions (``conv_impl="conv"``), whatever the
trainer ran. A primitive without a translation raises
``NotImplementedError`` naming it.

Why not a converter package: ``jax2onnx`` pins an older orbax-checkpoint
than the trainer's and pulls equinox and huggingface_hub; ``jax2tf`` +
``tf2onnx`` needs TensorFlow. The translation below covers the primitives
the backbones use and depends on ``onnx`` (the format's own library) alone;
the tests check every backbone family's file against pfc_jax with ONNX
Runtime.
"""

from __future__ import annotations

from typing import Any

import numpy as np

OPSET = 17
INPUT, OUTPUT = "input", "embedding"
BATCH = "N"  # the dynamic batch dimension's name in the file


def _is_literal(v) -> bool:
    from jax.extend import core
    return isinstance(v, core.Literal)


class _Graph:
    """Nodes and initializers of the graph being built, and the jaxpr value map."""

    def __init__(self):
        import onnx
        self.onnx = onnx
        self.nodes: list = []
        self.inits: list = []
        self.env: dict = {}  # jaxpr Var -> ("const", np.ndarray) | ("name", str)
        self._n = 0
        self._batch = None

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, hint: str = "c") -> str:
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        n = self.name(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(arr, n))
        return n

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], **attrs))
        return out

    def batch(self) -> str:
        """A 1-D int64 tensor ``[N]``: the input's batch size."""
        if self._batch is None:
            shape = self.node("Shape", [INPUT])
            self._batch = self.node("Slice", [shape, self.const(np.array([0], np.int64)),
                                              self.const(np.array([1], np.int64))], "batch")
        return self._batch

    def shape(self, dims) -> str:
        """A 1-D int64 shape tensor for ``dims`` (ints, or the symbolic batch)."""
        if all(isinstance(d, int) for d in dims):
            return self.const(np.array(dims, np.int64), "shape")
        parts, run = [], []
        for d in dims:
            if isinstance(d, int):
                run.append(d)
                continue
            if str(d) != "b":
                raise NotImplementedError(f"ONNX export: shape dimension {d} (only the batch "
                                          "may be symbolic)")
            if run:
                parts.append(self.const(np.array(run, np.int64), "shape"))
                run = []
            parts.append(self.batch())
        if run:
            parts.append(self.const(np.array(run, np.int64), "shape"))
        return parts[0] if len(parts) == 1 else self.node("Concat", parts, "shape", axis=0)


def _dims(aval) -> list:
    return [int(d) if isinstance(d, (int, np.integer)) else d for d in aval.shape]


def _sub_jaxpr(eqn):
    """The inner (closed) jaxpr of a call-like primitive, or None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        if inner is not None:
            return inner
    return None


def _eval_const(eqn, vals):
    import jax
    inner = _sub_jaxpr(eqn)
    if inner is not None and eqn.primitive.name in ("pjit", "jit", "custom_jvp_call",
                                                    "custom_vjp_call", "closed_call"):
        jaxpr = getattr(inner, "jaxpr", inner)
        consts = getattr(inner, "consts", [])
        return jax.core.eval_jaxpr(jaxpr, consts, *vals)
    out = eqn.primitive.bind(*vals, **eqn.params)
    return out if eqn.primitive.multiple_results else [out]


def _emit_jaxpr(g: _Graph, jaxpr, consts, args):
    """Translates ``jaxpr`` with its constvars bound to ``consts`` and invars to ``args``."""
    for v, c in zip(jaxpr.constvars, consts):
        g.env[v] = ("const", np.asarray(c))
    for v, a in zip(jaxpr.invars, args):
        g.env[v] = a
    for eqn in jaxpr.eqns:
        ins = []
        for v in eqn.invars:
            ins.append(("const", np.asarray(v.val)) if _is_literal(v) else g.env[v])
        if all(kind == "const" for kind, _ in ins) and not any(
                not isinstance(d, int) for o in eqn.outvars for d in _dims(o.aval)):
            outs = _eval_const(eqn, [val for _, val in ins])
            for o, val in zip(eqn.outvars, outs):
                g.env[o] = ("const", np.asarray(val))
            continue
        outs = _emit(g, eqn, ins)
        for o, name in zip(eqn.outvars, outs):
            g.env[o] = ("name", name)
    return [("const", np.asarray(v.val)) if _is_literal(v) else g.env[v] for v in jaxpr.outvars]


def _name(g: _Graph, x, dtype=None) -> str:
    kind, val = x
    if kind == "name":
        return val
    arr = np.asarray(val)
    if dtype is not None:
        arr = arr.astype(dtype)
    return g.const(arr)


_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
           "pow": "Pow"}
_UNARY = {"exp": "Exp", "log": "Log", "tanh": "Tanh", "sqrt": "Sqrt", "neg": "Neg",
          "abs": "Abs", "erf": "Erf", "logistic": "Sigmoid", "sign": "Sign"}
_COMPARE = {"ge": "GreaterOrEqual", "gt": "Greater", "le": "LessOrEqual", "lt": "Less",
            "eq": "Equal"}
_ONNX_DTYPE = {np.dtype(np.float32): 1, np.dtype(np.int32): 6, np.dtype(np.int64): 7,
               np.dtype(np.bool_): 9, np.dtype(np.float16): 10}


def _emit(g: _Graph, eqn, ins) -> list[str]:
    p, prim = eqn.params, eqn.primitive.name
    out_aval = eqn.outvars[0].aval
    in_dtype = np.dtype(eqn.invars[0].aval.dtype)

    def operand(i, like=None):
        dt = np.dtype((like or eqn.invars[i]).aval.dtype)
        return _name(g, ins[i], dt)

    if prim in ("pjit", "jit", "custom_jvp_call", "custom_vjp_call", "closed_call",
                "remat", "checkpoint"):
        inner = _sub_jaxpr(eqn)
        jaxpr = getattr(inner, "jaxpr", inner)
        outs = _emit_jaxpr(g, jaxpr, getattr(inner, "consts", []), ins)
        return [_name(g, o) for o in outs]
    if prim in _BINARY:
        return [g.node(_BINARY[prim], [operand(0), operand(1)])]
    if prim in _UNARY:
        return [g.node(_UNARY[prim], [operand(0)])]
    if prim in _COMPARE:
        return [g.node(_COMPARE[prim], [operand(0), operand(1)])]
    if prim == "rsqrt":
        return [g.node("Reciprocal", [g.node("Sqrt", [operand(0)])])]
    if prim == "square":
        x = operand(0)
        return [g.node("Mul", [x, x])]
    if prim == "integer_pow":
        x, y = operand(0), int(p["y"])
        if y == 2:
            return [g.node("Mul", [x, x])]
        return [g.node("Pow", [x, g.const(np.array(float(y), in_dtype))])]
    if prim in ("stop_gradient", "copy", "copy_p", "optimization_barrier"):
        return [operand(i) for i in range(len(eqn.invars))]
    if prim == "convert_element_type":
        to = np.dtype(p["new_dtype"])
        return [g.node("Cast", [operand(0)], to=_ONNX_DTYPE[to])]
    if prim == "select_n":
        if len(eqn.invars) != 3:
            raise NotImplementedError("ONNX export: select_n with more than two cases")
        pred = operand(0)
        if np.dtype(eqn.invars[0].aval.dtype) != np.bool_:
            pred = g.node("Cast", [pred], to=9)
        return [g.node("Where", [pred, operand(2), operand(1)])]
    if prim == "broadcast_in_dim":
        shape, bdims = _dims(out_aval), tuple(p["broadcast_dimensions"])
        x = operand(0)
        in_shape = _dims(eqn.invars[0].aval)
        new_axes = [i for i in range(len(shape)) if i not in bdims]
        if new_axes:
            x = g.node("Unsqueeze", [x, g.const(np.array(new_axes, np.int64), "axes")])
        expanded = [1] * len(shape)
        for src, dst in enumerate(bdims):
            expanded[dst] = in_shape[src]
        if [str(d) for d in expanded] != [str(d) for d in shape]:
            x = g.node("Expand", [x, g.shape(shape)])
        return [x]
    if prim == "reshape":
        if p.get("dimensions") is not None:
            raise NotImplementedError("ONNX export: reshape with dimensions")
        return [g.node("Reshape", [operand(0), g.shape(_dims(out_aval))])]
    if prim == "squeeze":
        return [g.node("Squeeze", [operand(0), g.const(np.array(p["dimensions"], np.int64),
                                                        "axes")])]
    if prim == "expand_dims":
        return [g.node("Unsqueeze", [operand(0), g.const(np.array(p["dimensions"], np.int64),
                                                          "axes")])]
    if prim == "transpose":
        return [g.node("Transpose", [operand(0)], perm=list(p["permutation"]))]
    if prim in ("reduce_sum", "reduce_max", "reduce_min"):
        axes = list(p["axes"])
        if prim == "reduce_sum":
            return [g.node("ReduceSum", [operand(0), g.const(np.array(axes, np.int64), "axes")],
                           keepdims=0)]
        op = "ReduceMax" if prim == "reduce_max" else "ReduceMin"
        return [g.node(op, [operand(0)], axes=axes, keepdims=0)]
    if prim == "concatenate":
        return [g.node("Concat", [operand(i) for i in range(len(eqn.invars))],
                       axis=int(p["dimension"]))]
    if prim == "slice":
        starts, limits = list(p["start_indices"]), list(p["limit_indices"])
        strides = list(p["strides"] or [1] * len(starts))
        big = np.iinfo(np.int64).max
        limits = [big if not isinstance(lim, int) else lim for lim in limits]
        return [g.node("Slice", [operand(0), g.const(np.array(starts, np.int64)),
                                 g.const(np.array(limits, np.int64)),
                                 g.const(np.array(list(range(len(starts))), np.int64)),
                                 g.const(np.array(strides, np.int64))])]
    if prim == "pad":
        cfg = p["padding_config"]
        if any(interior for _, _, interior in cfg):
            raise NotImplementedError("ONNX export: interior padding")
        lo, hi = [c[0] for c in cfg], [c[1] for c in cfg]
        x = operand(0)
        if any(v < 0 for v in lo + hi):
            raise NotImplementedError("ONNX export: negative padding")
        return [g.node("Pad", [x, g.const(np.array(lo + hi, np.int64)),
                               _name(g, ins[1], in_dtype)], mode="constant")]
    if prim == "gather":
        return [_gather(g, eqn, ins)]
    if prim == "conv_general_dilated":
        return [_conv(g, eqn, ins)]
    if prim == "dot_general":
        return [_dot(g, eqn, ins)]
    raise NotImplementedError(f"ONNX export: no translation for the JAX primitive {prim!r} "
                              f"(in {eqn})")


def _gather(g: _Graph, eqn, ins) -> str:
    """The gather of ``x[:, :, i]`` (a constant index along one axis) as ONNX Gather."""
    p = eqn.params
    dn = p["dimension_numbers"]
    operand = eqn.invars[0].aval
    kind, idx = ins[1]
    sizes = [str(d) for d in p["slice_sizes"]]
    full = [str(d) for d in _dims(operand)]
    if (kind != "const" or np.size(idx) != 1 or len(dn.collapsed_slice_dims) != 1
            or tuple(dn.start_index_map) != tuple(dn.collapsed_slice_dims)
            or getattr(dn, "operand_batching_dims", ())):
        raise NotImplementedError(f"ONNX export: a gather other than a constant index along "
                                  f"one axis ({dn})")
    axis = dn.collapsed_slice_dims[0]
    if sizes[axis] != "1" or any(sizes[i] != full[i] for i in range(len(full)) if i != axis):
        raise NotImplementedError(f"ONNX export: a gather of partial slices ({sizes})")
    i = int(np.asarray(idx).reshape(()))
    return g.node("Gather", [_name(g, ins[0], np.float32), g.const(np.array(i, np.int64))],
                  axis=int(axis))


def _conv(g: _Graph, eqn, ins) -> str:
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    if ins[1][0] != "const":
        raise NotImplementedError("ONNX export: a convolution whose kernel is not a parameter")
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise NotImplementedError("ONNX export: transposed or batch-grouped convolution")
    kernel = np.transpose(np.asarray(ins[1][1], np.float32), rhs_spec)  # O, I, spatial
    x = g.node("Transpose", [_name(g, ins[0], np.float32)], perm=list(lhs_spec))  # N, C, sp
    pads = list(p["padding"])
    y = g.node("Conv", [x, g.const(kernel, "kernel")],
               strides=list(p["window_strides"]), dilations=list(p["rhs_dilation"]),
               pads=[lo for lo, _ in pads] + [hi for _, hi in pads],
               group=int(p["feature_group_count"]),
               kernel_shape=list(kernel.shape[2:]))
    inverse = list(np.argsort(out_spec))  # N, C, spatial -> the jaxpr's layout
    return g.node("Transpose", [y], perm=[int(i) for i in inverse])


def _dot(g: _Graph, eqn, ins) -> str:
    """dot_general as Transpose + MatMul: (batch, free, contract) x (batch, contract, free)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs_aval, rhs_aval = eqn.invars[0].aval, eqn.invars[1].aval
    if len(lc) != 1 or len(rc) != 1:
        raise NotImplementedError("ONNX export: dot_general over several contracting dims")
    lf = [i for i in range(lhs_aval.ndim) if i not in lc and i not in lb]
    rf = [i for i in range(rhs_aval.ndim) if i not in rc and i not in rb]
    if len(rf) > 1:
        raise NotImplementedError("ONNX export: dot_general with several rhs free dims")
    lperm = list(lb) + lf + list(lc)
    rperm = list(rb) + list(rc) + rf

    def arrange(i, perm, aval):
        kind, val = ins[i]
        if kind == "const":
            return g.const(np.transpose(np.asarray(val, np.float32), perm))
        if perm == list(range(aval.ndim)):
            return val
        return g.node("Transpose", [val], perm=perm)

    a, b = arrange(0, lperm, lhs_aval), arrange(1, rperm, rhs_aval)
    if not rf:  # (..., K) x (..., K): unsqueeze to a column
        b = g.node("Unsqueeze", [b, g.const(np.array([-1], np.int64), "axes")])
        out = g.node("MatMul", [a, b])
        return g.node("Squeeze", [out, g.const(np.array([-1], np.int64), "axes")])
    if not lf and lb:  # (B, K) x (B, K, N): a row
        a = g.node("Unsqueeze", [a, g.const(np.array([-2], np.int64), "axes")])
        out = g.node("MatMul", [a, b])
        return g.node("Squeeze", [out, g.const(np.array([-2], np.int64), "axes")])
    if len(lf) > 1 and lb:
        raise NotImplementedError("ONNX export: batched dot_general with several lhs free dims")
    return g.node("MatMul", [a, b])


def inference_model(model):
    """``model`` in float32 with XLA's grouped convolutions (same parameters)."""
    import dataclasses

    import jax.numpy as jnp
    names = {f.name for f in dataclasses.fields(model)}
    updates = {k: v for k, v in (("dtype", jnp.float32), ("conv_impl", "conv")) if k in names}
    return model.clone(**updates) if updates else model


def to_onnx(model, variables, *, embedding_dim: int | None = None,
            image_size: int = 112) -> Any:
    """The backbone as an ``onnx.ModelProto`` (NCHW input, dynamic batch), checked."""
    import jax
    import jax.numpy as jnp
    try:
        import onnx  # noqa: F811
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'pfc_jax[onnx]'"
                          ) from None
    model = inference_model(model)

    def forward(x_nchw):
        return model.apply(variables, jnp.transpose(x_nchw, (0, 2, 3, 1)), train=False)

    sym = jax.export.symbolic_shape(f"b, 3, {image_size}, {image_size}")
    closed = jax.make_jaxpr(forward)(jax.ShapeDtypeStruct(sym, jnp.float32))
    g = _Graph()
    (out,) = _emit_jaxpr(g, closed.jaxpr, closed.consts, [("name", INPUT)])
    out_name = _name(g, out)
    g.nodes.append(onnx.helper.make_node("Identity", [out_name], [OUTPUT]))
    dim = embedding_dim or int(closed.jaxpr.outvars[0].aval.shape[-1])
    graph = onnx.helper.make_graph(
        g.nodes, "pfc_jax_backbone",
        [onnx.helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT,
                                            [BATCH, 3, image_size, image_size])],
        [onnx.helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, [BATCH, dim])],
        g.inits)
    m = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                               producer_name="pfc_jax")
    m.ir_version = min(m.ir_version, 9)  # readable by ONNX Runtime releases of 2023 on
    onnx.checker.check_model(m)
    return m


def export_onnx(model, variables, path: str, **kw) -> str:
    """Writes ``to_onnx(model, variables)`` to ``path``; returns the path."""
    import onnx
    onnx.save(to_onnx(model, variables, **kw), path)
    return path
