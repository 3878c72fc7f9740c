"""Scores a checkpoint or an exported backbone on verification ``.bin`` sets.

    python -m pfc_jax.evaluate --workdir /ckpt/ms1mv3_r50 --bin /data/lfw.bin --bin /data/cfp_fp.bin
    pfc-eval --model /models/ms1mv3_r50 --bin lfw.bin       # an export_backbone directory
    pfc-eval --model M --bin lfw.bin --json m.json --roc plots/   # + ROC PNGs, curves in JSON

Embeds each image and its horizontal flip, sums, normalises, and reports
10-fold accuracy (mean ± std) and TAR at FAR 1e-3 per set.
"""

from __future__ import annotations

import argparse
import json

from pfc_jax import platform


def make_embed_fn(model, variables, batch_size: int):
    """Host uint8 images -> embeddings, on the most devices that split the batch."""
    from pfc_jax import embed
    return embed.Embedder(model, embed.batch_mesh(batch_size)).host_fn(variables)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training workdir (latest checkpoint unless --step)")
    src.add_argument("--model", help="a directory written by pfc_jax.export")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--bin", action="append", required=True, help="a verification .bin file")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--json", help="also write the results here (with each set's ROC "
                                   "curve, for pfc-plot --roc)")
    ap.add_argument("--roc", metavar="DIR", help="also draw DIR/roc_<set>.png per set")
    args = ap.parse_args(argv)

    from pfc_jax import export
    from pfc_jax.evaluate import verification

    if args.workdir:
        model, variables, step = export.restore_backbone(args.workdir, args.step)
        what = f"{args.workdir} step {step}"
    else:
        model, variables = export.load_backbone(args.model)
        what = args.model
    sets = {}
    for path in args.bin:
        vs = verification.load_bin(path)
        sets[vs.name] = vs
    results = verification.verify(make_embed_fn(model, variables, args.batch_size), sets,
                                  args.batch_size, flip=not args.no_flip, progress=None)
    print(f"{what}\n{verification.format_results(results)}")
    out = {name: dict(accuracy=r.accuracy_mean, accuracy_std=r.accuracy_std,
                      tar_at_far={str(k): v for k, v in r.tar_at_far.items()},
                      num_pairs=r.num_pairs,
                      roc=None if r.roc is None else dict(far=r.roc[0].tolist(),
                                                          tar=r.roc[1].tolist()))
           for name, r in results.items()}
    if args.roc:
        from pfc_jax import plots
        for name, r in results.items():
            if r.roc is None:
                print(f"{name}: no ROC (the set lacks same or different pairs)")
                continue
            print(plots.save(plots.roc_figure({what: r.roc}, f"ROC: {name}"),
                             f"{args.roc}/roc_{name}.png"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


run = platform.entry_point(main, __name__)  # pfc-eval; also python -m
