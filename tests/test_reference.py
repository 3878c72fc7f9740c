"""The float64 reference's hand-derived gradients against finite differences."""

import numpy as np
import pytest

from reference import head_loss, phi_and_slope

CASES = [
    dict(margins=(1.0, 0.5, 0.0), grad_mode="exact"),
    dict(margins=(1.0, 0.0, 0.4), grad_mode="exact"),
    dict(margins=(0.9, 0.4, 0.15), grad_mode="exact", filter_threshold=0.3,
         filter_mode="zero"),
    dict(margins=(1.0, 0.5, 0.0), grad_mode="exact", filter_threshold=0.3,
         filter_mode="mask"),
]


def _problem(seed=0, C=7, K=3, D=5, B=4):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(C, K, D))
    X = rng.normal(size=(B, D))
    y = rng.integers(0, C, B)
    S = np.unique(np.concatenate([y, [0, 2, 5]]))
    return W, X, y, S


@pytest.mark.parametrize("case", CASES)
def test_reference_gradient_matches_finite_differences(case):
    W, X, y, S = _problem()
    out = head_loss(W, X, y, S, s=8.0, **case)
    eps = 1e-6

    def numeric(arr, index):
        a, b = arr.copy(), arr.copy()
        a[index] += eps
        b[index] -= eps
        args = dict(W=W, X=X)
        name = "W" if arr is W else "X"
        la = head_loss(**{**args, name: a}, y=y, S=S, s=8.0, **case)["loss"]
        lb = head_loss(**{**args, name: b}, y=y, S=S, s=8.0, **case)["loss"]
        return (la - lb) / (2 * eps)

    for index in np.ndindex(X.shape):
        assert numeric(X, index) == pytest.approx(out["dX"][index], abs=1e-6)
    for index in np.ndindex(W.shape):
        assert numeric(W, index) == pytest.approx(out["dW"][index], abs=1e-6)


def test_straight_through_gradient_is_identity_slope():
    c = np.linspace(-0.99, 0.99, 7)
    phi, slope = phi_and_slope(c, 1.0, 0.5, 0.0, "straight_through")
    np.testing.assert_allclose(phi, np.cos(np.arccos(c) + 0.5))
    np.testing.assert_array_equal(slope, 1.0)


def test_fallback_is_monotone_and_matches_classic_form():
    c = np.linspace(-1, 1, 2001)
    for margins in [(1.0, 0.5, 0.0), (0.9, 0.4, 0.15), (1.2, 0.3, 0.1), (1.0, 0.8, 0.0)]:
        phi, _ = phi_and_slope(c, *margins, "exact")
        assert np.all(np.diff(phi) >= -1e-12), margins
    # m1 = 1: below cos(pi - m2) the value is c - m2 sin(m2) (arcface_torch's th / mm).
    m2 = 0.5
    low = c <= np.cos(np.pi - m2)
    phi, _ = phi_and_slope(c, 1.0, m2, 0.0, "exact")
    np.testing.assert_allclose(phi[low], c[low] - m2 * np.sin(m2))
