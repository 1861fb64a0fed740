"""The method protocol: statuses and their advice, declared capabilities, explicit state, and
one meaning of StepResult.objective for every method."""

import dataclasses
import json

import numpy as np
import pytest

import jko_ift as jk
from jko_ift.methods import Method, MethodState, Status, StepResult
from jko_ift.methods.base import OK_STATUSES

#: The grid problem is coarse on purpose (quick); its steps' grid locking is not under test here.
pytestmark = pytest.mark.filterwarnings("ignore::jko_ift.methods.GridLockingWarning")

KERNEL = jk.Gaussian(1.0)
RNG = np.random.default_rng(0)
TARGET = jk.Measure(RNG.normal(size=(8, 2)), np.full(8, 1 / 8))
CLOUD = jk.Measure(RNG.normal(size=(8, 2)) + 0.5, np.full(8, 1 / 8))
GRID = jk.Grid([-2], [2], [24])
GRID_MU = GRID.measure(lambda x: np.exp(-((x[:, 0] - 0.5) ** 2)), normalize=True)
GRID_TARGET = GRID.measure(lambda x: np.exp(-(x[:, 0] ** 2) / 0.5), normalize=True)

METHODS = [jk.ConicJKO(), jk.EntropicJKO(eps=1e-2), jk.ParticleJKO(), jk.Splitting(),
           jk.Splitting(order=2), jk.ExplicitEuler()]


# ------------------------------------------------------------------------------ Status
def test_status_is_its_string_and_carries_advice():
    assert Status.OPTIMAL == "optimal" and Status("optimal") is Status.OPTIMAL
    assert json.dumps({"status": Status.MAX_ITERATIONS}) == '{"status": "max_iterations"}'
    assert {"optimal": 1}[Status.OPTIMAL] == 1 and f"{Status.DIVERGED}" == "diverged"
    assert repr(Status.UNSTABLE) == "'unstable'"
    assert Status("not_converged") is Status.MAX_ITERATIONS  # one meaning, one name
    for member in Status:
        assert isinstance(member.advice, str) and len(member.advice) > 20
    assert {s for s in Status if s.ok} == set(OK_STATUSES) == {Status.OPTIMAL, Status.EXPLICIT}
    with pytest.raises(ValueError):
        Status("sort_of_optimal")
    assert Status.of_solver("infeasible") is Status.INFEASIBLE
    assert Status.of_solver("something new") is Status.SOLVER_ERROR


def test_step_results_and_errors_hold_statuses():
    result = StepResult.failed("not_converged", {})
    assert result.status is Status.MAX_ITERATIONS and not result.ok
    error = jk.SolverError("no", "unstable", result)
    assert error.status is Status.UNSTABLE and "stability limit" in error.advice
    with pytest.raises(ValueError):
        StepResult.failed("almost", {})


def test_build_computes_the_objective_of_the_jko_problem():
    F = jk.MMD2(TARGET, KERNEL)
    result = StepResult.build(F, CLOUD, 0.25, 0.3, "optimal", 1e-9, {"a": 1})
    assert result.energy == F.value(CLOUD)
    assert result.objective == result.energy + 0.3 / 0.5


# ------------------------------------------------------------------------------ capabilities
@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_every_method_declares_its_capabilities(method):
    assert isinstance(method, Method)
    assert isinstance(method.keeps_support, bool)
    assert method.keeps_support == isinstance(method, (jk.ConicJKO, jk.EntropicJKO))
    expected = 3 if isinstance(method, jk.Splitting) and method.order == 2 else 2
    assert method.local_error_order == expected


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_settings_are_frozen(method):
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.tol = 1.0


# ------------------------------------------------------------------------------ objective
def problem(method):
    if method.keeps_support:
        return jk.KL(GRID_TARGET), jk.WFR(0.5, 1.0), GRID_MU
    return jk.MMD2(TARGET, KERNEL), jk.IFT(KERNEL), CLOUD


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_objective_is_F_plus_the_step_distance_over_two_tau(method):
    F, geometry, mu = problem(method)
    tau = 0.05
    result = jk.jko_step(F, geometry, mu, tau, method=method)
    assert result.ok
    assert result.energy == pytest.approx(F.value(result.measure), rel=1e-12)
    assert result.objective == result.energy + result.distance_sq / (2 * tau)
    if isinstance(method, jk.EntropicJKO):  # its own term is reported, not mixed in
        regularized = result.info["regularized_objective"]
        assert regularized == pytest.approx(
            result.objective + result.info["entropic_term"] / (2 * tau * geometry.alpha))


def test_an_explicit_step_says_it_solved_nothing():
    F, geometry, mu = problem(jk.ExplicitEuler())
    result = jk.ExplicitEuler().step(F, geometry, mu, 0.05)
    assert result.status == Status.EXPLICIT and result.ok and result.certificate == 0
    assert "time-stepping" in result.status.advice


def test_info_is_complete_at_construction():
    """The methods build info before the result: a later change would leak into records."""
    F, geometry, mu = problem(jk.ConicJKO())
    result = jk.ConicJKO().step(F, geometry, mu, 0.05)
    assert "compiled" in result.info and "moved_fraction" in result.info


# ------------------------------------------------------------------------------ state
def test_advance_leaves_the_state_it_was_given():
    method = jk.ExplicitEuler(noise=0.5, seed=3)
    F, geometry, mu = problem(method)
    state = method.init_state(F, geometry, mu)
    first, after = method.advance(F, geometry, mu, 0.05, state)
    again, _ = method.advance(F, geometry, mu, 0.05, state)
    assert state.steps == 0 and after.steps == 1
    np.testing.assert_array_equal(first.measure.points, again.measure.points)
    second, _ = method.advance(F, geometry, first.measure, 0.05, after)
    by_step = jk.ExplicitEuler(noise=0.5, seed=3)
    r1 = by_step.step(F, geometry, mu, 0.05)
    r2 = by_step.step(F, geometry, r1.measure, 0.05)
    np.testing.assert_array_equal(second.measure.points, r2.measure.points)
    assert by_step.steps_taken == 2
    by_step.reset()
    assert by_step.steps_taken == 0
    with pytest.raises(ValueError, match="MethodState"):
        method.advance(F, geometry, mu, 0.05, {"steps": 0})


def test_caches_are_keyed_by_the_energy_itself_not_its_id():
    """Two energies built one after the other can share an id; their programs must not."""
    method = jk.ConicJKO()
    state = method.init_state()
    for shift in (0.0, 0.7):
        target = GRID.measure(lambda x, s=shift: np.exp(-((x[:, 0] - s) ** 2)), normalize=True)
        result, state = method.advance(jk.KL(target), jk.Hellinger(), GRID_MU, 0.1, state)
        fresh = jk.ConicJKO().step(jk.KL(target), jk.Hellinger(), GRID_MU, 0.1)
        np.testing.assert_allclose(result.measure.weights, fresh.measure.weights, atol=1e-9)
    assert isinstance(state, MethodState) and len(state.cache["programs"]) == 2
