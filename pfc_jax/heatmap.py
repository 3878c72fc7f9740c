"""Perceptibility-attention heat maps over face images: ``pfc-attention``.

    pfc-attention --workdir /ckpt/vlr --images faces/ --out /tmp/heat [--lowres 16]
    pfc-attention --model /models/vlr --images list.txt --out /tmp/heat

For a backbone trained with ``model.attention`` (``pfc_jax.models.attention``)
writes, per image, ``NAME.png``: the (optionally ``--lowres``-degraded)
input beside the same image with the attention map (bilinear up to 112x112,
scaled to its maximum) laid over it in a colour map; and ``maps.npy``
(float32 ``[N, h, w]`` at the model's own resolution: each map sums to 1 with the
softmax gate, each entry in (0, 1) with the sigmoid one)
with ``maps.txt`` (the image paths in that order). ``--images`` is read as
``pfc-embed`` reads it (a folder of aligned crops, or a list file with
optional five landmarks).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from pfc_jax import platform


def overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3]: ``image`` with ``amap`` [h, w] (any scale) as a jet overlay."""
    from PIL import Image

    from pfc_jax import plots
    h, w = image.shape[:2]
    m = np.asarray(amap, np.float32)
    m = m / max(float(m.max()), 1e-12)
    up = np.asarray(Image.fromarray(m).resize((w, h), Image.Resampling.BILINEAR))
    cmap = plots.pyplot().get_cmap("jet")
    colour = (cmap(np.clip(up, 0.0, 1.0))[..., :3] * 255.0).astype(np.float32)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from pfc_jax.export import add_model_args
    add_model_args(ap)
    ap.add_argument("--images", required=True, help="a folder of aligned crops or a list file")
    ap.add_argument("--out", required=True, help="a folder for the PNGs and maps.npy")
    ap.add_argument("--lowres", type=int, default=None, metavar="N",
                    help="degrade each image to N px and back first (bicubic)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)

    import jax

    from pfc_jax import export
    from pfc_jax.data.augment import normalize
    from pfc_jax.data.degrade import degrade
    from pfc_jax.embed_cli import load_image, read_list
    from pfc_jax.models.attention import attention_maps

    items = read_list(args.images)
    model, variables, _ = export.load_from_args(args)
    if not getattr(model, "attention", False):
        raise SystemExit(f"pfc-attention: {args.workdir or args.model} has no perceptibility "
                         "attention (train with --config.model.attention=True)")
    fn = jax.jit(lambda v, x: attention_maps(model, v, normalize(x)))
    os.makedirs(args.out, exist_ok=True)
    maps, names = [], []
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        images = np.stack([load_image(*it) for it in chunk])
        if args.lowres:
            images = np.stack([degrade(im, args.lowres) for im in images])
        pad = args.batch_size - len(images)
        batch = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
        a = np.asarray(fn(variables, batch))[:len(images)]
        from PIL import Image
        for (path, _, _), image, amap in zip(chunk, images, a):
            stem = os.path.splitext(os.path.basename(path))[0]
            name, k = stem, 1
            while name in names:  # two inputs with one file name
                k += 1
                name = f"{stem}_{k}"
            names.append(name)
            Image.fromarray(np.concatenate([image, overlay(image, amap)], axis=1)).save(
                os.path.join(args.out, f"{name}.png"))
        maps.append(a.astype(np.float32))
    np.save(os.path.join(args.out, "maps.npy"), np.concatenate(maps))
    with open(os.path.join(args.out, "maps.txt"), "w") as f:
        f.write("".join(p + "\n" for p, _, _ in items))
    print(f"{len(items)} heat maps -> {args.out}")
    return args.out


run = platform.entry_point(main, __name__)
