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
