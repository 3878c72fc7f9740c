"""Scores a checkpoint or an exported backbone on verification ``.bin`` sets.

    python -m pfc_jax.evaluate --workdir /ckpt/ms1mv3_r50 --bin /data/lfw.bin --bin /data/cfp_fp.bin
    pfc-eval --model /models/ms1mv3_r50 --bin lfw.bin       # an export_backbone directory
    pfc-eval --model M --bin lfw.bin --json m.json --roc plots/   # + ROC PNGs, curves in JSON
    pfc-eval --workdir W --bin lfw.bin --lowres 16 --lowres 24 [--lowres-side one]
    pfc-eval --workdir W --bin lfw.bin --lowres 16 --quality --edc plots/  # error vs discard
    pfc-eval --model M --ijb /data/IJB_release/IJBC --target IJBC --roc plots/  # IJB 1:1 + 1:N

Embeds each image and its horizontal flip, sums, normalises, and reports
10-fold accuracy (mean ± std) and TAR at FAR 1e-3 per set. ``--lowres N``
adds each set with its images degraded to N px and back (both images of a
pair, or with ``--lowres-side one`` the second). ``--quality`` scores every
image (the model's quality head when it has one, ``pfc_jax.recognizability``,
beside the embedding norm and a random score) and reports each score's
error-versus-discard curve (``pfc_jax.evaluate.quality``): FNMR at ``--fmr``
as the lowest-quality genuine pairs are set aside, and its area. ``--ijb DIR
--target IJBC|IJBB`` runs the IJB protocols from the release layout
(``pfc_jax.evaluate.ijb_release``): TAR at FAR 1e-6...1e-1 over the template
pairs, and 1:N TPIR at FPIR 1e-2/1e-1 and rank-1/5/10 per gallery; the image
embeddings are cached (``--ijb-cache``, default ``~/.cache/pfc_jax/ijb``).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from pfc_jax import platform


def make_embed_fn(model, variables, batch_size: int):
    """Host uint8 images -> embeddings, on the most devices that split the batch."""
    from pfc_jax import embed
    return embed.Embedder(model, embed.batch_mesh(batch_size)).host_fn(variables)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from pfc_jax.export import add_model_args
    add_model_args(ap)
    ap.add_argument("--bin", action="append", default=[], help="a verification .bin file")
    ap.add_argument("--ijb", metavar="DIR", help="an IJB release folder (loose_crop/, meta/)")
    ap.add_argument("--target", default="IJBC", help="IJBC or IJBB (with --ijb)")
    ap.add_argument("--ijb-cache", metavar="DIR", default=None,
                    help="where image embeddings are cached (default ~/.cache/pfc_jax/ijb; "
                         "'none': no cache)")
    ap.add_argument("--ijb-workers", type=int, default=8, help="image decoding threads")
    ap.add_argument("--ijb-rule", choices=("at_most", "nearest"), default="at_most",
                    help="how TAR at FAR reads the ROC (pfc_jax.evaluate.ijb.tar_at_far)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--json", help="also write the results here (with each set's ROC "
                                   "curve, for pfc-plot --roc)")
    ap.add_argument("--roc", metavar="DIR", help="also draw DIR/roc_<set>.png per set")
    ap.add_argument("--lowres", type=int, action="append", default=[], metavar="N",
                    help="also each set degraded to N px and back (repeatable)")
    ap.add_argument("--lowres-side", choices=("both", "one"), default="both")
    ap.add_argument("--quality", action="store_true",
                    help="error-versus-discard curves of the quality scores")
    ap.add_argument("--fmr", type=float, default=1e-2, help="the EDC's false match rate")
    ap.add_argument("--edc", metavar="DIR", help="with --quality: DIR/edc_<set>.png per set")
    args = ap.parse_args(argv)
    if any(n < 1 or n > 112 for n in args.lowres):
        ap.error(f"--lowres sides must be in [1, 112], got {args.lowres}")
    if not args.bin and not args.ijb:
        ap.error("give at least one --bin FILE or --ijb DIR")
    release = None
    if args.ijb:
        from pfc_jax.evaluate import ijb_release
        try:  # a wrong folder fails before the model is loaded
            release = ijb_release.find_release(args.ijb, args.target)
        except (ValueError, FileNotFoundError) as e:
            ap.error(str(e))

    from pfc_jax import export
    from pfc_jax.evaluate import verification

    model, variables, what = export.load_from_args(args)
    sets = {}
    for path in args.bin:
        vs = verification.load_bin(path)
        sets[vs.name] = vs
        for side in args.lowres:
            low = verification.lowres(vs, side, args.lowres_side)
            sets[low.name] = low
    embed_fn = make_embed_fn(model, variables, args.batch_size)
    # verification.verify, keeping the embeddings when the quality curves need them
    results, embeddings = {}, {}
    for name, vs in sets.items():
        emb = verification.embed(embed_fn, vs.images, args.batch_size, flip=not args.no_flip,
                                 progress=None, what=f"embedding {name}")
        results[name] = verification.evaluate(emb, vs.issame)
        if args.quality:
            embeddings[name] = emb
    print(what)
    if results:
        print(verification.format_results(results))
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
    if args.quality:
        from pfc_jax.evaluate import quality as quality_lib
        head = export.load_quality(args.workdir or args.model)
        if head is None:
            print("no quality head in this model (train with recognizability.enabled): "
                  "the baselines only")
        for name, vs in sets.items():
            emb = embeddings[name]
            raw = verification.embed(embed_fn, vs.images, args.batch_size, flip=False,
                                     normalize=False)
            scores = quality_lib.baselines(raw)
            if head is not None:
                from pfc_jax import recognizability
                scores = {"learned": recognizability.quality_scores(head["params"], raw),
                          **scores}
            similarity = np.sum(emb[0::2] * emb[1::2], axis=1)
            curves = quality_lib.compare(similarity, vs.issame, scores, args.fmr)
            out[name]["error_vs_discard"] = curves
            print(f"{name}: error versus discard (FNMR at FMR {args.fmr:g})\n"
                  + quality_lib.format_curves(curves))
            if args.edc:
                from pfc_jax import plots
                print(plots.save(quality_lib.edc_figure(curves, f"error vs discard: {name}"),
                                 f"{args.edc}/edc_{name}.png"))
    if release is not None:
        from pfc_jax.evaluate import ijb_release
        cache = args.ijb_cache or ijb_release.default_cache_dir()
        r = ijb_release.run(embed_fn, release, batch_size=args.batch_size,
                            flip=not args.no_flip,
                            model_key=ijb_release.model_fingerprint(variables, model),
                            cache_dir=None if cache.lower() == "none" else cache,
                            rule=args.ijb_rule, workers=args.ijb_workers)
        print(f"{release.target}: {r.embedded} images embedded"
              + (f", embeddings in {r.cache}" if r.cache else ""))
        print(ijb_release.format_run(r, release.target))
        out[release.target] = ijb_release.to_json(r)
        if args.roc:
            from pfc_jax import plots
            print(plots.save(plots.roc_figure({what: r.roc}, f"ROC: {release.target} 1:1"),
                             f"{args.roc}/roc_{release.target}.png"))
            curves = {g: x.curve for g, x in r.identification.items() if x.curve is not None}
            if curves:
                print(plots.save(plots.roc_figure(
                    curves, f"{release.target} 1:N: {what}", xlabel="false positive "
                    "identification rate", ylabel="true positive identification rate"),
                    f"{args.roc}/tpir_{release.target}.png"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


run = platform.entry_point(main, __name__)  # pfc-eval; also python -m
