"""Error-controlled step sizes: tolerance tracking, step-size shape, rejections, stopping."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import assert_same_run, stop_after

import jko_ift as jk
from jko_ift.solve import RunState
from jko_ift.studies import work_precision

KERNEL = jk.Gaussian(1.0)
GRID = jk.Grid(-3, 3, 30)
MU0 = GRID.measure(lambda x: np.exp(-((x[:, 0] - 1.5) ** 2) / 0.5), normalize=True)
TARGET = GRID.measure(lambda x: np.exp(-((x[:, 0] + 1) ** 2) / 0.8), normalize=True)
F = jk.MMD2(TARGET, KERNEL)
GEOMETRY = jk.MMD(KERNEL)
T_FINAL = 5.0
#: The extrapolation estimate and the true local error agree to leading order in tau; their
#: ratio is 1 + O(tau) (measured: 1.022 at tau = 0.02, 1.003 at 0.005, 1.12 at 0.1).
LOCAL_ERROR_RTOL = 0.05
#: Absolute tolerance of the weights (a mass per cell): the 30 cells carry 1/30 on average, so
#: rtol * 1/30 >= 3e-6 dominates where the mass is for every rtol used (>= 1e-4); cells without
#: mass (the Gaussians' tails, down to 1e-18) get this floor instead of no tolerance at all.
WEIGHT_ATOL = 1e-8


def exact(t):
    """The MMD flow of 1/2 MMD^2: pi + e^{-t} (mu0 - pi) (DESIGN section 2)."""
    return TARGET.with_weights(TARGET.weights + np.exp(-t) * (MU0.weights - TARGET.weights))


def max_error(trajectory):
    return max(jk.mmd(mu, exact(t), KERNEL) for t, mu in zip(trajectory.times, trajectory.measures,
                                                              strict=True))


def adaptive(rtol, **kwargs):
    controller = jk.StepController(rtol=rtol, atol=WEIGHT_ATOL, **kwargs.pop("controller", {}))
    return jk.solve(F, GEOMETRY, MU0, t_final=T_FINAL, controller=controller, progress=False,
                    **kwargs)


def test_global_error_tracks_the_tolerance_over_three_decades():
    rtols = [1e-1, 1e-2, 1e-3, 1e-4]
    errors = [max_error(adaptive(rtol)) for rtol in rtols]
    assert np.all(np.diff(errors) < 0)
    # a first-order method under error-per-step control: local error ~ tau^2 = tol, so the
    # global error ~ tau ~ sqrt(tol): slope 1/2 in log-log
    slope = jk.convergence_order(rtols, errors).order
    assert 0.35 <= slope <= 0.7, slope


def test_fast_then_slow_flow_gets_small_steps_early_and_large_late():
    trajectory = adaptive(1e-3)
    taus = trajectory.taus[:-1]  # the last one is cut to land on t_final
    assert taus[:3].mean() < 0.2 * taus[-3:].mean()
    assert trajectory.stop_reason == "t_final"
    assert trajectory.times[-1] == pytest.approx(T_FINAL)


@pytest.mark.parametrize("estimate", ["extrapolation", "doubling"])
def test_rejected_steps_leave_no_state_behind(estimate):
    trajectory = adaptive(1e-3, controller={"tau0": 2.0, "estimate": estimate})  # far too large
    accepted = [s for s in trajectory.stats if s["accepted"]]
    rejected = [s for s in trajectory.stats if not s["accepted"]]
    assert rejected and rejected[0]["error"] > 1
    assert len(trajectory) == len(accepted) + 1
    np.testing.assert_allclose(trajectory.times[1:], np.cumsum([s["tau"] for s in accepted]))
    assert all(s["error"] <= 1 for s in accepted)
    # step doubling solves three problems an attempt; extrapolation one, once it has a history
    kinds = [s["estimate"] for s in trajectory.stats]
    first_accepted = [s["accepted"] for s in trajectory.stats].index(True)
    assert set(kinds[:first_accepted + 1]) == {"doubling"}  # no history before it
    expected = "doubling" if estimate == "doubling" else "extrapolation"
    assert set(kinds[first_accepted + 1:]) == {expected}
    assert [s["solves"] for s in trajectory.stats] == [3 if k == "doubling" else 1 for k in kinds]


@pytest.mark.parametrize("distance", ["rms", "mmd"])
def test_extrapolation_estimate_matches_the_true_local_error(distance):
    """From exact states mu(t - sigma), mu(t), one JKO step of tau: the estimate
    tau/(2 tau + sigma) * |y^{k+1} - extrapolation| against |y^{k+1} - y(t + tau)|, whose ratio
    tends to 1 as tau -> 0 (both are tau^2 y''/2 to leading order); y is the kernel mean
    embedding K a at the cells for the componentwise norm of an MMD geometry, the measure for
    the MMD distance."""
    controller = jk.StepController(rtol=1.0, atol=0.0, distance=distance)
    norm = controller.norm(GEOMETRY, MU0, fixed_support=True)
    t = 0.5
    for tau, sigma in [(0.02, 0.02), (0.01, 0.02), (0.02, 0.01)]:
        new = jk.jko_step(F, GEOMETRY, exact(t), tau).measure
        _, estimate = norm.extrapolation(new, exact(t), exact(t - sigma), tau, sigma)
        if distance == "rms":
            true = rms(KERNEL.apply(GRID.points, GRID.points, new.weights - exact(t + tau).weights))
        else:
            true = jk.mmd(new, exact(t + tau), KERNEL)
        assert estimate == pytest.approx(true, rel=LOCAL_ERROR_RTOL), (tau, sigma)


def rms(vector):
    return float(np.sqrt(np.mean(np.asarray(vector) ** 2)))


def test_extrapolation_needs_fewer_solves_than_doubling_for_a_similar_error():
    runs = {estimate: adaptive(1e-3, controller={"estimate": estimate})
            for estimate in ("extrapolation", "doubling")}
    errors = {estimate: max_error(run) for estimate, run in runs.items()}
    assert runs["extrapolation"].step_solves < 0.6 * runs["doubling"].step_solves
    assert errors["extrapolation"] < 3 * errors["doubling"]


def test_particles_take_the_lagrangian_estimate():
    """W2 flow of a quadratic potential on particles: x_i(t) = x_i(0) e^{-t}; the estimate
    extrapolates positions particle by particle."""
    rng = np.random.default_rng(0)
    mu0 = jk.Measure(rng.normal(size=(8, 2)) + 2.0, np.full(8, 1 / 8))
    energy = jk.Potential(lambda x: 0.5 * (x**2).sum(1), lambda x: x)
    errors = []
    for rtol in (1e-1, 1e-2):
        controller = jk.StepController(rtol=rtol, atol=0.0)
        run = jk.solve(energy, jk.Wasserstein(), mu0, t_final=2.0, controller=controller,
                       method=jk.ParticleJKO(), progress=False)
        first_accepted = [s["accepted"] for s in run.stats].index(True)
        assert {s["estimate"] for s in run.stats[first_accepted + 1:]} == {"extrapolation"}
        errors.append(np.abs(run.final.points - mu0.points * np.exp(-2.0)).max())
    assert errors[1] < 0.5 * errors[0]


def test_save_at_saves_exactly_there():
    save_at = [0.5, 1.0, 2.5]
    trajectory = adaptive(1e-2, save_at=save_at)
    np.testing.assert_allclose(trajectory.times, [0.0, *save_at, T_FINAL])
    fixed = jk.solve(F, GEOMETRY, MU0, tau=0.5, t_final=T_FINAL, save_at=save_at, progress=False)
    np.testing.assert_allclose(fixed.times, [0.0, *save_at, T_FINAL])
    with pytest.raises(ValueError, match="multiples of tau"):
        jk.solve(F, GEOMETRY, MU0, tau=0.3, t_final=T_FINAL, save_at=save_at, progress=False)


def test_tau_min_too_large_for_the_tolerance_is_an_error_that_says_what_to_change():
    with pytest.raises(jk.SolverError, match=r"tau_min.*loosen rtol/atol or lower tau_min"):
        adaptive(1e-6, controller={"tau_min": 0.1, "tau0": 0.2})


def test_stopping_at_stationarity_or_an_energy_level():
    by_rate = jk.solve(F, GEOMETRY, MU0, tau=0.25, t_final=20.0, stop_rate=1e-3, progress=False)
    assert by_rate.stop_reason == "stationary"
    assert by_rate.times[-1] < 20.0
    rate = (by_rate.energies[-2] - by_rate.energies[-1]) / 0.25
    assert rate < 1e-3
    level = 0.5 * F.value(MU0) * np.exp(-4.0)
    by_energy = adaptive(1e-2, stop_energy=level)
    assert by_energy.stop_reason == "energy"
    assert by_energy.energies[-1] <= level < by_energy.energies[-2]


@pytest.mark.filterwarnings("ignore::jko_ift.GridLockingWarning")
def test_wasserstein_flow_on_a_grid_controls_the_weights():
    """On a fixed grid the state is the weights: the default norm is their componentwise RMS
    (for both estimates); W2 works with step doubling and is refused for extrapolation, whose
    predicted measure has signed weights, with the way out."""
    grid = jk.Grid(-4, 4, 60)
    mu0 = grid.measure(lambda x: np.exp(-((x[:, 0] - 1) ** 2) / 2), normalize=True)
    fokker_planck = jk.Entropy() + jk.Potential(lambda x: 0.5 * x[:, 0] ** 2, lambda x: x)

    def run(**options):
        controller = jk.StepController(rtol=0.05, atol=1e-6, tau0=0.2, **options)
        return jk.solve(fokker_planck, jk.Wasserstein(), mu0, t_final=0.6, controller=controller,
                        progress=False)

    default = run()
    assert all(s["error_distance"] > 0 for s in default.stats)
    assert "extrapolation" in {s["estimate"] for s in default.stats}
    norm = jk.StepController().norm(jk.Wasserstein(), mu0, fixed_support=True)
    assert (norm.state.positions, norm.state.weights, norm.state.kernel) == (False, True, None)
    by_w2 = run(estimate="doubling", distance="w2")
    assert all(s["error_distance"] > 0 for s in by_w2.stats)
    with pytest.raises(ValueError, match="use distance='rms' or 'mmd', or estimate='doubling'"):
        run(distance="w2")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rtol": -1.0}, "rtol"), ({"rtol": 0.0, "atol": 0.0}, "rtol > 0 or atol > 0"),
     ({"tau_min": 1.0, "tau_max": 0.5}, "tau_min < tau_max"), ({"distance": "l2"}, "unknown distance"),
     ({"estimate": "richardson"}, "unknown estimate"),
     ({"distance": lambda mu, nu: 0.0}, "estimate='doubling'"),
     ({"error_order": 1.0}, "local error order > 1"), ({"pcoeff": -0.1}, "pcoeff"),
     ({"pcoeff": 0.0, "icoeff": 0.0}, "icoeff \\+ pcoeff > 0")],
)
def test_controller_input_is_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jk.StepController(**kwargs)


def test_adaptive_run_needs_t_final():
    with pytest.raises(ValueError, match="needs t_final"):
        jk.solve(F, GEOMETRY, MU0, steps=3, controller=jk.StepController(), progress=False)
    with pytest.raises(ValueError, match="give tau"):
        jk.solve(F, GEOMETRY, MU0, t_final=1.0, progress=False)


def test_solver_failures_that_smaller_steps_do_not_cure_end_the_run():
    method = jk.ConicJKO(solver="SCS", solver_options={"max_iters": 2})
    controller = jk.StepController(rtol=1e-2)
    with pytest.raises(jk.SolverError, match="in a row were not certified"):
        jk.solve(F, GEOMETRY, MU0, t_final=1.0, controller=controller, method=method, progress=False)
    trajectory = jk.solve(F, GEOMETRY, MU0, t_final=1.0, controller=controller, method=method,
                          progress=False, throw=False)
    assert trajectory.stop_reason == "failed"
    assert len(trajectory) == 1 and len(trajectory.stats) == 4


# ---------------------------------------------------------------- the W2 flow of a quadratic potential
#: V = |x - m|^2 / 2 under W2: x(t) = m + e^{-t} (x0 - m) particle by particle (weights fixed).
QUADRATIC_MINIMUM = np.array([1.0, 0.5])
QUADRATIC = jk.Potential(lambda x: 0.5 * ((x - QUADRATIC_MINIMUM) ** 2).sum(1),
                         lambda x: x - QUADRATIC_MINIMUM)
#: How much cheaper (fixed step solves for the same error over adaptive ones) the adaptive runs
#: must be; measured 1.29, 1.37, 1.38 at rtol 1e-2, 1e-3, 1e-4 on 10 particles to t = 4 (steps
#: growing like e^{t/2} against fixed ones would give 1.70 there: docs/adaptive.md).
MIN_ADVANTAGE = 1.1
#: How much the steps must grow from the start of the run to its end: measured 2.59, 2.54, 2.82
#: (the tolerance rtol |x| falls with |x| from about 3.6 to 1.1 while the local error falls like
#: e^{-t}; e^{t/2} alone would give about 5 between t = 0.5 and 3.5).
MIN_STEP_GROWTH = 1.5


def quadratic_particles(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return jk.Measure(rng.normal(size=(n, 2)) * 0.5 + [3.0, 2.0], np.full(n, 1 / n))


def test_steps_grow_and_beat_fixed_steps_on_the_w2_flow_of_a_quadratic_potential():
    """The local error tau^2 |x''| / 2 decays like e^{-t} while the tolerance atol + rtol |x|
    stays of the size of |m|: the steps grow like e^{t/2}, and the run reaches each rtol's error
    with fewer step solves than fixed steps need for it (log-log interpolation)."""
    mu0 = quadratic_particles()

    def exact(t):
        return QUADRATIC_MINIMUM + np.exp(-t) * (mu0.points - QUADRATIC_MINIMUM)

    def error(trajectory):
        return max(np.sqrt(mu.weights @ ((mu.points - exact(t)) ** 2).sum(1))
                   for t, mu in zip(trajectory.times, trajectory.measures, strict=True))

    fixed, adaptive_runs = work_precision(QUADRATIC, jk.Wasserstein(), mu0, 4.0, error, jk.ParticleJKO,
                                          steps=[16, 64, 256], rtols=[1e-2, 1e-3, 1e-4])
    assert np.all(np.diff(adaptive_runs.errors) < 0)
    for solves, err, run in zip(adaptive_runs.solves, adaptive_runs.errors, adaptive_runs.trajectories,
                                strict=True):
        assert fixed.solves_to_reach(err) > MIN_ADVANTAGE * solves, (solves, err)
        taus = run.taus[:-1]  # the last one is cut to land on t_final
        assert taus[-3:].mean() > MIN_STEP_GROWTH * taus[1:4].mean(), taus
        first_accepted = [s["accepted"] for s in run.stats].index(True)
        assert {s["estimate"] for s in run.stats[first_accepted + 1:]} == {"extrapolation"}


def test_the_componentwise_norm_of_particles():
    """diffrax's norm: RMS over the positions (and weights, where they change) of the error
    over atol + rtol * max(|y_k|, |y_k+1|)."""
    mu0 = quadratic_particles(n=3)
    moved = jk.Measure(mu0.points + [[0.1, 0.0], [0.0, -0.2], [0.0, 0.0]], mu0.weights)
    controller = jk.StepController(rtol=1e-2, atol=1e-3)
    norm = controller.norm(jk.Wasserstein(), mu0, fixed_support=False)
    assert (norm.state.positions, norm.state.weights) == (True, False)  # W2 keeps the weights
    fine = jk.Measure(moved.points + [[0.01, 0.0], [0.0, 0.0], [0.0, 0.0]], mu0.weights)
    normalized, local = norm.doubling(mu0, moved, fine)
    scale = 1e-3 + 1e-2 * np.maximum(np.abs(mu0.points), np.abs(fine.points)).ravel()
    error = np.array([0.01, 0, 0, 0, 0, 0])
    assert normalized == pytest.approx(rms(error / scale))
    assert local == pytest.approx(rms(error))
    both = controller.norm(jk.WFR(1.0, 1.0), mu0, fixed_support=False)
    assert (both.state.positions, both.state.weights, both.state.kernel) == (True, True, None)
    ift = controller.norm(jk.IFT(KERNEL), mu0, fixed_support=False)
    assert ift.state.kernel == KERNEL  # the weights through their kernel mean embedding


# ---------------------------------------------------------------- the order a method declares
#: WFR flow of V = |x - m|^2 / 2 on particles: x(t) = m + e^{-t}(x0 - m) and
#: a(t) = a0 exp(-beta |x0 - m|^2 (1 - e^{-2t}) / 4) (alpha = 1).
WFR_BETA = 2.0
#: Doubling estimate over the true local error of the two half steps, from exact states at
#: t = 0.3: measured 0.94 (ParticleJKO, tau = 0.025; 1 - O(tau)) and 1.000 (Strang, tau = 0.05,
#: with the Richardson factor 1/(2^2 - 1) of its local order 3; 1/(2^1 - 1) would give 3).
DOUBLING_RTOL = {2: 0.1, 3: 0.02}


def wfr_exact(mu0, t):
    offset = mu0.points - QUADRATIC_MINIMUM
    return jk.Measure(QUADRATIC_MINIMUM + np.exp(-t) * offset,
                      mu0.weights * np.exp(-WFR_BETA * (offset**2).sum(1) * (1 - np.exp(-2 * t)) / 4))


@pytest.mark.parametrize(("method", "order", "tau"),
                         [(jk.ParticleJKO(tol=1e-12), 2, 0.025),
                          (jk.Splitting(order=2, tol=1e-12), 3, 0.05)], ids=["ParticleJKO", "Strang"])
def test_doubling_estimate_uses_the_order_the_method_declares(method, order, tau):
    rng = np.random.default_rng(1)
    weights = rng.uniform(0.5, 1.5, 6)
    mu0 = jk.Measure(rng.normal(size=(6, 2)) * 0.5 + [2.0, 1.5], weights / weights.sum())
    geometry = jk.WFR(1.0, WFR_BETA)
    controller = jk.StepController(rtol=1.0, atol=0.0)
    assert controller.order_of(method) == order == method.local_error_order
    norm = controller.norm(geometry, mu0, fixed_support=False, order=controller.order_of(method))
    assert norm.estimate == ("extrapolation" if order == 2 else "doubling")
    start = wfr_exact(mu0, 0.3)
    coarse = method.step(QUADRATIC, geometry, start, tau).measure
    fine = method.step(QUADRATIC, geometry, method.step(QUADRATIC, geometry, start, tau / 2).measure,
                       tau / 2).measure
    _, estimate = norm.doubling(start, coarse, fine)
    true = rms(norm.state.of(fine) - norm.state.of(wfr_exact(mu0, 0.3 + tau)))
    assert estimate == pytest.approx(true, rel=DOUBLING_RTOL[order])


def test_strang_runs_on_doubling_with_exponents_of_order_3():
    mu0 = quadratic_particles(n=4)
    strang = jk.Splitting(order=2)
    run = jk.solve(QUADRATIC, jk.WFR(1.0, WFR_BETA), mu0, t_final=1.0, method=strang,
                   controller=jk.StepController(rtol=1e-3), progress=False)
    assert {s["estimate"] for s in run.stats} == {"doubling"}
    assert run.stop_reason == "t_final"
    with pytest.raises(ValueError, match="use estimate='doubling'"):
        jk.solve(QUADRATIC, jk.WFR(1.0, WFR_BETA), mu0, t_final=1.0, method=strang, progress=False,
                 controller=jk.StepController(estimate="extrapolation"))
    controller = jk.StepController(safety=1.0, shrink=1e-3, growth=1e3)
    # the I part alone: err^(-(icoeff + pcoeff) / q) brings the error to 1 for local order q
    assert controller.factor(8.0, None, True, order=3) == pytest.approx(8.0 ** (-0.7 / 3))
    assert controller.factor(8.0, 2.0, True, order=2) == pytest.approx(8.0 ** -0.35 * 2.0**0.2)
    assert jk.StepController(error_order=2.5).order_of(strang) == 2.5


@pytest.mark.filterwarnings("ignore::jko_ift.GridLockingWarning")
def test_atol_zero_on_cells_without_mass_names_the_cause():
    """Under the componentwise norm a weight near 0 (a Gaussian's tail cells, down to 1e-152
    here) with atol = 0 has no tolerance at all; an atol below every weight that matters cures it."""
    grid = jk.Grid(-4, 4, 40)
    mu0 = grid.measure(lambda x: np.exp(-((x[:, 0] - 2) ** 2) / 0.1), normalize=True)
    fokker_planck = jk.Entropy() + jk.Potential(lambda x: 0.5 * x[:, 0] ** 2, lambda x: x)

    def run(atol):
        return jk.solve(fokker_planck, jk.Wasserstein(), mu0, t_final=0.2, progress=False,
                        controller=jk.StepController(rtol=1e-3, atol=atol, tau_min=1e-4))

    with pytest.raises(jk.SolverError, match="with atol = 0 a component at 0"):
        run(0.0)
    assert run(1e-8).stop_reason == "t_final"


# ---------------------------------------------------------------------------- callback and resume


@pytest.mark.parametrize("save_at", [None, [1.0, 2.5, T_FINAL]])
def test_an_adaptive_run_resumed_is_the_run_in_one(save_at):
    """The controller's history (previous error, the extrapolation's last step, the proposed
    tau) and the method's state survive in Trajectory.state."""
    method = jk.ConicJKO()  # one method: its state holds the compiled program of the problem
    whole = adaptive(1e-2, method=method, save_at=save_at)
    callback, reports = stop_after(4)
    first = adaptive(1e-2, method=method, save_at=save_at, callback=callback)
    assert first.stop_reason == "callback" and first.state.controller.previous_error is not None
    resumed = adaptive(1e-2, method=method, save_at=save_at, resume=first)
    assert_same_run(resumed, whole)
    assert resumed.stop_reason == whole.stop_reason == "t_final"
    accepted = [s["step"] for s in whole.stats if s["accepted"]]
    assert [r.record["step"] for r in reports] == accepted[:4]
    assert [r.step for r in reports] == [1, 2, 3, 4]


def test_adaptive_explicit_noise_resumes_bit_for_bit():
    rng = np.random.default_rng(5)
    target = jk.Measure(rng.normal(size=(10, 2)), np.full(10, 0.1))
    mu0 = jk.Measure(rng.normal(size=(10, 2)) + 1.0, np.full(10, 0.1))
    controller = jk.StepController(rtol=1e-2, atol=1e-4)

    def run(**kwargs):
        return jk.solve(jk.MMD2(target, KERNEL), jk.Wasserstein(), mu0, t_final=2.0,
                        controller=controller, method=jk.ExplicitEuler(noise=0.05, seed=2),
                        progress=False, **kwargs)

    whole = run()
    assert_same_run(run(resume=run(callback=stop_after(3)[0])), whole)


def test_the_controller_history_survives_a_file():
    """previous error, the last step's tau and the measure before it, written and read back."""
    method = jk.ConicJKO()
    first = adaptive(1e-2, method=method, callback=stop_after(4)[0])
    meta, arrays = first.state.to_record()
    back = RunState.from_record(json.loads(json.dumps(meta)), arrays, first.final)
    saved = first.state.controller
    assert back.controller.previous_error == saved.previous_error
    assert back.controller.proposed == saved.proposed and back.controller.history[1] == saved.history[1]
    np.testing.assert_array_equal(back.controller.history[0].weights, saved.history[0].weights)
    assert back.controller.history[0].grid is not None  # the grid of the run's measures
    whole = adaptive(1e-2, method=method)
    resumed = adaptive(1e-2, method=method, resume=dataclasses.replace(first, state=back))
    # the history is there: the next step extrapolates (a fresh controller would double)
    assert resumed.stats[len(first.stats)]["estimate"] == "extrapolation"
    # the same steps up to the solver's tolerance (a file keeps no compiled program), which the
    # controller amplifies a little from step to step
    assert len(resumed.times) == len(whole.times)
    np.testing.assert_allclose(resumed.times, whole.times, rtol=1e-3)
    np.testing.assert_allclose(resumed.energies, whole.energies, rtol=1e-3)
