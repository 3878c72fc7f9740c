"""Contrastive self-supervised learning: the losses, the projection head, the trainer's branch.

Two views ``x1, x2`` of each image (``PipelineConfig.views = 2``) go through
the backbone, then through a projection head (``Projector``: an MLP dropped
after pre-training), and one of two losses compares the projections ``za,
zb`` [N, p] of the *global* batch (METHODS.md §4):

* ``info_nce`` (NT-Xent): cosine similarities over temperature ``t``; each of
  the 2N projections has its other view as the positive and the other 2N - 2
  projections of the batch as negatives,
  ``l_i = -log exp(s(i, i+)/t) / sum_{j != i} exp(s(i, j)/t)``, averaged over
  the 2N rows.
* ``barlow_twins``: each view standardised over the batch (per feature,
  biased variance + 1e-5, as a BatchNorm without affine does), ``F = za_nᵀ
  zb_n / N`` [p, p], ``sum_i (1 - F_ii)² + lambda sum_{i != j} F_ij²``.

Both take the global arrays. Under ``jit`` with the batch sharded over the
mesh, the similarities of every local row against every row of every device
(InfoNCE) and the per-feature batch moments and ``F`` (Barlow Twins) are
reduced across devices by the partitioner, so the loss of 8 devices is the
loss of one device on the same global batch (``tests/test_ssl.py``). Rows
with ``valid = False`` (corrupt records) are neither anchors, positives,
negatives, nor part of the batch statistics.

``SSLBranch`` is what the trainer calls: ``init(key)`` -> ``SSLState`` (the
projector's parameters, BN statistics and optimizer state, replicated),
``loss_and_grads(state, emb_a, emb_b, valid)`` -> the loss, its gradients
with respect to both views' embeddings and to the projector, and the
projector's new BN statistics; ``update(state, grads, batch_stats)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

LOSSES = ("infonce", "barlow")
MODES = ("off", "pretrain", "aux")
BN_EPS = 1e-5  # the standardisation's epsilon (Barlow Twins' BatchNorm1d default)


def _wide(x: jax.Array) -> jax.Array:
    """float32, or float64 when given it (the float64 reference tests)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _rows(valid, n: int) -> jax.Array:
    return jnp.ones((n,), bool) if valid is None else valid.astype(bool)


def info_nce(za: jax.Array, zb: jax.Array, temperature: float = 0.1,
             valid: jax.Array | None = None) -> jax.Array:
    """NT-Xent over the whole batch (see the module docstring); a scalar."""
    n = za.shape[0]
    ok = _rows(valid, n)
    za, zb = _wide(za), _wide(zb)
    za = za * jax.lax.rsqrt(jnp.maximum(jnp.sum(za * za, -1, keepdims=True), 1e-24))
    zb = zb * jax.lax.rsqrt(jnp.maximum(jnp.sum(zb * zb, -1, keepdims=True), 1e-24))
    inv_t = 1.0 / temperature
    eye = jnp.arange(n)[:, None] == jnp.arange(n)[None, :]
    col_ok = jnp.concatenate([ok, ok])[None, :]

    def side(q, same, other):
        # row i: [s(q_i, same_j)]_j with j = i removed, then [s(q_i, other_j)]_j
        logits = jnp.concatenate([jnp.where(eye, -jnp.inf, q @ same.T),
                                  q @ other.T], axis=1) * inv_t
        logits = jnp.where(col_ok, logits, -jnp.inf)
        positive = jnp.sum(q * other, -1) * inv_t
        return jax.nn.logsumexp(logits, axis=1) - positive

    per_row = jnp.concatenate([side(za, za, zb), side(zb, zb, za)])
    weight = jnp.concatenate([ok, ok]).astype(per_row.dtype)
    return jnp.sum(jnp.where(weight > 0, per_row, 0.0)) / jnp.maximum(jnp.sum(weight), 1.0)


def _standardize(z: jax.Array, w: jax.Array, count: jax.Array) -> jax.Array:
    mean = jnp.sum(z * w, 0) / count
    var = jnp.sum(jnp.square(z - mean) * w, 0) / count
    return (z - mean) * jax.lax.rsqrt(var + BN_EPS) * w


def barlow_twins(za: jax.Array, zb: jax.Array, lam: float = 5e-3,
                 valid: jax.Array | None = None) -> jax.Array:
    """Barlow Twins' redundancy-reduction loss (see the module docstring); a scalar."""
    w = _rows(valid, za.shape[0]).astype(_wide(za).dtype)[:, None]
    count = jnp.maximum(jnp.sum(w), 1.0)
    a = _standardize(_wide(za), w, count)
    b = _standardize(_wide(zb), w, count)
    f = a.T @ b / count
    diag = jnp.diagonal(f)
    off = jnp.sum(jnp.square(f)) - jnp.sum(jnp.square(diag))
    return jnp.sum(jnp.square(1.0 - diag)) + lam * off


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """[N, ...] x 2 -> [2N, ...] as a0, b0, a1, b1, ...: a device's rows stay on it
    (a batch-sharded concatenation would move half of them)."""
    return jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])


def deinterleave(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of ``interleave``."""
    x = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])
    return x[:, 0], x[:, 1]


class Projector(nn.Module):
    """The projection head: (Dense -> BatchNorm -> ReLU) per hidden size, then a Dense."""

    dims: Sequence[int] = (512, 128)

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.astype(jnp.float32)
        for width in self.dims[:-1]:
            x = nn.Dense(width, use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS)(x)
            x = nn.relu(x)
        return nn.Dense(self.dims[-1])(x)


@flax.struct.dataclass
class SSLState:
    params: Any
    batch_stats: Any
    opt_state: Any


def check_config(ssl, embedding_dim: int | None = None) -> None:
    """Clear errors for a bad ``config.ssl``."""
    def need(ok, msg):
        if not ok:
            raise ValueError(f"config: ssl.{msg}")

    need(ssl.mode in MODES, f"mode {ssl.mode!r} is not one of {MODES}")
    need(ssl.loss in LOSSES, f"loss {ssl.loss!r} is not one of {LOSSES}")
    need(ssl.temperature > 0, f"temperature must be > 0, got {ssl.temperature}")
    need(ssl.barlow_lambda >= 0, f"barlow_lambda must be >= 0, got {ssl.barlow_lambda}")
    dims = tuple(ssl.projector)
    need(len(dims) >= 1 and all(isinstance(d, int) and d >= 1 for d in dims),
         f"projector must be a tuple of positive widths, got {ssl.projector!r}")
    need(ssl.weight > 0, f"weight must be > 0, got {ssl.weight}")


def view_augmentation(strength: float) -> dict:
    """The ``config.data`` augmentation fields of the two views at a strength S in
    [0, 1.5] (configs/ssl.py, pfc-diagnose --strength, bench/contrastive.py): a random
    resized crop keeping an area fraction in [1 - 0.6 S, 1], a flip, colour
    jitter 0.4 S, grayscale and low-resolution round trips each with
    probability 0.2 S, a blur with probability 0.5 S."""
    s = float(strength)
    if not 0.0 <= s <= 1.5:
        raise ValueError(f"augmentation strength {strength} outside [0, 1.5]")
    return dict(flip=True, crop_prob=1.0 if s > 0 else 0.0,
                crop_scale=(round(max(0.05, 1.0 - 0.6 * s), 6), 1.0),
                color_jitter=min(1.0, 0.4 * s), grayscale_prob=min(1.0, 0.2 * s),
                lowres_prob=min(1.0, 0.2 * s), blur_prob=min(1.0, 0.5 * s))


def augment_config(data) -> Any:
    """The ``AugmentConfig`` that ``config.data``'s augmentation fields describe."""
    from pfc_jax.data.augment import AugmentConfig
    return AugmentConfig(flip=bool(data.flip), lowres_prob=float(data.lowres_prob),
                         blur_prob=float(data.blur_prob),
                         color_jitter=float(data.color_jitter),
                         grayscale_prob=float(data.grayscale_prob),
                         crop_prob=float(data.get("crop_prob", 0.0)),
                         crop_scale=tuple(data.get("crop_scale", (0.5, 1.0))))


class SSLBranch:
    """The projection head and the contrastive loss, as the trainer calls them."""

    def __init__(self, ssl, embedding_dim: int, tx: optax.GradientTransformation, mesh):
        check_config(ssl)
        self.cfg = ssl
        self.embedding_dim = int(embedding_dim)
        self.tx = tx
        self.projector = Projector(tuple(int(d) for d in ssl.projector))
        from pfc_jax import mesh as mesh_lib
        repl = mesh_lib.replicated(mesh)
        abstract = jax.eval_shape(self.init, jax.random.key(0))
        self.state_shardings = jax.tree.map(lambda _: repl, abstract)

    def init(self, key) -> SSLState:
        variables = self.projector.init(key, jnp.zeros((2, self.embedding_dim)), train=False)
        params = variables["params"]
        return SSLState(params=params, batch_stats=variables.get("batch_stats", {}),
                        opt_state=self.tx.init(params))

    def loss(self, za: jax.Array, zb: jax.Array, valid=None) -> jax.Array:
        if self.cfg.loss == "infonce":
            return info_nce(za, zb, float(self.cfg.temperature), valid)
        return barlow_twins(za, zb, float(self.cfg.barlow_lambda), valid)

    def project(self, params, batch_stats, emb_a, emb_b):
        """Both views through the projector in one call (one set of batch statistics)."""
        z, updates = self.projector.apply(
            {"params": params, "batch_stats": batch_stats}, interleave(emb_a, emb_b),
            train=True, mutable=["batch_stats"])
        za, zb = deinterleave(z)
        return za, zb, updates.get("batch_stats", batch_stats)

    def loss_and_grads(self, state: SSLState, emb_a, emb_b, valid=None):
        """(loss, (d loss / d emb_a, d loss / d emb_b), d loss / d params, new BN statistics)."""

        def f(params, ea, eb):
            za, zb, bs = self.project(params, state.batch_stats, ea, eb)
            return self.loss(za, zb, valid), bs

        (loss, bs), (g_params, g_a, g_b) = jax.value_and_grad(
            f, argnums=(0, 1, 2), has_aux=True)(state.params, emb_a.astype(jnp.float32),
                                                emb_b.astype(jnp.float32))
        return loss, (g_a, g_b), g_params, bs

    def update(self, state: SSLState, grads, batch_stats) -> SSLState:
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        return SSLState(params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)
