"""Very low-resolution degradations, and the unrecognisable images that define the UI centre.

``degrade(image, side, method)`` brings a face down to ``side x side``
pixels and back up to its size: what a face 8-32 pixels wide in a
surveillance frame looks like to a model that takes 112x112 crops.
``Degradation`` is the training-time version (numpy, in the input workers,
deterministic in the draw's generator): with probability ``prob`` a side
uniform in ``sides`` (inclusive), bicubic or bilinear, optionally a Gaussian
blur before the down-sampling and a JPEG round trip at the small size.

Unrecognisable images (Chai et al., CVPR 2023: the UI cluster) are
``unrecognisable(image, rng)``: the face degraded to ``ui_sides`` (2-4 px by
default) and back, so no identity survives; and ``noise_image(rng)``:
smooth coloured noise that is no face at all. The trainer embeds a few of
them per step to refresh the UI centre (``pfc_jax.recognizability``).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

METHODS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def degrade(image: np.ndarray, side: int, method: str = "bicubic",
            jpeg_quality: int | None = None) -> np.ndarray:
    """``image`` [H, W, 3] uint8 down to ``side`` pixels square and back to H x W."""
    if method not in METHODS:
        raise ValueError(f"degrade: method {method!r} is not one of {sorted(METHODS)}")
    if not isinstance(side, (int, np.integer)) or side < 1:
        raise ValueError(f"degrade: side must be an integer >= 1, got {side!r}")
    h, w = image.shape[:2]
    small = Image.fromarray(np.ascontiguousarray(image)).resize((int(side), int(side)),
                                                                METHODS[method])
    if jpeg_quality is not None:
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=int(jpeg_quality))
        small = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(small.resize((w, h), METHODS[method]), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Degradation:
    """A random very-low-resolution degradation (module docstring).

    Attributes:
      prob: probability that an image is degraded at all.
      sides: inclusive range of the small side in pixels.
      method: "bicubic" | "bilinear" (down and up).
      blur_prob: probability of a Gaussian blur (sigma in ``blur_sigma``) first.
      jpeg_prob: probability of a JPEG round trip at the small size, quality
        uniform in ``jpeg_quality``.
    """

    prob: float = 0.0
    sides: tuple[int, int] = (8, 32)
    method: str = "bicubic"
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (30, 90)

    def __post_init__(self):
        for name in ("prob", "blur_prob", "jpeg_prob"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"Degradation.{name} must be a probability, got {v!r}")
        lo, hi = self.sides
        if not (1 <= int(lo) <= int(hi) <= 112):
            raise ValueError(f"Degradation.sides must satisfy 1 <= low <= high <= 112, "
                             f"got {self.sides!r}")
        if self.method not in METHODS:
            raise ValueError(f"Degradation.method {self.method!r} is not one of "
                             f"{sorted(METHODS)}")
        q0, q1 = self.jpeg_quality
        if not 1 <= int(q0) <= int(q1) <= 100:
            raise ValueError(f"Degradation.jpeg_quality must be within [1, 100], "
                             f"got {self.jpeg_quality!r}")

    @property
    def is_identity(self) -> bool:
        return self.prob == 0.0

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # every draw up front, in a fixed order, whatever is enabled
        coins = rng.random(3)
        side = int(rng.integers(self.sides[0], self.sides[1] + 1))
        sigma = float(rng.uniform(*self.blur_sigma))
        quality = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
        if coins[0] >= self.prob:
            return image
        if coins[1] < self.blur_prob:
            from pfc_jax.data.augment import _gaussian_blur
            image = np.clip(np.rint(_gaussian_blur(image.astype(np.float32), sigma)),
                            0, 255).astype(np.uint8)
        return degrade(image, side, self.method,
                       quality if coins[2] < self.jpeg_prob else None)


def unrecognisable(image: np.ndarray, rng: np.random.Generator,
                   ui_sides: tuple[int, int] = (2, 4)) -> np.ndarray:
    """The face degraded to a few pixels (uniform side in ``ui_sides``) and back."""
    return degrade(image, int(rng.integers(ui_sides[0], ui_sides[1] + 1)), "bicubic")


def noise_image(rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """Smooth coloured noise: a random 4-16 px colour field, bicubically enlarged."""
    side = int(rng.integers(4, 17))
    field = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC),
                      dtype=np.uint8)
