#!/usr/bin/env python
"""The contrastive-SSL experiment: augmentation strength, the paper's three factors,
downstream accuracy; and Partial FC from scratch against from an SSL backbone.

    .venv/bin/python bench/contrastive.py --out /tmp/pfc_ssl                      # synthetic ids
    .venv/bin/python bench/contrastive.py --out /tmp/pfc_ssl_g --data /tmp/pfc_glyphs  # real images

Part 1 (Huang, Yi, Zhao, ICLR 2023): for each augmentation strength S in
``--strengths`` (``pfc_jax.ssl.view_augmentation``), pre-train r_tiny with
InfoNCE (``configs/ssl.py:tiny,strength=S``), then on *held-out* identities
measure with ``pfc_jax.diagnose`` (under that model's own augmentation) the
alignment, the centre divergence, ``1 - min |mu_k|^2`` and ``1 - sigma`` at
each ``--delta``, and the downstream numbers: the leave-one-out 1-NN identity
accuracy of the frozen backbone, and the verification accuracy after Partial
FC fine-tunes it (``configs/tiny_cpu.py --config.init_from``) on all labels.
It prints the Pearson and Spearman correlation of each factor with each
downstream number across strengths.

Part 2: Partial FC on 10 % and on 100 % of the labelled images (10 %: a
keep-list of a tenth of each identity's images, at least two), from scratch
and from the backbone pre-trained at ``--ssl-strength``.

Every run is a ``pfc_jax.train`` subprocess on one device, one at a time; a
run whose workdir already holds its last checkpoint is not retrained.
Writes ``results.json`` and ``ssl_scatter.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_train(recipe: str, workdir: str, overrides: dict, log) -> None:
    steps = overrides["max_steps"]
    if os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
        log(f"  {os.path.basename(workdir)}: done before")
        return
    cmd = [sys.executable, "-m", "pfc_jax.train", "--config", os.path.join(ROOT, recipe),
           "--workdir", workdir] + [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    t0 = time.time()
    with open(workdir + ".log", "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    log(f"  {os.path.basename(workdir)}: trained in {time.time() - t0:.0f} s")


def verify(workdir: str, pairs: dict) -> float:
    from pfc_jax import export
    from pfc_jax.evaluate import verification
    from pfc_jax.evaluate.__main__ import make_embed_fn
    model, variables, _ = export.restore_backbone(workdir)
    res = verification.verify(make_embed_fn(model, variables, 64), pairs, 64)["heldout"]
    return float(res.accuracy_mean)


def diagnose_run(workdir: str, images, labels, strength: float, deltas, views: int) -> dict:
    from pfc_jax import diagnose, export, ssl
    from pfc_jax.config import base_config
    from pfc_jax.evaluate.__main__ import make_embed_fn
    model, variables, _ = export.restore_backbone(workdir)
    data = base_config().data
    data.update(ssl.view_augmentation(strength))
    fn = make_embed_fn(model, variables, 64)
    v, clean = diagnose.embed_views(fn, images, ssl.augment_config(data), views, seed=0)
    return diagnose.diagnostics(v, labels, deltas, clean)


def correlations(xs, ys) -> dict:
    from scipy import stats
    if len(xs) < 3 or np.std(xs) == 0 or np.std(ys) == 0:
        return dict(pearson=None, spearman=None)
    return dict(pearson=float(stats.pearsonr(xs, ys)[0]),
                spearman=float(stats.spearmanr(xs, ys)[0]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=None,
                    help="a folder from bench/make_glyphs.py instead of the synthetic ids")
    ap.add_argument("--strengths", default="0,0.25,0.5,1.0")
    ap.add_argument("--ssl-strength", type=float, default=1.0, help="part 2's backbone")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--finetune-steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--identities", type=int, default=400)
    ap.add_argument("--images", type=int, default=16, help="images per identity")
    ap.add_argument("--delta", default="0.5,0.75,1.0")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--diag-classes", type=int, default=100)
    ap.add_argument("--parts", default="1,2")
    ap.add_argument("--barlow", action="store_true",
                    help="part 1 also pre-trains Barlow Twins at --ssl-strength")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    os.makedirs(args.out, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    strengths = [float(s) for s in args.strengths.split(",")]
    deltas = tuple(float(d) for d in args.delta.split(","))
    parts = set(args.parts.split(","))

    from pfc_jax import diagnose
    from pfc_jax.evaluate import verification
    common = {"mesh_devices": 1, "eval.every_steps": 0, "batch_size": args.batch,
              "data.worker_count": 0}
    if args.data:
        from pfc_jax.data.recordio import RecordIODataset
        train_dir = os.path.join(args.data, "train")
        with RecordIODataset(train_dir) as rec:
            n_images, n_classes = len(rec), rec.num_classes
        data = {"data.kind": "recordio", "data.path": train_dir,
                "data.num_images": n_images}
        vs = verification.load_bin(os.path.join(args.data, "heldout.bin"))
        pairs = {"heldout": verification.VerificationSet("heldout", vs.images, vs.issame)}
        # held-out *labelled* images for the diagnostics: the glyph set's heldout.bin
        # has pairs only, so a sample of the training identities stands in (the SSL
        # runs never read their labels)
        images, labels = diagnose.load_labelled(f"recordio:{train_dir}", None,
                                                args.diag_classes, 8)
    else:
        from pfc_jax.data.synthetic import SyntheticFaces
        n_classes, n_images = args.identities, args.identities * args.images
        data = {"data.kind": "synthetic", "data.synthetic_identities": n_classes,
                "data.synthetic_images_per_identity": args.images,
                "data.num_images": n_images}
        held = SyntheticFaces(args.diag_classes, 8, seed=1, identity_offset=n_classes)
        p_images, issame = held.verification_pairs(1200, seed=2)
        pairs = {"heldout": verification.VerificationSet("heldout", p_images, issame)}
        images = np.stack([held[i]["image"] for i in range(len(held))])
        labels = np.asarray(held.labels())
    pfc = dict(common, **data, **{"head.num_classes": n_classes,
                                  "max_steps": args.finetune_steps,
                                  "checkpoint.every_steps": args.finetune_steps})
    pre = dict(common, **data, **{"max_steps": args.pretrain_steps,
                                  "checkpoint.every_steps": args.pretrain_steps})
    results = dict(args=vars(args), part1=[], part2=[])
    path = os.path.join(args.out, "results.json")

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=2)

    def pretrain(s, loss="infonce"):
        tag = "" if loss == "infonce" else f"_{loss}"
        wd = os.path.join(args.out, f"ssl_s{s:g}{tag}")
        run_train(f"configs/ssl.py:tiny,strength={s:g}", wd, dict(pre, **{"ssl.loss": loss}),
                  log)
        return wd

    if "1" in parts:
        log(f"part 1: strengths {strengths}")
        runs = [(s, "infonce") for s in strengths]
        if args.barlow:
            runs.append((args.ssl_strength, "barlow"))
        for s, loss in runs:
            wd = pretrain(s, loss)
            rep = diagnose_run(wd, images, labels, s, deltas, args.views)
            ft = os.path.join(args.out, "pfc_from_" + os.path.basename(wd)[4:])
            run_train("configs/tiny_cpu.py", ft, dict(pfc, init_from=wd), log)
            row = dict(strength=s, loss=loss, **rep, finetuned_accuracy=verify(ft, pairs),
                       frozen_accuracy=verify(wd, pairs))
            results["part1"].append(row)
            log(f"  S={s:g} {loss}: " + diagnose.format_report(rep).replace("\n", "\n    ") +
                f"\n    verification frozen {row['frozen_accuracy']:.4f}, "
                f"fine-tuned {row['finetuned_accuracy']:.4f}")
            save()
        rows = [r for r in results["part1"] if r["loss"] == "infonce"]
        factors = {"alignment": [r["alignment"] for r in rows],
                   "divergence_max": [r["divergence_max"] for r in rows],
                   "divergence_mean": [r["divergence_mean"] for r in rows],
                   "one_minus_min_centre_norm2": [r["one_minus_min_centre_norm2"] for r in rows]}
        for d in deltas:
            factors[f"mean_one_minus_sigma@{d:g}"] = [
                r["concentration"][f"{d:g}"]["mean_one_minus_sigma"] for r in rows]
        results["correlations"] = {
            f: {y: correlations(xs, [r[y] for r in rows])
                for y in ("knn_top1", "frozen_accuracy", "finetuned_accuracy")}
            for f, xs in factors.items()}
        save()
        scatter(rows, deltas, os.path.join(args.out, "ssl_scatter.png"))

    if "2" in parts:
        log("part 2: labels 10 % / 100 %, from scratch / from SSL")
        wd = pretrain(args.ssl_strength)
        keep = os.path.join(args.out, "keep_10pct.npz")
        if not os.path.exists(keep):
            from pfc_jax import train as train_lib
            from pfc_jax.config import load_recipe
            from pfc_jax.data.keep import write_keep_list
            cfg = load_recipe(os.path.join(ROOT, "configs/tiny_cpu.py"), None,
                              {k: v for k, v in pfc.items() if k.startswith("data.")})
            src = train_lib.build_source(cfg)
            lab = np.asarray(src.labels())
            rng = np.random.default_rng(0)
            mask = np.zeros(len(lab), bool)
            for c in np.unique(lab):
                r = np.flatnonzero(lab == c)
                mask[rng.choice(r, max(2, len(r) // 10), replace=False)] = True
            write_keep_list(keep, src, mask)
        for frac, extra in (("10", {"data.keep_list": keep}), ("100", {})):
            for init in ("scratch", "ssl"):
                name = f"pfc_{init}_{frac}pct"
                over = dict(pfc, **extra)
                if init == "ssl":
                    over["init_from"] = wd
                ft = os.path.join(args.out, name)
                if init == "ssl" and frac == "100":  # part 1's fine-tune of this backbone
                    ft = os.path.join(args.out, "pfc_from_" + os.path.basename(wd)[4:])
                run_train("configs/tiny_cpu.py", ft, over, log)
                row = dict(labels=f"{frac} %", init=init, accuracy=verify(ft, pairs))
                results["part2"].append(row)
                log(f"  {name}: verification {row['accuracy']:.4f}")
                save()
    log(f"-> {path}")


def scatter(rows, deltas, out):
    from pfc_jax import plots
    plt = plots.pyplot()
    d = f"{deltas[len(deltas) // 2]:g}"
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, name) in zip(axes, (("knn_top1", "1-NN identity accuracy (frozen)"),
                                      ("frozen_accuracy", "verification, frozen"),
                                      ("finetuned_accuracy", "verification, PFC fine-tuned"))):
        x = [r["concentration"][d]["mean_one_minus_sigma"] for r in rows]
        y = [r[key] for r in rows]
        ax.scatter(x, y)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"S={r['strength']:g}", (xi, yi), textcoords="offset points",
                        xytext=(4, 4))
        ax.set_xlabel(f"1 - sigma at delta {d} (mean over classes)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle("augmentation strength: concentration vs downstream accuracy")
    fig.tight_layout()
    plots.save(fig, out)


if __name__ == "__main__":
    main()
