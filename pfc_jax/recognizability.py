"""Recognizability: the UI centre, the recognizability index, index diversion, quality.

A reconstruction of Chai et al. (CVPR 2023), "Recognizability Embedding
Enhancement for Very Low-Resolution Face Recognition and Quality Estimation"
(no public code; METHODS.md §3). What the paper fixes is followed; every
choice beyond it is a field of ``config.recognizability`` and is written
down here and in ``docs/recognizability.md``.

* **UI centre** ``mu_UI`` [D]: the mean L2-normalised embedding of
  unrecognisable images, replicated in the train state and refreshed every
  step as an exponential moving average (``ema``): the first ``ui_every``-th
  of each batch's images degraded on the device to ``ui_side`` pixels and back
  (bicubic), ``noise_fraction`` of them replaced by smooth colour noise (no
  face at all), embedded with the step's backbone in inference mode without
  gradient. The first step sets the centre to its batch mean.
* **Recognizability index** of a sample with normalised embedding ``f``,
  label ``y``:  ``xi = (theta_UI + margin_weight * (theta_N - theta_P)) / pi``
  with ``theta_UI = angle(f, mu_UI)``, ``theta_P = angle(f, w_y)`` (own class
  centre, the nearest sub-centre) and ``theta_N`` the angle to the nearest
  *sampled* negative centre. ``theta_P`` and ``theta_N`` are the head's own
  per-sample statistics (``target_cos``, ``max_neg_cos``; the latter a
  ``pmax`` across head shards), so the index costs no extra pass over the
  class table. A clear face far from the UI cluster and well inside its class
  scores about 1; an unrecognisable one about 0. The index is a
  stop-gradient target.
* **Index diversion loss**: hard samples (``xi < hard_below``) are pushed
  away from ``mu_UI`` until their angle to it is at least
  ``diversion_margin`` degrees: ``mean_i [hard_i] * relu(cos(f_i, mu_UI) -
  cos(tau))`` over the valid samples, weighted by ``diversion_weight``.
* **Quality head**: dropout then a Dense layer on the (un-normalised)
  embedding predicts ``xi``; smooth-L1 with ``beta = 0.75``, weighted by
  ``regression_weight``. With ``detach`` (default) its gradient stops at the
  embedding, so the quality head does not reshape the recognition features.
  Its output is the face-quality score at inference (``pfc-eval --quality``).

Perceptibility attention, the third part, is a backbone option
(``model.attention``; ``pfc_jax.models.attention``), trained by the
recognition loss itself.

``RecognizabilityBranch`` is what the trainer calls: ``init(key)``,
``ui_images(images, key)``, ``loss_and_grads(state, emb, ui_emb, stats,
labels, valid, key)`` and ``update(...)``.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

SMOOTH_L1_BETA = 0.75  # the paper's


@flax.struct.dataclass
class RecState:
    ui_centre: jax.Array     # [D] float32, the EMA of mean normalised UI embeddings
    ui_steps: jax.Array      # int32: updates folded in (0: the next one sets the centre)
    params: Any              # the quality head
    opt_state: Any


def _unit(x):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))


def _angle(cos):
    return jnp.arccos(jnp.clip(cos, -1.0, 1.0))


def index(f_unit, ui_unit, target_cos, max_neg_cos, margin_weight: float = 1.0):
    """The recognizability index [B] (module docstring) of normalised embeddings."""
    theta_ui = _angle(f_unit @ ui_unit)
    theta_p, theta_n = _angle(target_cos), _angle(max_neg_cos)
    return (theta_ui + margin_weight * (theta_n - theta_p)) / math.pi


def diversion_loss(f_unit, ui_unit, xi, valid, margin_deg: float, hard_below: float):
    """Hard samples' hinge on the cosine to the UI centre, a mean over the valid rows."""
    hard = jax.lax.stop_gradient((xi < hard_below) & valid).astype(f_unit.dtype)
    hinge = jax.nn.relu(f_unit @ ui_unit - math.cos(math.radians(margin_deg)))
    return jnp.sum(hard * hinge) / jnp.maximum(jnp.sum(valid.astype(f_unit.dtype)), 1.0)


def smooth_l1(pred, target, beta: float = SMOOTH_L1_BETA):
    d = jnp.abs(pred - target)
    return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def ema_centre(centre, steps, ui_emb, ema: float):
    """The UI centre after one batch of UI embeddings [n, D] (not normalised)."""
    mean = jnp.mean(_unit(ui_emb.astype(jnp.float32)), axis=0)
    new = jnp.where(steps > 0, ema * centre + (1.0 - ema) * mean, mean)
    return new, steps + 1


class QualityHead(nn.Module):
    """Embedding -> dropout -> Dense(1): the predicted recognizability index."""

    dropout: float = 0.2

    @nn.compact
    def __call__(self, emb, train: bool = False):
        x = nn.Dropout(self.dropout, deterministic=not train)(emb.astype(jnp.float32))
        return nn.Dense(1, name="fc")(x)[:, 0]


def ui_images(images, key, every: int, side: int, noise_fraction: float):
    """Unrecognisable images made on the device from a batch [B, H, W, 3] uint8: one
    in ``every`` (the first of each group of ``every`` rows: a device's rows stay
    on it), degraded to ``side`` px and back, the last ``noise_fraction`` of
    them smooth colour noise. float32 in [0, 255], [B / every, H, W, 3]."""
    b, h, w, c = images.shape
    x = images.reshape(b // every, every, h, w, c)[:, 0].astype(jnp.float32)
    n = x.shape[0]
    small = jax.image.resize(x, (n, side, side, c), "cubic")
    faces = jax.image.resize(small, (n, h, w, c), "cubic")
    field = jax.random.uniform(key, (n, 8, 8, c), jnp.float32, 0.0, 255.0)
    noise = jax.image.resize(field, (n, h, w, c), "cubic")
    is_noise = jnp.arange(n) >= n - int(round(noise_fraction * n))
    out = jnp.where(is_noise[:, None, None, None], noise, faces)
    return jnp.clip(out, 0.0, 255.0)


def check_config(r, per_device_batch: int | None = None) -> None:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"config: recognizability.{msg}")

    need(isinstance(r.ui_every, int) and r.ui_every >= 1,
         f"ui_every must be an integer >= 1, got {r.ui_every!r}")
    if per_device_batch is not None:
        need(per_device_batch % r.ui_every == 0,
             f"ui_every {r.ui_every} must divide the per-device batch {per_device_batch}")
    need(isinstance(r.ui_side, int) and 1 <= r.ui_side <= 16,
         f"ui_side must be an integer in [1, 16], got {r.ui_side!r}")
    need(0.0 <= r.noise_fraction <= 1.0, f"noise_fraction {r.noise_fraction} outside [0, 1]")
    need(0.0 <= r.ema < 1.0, f"ema {r.ema} outside [0, 1)")
    need(0.0 < r.diversion_margin <= 180.0,
         f"diversion_margin {r.diversion_margin} (degrees) outside (0, 180]")
    for name in ("diversion_weight", "regression_weight", "margin_weight"):
        need(r[name] >= 0, f"{name} must be >= 0, got {r[name]}")
    need(0.0 <= r.dropout < 1.0, f"dropout {r.dropout} outside [0, 1)")


class RecognizabilityBranch:
    """The UI centre, the index, the diversion loss and the quality head, for the trainer."""

    def __init__(self, cfg, embedding_dim: int, tx: optax.GradientTransformation, mesh):
        check_config(cfg)
        self.cfg = cfg
        self.embedding_dim = int(embedding_dim)
        self.tx = tx
        self.head = QualityHead(float(cfg.dropout))
        from pfc_jax import mesh as mesh_lib
        repl = mesh_lib.replicated(mesh)
        self.state_shardings = jax.tree.map(lambda _: repl,
                                            jax.eval_shape(self.init, jax.random.key(0)))

    def init(self, key) -> RecState:
        params = self.head.init(key, jnp.zeros((1, self.embedding_dim)))["params"]
        return RecState(ui_centre=jnp.zeros((self.embedding_dim,), jnp.float32),
                        ui_steps=jnp.zeros((), jnp.int32), params=params,
                        opt_state=self.tx.init(params))

    def ui_images(self, images, key):
        c = self.cfg
        return ui_images(images, key, int(c.ui_every), int(c.ui_side), float(c.noise_fraction))

    def loss_and_grads(self, state: RecState, emb, ui_emb, stats, labels, valid, key):
        """(loss, d loss / d emb, d loss / d quality params, new UI centre, steps, metrics).

        ``ui_emb``: this step's UI embeddings (no gradient); the index uses the
        centre *after* folding them in.
        """
        c = self.cfg
        centre, steps = ema_centre(state.ui_centre, state.ui_steps,
                                   jax.lax.stop_gradient(ui_emb), float(c.ema))
        ui_unit = _unit(centre)
        ok = valid & stats["label_ok"]

        def f(params, e):
            f_unit = _unit(e.astype(jnp.float32))
            xi = jax.lax.stop_gradient(index(f_unit, ui_unit, stats["target_cos"],
                                             stats["max_neg_cos"], float(c.margin_weight)))
            div = diversion_loss(f_unit, ui_unit, xi, ok, float(c.diversion_margin),
                                 float(c.hard_below))
            q_in = jax.lax.stop_gradient(e) if c.detach else e
            pred = self.head.apply({"params": params}, q_in, train=True, rngs={"dropout": key})
            count = jnp.maximum(jnp.sum(ok), 1)
            reg = jnp.sum(jnp.where(ok, smooth_l1(pred, xi), 0.0)) / count
            loss = float(c.diversion_weight) * div + float(c.regression_weight) * reg
            mean_xi = jnp.sum(jnp.where(ok, xi, 0.0)) / count
            hard = jnp.sum(ok & (xi < float(c.hard_below))) / count
            return loss, dict(diversion_loss=div, quality_loss=reg, mean_index=mean_xi,
                              hard_fraction=hard, ui_cos=jnp.sum(
                                  jnp.where(ok, f_unit @ ui_unit, 0.0)) / count)

        (loss, metrics), (g_params, g_emb) = jax.value_and_grad(
            f, argnums=(0, 1), has_aux=True)(state.params, emb)
        return loss, g_emb, g_params, centre, steps, metrics

    def update(self, state: RecState, grads, centre, steps) -> RecState:
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        return RecState(ui_centre=centre, ui_steps=steps,
                        params=optax.apply_updates(state.params, updates), opt_state=opt_state)

    def quality(self, params, emb):
        """Quality scores [B] of embeddings (the trained head, inference mode)."""
        return self.head.apply({"params": params}, emb, train=False)


def quality_scores(params, raw_embeddings) -> "np.ndarray":
    """The quality head's scores [n] of raw (un-normalised) embeddings, on the host."""
    import numpy as np
    out = QualityHead().apply({"params": jax.tree.map(jnp.asarray, params)},
                              jnp.asarray(np.asarray(raw_embeddings, np.float32)), train=False)
    return np.asarray(out, np.float64)
