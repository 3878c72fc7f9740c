"""Five-point face alignment to the 112x112 ArcFace template.

``similarity_fit(src, dst)`` is the least-squares similarity (rotation,
uniform scale, translation; no reflection) taking points ``src`` onto
``dst`` (Umeyama's closed form). ``align(image, landmarks)`` warps an image
so its five landmarks (left eye, right eye, nose tip, left and right mouth
corners, in pixels, x then y) land on ``TEMPLATE``, the standard ArcFace
positions in a 112x112 crop, with bilinear sampling (pixel centres at
integer coordinates).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 112
TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)


def similarity_fit(src, dst) -> np.ndarray:
    """The 2x3 matrix ``M`` minimising ``sum |M [p; 1] - q|^2`` over similarities."""
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"similarity_fit: need two matching sets of >= 2 points, got "
                         f"{src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("similarity_fit: the source points coincide")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # no reflection
        e[1, 1] = -1
    rot = u @ e @ vt
    scale = float(np.trace(np.diag(sig) @ e)) / var_s
    t = mu_d - scale * rot @ mu_s
    return np.concatenate([scale * rot, t[:, None]], axis=1)


def align(image: np.ndarray, landmarks, size: int = SIZE) -> np.ndarray:
    """``image`` (uint8 HxWx3) warped so ``landmarks [5, 2]`` fall on the template."""
    pts = np.asarray(landmarks, np.float64).reshape(-1, 2)
    if pts.shape != (5, 2):
        raise ValueError(f"align: need 5 (x, y) landmarks, got {pts.size} numbers")
    m = similarity_fit(pts, TEMPLATE * (size / SIZE))
    # PIL maps each output position to an input position (the inverse transform)
    # in coordinates where pixel i spans [i, i + 1); landmarks put pixel centres
    # at integers (as OpenCV does): shift by half a pixel on both sides.
    a = np.vstack([m, [0.0, 0.0, 1.0]])
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    inv = (half @ np.linalg.inv(a) @ np.linalg.inv(half))[:2]
    img = Image.fromarray(np.asarray(image, np.uint8))
    out = img.transform((size, size), Image.Transform.AFFINE, data=tuple(inv.ravel()),
                        resample=Image.Resampling.BILINEAR)
    return np.asarray(out.convert("RGB"))
