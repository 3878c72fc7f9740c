"""Perceptibility attention: a spatial attention over a backbone's last feature map.

``PerceptibilityAttention`` maps the feature map F [B, H, W, C] through a 1x1
conv (C -> max(8, C / 8)), ReLU, and a 1x1 conv to one logit per position,
takes a softmax over the H x W positions (``a`` sums to 1 per image) and
returns ``F * (H W a)``: the features re-weighted towards the positions the
model finds most recognisable. With ``gate="sigmoid"`` each position is gated on
its own instead, ``F * 2 sigmoid(logit)`` (in [0, 2], no competition between
positions; ``a`` is then ``sigmoid(logit)``, each in [0, 1]) (Chai et al., CVPR 2023; the paper's exact
layer shapes are not public, these are pfc_jax's). The last conv starts at
zero, so at initialisation ``a`` is uniform and the block is the identity.
The map is sown as ``intermediates/.../attention/map`` [B, H, W]:
``attention_maps(model, variables, x)`` returns it, and ``pfc-attention``
writes it over the input images as PNG heat maps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


GATES = ("softmax", "sigmoid")


class PerceptibilityAttention(nn.Module):
    gate: str = "softmax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        f = x.astype(jnp.float32)
        hid = nn.Conv(max(8, c // 8), (1, 1), name="reduce", param_dtype=jnp.float32)(f)
        logits = nn.Conv(1, (1, 1), kernel_init=nn.initializers.zeros, name="score",
                         param_dtype=jnp.float32)(nn.relu(hid))[..., 0]
        if self.gate == "sigmoid":
            a = jax.nn.sigmoid(logits)
            self.sow("intermediates", "map", a)
            return (f * (2.0 * a)[..., None]).astype(x.dtype)
        if self.gate != "softmax":
            raise ValueError(f"attention gate must be one of {GATES}, got {self.gate!r}")
        a = jax.nn.softmax(logits.reshape(b, h * w), axis=-1).reshape(b, h, w)
        self.sow("intermediates", "map", a)
        return (f * (h * w * a)[..., None]).astype(x.dtype)


def attention_maps(model: nn.Module, variables, images: jax.Array) -> jax.Array:
    """The attention map [B, H, W] of normalised images (inference mode)."""
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    found = []

    def walk(tree, path):
        for k, v in tree.items():
            if k == "attention" and isinstance(v, dict) and "map" in v:
                found.append(v["map"][0])
            elif isinstance(v, dict):
                walk(v, path + (k,))

    walk(state["intermediates"], ())
    if not found:
        raise ValueError(f"{type(model).__name__} has no perceptibility attention "
                         "(train with --config.model.attention=True)")
    return found[0]
