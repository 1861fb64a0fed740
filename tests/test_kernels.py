"""Kernels: values, gradients against finite differences, blocked sums against dense ones."""

import numpy as np
import pytest

import jko_ift as jk
from jko_ift import kernels

KERNELS = [jk.Gaussian(0.7), jk.IMQ(1.3), jk.Laplace(0.9), jk.EnergyKernel()]

#: Central differences with step 1e-6 on smooth functions of order one: error ~1e-10.
FD_TOL = 1e-6


def test_closed_form_values():
    x, y = np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]])
    assert jk.Gaussian(2.0)(x, y)[0, 0] == pytest.approx(np.exp(-25 / 8))
    assert jk.IMQ(1.0)(x, y)[0, 0] == pytest.approx(26**-0.5)
    assert jk.Laplace(5.0)(x, y)[0, 0] == pytest.approx(np.exp(-1.0))
    assert jk.EnergyKernel()(x, y)[0, 0] == pytest.approx(-5.0)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: type(k).__name__)
def test_gradient_matches_finite_differences(kernel):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    grad = kernel.gradient(x, y)
    for k in range(3):
        step = np.zeros(3)
        step[k] = 1e-6
        fd = (kernel(x + step, y) - kernel(x - step, y)) / 2e-6
        np.testing.assert_allclose(grad[:, :, k], fd, atol=FD_TOL)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: type(k).__name__)
def test_blocked_sums_match_dense(kernel, monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK_ENTRIES", 7)  # force many small blocks
    rng = np.random.default_rng(1)
    x, y, w = rng.normal(size=(13, 2)), rng.normal(size=(11, 2)), rng.random(11)
    np.testing.assert_allclose(kernel.apply(x, y, w), kernel(x, y) @ w, rtol=1e-12)
    dense = np.einsum("ijk,j->ik", kernel.gradient(x, y), w)
    np.testing.assert_allclose(kernel.grad_sum(x, y, w), dense, rtol=1e-10, atol=1e-12)


def test_gradient_at_coincident_points_is_the_symmetric_subgradient():
    x = np.zeros((1, 2))
    for kernel in (jk.Laplace(1.0), jk.EnergyKernel()):
        np.testing.assert_array_equal(kernel.gradient(x, x), 0.0)


def test_positive_definiteness_flags():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 2))
    for kernel in KERNELS[:3]:
        assert kernel.positive_definite
        assert np.linalg.eigvalsh(kernel(x, x)).min() > -1e-10
    gram = jk.EnergyKernel()(x, x)
    assert not jk.EnergyKernel.positive_definite
    centre = np.eye(30) - 1.0 / 30
    assert np.linalg.eigvalsh(centre @ gram @ centre).min() > -1e-10  # c.p.d.
    assert np.linalg.eigvalsh(gram).min() < 0  # but not p.d.


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan])
def test_kernel_parameters_are_validated(bad):
    with pytest.raises(ValueError, match="positive"):
        jk.Gaussian(bad)


def test_dimension_mismatch_is_refused():
    with pytest.raises(ValueError, match="dimension"):
        jk.Gaussian(1.0)(np.zeros((2, 2)), np.zeros((2, 3)))


#: Bandwidths from small against the data's spread (1e-8: the lifted product alone gave row sums
#: of 2e26 and k(x, x) = 1.65 at 1e-7) to ones whose square underflows (1e-160, 1e-300).
TINY_BANDWIDTHS = [1e-7, 1e-8, 1e-160, 1e-300]


def _cloud_with_a_duplicate():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 2)) * 3.0 + 5.0
    x[7] = x[2]  # a coincident pair: k = 1 there, and the gradient 0
    return x, rng.random(40)


@pytest.mark.parametrize("sigma", TINY_BANDWIDTHS)
def test_gaussian_at_tiny_bandwidth_is_one_on_the_diagonal_and_zero_off_it(sigma):
    """Distinct points of spread 3 are >= 1e-3 apart, so exp(-|x - y|^2 / (2 sigma^2)) is exactly
    0 off the coincident pairs: every value is exact, not merely bounded."""
    x, w = _cloud_with_a_duplicate()
    kernel = jk.Gaussian(sigma)
    coincident = (x[:, None, :] == x[None, :, :]).all(-1).astype(float)
    np.testing.assert_array_equal(kernel(x, x), coincident)
    np.testing.assert_array_equal(kernel.apply(x, x, w), coincident @ w)
    assert np.all(kernel.apply(x, x, w / w.sum()) <= 1.0)
    np.testing.assert_array_equal(kernel.grad_sum(x, x, w), 0.0)
    np.testing.assert_array_equal(kernel.gradient(x, x), 0.0)


@pytest.mark.parametrize("kernel", [jk.Gaussian(1e-300), jk.Laplace(1e-300), jk.IMQ(1e-300)],
                         ids=lambda k: type(k).__name__)
def test_tiny_bandwidths_give_finite_values_without_warnings(kernel, recwarn):
    x, w = _cloud_with_a_duplicate()
    values, gradient = kernel.apply(x, x, w), kernel.grad_sum(x, x, w)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(gradient))
    assert kernel(x[:1], x[:1])[0, 0] == pytest.approx(1e300 if isinstance(kernel, jk.IMQ) else 1.0)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: type(k).__name__)
def test_profiles_never_exceed_their_value_at_zero_far_from_the_origin(kernel):
    """The lifted |x|^2 + |y|^2 - 2 x.y went below 0 by the cancellation error; squared
    distances are now >= 0 and exact at coincident points, wherever the data sit."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 3)) + 1e8
    s = kernels.squared_distances(x, x)
    assert np.all(s >= 0) and np.all(np.diag(s) == 0)
    gram = kernel(x, x)
    assert np.all(gram <= kernel.profile(np.zeros(1))[0])
    np.testing.assert_array_equal(np.diag(gram), kernel.profile(np.zeros(1))[0])


def test_squared_distances_are_exact_at_near_pairs_and_relative_elsewhere():
    """Against differences in extended precision: |x - y|^2 for pairs from 1e-9 to 10 apart,
    shifted by 1e6, relative error <= MAX_ROUNDOFF (plus the inputs' own rounding, which the
    reference shares: it is computed from the same float64 points)."""
    rng = np.random.default_rng(6)
    base = rng.normal(size=(30, 2)) + 1e6
    offsets = 10.0 ** rng.uniform(-9, 1, size=(30, 1)) * rng.normal(size=(30, 2))
    y = base + offsets
    exact = ((base[:, None, :].astype(np.longdouble) - y[None, :, :]) ** 2).sum(-1)
    computed = kernels.squared_distances(base, y)
    relative = np.abs(computed - exact) / np.maximum(exact, np.finfo(float).tiny)
    assert relative.max() <= kernels.MAX_ROUNDOFF


@pytest.mark.parametrize("d", [2, 10])
def test_near_pairs_by_tree_and_by_scan_agree(d):
    """d = 10 > TREE_DIM_MAX goes through the comparison pass: same values as the tree."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(25, d)) + 1e7
    x[3] = x[9]
    w = rng.random(25)
    kernel = jk.IMQ(1e-6)  # near pairs are all that count at this c
    dense = kernel(x, x) @ w
    np.testing.assert_allclose(kernel.apply(x, x, w), dense, rtol=1e-12)
    assert kernel.apply(x, x, w)[3] >= 2e6 * min(w[3], w[9])


def test_clusters_of_coincident_points_go_through_the_comparison_pass(monkeypatch):
    """Particles collapsed into two clusters make every within-cluster pair near: past
    NEAR_PAIRS_MAX the list is not built (memory) and the blocks are scanned instead."""
    monkeypatch.setattr(kernels, "NEAR_PAIRS_MAX", 10)
    x = np.repeat([[0.0, 0.0], [1.0, 2.0]], 20, axis=0) + 1e6
    assert kernels.NearPairs.find(*kernels.centred_pair(x, x), 1e-20) is None
    w = np.full(40, 1.0 / 40)
    np.testing.assert_allclose(jk.Gaussian(1e-8).apply(x, x, w), 0.5, rtol=1e-15)
    np.testing.assert_array_equal(jk.Gaussian(1e-8).grad_sum(x, x, w), 0.0)


def test_kept_matrices_of_small_point_sets_agree_with_the_blocked_sums():
    """Points of measures keep their kernel matrices (``kernels._small_pair``): every sum over
    them agrees with the blocked path on writable copies of the same points."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 2)) + 1e6
    x[5] = x[7]  # a coincident pair
    mu = jk.Measure(x, rng.random(40))
    nu = jk.Measure(rng.normal(size=(30, 2)) + 1e6, rng.random(30))
    for kernel in KERNELS:
        for a, b in ((mu, mu), (mu, nu)):
            assert kernels._small_pair(kernel, a.points, b.points) is not None
            raw_x, raw_y, w = np.array(a.points), np.array(b.points), b.weights
            np.testing.assert_allclose(kernel.apply(a.points, b.points, w),
                                       kernel.apply(raw_x, raw_y, w), rtol=1e-12)
            np.testing.assert_allclose(kernel(a.points, b.points), kernel(raw_x, raw_y), rtol=1e-12)
            np.testing.assert_allclose(kernel.grad_sum(a.points, b.points, w),
                                       kernel.grad_sum(raw_x, raw_y, w), rtol=1e-9, atol=1e-12)
    moved = jk.Measure(mu.points + 0.5, mu.weights)  # new points: a new pair, not the kept one
    gaussian = KERNELS[0]
    np.testing.assert_allclose(gaussian.apply(moved.points, moved.points, moved.weights),
                               gaussian.apply(np.array(moved.points), np.array(moved.points),
                                              moved.weights), rtol=1e-12)
