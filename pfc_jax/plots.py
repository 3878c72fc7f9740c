"""Pictures of a run: training curves from ``metrics.jsonl``, ROC curves of evaluations.

    pfc-plot WORKDIR                          # WORKDIR/training.png
    pfc-plot --roc a.json b.json --out roc.png   # pfc-eval --json results, overlaid

``training.png``: loss, top-1 (with and without the margin), learning rate
and every evaluation set's accuracy against the step, one panel each.
ROC: TAR against FAR on a log axis, one curve per model (and set), from
``pfc-eval --json`` files (which hold each set's curve) or drawn by
``pfc-eval --roc DIR`` directly. Matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from pfc_jax import platform

FIGSIZE, DPI = (8.0, 6.0), 100  # 800 x 600 pixels


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only): every plot of pfc_jax."""
    import matplotlib
    matplotlib.use("Agg")  # before pyplot; files only, no display
    import matplotlib.pyplot as plt
    return plt


# ------------------------------------------------------------------ reading
def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` (or of the one in a workdir), in order."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is this a training workdir?)")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError(f"{path} line {n}: a record needs an integer 'step'")
            records.append(rec)
    return records


def series(records: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, skipping records without it or not finite."""
    pts = [(r["step"], float(r[key])) for r in records
           if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    if not pts:
        return np.zeros(0, int), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps), np.asarray(values)


def read_roc_results(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{set: (far, tar)}`` from a ``pfc-eval --json`` file."""
    with open(path) as f:
        try:
            out = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e.msg})") from None
    curves = {}
    for name, res in out.items():
        roc = res.get("roc") if isinstance(res, dict) else None
        if not roc or "far" not in roc or "tar" not in roc:
            raise ValueError(f"{path}: set {name!r} has no ROC (written by an older pfc-eval?)")
        curves[name] = (np.asarray(roc["far"], float), np.asarray(roc["tar"], float))
    return curves


# ------------------------------------------------------------------ figures
def training_figure(records: Sequence[Mapping], title: str = ""):
    """Loss, top-1, learning rate and evaluation accuracy against the step."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, dpi=DPI, sharex=True)
    (ax_loss, ax_top1), (ax_lr, ax_eval) = axes
    for ax, keys, label in ((ax_loss, ["train/loss"], "loss"),
                            (ax_top1, ["train/top1", "train/margin_top1"], "top-1"),
                            (ax_lr, ["train/lr"], "learning rate")):
        for key in keys:
            x, y = series(records, key)
            if x.size:
                ax.plot(x, y, label=key.split("/", 1)[1])
        ax.set_ylabel(label)
        if len(keys) > 1:
            ax.legend(loc="best", fontsize="small")
    eval_keys = sorted({k for r in records for k in r
                        if k.startswith("eval/") and k.endswith("/accuracy")})
    for key in eval_keys:
        x, y = series(records, key)
        ax_eval.plot(x, y, marker="o", label=key[len("eval/"):-len("/accuracy")])
    ax_eval.set_ylabel("verification accuracy")
    if eval_keys:
        ax_eval.legend(loc="best", fontsize="small")
    else:
        ax_eval.text(0.5, 0.5, "no evaluation in this run", ha="center", va="center",
                     transform=ax_eval.transAxes)
    for ax in axes[1]:
        ax.set_xlabel("step")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC",
               min_far: float | None = None, xlabel: str = "false accept rate",
               ylabel: str = "true accept rate"):
    """TAR against FAR (log x), one curve per entry; FAR = 0 points are left off.
    (The same axes serve TPIR against FPIR with the labels changed.)"""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    lowest = 1.0
    for label, (far, tar) in curves.items():
        far, tar = np.asarray(far, float), np.asarray(tar, float)
        keep = far > 0
        if not keep.any():
            raise ValueError(f"ROC {label!r}: no point with FAR > 0")
        ax.step(far[keep], tar[keep], where="post", label=label)
        lowest = min(lowest, float(far[keep].min()))
    lo = min_far if min_far is not None else 10 ** math.floor(math.log10(lowest))
    ax.set_xscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def save(fig, path: str) -> str:
    """Writes ``fig`` as a PNG and closes it; returns the path."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, format="png")
    pyplot().close(fig)
    return path


# ---------------------------------------------------------------------- CLI
def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", nargs="?", help="a training workdir: draws its training.png")
    ap.add_argument("--roc", nargs="+", metavar="JSON",
                    help="pfc-eval --json files: their ROC curves overlaid, one plot per set")
    ap.add_argument("--out", help="the PNG (default WORKDIR/training.png; with --roc, "
                                  "roc.png, or roc_<set>.png per set when several)")
    args = ap.parse_args(argv)
    if bool(args.workdir) == bool(args.roc):
        ap.error("give a WORKDIR or --roc JSON..., not both or neither")
    written = []
    if args.workdir:
        out = args.out or os.path.join(args.workdir, "training.png")
        records = read_metrics(args.workdir)
        if not records:
            raise SystemExit(f"pfc-plot: {args.workdir}: metrics.jsonl has no records yet")
        written.append(save(training_figure(records, os.path.basename(
            os.path.normpath(args.workdir))), out))
    else:
        per_set: dict[str, dict] = {}
        for path in args.roc:
            label = os.path.splitext(os.path.basename(path))[0]
            for name, curve in read_roc_results(path).items():
                per_set.setdefault(name, {})[label] = curve
        out = args.out or "roc.png"
        for name, curves in per_set.items():
            path = out if len(per_set) == 1 else (
                f"{os.path.splitext(out)[0]}_{name}{os.path.splitext(out)[1] or '.png'}")
            written.append(save(roc_figure(curves, f"ROC: {name}"), path))
    for path in written:
        print(path)
    return written


run = platform.entry_point(main, __name__)
