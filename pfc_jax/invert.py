"""Inversion: images a trained model maps to a target identity, with no generator.

    pfc-invert --workdir W --class 3 --class 17 --out DIR       # targets: class centres
    pfc-invert --model DIR --embedding targets.npy --out DIR     # targets: embeddings

The images start as N(0, 1) in the model's input space and are optimised
with Adam (lr 0.25, METHODS.md §2 "Inversion") on

    identity + 0.05 * Σ_BN (‖μ̃ − μ‖² + ‖σ̃ − σ‖²) + 1e-3 * TV + 1e-4 * ‖x‖

* identity: to a class, the run's own margin softmax (the ArcFace / CosFace
  loss of its head config, every class sampled) against the sharded class
  table; to an embedding, ``‖f̂(x) − t̂‖²`` of the L2-normalised vectors;
* the BatchNorm prior: for every BatchNorm layer, the batch mean ``μ̃`` and
  standard deviation ``σ̃ = sqrt(var + eps)`` of its input over the batch of
  images being synthesised (all axes but the channel's), against its running
  ``μ`` and ``sqrt(running var + eps)``. The model runs in inference form;
  the statistics are collected by intercepting the BatchNorm calls and
  sowing each layer's term into Flax's ``intermediates`` collection, so no
  model is edited;
* TV, per image, ``‖Δ_h x‖₂ + ‖Δ_w x‖₂`` (the Frobenius norms of the
  vertical and horizontal neighbour differences), and ``‖x‖₂``, each
  averaged over the images;

after each step the pixels are clipped to [-1, 1], the range of a real image.
The batch of targets is one batch on the mesh (split over its devices; the
BatchNorm statistics are global batch statistics). ``DIR`` receives one PNG
per target, ``grid.png`` and ``result.json`` (the final terms and each
image's cosine to its target).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pfc_jax import logs
from pfc_jax import mesh as mesh_lib
from pfc_jax import platform


@dataclasses.dataclass(frozen=True)
class InvertConfig:
    steps: int = 2000
    lr: float = 0.25
    bn_weight: float = 0.05
    tv_weight: float = 1e-3
    l2_weight: float = 1e-4
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"invert: steps must be >= 1, got {self.steps}")
        for name in ("lr", "bn_weight", "tv_weight", "l2_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"invert: {name} must be finite and >= 0, "
                                 f"got {getattr(self, name)}")


# ------------------------------------------------------------------ the priors
def _bn_term(module: nn.BatchNorm, h: jax.Array) -> jax.Array:
    """‖μ̃ − μ‖² + ‖σ̃ − σ‖² of one BatchNorm input ``h`` against its running stats."""
    if not isinstance(module.axis, int):
        raise ValueError(f"{module.name}: BatchNorm over axes {module.axis} is not supported")
    h = h.astype(jnp.promote_types(h.dtype, jnp.float32))  # bf16 -> f32; f64 stays
    channel = module.axis % h.ndim
    axes = tuple(a for a in range(h.ndim) if a != channel)
    mean = jnp.mean(h, axis=axes)
    var = jnp.mean(jnp.square(h - jnp.expand_dims(mean, axes)), axis=axes)
    run_mean = module.get_variable("batch_stats", "mean")
    run_var = module.get_variable("batch_stats", "var")
    if run_mean is None or run_var is None:
        raise ValueError(f"BatchNorm {module.name} has no running statistics (batch_stats)")
    eps = module.epsilon
    return (jnp.sum(jnp.square(mean - run_mean))
            + jnp.sum(jnp.square(jnp.sqrt(var + eps) - jnp.sqrt(run_var + eps))))


def _sow_bn_terms(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
        module.sow("intermediates", "bn_prior", _bn_term(module, args[0]))
    return next_fun(*args, **kwargs)


def embed_with_bn_prior(model: nn.Module, variables, x: jax.Array):
    """``(embeddings, {layer path: BN prior term})`` of images ``x`` (model input
    space), the model in inference form."""
    with nn.intercept_methods(_sow_bn_terms):
        emb, state = model.apply(variables, x, train=False, mutable=["intermediates"])
    terms = {jax.tree_util.keystr(path): leaf for path, leaf in
             jax.tree_util.tree_leaves_with_path(state.get("intermediates", {}))}
    return emb, terms


def total_variation(x: jax.Array) -> jax.Array:
    """Per image ``‖Δ_h x‖₂ + ‖Δ_w x‖₂`` for NHWC ``x``: ``[N]``."""
    dh = x[:, 1:] - x[:, :-1]
    dw = x[:, :, 1:] - x[:, :, :-1]
    return (jnp.sqrt(jnp.sum(jnp.square(dh), axis=(1, 2, 3)))
            + jnp.sqrt(jnp.sum(jnp.square(dw), axis=(1, 2, 3))))


def _l2(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2, 3)))


def _unit(v: jax.Array) -> jax.Array:
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, -1, keepdims=True), 1e-24))


def embedding_loss(targets: jax.Array) -> Callable:
    """``‖f̂ − t̂‖²`` per image, to fixed target embeddings ``[N, D]``."""
    t = _unit(targets.astype(jnp.float32))

    def loss(emb):
        return jnp.mean(jnp.sum(jnp.square(_unit(emb.astype(jnp.float32)) - t), -1))

    return loss


def class_loss(head, centers: jax.Array, labels: jax.Array) -> Callable:
    """The head's margin softmax to the target classes, over every class.

    ``head`` is a ``PartialFC`` with ``sample_rate = 1``; the rows are
    gathered once (the table does not change).
    """
    idx, rows = head.sample_and_gather(centers, labels, jax.random.key(0))

    def loss(emb):
        return head.loss(rows, idx, emb, labels)[0]

    return loss


# ------------------------------------------------------------------ the loop
def objective(model, variables, identity: Callable, cfg: InvertConfig):
    """``f(x) -> (total, terms)``, the quantity minimised."""

    def f(x):
        emb, bn = embed_with_bn_prior(model, variables, x)
        terms = dict(identity=identity(emb),
                     bn_prior=sum(bn.values()) if bn else jnp.float32(0.0),
                     tv=jnp.mean(total_variation(x)), l2=jnp.mean(_l2(x)))
        total = (terms["identity"] + cfg.bn_weight * terms["bn_prior"]
                 + cfg.tv_weight * terms["tv"] + cfg.l2_weight * terms["l2"])
        return total, terms

    return f


def invert(model, variables, identity: Callable, num_images: int, mesh,
           cfg: InvertConfig = InvertConfig(), *, progress: bool | None = None,
           image_shape=(112, 112, 3)):
    """Synthesises ``num_images`` images (model input space, [-1, 1]) on ``mesh``.

    Returns ``(images [N, H, W, 3] float32, terms of the last step)``.
    ``num_images`` must split over the mesh's batch axes.
    """
    cfg.validate()
    mesh_lib.check_batch_size(num_images, mesh)
    batch_sh = mesh_lib.batch_sharding(mesh)
    repl = mesh_lib.replicated(mesh)
    variables = jax.device_put(variables, repl)
    tx = optax.adam(cfg.lr)
    f = objective(model, variables, identity, cfg)

    @jax.jit
    def start(key):
        x = jax.random.normal(key, (num_images, *image_shape), jnp.float32)
        x = jax.lax.with_sharding_constraint(x, batch_sh)
        return x, tx.init(x)

    @jax.jit
    def step(x, opt_state):
        (_, terms), g = jax.value_and_grad(f, has_aux=True)(x)
        updates, opt_state = tx.update(g, opt_state, x)
        x = jnp.clip(optax.apply_updates(x, updates), -1.0, 1.0)
        return x, opt_state, terms

    x, opt_state = start(jax.random.key(cfg.seed))
    bar = logs.Progress("inverting", cfg.steps, progress)
    terms = {}
    for i in range(cfg.steps):
        previous = terms
        x, opt_state, terms = step(x, opt_state)
        # At most two steps in flight: a deep queue of sharded executions can
        # starve XLA:CPU's collective rendezvous on an emulated mesh.
        jax.block_until_ready(previous)
        bar.update(i + 1)
    terms = {k: float(v) for k, v in jax.device_get(terms).items()}
    return np.asarray(jax.device_get(x)), terms


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Model input space [-1, 1] -> uint8 pixels (the inverse of ``normalize``)."""
    return np.clip(np.rint(np.asarray(x) * 127.5 + 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` tiled into one image, 2-pixel white gutters."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        out[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = im
    return out


def cosines(emb: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Cosine of each embedding row to its target row (float64)."""
    e = np.asarray(emb, np.float64)
    t = np.asarray(targets, np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    return np.sum(e * t / np.linalg.norm(t, axis=1, keepdims=True), axis=1)


def class_directions(table: jax.Array, classes: np.ndarray, images_emb: np.ndarray):
    """Per target class, its sub-centre nearest to the image's embedding ``[N, D]``."""
    rows = np.asarray(jax.device_get(table[jnp.asarray(classes)]), np.float64)  # [N, K, D]
    rows /= np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    e = images_emb / np.linalg.norm(images_emb, axis=1, keepdims=True)
    best = np.argmax(np.einsum("nkd,nd->nk", rows, e), axis=1)
    return rows[np.arange(len(classes)), best]


# ------------------------------------------------------------------ command line
def _pad(n: int, devices: int) -> int:
    return -(-n // devices) * devices


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training workdir (its backbone and class table)")
    src.add_argument("--model", help="a directory written by pfc-export (embedding targets)")
    ap.add_argument("--step", type=int, default=None, help="with --workdir: default latest")
    tgt = ap.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--class", dest="classes", type=int, action="append",
                     help="a target class (repeat for several); needs --workdir")
    tgt.add_argument("--embedding", help="a .npy of target embeddings [N, D]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=InvertConfig.steps)
    ap.add_argument("--lr", type=float, default=InvertConfig.lr)
    ap.add_argument("--bn-weight", type=float, default=InvertConfig.bn_weight)
    ap.add_argument("--tv-weight", type=float, default=InvertConfig.tv_weight)
    ap.add_argument("--l2-weight", type=float, default=InvertConfig.l2_weight)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = InvertConfig(steps=args.steps, lr=args.lr, bn_weight=args.bn_weight,
                       tv_weight=args.tv_weight, l2_weight=args.l2_weight, seed=args.seed)
    if args.classes and not args.workdir:
        ap.error("--class needs --workdir (the class table lives in the checkpoint)")
    result = run(workdir=args.workdir, model_dir=args.model, step=args.step,
                 classes=args.classes, embedding_file=args.embedding, out=args.out, cfg=cfg)
    print(f"{args.out}: {len(result['targets'])} images; mean cosine to target "
          f"{np.mean(result['cosine']):.3f}; terms {result['terms']}")
    return result


def run(*, workdir=None, model_dir=None, step=None, classes=None, embedding_file=None,
        out: str, cfg: InvertConfig = InvertConfig(), progress: bool | None = None) -> dict:
    """The command's work: load, invert, write PNGs, a grid and ``result.json``."""
    from PIL import Image

    from pfc_jax import export

    if (workdir is None) == (model_dir is None):
        raise ValueError("invert.run: give one of workdir= and model_dir=")
    if (classes is None) == (embedding_file is None):
        raise ValueError("invert.run: give one of classes= and embedding_file=")
    if classes is not None and workdir is None:
        raise ValueError("invert.run: class targets need workdir= (the class table)")
    table = None
    if workdir is not None:
        from pfc_jax import clean
        config, mesh, table, step, head_axes = clean.load_table(workdir, step)
        model, variables, _ = export.restore_backbone(workdir, step)
    else:
        model, variables = export.load_backbone(model_dir)
        mesh = None
    if classes is not None:
        from pfc_jax import partial_fc as pf
        from pfc_jax import train
        hc = dataclasses.replace(train.head_config(config), sample_rate=1.0)
        head = pf.PartialFC(hc, mesh, optax.identity(), head_axes=head_axes,
                            padded_classes=int(table.shape[0]))
        bad = [c for c in classes if not 0 <= c < hc.num_classes]
        if bad:
            raise ValueError(f"--class {bad[0]}: the run has classes 0..{hc.num_classes - 1}")
        n = len(classes)
        padded = _pad(n, mesh.size)
        labels = np.resize(np.asarray(classes, np.int32), padded)
        labels = jax.device_put(labels, mesh_lib.batch_sharding(mesh))
        identity = class_loss(head, table, labels)
        names = [f"class_{c}" for c in classes]
    else:
        targets = np.load(embedding_file)
        dim = int(model.embedding_dim)
        if targets.ndim != 2 or targets.shape[1] != dim or not np.all(np.isfinite(targets)):
            raise ValueError(f"{embedding_file}: targets must be finite [N, {dim}] (the "
                             f"model's embedding size), got {targets.dtype} {targets.shape}")
        n = len(targets)
        if mesh is None:
            mesh = mesh_lib.make_mesh({"data": len(jax.devices())})
        padded = _pad(n, mesh.size)
        targets_p = np.resize(targets, (padded, targets.shape[1])).astype(np.float32)
        identity = embedding_loss(jax.device_put(targets_p, mesh_lib.batch_sharding(mesh)))
        names = [f"embedding_{i}" for i in range(n)]
    x, terms = invert(model, variables, identity, padded, mesh, cfg, progress=progress)
    x = x[:n]
    emb = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x),
                     np.float64)
    directions = class_directions(table, np.asarray(classes), emb) if classes is not None \
        else targets
    cos = cosines(emb, directions)
    os.makedirs(out, exist_ok=True)
    pixels = to_uint8(x)
    for name, im in zip(names, pixels):
        Image.fromarray(im).save(os.path.join(out, f"{name}.png"))
    Image.fromarray(grid(pixels)).save(os.path.join(out, "grid.png"))
    result = dict(targets=names, cosine=[float(c) for c in cos], terms=terms,
                  config=dataclasses.asdict(cfg))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


cli = platform.entry_point(main, __name__)  # pfc-invert; also python -m
