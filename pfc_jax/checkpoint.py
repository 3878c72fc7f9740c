"""Checkpoints in the workdir: orbax, async, keep the last N, data iterator included.

One checkpoint step holds four items:

* ``backbone``: ``{"params", "batch_stats"}``: all that inference needs, so
  evaluation and export restore it alone, without the class table;
* ``train``: ``{"step", "opt_state", "head"}``: the optimizer states and the
  sharded class table; restored into the current run's shardings, so a run
  saved on 8 devices resumes on 4; with the contrastive branch also ``"ssl"``
  (the projection head), and without ``"head"`` in self-supervised
  pre-training;
* ``data``: the input pipeline's iterator state (JSON; it names the global
  batch position, which is the same on every process);
* ``meta``: JSON facts needed before restoring (table rows, classes, ...);
* ``quality`` (recognizability runs only): the quality head and the UI
  centre, for quality scoring without the class table.

orbax writes each step into a temporary directory and renames it when
complete, so a crash during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("backbone", "train", "data", "meta")


class Checkpoints:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
                 with_data: bool = True):
        self.directory = epath.Path(workdir) / "checkpoints"
        handlers = dict(backbone=ocp.StandardCheckpointHandler(),
                        train=ocp.StandardCheckpointHandler(),
                        quality=ocp.StandardCheckpointHandler(),
                        meta=ocp.JsonCheckpointHandler())
        if with_data:
            handlers["data"] = ocp.JsonCheckpointHandler()
        self.with_data = with_data
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
            item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def meta(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def save(self, step: int, state, data_iterator, meta: dict) -> None:
        items = dict(
            backbone=ocp.args.StandardSave(
                {"params": state.params, "batch_stats": state.batch_stats}),
            train=ocp.args.StandardSave(_train_item(state)),
            meta=ocp.args.JsonSave(meta))
        if getattr(state, "rec", None) is not None:  # what quality scoring needs, alone
            items["quality"] = ocp.args.StandardSave(
                {"params": state.rec.params, "ui_centre": state.rec.ui_centre})
        if self.with_data:
            items["data"] = ocp.args.JsonSave(
                {"iterator": data_iterator.get_state().decode("utf-8")})
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores into ``abstract_state``'s shapes and shardings; returns the state."""
        items = dict(
            backbone=ocp.args.StandardRestore(
                {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}),
            train=ocp.args.StandardRestore(_train_item(abstract_state)))
        if self.with_data and data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if self.with_data and data_iterator is not None:
            data_iterator.set_state(out["data"]["iterator"])
        train = out["train"]
        return abstract_state.replace(
            params=out["backbone"]["params"], batch_stats=out["backbone"]["batch_stats"],
            step=train["step"], opt_state=train["opt_state"], head=train.get("head"),
            ssl=train.get("ssl"), rec=train.get("rec"))

    def restore_backbone(self, step: int | None = None, target: Any = None) -> dict:
        """``{"params", "batch_stats"}`` of a step (default: latest), for evaluation/export."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if target is not None:
            # Leaves without a sharding land on this process's first device: a
            # checkpoint written on a pod restores on a laptop.
            here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda x: x if getattr(x, "sharding", None) is not None else
                jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), target)
        args = ocp.args.StandardRestore(target) if target is not None else \
            ocp.args.StandardRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(backbone=args))
        return out["backbone"]

    def restore_quality(self, step: int | None = None) -> dict | None:
        """``{"params", "ui_centre"}`` of the quality head (None: the run has none)."""
        step = self.latest_step() if step is None else step
        if step is None or not (self.directory / str(step) / "quality").exists():
            return None
        meta = self.manager.item_metadata(step)["quality"]
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                              meta)
        out = self.manager.restore(step, args=ocp.args.Composite(
            quality=ocp.args.StandardRestore(target)))
        return out["quality"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _train_item(state) -> dict:
    """The ``train`` item: step and optimizer state, the head and the SSL branch if any."""
    item = {"step": state.step, "opt_state": state.opt_state}
    for name in ("head", "ssl", "rec"):
        if getattr(state, name, None) is not None:
            item[name] = getattr(state, name)
    return item


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
