"""Vision Transformer backbones (vit_t/s/b/l) for 112x112 face crops, in Flax linen.

As the reference recipe configures them: 9x9 patches with stride 9 (a 12x12 grid
of 144 tokens; the last 4 pixel rows/columns are not seen), learned position
embeddings, no class token, pre-norm blocks (LayerNorm -> multi-head attention
without qkv bias; LayerNorm -> MLP 4x with ReLU6), a final LayerNorm, and the
feature head over all tokens: flatten(144*D) -> Dense(D, no bias) -> BN1d ->
Dense(embedding, no bias) -> BN1d (eps 2e-5).

Training-time regularisers (all drawn from the ``dropout`` rng, all off when
``train=False``): stochastic depth with rates rising linearly from 0 to
``drop_path_rate`` over the blocks; random token masking, where a random
``mask_ratio`` of the tokens skip the transformer and re-enter after the final
norm as a learned mask token; and plain dropout (``drop_rate``) after the
position embedding and inside attention projection and MLP.

``dtype`` is the compute dtype of the blocks.  The attention softmax, the final
norm and the feature head always run in float32, as in the reference's
mixed-precision path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pfc_jax.models.iresnet import (batch_norm, check_images, torch_default_bias_init,
                                    torch_default_kernel_init)

Dtype = Any

IMAGE_SIZE = 112
PATCH_SIZE = 9
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 144
LN_EPS = 1e-5  # PyTorch LayerNorm default
HEAD_BN_EPS = 2e-5

_DENSE_INIT = nn.initializers.truncated_normal(0.02)


@dataclass(frozen=True)
class ViTConfig:
    """Size and regularisation of one ViT variant."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    mask_ratio: float = 0.1
    remat: bool = False  # recompute blocks in the backward pass (memory for compute)


# embed dims / depths / heads of the reference's get_model; vit_l is its
# "vit_l_dp005_mask_005" recipe (the only ViT-L it defines).
CONFIGS: dict[str, ViTConfig] = {
    "vit_t": ViTConfig(embed_dim=256, depth=12, num_heads=8),
    "vit_s": ViTConfig(embed_dim=512, depth=12, num_heads=8),
    "vit_b": ViTConfig(embed_dim=512, depth=24, num_heads=8, remat=True),
    "vit_l": ViTConfig(embed_dim=768, depth=24, num_heads=8, drop_path_rate=0.05,
                       mask_ratio=0.05, remat=True),
}


def drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
    """Stochastic depth: zero a residual branch for a random ``rate`` of the samples."""
    if not train or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention; scores and softmax in float32."""

    dim: int
    num_heads: int
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = nn.Dense(3 * d, use_bias=False, kernel_init=_DENSE_INIT, dtype=self.dtype,
                       param_dtype=jnp.float32, name="qkv")(x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim).astype(jnp.float32)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, Dh]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5
        attn = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        out = nn.Dense(d, kernel_init=_DENSE_INIT, dtype=self.dtype, param_dtype=jnp.float32,
                       name="proj")(out.astype(self.dtype))
        return nn.Dropout(self.drop_rate, deterministic=not train)(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)); x + MLP(LN(x)), with stochastic depth."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ln = dict(epsilon=LN_EPS, dtype=self.dtype, param_dtype=jnp.float32)
        dense = dict(kernel_init=_DENSE_INIT, dtype=self.dtype, param_dtype=jnp.float32)
        y = nn.LayerNorm(name="norm1", **ln)(x)
        y = Attention(self.dim, self.num_heads, self.drop_rate, self.dtype, name="attn")(y, train)
        x = x + drop_path(self, y, self.drop_path_rate, train)
        y = nn.LayerNorm(name="norm2", **ln)(x)
        y = nn.Dense(int(self.dim * self.mlp_ratio), name="fc1", **dense)(y)
        y = jax.nn.relu6(y)
        y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
        y = nn.Dense(self.dim, name="fc2", **dense)(y)
        y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
        return x + drop_path(self, y, self.drop_path_rate, train)


def random_masking(rng: jax.Array, x: jax.Array, mask_ratio: float
                   ) -> tuple[jax.Array, jax.Array]:
    """Keep a random ``1 - mask_ratio`` of each sample's tokens.

    Returns the kept tokens [B, L_keep, D] and ``ids_restore`` [B, L]: the
    position of every original token in the kept-then-masked order, used to put
    tokens back in place after the transformer.
    """
    b, length, _ = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = jnp.argsort(jax.random.uniform(rng, (b, length)), axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    kept = jnp.take_along_axis(x, ids_shuffle[:, :len_keep, None], axis=1)
    return kept, ids_restore


class VisionTransformer(nn.Module):
    """ViT returning [B, embedding_dim] float32 features (not normalised)."""

    config: ViTConfig
    embedding_dim: int = 512
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    arch: str = "vit"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, self.arch)
        cfg = self.config
        d = cfg.embed_dim
        fan_in = 3 * PATCH_SIZE * PATCH_SIZE
        x = nn.Conv(d, (PATCH_SIZE, PATCH_SIZE), strides=PATCH_SIZE, padding="VALID",
                    kernel_init=torch_default_kernel_init(),
                    bias_init=torch_default_bias_init(fan_in), dtype=self.dtype,
                    param_dtype=jnp.float32, name="patch_embed")(x.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, d)  # row-major over the 12x12 grid
        pos = self.param("pos_embed", _DENSE_INIT, (1, NUM_PATCHES, d), jnp.float32)
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, d),
                                jnp.float32)
        x = x + pos.astype(self.dtype)
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)

        masking = train and cfg.mask_ratio > 0
        if masking:
            x, ids_restore = random_masking(self.make_rng("dropout"), x, cfg.mask_ratio)

        block_cls = nn.remat(Block, static_argnums=(2,)) if cfg.remat else Block
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        for i, rate in enumerate(rates):
            x = block_cls(d, cfg.num_heads, cfg.mlp_ratio, self.drop_rate, rate, self.dtype,
                          name=f"block{i}")(x, train)
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32,
                         name="norm")(x.astype(jnp.float32))

        if masking:
            fill = jnp.broadcast_to(mask_token, (b, NUM_PATCHES - x.shape[1], d))
            x = jnp.concatenate([x, fill], axis=1)
            x = jnp.take_along_axis(x, ids_restore[:, :, None], axis=1)

        x = x.reshape(b, NUM_PATCHES * d)
        dense = dict(use_bias=False, kernel_init=_DENSE_INIT, dtype=jnp.float32,
                     param_dtype=jnp.float32)
        x = nn.Dense(d, name="feature_fc1", **dense)(x)
        x = batch_norm(train, jnp.float32, "feature_bn1", eps=HEAD_BN_EPS)(x)
        x = nn.Dense(self.embedding_dim, name="feature_fc2", **dense)(x)
        x = batch_norm(train, jnp.float32, "feature_bn2", eps=HEAD_BN_EPS)(x)
        return x.astype(jnp.float32)
