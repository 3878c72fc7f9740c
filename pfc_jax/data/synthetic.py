"""Procedurally drawn face-like identities for the demo, the tests and benchmarks.

``SyntheticFaces`` is a data source with the common source interface
(``len``, ``src[i]``, ``__getitems__``, ``num_classes``, ``labels()``). Record
``i`` is image ``i % images_per_identity`` of identity
``i // images_per_identity``.

An *identity* is a deterministic function of ``(seed, identity_offset +
label)``: head shape, skin / hair / eye / lip colours, hair line and volume,
eye spacing, size and height, brow shape, nose, mouth, ears, and optional
glasses, beard and a mole. An *image* of that identity is a deterministic
function of ``(seed, global identity, image index)`` and varies everything a
face image varies in that identity does not fix: a pose-like similarity
transform with shear, a yaw-like shift of the features against the head,
expression (eye opening, brow raise, mouth opening), background colour and
gradient, lighting (gain, contrast, a directional gradient, a colour cast),
an optional occluding patch, blur and sensor noise.

The nuisances are strong on purpose: in pixel space, images of one identity
are only somewhat closer to each other than to other identities (a
nearest-centroid classifier on raw pixels is well above chance but far from
perfect; ``tests/test_data_pipeline.py`` pins this), so a network has to learn
the invariances to do well.

Rendering is vectorised numpy: each part is a soft-edged ellipse (or ring)
evaluated in face coordinates on the pixels of its bounding box only, painted
over the canvas in order. One 112x112 image takes about 1.2 ms on one core.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

# Skin tones from light to dark (RGB), hair colours, iris colours.
_SKIN = np.array([[245, 214, 190], [228, 185, 150], [198, 145, 105],
                  [150, 100, 70], [95, 62, 45]], np.float32)
_HAIR = np.array([[25, 20, 18], [70, 45, 30], [120, 80, 45], [190, 150, 90],
                  [150, 60, 30], [150, 150, 150], [230, 225, 210]], np.float32)
_IRIS = np.array([[60, 40, 25], [30, 20, 15], [70, 110, 160], [80, 120, 80],
                  [110, 90, 60]], np.float32)
_RECORD_STREAM = 1  # SeedSequence tags keep identity and image draws apart
_IDENTITY_STREAM = 0


def _ellipse(u: np.ndarray, v: np.ndarray, cx: float, cy: float, a: float, b: float,
             px: float, angle: float = 0.0) -> np.ndarray:
    """Soft mask in [0, 1] of the ellipse centred at (cx, cy) with semi-axes (a, b).

    ``px`` is the size of one pixel in face units: the edge is about one pixel
    wide, which anti-aliases it.
    """
    du, dv = u - cx, v - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        du, dv = c * du + s * dv, c * dv - s * du
    k = min(a, b) / px
    m = np.sqrt((du * (1.0 / a)) ** 2 + (dv * (1.0 / b)) ** 2)
    m *= -k
    m += k + 0.5
    return np.minimum(np.maximum(m, 0.0, out=m), 1.0, out=m)


def _ring(u: np.ndarray, v: np.ndarray, cx: float, cy: float, a: float, b: float,
          width: float, px: float) -> np.ndarray:
    """Soft mask of an elliptical ring of the given line width (face units)."""
    r = np.sqrt(((u - cx) * (1.0 / a)) ** 2 + ((v - cy) * (1.0 / b)) ** 2)
    m = np.abs(r - 1.0) * (-min(a, b) / px) + (0.5 * width / px + 0.5)
    return np.minimum(np.maximum(m, 0.0, out=m), 1.0, out=m)


def _box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur (width ``2 * radius + 1``) of an [H, W, C] image, edges clamped."""
    if radius <= 0:
        return img
    k = 2 * radius + 1
    for axis in (0, 1):
        n = img.shape[axis]
        pad = [(0, 0)] * img.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(img, pad, mode="edge")
        out = padded.take(range(0, n), axis=axis)
        for shift in range(1, k):
            out += padded.take(range(shift, shift + n), axis=axis)
        img = out * (1.0 / k)
    return img


@dataclasses.dataclass(frozen=True)
class SyntheticFaces:
    """A data source of procedurally drawn identities (see the module docstring).

    Attributes:
      num_identities: number of identities (classes); labels are 0..n-1.
      images_per_identity: images drawn per identity.
      image_size: side of the square RGB images.
      seed: selects the whole population of identities and their images.
      identity_offset: shifts which identities are drawn, so that a held-out
        set (offset >= the training set's ``num_identities``) shares none with
        training while its labels still run 0..n-1.
    """

    num_identities: int
    images_per_identity: int
    image_size: int = 112
    seed: int = 0
    identity_offset: int = 0

    def __post_init__(self):
        for name in ("num_identities", "images_per_identity"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"SyntheticFaces: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.image_size, (int, np.integer)) or self.image_size < 16:
            raise ValueError(
                f"SyntheticFaces: image_size must be an integer >= 16, got {self.image_size!r}")
        for name in ("seed", "identity_offset"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"SyntheticFaces: {name} must be an integer >= 0, got {value!r}")

    # ----------------------------------------------------------------- source API
    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    @property
    def num_classes(self) -> int:
        return self.num_identities

    def labels(self) -> np.ndarray:
        """Labels of all records, int64 [len(self)], without drawing any image."""
        return np.repeat(np.arange(self.num_identities, dtype=np.int64), self.images_per_identity)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"SyntheticFaces: index must be an integer, got {type(index).__name__}")
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"SyntheticFaces: index {index} out of range for {n} records")
        label, image_index = divmod(int(index), self.images_per_identity)
        return {"image": self.render(label, image_index), "label": np.int32(label)}

    def __getitems__(self, indices) -> list[dict[str, Any]]:
        return [self[i] for i in indices]

    # ------------------------------------------------------------------ drawing
    def render(self, label: int, image_index: int) -> np.ndarray:
        """Image ``image_index`` (any integer >= 0) of identity ``label``: uint8 [S, S, 3]."""
        if not 0 <= label < self.num_identities:
            raise IndexError(f"SyntheticFaces: label {label} out of range "
                             f"[0, {self.num_identities})")
        if image_index < 0:
            raise ValueError(f"SyntheticFaces: image_index must be >= 0, got {image_index}")
        gid = self.identity_offset + int(label)
        ident = _identity_params(np.random.default_rng([self.seed, gid, _IDENTITY_STREAM]))
        rng = np.random.default_rng([self.seed, gid, int(image_index), _RECORD_STREAM])
        return _render(ident, rng, self.image_size)

    def verification_pairs(self, num_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Draws ``num_pairs`` image pairs: half of one identity, half of two.

        Returns ``images`` uint8 [2N, S, S, 3] (pair ``i`` is rows ``2i`` and
        ``2i + 1``) and ``issame`` bool [N] (shuffled, exactly ``N // 2`` true).
        A same pair uses two different images of one identity; a different pair
        two different identities. Deterministic in ``seed``.
        """
        if not isinstance(num_pairs, (int, np.integer)) or num_pairs < 1:
            raise ValueError(f"verification_pairs: num_pairs must be an integer >= 1, "
                             f"got {num_pairs!r}")
        if self.num_identities < 2:
            raise ValueError("verification_pairs: different-identity pairs need "
                             f"num_identities >= 2, got {self.num_identities}")
        if self.images_per_identity < 2:
            raise ValueError("verification_pairs: same-identity pairs need "
                             f"images_per_identity >= 2, got {self.images_per_identity}")
        rng = np.random.default_rng([seed, 0x5A1D])
        issame = np.zeros(num_pairs, bool)
        issame[: num_pairs // 2] = True
        issame = rng.permutation(issame)
        k, n = self.images_per_identity, self.num_identities
        images = np.empty((2 * num_pairs, self.image_size, self.image_size, 3), np.uint8)
        for i, same in enumerate(issame):
            if same:
                a = b = int(rng.integers(n))
                ia, ib = (int(j) for j in rng.choice(k, 2, replace=False))
            else:
                a, b = (int(j) for j in rng.choice(n, 2, replace=False))
                ia, ib = int(rng.integers(k)), int(rng.integers(k))
            images[2 * i] = self.render(a, ia)
            images[2 * i + 1] = self.render(b, ib)
        return images, issame


def _identity_params(rng: np.random.Generator) -> dict[str, Any]:
    """Everything an identity fixes: geometry and colours in face units (head ~ [-1, 1])."""
    u = rng.uniform
    t = u(0, len(_SKIN) - 1)
    lo = int(t)
    skin = _SKIN[lo] + (t - lo) * (_SKIN[min(lo + 1, len(_SKIN) - 1)] - _SKIN[lo])
    skin = skin * u(0.92, 1.08, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] * u(0.8, 1.2, 3)
    return {
        "skin": skin.astype(np.float32),
        "hair": np.clip(hair, 0, 255).astype(np.float32),
        "iris": (_IRIS[rng.integers(len(_IRIS))] * u(0.8, 1.2, 3)).astype(np.float32),
        "lip": np.clip(skin * np.array([0.95, 0.6, 0.6]) * u(0.85, 1.1), 0, 255),
        "head_a": u(0.48, 0.66), "head_b": u(0.64, 0.84), "head_cy": u(0.0, 0.1),
        "hair_top": u(0.05, 0.2), "hair_line": u(-0.5, -0.25), "hair_side": u(0.0, 0.5),
        "eye_y": u(-0.2, -0.02), "eye_dx": u(0.17, 0.3), "eye_a": u(0.07, 0.11),
        "eye_ratio": u(0.45, 0.7), "brow_gap": u(0.08, 0.15), "brow_w": u(0.02, 0.05),
        "brow_len": u(0.08, 0.15), "brow_tilt": u(-0.35, 0.35),
        "nose_len": u(0.1, 0.24), "nose_w": u(0.04, 0.09), "mouth_y": u(0.3, 0.45),
        "mouth_a": u(0.1, 0.22), "lip_b": u(0.02, 0.05), "ear_b": u(0.1, 0.18),
        "glasses": bool(u() < 0.25), "glasses_w": u(0.015, 0.035),
        "frame": np.float32(u(0, 90)) * np.ones(3, np.float32) + u(0, 60, 3).astype(np.float32),
        "beard": bool(u() < 0.2), "beard_top": u(0.15, 0.35),
        "mole": bool(u() < 0.35), "mole_uv": (u(-0.35, 0.35), u(-0.1, 0.45)),
    }


def _render(p: dict[str, Any], rng: np.random.Generator, size: int) -> np.ndarray:
    """Draws one image of the identity ``p`` with nuisances from ``rng``."""
    u = rng.uniform
    # --- pose: image point x = A @ face point + t, face units span [-1, 1] ~ image
    scale = u(0.8, 1.0)
    rot = float(np.clip(rng.normal(0, 0.14), -0.35, 0.35))
    shear = u(-0.1, 0.1)
    c, s = math.cos(rot), math.sin(rot)
    a_mat = scale * np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    shift = u(-0.1, 0.1, 2)
    inv = np.linalg.inv(a_mat)
    (a00, a01), (a10, a11) = a_mat.tolist()
    (i00, i01), (i10, i11) = inv.tolist()
    sx, sy = float(shift[0]), float(shift[1])
    yaw = u(-0.35, 0.35)  # features slide sideways against the head, which narrows
    eye_open = 1.0 if u() > 0.15 else u(0.15, 0.5)
    brow_raise = u(-0.03, 0.04)
    mouth_open = u(0.0, 1.0) ** 2

    # --- pixel grid in image units, mapped to face units
    px_img = 2.0 / size
    coords = (np.arange(size, dtype=np.float32) + 0.5) * px_img - 1.0
    px = px_img / scale

    def face_uv(rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        y = coords[rows, None] - np.float32(sy)
        x = coords[None, cols] - np.float32(sx)
        return i00 * x + i01 * y, i10 * x + i11 * y

    def bbox(cx: float, cy: float, rx: float, ry: float) -> tuple[slice, slice]:
        # image-space half extents of the face-space box (|A| @ (rx, ry))
        hx, hy = abs(a00) * rx + abs(a01) * ry, abs(a10) * rx + abs(a11) * ry
        x0, y0 = a00 * cx + a01 * cy + sx, a10 * cx + a11 * cy + sy
        c0 = min(max(int((x0 - hx + 1.0) / px_img) - 1, 0), size)
        c1 = min(max(int((x0 + hx + 1.0) / px_img) + 2, 0), size)
        r0 = min(max(int((y0 - hy + 1.0) / px_img) - 1, 0), size)
        r1 = min(max(int((y0 + hy + 1.0) / px_img) + 2, 0), size)
        return slice(r0, r1), slice(c0, c1)

    canvas = np.empty((size, size, 3), np.float32)

    def paint(mask_fn, cx, cy, rx, ry, color):
        rows, cols = bbox(cx, cy, rx, ry)
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return
        uu, vv = face_uv(rows, cols)
        m = mask_fn(uu, vv)[..., None]
        region = canvas[rows, cols]
        region += m * (np.asarray(color, np.float32) - region)

    # --- background: a colour with a linear gradient
    bg = u(20, 235, 3).astype(np.float32)
    bg_grad = u(-60, 60, 3).astype(np.float32)
    ramp = coords[:, None] * math.cos(u(0, 2 * math.pi)) + coords[None, :] * 0.5
    canvas[...] = bg + ramp[..., None] * bg_grad

    ha, hb, hcy = p["head_a"] * (1.0 - 0.25 * abs(yaw)), p["head_b"], p["head_cy"]
    fx = yaw * 0.3  # horizontal shift of the inner features
    skin, hair = p["skin"], p["hair"]
    # hair mass behind the head, ears, head
    hair_a, hair_b = ha + 0.06 + 0.1 * p["hair_side"], hb + p["hair_top"]
    paint(lambda uu, vv: _ellipse(uu, vv, 0, hcy - 0.5 * p["hair_top"], hair_a, hair_b, px),
          0, hcy - 0.5 * p["hair_top"], hair_a, hair_b, hair)
    for side in (-1, 1):
        ex = side * ha * 0.97 - fx * 0.5
        paint(lambda uu, vv, ex=ex: _ellipse(uu, vv, ex, p["eye_y"] + 0.1, 0.07, p["ear_b"], px),
              ex, p["eye_y"] + 0.1, 0.07, p["ear_b"], skin * 0.92)
    paint(lambda uu, vv: _ellipse(uu, vv, 0, hcy, ha, hb, px), 0, hcy, ha, hb, skin)
    # fringe: hair over the top of the head above the hair line
    fringe_b = (p["hair_line"] - (hcy - hb)) * 0.5 + 0.02
    fringe_cy = hcy - hb + fringe_b - 0.02
    paint(lambda uu, vv: _ellipse(uu, vv, fx * 0.3, fringe_cy, ha * 0.95, fringe_b, px)
          * (vv < p["hair_line"] + 0.02), fx * 0.3, fringe_cy, ha, fringe_b, hair)
    if p["beard"]:
        top = p["mouth_y"] - p["beard_top"]
        paint(lambda uu, vv: _ellipse(uu, vv, 0, hcy, ha, hb, px)
              * np.clip((vv - top) / 0.05, 0, 1), 0, hcy, ha, hb, hair * 0.9)
    # eyes, brows
    ey, ea = p["eye_y"], p["eye_a"]
    eb = ea * p["eye_ratio"] * eye_open
    for side in (-1, 1):
        ex = side * p["eye_dx"] + fx
        paint(lambda uu, vv, ex=ex: _ellipse(uu, vv, ex, ey, ea, eb, px), ex, ey, ea, eb,
              (235, 232, 225))
        ir = min(ea * 0.55, eb)
        paint(lambda uu, vv, ex=ex: _ellipse(uu, vv, ex, ey, ir, ir, px), ex, ey, ir, ir,
              p["iris"])
        by = ey - eb - p["brow_gap"] - brow_raise
        bl, bw, tilt = p["brow_len"], p["brow_w"], side * p["brow_tilt"]
        paint(lambda uu, vv, ex=ex, by=by: _ellipse(uu, vv, ex, by, bl, bw, px, tilt),
              ex, by, bl, bl, hair * 0.7)
        if p["glasses"]:
            ga, gb = ea * 1.7, ea * 1.3
            paint(lambda uu, vv, ex=ex: _ring(uu, vv, ex, ey, ga, gb, p["glasses_w"], px),
                  ex, ey, ga + 0.05, gb + 0.05, p["frame"])
    if p["glasses"]:
        gx = p["eye_dx"] - p["eye_a"] * 1.7
        paint(lambda uu, vv: _ellipse(uu, vv, fx, ey - 0.02, gx, p["glasses_w"] * 0.6, px),
              fx, ey - 0.02, gx, 0.05, p["frame"])
    # nose, mouth, mole
    nl, nw = p["nose_len"], p["nose_w"]
    ny = ey + 0.1 + nl * 0.5
    nx = fx * 1.3
    paint(lambda uu, vv: _ellipse(uu, vv, nx, ny, nw, nl * 0.5, px), nx, ny, nw, nl, skin * 0.82)
    my, ma = p["mouth_y"], p["mouth_a"] * (1.0 - 0.2 * abs(yaw))
    mb = p["lip_b"] + 0.05 * mouth_open
    paint(lambda uu, vv: _ellipse(uu, vv, fx, my, ma, mb, px), fx, my, ma, mb, p["lip"])
    if mouth_open > 0.15:
        ib = 0.05 * mouth_open
        paint(lambda uu, vv: _ellipse(uu, vv, fx, my, ma * 0.8, ib, px), fx, my, ma, ib,
              (60, 20, 25))
    if p["mole"]:
        mu, mv = p["mole_uv"]
        paint(lambda uu, vv: _ellipse(uu, vv, mu + fx, mv, 0.025, 0.025, px),
              mu + fx, mv, 0.03, 0.03, skin * 0.45)

    # --- occlusion: a rectangle of a random colour (a hand, a scarf, a sticker)
    if u() < 0.35:
        h, w = int(u(0.2, 0.5) * size), int(u(0.2, 0.6) * size)
        r0, c0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        canvas[r0:r0 + h, c0:c0 + w] = u(0, 255, 3).astype(np.float32)

    # --- lighting: contrast about the mean, gain with a directional gradient, colour cast
    direction = u(0, 2 * math.pi)
    light = (u(0.65, 1.25) + u(0.0, 0.45) * (math.cos(direction) * coords[None, :]
                                              + math.sin(direction) * coords[:, None]))
    contrast = u(0.6, 1.15)
    offset = float(canvas.mean()) * (1.0 - contrast)
    canvas *= np.float32(contrast)
    canvas += np.float32(offset)
    canvas *= light[..., None] * u(0.85, 1.15, 3).astype(np.float32)

    # --- optics and sensor: blur, then grey noise
    canvas = _box_blur(canvas, int(rng.integers(0, 3)))
    canvas += rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(u(2.0, 10.0))
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
