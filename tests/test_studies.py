"""Convergence studies (order about 1 on a closed form; grid locking flagged), scheme
comparisons, and the ``converge`` / ``compare`` subcommands."""

import json
import warnings

import numpy as np
import pytest

import jko_ift as jk
from jko_ift import problems
from jko_ift.cli import main
from jko_ift.config import ConfigError, tomllib  # tomli on Python 3.10
from jko_ift.plotting import plot_convergence
from jko_ift.solve import Trajectory
from jko_ift.studies import (
    LOCKED_FRACTION,
    ROUNDING_SHARE,
    _flags,
    compare_schemes,
    config_convergence_study,
    convergence_study,
    locked_steps,
    refined_config,
    set_field,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SMALL_CONFIG = """
[problem]
name = "mmd_flow"
cells = 12
t_final = 1.0

[method]
kind = "conic"

[run]
tau = 0.2
steps = 5
"""


@pytest.fixture
def config(tmp_path):
    """This module's study config (SMALL_CONFIG above), not the runner's of conftest."""
    path = tmp_path / "study.toml"
    path.write_text(SMALL_CONFIG)
    return path


def test_closed_form_study_reports_order_one(tmp_path):
    study = convergence_study(problems.mmd_flow(cells=20, t_final=1.0), [0.2, 0.1, 0.05])
    assert [row["tau"] for row in study.rows] == [0.2, 0.1, 0.05]
    assert not study.flagged
    assert study.reference.startswith("closed form")
    assert study.order.order == pytest.approx(1.0, abs=0.1)
    lo, hi = study.interval
    assert lo < 1.0 < hi
    errors = [row["error"] for row in study.rows]
    assert errors == sorted(errors, reverse=True)
    assert all(row["h"] == pytest.approx(0.3) and row["wall_time"] > 0 for row in study.rows)
    path = plot_convergence(study, tmp_path / "convergence.png", title="mmd flow")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert json.dumps(jk.io.to_jsonable(study.summary()))


def test_fixed_grid_with_shrinking_tau_flags_grid_locking():
    """W2 Ornstein-Uhlenbeck on a coarse grid (h = 0.35): once tau |grad f| < h the steps move no
    mass and the error stalls; the study flags those rows instead of fitting a (wrong, negative)
    order. Already at tau = 0.1 the steps move one whole cell where the flow moves 0.5 to 0.76:
    error 0.27 against a time error of 0.038 (the exact JKO recursion), flagged as rounding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = convergence_study(problems.ornstein_uhlenbeck(cells=40, t_final=0.4), [0.1, 0.05, 0.025])
    flags = [row["flags"] for row in study.rows]
    assert flags == [["grid_rounding"], ["grid_locking in 8/8 steps", "grid_rounding"],
                     ["grid_locking in 16/16 steps", "grid_rounding"]]
    assert [row["locked_steps"] for row in study.rows] == [0, 8, 16]
    assert study.rows[0]["grid_share"] > 10 * ROUNDING_SHARE
    assert len({row["h"] for row in study.rows}) == 1  # h fixed
    assert study.order is None and study.interval is None  # no clean row
    assert study.order_all.order < 0.5  # the naive fit over every row is wrong


def test_partial_grid_locking_is_flagged_with_its_share():
    """W2 Ornstein-Uhlenbeck from N(3, 1) on 40 cells (h = 0.35) to t = 1: with tau = 0.1 the
    first steps move mass (tau |grad f| = tau * mean ~ h), then the mean has shrunk and the late
    steps move ~5e-5 of the mass where the flow would carry half of it across cells. The method
    marks them and warns in each; the study flags the row with its share of locked steps. At
    tau = 0.2 no step locks, but each moves one cell where the flow moves 0.7 to 1.5: error 0.28
    against a time error of 0.10, flagged as rounding. No row is fitted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = convergence_study(problems.ornstein_uhlenbeck(cells=40, t_final=1.0), [0.2, 0.1])
    assert study.rows[0]["flags"] == ["grid_rounding"] and study.rows[0]["locked_steps"] == 0
    partial = study.rows[1]
    assert 0 < partial["locked_steps"] < partial["steps"] == 10
    assert partial["flags"] == [f"grid_locking in {partial['locked_steps']}/10 steps", "grid_rounding"]
    assert study.order is None
    with pytest.warns(jk.GridLockingWarning, match="grid locking"):
        trajectory = jk.solve(*_ou(40), tau=0.1, steps=10, progress=False)
    stats = trajectory.stats
    assert sum(s["grid_locked"] for s in stats) == partial["locked_steps"]  # the method marks them
    assert all(s["moved_fraction"] > LOCKED_FRACTION for s in stats)  # though some mass moves
    assert locked_steps(trajectory) == (partial["locked_steps"], 10)
    lock = next(w for w in trajectory.warnings if w.message.startswith("grid locking"))
    assert lock.count == partial["locked_steps"]
    # the same flow on a grid fine enough for tau = 0.1 (h = 0.117): no step locks
    fine = jk.solve(*_ou(120), tau=0.1, steps=10, progress=False)
    assert locked_steps(fine, *_ou(120)[:2]) == (0, 10)


def _ou(cells):
    problem = problems.ornstein_uhlenbeck(cells=cells, t_final=1.0)
    return problem.energy, problem.geometry, problem.initial


def test_reference_run_when_no_closed_form():
    problem = problems.mmd_flow(cells=12, t_final=0.8)
    study = convergence_study(problem, [0.2, 0.1], reference="fine", reference_tau=0.0125)
    assert study.reference.startswith("run with tau = 0.0125")
    assert study.rows[0]["error"] > study.rows[1]["error"] > 0
    assert study.order.order == pytest.approx(1.0, abs=0.25)


def test_study_checks_before_running():
    problem = problems.mmd_flow(cells=12, t_final=1.0)
    with pytest.raises(ValueError, match="whole number of steps"):
        convergence_study(problem, [0.3, 0.1])
    with pytest.raises(ValueError, match="at least two"):
        convergence_study(problem, [0.1])
    with pytest.raises(ValueError, match="no closed form"):
        convergence_study(problems.ift_paper_mixture(cells=4), [0.2, 0.1], reference="closed_form")


def _stats_trajectory(**step):
    record = {"step": 1, "tau": 0.1, "status": "optimal", "certificate": 1e-9} | step
    return Trajectory(np.array([0.0, 0.1]), [None, None], np.array([1.0, 0.5]), [record], "steps")


def test_flags_entropic_diffusion_and_solver_tolerance():
    assert _flags(_stats_trajectory(), 1e-3, 1.0, 1) == []
    assert _flags(_stats_trajectory(moved_fraction=0.0), 1e-3, 1.0, 1) == ["grid_locking in 1/1 steps"]
    assert _flags(_stats_trajectory(grid_locked=True), 1e-3, 1.0, 1) == ["grid_locking in 1/1 steps"]
    # eps / tau = 0.1: a spurious spread sqrt(eps t / (2 tau)) ~ 0.2, far above an error of 1e-3
    assert _flags(_stats_trajectory(eps=1e-2, blur_ratio=0.01), 1e-3, 1.0, 1) == ["entropic_diffusion"]
    assert _flags(_stats_trajectory(eps=1e-12, blur_ratio=0.01), 1e-3, 1.0, 1) == []
    assert _flags(_stats_trajectory(certificate=1e-2), 1e-3, 1.0, 1) == ["solver_tolerance"]


def test_refined_config_scales_the_grid():
    named = {"problem": {"name": "mmd_flow", "cells": 10}, "run": {"tau": 0.2, "steps": 5}}
    assert refined_config(named, 0.05, 0.2)["problem"]["cells"] == 40
    assert refined_config({"problem": {"name": "ornstein_uhlenbeck"}}, 0.1, 0.2)["problem"]["cells"] == 600
    explicit = {"problem": {"support": {"lo": [0, 0], "hi": [1, 1], "shape": [8, 6]}}}
    assert refined_config(explicit, 0.1, 0.2)["problem"]["support"]["shape"] == [16, 12]
    assert explicit["problem"]["support"]["shape"] == [8, 6]  # the original is not touched
    assert set_field(named, "geometry.alpha", 2.0)["geometry"] == {"alpha": 2.0}


def test_config_study_with_refined_grid(config):
    study = config_convergence_study(config, [0.2, 0.1], refine_grid=True)
    assert [row["h"] for row in study.rows] == pytest.approx([0.5, 0.25])
    assert study.reference.startswith("closed form")


def test_compare_returns_a_row_per_scheme(tmp_path):
    problem = problems.mmd_flow(cells=12)
    kernel = problem.energy.kernel
    schemes = {"conic/mmd": (jk.ConicJKO, jk.MMD(kernel)),
               "conic/ift": (jk.ConicJKO, jk.IFT(kernel, alpha=1.0, beta=1.0)),
               "entropic/wfr": (jk.EntropicJKO, jk.WFR())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows, trajectories = compare_schemes(problem.energy, problem.initial, schemes, tau=0.25, steps=4)
    assert [row["label"] for row in rows] == list(schemes)
    assert set(trajectories) == {"conic/mmd", "conic/ift"}
    for row in rows[:2]:
        assert row["error"] is None and row["steps"] == 4 and row["final_time"] == pytest.approx(1.0)
        assert row["final_energy"] < problem.energy.value(problem.initial)
        assert row["mmd2_to_target"] == pytest.approx(2 * row["final_energy"], rel=1e-6)
    assert rows[2]["stop_reason"] == "failed" and "separable" in rows[2]["error"]


def test_converge_cli_writes_a_results_folder(config, tmp_path, capsys):
    out = tmp_path / "conv"
    assert main(["converge", str(config), "--taus", "0.2,0.1,0.05", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == "converge" and len(summary["rows"]) == 3
    assert summary["order"]["interval95"][0] < 1.0 < summary["order"]["interval95"][1]
    lines = (out / "convergence.csv").read_text().splitlines()
    assert lines[0] == "tau,h,steps,locked_steps,grid_share,error,wall_time,flags" and len(lines) == 4
    assert (out / "convergence.png").read_bytes()[:8] == PNG_SIGNATURE


def test_compare_cli_writes_a_results_folder(config, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(config), "--methods", "conic", "--geometries", "mmd,ift",
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [row["label"] for row in summary["rows"]] == ["conic/mmd", "conic/ift"]
    assert len((out / "compare.csv").read_text().splitlines()) == 3
    assert (out / "energy_decay.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("argv, field", [
    (["compare", "{config}", "--geometries", "mmd,ifft"], "geometry.kind"),
    (["compare", "{config}", "--methods", "conic,entropc"], "method.kind"),
    (["converge", "{config}", "--taus", "0.3,0.1"], "whole number of steps"),
])
def test_study_errors_come_before_any_computation(config, tmp_path, capsys, argv, field):
    out = tmp_path / "never"
    argv = [a.format(config=config) for a in argv] + ["--out", str(out)]
    assert main(argv) == 2
    assert field in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command, options", [
    ("converge", ("--taus", "--refine-grid", "--reference", "--out")),
    ("compare", ("--methods", "--geometries", "--out")),
])
def test_study_help(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in options)




def test_particle_config_studies(tmp_path, small_ift_particles):
    """converge (against a fine run; no grid, so no h and no locking), compare, and the refusal
    of --refine-grid on particles (the shipped IFT particle config on 15 particles)."""
    PARTICLE_TOML = small_ift_particles(particles=15, samples=20, seed=2)
    PARTICLE_CONFIG = tomllib.loads(PARTICLE_TOML)
    study = config_convergence_study(PARTICLE_CONFIG, [1.0, 0.5], reference_tau=0.125)
    assert [row["h"] for row in study.rows] == [None, None]
    assert [row["locked_steps"] for row in study.rows] == [0, 0]
    assert study.rows[0]["error"] > study.rows[1]["error"] > 0
    with pytest.raises(ConfigError, match="no grid to refine") as info:
        config_convergence_study(PARTICLE_CONFIG, [1.0, 0.5], refine_grid=True)
    assert info.value.field == "problem.support.kind"
    path = tmp_path / "particles.toml"
    path.write_text(PARTICLE_TOML)
    out = tmp_path / "cmp"
    assert main(["compare", str(path), "--methods", "splitting,explicit", "--geometries", "ift,mmd",
                 "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [row["error"] for row in rows] == [None] * 4
    assert all(row["mmd2_to_target"] == pytest.approx(2 * row["final_energy"]) for row in rows)
    out = tmp_path / "conv"
    assert main(["converge", str(path), "--taus", "1,0.5", "--reference-tau", "0.25", "--out", str(out),
                 "--quiet"]) == 0
    assert len(json.loads((out / "summary.json").read_text())["rows"]) == 2


@pytest.mark.parametrize("command, options, unit", [
    ("converge", ["--taus", "0.2,0.1"], "run"),
    ("compare", ["--geometries", "mmd,ift"], "scheme"),
    ("sweep", ["--param", "run.tau=0.2,0.1", "--serial"], "case"),
])
def test_study_progress_bar_on_stderr_and_quiet(config, tmp_path, capsys, command, options, unit):
    out = tmp_path / "quiet"
    assert main([command, str(config), *options, "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"results in {out.absolute()}\n" and captured.err == ""
    out = tmp_path / "loud"
    assert main([command, str(config), *options, "--out", str(out), "--verbose"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"results in {out.absolute()}\n"
    assert f"{command}: 100%" in captured.err and "2/2 [" in captured.err
    assert f"{unit}/s" in captured.err or f"s/{unit}" in captured.err  # the rate, fast or slow
    assert "jko-ift: " in captured.err  # --verbose: a line per run, scheme or case
