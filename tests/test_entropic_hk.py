"""EntropicJKO(wfr_cost="hellinger_kantorovich"): the WFR step with the exact HK distance.

HK_{alpha,beta}^2 = (4 / beta) LET with the cost -log cos^2(min(|x - y| / ell, pi / 2)),
ell = 2 sqrt(alpha / beta) (docs/entropic.md §2b). Independent references: closed forms of the
LET problem (pure rescaling: (4 / beta) sum (sqrt a - sqrt b)^2 = He^2 / beta; a Dirac moved by
d: (8 / beta)(1 - cos(d / ell)) = d^2 / alpha + O(d^4)), ConicJKO on isolated points (where HK
and the inf-convolution are both the Hellinger distance), and the inf-convolution step of
EntropicJKO as tau -> 0 (both are consistent with d_t mu = alpha div(mu grad f) - beta mu f).
"""

import warnings

import numpy as np
import pytest

import jko_ift as jk
from jko_ift.methods.entropic import EntropicBlurWarning, EntropicJKO
from jko_ift.methods.gibbs import HKGibbs

HK = "hellinger_kantorovich"

#: 1-D grid of spacing h = 0.03 (h^2 = 9e-4 < eps = 2e-3 below: no grid locking).
GRID = jk.Grid([-3], [3], [200])


def blob(c, sd, mass=1.0):
    mu = GRID.measure(lambda x: np.exp(-((x - c) ** 2).sum(1) / (2 * sd**2)), normalize=True)
    return mu.with_weights(mass * mu.weights)


MU = blob(0.8, 0.7)
TARGET = blob(-0.5, 0.6, 1.5)


def quiet_step(method, F, geometry, mu, tau):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EntropicBlurWarning)
        return method.step(F, geometry, mu, tau)


# --------------------------------------------------------------------------------------------
# (a) the HK cost (the static LET value is diagnostics.hellinger_kantorovich_sq: test_diagnostics)
# --------------------------------------------------------------------------------------------


def test_hk_cost_is_infinite_beyond_ell_pi_over_2():
    ell = 0.5
    points = np.array([[0.0], [0.3], [0.5 * np.pi * ell + 1e-9]])
    op = HKGibbs(points, 1e-2, ell)
    cost = op._cost_rows(slice(0, 3))
    assert cost[0, 1] == pytest.approx(-2 * ell**2 * np.log(np.cos(0.3 / ell)))
    assert np.isinf(cost[0, 2]) and cost[0, 0] == 0.0
    out = op.log_apply(np.array([0.0, -np.inf, -np.inf]))
    assert out[2] == -np.inf and np.isfinite(out[:2]).all()


# --------------------------------------------------------------------------------------------
# (b) the step: Hellinger limit and first-order agreement with the inf-convolution step
# --------------------------------------------------------------------------------------------


def test_isolated_points_match_the_conic_hellinger_step():
    """Points beyond ell pi / 2: no transport, HK = He / sqrt(beta); ConicJKO is exact there.
    The entropic bias is the eps' = eps beta / (4 alpha) = 5e-4 pull of the plan towards a
    (observed 6e-5 in the weights): 5e-4 allowed."""
    points = np.arange(5.0)[:, None] * 10
    mu = jk.Measure(points, np.array([1.0, 0.5, 2.0, 0.3, 1.2]))
    F = jk.KL(jk.Measure(points, np.array([0.4, 1.0, 1.0, 1.5, 1.2])))
    geometry = jk.WFR(1.0, 2.0)
    hk = quiet_step(EntropicJKO(1e-3, tol=1e-11, wfr_cost=HK), F, geometry, mu, 0.05)
    exact = jk.ConicJKO(radius=np.inf).step(F, geometry, mu, 0.05)
    assert hk.ok and hk.info["wfr_cost"] == HK
    np.testing.assert_allclose(hk.measure.weights, exact.measure.weights, atol=5e-4)
    assert hk.objective == pytest.approx(exact.objective, abs=5e-4)


def test_small_steps_agree_with_the_inf_convolution_to_first_order():
    """Both steps are consistent with d_t mu = alpha div(mu grad f) - beta mu f, so
    |b_HK - b_IC| = O(tau^2) and, relative to the displacement |b - a| = O(tau), O(tau).

    Same eps = 2e-3 (above h^2 = 9e-4: no grid locking) for both, so the entropic blur is the
    same kernel; observed relative differences 0.025, 0.015, 0.0083 at tau = 0.025, 0.0125,
    0.00625 (local orders 0.72, 0.85, tending to 1; of the difference itself 1.6, 1.8)."""
    F, geometry = jk.KL(TARGET), jk.WFR(1.0, 2.0)
    taus = [0.025, 0.0125, 0.00625]
    relative, differences = [], []
    for tau in taus:
        hk = quiet_step(EntropicJKO(2e-3, tol=1e-9, wfr_cost=HK), F, geometry, MU, tau)
        ic = quiet_step(EntropicJKO(2e-3, tol=1e-9), F, geometry, MU, tau)
        assert hk.ok and ic.ok
        difference = np.abs(hk.measure.weights - ic.measure.weights).sum()
        differences.append(difference)
        relative.append(difference / np.abs(ic.measure.weights - MU.weights).sum())
    orders = np.log2(np.array(relative[:-1]) / np.array(relative[1:]))
    assert relative[-1] < 0.012
    assert np.all(orders > 0.6)
    assert np.all(np.log2(np.array(differences[:-1]) / np.array(differences[1:])) > 1.5)


# --------------------------------------------------------------------------------------------
# (c) mass and dissipation
# --------------------------------------------------------------------------------------------


def test_conserved_mass_and_dissipation():
    geometry = jk.WFR(1.0, 2.0, conserve_mass=True)
    F = jk.KL(TARGET)
    method = EntropicJKO(2e-3, tol=1e-9, wfr_cost=HK)
    mu = MU
    for _ in range(3):
        result = quiet_step(method, F, geometry, mu, 0.05)
        assert result.ok
        assert result.measure.mass == pytest.approx(MU.mass, rel=1e-12)
        assert result.energy < F.value(mu)
        mu = result.measure


def test_dissipation_inequality_up_to_the_entropic_term():
    """The step minimizes F(b) + lam [LET(gamma; a, b) + eps' KL(gamma | R)], lam = 2 / (tau beta),
    R_ij = a_i / Z_i; the comparator gamma = diag(a), b = a costs F(a) + lam eps' sum a log Z."""
    tau, eps, alpha, beta = 0.05, 2e-3, 1.0, 2.0
    geometry, F = jk.WFR(alpha, beta), jk.KL(TARGET)
    result = quiet_step(EntropicJKO(eps, tol=1e-10, wfr_cost=HK), F, geometry, MU, tau)
    ell = 2 * np.sqrt(alpha / beta)
    log_z = HKGibbs(MU.points, eps, ell).log_apply(np.zeros(MU.n))
    slack = 2 / (tau * beta) * eps / ell**2 * float(MU.weights @ log_z)
    assert result.info["regularized_objective"] <= F.value(MU) + slack + 1e-9
    assert result.energy + result.distance_sq / (2 * tau) <= (
        F.value(MU) + slack - result.info["entropic_term"] + 1e-9)
    assert result.energy < F.value(MU)
    assert np.all(result.measure.weights > 0)


def test_zero_energy_leaves_the_measure_nearly_unchanged():
    """F = 0: the step is the entropic blur only; mass within O(eps') = 1e-3 relative."""
    zero = jk.Potential(lambda x: np.zeros(len(x)), lambda x: np.zeros_like(x))
    result = quiet_step(EntropicJKO(2e-3, tol=1e-10, wfr_cost=HK), zero, jk.WFR(1.0, 2.0), MU, 0.5)
    assert result.measure.mass == pytest.approx(MU.mass, rel=1e-3)
    assert np.abs(result.measure.weights - MU.weights).sum() < 0.02


# --------------------------------------------------------------------------------------------
# (d) options
# --------------------------------------------------------------------------------------------


def test_bad_wfr_cost_is_refused():
    with pytest.raises(ValueError, match="wfr_cost"):
        EntropicJKO(1e-2, wfr_cost="hk")
    assert EntropicJKO(1e-2).wfr_cost == "inf_convolution"


def test_coupled_energy_is_refused():
    F = jk.MMD2(TARGET, jk.Gaussian(1.0))
    with pytest.raises(ValueError, match="separable"):
        quiet_step(EntropicJKO(2e-3, wfr_cost=HK), F, jk.WFR(), MU, 0.05)


def test_other_geometries_ignore_the_option():
    F = jk.KL(TARGET.normalized())
    a = quiet_step(EntropicJKO(2e-3, tol=1e-9, wfr_cost=HK), F, jk.Wasserstein(), MU, 0.05)
    b = quiet_step(EntropicJKO(2e-3, tol=1e-9), F, jk.Wasserstein(), MU, 0.05)
    np.testing.assert_array_equal(a.measure.weights, b.measure.weights)
