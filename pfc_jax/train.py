"""Training: ``python -m pfc_jax.train --config configs/X.py --workdir DIR``.

One loop, ``train_and_evaluate(config, workdir)``:

1. mesh, config checks, data source; every label is checked against
   ``head.num_classes`` before step 1;
2. the state (backbone params and BN statistics replicated, the class table
   sharded) is built by a jitted init with output shardings, or restored
   from the newest checkpoint in the workdir (rerunning resumes);
3. each step is one pure jitted function ``train_step(state, batch)`` with
   explicit shardings and a donated state: backbone forward, the Partial FC
   head (one sampled class set per step, shared by the gradient-accumulation
   micro-batches), backbone backward, optax on the backbone, lazy row updates
   on the head; the sampling and dropout randomness is ``fold_in(seed,
   step)``, so a resumed run draws what the uninterrupted run would have;
4. logging, verification every ``eval.every_steps``, checkpoints every
   ``checkpoint.every_steps``; a non-finite loss, gradient, update or rate
   stops the run naming the step, before that step's state is saved;
5. SIGTERM or SIGINT (``pfc_jax.preemption``): every process checkpoints the
   same finished step, waits for the write to commit and exits with status
   128 + signal; the rerun resumes from it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pfc_jax import checkpoint as ckpt_lib
from pfc_jax import config as config_lib
from pfc_jax import distributed
from pfc_jax import embed as embed_lib
from pfc_jax import logs
from pfc_jax import mesh as mesh_lib
from pfc_jax import models
from pfc_jax import partial_fc as pf
from pfc_jax import preemption
from pfc_jax import recognizability as rec_lib
from pfc_jax import ssl as ssl_lib
from pfc_jax.data.augment import normalize
from pfc_jax.data.prefetch import DevicePrefetch

NOISE_TRUTH = "noise_truth.npz"  # ground truth of injected label noise, in the workdir


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    head: pf.HeadState | None      # None: self-supervised pre-training (no classes)
    ssl: ssl_lib.SSLState | None = None  # the projection head, when ssl.mode is not off
    rec: rec_lib.RecState | None = None  # UI centre + quality head (recognizability)


# ----------------------------------------------------------------- building blocks
def make_schedule(config, total: int) -> optax.Schedule:
    o = config.optimizer
    warmup = int(round(o.warmup_epochs * config_lib.steps_per_epoch(config)))
    warmup = min(warmup, total - 1) if total > 1 else 0
    if o.schedule == "constant":
        main = optax.constant_schedule(o.lr)
    elif o.schedule == "cosine":
        main = optax.cosine_decay_schedule(o.lr, max(1, total - warmup))
    else:  # poly: lr * (1 - t / T) ** power after the warm-up
        main = optax.polynomial_schedule(o.lr, 0.0, o.power, max(1, total - warmup))
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), main], [warmup])


def make_optimizers(config, schedule) -> tuple[optax.GradientTransformation, ...]:
    """(backbone, head) transforms; the same rule, the backbone's gradient clipped."""
    o = config.optimizer
    if o.name == "sgd":
        core = optax.chain(optax.add_decayed_weights(o.weight_decay),
                           optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov))
    else:
        core = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    backbone = optax.chain(optax.clip_by_global_norm(o.grad_clip), core) if o.grad_clip else core
    return backbone, core


def head_config(config) -> pf.HeadConfig:
    """``config.head`` as the head's own config: the same field names (and
    ``model.embedding_dim``); a field a config lacks (an older run's) keeps
    ``HeadConfig``'s default."""
    kw = {f.name: _field_value(f, config.head[f.name])
          for f in dataclasses.fields(pf.HeadConfig) if f.name in config.head}
    return pf.HeadConfig(**dict(kw, embedding_dim=int(config.model.embedding_dim)))


def _field_value(field: dataclasses.Field, value):
    """A config value as the type of the HeadConfig field it sets."""
    if field.name == "margins":
        return tuple(float(m) for m in value)
    if field.default is dataclasses.MISSING:  # num_classes
        return int(value)
    return type(field.default)(value)


def build_source(config, *, held_out: bool = False):
    """The training source named by ``config.data`` (synthetic: the held-out split too).

    The training source is wrapped, in this order, by the injected label noise
    of ``data.noise`` and by the keep-list of ``data.keep_list``; the held-out
    split never is.
    """
    d = config.data
    if d.kind == "synthetic":
        from pfc_jax.data.synthetic import SyntheticFaces
        seed = d.get("synthetic_seed")
        seed = config.seed if seed is None else int(seed)
        if held_out:
            return SyntheticFaces(200, 8, seed=seed + 1,
                                  identity_offset=d.synthetic_identities)
        src = SyntheticFaces(d.synthetic_identities, d.synthetic_images_per_identity,
                             seed=seed)
    else:
        from pfc_jax.data.sources import open_source
        kw = dict(skip_corrupt=d.skip_corrupt)
        if d.kind == "tfds":
            kw["split"] = d.tfds_split
        src = open_source(d.kind, d.path, **kw)
    noise = _noise(config)
    if noise["flip"] or noise["conflict"]:
        from pfc_jax.data.noise import NoisyLabels
        src = NoisyLabels(src, **noise)
    if d.get("keep_list"):
        from pfc_jax.data.keep import KeptRecords
        src = KeptRecords(src, d.keep_list)
    return src


def _noise(config) -> dict:
    """``data.noise`` (absent from the config.json of runs older than it: no noise)."""
    n = config.data.get("noise") or {}
    return dict(flip=float(n.get("flip", 0.0)), conflict=float(n.get("conflict", 0.0)),
                seed=int(n.get("seed", 0)))


def classes_of(config, source) -> int:
    """The head's class count: the recipe's, or the view's when noise or a keep-list
    changes it (conflict noise adds twin labels; cleaning drops and re-indexes)."""
    if config.data.get("keep_list") or _noise(config)["conflict"]:
        return int(source.num_classes)
    return int(config.head.num_classes)


def views_of(config) -> int:
    """Augmented views per record: two when the contrastive branch is on."""
    return 1 if config_lib.ssl_mode_of(config) == "off" else 2


def batch_keys(config) -> tuple[str, ...]:
    """The fields of a host batch that the train step takes."""
    return ("image", "label", "valid") + (("image2",) if views_of(config) == 2 else ())


def degradation(data):
    """The ``Degradation`` of ``config.data``'s ``degrade_*`` fields (none when absent)."""
    from pfc_jax.data.degrade import Degradation
    if not data.get("degrade_prob"):
        return Degradation()
    return Degradation(prob=float(data.degrade_prob),
                       sides=tuple(int(v) for v in data.degrade_sides),
                       method=str(data.degrade_method),
                       blur_prob=float(data.degrade_blur_prob),
                       jpeg_prob=float(data.degrade_jpeg_prob))


def make_loader(config, source):
    from pfc_jax.data.pipeline import PipelineConfig, make_loader as _make
    d = config.data
    cfg = PipelineConfig(
        global_batch=config.batch_size, seed=config.seed, shuffle=True, num_epochs=None,
        worker_count=d.worker_count, worker_buffer_size=d.worker_buffer_size,
        augment=ssl_lib.augment_config(d), views=views_of(config), degrade=degradation(d))
    return _make(source, cfg, process_index=jax.process_index(),
                 process_count=jax.process_count())


@dataclasses.dataclass
class Trainer:
    """The model, the head and the jitted functions for one config and mesh."""

    config: Any
    mesh: Any
    padded_classes: int | None = None

    def __post_init__(self):
        c = self.config
        self.total_steps = config_lib.total_steps(c)
        self.schedule = make_schedule(c, self.total_steps)
        self.tx, head_tx = make_optimizers(c, self.schedule)
        self.model = models.from_config(c.model)
        self.ssl_mode = config_lib.ssl_mode_of(c)
        self.head = None if self.ssl_mode == "pretrain" else pf.PartialFC(
            head_config(c), self.mesh, head_tx, head_axes=c.head_axes,
            padded_classes=self.padded_classes)
        self.ssl = None if self.ssl_mode == "off" else ssl_lib.SSLBranch(
            c.ssl, int(c.model.embedding_dim), self.tx, self.mesh)
        self.rec = rec_lib.RecognizabilityBranch(
            c.recognizability, int(c.model.embedding_dim), head_tx, self.mesh) \
            if config_lib.recognizability_on(c) else None
        self.base_key = jax.random.key(c.seed)
        repl = mesh_lib.replicated(self.mesh)
        abstract = jax.eval_shape(self._init_state, self.base_key)
        self.state_shardings = TrainState(
            step=repl, params=jax.tree.map(lambda _: repl, abstract.params),
            batch_stats=jax.tree.map(lambda _: repl, abstract.batch_stats),
            opt_state=jax.tree.map(lambda _: repl, abstract.opt_state),
            head=None if self.head is None else self.head.state_shardings,
            ssl=None if self.ssl is None else self.ssl.state_shardings,
            rec=None if self.rec is None else self.rec.state_shardings)
        self.abstract_state = ckpt_lib.abstract_like(abstract, self.state_shardings)
        batch_sh = mesh_lib.batch_sharding(self.mesh)
        self.init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self.train_step = jax.jit(
            self._train_step, in_shardings=(self.state_shardings, batch_sh),
            out_shardings=(self.state_shardings, repl), donate_argnums=0)
        self.embedder = embed_lib.Embedder(self.model, self.mesh)

    def _init_state(self, key) -> TrainState:
        k_model, k_drop, k_head = jax.random.split(key, 3)
        variables = self.model.init({"params": k_model, "dropout": k_drop},
                                    jnp.zeros((1, *models.INPUT_SHAPE)), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params,
            batch_stats=variables.get("batch_stats", {}), opt_state=self.tx.init(params),
            head=None if self.head is None else self.head.init_state(k_head),
            # a key of its own: the other three are those of runs without the branch
            ssl=None if self.ssl is None else self.ssl.init(jax.random.fold_in(key, 7)),
            rec=None if self.rec is None else self.rec.init(jax.random.fold_in(key, 11)))

    def _forward(self, params, batch_stats, images, key):
        """Backbone forward in training mode: embeddings, their VJP, new BN statistics."""

        def forward(p):
            emb, updates = self.model.apply(
                {"params": p, "batch_stats": batch_stats}, normalize(images), train=True,
                mutable=["batch_stats"], rngs={"dropout": key})
            return emb, updates

        emb, backbone_vjp, updates = jax.vjp(forward, params, has_aux=True)
        return emb, backbone_vjp, updates.get("batch_stats", batch_stats)

    def _micro(self, params, batch_stats, rows, idx, images, labels, key):
        """One micro-batch: loss, stats and gradients for backbone and sampled rows."""
        emb, backbone_vjp, batch_stats = self._forward(params, batch_stats, images, key)
        loss, stats, row_grads, emb_grads = self.head.grads(rows, idx, emb, labels)
        (grads,) = backbone_vjp(emb_grads.astype(emb.dtype))
        return loss, stats, grads, row_grads, batch_stats

    def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        if self.ssl is not None:
            return self._two_view_step(state, batch)
        if self.rec is not None:
            return self._recognizability_step(state, batch)
        n_acc = self.config.grad_accum_steps
        key = jax.random.fold_in(self.base_key, state.step)
        k_sample, k_drop = jax.random.split(key)
        # Rows of skipped (corrupt) records carry label -1 and valid = False:
        # zero loss and gradient in the head, and not counted as bad labels.
        images, labels = batch["image"], batch["label"].astype(jnp.int32)
        valid = batch["valid"]
        if n_acc == 1:
            # Fused (lazy updates): the rows are updated inside the head's blockwise
            # backward, with no gathered copy of the sampled rows or their gradient.
            emb, backbone_vjp, batch_stats = self._forward(
                state.params, state.batch_stats, images, k_drop)
            loss, stats, emb_grads, head_state, row_grad_norm = self._head_step(
                state.head, emb, labels, k_sample)
            (grads,) = backbone_vjp(emb_grads.astype(emb.dtype))
            return self._finish_step(state, grads, batch_stats, head_state,
                                     _head_metrics(loss, stats, valid, row_grad_norm))
        # One class set, gathered once, for all micro-batches.
        idx, rows = self.head.sample_and_gather(state.head.centers, labels, k_sample)
        # Micro-batch a takes rows a, a + A, a + 2A, ...: every device keeps its
        # share of every micro-batch, so the split moves no data.
        spec = NamedSharding(self.mesh, P(None, mesh_lib.batch_axes(self.mesh)))

        def split(x):
            x = x.reshape(x.shape[0] // n_acc, n_acc, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, spec)

        def body(carry, mb):
            g_acc, r_acc, bs, loss_acc, acc_sum, bad_acc = carry
            mb_images, mb_labels, mb_valid, a = mb
            loss, stats, grads, row_grads, bs = self._micro(
                state.params, bs, rows, idx, mb_images, mb_labels,
                jax.random.fold_in(k_drop, a))
            g_acc = jax.tree.map(jnp.add, g_acc, grads)
            return (g_acc, r_acc + row_grads, bs, loss_acc + loss,
                    acc_sum + _accuracies(stats),
                    bad_acc + jnp.sum(~stats["label_ok"] & mb_valid)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros_like(rows), state.batch_stats, 0.0, jnp.zeros(2), 0)
        (grads, row_grads, batch_stats, loss, acc, bad), _ = jax.lax.scan(
            body, init, (split(images), split(labels), split(valid), jnp.arange(n_acc)))
        grads = jax.tree.map(lambda g: g / n_acc, grads)
        row_grads, loss, acc = row_grads / n_acc, loss / n_acc, acc / n_acc
        metrics = dict(loss=loss, top1=acc[0], margin_top1=acc[1], num_bad_labels=bad,
                       row_grad_norm=optax.tree.norm(row_grads))

        head_state = self.head.update(state.head, idx, row_grads, rows)
        return self._finish_step(state, grads, batch_stats, head_state, metrics)

    def _two_view_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        """Both views through the backbone in one forward; the contrastive loss on
        their projections; with a head (``ssl.mode = aux``) also Partial FC on the
        first view, the contrastive loss weighted by ``ssl.weight``."""
        key = jax.random.fold_in(self.base_key, state.step)
        k_sample, k_drop = jax.random.split(key)
        labels, valid = batch["label"].astype(jnp.int32), batch["valid"]
        images = ssl_lib.interleave(batch["image"], batch["image2"])
        emb, backbone_vjp, batch_stats = self._forward(
            state.params, state.batch_stats, images, k_drop)
        emb_a, emb_b = ssl_lib.deinterleave(emb)
        ssl_loss, (g_a, g_b), ssl_grads, ssl_stats = self.ssl.loss_and_grads(
            state.ssl, emb_a, emb_b, valid)
        if self.head is None:
            head_state, metrics = None, dict(loss=ssl_loss, ssl_loss=ssl_loss)
        else:
            w = float(self.config.ssl.weight)
            g_a, g_b = w * g_a, w * g_b
            ssl_grads = jax.tree.map(lambda g: w * g, ssl_grads)
            loss, stats, g_head, head_state, row_grad_norm = self._head_step(
                state.head, emb_a, labels, k_sample)
            g_a = g_a + g_head
            metrics = dict(_head_metrics(loss + w * ssl_loss, stats, valid, row_grad_norm),
                           head_loss=loss, ssl_loss=ssl_loss)
        (grads,) = backbone_vjp(ssl_lib.interleave(g_a, g_b).astype(emb.dtype))
        ssl_state = self.ssl.update(state.ssl, ssl_grads, ssl_stats)
        metrics["ssl_grad_norm"] = optax.tree.norm(ssl_grads)
        return self._finish_step(state, grads, batch_stats, head_state, metrics, ssl_state)

    def _head_step(self, head_state, emb, labels, k_sample):
        """The head on one batch of embeddings, fused or not (one micro-batch):
        loss, stats, embedding gradient, new head state, row-gradient norm."""
        if self.head.fuses_update(labels.shape[0]):
            idx = self.head.sample(labels, k_sample)
            return self.head.fused_step(head_state, idx, emb, labels)
        idx, rows = self.head.sample_and_gather(head_state.centers, labels, k_sample)
        loss, stats, row_grads, g_emb = self.head.grads(rows, idx, emb, labels)
        return (loss, stats, g_emb, self.head.update(head_state, idx, row_grads, rows),
                optax.tree.norm(row_grads))

    def _recognizability_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        """Partial FC plus the recognizability branch: this step's unrecognisable images
        refresh the UI centre, then the index, index diversion and the quality head
        (``pfc_jax.recognizability``) add their loss and embedding gradient."""
        key = jax.random.fold_in(self.base_key, state.step)
        k_sample, k_drop = jax.random.split(key)
        k_ui, k_quality = jax.random.split(jax.random.fold_in(key, 11))
        images, labels = batch["image"], batch["label"].astype(jnp.int32)
        valid = batch["valid"]
        emb, backbone_vjp, batch_stats = self._forward(
            state.params, state.batch_stats, images, k_drop)
        ui_emb = self.model.apply(
            jax.lax.stop_gradient({"params": state.params, "batch_stats": state.batch_stats}),
            normalize(self.rec.ui_images(images, k_ui)), train=False)
        loss, stats, g_head, head_state, row_grad_norm = self._head_step(
            state.head, emb, labels, k_sample)
        rec_loss, g_rec, g_quality, centre, steps, rec_metrics = self.rec.loss_and_grads(
            state.rec, emb, ui_emb, stats, labels, valid, k_quality)
        (grads,) = backbone_vjp((g_head + g_rec).astype(emb.dtype))
        rec_state = self.rec.update(state.rec, g_quality, centre, steps)
        metrics = dict(_head_metrics(loss + rec_loss, stats, valid, row_grad_norm),
                       head_loss=loss, quality_grad_norm=optax.tree.norm(g_quality),
                       **rec_metrics)
        return self._finish_step(state, grads, batch_stats, head_state, metrics,
                                 rec_state=rec_state)

    def _finish_step(self, state, grads, batch_stats, head_state, metrics, ssl_state=None,
                     rec_state=None):
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # update_norm and row_grad_norm: the new state must be finite too (a loss
        # computed before the update can be finite while the update is not).
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                       update_norm=optax.tree.norm(updates), lr=self.schedule(state.step))
        new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                               opt_state=opt_state, head=head_state, ssl=ssl_state,
                               rec=rec_state)
        return new_state, metrics

    def describe(self, batch_size: int) -> str:
        """What the run trains, for its first log line."""
        c = self.config
        where = f"{self.total_steps} steps of {batch_size} on {self.mesh.size} devices " \
                f"{dict(self.mesh.shape)}"
        ssl = "" if self.ssl is None else \
            f"; contrastive {c.ssl.loss} on two views, projector {tuple(c.ssl.projector)}"
        if self.rec is not None:
            ssl += "; recognizability (UI centre, index diversion, quality head)"
        if self.head is None:
            return f"self-supervised pre-training: {where}{ssl}, labels unused"
        return (f"{where}; {c.head.num_classes} classes, table {self.head.table_shape}, "
                f"{self.head.num_sampled(batch_size)} sampled per shard{ssl}")

    def checkpoint_meta(self) -> dict:
        c = self.config
        meta = dict(model=c.model.name, embedding_dim=int(c.model.embedding_dim),
                    ssl=self.ssl_mode, recognizability=self.rec is not None)
        if self.head is not None:
            meta.update(padded_classes=self.head.padded_classes,
                        num_classes=int(c.head.num_classes))
        return meta

    def embed_fn(self, state):
        """uint8 host images [b, 112, 112, 3] -> embeddings (``Embedder.host_fn``)."""
        return self.embedder.host_fn({"params": state.params,
                                      "batch_stats": state.batch_stats})


# ------------------------------------------------------------------------ the loop
def load_eval_sets(config, held_out_source=None) -> dict:
    from pfc_jax.evaluate import verification
    sets = {}
    for name in config.eval.bins:
        path = name if os.path.sep in name or name.endswith(".bin") else \
            os.path.join(config.data.path or ".", f"{name}.bin")
        vs = verification.load_bin(path)
        sets[os.path.basename(path).removesuffix(".bin")] = vs
    if config.data.kind == "synthetic" and held_out_source is not None and not sets:
        images, issame = held_out_source.verification_pairs(400, seed=config.seed + 2)
        sets["synthetic_heldout"] = verification.VerificationSet(
            "synthetic_heldout", images, issame)
    return sets


def evaluate(trainer: Trainer, state, sets: dict, logger, step: int) -> dict:
    from pfc_jax.evaluate import verification
    if not sets:
        return {}
    batch = config_lib.eval_batch_size(trainer.config.eval.batch_size, trainer.mesh.size)
    results = verification.verify(trainer.embed_fn(state), sets, batch)
    for name, res in results.items():
        logger.write(step, {"accuracy": res.accuracy_mean, "accuracy_std": res.accuracy_std,
                            **{f"tar@far{far:g}": tar for far, tar in res.tar_at_far.items()}},
                     prefix=f"eval/{name}")
    logger.print(f"step {step:>7d}  " + verification.format_results(results))
    return results


class TrainingDiverged(FloatingPointError):
    pass


def _head_metrics(loss, stats, valid, row_grad_norm) -> dict:
    acc = _accuracies(stats)
    return dict(loss=loss, top1=acc[0], margin_top1=acc[1], row_grad_norm=row_grad_norm,
                num_bad_labels=jnp.sum(~stats["label_ok"] & valid))


def _accuracies(stats) -> jax.Array:
    """[top1, margin_top1] of a batch, over the sampled classes.

    ``top1``: the sample's own class centre is nearer (cosine, no margin) than
    every sampled negative, the training accuracy users expect.
    ``margin_top1``: its *margin* logit still beats every negative logit
    (stays near 0 early in training, when the margin dominates).
    """
    plain = stats["label_ok"] & (stats["target_cos"] > stats["max_neg_cos"])
    return jnp.stack([jnp.mean(plain), jnp.mean(stats["target_is_max"])])


def _check(step: int, metrics: dict, last_saved: int | None, num_classes: int | None) -> dict:
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    watched = [k for k in ("loss", "grad_norm", "update_norm", "row_grad_norm",
                           "ssl_grad_norm", "quality_grad_norm", "lr") if k in metrics]
    bad = [k for k in watched if not np.isfinite(metrics[k])]
    if bad:
        kept = ("the last good checkpoint is step "
                f"{last_saved}" if last_saved is not None else "no checkpoint was written")
        raise TrainingDiverged(
            f"step {step}: " + ", ".join(f"{k} {metrics[k]}" for k in watched) +
            f"; not finite: {', '.join(bad)}; stopping, this step's state is not saved "
            f"({kept}). Lower the learning rate, raise warm-up, or check the data.")
    if metrics.get("num_bad_labels", 0) > 0:
        raise ValueError(f"step {step}: {int(metrics['num_bad_labels'])} labels outside "
                         f"[0, {num_classes}) reached the head")
    return metrics


def _init_from_meta(config) -> dict:
    """What ``config.init_from`` holds (an export directory, or the workdir of a
    run, e.g. a self-supervised pre-training), checked to be the config's backbone."""
    path = config.init_from
    if os.path.isfile(os.path.join(path, "model.json")):
        with open(os.path.join(path, "model.json")) as f:
            meta = json.load(f)
    elif os.path.isfile(os.path.join(path, "config.json")) and \
            os.path.isdir(os.path.join(path, "checkpoints")):
        from pfc_jax import export
        model = export.load_workdir_config(path).model
        meta = dict(model=model.name, embedding_dim=model.embedding_dim)
    else:
        raise FileNotFoundError(f"init_from {path}: neither model.json (a pfc-export or "
                                "pfc-import directory) nor config.json + checkpoints/ "
                                "(a pfc_jax workdir)")
    want = (config.model.name, int(config.model.embedding_dim))
    got = (meta.get("model"), int(meta.get("embedding_dim", -1)))
    if got != want:
        raise ValueError(f"init_from {path} holds {got[0]} with {got[1]}-d embeddings; the "
                         f"config trains {want[0]} with {want[1]}-d (set model.name / "
                         "model.embedding_dim to match)")
    return meta


def init_backbone_from(state: TrainState, config, shardings: TrainState) -> TrainState:
    """``state`` with params and BN statistics from the export at ``config.init_from``.

    ``train_and_evaluate`` has checked the export with ``_init_from_meta``
    before compiling; the optimizer state stays fresh (zero momentum) and the
    head is untouched.
    """
    from pfc_jax import export
    if os.path.isfile(os.path.join(config.init_from, "model.json")):
        _, variables = export.load_backbone(config.init_from)
    else:  # a workdir: its newest checkpoint's backbone (a projection head is left out)
        _, variables, _ = export.restore_backbone(config.init_from)
    put = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda a, s: jax.device_put(np.asarray(a, np.float32), s), tree, sh)
    return state.replace(params=put(variables["params"], shardings.params),
                         batch_stats=put(variables.get("batch_stats", {}),
                                         shardings.batch_stats))


def make_mesh(config):
    devices = jax.devices()
    if config.mesh_devices:
        devices = devices[:config.mesh_devices]
    return mesh_lib.make_mesh(dict(config.mesh), devices)


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None) -> dict:
    """Trains (or resumes) ``config`` in ``workdir``; returns the last metrics.

    ``stop_after`` ends this call after that many steps, as a preemption
    would (the schedule still runs to the config's total).
    """
    mesh = make_mesh(config)
    config_lib.validate(config, mesh.size)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    source = build_source(config)
    pretrain = config_lib.ssl_mode_of(config) == "pretrain"  # labels unused, no head
    if not pretrain and classes_of(config, source) != config.head.num_classes:
        if is_main:
            print(f"pfc_jax.train: head.num_classes {config.head.num_classes} -> "
                  f"{source.num_classes}, the classes of {source!r}", file=sys.stderr)
        config.head.num_classes = classes_of(config, source)
    noise = _noise(config)
    if is_main and (noise["flip"] or noise["conflict"]):
        from pfc_jax.data.noise import truth_of  # injected noise: keep its ground truth
        truth_of(source).save(os.path.join(workdir, NOISE_TRUTH))
    if not pretrain:
        from pfc_jax.data.sources import check_labels
        check_labels(source, config.head.num_classes)

    ckpts = ckpt_lib.Checkpoints(workdir, keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
    start = ckpts.latest_step()
    if start is None and config.init_from:  # before compiling; a resumed run needs it not
        try:
            _init_from_meta(config)
        except (OSError, ValueError):
            ckpts.close()
            raise
    padded = ckpts.meta(start).get("padded_classes") if start is not None else None
    trainer = Trainer(config, mesh, padded_classes=padded)
    logger = logs.MetricLogger(workdir, trainer.total_steps, enabled=is_main, resume_step=start)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    loader = make_loader(config, source)
    keys = batch_keys(config)
    data_iter = DevicePrefetch(
        iter(loader), lambda host: mesh_lib.host_local_to_global(
            {k: host[k] for k in keys}, mesh),
        depth=config.data.device_prefetch)
    if start is None:
        state = trainer.init(trainer.base_key)
        if config.init_from:
            state = init_backbone_from(state, config, trainer.state_shardings)
            logger.print(f"backbone initialised from {config.init_from}; the head is new")
        logger.print(f"training from scratch: {trainer.describe(config.batch_size)}")
    else:
        state = ckpts.restore(start, trainer.abstract_state, data_iter)
        logger.print(f"resumed from step {start} of {trainer.total_steps} "
                     f"({ckpts.directory})")
    held_out = build_source(config, held_out=True) if config.data.kind == "synthetic" else None
    # Every process embeds the evaluation images (the model spans all devices);
    # only process 0 logs the results.
    eval_sets = load_eval_sets(config, held_out)
    meta = trainer.checkpoint_meta()

    step = int(jax.device_get(state.step))
    last_saved, pending, last = start, None, {}

    def flush():  # check and log the newest finished step
        nonlocal pending, last
        if pending is None:
            return
        done, metrics = pending
        pending = None
        last = _check(done, metrics, last_saved, config.head.num_classes)
        if done % config.log_every_steps == 0 or done == 1 or done == trainer.total_steps:
            logger.write(done, last, prefix="train")
            logger.train_line(done, last, config.batch_size)

    t0 = time.time()
    end = trainer.total_steps if stop_after is None else min(trainer.total_steps,
                                                             step + stop_after)
    stopped = False
    try:
        with preemption.Watch() as watch:
            while step < end:
                batch = next(data_iter)  # placed on the devices ahead of time
                state, metrics = trainer.train_step(state, batch)
                step += 1
                flush()  # the previous step's metrics: reading them does not stall the device
                pending = (step, metrics)
                stopped = watch.should_stop(step)  # the same answer on every process
                save_now = stopped or step % config.checkpoint.every_steps == 0 or step == end
                eval_now = not stopped and config.eval.every_steps and (
                    step % config.eval.every_steps == 0 or step == trainer.total_steps)
                if save_now or eval_now:
                    flush()  # never save or evaluate a state that diverged
                    if eval_now:
                        last.update({f"eval/{name}": r.accuracy_mean for name, r in
                                     evaluate(trainer, state, eval_sets, logger, step).items()})
                    if save_now:
                        ckpts.save(step, state, data_iter, meta)
                        last_saved = step
                if stopped:
                    break
            flush()
    finally:
        # Also on an error (divergence, bad data): the asynchronous write of the
        # last good checkpoint must commit before the process ends.
        ckpts.close()
        data_iter.close()  # the prefetch thread, then the loader's workers
    if stopped:
        if jax.process_count() > 1:
            # Process 0 renames the checkpoint into place after the others wrote
            # their shards: no process may exit (and have its launcher stop the
            # rest) before that commit.
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("pfc_jax preemption checkpoint committed")
        logger.close()  # main() prints the Preempted message, on every process
        raise preemption.Preempted(step, watch.signum, time.monotonic() - watch.received_at)
    logger.print(f"done: step {step}, {time.time() - t0:.1f} s")
    logger.close()
    return last


def main(argv):
    del argv
    from absl import flags
    distributed.initialize_from_flags()  # before anything touches a device
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except preemption.Preempted as e:
        print(f"pfc_jax.train: process {jax.process_index()}: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_status)  # 128 + signal, after the checkpoint committed


def run():
    """Console entry point ``pfc-train``."""
    from pfc_jax import platform
    platform.choose()  # before JAX starts: no TPU probing on a host without one
    from absl import app, flags
    from absl import logging as absl_logging
    from ml_collections import config_flags
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    config_flags.DEFINE_config_file("config", None, "a configs/*.py recipe (file[:arg])",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, TensorBoard")
    distributed.define_flags()  # --coordinator_address, --num_processes, --process_id, ...
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
