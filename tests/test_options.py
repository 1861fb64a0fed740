"""Option validation: every method refuses a bad option at construction (a ValueError naming the
option, what it expected and what it got), solver settings are an allow-list that never writes a
file, and a user callable that returns NaN is named at its first evaluation."""

import numpy as np
import pytest

import jko_ift as jk
from jko_ift.config import ConfigError, load_config
from jko_ift.methods.options import CLARABEL_SETTINGS, SCS_SETTINGS

GRID = jk.Grid(-2.0, 2.0, 10)
TARGET = GRID.measure(lambda x: np.exp(-x[:, 0] ** 2 / 2) + 1e-3, normalize=True)
MU = GRID.measure(lambda x: np.exp(-(x[:, 0] - 0.5) ** 2 / 0.5) + 1e-3, normalize=True)
PARTICLES = jk.Measure(np.linspace(-2.0, 2.0, 15), np.full(15, 1 / 15))


# ------------------------------------------------------------------------- solver settings

@pytest.mark.parametrize("key", ["write_data_filename", "log_csv_filename"])
def test_scs_file_settings_are_refused_and_nothing_is_written(tmp_path, key):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    with pytest.raises(ValueError, match=f"'{key}' makes SCS write a file"):
        jk.ConicJKO(solver="SCS", solver_options={key: str(victim)})
    assert victim.read_text() == "precious"


def test_a_config_cannot_write_a_file_through_solver_options(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    config = {"problem": {"name": "mmd_flow", "cells": 10}, "run": {"tau": 0.25, "steps": 1},
              "method": {"kind": "conic", "solver": "SCS",
                         "solver_options": {"write_data_filename": str(victim)}}}
    with pytest.raises(ConfigError, match="write a file") as error:
        load_config(config)
    assert error.value.field == "method.solver_options.write_data_filename"
    assert victim.read_text() == "precious"


def test_unknown_setting_names_the_closest_one_and_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown CLARABEL setting 'tol_gap_rell' \(did you mean "
                                         r"'tol_gap_rel'\?\).*max_iter \(whole number >= 1\)"):
        jk.ConicJKO(solver_options={"tol_gap_rell": 1e-9})
    with pytest.raises(ValueError, match="'eps_abs' is a setting of SCS, pass solver='SCS'"):
        jk.ConicJKO(solver_options={"eps_abs": 1e-9})


@pytest.mark.parametrize("solver, key, value", [
    ("CLARABEL", "max_iter", 2.5), ("CLARABEL", "max_iter", True), ("CLARABEL", "tol_feas", -1e-8),
    ("CLARABEL", "tol_gap_abs", float("nan")), ("CLARABEL", "direct_solve_method", "mkl-x"),
    ("CLARABEL", "verbose", 1), ("SCS", "eps_abs", "1e-9"), ("SCS", "alpha", 2.0),
    ("SCS", "max_iters", 0),
])
def test_setting_of_the_wrong_type_or_range_is_refused(solver, key, value):
    with pytest.raises(ValueError, match=f"solver_options {key}"):
        jk.ConicJKO(solver=solver, solver_options={key: value})


def test_allowed_settings_are_settings_of_the_installed_solvers():
    clarabel = pytest.importorskip("clarabel")
    defaults = clarabel.DefaultSettings()
    cvxpy_options = {"warm_start", "verbose"}
    assert all(hasattr(defaults, key) for key in set(CLARABEL_SETTINGS) - cvxpy_options)
    jk.ConicJKO(solver="SCS", solver_options={"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 100,
                                              "acceleration_lookback": 5})
    assert set(SCS_SETTINGS).isdisjoint({"write_data_filename", "log_csv_filename"})


# ------------------------------------------------------------------------- method options

@pytest.mark.parametrize("make, words", [
    (lambda: jk.ConicJKO(gap_tol=-1.0), "gap_tol"),  # used to double the plan radius forever
    (lambda: jk.ConicJKO(gap_tol=float("nan")), "gap_tol"),  # every step optimal_inaccurate
    (lambda: jk.ConicJKO(gap_tol="1e-6"), "gap_tol"),
    (lambda: jk.ConicJKO(cache_size=-1), "cache_size"),
    (lambda: jk.ConicJKO(radius=float("nan")), "radius"),
    (lambda: jk.ConicJKO(solver=["SCS"]), "unknown solver"),
    (lambda: jk.EntropicJKO(eps=True), "eps"),
    (lambda: jk.EntropicJKO(max_iter=0), "max_iter"),
    (lambda: jk.EntropicJKO(separable="no"), "separable"),
    (lambda: jk.EntropicJKO(dense_cache_entries=-1), "dense_cache_entries"),
    (lambda: jk.EntropicJKO(conic="conic"), "conic"),
    (lambda: jk.ParticleJKO(tol=float("nan")), "tol"),
    (lambda: jk.ParticleJKO(max_iter=2.5), "max_iter"),
    (lambda: jk.ParticleJKO(max_alternations=0), "max_alternations"),
    (lambda: jk.Splitting(max_iter=-5), "max_iter"),
    (lambda: jk.Splitting(order=True), "order"),
    (lambda: jk.ExplicitEuler(noise_steps=2.5), "noise_steps"),
    (lambda: jk.ExplicitEuler(noise=float("inf")), "noise"),
    (lambda: jk.ExplicitEuler(seed=-1), "seed"),
    (lambda: jk.StepController(rtol="x"), "rtol"),
    (lambda: jk.StepController(tau0=-1.0), "tau0"),
    (lambda: jk.StepController(safety=True), "safety"),
])
def test_bad_method_options_are_refused_at_construction(make, words):
    with pytest.raises(ValueError, match=words):
        make()


@pytest.mark.parametrize("tau", [True, "0.1", float("nan"), -1.0])
def test_tau_must_be_a_positive_number(tau):
    with pytest.raises(ValueError, match="tau must be a positive"):
        jk.jko_step(jk.KL(TARGET), jk.Hellinger(), MU, tau, method=jk.ConicJKO())


# ------------------------------------------------------------------------- user callables

NAN_POTENTIAL = jk.Potential(lambda x: np.where(x[:, 0] > 1.5, np.nan, x[:, 0] ** 2), lambda x: 2 * x)
NAN_GRADIENT = jk.Potential(lambda x: x[:, 0] ** 2, lambda x: np.where(x > 1.5, np.nan, 2 * x))
NAN_INTERACTION = jk.Interaction(lambda z: np.where(np.abs(z[:, 0]) > 3.5, np.nan, z[:, 0] ** 2),
                                 lambda z: 2 * z)


@pytest.mark.parametrize("method", [jk.ConicJKO(), jk.EntropicJKO(eps=1e-2)], ids=["conic", "entropic"])
@pytest.mark.parametrize("F, name", [(NAN_POTENTIAL, "Potential V"), (NAN_INTERACTION, "Interaction W")])
def test_nan_from_a_user_callable_is_named_on_a_grid(method, F, name):
    with pytest.raises(ValueError, match=f"{name}.*returned \\[nan\\] at the point"):
        method.step(F + jk.Entropy(), jk.Wasserstein(), MU, 0.05)


@pytest.mark.parametrize("method", [jk.ParticleJKO(), jk.Splitting(), jk.ExplicitEuler()],
                         ids=["particle", "splitting", "explicit"])
@pytest.mark.parametrize("F, name", [(NAN_POTENTIAL, "Potential V"), (NAN_GRADIENT, "Potential grad_V"),
                                     (NAN_INTERACTION, "Interaction W")])
def test_nan_from_a_user_callable_is_named_on_particles(method, F, name):
    with pytest.raises(ValueError, match=f"{name}.*returned"):
        method.step(F, jk.Wasserstein(), PARTICLES, 0.05)


def test_nan_where_the_particles_move_is_named_not_a_solver_failure():
    """NaN only beyond x = 2.05, where the drift carries the last particle: before, a Newton
    "Hessian not positive definite" or an "overflow" error that blamed tau."""
    F = jk.Potential(lambda x: np.where(x[:, 0] > 2.05, np.nan, -3 * x[:, 0]),
                     lambda x: np.where(x > 2.05, np.nan, -3 + 0 * x))
    for method in (jk.ParticleJKO(), jk.ExplicitEuler()):
        with pytest.raises(ValueError, match=r"Potential V returned \[nan\] at the point \[2.15"):
            method.step(F, jk.Wasserstein(), PARTICLES, 0.05)


def test_kl_log_density_nan_is_named_but_minus_inf_is_a_zero_target():
    with pytest.raises(ValueError, match="KL log-density returned"):
        jk.KL(lambda x: np.where(x[:, 0] > 1.5, np.nan, 0.0)).value(MU)
    zero_tail = jk.KL(lambda x: np.where(x[:, 0] > 1.5, -np.inf, -x[:, 0] ** 2 / 2))
    assert zero_tail.value(MU) == np.inf  # mu has mass where the target has none
