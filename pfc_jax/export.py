"""Backbone-only export and loading, for inference and evaluation.

    python -m pfc_jax.export --workdir /ckpt/ms1mv3_r50 --out /models/ms1mv3_r50

writes ``backbone.msgpack`` (flax-serialised ``{"params", "batch_stats"}``) and
``model.json`` (backbone name, embedding size, input convention). The class
table is not part of it. ``load_backbone(dir)`` returns ``(model, variables)``;
``model.apply(variables, (uint8 - 127.5) / 127.5, train=False)`` embeds
112x112 RGB crops.
"""

from __future__ import annotations

import argparse
import json
import os

import flax.serialization
import jax
import ml_collections
import numpy as np

from pfc_jax import checkpoint as ckpt_lib
from pfc_jax import models

INPUT = dict(size=[112, 112, 3], layout="NHWC", color="RGB", normalize="(x - 127.5) / 127.5")


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: is {workdir} a pfc_jax workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_backbone(workdir: str, step: int | None = None):
    """(model, variables, step) from a workdir's checkpoint, without the class table."""
    config = load_workdir_config(workdir)
    model = models.from_config(config.model)
    ckpts = ckpt_lib.Checkpoints(workdir, with_data=False)
    step = ckpts.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    variables = ckpts.restore_backbone(step, target=models.abstract_variables(model))
    ckpts.close()
    return model, variables, step


def export_backbone(workdir: str, out_dir: str, step: int | None = None) -> str:
    model, variables, step = restore_backbone(workdir, step)
    config = load_workdir_config(workdir)
    os.makedirs(out_dir, exist_ok=True)
    host = jax.tree.map(np.asarray, variables)
    with open(os.path.join(out_dir, "backbone.msgpack"), "wb") as f:
        f.write(flax.serialization.to_bytes(host))
    with open(os.path.join(out_dir, "model.json"), "w") as f:
        json.dump(dict(model=config.model.name, embedding_dim=config.model.embedding_dim,
                       dtype=config.model.dtype, step=int(step), input=INPUT), f, indent=2)
    return out_dir


def load_backbone(path: str):
    """(model, variables) from an ``export_backbone`` directory."""
    with open(os.path.join(path, "model.json")) as f:
        meta = json.load(f)
    model = models.from_config(dict(name=meta["model"], embedding_dim=meta["embedding_dim"],
                                    dtype=meta["dtype"]))
    target = models.abstract_variables(model)
    with open(os.path.join(path, "backbone.msgpack"), "rb") as f:
        variables = flax.serialization.from_bytes(target, f.read())
    return model, variables


def main(argv=None):
    from pfc_jax import platform
    platform.choose()  # before JAX starts (a no-op when it already has)
    ap = argparse.ArgumentParser(description="Export a workdir's backbone for inference.")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    args = ap.parse_args(argv)
    print(export_backbone(args.workdir, args.out, args.step))


if __name__ == "__main__":
    main()
