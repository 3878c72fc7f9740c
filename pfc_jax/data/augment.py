"""Per-image augmentations (numpy, run in the input workers) and input normalisation.

``augment(image, cfg, rng)`` applies, in this order, each with its own coin
flip: a random resized crop (the contrastive views' crop/scale), a
low-resolution round trip, a Gaussian blur, a colour jitter
(brightness, contrast, saturation), an HSV-style hue / saturation shift,
grayscale, and a horizontal flip. Every random number is drawn up front in a
fixed order, so the decision for one operation never depends on the settings
of another: turning ``blur_prob`` on does not change which images get flipped.
The crop's numbers are drawn after all the others, so a recipe without crops
augments exactly as it did before crops existed.

``AugmentConfig()`` is the plain recipe (random flip only).
``AugmentConfig.dali()`` is the heavier recipe of the PyTorch reference's
``dali_aug`` option: low-resolution round trip with p = 0.1 through 56-89 px
(0.5-0.8 of 112), Gaussian blur with p = 0.2 (the reference uses a 3-tap
window; here sigma 0.5-1.0), hue shift of 0-20 degrees with
saturation x1-1.2 with p = 0.2, grayscale with p = 0.1, flip with p = 0.5.

``normalize`` maps uint8 pixels to ``(x - 127.5) / 127.5`` in float32 (0 -> -1,
255 -> 1); it runs on numpy or JAX arrays alike, so the trainer keeps uint8 on
the host and normalises on device. ``resize`` brings images of another size to
the model's input size (Pillow, bilinear with antialiasing).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
from PIL import Image

# ITU-R BT.601 luma weights, also used for grayscale and saturation.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# RGB -> YIQ; a hue rotation is a rotation of the (I, Q) plane.
_YIQ = np.array([[0.299, 0.587, 0.114],
                 [0.596, -0.274, -0.322],
                 [0.211, -0.523, 0.312]], np.float64)
_YIQ_INV = np.linalg.inv(_YIQ)


def _check_prob(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"AugmentConfig.{name} must be a probability in [0, 1], got {value!r}")


def _check_range(name: str, value: Any, lo: float, hi: float = math.inf) -> None:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) for v in value)
          and lo <= value[0] <= value[1] <= hi)
    if not ok:
        raise ValueError(f"AugmentConfig.{name} must be a pair (low, high) with "
                         f"{lo} <= low <= high <= {hi}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run and how strongly (all off except ``flip`` by default).

    Attributes:
      flip: mirror left-right with probability 0.5.
      lowres_prob: probability of down-sampling to a random side in
        ``lowres_size`` (inclusive) and back up to the original size.
      lowres_size: range of the intermediate side in pixels.
      blur_prob: probability of a Gaussian blur with sigma uniform in ``blur_sigma``.
      blur_sigma: range of the blur's standard deviation in pixels.
      color_jitter: strength ``s`` of a jitter that multiplies brightness,
        contrast and saturation by factors drawn uniformly from [1 - s, 1 + s]
        (applied to every image when ``s > 0``).
      hsv_prob: probability of a hue rotation by a uniform angle in
        [0, ``hue_max``] degrees combined with a saturation factor uniform in
        ``hsv_saturation``.
      hue_max: largest hue rotation in degrees.
      hsv_saturation: range of the saturation factor of the HSV shift.
      grayscale_prob: probability of replacing the image by its luma in all
        three channels.
      crop_prob: probability of a random resized crop: a window of area
        fraction uniform in ``crop_scale`` and aspect ratio (width / height)
        log-uniform in ``crop_ratio``, at a uniform position, resized back to
        the full size (bilinear). A window wider or taller than the image is
        clipped to it.
      crop_scale: range of the window's area as a fraction of the image.
      crop_ratio: range of the window's aspect ratio.
    """

    flip: bool = True
    lowres_prob: float = 0.0
    lowres_size: tuple[int, int] = (16, 56)
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    color_jitter: float = 0.0
    hsv_prob: float = 0.0
    hue_max: float = 20.0
    hsv_saturation: tuple[float, float] = (1.0, 1.2)
    grayscale_prob: float = 0.0
    crop_prob: float = 0.0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    # Added after the stream fingerprint existed: left out of it at their defaults.
    LATER_FIELDS = ("crop_prob", "crop_scale", "crop_ratio")

    def __post_init__(self):
        if not isinstance(self.flip, (bool, np.bool_)):
            raise ValueError(f"AugmentConfig.flip must be a bool, got {self.flip!r}")
        for name in ("lowres_prob", "blur_prob", "hsv_prob", "grayscale_prob", "crop_prob"):
            _check_prob(name, getattr(self, name))
        _check_range("lowres_size", self.lowres_size, 1)
        if not all(isinstance(v, (int, np.integer)) for v in self.lowres_size):
            raise ValueError(f"AugmentConfig.lowres_size must hold integers, "
                             f"got {self.lowres_size!r}")
        _check_range("blur_sigma", self.blur_sigma, 1e-3, 20.0)
        if not (isinstance(self.color_jitter, (int, float)) and 0.0 <= self.color_jitter <= 1.0):
            raise ValueError(f"AugmentConfig.color_jitter must be in [0, 1], "
                             f"got {self.color_jitter!r}")
        if not (isinstance(self.hue_max, (int, float)) and 0.0 <= self.hue_max <= 180.0):
            raise ValueError(f"AugmentConfig.hue_max must be in [0, 180] degrees, "
                             f"got {self.hue_max!r}")
        _check_range("hsv_saturation", self.hsv_saturation, 0.0)
        _check_range("crop_scale", self.crop_scale, 1e-3, 1.0)
        _check_range("crop_ratio", self.crop_ratio, 1e-2, 1e2)

    def fingerprint(self) -> dict:
        """The fields as JSON values; a later field only when it is not at its default."""
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        for name in self.LATER_FIELDS:
            default = json.loads(json.dumps(getattr(type(self), name)))
            if out[name] == default:
                del out[name]
        return out

    @classmethod
    def dali(cls) -> AugmentConfig:
        """The reference's ``dali_aug`` recipe for 112 px faces (see the module docstring)."""
        return cls(flip=True, lowres_prob=0.1, lowres_size=(56, 89), blur_prob=0.2,
                   blur_sigma=(0.5, 1.0), hsv_prob=0.2, hue_max=20.0,
                   hsv_saturation=(1.0, 1.2), grayscale_prob=0.1)

    @property
    def is_identity(self) -> bool:
        """True when ``augment`` returns every image unchanged."""
        return not (self.flip or self.lowres_prob or self.blur_prob or self.color_jitter
                    or self.hsv_prob or self.grayscale_prob or self.crop_prob)


def _check_image(image: Any, what: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        desc = (f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray)
                else type(image).__name__)
        raise ValueError(f"{what} must be a uint8 array [H, W, 3], got {desc}")
    return image


def resize(image: np.ndarray, size: int = 112) -> np.ndarray:
    """Resizes an RGB uint8 image to ``size x size`` (Pillow bilinear, antialiased).

    Grayscale images ([H, W] or [H, W, 1]) are expanded to three equal channels
    first. An image already of that size is returned as is.
    """
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"resize: size must be an integer >= 1, got {size!r}")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
    image = _check_image(image)
    if image.shape[:2] == (size, size):
        return image
    out = Image.fromarray(np.ascontiguousarray(image)).resize(
        (size, size), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def normalize(images: Any) -> Any:
    """``(x - 127.5) / 127.5`` in float32, for one image or a batch, numpy or JAX."""
    if not hasattr(images, "astype"):
        images = np.asarray(images)
    return (images.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float [H, W, C] image, reflecting at the borders."""
    radius = max(1, int(math.ceil(2.0 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for axis in (0, 1):
        n = x.shape[axis]
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="reflect" if n > radius else "edge")
        out = taps[0] * padded.take(range(0, n), axis=axis)
        for k in range(1, 2 * radius + 1):
            out += taps[k] * padded.take(range(k, k + n), axis=axis)
        x = out
    return x


def _hue_saturation_matrix(degrees: float, saturation: float) -> np.ndarray:
    """3x3 RGB matrix rotating hue by ``degrees`` and scaling chroma by ``saturation``."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    rot = np.array([[1.0, 0.0, 0.0],
                    [0.0, saturation * c, -saturation * s],
                    [0.0, saturation * s, saturation * c]])
    return (_YIQ_INV @ rot @ _YIQ).astype(np.float32)


def crop_window(h: int, w: int, cfg: AugmentConfig, u: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the crop that uniforms ``u`` [4] pick."""
    area = h * w * (cfg.crop_scale[0] + u[0] * (cfg.crop_scale[1] - cfg.crop_scale[0]))
    lo, hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    ratio = math.exp(lo + u[1] * (hi - lo))
    cw = min(w, max(1, int(round(math.sqrt(area * ratio)))))
    ch = min(h, max(1, int(round(math.sqrt(area / ratio)))))
    top = min(h - ch, int(u[2] * (h - ch + 1)))
    left = min(w - cw, int(u[3] * (w - cw + 1)))
    return top, left, ch, cw


def _resized_crop(image: np.ndarray, cfg: AugmentConfig, u: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    top, left, ch, cw = crop_window(h, w, cfg, u)
    if (ch, cw) == (h, w):
        return image
    window = Image.fromarray(np.ascontiguousarray(image[top:top + ch, left:left + cw]))
    return np.asarray(window.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)


def augment(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Returns an augmented uint8 copy of ``image`` [H, W, 3] (see the module docstring)."""
    image = _check_image(image)
    if not isinstance(cfg, AugmentConfig):
        raise TypeError(f"augment: cfg must be an AugmentConfig, got {type(cfg).__name__}")
    h, w = image.shape[:2]
    # Every draw happens here, in a fixed order, whatever is enabled.
    coins = rng.random(6)
    lowres_side = int(rng.integers(cfg.lowres_size[0], cfg.lowres_size[1] + 1))
    sigma = float(rng.uniform(*cfg.blur_sigma))
    jitter = rng.uniform(1.0 - cfg.color_jitter, 1.0 + cfg.color_jitter, 3)
    hue = float(rng.uniform(0.0, cfg.hue_max))
    hsv_sat = float(rng.uniform(*cfg.hsv_saturation))
    crop = rng.random(4) if cfg.crop_prob > 0 else None  # last: older recipes unchanged

    if crop is not None and coins[5] < cfg.crop_prob:
        image = _resized_crop(image, cfg, crop)
    if coins[0] < cfg.lowres_prob:
        small = Image.fromarray(np.ascontiguousarray(image)).resize(
            (lowres_side, lowres_side), Image.Resampling.BILINEAR)
        image = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)

    x = None  # float32 working copy, made only when a float operation runs
    if coins[1] < cfg.blur_prob:
        x = _gaussian_blur(image.astype(np.float32), sigma)
    if cfg.color_jitter > 0:
        x = image.astype(np.float32) if x is None else x
        brightness, contrast, saturation = (float(v) for v in jitter)
        x *= brightness
        mean = float((x @ LUMA).mean())
        x = (x - mean) * contrast + mean
        gray = (x @ LUMA)[..., None]
        x = gray + (x - gray) * saturation
    if coins[2] < cfg.hsv_prob:
        x = image.astype(np.float32) if x is None else x
        x = x @ _hue_saturation_matrix(hue, hsv_sat).T
    if x is not None:
        image = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if coins[3] < cfg.grayscale_prob:
        gray = np.clip(np.rint(image.astype(np.float32) @ LUMA), 0, 255).astype(np.uint8)
        image = np.repeat(gray[..., None], 3, axis=2)
    if cfg.flip and coins[4] < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)
