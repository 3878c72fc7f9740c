"""Inversion of a trained model, measured: identity cosines with and without the BN prior.

    python bench/invert.py --out /tmp/pfc_invert            # ~15 min on 2 cores

1. Trains two models on the same synthetic identities (configs/tiny_cpu.py,
   r_tiny, 400 identities, 900 steps): model A (seed 0) and model B (seed 1,
   ``data.synthetic_seed=0``: the same faces, another initialisation and data
   order). A workdir that already holds its last checkpoint is reused.
2. Inverts model A to ``--classes`` class centres (``pfc_jax.invert.run``,
   ``--steps`` Adam steps), once with the BN prior (weight 0.05) and once
   without (weight 0).
3. Embeds the written PNGs (uint8, as published) under A and under B and
   reports, per setting, the mean cosine of each image to
   * its class centre in A's table,
   * the mean embedding of 8 real images of its identity, under A and under B;
   beside the mean cosine of genuine pairs (two real images of one identity)
   and of random pairs (two identities) under each model.

Prints a table and writes ``DIR/invert.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _train(workdir: str, seed: int, steps: int) -> None:
    from pfc_jax import checkpoint as ckpt_lib
    from pfc_jax import train
    from pfc_jax.config import load_recipe
    cfg = load_recipe(os.path.join(REPO, "configs", "tiny_cpu.py"),
                      overrides={"seed": seed, "data.synthetic_seed": 0, "max_steps": steps,
                                 "eval.every_steps": steps})
    ckpts = ckpt_lib.Checkpoints(workdir, with_data=False) if os.path.isdir(workdir) else None
    done = ckpts.latest_step() if ckpts else None
    if ckpts:
        ckpts.close()
    if done == steps:
        print(f"{workdir}: reusing step {done}")
        return
    t0 = time.time()
    train.train_and_evaluate(cfg, workdir)
    print(f"{workdir}: trained {steps} steps in {time.time() - t0:.0f} s")


def _unit(x):
    import numpy as np
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/pfc_invert")
    ap.add_argument("--train-steps", type=int, default=900)
    ap.add_argument("--steps", type=int, default=1000, help="inversion steps")
    ap.add_argument("--classes", type=int, default=16)
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    from pfc_jax import platform
    platform.use_cpu(8)
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)

    import jax
    import numpy as np
    from PIL import Image

    from pfc_jax import export, invert, train
    from pfc_jax.config import load_recipe
    from pfc_jax.data.augment import normalize

    wa, wb = os.path.join(args.out, "model_a"), os.path.join(args.out, "model_b")
    _train(wa, 0, args.train_steps)
    _train(wb, 1, args.train_steps)
    cfg = load_recipe(os.path.join(REPO, "configs", "tiny_cpu.py"),
                      overrides={"data.synthetic_seed": 0})
    src = train.build_source(cfg)
    models = {k: export.restore_backbone(w)[:2] for k, w in (("A", wa), ("B", wb))}

    def embed(name, images):
        model, variables = models[name]
        f = jax.jit(lambda v, x: model.apply(v, normalize(x), train=False))
        return _unit(np.concatenate([np.asarray(f(variables, images[i:i + 64]))
                                     for i in range(0, len(images), 64)]))

    classes = list(range(args.classes))
    per = 8
    real = np.stack([src.render(c, j) for c in classes for j in range(per)])
    ref = {}
    for name in models:
        e = embed(name, real).reshape(len(classes), per, -1)
        genuine = np.mean([e[c, 0] @ e[c, 1] for c in classes])
        impostor = np.mean([e[c, 0] @ e[(c + 1) % len(classes), 1] for c in classes])
        ref[name] = dict(means=_unit(e.mean(1)), genuine=float(genuine),
                         random=float(impostor))
    from pfc_jax import clean
    table = _unit(np.asarray(jax.device_get(clean.load_table(wa)[2]))[:, 0])

    rows = {}
    for label, weight in (("with BN prior (0.05)", 0.05), ("without BN prior", 0.0)):
        out = os.path.join(args.out, f"bn_{weight:g}")
        t0 = time.time()
        result = invert.run(workdir=wa, classes=classes, out=out,
                            cfg=invert.InvertConfig(steps=args.steps, bn_weight=weight))
        seconds = time.time() - t0
        images = np.stack([np.asarray(Image.open(os.path.join(out, f"class_{c}.png")))
                           for c in classes])
        ea, eb = embed("A", images), embed("B", images)
        rows[label] = dict(
            seconds=seconds, terms=result["terms"],
            a_centre=float(np.mean(np.sum(ea * table[classes], 1))),
            a_real=float(np.mean(np.sum(ea * ref["A"]["means"], 1))),
            b_real=float(np.mean(np.sum(eb * ref["B"]["means"], 1))),
            b_real_min=float(np.min(np.sum(eb * ref["B"]["means"], 1))))
    print(f"\n{len(classes)} targets, {args.steps} steps, model r_tiny 900 steps")
    print(f"{'':24s} {'A: centre':>10s} {'A: real':>8s} {'B: real':>8s} {'B: min':>7s}")
    for label, r in rows.items():
        print(f"{label:24s} {r['a_centre']:10.3f} {r['a_real']:8.3f} {r['b_real']:8.3f} "
              f"{r['b_real_min']:7.3f}   ({r['seconds']:.0f} s; terms {r['terms']})")
    for name in models:
        print(f"model {name}: genuine pairs {ref[name]['genuine']:.3f}, "
              f"random pairs {ref[name]['random']:.3f}")
    with open(os.path.join(args.out, "invert.json"), "w") as f:
        json.dump(dict(rows=rows, reference={k: dict(genuine=v["genuine"], random=v["random"])
                                             for k, v in ref.items()},
                       steps=args.steps, classes=classes), f, indent=2)


if __name__ == "__main__":
    main()
