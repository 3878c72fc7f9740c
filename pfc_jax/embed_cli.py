"""Face images to embeddings: ``pfc-embed``.

    pfc-embed --model /models/r50 --images faces/ --out feats        # aligned 112x112 crops
    pfc-embed --workdir /ckpt/r50 --images list.txt --out feats      # paths [+ 5 landmarks]

``--images`` is a folder (every .jpg/.jpeg/.png/.bmp under it, sorted, taken
as aligned 112x112 crops) or a list file: one image per line, its path
(relative to the list's folder unless absolute) optionally followed by ten
numbers, the five landmarks ``x1 y1 ... x5 y5`` in pixels of that image
(left eye, right eye, nose, left and right mouth corner), in which case it
is aligned to the ArcFace template first (``pfc_jax.align``).

Writes ``OUT.npy`` (float32 ``[N, D]``, L2-normalised; each image's
embedding plus its mirror image's, as verification does, unless
``--no-flip``) and ``OUT.txt`` (the N paths, in the same order). Images are
read and embedded in chunks, batched over the devices; a progress line shows
on a terminal. An image that cannot be read stops the run naming its file
(and line); nothing is written then.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from pfc_jax import platform

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
CHUNK = 4096  # images decoded at a time


def read_list(path: str) -> list[tuple[str, np.ndarray | None, str]]:
    """``(image path, landmarks [5, 2] or None, where)`` of a folder or a list file."""
    if os.path.isdir(path):
        found = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                       if f.lower().endswith(IMAGE_EXTS))
        if not found:
            raise FileNotFoundError(f"{path}: no {'/'.join(IMAGE_EXTS)} images under it")
        return [(f, None, f) for f in found]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--images {path}: neither a folder nor a list file")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            where = f"{path} line {n}"
            if len(parts) not in (1, 11):
                raise ValueError(f"{where}: expected a path, optionally with 10 landmark "
                                 f"numbers; got {len(parts)} fields")
            lm = None
            if len(parts) == 11:
                try:
                    lm = np.array([float(v) for v in parts[1:]]).reshape(5, 2)
                except ValueError:
                    raise ValueError(f"{where}: landmarks must be numbers, got "
                                     f"{' '.join(parts[1:])!r}") from None
            img = parts[0] if os.path.isabs(parts[0]) else os.path.join(root, parts[0])
            out.append((img, lm, where))
    if not out:
        raise ValueError(f"{path}: no images listed")
    return out


def load_image(path: str, landmarks, where: str) -> np.ndarray:
    """uint8 ``[112, 112, 3]`` RGB: decoded, aligned when landmarks are given."""
    from PIL import Image

    from pfc_jax import align
    try:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read image {path}: {e}") from None
    if landmarks is not None:
        return align.align(img, landmarks)
    if img.shape[:2] != (align.SIZE, align.SIZE):
        raise ValueError(f"{where}: {path} is {img.shape[1]}x{img.shape[0]}, not an aligned "
                         f"{align.SIZE}x{align.SIZE} crop (give 5 landmarks in a list file to "
                         "align it)")
    return img


def main(argv=None) -> tuple[str, str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from pfc_jax.export import add_model_args
    add_model_args(ap)
    ap.add_argument("--images", required=True, help="a folder of aligned crops or a list file")
    ap.add_argument("--out", required=True, help="writes OUT.npy and OUT.txt")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-flip", action="store_true")
    args = ap.parse_args(argv)

    from pfc_jax import export
    from pfc_jax.evaluate import verification
    from pfc_jax.evaluate.__main__ import make_embed_fn

    items = read_list(args.images)
    load_image(*items[0])  # a bad first image fails before the model is loaded
    model, variables, _ = export.load_from_args(args)
    fn = make_embed_fn(model, variables, args.batch_size)
    feats = []
    for start in range(0, len(items), CHUNK):
        chunk = items[start:start + CHUNK]
        images = np.stack([load_image(*it) for it in chunk])
        feats.append(verification.embed(fn, images, args.batch_size, flip=not args.no_flip,
                                        progress=None,
                                        what=f"embedding {start + len(chunk)}/{len(items)}"))
    emb = np.concatenate(feats).astype(np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    npy, txt = args.out + ".npy", args.out + ".txt"
    np.save(npy, emb)
    with open(txt, "w") as f:
        f.write("".join(p + "\n" for p, _, _ in items))
    print(f"{len(items)} images -> {npy} {emb.shape}, index {txt}")
    return npy, txt


run = platform.entry_point(main, __name__)
