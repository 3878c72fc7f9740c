"""Face-recognition backbones: IResNet, MobileFaceNet and ViT (Flax linen).

All take NHWC float images normalised as (x - 127.5) / 127.5, of size 112x112x3,
and return [B, embedding_dim] float32 features (not L2-normalised).  Parameters
are float32 whatever the compute ``dtype``; BatchNorm statistics live in the
``batch_stats`` collection.  Call as ``model.apply(variables, x, train=...)``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pfc_jax.models import grouped_conv
from pfc_jax.models.iresnet import STAGE_LAYERS, IResNet
from pfc_jax.models.mobilefacenet import mobilefacenet
from pfc_jax.models.tiny import TINY_NAMES, tiny
from pfc_jax.models.vit import CONFIGS as VIT_CONFIGS
from pfc_jax.models.vit import VisionTransformer

NAMES: tuple[str, ...] = ("r18", "r34", "r50", "r100", "r200", "mbf",
                          "vit_t", "vit_s", "vit_b", "vit_l")
ALL_NAMES: tuple[str, ...] = NAMES + TINY_NAMES  # plus small CPU backbones (models/tiny.py)


ATTENTION_NAMES = tuple(n for n in ALL_NAMES if n.startswith("r") or n == "mbf")


def get_model(name: str, embedding_dim: int = 512, dtype: Any = jnp.float32,
              dropout: float = 0.0, conv_impl: str = "auto",
              attention: bool = False, attention_gate: str = "softmax") -> nn.Module:
    """Build backbone ``name`` (one of ``NAMES``).

    ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); ``dropout`` is the
    rate of the IResNet head dropout or the ViT drop rate.  MobileFaceNet has no
    dropout layer, so a non-zero rate for it is an error rather than ignored.
    ``conv_impl`` is how the CNNs compute their convolutions
    (``models.grouped_conv``: ``auto`` = the CPU's forms on the CPU, grouped
    convolutions tap by tap and dense kernels' gradients by tap, XLA's
    convolutions elsewhere; the same parameters and outputs either way).
    ``attention``: perceptibility attention on the last feature map
    (``models.attention``; IResNets and MobileFaceNet); ``attention_gate``: its
    form, ``softmax`` over positions or ``sigmoid`` per position.
    """
    grouped_conv.resolve(conv_impl)  # validates
    if name not in ALL_NAMES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(ALL_NAMES)}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if attention and name not in ATTENTION_NAMES:
        raise ValueError(f"backbone {name!r} has no perceptibility attention; it is built "
                         f"for {', '.join(ATTENTION_NAMES)}")
    from pfc_jax.models.attention import GATES
    if attention_gate not in GATES:
        raise ValueError(f"attention_gate must be one of {GATES}, got {attention_gate!r}")
    if name in VIT_CONFIGS:  # dropout is the ViT's drop rate
        return VisionTransformer(config=VIT_CONFIGS[name], embedding_dim=embedding_dim,
                                 drop_rate=dropout, dtype=dtype, arch=name)
    if name in TINY_NAMES:
        return tiny(name, embedding_dim, dtype, dropout, attention, attention_gate, conv_impl)
    if name in STAGE_LAYERS:
        return IResNet(layers=STAGE_LAYERS[name], embedding_dim=embedding_dim,
                       dropout=dropout, dtype=dtype, arch=name, attention=attention,
                       attention_gate=attention_gate, conv_impl=conv_impl)
    if dropout != 0.0:
        raise ValueError(f"backbone 'mbf' has no dropout layer; got dropout={dropout}")
    return mobilefacenet(embedding_dim, dtype, conv_impl, attention, attention_gate)


def from_config(model_config) -> nn.Module:
    """The backbone a config's ``model`` block names (``name``, ``embedding_dim``,
    ``dtype``, ``dropout``, ``conv_impl``, ``attention``, ``attention_gate``; the last five
    may be absent)."""
    get = model_config.get  # a ConfigDict or a dict
    return get_model(get("name"), embedding_dim=int(get("embedding_dim")),
                     dtype=jnp.dtype(get("dtype") or "float32"),
                     dropout=float(get("dropout") or 0.0),
                     conv_impl=get("conv_impl") or "auto",
                     attention=bool(get("attention") or False),
                     attention_gate=get("attention_gate") or "softmax")


INPUT_SHAPE = (112, 112, 3)


def abstract_variables(model: nn.Module) -> dict:
    """``{"params", "batch_stats"}`` of ``model`` as shapes, for a restore target."""
    out = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                           jnp.zeros((1, *INPUT_SHAPE)), train=False))
    return {"params": out["params"], "batch_stats": out.get("batch_stats", {})}


def count_params(params: Any) -> int:
    """Number of trainable scalars in a ``params`` tree (arrays or ShapeDtypeStructs).

    Counts what the reference counts as trainable: conv/linear weights and biases,
    norm scales and offsets, PReLU slopes, position embeddings and the mask token.
    BatchNorm running statistics live in ``batch_stats`` and are not passed here;
    the reference's frozen scales have no parameter at all in these models.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


__all__ = ["ALL_NAMES", "INPUT_SHAPE", "NAMES", "abstract_variables", "count_params",
           "from_config", "get_model"]
