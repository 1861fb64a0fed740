"""Distances and convergence orders against closed forms."""

import numpy as np
import pytest

import jko_ift as jk


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
