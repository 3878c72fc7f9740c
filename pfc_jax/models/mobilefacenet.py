"""MobileFaceNet ("mbf") for 112x112 face crops, in Flax linen.

The reference recipe's default: width scale 2, residual blocks (1, 4, 6, 2),
a 1x1 conv to 512 channels, and the GDC head (7x7 depthwise linear conv ->
flatten -> bias-free FC -> BN1d).  Building blocks:

* ConvBlock:   conv (no bias) -> BN -> per-channel PReLU
* LinearBlock: conv (no bias) -> BN
* DepthWise:   1x1 ConvBlock to ``groups`` channels -> kxk grouped ConvBlock with
               ``groups`` groups (depthwise) -> 1x1 LinearBlock to ``out``, with an
               identity shortcut inside Residual stages.

Convolutions and linears use Kaiming-normal (fan-out) initialisation as the
reference does.  ``dtype`` is the compute dtype of the trunk; the 1x1 conv to
512 channels and the GDC head run in float32, as in the reference's
mixed-precision path.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pfc_jax.models.grouped_conv import GroupedConv
from pfc_jax.models.iresnet import PReLU, batch_norm, check_images

Dtype = Any

_KAIMING = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU, optionally with PReLU skipped (LinearBlock)."""

    features: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    activation: bool = True
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"  # grouped_conv.IMPLS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        p = self.padding
        # the same parameter as nn.Conv's, in a form each backend runs fast
        x = GroupedConv(self.features, (self.kernel, self.kernel), strides=self.stride,
                        padding=((p, p), (p, p)), feature_group_count=self.groups,
                        kernel_init=_KAIMING, dtype=self.dtype, param_dtype=jnp.float32,
                        impl=self.conv_impl, name="conv")(x)
        x = batch_norm(train, self.dtype, "bn")(x)
        if self.activation:
            x = PReLU(name="prelu")(x)
        return x


class DepthWise(nn.Module):
    """1x1 expand to ``groups`` -> kxk depthwise (stride) -> 1x1 linear projection."""

    features: int
    groups: int
    stride: int = 2
    residual: bool = False
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = ConvBlock(self.groups, dtype=self.dtype, conv_impl=self.conv_impl,
                        name="expand")(x, train)
        out = ConvBlock(self.groups, kernel=3, stride=self.stride, padding=1, groups=self.groups,
                        dtype=self.dtype, conv_impl=self.conv_impl, name="depthwise")(out, train)
        out = ConvBlock(self.features, activation=False, dtype=self.dtype,
                        conv_impl=self.conv_impl, name="project")(out, train)
        if self.residual:
            if out.shape != x.shape:
                raise ValueError(f"residual DepthWise needs equal shapes, got {x.shape} "
                                 f"-> {out.shape}")
            out = out + x
        return out


class MobileFaceNet(nn.Module):
    """MobileFaceNet returning [B, embedding_dim] float32 features (not normalised)."""

    embedding_dim: int = 512
    blocks: tuple[int, int, int, int] = (1, 4, 6, 2)
    scale: int = 2
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"  # conv, shifted, or auto (by backend): grouped_conv
    attention: bool = False  # perceptibility attention on the 7x7 map before the GDC head
    attention_gate: str = "softmax"  # softmax over positions | sigmoid per position

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, "mbf")
        c1, c2 = 64 * self.scale, 128 * self.scale
        dt, impl = self.dtype, self.conv_impl
        x = x.astype(dt)
        x = ConvBlock(c1, kernel=3, stride=2, padding=1, dtype=dt, conv_impl=impl,
                      name="stem")(x, train)
        if self.blocks[0] == 1:
            x = ConvBlock(c1, kernel=3, padding=1, groups=64, dtype=dt, conv_impl=impl,
                          name="stem_dw")(x, train)
        else:
            for i in range(self.blocks[0]):
                x = DepthWise(c1, groups=128, stride=1, residual=True, dtype=dt,
                              conv_impl=impl, name=f"res0_{i}")(x, train)
        # (features out, expansion groups, residual blocks after, their groups)
        stages = ((c1, 128, self.blocks[1], 128),
                  (c2, 256, self.blocks[2], 256),
                  (c2, 512, self.blocks[3], 256))
        for s, (out_c, down_groups, n_res, res_groups) in enumerate(stages, start=1):
            x = DepthWise(out_c, groups=down_groups, stride=2, dtype=dt, conv_impl=impl,
                          name=f"down{s}")(x, train)
            for i in range(n_res):
                x = DepthWise(out_c, groups=res_groups, stride=1, residual=True, dtype=dt,
                              conv_impl=impl, name=f"res{s}_{i}")(x, train)
        x = x.astype(jnp.float32)
        x = ConvBlock(512, dtype=jnp.float32, conv_impl=impl, name="conv_sep")(x, train)
        if self.attention:
            from pfc_jax.models.attention import PerceptibilityAttention
            x = PerceptibilityAttention(self.attention_gate, name="attention")(x)
        # GDC head: 7x7 depthwise linear conv collapses the 7x7 map to 1x1.
        x = ConvBlock(512, kernel=7, groups=512, activation=False, dtype=jnp.float32,
                      conv_impl=impl, name="gdc_dw")(x, train)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.embedding_dim, use_bias=False, kernel_init=_KAIMING,
                     dtype=jnp.float32, param_dtype=jnp.float32, name="gdc_fc")(x)
        x = batch_norm(train, jnp.float32, "gdc_bn")(x)
        return x.astype(jnp.float32)


def mobilefacenet(embedding_dim: int = 512, dtype: Dtype = jnp.float32,
                  conv_impl: str = "auto", attention: bool = False,
                  attention_gate: str = "softmax") -> MobileFaceNet:
    """The reference recipe's "mbf": blocks (1, 4, 6, 2), scale 2."""
    return MobileFaceNet(embedding_dim=embedding_dim, dtype=dtype, conv_impl=conv_impl,
                         attention=attention, attention_gate=attention_gate)
