"""A float64 numpy reference of the Partial FC loss and its gradients.

Written from METHODS.md §1-2 independently of pfc_jax: plain loops-free numpy,
hand-derived gradients (checked against finite differences in
test_reference.py). It takes the sampled class set as given, since sampling is
random; tests pass the set the head drew.
"""

from __future__ import annotations

import math

import numpy as np

ARCCOS_EPS = 1e-6


def phi_and_slope(c, m1, m2, m3, grad_mode):
    """Target margin phi(c) and d phi / dc, float64."""
    c = np.asarray(c, np.float64)
    if m1 == 1.0 and m2 == 0.0:
        return c - m3, np.ones_like(c)
    if grad_mode == "straight_through":
        return np.cos(m1 * np.arccos(c) + m2) - m3, np.ones_like(c)
    inside = (c > -1 + ARCCOS_EPS) & (c < 1 - ARCCOS_EPS)
    cc = np.clip(c, -1 + ARCCOS_EPS, 1 - ARCCOS_EPS)
    theta = np.arccos(cc)
    phi = np.cos(m1 * theta + m2) - m3
    slope = np.where(inside, m1 * np.sin(m1 * theta + m2) / np.sin(theta), 0.0)
    theta_t = (math.pi - m2) / m1
    if theta_t < math.pi:
        c_t = math.cos(theta_t)
        offset = max(m2 * math.sin(m2), 1.0 + c_t)
        low = c <= c_t
        phi = np.where(low, c - m3 - offset, phi)
        slope = np.where(low, 1.0, slope)
    return phi, slope


def head_loss(W, X, y, S, *, s=64.0, margins=(1.0, 0.5, 0.0), grad_mode="exact",
              filter_threshold=0.0, filter_mode="mask"):
    """Loss and gradients over the sampled classes ``S``.

    W: [C, K, D] class centres; X: [B, D] embeddings; y: [B] labels (any
    integers: labels outside [0, C) contribute nothing); S: class ids whose
    columns enter the softmax (must contain every valid label).
    Returns dict(loss, per_sample, dX [B, D], dW [C, K, D], target_cos,
    max_neg_cos, target_is_max).
    """
    W = np.asarray(W, np.float64)
    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    S = np.asarray(S)
    B = X.shape[0]
    C = W.shape[0]
    m1, m2, m3 = margins

    xn = np.linalg.norm(X, axis=-1, keepdims=True)
    xh = X / xn
    Ws = W[S]                                   # [n, K, D]
    wn = np.linalg.norm(Ws, axis=-1, keepdims=True)
    wh = Ws / wn
    cos_k = np.einsum("bd,nkd->bnk", xh, wh)
    kstar = cos_k.argmax(-1)                    # [B, n]
    raw = cos_k.max(-1)
    in_range = (raw > -1) & (raw < 1)
    cos = np.clip(raw, -1, 1)

    ok = (y >= 0) & (y < C)
    is_t = (S[None, :] == y[:, None]) & ok[:, None]
    assert np.all(is_t.sum(1) == ok), "every valid label must be in S"
    neg = ~is_t
    max_neg_cos = np.where(neg, cos, -2.0).max(1)

    keep = neg.copy()
    grad_through = np.ones_like(cos)
    if filter_threshold > 0:
        dirty = neg & (cos > filter_threshold)
        if filter_mode == "mask":
            keep &= ~dirty
        else:
            cos = np.where(dirty, 0.0, cos)
            grad_through = np.where(dirty, 0.0, 1.0)

    c_t = np.where(is_t, cos, 0.0).sum(1)
    phi, slope = phi_and_slope(c_t, m1, m2, m3, grad_mode)
    z = s * cos
    z = np.where(is_t, s * phi[:, None], z)
    z = np.where(keep | is_t, z, -np.inf)
    zmax = z.max(1, keepdims=True)
    ez = np.exp(z - zmax)
    lse = np.log(ez.sum(1)) + zmax[:, 0]
    z_t = s * phi
    per_sample = np.where(ok, lse - z_t, 0.0)
    loss = per_sample.sum() / B
    neg_max = np.where(keep, z, -np.inf).max(1)

    p = ez / ez.sum(1, keepdims=True)
    dz = (p - is_t) * ok[:, None] / B
    dc = s * dz * grad_through
    dc = np.where(is_t, s * dz * slope[:, None], dc)
    dc = dc * in_range

    onehot_k = np.eye(W.shape[1])[kstar]        # [B, n, K]
    dxh = np.einsum("bn,bnk,nkd->bd", dc, onehot_k, wh)
    dwh = np.einsum("bn,bnk,bd->nkd", dc, onehot_k, xh)
    dX = (dxh - xh * np.sum(xh * dxh, -1, keepdims=True)) / xn
    dWs = (dwh - wh * np.sum(wh * dwh, -1, keepdims=True)) / wn
    dW = np.zeros_like(W)
    dW[S] = dWs
    return dict(loss=loss, per_sample=per_sample, dX=dX, dW=dW, target_cos=c_t,
                max_neg_cos=max_neg_cos, target_is_max=ok & (z_t >= neg_max))
