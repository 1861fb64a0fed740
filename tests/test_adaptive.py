"""Error-controlled step sizes: tolerance tracking, step-size shape, rejections, stopping."""

import numpy as np
import pytest

import jko_ift as jk

KERNEL = jk.Gaussian(1.0)
GRID = jk.Grid(-3, 3, 30)
MU0 = GRID.measure(lambda x: np.exp(-((x[:, 0] - 1.5) ** 2) / 0.5), normalize=True)
TARGET = GRID.measure(lambda x: np.exp(-((x[:, 0] + 1) ** 2) / 0.8), normalize=True)
F = jk.MMD2(TARGET, KERNEL)
GEOMETRY = jk.MMD(KERNEL)
T_FINAL = 5.0


def exact(t):
    """The MMD flow of 1/2 MMD^2: pi + e^{-t} (mu0 - pi) (DESIGN section 2)."""
    return TARGET.with_weights(TARGET.weights + np.exp(-t) * (MU0.weights - TARGET.weights))


def max_error(trajectory):
    return max(jk.mmd(mu, exact(t), KERNEL) for t, mu in zip(trajectory.times, trajectory.measures,
                                                              strict=True))


def adaptive(rtol, **kwargs):
    controller = jk.StepController(rtol=rtol, atol=0.0, **kwargs.pop("controller", {}))
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


def test_rejected_steps_leave_no_state_behind():
    trajectory = adaptive(1e-3, controller={"tau0": 2.0})  # far too large: rejected first
    accepted = [s for s in trajectory.stats if s["accepted"]]
    rejected = [s for s in trajectory.stats if not s["accepted"]]
    assert rejected and rejected[0]["error"] > 1
    assert len(trajectory) == len(accepted) + 1
    np.testing.assert_allclose(trajectory.times[1:], np.cumsum([s["tau"] for s in accepted]))
    assert all(s["error"] <= 1 for s in accepted)
    assert trajectory.step_solves == 3 * len(trajectory.stats)


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
def test_wasserstein_default_distance_is_w2():
    grid = jk.Grid(-4, 4, 60)
    mu0 = grid.measure(lambda x: np.exp(-((x[:, 0] - 1) ** 2) / 2), normalize=True)
    fokker_planck = jk.Entropy() + jk.Potential(lambda x: 0.5 * x[:, 0] ** 2, lambda x: x)

    def run(**options):
        controller = jk.StepController(rtol=0.05, atol=0.0, tau0=0.2, **options)
        return jk.solve(fokker_planck, jk.Wasserstein(), mu0, t_final=0.6, controller=controller,
                        progress=False)

    default, explicit = run(), run(distance="w2")
    errors = [s["error_distance"] for s in default.stats]
    assert errors == [s["error_distance"] for s in explicit.stats]
    assert all(e > 0 for e in errors)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rtol": -1.0}, "rtol"), ({"rtol": 0.0, "atol": 0.0}, "rtol > 0 or atol > 0"),
     ({"tau_min": 1.0, "tau_max": 0.5}, "tau_min < tau_max"), ({"distance": "l2"}, "unknown distance")],
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
