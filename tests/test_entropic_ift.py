"""Entropic IFT steps: well-posed linear algebra, readable warnings, bounded time (issues 19, 13).

Reference: ``jk.ConicJKO`` (the exact convex program) on the same support.
"""

import time
import warnings

import numpy as np
import ot
import pytest

import jko_ift as jk
from jko_ift.methods.base import SolverError
from jko_ift.methods.entropic import EntropicJKO
from jko_ift.methods.entropic_prox import LogEquation, low_rank_factor

#: The entropic step differs from the exact one by a bias first order in eps (docs/entropic.md
#: §4). On the 240-cell problem below, W1 to the conic step was 0.38 eps at eps = 4e-2 and 0.505
#: eps at eps = 1e-2 (the same before and after the well-posed Newton solve); 0.75 eps leaves a
#: 1.5x margin on the constant.
W1_PER_EPS = 0.75

#: The bounded-time cases below stop in well under a second on this machine; a step that ran
#: its whole iteration budget instead took minutes (issue 13, finding 5).
BOUNDED_SECONDS = 30.0


def _issue19_problem():
    """1/2 MMD^2 under IFT(Gaussian(0.6), 1, 0.7) on 240 cells of [-3, 2]; N(-1, 0.12) -> N(0.6, 0.2)
    (variances), both normalized on the grid; tau = 0.15."""
    grid = jk.Grid([-3.0], [2.0], (240,))
    x = grid.points[:, 0]

    def gauss(mean, var):
        w = np.exp(-(x - mean) ** 2 / (2 * var))
        return w / w.sum()

    mu0 = jk.Measure(grid.points, gauss(-1.0, 0.12))
    target = jk.Measure(grid.points, gauss(0.6, 0.2))
    kernel = jk.Gaussian(0.6)
    return jk.MMD2(target, kernel), jk.IFT(kernel, alpha=1.0, beta=0.7), mu0, 0.15, x


def test_ift_step_matches_the_conic_step_without_linalg_warnings():
    F, geometry, mu0, tau, x = _issue19_problem()
    eps = 1e-2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = jk.jko_step(F, geometry, mu0, tau, method=EntropicJKO(eps))
    counts = {}
    for w in caught:
        counts[w.category.__name__] = counts.get(w.category.__name__, 0) + 1
    assert "LinAlgWarning" not in counts
    assert all(count == 1 for count in counts.values()), counts  # each cause at most once a step
    exact = jk.jko_step(F, geometry, mu0, tau, method=jk.ConicJKO())
    w1 = ot.emd2_1d(x, x, result.measure.weights, exact.measure.weights, metric="euclidean")
    assert result.status == "optimal" and w1 <= W1_PER_EPS * eps


def test_newton_direction_on_the_low_rank_factor_equals_the_dense_solve():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(30, 1))
    Q = 50.0 * jk.Gaussian(1.0)(points, points)  # numerically singular
    equation = LogEquation(1.0, np.zeros(30), [], Q)
    b = np.exp(rng.uniform(-30, 0, size=30))
    diagonal = 1.0 / b
    phi = rng.normal(size=30)
    y = equation._newton_direction(diagonal, phi)
    # the scaled system I + T Q T (eigenvalues >= 1) is the well-posed reference
    T = np.sqrt(b)
    reference = -T * np.linalg.solve(np.eye(30) + T[:, None] * Q * T[None, :], T * phi)
    assert np.allclose(y, reference, rtol=1e-8, atol=1e-14 * np.abs(reference).max())
    W = low_rank_factor(Q)
    assert W.shape[1] < 30 and np.abs(W @ W.T - Q).max() <= 1e-10 * np.abs(Q).max()


def test_chord_steps_reach_the_root_of_pure_newton():
    """Repeated solves with nearby right-hand sides (as in the Sinkhorn loop) take chord steps
    with the last Newton matrix, and end at the same root as a fresh solve."""
    rng = np.random.default_rng(1)
    points = rng.normal(size=(40, 1))
    Q = 30.0 * jk.Gaussian(1.0)(points, points)
    chord = LogEquation(1.0, np.zeros(40), [], Q)
    rhs = rng.normal(size=40)
    s = chord.solve(rhs)
    for k in range(1, 6):
        nearby = rhs + 1e-3 * k * rng.normal(size=40)
        s = chord.solve(nearby, s)
        fresh = LogEquation(1.0, np.zeros(40), [], Q).solve(nearby)
        np.testing.assert_allclose(s, fresh, rtol=0, atol=1e-10)
        residual = s - nearby + Q @ np.exp(s)
        assert np.abs(residual).max() <= 1e-10
    assert chord.chord_steps > 0 and chord.unresolved == 0


def test_coupled_prox_with_no_live_point_returns_zero_weights():
    Q = jk.Gaussian(1.0)(np.zeros((3, 1)), np.zeros((3, 1)))
    s = LogEquation(1.0, np.zeros(3), [], Q).solve(np.full(3, -np.inf))
    assert np.all(s == -np.inf)


def _ou_problem():
    grid = jk.Grid([-3.0], [3.0], (20,))
    mu0 = grid.measure(lambda p: np.exp(-(p[:, 0] - 1) ** 2 / 0.5), normalize=True)
    F = jk.Potential(lambda p: 0.5 * p[:, 0] ** 2, lambda p: p) + jk.Entropy()
    return F, mu0, grid.points[:, 0]


#: At tau = 1e6 the step is argmin F up to (W2^2 + eps KL) / (2 tau): the Gibbs density
#: e^-V / Z on the grid, to about 1e-5 in the weights (observed 1e-7 at eps = 1e-2).
GIBBS_ATOL = 1e-5


@pytest.mark.filterwarnings("ignore::jko_ift.EntropicBlurWarning")
def test_large_tau_matches_the_conic_step():
    F, mu0, x = _ou_problem()
    eps = 1e-2
    start = time.perf_counter()
    result = jk.jko_step(F, jk.Wasserstein(), mu0, 100.0, method=EntropicJKO(eps))
    assert time.perf_counter() - start < BOUNDED_SECONDS
    exact = jk.jko_step(F, jk.Wasserstein(), mu0, 100.0, method=jk.ConicJKO())
    w1 = ot.emd2_1d(x, x, result.measure.weights, exact.measure.weights, metric="euclidean")
    assert w1 <= W1_PER_EPS * eps


@pytest.mark.filterwarnings("ignore::jko_ift.EntropicBlurWarning")
def test_huge_tau_gives_the_minimizer_of_the_energy():
    F, mu0, x = _ou_problem()
    result = jk.jko_step(F, jk.Wasserstein(), mu0, 1e6, method=EntropicJKO(1e-2))
    gibbs = np.exp(-0.5 * x**2)
    assert result.status == "optimal"
    assert np.allclose(result.measure.weights, gibbs / gibbs.sum(), atol=GIBBS_ATOL)


def test_tiny_eps_ift_ends_in_bounded_time():
    grid = jk.Grid([0.0, 0.0], [1.0, 1.0], (8, 8))
    mu0 = grid.measure(lambda p: np.exp(-np.sum((p - 0.3) ** 2, 1) / 0.05), normalize=True)
    target = grid.measure(lambda p: np.exp(-np.sum((p - 0.7) ** 2, 1) / 0.05), normalize=True)
    kernel = jk.Gaussian(0.3)
    start = time.perf_counter()
    result = jk.jko_step(jk.MMD2(target, kernel), jk.IFT(kernel), mu0, 0.1,
                         method=EntropicJKO(1e-8), throw=False)
    assert time.perf_counter() - start < BOUNDED_SECONDS
    assert result.status == "max_iterations" and "stopped" in result.info
    with pytest.raises(SolverError, match="Increase eps"):
        jk.jko_step(jk.MMD2(target, kernel), jk.IFT(kernel), mu0, 0.1, method=EntropicJKO(1e-8))


#: Two steps, each at marginal violation <= 1e-6, computed with different rebuild schedules of
#: the envelope's zero set: their weights differed by 2e-7 in L1 here; 1e-5 leaves a margin.
SCHEDULE_L1 = 1e-5


@pytest.mark.filterwarnings("ignore::jko_ift.EntropicBlurWarning")
def test_deferred_zero_set_rebuilds_reach_the_same_settled_step(monkeypatch):
    """The envelope's zero set is rebuilt at most once in EnvelopeProx.REBUILD_EVERY prox calls;
    the step is reported converged only on a call whose zero set satisfies the KKT conditions,
    and it is the step of a zero set rebuilt at every call (to the tolerance)."""
    from jko_ift.methods.entropic_prox import EnvelopeProx

    F, geometry, mu0, tau, _ = _issue19_problem()
    deferred = jk.jko_step(F, geometry, mu0, tau, method=EntropicJKO(1e-2))
    monkeypatch.setattr(EnvelopeProx, "REBUILD_EVERY", 1)
    monkeypatch.setattr(EnvelopeProx, "ROUNDS", 30)
    eager = jk.jko_step(F, geometry, mu0, tau, method=EntropicJKO(1e-2))
    assert deferred.status == eager.status == "optimal"
    assert deferred.info["negative_mass_clipped"] == 0.0
    assert np.abs(deferred.measure.weights - eager.measure.weights).sum() <= SCHEDULE_L1
