"""Grid locking, the h / tau rounding regime and entropic diffusion: detected in every step of
the fixed-support methods, recorded in runs, and told apart by the studies (theory §7).

The cases are W2 Ornstein-Uhlenbeck flows with a closed form: F = Entropy + |x|^2 / 2 from
N(m0, s0^2) is N(m0 e^-t, 1 + (s0^2 - 1) e^-2t), and the exact JKO recursion on Gaussians gives
the time error alone (theory §5)."""

import json
import logging
import warnings

import numpy as np
import pytest
from scipy.special import logsumexp

import jko_ift as jk
from jko_ift.cli import main
from jko_ift.config import load_config
from jko_ift.methods.grid_motion import (
    ROUNDING_RATIO,
    STALL_RATIO,
    GridMotion,
    barycentric_motion,
    expected_moved_fraction,
)
from jko_ift.problems import Problem
from jko_ift.studies import (
    ROUNDING_SHARE,
    _flag_growing_errors,
    config_convergence_study,
    convergence_study,
    grid_share,
)

OU_CONFIG = "examples/configs/ornstein_uhlenbeck.toml"


def ou_problem(cells: int, lo: float = -4.0, hi: float = 6.0, mean: float = 2.0, sd: float = 0.5,
               t_final: float = 1.0) -> Problem:
    """OU on Grid(lo, hi, cells) from N(mean, sd^2); the error is the largest |mean - m(t)| +
    |sd - s(t)| over the saved times."""
    grid = jk.Grid(lo, hi, cells)
    mu0 = grid.measure(lambda x: np.exp(-0.5 * ((x[:, 0] - mean) / sd) ** 2), normalize=True)
    energy = jk.Entropy() + jk.Potential(lambda x: 0.5 * x[:, 0] ** 2, lambda x: x)

    def error(trajectory):
        worst = 0.0
        for t, mu in zip(trajectory.times, trajectory.measures, strict=True):
            m_t, s_t = mean * np.exp(-t), np.sqrt(1 + (sd**2 - 1) * np.exp(-2 * t))
            worst = max(worst, abs(mu.mean()[0] - m_t) + abs(np.sqrt(mu.covariance()[0, 0]) - s_t))
        return worst

    return Problem("ornstein_uhlenbeck_box", energy, jk.Wasserstein(), mu0, t_final, error)


def quiet_study(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convergence_study(*args, **kwargs)


def flags_of(study):
    return {row["tau"]: row["flags"] for row in study.rows}


# ---------------------------------------------------------------------------- finding 2: the runs


def test_shipped_config_at_small_tau_warns_and_writes_it_to_summary(tmp_path, capsys):
    """The OU config with tau = 0.01 (280 cells, h = 0.05): from step 11 every step moves ~1e-4 of
    the mass; the energy at t = 1 is 2.20 where the exact one is -0.31. The run says so: the
    GridLockingWarning with its count in summary.json (and the first steps, which snap a 0.6-cell
    displacement to a whole cell, as rounding)."""
    path = tmp_path / "ou.toml"
    path.write_text(open(OU_CONFIG).read().replace("tau = 0.1", "tau = 0.01"))
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_energy"] == pytest.approx(2.20, abs=0.01)  # exact: -0.31
    by_message = {w["message"].split(":")[0]: w for w in summary["warnings"]
                  if w["category"] == "GridLockingWarning"}
    locking = by_message["grid locking"]
    assert (locking["count"], locking["first_step"], locking["last_step"]) == (90, 11, 100)
    assert "h = 0.05" in locking["message"] and "tau = 0.01" in locking["message"]
    assert by_message["grid rounding (h/tau regime)"]["count"] == 10


def test_a_smaller_step_on_a_coarse_grid_warns_in_every_locked_step():
    """OU on [-4, 6] with 100 cells (h = 0.1): ConicJKO errors 0.097 at tau = 0.2 and 1.1 at
    tau = 0.025; the first run is clean and silent, the second warns, once per cause with the
    count of its steps, and its step stats say how much mass moved against the flow."""
    problem = ou_problem(100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jk.GridLockingWarning)
        clean = jk.solve(problem.energy, problem.geometry, problem.initial, 0.2, t_final=1.0,
                         progress=False)
    assert clean.warnings == () and problem.error(clean) == pytest.approx(0.1035, abs=1e-3)
    with pytest.warns(jk.GridLockingWarning, match="grid locking"):
        locked = jk.solve(problem.energy, problem.geometry, problem.initial, 0.025, t_final=1.0,
                          progress=False)
    assert problem.error(locked) == pytest.approx(1.107, abs=1e-2)
    causes = {w.message.split(":")[0]: w for w in locked.warnings}
    assert causes["grid locking"].count == 24 and causes["grid locking"].last_step == 40
    last = locked.stats[-1]
    assert last["grid_locked"] and last["moved_fraction"] < STALL_RATIO * last["expected_moved_fraction"]
    assert last["expected_moved_fraction"] == pytest.approx(0.45, abs=0.01)  # tau |grad f| / h


def test_a_run_whose_small_grid_defects_add_up_warns_once_at_its_end():
    """Same problem at tau = 0.1: no step's defect reaches ROUNDING_RATIO times its time error
    (1.3 to 1.8), but they add up (error 0.14 against a time error of 0.05, grid share 0.33 >
    ROUNDING_SHARE): the run warns once, at its end. The shipped config at its tau = 0.1 (share
    0.054, its +-0.5 cell snapping alternates) stays silent."""
    problem = ou_problem(100)
    with pytest.warns(jk.GridLockingWarning, match="grid rounding over the run"):
        run = jk.solve(problem.energy, problem.geometry, problem.initial, 0.1, t_final=1.0,
                       progress=False)
    (cause,) = run.warnings
    assert cause.count == 1 and cause.first_step == 10
    assert not any(s["grid_locked"] or s["grid_rounding"] for s in run.stats)
    assert grid_share(run) == pytest.approx(0.33, abs=0.05)
    spec = load_config(OU_CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jk.GridLockingWarning)
        shipped = jk.solve(spec.energy, spec.geometry, spec.initial, 0.1, steps=10, progress=False)
    assert shipped.warnings == () and grid_share(shipped) < ROUNDING_SHARE


def test_single_step_on_a_line_measures_snapping_against_the_flow():
    """A linear potential V = g x moves every cell by tau g (constant velocity: no time error).
    Two whole cells: the step is exact. 1.6 cells: the step rounds to whole cells, a defect of
    0.4 cell against no time error, and warns. 0.3 cell (2 tau g < h): locked (theory §7)."""
    grid = jk.Grid(-3, 3, 60)  # h = 0.1
    mu = grid.measure(lambda x: np.exp(-2 * x[:, 0] ** 2), normalize=True)
    slope = jk.Potential(lambda x: x[:, 0], lambda x: np.ones_like(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", jk.GridLockingWarning)
        exact = jk.jko_step(slope, jk.Wasserstein(), mu, 0.2)
    assert exact.info["displacement_cells"] == pytest.approx(2.0, abs=1e-3)
    assert exact.info["flow_displacement_cells"] == pytest.approx(2.0, abs=1e-9)
    assert not exact.info["grid_locked"] and not exact.info["grid_rounding"]
    with pytest.warns(jk.GridLockingWarning, match=r"grid rounding .*h = 0.1, tau = 0.16"):
        rounded = jk.jko_step(slope, jk.Wasserstein(), mu, 0.16)
    assert abs(rounded.info["displacement_cells"] - 1.6) == pytest.approx(0.4, abs=1e-3)
    assert rounded.info["rounding_ratio"] > ROUNDING_RATIO
    with pytest.warns(jk.GridLockingWarning, match=r"grid locking"):
        locked = jk.jko_step(slope, jk.Wasserstein(), mu, 0.03)
    assert locked.info["grid_locked"] and locked.info["moved_fraction"] < 1e-6
    assert locked.info["expected_moved_fraction"] == pytest.approx(0.3, abs=1e-9)


def test_entropic_moved_fraction_from_separable_products_equals_the_dense_plan():
    """The entropic step's moved fraction and displacement come from products with the plan
    (separable on grids); the dense kernel and an explicit n x n plan give the same numbers."""
    grid = jk.Grid(-3, 3, 40)
    mu = grid.measure(lambda x: np.exp(-(x[:, 0] - 0.5) ** 2), normalize=True)
    F = jk.Potential(lambda x: x[:, 0] ** 2, lambda x: 2 * x)
    eps = 2e-2
    separable = jk.jko_step(F, jk.Wasserstein(), mu, 0.3, method=jk.EntropicJKO(eps=eps))
    dense = jk.jko_step(F, jk.Wasserstein(), mu, 0.3, method=jk.EntropicJKO(eps=eps, separable=False))
    for key in ("moved_fraction", "displacement_cells", "expected_moved_fraction"):
        assert separable.info[key] == pytest.approx(dense.info[key], rel=1e-6, abs=1e-9)
    # the same from an explicit plan: the entropic plan with rows a and columns the new weights
    # (log-domain Sinkhorn with SciPy), P = exp(f_i + g_j - |x_i - x_j|^2 / eps)
    x = mu.points[:, 0]
    log_kernel = -((x[:, None] - x[None, :]) ** 2) / eps
    log_a = np.log(mu.weights)
    with np.errstate(divide="ignore"):
        log_b = np.log(separable.measure.weights)
    f, g = np.zeros(mu.n), np.zeros(mu.n)
    for _ in range(5000):
        f = log_a - logsumexp(log_kernel + g[None, :], axis=1)
        g = log_b - logsumexp(log_kernel + f[:, None], axis=0)
        plan = np.exp(f[:, None] + log_kernel + g[None, :])
        if np.abs(plan.sum(1) - mu.weights).sum() < 1e-10:
            break
    assert np.abs(plan.sum(1) - mu.weights).sum() < 1e-10
    moved, displacement = barycentric_motion(mu, lambda w: plan @ w)
    assert separable.info["moved_fraction"] == pytest.approx(moved, abs=1e-4)
    assert separable.info["displacement_cells"] == pytest.approx(displacement, rel=1e-3)
    assert displacement == pytest.approx(separable.info["flow_displacement_cells"], rel=0.05)


def test_expected_moved_fraction_is_shared_by_methods_and_studies():
    from jko_ift import studies

    assert studies.expected_moved_fraction is expected_moved_fraction
    grid = jk.Grid(-1, 1, 20)  # h = 0.1
    mu = grid.measure(lambda x: np.ones(len(x)), normalize=True)
    slope = jk.Potential(lambda x: x[:, 0], lambda x: np.ones_like(x))
    assert expected_moved_fraction(slope, jk.Wasserstein(), mu, 0.05) == pytest.approx(0.5)
    assert expected_moved_fraction(slope, jk.WFR(alpha=4.0), mu, 0.05) == pytest.approx(1.0)
    assert expected_moved_fraction(slope, jk.Hellinger(), mu, 0.05) is None  # no transport
    # a step so large that tau / h overflows: still 0 cells where the flow does not move
    ramp = jk.Potential(lambda x: np.maximum(x[:, 0], 0.0), lambda x: (x > 0).astype(float))
    assert expected_moved_fraction(ramp, jk.Wasserstein(), mu, 1e308) == pytest.approx(0.5)


def test_grid_motion_verdicts():
    def motion(moved, expected, step, flow, change):
        return GridMotion(0.1, 0.1, moved, expected, step, flow, change, 0.05)

    assert motion(1e-4, 0.5, 0.0, 0.5, 0.01).locked  # moved 2e-4 of what the flow carries
    assert not motion(0.2, 0.5, 0.2, 0.5, 0.01).locked
    assert motion(0.2, 0.5, 0.2, 0.5, 0.01).rounding  # 0.3 cell off, time error 0.005
    assert not motion(1.0, 1.0, 5.0, 5.1, 0.2).rounding  # 0.1 cell off against 0.1
    assert not motion(1.0, 1.0, 5.0, 5.01, 0.0).rounding  # below the floor of a cell's 2 %


# ---------------------------------------------------------------------------- finding 3: the studies


def test_study_on_100_cells_flags_rounding_then_locking():
    """OU on 100 cells: tau = 0.2 is clean (error 0.10 = the time error); at tau = 0.1 the grid
    error is 1.4 times the time error (steps round) and at 0.05 a step locks. No order from one
    clean row."""
    study = quiet_study(ou_problem(100), [0.2, 0.1, 0.05])
    flags = flags_of(study)
    assert flags[0.2] == [] and flags[0.1] == ["grid_rounding"]
    assert flags[0.05] == ["grid_locking in 1/20 steps", "grid_rounding"]
    shares = [row["grid_share"] for row in study.rows]
    assert shares[0] < ROUNDING_SHARE / 3  # 0.027
    assert shares[1] > 3 * ROUNDING_SHARE and shares[2] > 10 * ROUNDING_SHARE  # 0.33, 4.2
    assert study.order is None and study.order_all.order < 0  # the naive fit is negative


def test_locked_entropic_run_is_diagnosed_as_grid_not_diffusion():
    """EntropicJKO with eps = 1e-3 on 100 cells (eps = 0.1 h^2: the blur stays in a cell): the
    steps crawl (5 to 40 % of the flow's mass), error 1.32 at tau = 0.0125. Grid, not entropic
    diffusion: a smaller eps would make it worse. Each step warns GridLockingWarning."""
    with pytest.warns(jk.GridLockingWarning, match="grid rounding"):
        study = convergence_study(ou_problem(100), [0.025, 0.0125], keep_trajectories=True,
                                  method_factory=lambda: jk.EntropicJKO(eps=1e-3))
    for flags in flags_of(study).values():
        assert "grid_rounding" in flags and "entropic_diffusion" not in flags
    assert study.rows[1]["error"] == pytest.approx(1.32, abs=0.01)
    run = study.trajectories[1]
    ratios = [s["moved_fraction"] / s["expected_moved_fraction"] for s in run.stats]
    assert max(ratios[10:]) < 0.2
    assert run.warnings[0].category == "GridLockingWarning" and run.warnings[0].count == 80


def test_entropic_diffusion_flags_the_rows_whose_error_rises():
    """eps = 1e-2 on 100 cells (eps = h^2: no locking): the error falls to tau = 0.05 and then rises
    (the sd grows with the spurious diffusion eps / (4 tau)); the blur ratio stays below its
    warning (0.45 < 0.5), the study flags entropic diffusion from tau = 0.05 on, and fits order 1
    on the two clean rows."""
    taus = [0.2, 0.1, 0.05, 0.025, 0.0125]
    study = quiet_study(ou_problem(100), taus, method_factory=lambda: jk.EntropicJKO(eps=1e-2))
    flags = flags_of(study)
    assert [flags[t] for t in taus] == [[], [], ["entropic_diffusion"], ["entropic_diffusion"],
                                        ["entropic_diffusion"]]
    errors = [row["error"] for row in study.rows]
    assert errors[2] < errors[3] < errors[4]
    assert study.order.order == pytest.approx(1.13, abs=0.1)


def test_rows_whose_error_grows_are_never_fitted():
    rows = [{"tau": t, "error": e, "flags": []} for t, e in [(0.2, 0.1), (0.1, 0.05), (0.05, 0.06),
                                                           (0.025, 0.01)]]
    rows[3]["flags"].append("solver_tolerance")
    _flag_growing_errors(rows)
    assert [r["flags"] for r in rows] == [[], [], ["error_grows_as_tau_shrinks"], ["solver_tolerance"]]


def test_converge_flags_a_locked_reference(tmp_path, caplog):
    """`jko-ift converge` on the OU config (here to t = 0.2) against a fine run: the reference
    (tau = 0.005 on the config's grid: 2 tau |grad f| = 0.03 < h = 0.05) is itself locked; the
    study says so, flags every row and fits no order."""
    path = tmp_path / "ou.toml"
    path.write_text(open(OU_CONFIG).read().replace("t_final = 1.0", "t_final = 0.2"))
    out = tmp_path / "conv"
    with caplog.at_level(logging.WARNING, logger="jko_ift.studies"):
        assert main(["converge", str(path), "--taus", "0.1,0.05", "--reference", "fine",
                     "--reference-tau", "0.005", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference_flags"][0] == "grid_locking in 40/40 steps"
    assert all("reference_spoiled" in row["flags"] for row in summary["rows"])
    assert summary["order"] is None
    assert "reference run (tau = 0.005) is itself spoiled" in caplog.text


def test_grid_share_of_a_trajectory_without_grid_statistics_is_none():
    problem = jk.problems.mmd_flow(cells=12, t_final=0.4)
    run = jk.solve(problem.energy, problem.geometry, problem.initial, 0.2, steps=2, progress=False)
    assert grid_share(run) is None


def _parts(problem):
    return problem.energy, problem.geometry, problem.initial


# ---------------------------------------------------------------------------- heavier cases


@pytest.mark.slow
def test_study_on_400_cells_detects_the_rounding_regime():
    """OU on 400 cells (h = 0.025): the time error halves with tau, but from tau = 0.05 the grid
    error matches it and at 0.025 it is 8 times it (0.10 against 0.013). Those rows are flagged;
    the fit over the others is first order (the naive one over every row: -0.13). ~2.5 min."""
    study = quiet_study(ou_problem(400), [0.2, 0.1, 0.05, 0.025])
    flags = flags_of(study)
    assert flags[0.2] == [] and flags[0.1] == []
    assert flags[0.05] == ["grid_rounding"] and flags[0.025] == ["grid_rounding"]
    assert study.order_all.order == pytest.approx(-0.13, abs=0.05)
    assert study.order.order == pytest.approx(0.92, abs=0.1)


@pytest.mark.slow
def test_clean_entropic_study_on_400_cells_is_unflagged_with_order_one():
    """eps = 1e-3 on 400 cells (eps = 1.6 h^2): errors 0.098, 0.051, 0.025, 0.010, no flag, order
    1.09. ~3 min."""
    study = quiet_study(ou_problem(400), [0.2, 0.1, 0.05, 0.025],
                        method_factory=lambda: jk.EntropicJKO(eps=1e-3))
    assert not study.flagged
    assert study.order.order == pytest.approx(1.09, abs=0.05)


@pytest.mark.slow
def test_converge_on_the_config_with_the_default_reference():
    """The issue's run: taus 0.1 to 0.0125 against a fine run of 640 steps (tau = 0.0015625), which
    is locked: flagged as such, every row flagged, no order. ~1.5 min."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = config_convergence_study(OU_CONFIG, [0.1, 0.05, 0.025, 0.0125])
    assert study.reference_flags and study.reference_flags[0].startswith("grid_locking in")
    assert study.order is None
    assert all("reference_spoiled" in row["flags"] for row in study.rows)
