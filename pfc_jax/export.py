"""Backbone-only export and loading, for inference and evaluation.

    python -m pfc_jax.export --workdir /ckpt/ms1mv3_r50 --out /models/ms1mv3_r50
    pfc-export --workdir /ckpt/ms1mv3_r50 --out /models/ms1mv3_r50 --format onnx  # + model.onnx

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


FORMATS = ("msgpack", "onnx")
QUALITY_FILE = "quality.msgpack"


def restore_quality(workdir: str, step: int | None = None) -> dict | None:
    """``{"params", "ui_centre"}`` of a recognizability run's quality head, else None."""
    ckpts = ckpt_lib.Checkpoints(workdir, with_data=False)
    try:
        return ckpts.restore_quality(step)
    finally:
        ckpts.close()


def load_quality(path: str) -> dict | None:
    """The quality head of a workdir or an export directory (None when it has none)."""
    if os.path.isfile(os.path.join(path, "model.json")):
        file = os.path.join(path, QUALITY_FILE)
        if not os.path.exists(file):
            return None
        with open(file, "rb") as f:
            return flax.serialization.msgpack_restore(f.read())
    return restore_quality(path)
ONNX_FILE = "model.onnx"
ONNX_INPUT = dict(size=[3, 112, 112], layout="NCHW", color="RGB", batch="dynamic",
                  normalize="(x - 127.5) / 127.5, by the caller")


def export_backbone(workdir: str, out_dir: str, step: int | None = None,
                    formats: tuple[str, ...] = ("msgpack",)) -> str:
    """Writes the backbone of a workdir's checkpoint; returns ``out_dir``.

    Always ``backbone.msgpack`` + ``model.json`` (what ``load_backbone`` and
    pfc-eval read); with ``"onnx"`` in ``formats`` also ``model.onnx``
    (``pfc_jax.onnx_export``: the InsightFace recognition convention).
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"export format {bad[0]!r} is not one of {FORMATS}")
    model, variables, step = restore_backbone(workdir, step)
    config = load_workdir_config(workdir)
    host = jax.tree.map(np.asarray, variables)
    meta = dict(dtype=config.model.dtype, step=int(step))
    if config.model.get("attention"):
        meta["attention"] = True
        meta["attention_gate"] = config.model.get("attention_gate") or "softmax"
    quality = restore_quality(workdir, step)
    if quality is not None:  # recognizability runs: the quality head and the UI centre
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, QUALITY_FILE), "wb") as f:
            f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, quality)))
        meta["quality"] = dict(file=QUALITY_FILE, dropout=float(
            config.recognizability.get("dropout", 0.0)))
    if "onnx" in formats:
        from pfc_jax import onnx_export
        os.makedirs(out_dir, exist_ok=True)
        onnx_export.export_onnx(model, host, os.path.join(out_dir, ONNX_FILE))
        meta["onnx"] = dict(file=ONNX_FILE, input=ONNX_INPUT, opset=onnx_export.OPSET,
                            input_name=onnx_export.INPUT, output_name=onnx_export.OUTPUT)
    return write_export(config.model.name, config.model.embedding_dim, host, out_dir, **meta)


def write_export(model_name: str, embedding_dim: int, variables, out_dir: str,
                 **meta) -> str:
    """An export directory (what ``load_backbone`` reads) from in-memory variables;
    ``meta`` goes into ``model.json`` beside the backbone's name and size
    (``dtype``, the training compute dtype, defaults to float32)."""
    os.makedirs(out_dir, exist_ok=True)
    host = jax.tree.map(np.asarray, {"batch_stats": {}, **variables})  # BN-free: empty
    with open(os.path.join(out_dir, "backbone.msgpack"), "wb") as f:
        f.write(flax.serialization.to_bytes(host))
    with open(os.path.join(out_dir, "model.json"), "w") as f:
        json.dump(dict(model=model_name, embedding_dim=int(embedding_dim),
                       **{"dtype": "float32", **meta}, input=INPUT), f, indent=2)
    return out_dir


def add_model_args(ap) -> None:
    """The commands' shared ``--workdir W [--step N] | --model DIR`` arguments."""
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training workdir (latest checkpoint unless --step)")
    src.add_argument("--model", help="a pfc-export / pfc-import directory")
    ap.add_argument("--step", type=int, default=None)


def load_from_args(args):
    """(model, variables, description) of ``add_model_args``' choice."""
    if args.workdir:
        model, variables, step = restore_backbone(args.workdir, args.step)
        return model, variables, f"{args.workdir} step {step}"
    model, variables = load_backbone(args.model)
    return model, variables, args.model


def load_backbone(path: str):
    """(model, variables) from an ``export_backbone`` directory."""
    with open(os.path.join(path, "model.json")) as f:
        meta = json.load(f)
    model = models.from_config(dict(name=meta["model"], embedding_dim=meta["embedding_dim"],
                                    dtype=meta["dtype"], attention=meta.get("attention", False),
                                    attention_gate=meta.get("attention_gate", "softmax")))
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
    ap.add_argument("--format", choices=FORMATS, default="msgpack",
                    help="onnx: also model.onnx ([N, 3, 112, 112] NCHW RGB in, normalised by "
                         "the caller; [N, D] out), beside the msgpack export")
    args = ap.parse_args(argv)
    print(export_backbone(args.workdir, args.out, args.step, formats=(args.format,)))


if __name__ == "__main__":
    main()
