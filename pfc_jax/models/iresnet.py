"""IResNet backbones (r18 ... r200) for 112x112 face crops, in Flax linen.

The "improved" residual network of ArcFace: a pre-activation style basic block
(BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the shortcut), four
stages of 64/128/256/512 channels each starting with a stride-2 block, and the
"E" output head BN -> dropout -> flatten(7x7x512) -> FC -> BN1d.  The last BN's
scale is frozen at 1 in the reference recipe, so here it has no scale at all
(``use_scale=False``): the trainable parameter count excludes those 512 values.

Also holds the small pieces shared by the other CNN backbone (per-channel
PReLU, PyTorch-style initialisers, input checks).

Layout is NHWC.  The FC weight therefore multiplies an (H, W, C)-ordered
flattening rather than PyTorch's (C, H, W) one; the parameter count and the
function class are the same.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pfc_jax.models.grouped_conv import GroupedConv

Dtype = Any
Initializer = Callable[..., jax.Array]

IMAGE_SIZE = 112
BN_MOMENTUM = 0.9  # flax running-average decay; PyTorch's momentum 0.1
BN_EPS = 1e-5

STAGE_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}


def check_images(x: jax.Array, model: str) -> None:
    """Raise ValueError unless ``x`` is an NHWC batch of 112x112x3 images."""
    if x.ndim != 4 or tuple(x.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"{model}: expected images of shape [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3] (NHWC), "
            f"got {tuple(x.shape)}")


def torch_default_kernel_init() -> Initializer:
    """PyTorch's default Linear/Conv weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of the layer's fan-in."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class PReLU(nn.Module):
    """PReLU with one learnable negative slope per channel (last axis), initialised to 0.25."""

    param_dtype: Dtype = jnp.float32
    slope_init: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        slope = self.param("slope", nn.initializers.constant(self.slope_init),
                           (x.shape[-1],), self.param_dtype)
        return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


def batch_norm(train: bool, dtype: Dtype, name: str | None = None, eps: float = BN_EPS,
               use_scale: bool = True) -> nn.BatchNorm:
    """BatchNorm with the reference's eps/momentum; statistics go to ``batch_stats``."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=eps,
                        use_scale=use_scale, dtype=dtype, param_dtype=jnp.float32, name=name)


def conv(features: int, kernel: int, stride: int, pad: int, dtype: Dtype, impl: str,
         name: str) -> GroupedConv:
    """A bias-free ``kernel x kernel`` convolution with ``nn.Conv``'s parameter and the
    reference's N(0, 0.1) initialisation, computed as ``impl`` says (``grouped_conv``)."""
    return GroupedConv(features, (kernel, kernel), strides=stride, padding=((pad, pad),) * 2,
                       kernel_init=nn.initializers.normal(0.1), dtype=dtype,
                       param_dtype=jnp.float32, impl=impl, name=name)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus (projected) identity."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dt, impl = self.dtype, self.conv_impl
        out = batch_norm(train, dt, "bn1")(x)
        out = conv(self.planes, 3, 1, 1, dt, impl, "conv1")(out)
        out = batch_norm(train, dt, "bn2")(out)
        out = PReLU(name="prelu")(out)
        out = conv(self.planes, 3, self.stride, 1, dt, impl, "conv2")(out)
        out = batch_norm(train, dt, "bn3")(out)
        identity = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            identity = conv(self.planes, 1, self.stride, 0, dt, impl, "downsample_conv")(x)
            identity = batch_norm(train, dt, "downsample_bn")(identity)
        return out + identity


class IResNet(nn.Module):
    """IResNet with the "E" head; returns [B, embedding_dim] float32 (not normalised).

    ``dtype`` is the compute dtype of the convolutional trunk; as in the reference's
    mixed-precision path, the FC and the final BN1d run in float32.
    """

    layers: tuple[int, int, int, int]
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    stem_stride: int = 1  # 2 only for the small CPU variant (4x fewer stem FLOPs)
    embedding_dim: int = 512
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    arch: str = "iresnet"
    attention: bool = False  # perceptibility attention on the last feature map
    attention_gate: str = "softmax"  # softmax over positions | sigmoid per position
    conv_impl: str = "auto"  # grouped_conv.IMPLS: XLA's convolutions or the CPU's forms

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, self.arch)
        x = x.astype(self.dtype)
        x = conv(self.widths[0], 3, self.stem_stride, 1, self.dtype, self.conv_impl, "conv1")(x)
        x = batch_norm(train, self.dtype, "bn1")(x)
        x = PReLU(name="prelu")(x)
        for stage, (planes, blocks) in enumerate(zip(self.widths, self.layers)):
            for i in range(blocks):
                x = IBasicBlock(planes, stride=2 if i == 0 else 1, dtype=self.dtype,
                                conv_impl=self.conv_impl, name=f"layer{stage + 1}_{i}")(x, train)
        x = batch_norm(train, self.dtype, "bn2")(x)
        if self.attention:
            from pfc_jax.models.attention import PerceptibilityAttention
            x = PerceptibilityAttention(self.attention_gate, name="attention")(x)
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        fan_in = x.shape[-1]
        x = nn.Dense(self.embedding_dim, kernel_init=torch_default_kernel_init(),
                     bias_init=torch_default_bias_init(fan_in), dtype=jnp.float32,
                     param_dtype=jnp.float32, name="fc")(x)
        # Scale frozen at 1 in the reference: not a parameter here.
        x = batch_norm(train, jnp.float32, "features", use_scale=False)(x)
        return x.astype(jnp.float32)
