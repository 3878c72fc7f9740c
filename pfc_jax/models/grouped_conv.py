"""Convolutions in a form XLA:CPU runs fast, with ``nn.Conv``'s parameter and output.

XLA:CPU lowers a convolution with ``feature_group_count > 1`` (MobileFaceNet's
depthwise 3x3 and its 7x7 GDC head) to a slow generic loop, and its gradients
slower still; and it computes the *kernel* gradient of an ordinary convolution
at a few GFLOP/s where the channels are few (5-8 GFLOP/s at 64-128 channels,
against 70-110 for the same convolution's forward and input gradient).

``GroupedConv`` has exactly ``nn.Conv``'s parameter (``kernel``, HWIO,
``[kh, kw, in / groups, out]``) and output, and computes it as ``impl`` says:

* ``"conv"``: ``lax.conv_general_dilated`` and XLA's own gradients (what
  accelerators want);
* ``"shifted"``, grouped: a sum over the ``kh * kw`` kernel taps of a strided
  slice of the padded input times that tap's weights: an element-wise
  multiply-add per tap for a depthwise kernel; with a few input channels per
  group (MobileFaceNet's stem: 2), one such depthwise sum per input channel,
  broadcast to its group's outputs; a per-group contraction beyond that.
  Where the batch is large (one device), it runs over chunks of images in a
  loop with its own backward (``shifted_conv``), so that the taps' reads and
  the kernel gradient's reductions stay in cache. Its gradients are slices,
  pads and reductions;
* ``"shifted"``, dense (one group): XLA's convolution forward and input
  gradient, and the kernel gradient as ``kh * kw`` matrix products
  (``tap_kernel_grad``): each tap's input is a contiguous slice of the
  padded input flattened over (batch, row, column), on a grid that extends
  the output by the kernel's reach, so no patch matrix is built; on one
  device, summed over chunks of images in a loop (``dense_conv``).

``impl="auto"`` takes ``shifted`` when JAX's default backend is the CPU.
The taps are summed in float32 (float64 inputs: float64) whatever the compute dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "conv", "shifted")
_BROADCAST_MAX_IN = 4  # input channels per group up to which groups are broadcast
_CHUNK_BYTES = 2 << 20  # images per chunk: as many as fit this many bytes of input


def resolve(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"conv impl {impl!r} is not one of {IMPLS}")
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "conv"
    return impl


def _taps(x: jax.Array, kernel: jax.Array, stride: int,
          padding: tuple[tuple[int, int], tuple[int, int]], groups: int) -> jax.Array:
    """NHWC ``x`` * HWIO ``kernel`` with ``groups`` feature groups, tap by tap."""
    b, h, w, c = x.shape
    kh, kw, ci, cout = kernel.shape
    co = cout // groups
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    acc = jnp.promote_types(x.dtype, jnp.float32)  # bf16 taps summed in f32
    if ci <= _BROADCAST_MAX_IN:
        # Per input channel i of a group, that channel broadcast to the group's
        # outputs: a depthwise kernel over ``cout`` channels (k[:, :, i]), so
        # every tap is an element-wise multiply-add (ci = 1: depthwise itself).
        srcs = [(xp if co == 1 else jnp.broadcast_to(
                    xp.reshape(b, *xp.shape[1:3], groups, ci)[..., i:i + 1],
                    (b, *xp.shape[1:3], groups, co)).reshape(b, *xp.shape[1:3], cout),
                 kernel[:, :, i]) for i in range(ci)]
    out = jnp.zeros((b, ho, wo, cout), acc)
    for i in range(kh):
        for j in range(kw):
            def tap_of(src):
                return lax.slice(src, (0, i, j, 0),
                                 (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1,
                                  src.shape[-1]), (1, stride, stride, 1))
            if ci <= _BROADCAST_MAX_IN:
                for src, k in srcs:
                    out = out + (tap_of(src) * k[i, j]).astype(acc)
            else:
                tap = jnp.einsum("bhwgi,igo->bhwgo", tap_of(xp).reshape(b, ho, wo, groups, ci),
                                 kernel[i, j].reshape(ci, groups, co))
                out = out + tap.reshape(b, ho, wo, cout).astype(acc)
    return out.astype(x.dtype)


def chunk_size(x_shape: tuple[int, ...], itemsize: int) -> int:
    """Images per chunk of the CPU forms' loops: the largest divisor of the batch
    whose chunk holds at most ``_CHUNK_BYTES`` of input, at least 2 images where
    the batch is even (one-image chunks ran slower here: each loop step's ops
    are split over the cores by their leading dimension)."""
    b = x_shape[0]
    image = itemsize * int(math.prod(x_shape[1:]))
    best = max((d for d in range(1, b + 1) if b % d == 0 and d * image <= _CHUNK_BYTES),
               default=1)
    return 2 if best == 1 and b % 2 == 0 else best


def default_chunk(x: jax.Array) -> int:
    """``chunk_size`` in a process with one device, else the whole batch: on a mesh,
    GSPMD would move images between shards to form each chunk, and each device's
    share is small already (32 images over 8 devices: 4)."""
    return chunk_size(x.shape, x.dtype.itemsize) if jax.device_count() == 1 else x.shape[0]


def _check_chunk(b: int, chunk: int) -> None:
    if chunk < 1 or b % chunk:
        raise ValueError(f"chunk of {chunk} images does not divide the batch of {b}")


def _by_chunks(a: jax.Array, chunk: int) -> jax.Array:
    """``[b, ...]`` as ``[b / chunk, chunk, ...]``: the loops' leading axis."""
    return a.reshape(a.shape[0] // chunk, chunk, *a.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _chunked(x, kernel, stride, padding, groups, chunk):
    return _chunked_fwd(x, kernel, stride, padding, groups, chunk)[0]


def _chunked_fwd(x, kernel, stride, padding, groups, chunk):
    y = lax.map(lambda xi: _taps(xi, kernel, stride, padding, groups), _by_chunks(x, chunk))
    return y.reshape(x.shape[0], *y.shape[2:]), (x, kernel)


def _chunked_bwd(stride, padding, groups, chunk, res, g):
    x, kernel = res
    acc = jnp.promote_types(kernel.dtype, jnp.float32)

    def body(dk, xg):
        xi, gi = xg
        _, vjp = jax.vjp(lambda x_, k_: _taps(x_, k_, stride, padding, groups), xi, kernel)
        dxi, dki = vjp(gi)
        return dk + dki.astype(acc), dxi

    dk, dx = lax.scan(body, jnp.zeros(kernel.shape, acc),
                      (_by_chunks(x, chunk), _by_chunks(g, chunk)))
    return dx.reshape(x.shape), dk.astype(kernel.dtype)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))  # one op when called eagerly (init)
def shifted_conv(x: jax.Array, kernel: jax.Array, stride: int,
                 padding: tuple[tuple[int, int], tuple[int, int]], groups: int,
                 chunk: int | None = None) -> jax.Array:
    """NHWC ``x`` * HWIO ``kernel`` with ``groups`` feature groups, tap by tap, over
    chunks of ``chunk`` images (default: ``default_chunk``).

    Forward and backward run chunk by chunk in a loop, so that each chunk's taps
    (nine reads of the same input for a 3x3 kernel) and the kernel gradient's
    reductions stay in cache: over a whole 32 x 56 x 56 x 128 batch the nine
    reductions took 190 ms, chunk by chunk 36 ms. By default only a process
    with one device chunks.
    """
    b, _, _, c = x.shape
    _, _, ci, cout = kernel.shape
    if c != ci * groups or cout % groups:
        raise ValueError(f"input channels {c} / kernel {kernel.shape} do not match "
                         f"{groups} groups")
    chunk = default_chunk(x) if chunk is None else chunk
    _check_chunk(b, chunk)
    if chunk == b:
        return _taps(x, kernel, stride, padding, groups)
    return _chunked(x, kernel, stride, padding, groups, chunk)


def _conv(x, kernel, stride, padding, groups=1):
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups)


def tap_kernel_grad(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int], stride: int,
                    padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The kernel gradient ``[kh, kw, c, co]`` of a dense NHWC x HWIO convolution of
    ``x`` (``[b, h, w, c]``) whose output has cotangent ``g`` (``[b, ho, wo, co]``).

    Tap ``(i, j)`` reads the padded input at ``(s y + i, s x + j)``: in stride
    phase ``(i % s, j % s)`` that is ``(y + i // s, x + j // s)``. On a grid of
    ``(ho + (kh - 1) // s) x (wo + (kw - 1) // s)`` positions per image, with
    the cotangent zero outside the output, the tap's operand is the phase
    flattened over (image, row, column) and shifted by one offset: a
    contiguous slice, and the tap's gradient one ``[n, c]^T [n, co]`` product.
    """
    b, _, _, c = x.shape
    _, ho, wo, co = g.shape
    kh, kw = kernel_hw
    s = stride
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    hg, wg = ho + (kh - 1) // s, wo + (kw - 1) // s
    n = b * hg * wg
    tail = ((kh - 1) // s) * wg + (kw - 1) // s
    gf = jnp.pad(g, ((0, 0), (0, hg - ho), (0, wg - wo), (0, 0))).reshape(n, co)
    phases: dict[tuple[int, int], jax.Array] = {}
    taps = []
    for i in range(kh):
        for j in range(kw):
            key = (i % s, j % s)
            if key not in phases:
                ph = xp[:, key[0]::s, key[1]::s][:, :hg, :wg]
                ph = jnp.pad(ph, ((0, 0), (0, hg - ph.shape[1]), (0, wg - ph.shape[2]), (0, 0)))
                phases[key] = jnp.pad(ph.reshape(n, c), ((0, tail), (0, 0)))
            off = (i // s) * wg + j // s
            taps.append(lax.dot_general(lax.slice_in_dim(phases[key], off, off + n), gf,
                                        (((0,), (0,)), ((), ())), preferred_element_type=acc))
    return jnp.stack(taps).reshape(kh, kw, c, co)


def dense_conv(x: jax.Array, kernel: jax.Array, stride: int,
               padding: tuple[tuple[int, int], tuple[int, int]],
               chunk: int | None = None) -> jax.Array:
    """A dense NHWC x HWIO convolution whose kernel gradient is ``tap_kernel_grad``,
    summed over chunks of ``chunk`` images (default: ``default_chunk``) in a loop:
    per chunk the taps' operands stay in cache (at 28 x 28 x 128, batch 32: 85 ms
    for the whole batch, 38 ms by chunks of 2-4 images)."""
    chunk = default_chunk(x) if chunk is None else chunk
    _check_chunk(x.shape[0], chunk)
    return _dense_conv(x, kernel, stride, padding, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense_conv(x, kernel, stride, padding, chunk):
    return _conv(x, kernel, stride, padding)


def _dense_conv_fwd(x, kernel, stride, padding, chunk):
    return _conv(x, kernel, stride, padding), (x, kernel)


def _dense_conv_bwd(stride, padding, chunk, res, g):
    x, kernel = res
    _, input_vjp = jax.vjp(lambda x_: _conv(x_, kernel, stride, padding), x)
    (dx,) = input_vjp(g)
    b, kh, kw = x.shape[0], *kernel.shape[:2]
    if chunk == b:
        dk = tap_kernel_grad(x, g, (kh, kw), stride, padding)
    else:
        def body(acc, xg):
            return acc + tap_kernel_grad(xg[0], xg[1], (kh, kw), stride, padding), None
        acc = jnp.promote_types(x.dtype, jnp.float32)
        dk, _ = lax.scan(body, jnp.zeros(kernel.shape, acc),
                         (_by_chunks(x, chunk), _by_chunks(g, chunk)))
    return dx, dk.astype(kernel.dtype)


_dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


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
            return _conv(x, kernel, self.strides, self.padding, g)
        if g == 1:
            return dense_conv(x, kernel, self.strides, self.padding)
        return shifted_conv(x, kernel, self.strides, self.padding, g)
