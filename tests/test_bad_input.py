"""Generated bad input through ``jk.jko_step`` and ``jk.solve`` for every method: either a clear
error (a ValueError or ``jk.SolverError`` whose message names what was expected and what was
received) or a correct result (finite nonnegative weights, and the dissipation inequality of
the step, or for the explicit method an energy that does not rise). Derandomized; ``-m slow``
runs more examples."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jko_ift as jk
from jko_ift.diagnostics import dissipation_slack
from jko_ift.solve import DISSIPATION_RTOL

KERNEL = jk.Gaussian(0.7)
GRID = jk.Grid([-2.0], [2.0], [8])
MU = GRID.measure(np.exp(-((GRID.points[:, 0] - 0.5) ** 2)), normalize=True)
TARGET = GRID.measure(np.exp(-(GRID.points[:, 0] ** 2) / 0.5), normalize=True)
F = jk.MMD2(TARGET, KERNEL) + 0.3 * jk.Potential(lambda x: 0.5 * (x**2).sum(1), lambda x: x)

METHODS = {
    "conic": jk.ConicJKO,
    "entropic": lambda: jk.EntropicJKO(eps=0.05),
    "particle": jk.ParticleJKO,
    "splitting": jk.Splitting,
    "explicit": jk.ExplicitEuler,
}
ALL_METHODS = pytest.mark.parametrize("make_method", list(METHODS.values()), ids=list(METHODS))
QUICK = settings(derandomize=True, max_examples=4, deadline=None)
MANY = settings(max_examples=40, deadline=None)
CLIPPING = "ignore::jko_ift.WeightClippingWarning"
LOCKING = "ignore::jko_ift.GridLockingWarning"
MASSES = "ignore::jko_ift.MassMismatchWarning"


def clear_error_or_correct(run, expected: tuple[str, ...] = (), received=None):
    """Run ``run() -> (F, mu, StepResult)``: a clear error naming ``expected`` (all of these
    words) and ``received`` (its text), or a result that passes the checks of a step."""
    try:
        energy, mu, result = run()
    except jk.SolverError as error:
        assert str(error) and error.status != "optimal"
        return "error"
    except ValueError as error:
        message = str(error)
        assert not isinstance(error, np.linalg.LinAlgError), message
        for word in expected:
            assert word in message, (word, message)
        if received is not None:
            assert received in message, (received, message)
        return "error"
    check_result(energy, mu, result)
    return "result"


def check_result(energy, mu, result):
    new = result.measure
    assert np.all(np.isfinite(new.weights)) and np.all(new.weights >= 0)
    assert np.all(np.isfinite(new.points))
    start = energy.value(mu)
    if result.status == "explicit":  # a forward step within its stability limit: F does not rise
        assert energy.value(new) <= start + 1e-9 * max(1.0, abs(start))
        return
    slack = dissipation_slack(energy, mu, result.info.get("regularized_objective", result.objective))
    assert slack >= -DISSIPATION_RTOL * max(1.0, abs(start))


def step(make_method, tau=0.1, energy=F, geometry=None, mu=MU):
    geometry = jk.Wasserstein() if geometry is None else geometry
    return lambda: (energy, mu, jk.jko_step(energy, geometry, mu, tau, method=make_method()))


# ------------------------------------------------------------------------------------------------
# tau
# ------------------------------------------------------------------------------------------------

#: Not a positive finite number: refused by every method, naming tau and the value.
not_positive = st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf, -math.inf]))
not_a_number = st.sampled_from(["0.1", None, True, 1j, [0.1], np.array([0.1, 0.2])])
#: Valid but extreme: a clear error (a solver that cannot) or a correct step.
extreme = st.one_of(st.floats(1e-300, 1e-9), st.floats(1e3, 1e8))


@ALL_METHODS
@QUICK
@given(tau=not_positive)
def test_tau_not_positive(make_method, tau):
    assert clear_error_or_correct(step(make_method, tau), ("tau", "positive")) == "error"


@ALL_METHODS
@QUICK
@given(tau=not_a_number)
def test_tau_not_a_number(make_method, tau):
    assert clear_error_or_correct(step(make_method, tau), ("tau", "positive")) == "error"


@pytest.mark.filterwarnings(CLIPPING, LOCKING)
@pytest.mark.parametrize(
    "make_method", [jk.ConicJKO, jk.Splitting, jk.ExplicitEuler], ids=["conic", "splitting", "explicit"]
)
@settings(derandomize=True, max_examples=3, deadline=None)
@given(tau=extreme)
def test_tau_extreme(make_method, tau):
    clear_error_or_correct(step(make_method, tau))


@pytest.mark.slow
@pytest.mark.filterwarnings(CLIPPING, LOCKING)
@ALL_METHODS
@MANY
@given(tau=extreme)
def test_tau_extreme_many(make_method, tau):
    clear_error_or_correct(step(make_method, tau))


# ------------------------------------------------------------------------------------------------
# weights and points: refused when the measure is built, before any method sees them
# ------------------------------------------------------------------------------------------------

bad_entry = st.sampled_from([math.nan, math.inf, -math.inf]) | st.floats(max_value=-1e-300)
weights_with_bad = st.tuples(
    st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8), st.integers(0, 7), bad_entry
).map(lambda t: [*t[0][: t[1]], t[2], *t[0][t[1] + 1 :]])


@QUICK
@given(weights=weights_with_bad)
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match="weights") as error:
        jk.Measure(GRID.points, np.array(weights))
    assert any(word in str(error.value) for word in ("finite", "nonnegative"))


@QUICK
@given(length=st.integers(0, 20).filter(lambda n: n != 8))
def test_mismatched_weights_are_refused(length):
    with pytest.raises(ValueError, match=rf"shape \(8,\).*got shape \({length},\)"):
        jk.Measure(GRID.points, np.ones(length))


def test_empty_and_massless_measures_are_refused():
    with pytest.raises(ValueError, match=r"n >= 1, got shape \(0, 1\)"):
        jk.Measure(np.zeros((0, 1)), np.zeros(0))
    for make_method in METHODS.values():
        assert (
            clear_error_or_correct(step(make_method, mu=MU.with_weights(np.zeros(8))), ("zero total mass",))
            == "error"
        )


def test_complex_weights_are_refused():
    with pytest.raises(ValueError, match="weights"):
        jk.Measure(GRID.points, np.ones(8) * (1 + 1j))


@ALL_METHODS
def test_dimension_mismatch(make_method):
    """A measure in 2-D against a 1-D target: refused, naming the dimensions or the support."""
    grid = jk.Grid([-1.0, -1.0], [1.0, 1.0], [3, 3])
    mu = grid.measure(np.ones(9), normalize=True)
    assert clear_error_or_correct(step(make_method, mu=mu)) == "error"


# ------------------------------------------------------------------------------------------------
# wrong types for F, geometry and method; unknown solver names and options
# ------------------------------------------------------------------------------------------------

not_an_energy = st.sampled_from([None, "entropy", 3, 0.5, lambda x: x, jk.Wasserstein(), KERNEL])
not_a_geometry = st.sampled_from([None, "W2", 3, KERNEL, jk.Entropy()])


@ALL_METHODS
@QUICK
@given(energy=not_an_energy)
def test_energy_of_wrong_type(make_method, energy):
    assert clear_error_or_correct(step(make_method, energy=energy), ("F must be",), "got") == "error"


@ALL_METHODS
@QUICK
@given(geometry=not_a_geometry)
def test_geometry_of_wrong_type(make_method, geometry):
    run = lambda: (F, MU, jk.jko_step(F, geometry, MU, 0.1, method=make_method()))  # noqa: E731
    assert clear_error_or_correct(run, ("geometry must be",), "got") == "error"


@pytest.mark.parametrize("method", ["conic", 3, object(), jk.ConicJKO, jk.Splitting, jk.Entropy()])
def test_method_of_wrong_type(method):
    run = lambda: (F, MU, jk.jko_step(F, jk.Wasserstein(), MU, 0.1, method=method))  # noqa: E731
    assert clear_error_or_correct(run, ("method must be",), "got") == "error"
    with pytest.raises(ValueError, match="method must be"):
        jk.solve(F, jk.Wasserstein(), MU, 0.1, steps=1, method=method, progress=False)


names = st.text(st.characters(min_codepoint=33, max_codepoint=122), min_size=1, max_size=8)


@QUICK
@given(name=names.filter(lambda s: s.upper() not in ("CLARABEL", "SCS")))
def test_unknown_solver_names(name):
    with pytest.raises(ValueError, match=r"unknown solver .*supports"):
        jk.ConicJKO(solver=name)


@QUICK
@given(
    key=st.from_regex(r"[a-z][a-z_]{0,9}", fullmatch=True),
    value=st.one_of(st.integers(), st.text(max_size=3)),
)
def test_unknown_solver_options(key, value):
    from jko_ift.methods.options import CLARABEL_SETTINGS

    if key in CLARABEL_SETTINGS:
        return
    with pytest.raises(ValueError, match=f"unknown CLARABEL setting '{key}'. The allowed settings"):
        jk.ConicJKO(solver_options={key: value})


@QUICK
@given(
    option=st.sampled_from(["gap_tol", "radius", "cache_size"]),
    value=st.sampled_from([-1.0, 0.0, math.nan, "x", None, [1]]),
)
def test_bad_conic_options(option, value):
    if value is None and option in ("gap_tol", "radius"):
        return  # None: the default
    with pytest.raises(ValueError, match=option):
        jk.ConicJKO(**{option: value})


# ------------------------------------------------------------------------------------------------
# jk.solve: run lengths and stopping rules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("steps", {"steps": -1}),
        ("steps", {"steps": 0}),
        ("steps", {"steps": 2.5}),
        ("steps", {"steps": "3"}),
        ("t_final", {"steps": None, "t_final": -1.0}),
        ("t_final", {"steps": None, "t_final": math.nan}),
        ("t_final", {"steps": None, "t_final": math.inf}),
        ("stop_energy", {"stop_energy": "x"}),
        ("stop_energy", {"stop_energy": math.nan}),
        ("stop_rate", {"stop_rate": [1.0]}),
        ("callback", {"callback": 3}),
    ],
)
def test_solve_run_options(name, kwargs):
    arguments = {"steps": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        jk.solve(F, jk.Wasserstein(), MU, 0.1, method=jk.ConicJKO(), progress=False, **arguments)


@pytest.mark.filterwarnings(CLIPPING, LOCKING)
@ALL_METHODS
def test_solve_with_bad_input_is_refused_before_any_step(make_method):
    for tau in (0.0, math.nan, "x"):
        with pytest.raises(ValueError, match="tau"):
            jk.solve(F, jk.Wasserstein(), MU, tau, steps=2, method=make_method(), progress=False)
    with pytest.raises(ValueError, match="F must be"):
        jk.solve("entropy", jk.Wasserstein(), MU, 0.1, steps=2, method=make_method(), progress=False)


@pytest.mark.parametrize("tau", [1e30, 1e300])
def test_entropic_huge_tau_is_a_clear_failure(tau):
    """The coupled KL-proximal Newton lost I + V^T V's definiteness to round-off and ended in
    numpy's LinAlgError; it now reports a step that did not converge."""
    outcome = clear_error_or_correct(step(METHODS["entropic"], tau))
    assert outcome in ("error", "result")
