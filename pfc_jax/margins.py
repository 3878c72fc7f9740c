"""Additive angular margins for the target column: combined (m1, m2, m3).

``phi(c) = cos(m1 * arccos(c) + m2) - m3``; ArcFace is (1, 0.5, 0), CosFace
(1, 0, 0.4). All three margins always apply (see METHODS.md §1).

Gradient modes:

* ``exact``: the true derivative of ``phi``, with the monotone fallback where
  ``m1 * theta + m2`` passes pi. For m1 = 1 the fallback is the classic
  ``c - m3 - m2 * sin(m2)`` below ``c = cos(pi - m2)``; for other m1 the
  threshold is ``theta_t = (pi - m2) / m1`` and the offset is
  ``max(m2 * sin(m2), 1 + cos(theta_t))``, which is the same for m1 = 1 and
  keeps phi non-decreasing in c for any m1. arccos is evaluated on c clipped
  to ``[-1 + eps, 1 - eps]`` so the derivative stays finite at |c| = 1.
* ``straight_through``: forward ``cos(m1 * arccos(c) + m2) - m3`` computed
  literally, with no fallback; backward as if phi(c) = c (d phi / dc = 1).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

GRAD_MODES = ("exact", "straight_through")
ARCCOS_EPS = 1e-6

ARCFACE = (1.0, 0.5, 0.0)
COSFACE = (1.0, 0.0, 0.4)


@dataclasses.dataclass(frozen=True)
class Margin:
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    grad_mode: str = "exact"

    def __post_init__(self):
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"margin grad_mode {self.grad_mode!r} is not one of {GRAD_MODES}")
        if not self.m1 > 0:
            raise ValueError(f"margin m1 must be > 0, got {self.m1}")
        if not 0 <= self.m2 < math.pi:
            raise ValueError(f"margin m2 must be in [0, pi), got {self.m2}")
        if not all(map(math.isfinite, (self.m1, self.m2, self.m3))):
            raise ValueError(f"margins must be finite, got {(self.m1, self.m2, self.m3)}")

    @property
    def is_identity(self) -> bool:
        return self.m1 == 1.0 and self.m2 == 0.0 and self.m3 == 0.0

    @property
    def fallback(self) -> tuple[float, float] | None:
        """(cos threshold, offset) of the monotone fallback, None if never needed."""
        theta_t = (math.pi - self.m2) / self.m1
        if theta_t >= math.pi:
            return None
        c_t = math.cos(theta_t)
        return c_t, max(self.m2 * math.sin(self.m2), 1.0 + c_t)

    def __call__(self, c: jax.Array) -> jax.Array:
        """Applies the margin to target cosines ``c`` (already clipped to [-1, 1])."""
        if self.m1 == 1.0 and self.m2 == 0.0:  # pure CosFace: exact in both modes
            return c - self.m3
        if self.grad_mode == "straight_through":
            literal = jnp.cos(self.m1 * jnp.arccos(c) + self.m2) - self.m3
            return c + jax.lax.stop_gradient(literal - c)
        theta = jnp.arccos(jnp.clip(c, -1.0 + ARCCOS_EPS, 1.0 - ARCCOS_EPS))
        phi = jnp.cos(self.m1 * theta + self.m2) - self.m3
        fb = self.fallback
        if fb is not None:
            c_t, offset = fb
            phi = jnp.where(c > c_t, phi, c - self.m3 - offset)
        return phi
