#!/usr/bin/env python
"""Noisy-label experiment: what sub-centres, cleaning, sampling and filtering buy.

    .venv/bin/python bench/noise.py --out /tmp/pfc_noise            # every row
    .venv/bin/python bench/noise.py --out /tmp/pfc_noise --rows clean_k1,flip_k1

Each row trains the tiny CPU recipe (``configs/tiny_cpu.py``: r_tiny, CosFace
s = 32, m = 0.35 unless the row says otherwise) on the synthetic identities
with injected label noise (``data.noise``), on one device (so that a sample
rate of 0.1 samples 1 class in 10; on the 8-device mesh the lower bound
``Ns >= min(B, Cl)`` would turn it into full softmax at this size), and
scores the backbone on *clean, held-out* identities: 10-fold verification
accuracy and TAR at FAR 1e-2 over ``--pairs`` pairs. Rows:

    clean_k1         clean labels, K = 1, r = 1
    clean_k3         clean labels, K = 3, r = 1 (what sub-centres cost without noise)
    flip_k1          40 % flips, K = 1, r = 1
    flip_k3          40 % flips, K = 3, r = 1
    flip_k3_clean    flip_k3's table and backbone clean the set at 75 degrees
                     (pfc_jax.clean), then K = 1, r = 1 from scratch on it (not
                     trained when cleaning keeps under 10 % of the images)
    flip_k3_clean_mad  the same, keeping images within their class's median
                     + 0.5 MAD angle (pfc-clean --mad 0.5)
    flip_k1_suspects flip_k1's suspect list (pfc_jax.suspects) drops the 30 %
                     lowest-margin images, then K = 1, r = 1 from scratch
    flip_pfc_filter  40 % flips, K = 1, r = 0.1, filtering 0.4
    conflict_r1      20 % split identities, r = 1
    conflict_r01     20 % split identities, r = 0.1
    conflict_filter  20 % split identities, r = 0.1, filtering 0.4

Rows run in subprocesses (``pfc_jax.train``), one at a time; a row whose
workdir already holds a finished run is scored again, not retrained. Prints a
table and writes ``results.json`` in ``--out``. Each run's recipe knobs are
flags (``--identities``, ``--images``, ``--steps``, ``--batch``), and
``--set a.b=v`` adds a trainer override to every row (for instance
``--set head.margins='(1.0,0.5,0.0)'`` for ArcFace).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FLIP, CONFLICT = 0.4, 0.2
ROWS = {
    "clean_k1": dict(),
    "clean_k3": {"head.num_subcenters": 3},
    "flip_k1": {"data.noise.flip": FLIP},
    "flip_k3": {"data.noise.flip": FLIP, "head.num_subcenters": 3},
    "flip_k3_clean": {"data.noise.flip": FLIP, "_clean_from": "flip_k3"},
    "flip_k3_clean_mad": {"data.noise.flip": FLIP, "_clean_from": "flip_k3", "_mad": 0.5},
    "flip_k1_suspects": {"data.noise.flip": FLIP, "_suspects_from": "flip_k1", "_drop": 0.3},
    "flip_pfc_filter": {"data.noise.flip": FLIP, "head.sample_rate": 0.1,
                        "head.filter_threshold": 0.4},
    "conflict_r1": {"data.noise.conflict": CONFLICT},
    "conflict_r01": {"data.noise.conflict": CONFLICT, "head.sample_rate": 0.1},
    "conflict_filter": {"data.noise.conflict": CONFLICT, "head.sample_rate": 0.1,
                        "head.filter_threshold": 0.4},
}


def train(workdir: str, overrides: dict, log) -> float:
    cmd = [sys.executable, "-m", "pfc_jax.train", "--config",
           os.path.join(ROOT, "configs", "tiny_cpu.py"), "--workdir", workdir]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    t0 = time.time()
    with open(os.path.join(workdir + ".log"), "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    log(f"  trained {os.path.basename(workdir)} in {time.time() - t0:.0f} s")
    return time.time() - t0


def finished(workdir: str, steps: int) -> bool:
    path = os.path.join(workdir, "checkpoints")
    return os.path.isdir(os.path.join(path, str(steps)))


def score(workdir: str, pairs: dict) -> dict:
    from pfc_jax import export
    from pfc_jax.evaluate import verification
    from pfc_jax.evaluate.__main__ import make_embed_fn
    model, variables, step = export.restore_backbone(workdir)
    res = verification.verify(make_embed_fn(model, variables, 64), pairs, 64,
                              fars=(1e-2, 1e-1))["heldout"]
    return dict(accuracy=res.accuracy_mean, accuracy_std=res.accuracy_std,
                **{f"tar@far{k:g}": v for k, v in res.tar_at_far.items()}, step=int(step))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default=",".join(r for r in ROWS if r != "clean_k3"))
    ap.add_argument("--identities", type=int, default=600)
    ap.add_argument("--images", type=int, default=16, help="images per identity")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=1200, help="held-out verification pairs")
    ap.add_argument("--angle", type=float, default=75.0)
    ap.add_argument("--set", action="append", default=[], help="a.b=v for every row")
    ap.add_argument("--data", default=None,
                    help="a folder from bench/make_glyphs.py (train/ RecordIO + heldout.bin) "
                         "instead of the synthetic identities")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    os.makedirs(args.out, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731

    from pfc_jax.evaluate import verification
    common = {"batch_size": args.batch, "max_steps": args.steps, "mesh_devices": 1,
              "eval.every_steps": 0, "checkpoint.every_steps": args.steps}
    if args.data:
        from pfc_jax.data.recordio import RecordIODataset
        with RecordIODataset(os.path.join(args.data, "train")) as rec:
            n_images, n_classes = len(rec), rec.num_classes
        vs = verification.load_bin(os.path.join(args.data, "heldout.bin"))
        pairs = {"heldout": verification.VerificationSet("heldout", vs.images, vs.issame)}
        common.update({"data.kind": "recordio", "data.path": os.path.join(args.data, "train"),
                       "head.num_classes": n_classes, "data.num_images": n_images})
    else:
        from pfc_jax.data.synthetic import SyntheticFaces
        held = SyntheticFaces(300, 8, seed=1, identity_offset=args.identities)
        images, issame = held.verification_pairs(args.pairs, seed=2)
        pairs = {"heldout": verification.VerificationSet("heldout", images, issame)}
        common.update({"data.synthetic_identities": args.identities,
                       "head.num_classes": args.identities,
                       "data.synthetic_images_per_identity": args.images,
                       "data.num_images": args.identities * args.images})
    for kv in args.set:
        k, v = kv.split("=", 1)
        common[k] = v
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    for name in args.rows.split(","):
        spec = dict(ROWS[name])
        workdir = os.path.join(args.out, name)
        overrides = dict(common, **{k: v for k, v in spec.items() if not k.startswith("_")})
        row = dict(overrides=overrides)
        if "_clean_from" in spec or "_suspects_from" in spec:
            t0 = time.time()
            if "_clean_from" in spec:
                from pfc_jax import clean
                report = clean.clean(os.path.join(args.out, spec["_clean_from"]),
                                     os.path.join(args.out, name + "_keep"),
                                     angle=180.0 if "_mad" in spec else args.angle,
                                     mad=spec.get("_mad"), batch_size=64)
                log(clean.format_report(report) + f"\n  ({time.time() - t0:.0f} s)")
                row["clean"] = {k: report[k] for k in (
                    "images_kept", "images_dropped", "classes_kept", "classes_dropped",
                    "noise", "sweep", "angle_quantiles", "mad") if k in report}
            else:
                from pfc_jax import suspects
                report = suspects.find(os.path.join(args.out, spec["_suspects_from"]),
                                       os.path.join(args.out, name + "_keep"),
                                       drop_fraction=spec["_drop"], batch_size=64)
                log(suspects.format_report(report) + f"\n  ({time.time() - t0:.0f} s)")
                row["clean"] = {"images_kept": report["images_kept"],
                                "images_dropped": report["images_dropped"],
                                "classes_kept": report["classes_kept"],
                                "noise": report.get("dropped_vs_truth")}
            overrides["data.keep_list"] = report["keep_list"]
            row["overrides"] = overrides
            if report["images_kept"] < 0.1 * (report["images_kept"] + report["images_dropped"]):
                row["not_trained"] = "cleaning kept under 10 % of the images"
                results[name] = row
                log(f"{name:18s} not trained: {row['not_trained']}")
                with open(results_path, "w") as f:
                    json.dump(results, f, indent=2)
                continue
        if not finished(workdir, args.steps):
            os.makedirs(workdir, exist_ok=True)
            row["train_s"] = train(workdir, overrides, log)
        row.update(score(workdir, pairs))
        results[name] = row
        log(f"{name:18s} acc {row['accuracy']:.4f} ± {row['accuracy_std']:.4f}  "
            f"TAR@FAR1e-2 {row.get('tar@far0.01', float('nan')):.4f}")
        with open(results_path, "w") as f:
            json.dump(results, f, indent=2)
    print("\n| row | accuracy | TAR@FAR=1e-2 | cleaning P / R |\n|---|---|---|---|")
    for name, row in results.items():
        if "accuracy" not in row:
            print(f"| {name} | {row.get('not_trained', '')} | | |")
            continue
        pr = row.get("clean", {}).get("noise")
        pr = f"{pr['precision']:.3f} / {pr['recall']:.3f}" if pr else ""
        print(f"| {name} | {row['accuracy']:.4f} ± {row['accuracy_std']:.4f} | "
              f"{row.get('tar@far0.01', float('nan')):.4f} | {pr} |")


if __name__ == "__main__":
    main()
