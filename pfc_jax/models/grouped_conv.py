"""Grouped and depthwise convolutions in a form XLA:CPU runs fast.

XLA:CPU lowers a convolution with ``feature_group_count > 1`` (MobileFaceNet's
depthwise 3x3 and its 7x7 GDC head) to a slow generic loop, and its gradients
slower still. ``GroupedConv`` has exactly ``nn.Conv``'s parameter (``kernel``,
HWIO, ``[kh, kw, in / groups, out]``) and output, and computes it either as
``lax.conv_general_dilated`` (``impl="conv"``, what accelerators want) or as
a sum over the ``kh * kw`` kernel taps of a strided slice of the padded input
times that tap's weights (``impl="shifted"``): an element-wise multiply-add per
tap for a depthwise kernel, a small per-group contraction otherwise. Its
gradients are slices, pads and reductions, which XLA:CPU runs at memory speed.
``impl="auto"`` takes ``shifted`` when JAX's default backend is the CPU.
The taps are summed in float32 (float64 inputs: float64) whatever the compute dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "conv", "shifted")


def resolve(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"conv impl {impl!r} is not one of {IMPLS}")
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "conv"
    return impl


@functools.partial(jax.jit, static_argnums=(2, 3, 4))  # one op when called eagerly (init)
def shifted_conv(x: jax.Array, kernel: jax.Array, stride: int,
                 padding: tuple[tuple[int, int], tuple[int, int]], groups: int) -> jax.Array:
    """NHWC ``x`` * HWIO ``kernel`` with ``groups`` feature groups, tap by tap."""
    b, h, w, c = x.shape
    kh, kw, ci, cout = kernel.shape
    if c != ci * groups or cout % groups:
        raise ValueError(f"input channels {c} / kernel {kernel.shape} do not match "
                         f"{groups} groups")
    co = cout // groups
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    acc = jnp.promote_types(x.dtype, jnp.float32)  # bf16 taps summed in f32
    out = jnp.zeros((b, ho, wo, cout), acc)
    for i in range(kh):
        for j in range(kw):
            xs = lax.slice(xp, (0, i, j, 0),
                           (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                           (1, stride, stride, 1))
            if ci == 1 and co == 1:  # depthwise: one weight per channel
                tap = xs * kernel[i, j, 0]
            else:
                tap = jnp.einsum("bhwgi,igo->bhwgo", xs.reshape(b, ho, wo, groups, ci),
                                 kernel[i, j].reshape(ci, groups, co)).reshape(b, ho, wo, cout)
            out = out + tap.astype(acc)
    return out.astype(x.dtype)


class GroupedConv(nn.Module):
    """``nn.Conv(features, kernel_size, strides, padding, feature_group_count, use_bias=False)``
    with the same parameter, computed as ``impl`` says (see the module docstring)."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    feature_group_count: int = 1
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        g = self.feature_group_count
        if x.shape[-1] % g:
            raise ValueError(f"{x.shape[-1]} input channels do not split into {g} groups")
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1] // g, self.features),
                            self.param_dtype)
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, kernel)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if resolve(self.impl) == "conv":
            return lax.conv_general_dilated(
                x, kernel, (self.strides, self.strides), self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g)
        return shifted_conv(x, kernel, self.strides, self.padding, g)
