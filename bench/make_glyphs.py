#!/usr/bin/env python
"""A real-image identity dataset from Debian's CJK fonts: one identity per character.

    apt-get install -y fonts-noto-cjk fonts-wqy-zenhei fonts-wqy-microhei \\
        fonts-arphic-ukai fonts-arphic-uming fonts-ipafont-gothic fonts-ipafont-mincho \\
        fonts-unfonts-core fonts-hanazono fonts-cwtex-kai fonts-lxgw-wenkai \\
        fonts-droid-fallback fonts-arphic-bkai00mp fonts-arphic-gbsn00lp \\
        fonts-cns11643-kai fonts-cns11643-sung
    .venv/bin/python bench/make_glyphs.py --out /tmp/pfc_glyphs

No package ships many images of many real faces, so this stands in for one:
each identity is a CJK ideograph, each of its images the glyph drawn by one of
the installed typefaces (every face of every ``.ttf``/``.ttc``/``.otf``
under ``/usr/share/fonts`` that covers the character; 30-odd styles from the
packages above, from Song/Mincho and Kai brush styles to Hei/Gothic and
handwriting-like ones) with a random scale, shift, rotation, stroke blur,
colours, sensor noise and JPEG quality. Like faces, images of one identity
differ in style and capture; some identities look alike (characters that
share components). Deterministic in ``--seed`` for a given set of installed
fonts (``fonts.json`` records which were used).

Writes ``--out/train`` (a RecordIO folder, ``--identities`` classes of
``--images`` each) and ``--out/heldout.bin`` (verification pairs of
``--heldout`` other characters: half the pairs one character in two
styles, half two characters), in the formats every pfc_jax tool reads.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 112
FONT_SIZES = (64, 72, 80, 88)
CJK = (0x4E00, 0x9FFF)


def font_faces(roots=("/usr/share/fonts",)):
    """[(path, face index, name, cmap set)] of every face that covers CJK ideographs."""
    from fontTools.ttLib import TTCollection, TTFont
    faces = []
    files = sorted(f for r in roots for ext in ("ttf", "ttc", "otf", "otc")
                   for f in glob.glob(os.path.join(r, "**", f"*.{ext}"), recursive=True))
    for path in files:
        try:
            fonts = TTCollection(path).fonts if path.endswith(("ttc", "otc")) else [TTFont(path)]
        except Exception:  # noqa: BLE001 - an unreadable font is skipped
            continue
        for i, f in enumerate(fonts):
            cmap = f.getBestCmap() or {}
            han = {c for c in cmap if CJK[0] <= c <= CJK[1]}
            if len(han) < 2000:
                continue
            name = f["name"].getDebugName(4) or os.path.basename(path)
            faces.append((path, i, name, han))
    # One face per design: a .ttc repeats a design under region names, and
    # monospaced or proportional twins draw ideographs the same.
    drop = {"Mono", "JP", "KR", "SC", "TC", "HK", "CN", "TW", "MBE"}
    seen, out = set(), []
    for face in faces:
        design = " ".join(t for t in face[2].replace("IPAP", "IPA").split() if t not in drop)
        if design not in seen:
            seen.add(design)
            out.append(face)
    return out


class Renderer:
    def __init__(self, faces):
        from PIL import ImageFont
        self.faces = faces
        self._fonts = {}
        self._font_cls = ImageFont

    def font(self, style: int, size: int):
        key = (style, size)
        if key not in self._fonts:
            path, index = self.faces[style][:2]
            self._fonts[key] = self._font_cls.truetype(path, size, index=index)
        return self._fonts[key]

    def draw(self, ch: int, style: int, rng: np.random.Generator) -> bytes:
        from PIL import Image, ImageDraw, ImageFilter
        bg = rng.integers(150, 256, 3) if rng.random() < 0.8 else rng.integers(0, 90, 3)
        fg = rng.integers(0, 80, 3) if bg.mean() > 120 else rng.integers(170, 256, 3)
        im = Image.new("RGB", (2 * SIZE, 2 * SIZE), tuple(int(v) for v in bg))
        d = ImageDraw.Draw(im)
        font = self.font(style, int(rng.choice(FONT_SIZES)) * 2)
        cx, cy = SIZE + rng.normal(0, 10), SIZE + rng.normal(0, 10)
        d.text((cx, cy), chr(ch), font=font, fill=tuple(int(v) for v in fg), anchor="mm")
        im = im.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR,
                       fillcolor=tuple(int(v) for v in bg))
        im = im.resize((SIZE, SIZE), Image.BILINEAR)
        r = rng.uniform(0, 1.3)
        if r > 0.2:
            im = im.filter(ImageFilter.GaussianBlur(r))
        arr = np.asarray(im, np.float32) + rng.normal(0, rng.uniform(0, 8), (SIZE, SIZE, 3))
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(60, 96)))
        return buf.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--identities", type=int, default=1000)
    ap.add_argument("--images", type=int, default=16, help="images per training identity")
    ap.add_argument("--heldout", type=int, default=300, help="held-out identities")
    ap.add_argument("--pairs", type=int, default=1200, help="held-out verification pairs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    from pfc_jax.data.recordio_writer import RecordIOWriter
    from pfc_jax.data.sources import decode_image
    from pfc_jax.evaluate.verification import write_bin

    t0 = time.time()
    faces = font_faces()
    if len(faces) < 4:
        sys.exit(f"only {len(faces)} CJK typefaces found under /usr/share/fonts: install the "
                 "font packages in this script's docstring")
    coverage = np.zeros(CJK[1] - CJK[0] + 1, int)
    for f in faces:
        coverage[np.array(sorted(f[3])) - CJK[0]] += 1
    # characters that at least 3/4 of the styles draw
    chars = CJK[0] + np.flatnonzero(coverage >= max(4, int(0.75 * len(faces))))
    need = args.identities + args.heldout
    if len(chars) < need:
        sys.exit(f"{len(chars)} characters are drawn by enough styles; {need} requested")
    rng = np.random.default_rng(args.seed)
    chars = rng.permutation(chars)[:need]
    styles_of = {int(c): [i for i, f in enumerate(faces) if int(c) in f[3]] for c in chars}
    ren = Renderer(faces)
    os.makedirs(args.out, exist_ok=True)
    with RecordIOWriter(os.path.join(args.out, "train")) as w:
        for label, ch in enumerate(chars[: args.identities]):
            st = styles_of[int(ch)]
            r = np.random.default_rng([args.seed, int(ch)])
            pick = r.permutation(st)
            for j in range(args.images):
                w.add_image(ren.draw(int(ch), int(pick[j % len(pick)]), r), label)
        w.close(num_classes=args.identities, image_size=(SIZE, SIZE))
    held = chars[args.identities:]
    r = np.random.default_rng([args.seed, 0x4E1D])
    issame = r.permutation(np.arange(args.pairs) < args.pairs // 2)
    images = np.empty((2 * args.pairs, SIZE, SIZE, 3), np.uint8)
    for i, same in enumerate(issame):
        if same:
            ch = int(r.choice(held))
            s1, s2 = r.choice(styles_of[ch], 2, replace=False)
            pair = ((ch, s1), (ch, s2))
        else:
            a, b = (int(c) for c in r.choice(held, 2, replace=False))
            pair = ((a, int(r.choice(styles_of[a]))), (b, int(r.choice(styles_of[b]))))
        for j, (ch, s) in enumerate(pair):
            images[2 * i + j] = decode_image(ren.draw(ch, int(s), r))
    write_bin(os.path.join(args.out, "heldout.bin"), images, issame)
    with open(os.path.join(args.out, "fonts.json"), "w") as f:
        json.dump(dict(styles=[dict(path=p, index=i, name=n, characters=len(h))
                               for p, i, n, h in faces],
                       identities=args.identities, images=args.images,
                       heldout=args.heldout, pairs=args.pairs, seed=args.seed), f, indent=2)
    print(f"{len(faces)} styles; {args.identities} identities x {args.images} images in "
          f"{args.out}/train, {args.pairs} held-out pairs of {args.heldout} other characters "
          f"in {args.out}/heldout.bin ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
