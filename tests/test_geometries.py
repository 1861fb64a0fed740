"""The geometries (``jko_ift.geometries``): each squared distance D^2 against a closed form or a
second computation, and the checks of their parameters."""

import numpy as np
import pytest

import jko_ift as jk
from jko_ift.geometries import DEFAULT_RIDGE, exact_w2_squared

POINTS = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
A = np.array([0.5, 0.3, 0.2])
B = np.array([0.2, 0.2, 0.6])


def test_w2_of_two_diracs_is_the_mass_times_the_squared_distance():
    for mass in (1.0, 3.0):
        mu = jk.Measure(np.array([[0.0, 0.0]]), np.array([mass]))
        nu = jk.Measure(np.array([[3.0, 4.0]]), np.array([mass]))
        assert jk.Wasserstein().squared_distance(mu, nu) == pytest.approx(25.0 * mass, rel=1e-12)


def test_w2_is_one_homogeneous_in_the_masses():
    mu, nu = jk.Measure(POINTS, A), jk.Measure(POINTS + 0.5, B)
    base = exact_w2_squared(mu, nu)
    assert base > 0
    assert exact_w2_squared(jk.Measure(POINTS, 7 * A), jk.Measure(POINTS + 0.5, 7 * B)) == pytest.approx(
        7 * base, rel=1e-12)


def test_w2_refuses_measures_of_different_masses():
    with pytest.raises(ValueError, match="W2 needs equal masses"):
        jk.Wasserstein().squared_distance(jk.Measure(POINTS, A), jk.Measure(POINTS, 2 * B))


def test_hellinger_is_four_times_the_squared_distance_of_the_root_weights():
    expected = 4 * sum((np.sqrt(a) - np.sqrt(b)) ** 2 for a, b in zip(A, B, strict=True))
    value = jk.Hellinger().squared_distance(jk.Measure(POINTS, A), jk.Measure(POINTS, B))
    assert value == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("geometry", [jk.Hellinger(), jk.MMD(jk.Gaussian(1.0))], ids=["Hellinger", "MMD"])
def test_reaction_distances_need_a_common_support(geometry):
    with pytest.raises(ValueError, match="common support"):
        geometry.squared_distance(jk.Measure(POINTS, A), jk.Measure(POINTS + 1.0, B))


@pytest.mark.parametrize("ridge", [0.0, DEFAULT_RIDGE, 0.1])
def test_mmd_geometry_is_the_kernel_mmd_plus_the_ridge(ridge):
    """(a - b)^T (K + ridge I)(a - b), against diagnostics.mmd's blocked kernel sums."""
    kernel = jk.Gaussian(1.5)
    mu, nu = jk.Measure(POINTS, A), jk.Measure(POINTS, B)
    expected = jk.mmd(mu, nu, kernel) ** 2 + ridge * np.sum((A - B) ** 2)
    assert jk.MMD(kernel, ridge=ridge).squared_distance(mu, nu) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [({"kernel": "gaussian"}, "needs a kernel"),
                                           ({"kernel": jk.Gaussian(1.0), "ridge": -1.0}, "ridge"),
                                           ({"kernel": jk.Gaussian(1.0), "ridge": np.inf}, "ridge")])
def test_mmd_geometry_checks_its_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jk.MMD(**kwargs)


@pytest.mark.parametrize("alpha, beta", [(0.0, 1.0), (1.0, -2.0), (np.nan, 1.0), (1.0, np.inf)])
def test_inf_convolutions_need_positive_finite_weights(alpha, beta):
    with pytest.raises(ValueError, match="positive finite"):
        jk.WFR(alpha, beta)
    with pytest.raises(ValueError, match="positive finite"):
        jk.IFT(jk.Gaussian(1.0), alpha, beta)


def test_inf_convolution_needs_a_reaction_geometry():
    with pytest.raises(ValueError, match=r"reaction geometry such as jk.Hellinger\(\) or jk.MMD"):
        jk.InfConvolution(jk.Wasserstein())


def test_wfr_and_ift_are_w2_inf_convolved_with_their_reaction():
    wfr = jk.WFR(2.0, 0.5, conserve_mass=True)
    assert (wfr.alpha, wfr.beta, wfr.has_transport, wfr.conserve_mass) == (2.0, 0.5, True, True)
    assert wfr.reaction == jk.Hellinger(conserve_mass=True)
    kernel = jk.Gaussian(1.0)
    ift = jk.IFT(kernel, 1.0, 3.0, ridge=1e-4)
    assert ift.reaction == jk.MMD(kernel, ridge=1e-4) and ift.kernel is kernel
    assert (ift.alpha, ift.beta, ift.conserve_mass) == (1.0, 3.0, False)


def test_pure_geometries_state_their_parts():
    w2, hellinger, mmd = jk.Wasserstein(), jk.Hellinger(), jk.MMD(jk.Gaussian(1.0))
    assert (w2.alpha, w2.reaction, w2.has_transport, w2.conserve_mass) == (1.0, None, True, True)
    for reaction in (hellinger, mmd):
        assert reaction.reaction is reaction and reaction.beta == 1.0
        assert not reaction.has_transport and not reaction.conserve_mass
