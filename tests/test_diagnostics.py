"""Distances and convergence orders against closed forms."""

import numpy as np
import pytest

import jko_ift as jk
from jko_ift.diagnostics import hellinger_kantorovich_sq


def test_w2_of_a_translation_is_the_shift():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(30, 2))
    mu = jk.Measure(points, np.full(30, 1 / 30))
    nu = jk.Measure(points + [0.3, -0.4], np.full(30, 1 / 30))
    assert jk.w2(mu, nu) == pytest.approx(0.5, rel=1e-9)
    with pytest.raises(ValueError, match="equal masses"):
        jk.w2(mu, nu.with_weights(np.full(30, 1 / 15)))


def test_mmd_of_diracs():
    k = jk.Gaussian(1.0)
    mu, nu = jk.Measure([[0.0]], [1.0]), jk.Measure([[1.0]], [1.0])
    assert jk.mmd(mu, nu, k, squared=True) == pytest.approx(2 - 2 * np.exp(-0.5))
    assert jk.mmd(mu, mu, k) == 0.0


def test_convergence_order_recovers_a_power_law():
    h = np.array([0.1, 0.05, 0.025, 0.0125])
    noise = np.array([1.02, 0.99, 1.01, 0.98])
    fit = jk.convergence_order(h, 3.0 * h**2 * noise)
    assert fit.order == pytest.approx(2.0, abs=0.05)
    low, high = fit.interval()
    assert low < 2.0 < high
    assert jk.convergence_order(h[:2], h[:2]).order == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive"):
        jk.convergence_order(h, -h)


def _random_pair(scale: float):
    rng = np.random.default_rng(0)
    a, b = rng.random(30), rng.random(25)
    x, y = rng.normal(size=(30, 2)), rng.normal(size=(25, 2)) + 0.5
    return (jk.Measure(x, scale * a / a.sum()), jk.Measure(y, scale * b / b.sum()),
            jk.Measure(x, a / a.sum()), jk.Measure(y, b / b.sum()))


#: W2^2 is 1-homogeneous in the masses, W2 1/2-homogeneous: sqrt(m) W2(mu / m, nu / m) up to
#: the rounding of the weights' rescaling (a few eps; 1e-12 leaves room for the simplex's sums).
HOMOGENEITY_RTOL = 1e-12


@pytest.mark.parametrize("mass", [1e-300, 1e-160, 1e-100, 1e100, 1e300])
def test_w2_is_the_rescaled_w2_of_the_normalized_measures(mass):
    """POT's emd2 crashed the interpreter (segmentation fault) for masses below ~1e-200 and was
    0.8 % off at 1e-160 (issue 13, finding 8); the masses are now normalized before it."""
    mu, nu, mu1, nu1 = _random_pair(mass)
    assert jk.w2(mu, nu) == pytest.approx(np.sqrt(mass) * jk.w2(mu1, nu1), rel=HOMOGENEITY_RTOL)


def test_w2_refuses_zero_and_infinite_masses():
    mu, nu, _, _ = _random_pair(1.0)
    zero = jk.Measure(mu.points, np.zeros(mu.n))
    with pytest.raises(ValueError, match="positive finite mass"):
        jk.w2(zero, zero)
    huge = jk.Measure(mu.points, np.full(mu.n, 1e307))  # the sum overflows
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="positive finite mass"):
        jk.w2(huge, huge)


@pytest.mark.parametrize("mass", [1e-300, 1e-160, 1e150])
def test_mmd_is_homogeneous_in_the_masses(mass):
    """MMD(m mu, m nu) = m MMD(mu, nu): no underflow of the quadratic form at tiny masses."""
    mu, nu, mu1, nu1 = _random_pair(mass)
    kernel = jk.Gaussian(1.0)
    assert jk.mmd(mu, nu, kernel) == pytest.approx(mass * jk.mmd(mu1, nu1, kernel), rel=1e-12)
    huge = jk.Measure(mu.points, np.full(mu.n, 1e307))
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="finite mass"):
        jk.mmd(huge, nu1, kernel)


def test_w2_and_mmd_are_translation_invariant_at_large_shifts():
    """Both use the centred squared distances: a shift by 1e8 keeps eps * 1e8 = 2e-8 relative."""
    _, _, mu, nu = _random_pair(1.0)
    shift = np.array([1e8, -3e7])
    moved = jk.Measure(mu.points + shift, mu.weights), jk.Measure(nu.points + shift, nu.weights)
    tol = 4 * np.finfo(float).eps * 1e8  # inputs rounded to eps * |shift|, spread ~ 1
    assert jk.w2(*moved) == pytest.approx(jk.w2(mu, nu), rel=tol)
    kernel = jk.Gaussian(1.0)
    assert jk.mmd(*moved, kernel) == pytest.approx(jk.mmd(mu, nu, kernel), rel=tol)


# ---------------------------------------------------------------------------- Hellinger-Kantorovich
# HK_{alpha,beta}^2 = (4 / beta) LET with the cost -log cos^2(min(|x - y| / ell, pi / 2)),
# ell = 2 sqrt(alpha / beta) (docs/entropic.md §2b), against the closed forms of the LET problem.

#: Points 10 apart: beyond ell pi / 2 for every (alpha, beta) below (ell <= 2.9), so the HK
#: kernel is the identity and the LET problem is pure rescaling.
FAR = np.arange(3.0)[:, None] * 10.0


@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (1.0, 2.0), (0.5, 3.0)])
def test_let_of_a_rescaling_is_hellinger_over_beta(alpha, beta):
    a, b = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    eps = 1e-2
    # the entropic plan is diag(g), g = (a b)^(1/2) up to a relative bias of order
    # eps' = eps beta / (4 alpha) (the entropy pulls g towards a); observed relative errors
    # 1.5e-6, 6e-6, 5.5e-5 for the three cases at eps = 1e-2; 2 eps' allowed
    value, info = hellinger_kantorovich_sq(jk.Measure(FAR, a), jk.Measure(FAR, b),
                                           alpha, beta, eps)
    hellinger = jk.Hellinger().squared_distance(jk.Measure(FAR, a), jk.Measure(FAR, b)) / beta
    eps_prime = eps * beta / (4 * alpha)
    assert info["marginal_violation"] <= 1e-10
    assert value == pytest.approx(hellinger, rel=2 * eps_prime)
    assert value >= hellinger  # the entropic plan is feasible: an upper bound


@pytest.mark.parametrize("alpha, beta, d, eps", [(1.0, 1.0, 0.4, 1e-2), (1.0, 1.0, 0.2, 4e-3),
                                                 (2.0, 0.5, 0.4, 1e-2)])
def test_let_of_a_moved_dirac_is_transport_over_alpha(alpha, beta, d, eps):
    """m delta_x -> m delta_y: (8 m / beta)(1 - cos(d / ell)) = m d^2 / alpha (1 - d^2 / (12 ell^2))."""
    points = np.array([[0.0], [d]])
    value, _ = hellinger_kantorovich_sq(jk.Measure(points, np.array([1.0, 0.0])),
                                        jk.Measure(points, np.array([0.0, 1.0])),
                                        alpha, beta, eps)
    ell = 2 * np.sqrt(alpha / beta)
    # the only plan entry is gamma_xy: the entropic value matches the exact one closely
    # (observed 1e-9 relative; 1e-6 allowed)
    assert value == pytest.approx(8 / beta * (1 - np.cos(d / ell)), rel=1e-6)
    assert value == pytest.approx(d**2 / alpha, rel=d**2 / (12 * ell**2) * 1.1)
