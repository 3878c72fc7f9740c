"""Small backbones for CPU runs: the demo, the trainer tests and quick experiments.

* ``r_tiny``: an IResNet with one block per stage, widths 16/32/64/128 and a
  stride-2 stem (56x56 after the stem, 4x4 before the FC): the same code path
  as r50, BatchNorm included, at a few percent of its cost.
* ``convnet_tiny``: four stride-2 convolutions with LayerNorm and no
  BatchNorm, so a batch's result does not depend on how it is split into
  micro-batches (the gradient-accumulation test needs that).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pfc_jax.models.iresnet import IResNet, check_images

TINY_NAMES: tuple[str, ...] = ("r_tiny", "convnet_tiny")


class ConvNetTiny(nn.Module):
    embedding_dim: int = 512
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        check_images(x, "convnet_tiny")
        x = x.astype(self.dtype)
        for width in (16, 32, 64, 128):  # 112 -> 56 -> 28 -> 14 -> 7
            x = nn.Conv(width, (3, 3), strides=2, padding=((1, 1), (1, 1)), dtype=self.dtype,
                        param_dtype=jnp.float32)(x)
            x = nn.gelu(nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x))
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)
        return nn.Dense(self.embedding_dim, param_dtype=jnp.float32)(x)


def tiny(name: str, embedding_dim: int, dtype: Any, dropout: float,
         attention: bool = False, attention_gate: str = "softmax",
         conv_impl: str = "auto") -> nn.Module:
    if name == "r_tiny":
        return IResNet(layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_stride=2,
                       embedding_dim=embedding_dim, dropout=dropout, dtype=dtype, arch=name,
                       attention=attention, attention_gate=attention_gate,
                       conv_impl=conv_impl)
    if dropout:
        raise ValueError(f"backbone {name!r} has no dropout layer; got dropout={dropout}")
    return ConvNetTiny(embedding_dim=embedding_dim, dtype=dtype)
