#!/usr/bin/env python
"""The recognizability ablation: Partial FC, + index diversion, + attention, + both.

    .venv/bin/python bench/recognizability.py --out /tmp/pfc_vlr                 # synthetic
    .venv/bin/python bench/recognizability.py --out /tmp/pfc_vlr_g --data /tmp/pfc_glyphs

Each row trains ``configs/vlr.py:tiny,...`` (r_tiny, CosFace, low-resolution
augmentation: half the images down to 8-32 px and back, some blurred or
JPEG-compressed; the UI centre and the quality head in every row, the quality
loss detached so that it leaves the backbone alone) on one device:

    pfc    nodiv,noatt   Partial FC with the augmentation
    div    noatt         + index diversion
    att    nodiv         + perceptibility attention
    both                 + both
    attsig, bothsig      att / both with the attention gated per position (sigmoid)

and scores it on held-out pairs with ``pfc-eval``: verification accuracy at
full resolution, at ``--sides`` px (both images degraded, bicubic), and the
error-versus-discard area (FNMR at ``--fmr``, 0-50 % discarded) of the
learned quality score, the embedding norm and a random score at each size.
A row whose workdir holds its last checkpoint is scored, not retrained; rows
already in ``results.json`` from an earlier call are kept beside the new ones.
Writes ``results.json`` and ``edc_<row>.png`` (the smallest side) in ``--out``.
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
ROWS = {"pfc": "nodiv,noatt", "div": "noatt", "att": "nodiv", "both": "",
        "attsig": "nodiv,sigmoid", "bothsig": "sigmoid"}  # the last two: --rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=None, help="a bench/make_glyphs.py folder")
    ap.add_argument("--rows", default="pfc,div,att,both")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--identities", type=int, default=400)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--sides", default="16,24")
    ap.add_argument("--fmr", type=float, default=1e-2)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    os.makedirs(args.out, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731

    common = {"mesh_devices": 1, "eval.every_steps": 0, "batch_size": args.batch,
              "max_steps": args.steps, "checkpoint.every_steps": args.steps,
              "data.worker_count": 0}
    if args.data:
        from pfc_jax.data.recordio import RecordIODataset
        train_dir = os.path.join(args.data, "train")
        with RecordIODataset(train_dir) as rec:
            n_images, n_classes = len(rec), rec.num_classes
        common.update({"data.kind": "recordio", "data.path": train_dir,
                       "head.num_classes": n_classes, "data.num_images": n_images})
        pairs = os.path.join(args.data, "heldout.bin")
    else:
        from pfc_jax.data.synthetic import SyntheticFaces
        from pfc_jax.evaluate import verification
        common.update({"data.synthetic_identities": args.identities,
                       "head.num_classes": args.identities,
                       "data.synthetic_images_per_identity": args.images,
                       "data.num_images": args.identities * args.images})
        pairs = os.path.join(args.out, "heldout.bin")
        if not os.path.exists(pairs):
            held = SyntheticFaces(300, 8, seed=1, identity_offset=args.identities)
            verification.write_bin(pairs, *held.verification_pairs(1200, seed=2))
    sides = [int(s) for s in args.sides.split(",")]
    results = dict(args=vars(args), rows={})
    old = os.path.join(args.out, "results.json")
    if os.path.exists(old):  # rows scored by an earlier call (other --rows) are kept
        with open(old) as f:
            results["rows"].update(json.load(f).get("rows", {}))
    from pfc_jax import plots
    from pfc_jax.evaluate import quality
    from pfc_jax.evaluate.__main__ import main as eval_main
    for row in args.rows.split(","):
        wd = os.path.join(args.out, row)
        if not os.path.isdir(os.path.join(wd, "checkpoints", str(args.steps))):
            cmd = [sys.executable, "-m", "pfc_jax.train", "--config",
                   os.path.join(ROOT, "configs", f"vlr.py:tiny,{ROWS[row]}".rstrip(",")),
                   "--workdir", wd] + [f"--config.{k}={v}" for k, v in common.items()]
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            env.pop("XLA_FLAGS", None)
            t0 = time.time()
            with open(wd + ".log", "a") as f:
                subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env,
                               cwd=ROOT)
            log(f"{row}: trained in {time.time() - t0:.0f} s")
        argv = ["--workdir", wd, "--bin", pairs, "--quality", "--fmr", str(args.fmr)]
        for s in sides:
            argv += ["--lowres", str(s)]
        out = eval_main(argv)
        results["rows"][row] = {name: dict(accuracy=r["accuracy"], accuracy_std=r["accuracy_std"],
                                           edc_area={k: c["area"] for k, c in
                                                     r["error_vs_discard"].items()},
                                           edc=r["error_vs_discard"])
                                for name, r in out.items()}
        small = next(n for n in out if n.endswith(f"@{min(sides)}px"))
        plots.save(quality.edc_figure(out[small]["error_vs_discard"], f"{row}: {small}"),
                   os.path.join(args.out, f"edc_{row}.png"))
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    log("\nrow    " + "  ".join(f"{n:>18}" for n in out) + "   EDC area learned/norm/random")
    for row, r in results["rows"].items():
        accs = "  ".join(f"{v['accuracy']:>11.4f}±{v['accuracy_std']:.3f}" for v in r.values())
        areas = "  ".join("/".join(f"{v['edc_area'][k]:.4f}" for k in ("learned", "norm",
                                                                          "random"))
                          for v in r.values())
        log(f"{row:<6} {accs}   {areas}")
    log(f"-> {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
