#!/usr/bin/env python
"""IJB at full IJB-C size on the host, and the image side's rates on this machine.

    .venv/bin/python bench/ijb.py                    # protocol at IJB-C size + image rates
    .venv/bin/python bench/ijb.py --images 512       # a smaller image sample

1. **Protocol at IJB-C size**, on random 512-d image features (the sizes of the
   IJB-C meta files: 469,375 images, 23,124 templates, 15,658,489 template
   pairs, 1:N galleries of 1,772 and 1,759 templates searched by 19,593
   probes): seconds for template pooling, the pair scores, TAR at the six
   FARs, and each gallery's 1:N search and measures. Peak RSS beside them.
2. **Image side**, on loose crops made here (synthetic faces placed by random
   similarities in 150x140 PNGs, as an IJB release stores them): images/s
   decoded and aligned with 1 and 2 threads, and images/s embedded
   (image + mirror image) by mbf and r50 on all devices of this process.

The figures go to ``docs/interop.md`` with the machine named.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

N_IMAGES, N_TEMPLATES, N_PAIRS = 469_375, 23_124, 15_658_489
G1, G2, PROBES = 1_772, 1_759, 19_593


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def protocol(rng, np):
    from pfc_jax.evaluate import identification, ijb
    feats = rng.standard_normal((N_IMAGES, 512), dtype=np.float32)
    tids = np.sort(rng.integers(0, N_TEMPLATES, N_IMAGES))
    tids[:N_TEMPLATES] = np.arange(N_TEMPLATES)  # every template has an image
    mids = tids * 4 + rng.integers(0, 3, N_IMAGES)
    scores = rng.uniform(0.5, 1.0, N_IMAGES).astype(np.float32)
    t = time.perf_counter()
    ut, tf = ijb.template_features(feats, scores, mids, tids)
    pool_s = time.perf_counter() - t
    p1 = rng.integers(0, N_TEMPLATES, N_PAIRS)
    p2 = rng.integers(0, N_TEMPLATES, N_PAIRS)
    labels = (rng.random(N_PAIRS) < 0.0126).astype(np.int8)  # IJB-C: 19,557 genuine
    t = time.perf_counter()
    s = ijb.verify_pairs(tf, ut, p1, p2)
    pair_s = time.perf_counter() - t
    t = time.perf_counter()
    ijb.tar_at_far(s, labels)
    tar_s = time.perf_counter() - t
    perm = rng.permutation(N_TEMPLATES)
    gal = [perm[:G1], perm[G1:G1 + G2]]
    probes = perm[G1 + G2:G1 + G2 + PROBES]
    subj = rng.integers(0, G1 + G2, N_TEMPLATES)
    subj[gal[0]], subj[gal[1]] = np.arange(G1), G1 + np.arange(G2)
    t = time.perf_counter()
    for g in gal:
        identification.identify(tf[probes], subj[probes], tf[g], subj[g])
    ident_s = (time.perf_counter() - t) / 2
    print("| stage | seconds |\n|---|---:|")
    for name, v in (("template pooling (469k images -> 23k templates)", pool_s),
                    ("15.66M pair scores", pair_s), ("TAR at 6 FARs", tar_s),
                    ("1:N per gallery (19.6k probes x 1.8k)", ident_s)):
        print(f"| {name} | {v:.2f} |")
    print(f"peak RSS {rss_gib():.2f} GiB\n")


def image_side(n, np):
    import jax
    import jax.numpy as jnp
    from PIL import Image

    from pfc_jax import align, models
    from pfc_jax.data.synthetic import SyntheticFaces
    from pfc_jax.evaluate import ijb, ijb_release, verification
    from pfc_jax.evaluate.__main__ import make_embed_fn
    rng = np.random.default_rng(0)
    faces = SyntheticFaces(max(n // 8, 1), 8, seed=0)
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "loose_crop"))
        os.makedirs(os.path.join(root, "meta"))
        names, lms = [], []
        for i in range(n):
            a, sc = np.deg2rad(rng.uniform(-20, 20)), rng.uniform(0.8, 1.2)
            m = np.array([[sc * np.cos(a), -sc * np.sin(a), rng.uniform(5, 25)],
                          [sc * np.sin(a), sc * np.cos(a), rng.uniform(5, 20)]])
            inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
            img = Image.fromarray(faces[i % len(faces)]["image"]).transform(
                (150, 140), Image.Transform.AFFINE, data=tuple(inv.ravel()))
            name = f"{i}.png"
            img.save(os.path.join(root, "loose_crop", name))
            names.append(name)
            lms.append(align.TEMPLATE @ m[:, :2].T + m[:, 2])
        meta = ijb.IJBMeta("IJBC", np.array(names), np.arange(n), np.arange(n),
                           np.array(lms, np.float32), np.ones(n, np.float32),
                           np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int8))
        rel = ijb_release.Release("IJBC", os.path.join(root, "loose_crop"),
                                  os.path.join(root, "meta"))
        print("| image side | images/s |\n|---|---:|")
        for workers in (1, 2):
            from concurrent.futures import ThreadPoolExecutor
            t = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda i: ijb_release.load_aligned(rel.image_dir, names[i],
                                                                 meta.landmarks[i], ""),
                              range(n)))
            print(f"| decode + align, {workers} thread(s) | {n / (time.perf_counter() - t):.0f} |")
        images = np.stack([ijb_release.load_aligned(rel.image_dir, names[i], meta.landmarks[i],
                                                    "") for i in range(min(n, 128))])
        for name in ("mbf", "r50"):
            model = models.get_model(name)
            v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 112, 112, 3))))(jax.random.key(0))
            fn = make_embed_fn(model, v, 64)
            verification.embed(fn, images[:64], 64)  # compile
            t = time.perf_counter()
            verification.embed(fn, images, 64)
            rate = images.shape[0] / (time.perf_counter() - t)
            print(f"| embed image + mirror, {name}, {len(jax.devices())} device(s) | {rate:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--skip-protocol", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    import numpy as np
    if not args.skip_protocol:
        protocol(np.random.default_rng(0), np)
    image_side(args.images, np)


if __name__ == "__main__":
    main()
