"""Five-point alignment: the similarity fit against a known transform, and the warp
putting rendered landmarks on the ArcFace template within half a pixel."""

from __future__ import annotations

import numpy as np
import pytest

from pfc_jax import align


def _similarity(angle_deg, scale, tx, ty):
    a = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([r, [[tx], [ty]]], axis=1)


def test_the_fit_recovers_a_known_similarity_and_is_least_squares():
    m = _similarity(17.0, 0.63, -12.0, 40.5)
    src = np.random.default_rng(0).uniform(0, 200, (5, 2))
    dst = src @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(align.similarity_fit(src, dst), m, atol=1e-12)
    # with noise: no other similarity near the fit does better (a local check of the minimum)
    noisy = dst + np.random.default_rng(1).normal(0, 2.0, dst.shape)
    fit = align.similarity_fit(src, noisy)

    def err(mm):
        return np.sum((src @ mm[:, :2].T + mm[:, 2] - noisy) ** 2)

    for d in (1e-3, -1e-3):
        for a, s, tx in ((d, 0, 0), (0, d, 0), (0, 0, d)):
            c, sn = np.cos(a), np.sin(a)
            rs = (1 + s) * np.array([[c, -sn], [sn, c]])
            other = np.concatenate([rs @ fit[:, :2], fit[:, 2:] + [[tx], [0]]], axis=1)
            assert err(other) >= err(fit)
    with pytest.raises(ValueError, match="coincide"):
        align.similarity_fit(np.ones((5, 2)), dst)


def test_align_puts_the_landmarks_on_the_template():
    # Landmarks where a known similarity (rotated 12 degrees, 1.8x, shifted) takes the
    # template, each a Gaussian blob (its centroid is the sub-pixel landmark, pixel
    # centres at integers) on black, in a 260x240 image.
    m = _similarity(12.0, 1.8, 30.0, 25.0)
    pts = align.TEMPLATE @ m[:, :2].T + m[:, 2]
    yy, xx = np.mgrid[0:240, 0:260]
    img = np.zeros((240, 260), np.float64)
    for x, y in pts:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.5**2))
    rgb = np.repeat(np.clip(img * 255, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    out = align.align(rgb, pts).astype(np.float64)[..., 0]
    assert out.shape == (112, 112)
    oy, ox = np.mgrid[0:112, 0:112]
    # The centroid of each blob at its template point. The issue asks 0.5 px; uint8
    # rounding and bilinear resampling move it by about 0.005 px here, and mixing up
    # the half-pixel conventions would move it by 0.5 (1 - 1 / 1.8) = 0.22 px, so
    # 0.1 px tells them apart.
    for tx, ty in align.TEMPLATE:
        win = (np.abs(ox - tx) < 7) & (np.abs(oy - ty) < 7)
        w = out * win
        cx, cy = (w * ox).sum() / w.sum(), (w * oy).sum() / w.sum()
        assert abs(cx - tx) < 0.1 and abs(cy - ty) < 0.1, (cx, cy, tx, ty)
    with pytest.raises(ValueError, match="5 \\(x, y\\) landmarks"):
        align.align(rgb, pts[:4])
