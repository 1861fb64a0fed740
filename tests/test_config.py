"""Configs as data: every field checked before any computation, errors that name the field,
the example configs load and run, and trajectory files round-trip exactly."""

from pathlib import Path

import numpy as np
import pytest

import jko_ift as jk
from jko_ift.config import ConfigError, load_config, tomllib  # tomli on Python 3.10
from jko_ift.io import read_metadata, save_trajectory

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
EXAMPLE_CONFIGS = sorted(EXAMPLES.glob("*.toml"))


def explicit_config(**changes) -> dict:
    """A small explicit problem: IFT flow of 1/2 MMD^2 on a 6 x 6 grid."""
    config = {
        "problem": {
            "support": {"lo": [-3.0, -3.0], "hi": [3.0, 3.0], "shape": [6, 6]},
            "initial": {"kind": "gaussian", "mean": [1.0, 1.0], "cov": 0.5},
            "energy": {"kind": "mmd2",
                       "target": {"kind": "gaussian", "mean": [-1.0, 0.0], "cov": [1.0, 0.5]}},
            "kernel": {"kind": "gaussian", "sigma": 1.5},
        },
        "geometry": {"kind": "ift", "alpha": 2.0, "beta": 1.0},
        "method": {"kind": "conic"},
        "run": {"tau": 0.2, "steps": 2},
    }
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        table = config
        for key in parents:
            table = table[key]
        if value is None:
            del table[last]
        else:
            table[last] = value
    return config


def error_of(config) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    return caught.value


#: Cells per axis of the 2-D example grids when the tests run them (the full grids take seconds).
TEST_CELLS_2D = 10


@pytest.mark.filterwarnings("ignore::jko_ift.GridLockingWarning")  # coarser test grid
@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.stem)
def test_example_configs_load_and_run_two_steps(path):
    spec = load_config(path)  # the file as shipped is valid
    assert spec.source == str(path)
    with open(path, "rb") as stream:
        config = tomllib.load(stream)
    support = config["problem"].get("support")
    if support is not None and len(support["shape"]) == 2:
        support["shape"] = [min(n, TEST_CELLS_2D) for n in support["shape"]]
        spec = load_config(config)
    options = {"steps": 2} if not spec.adaptive else {}
    trajectory = spec.solve(progress=False, save_at=None, **options)
    assert len(trajectory) == 3
    assert trajectory.energies[-1] < trajectory.energies[0]


def test_there_are_example_configs():
    assert {p.stem for p in EXAMPLE_CONFIGS} >= {"mmd_flow", "ornstein_uhlenbeck", "ift_mixture"}


def test_explicit_config_builds_the_library_objects():
    spec = load_config(explicit_config())
    assert isinstance(spec.geometry, jk.IFT) and spec.geometry.alpha == 2.0
    assert spec.geometry.kernel == jk.Gaussian(1.5)
    assert isinstance(spec.energy, jk.MMD2)
    assert spec.initial.grid.shape == (6, 6) and np.isclose(spec.initial.mass, 1.0)
    assert isinstance(spec.make_method(), jk.ConicJKO)
    assert spec.run.tau == 0.2 and spec.run.steps == 2


def test_named_problem_with_overrides_and_geometry_override():
    spec = load_config({"problem": {"name": "mmd_flow", "cells": 12},
                        "geometry": {"kind": "ift", "alpha": 0.5},
                        "run": {"tau": 0.5, "t_final": 1.2}})
    assert spec.initial.n == 12
    assert isinstance(spec.geometry, jk.IFT) and spec.geometry.kernel == jk.Gaussian(1.0)
    assert spec.run.steps == 3  # ceil(1.2 / 0.5)


def test_energy_sums_and_scales():
    config = explicit_config(**{"problem.energy": [{"kind": "entropy"},
                                                   {"kind": "potential_quadratic", "kappa": 2.0,
                                                    "scale": 0.5}],
                                "geometry": {"kind": "wfr", "alpha": 1.0, "beta": 2.0}})
    spec = load_config(config)
    mu = spec.initial
    expected = jk.Entropy().value(mu) + 0.5 * float(mu.weights @ (mu.points**2).sum(1))
    assert np.isclose(spec.energy.value(mu), expected)


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"geometry.kind": "ifft"}, "geometry.kind", ["did you mean 'ift'", "'wasserstein'", "'wfr'"]),
    ({"geometry.alpah": 1.0}, "geometry.alpah", ["did you mean 'alpha'", "'beta'"]),
    ({"geometry.ridge": 1e-3, "geometry.kind": "wfr"}, "geometry.ridge", ["'alpha'"]),
    ({"geometry.kind": None}, "geometry.kind", ["missing", "'ift'"]),
    ({"method.kind": "conical"}, "method.kind", ["did you mean 'conic'", "'entropic'"]),
    ({"method.solvr": "SCS"}, "method.solvr", ["did you mean 'solver'"]),
    ({"method.solver": "MOSEK-X"}, "method", ["unknown solver"]),
    ({"run.tau": None}, "run.tau", ["missing"]),
    ({"run.tau": -1.0}, "run.tau", ["positive"]),
    ({"run.stpes": 3}, "run.stpes", ["did you mean 'steps'"]),
    ({"run.t_final": 1.0}, "run.steps", ["not both"]),
    ({"run.save_at": [0.3]}, "run.save_at", ["multiples of tau"]),
    ({"problem.support.shape": [6, 6, 6, 6]}, "problem.support.shape", ["1 to 3 axes"]),
    ({"problem.support.lo": [0.0]}, "problem.support.lo", ["2 number"]),
    ({"problem.initial.mean": None}, "problem.initial.mean", ["missing"]),
    ({"problem.energy.kind": "mmd"}, "problem.energy.kind", ["did you mean 'mmd2'", "'kl'"]),
    ({"problem.energy.target": {"kind": "paper_mixtur"}}, "problem.energy.target.kind",
     ["did you mean 'paper_mixture'"]),
    ({"problem.kernel.kind": "gausian"}, "problem.kernel.kind", ["did you mean 'gaussian'", "'imq'"]),
    ({"problem.kernel": None}, "problem.kernel", ["missing", "kernel"]),
    ({"problem.kernel.sigma": "wide"}, "problem.kernel.sigma", ["number"]),
    ({"geometri": {}}, "geometri", ["did you mean 'geometry'"]),
])
def test_config_errors_name_the_field_and_the_allowed_values(changes, field, words):
    error = error_of(explicit_config(**changes))
    assert error.field == field
    message = str(error)
    assert field in message
    for word in words:
        assert word in message, message


def test_unknown_named_problem_and_override():
    error = error_of({"problem": {"name": "mmd_flwo"}, "run": {"tau": 0.1, "steps": 1}})
    assert error.field == "problem.name" and "did you mean 'mmd_flow'" in str(error)
    error = error_of({"problem": {"name": "mmd_flow", "cell": 10}, "run": {"tau": 0.1, "steps": 1}})
    assert error.field == "problem.cell" and "did you mean 'cells'" in str(error)
    error = error_of({"problem": {"name": "mmd_flow", "cells": 2.5}, "run": {"tau": 0.1, "steps": 1}})
    assert error.field == "problem.cells"


def test_errors_come_before_any_computation(monkeypatch):
    calls = []
    monkeypatch.setattr(jk.ConicJKO, "step", lambda *args, **kwargs: calls.append(args))
    with pytest.raises(ConfigError):
        load_config(explicit_config(**{"run.stop_energy": "low"}))
    assert calls == []


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\ntau = 1\n")
    assert error_of(bad).field == "config"
    assert "no config file" in str(error_of(tmp_path / "missing.toml"))


def test_adaptive_run_section():
    spec = load_config(explicit_config(**{"run": {"t_final": 0.4, "adaptive": {"rtol": 1e-2, "atol": 1e-4},
                                                  "save_at": [0.2, 0.4]}}))
    assert spec.adaptive and spec.run.controller.rtol == 1e-2 and spec.run.t_final == 0.4
    error = error_of(explicit_config(**{"run": {"t_final": 0.4, "adaptive": {"rtoll": 1e-2}}}))
    assert error.field == "run.adaptive.rtoll" and "did you mean 'rtol'" in str(error)


# ---------------------------------------------------------------------------- trajectory files

@pytest.mark.filterwarnings("ignore::jko_ift.GridLockingWarning")  # coarse grid: fine for a file test
def test_trajectory_round_trip_is_exact(tmp_path):
    spec = load_config(explicit_config())
    trajectory = spec.solve(progress=False)
    trajectory.stats[0]["error"] = np.inf  # non-finite stats survive too
    path = save_trajectory(tmp_path / "run" / "trajectory.npz", trajectory, metadata={"note": "x"})
    loaded = jk.load(path)
    assert isinstance(loaded, jk.Trajectory)
    np.testing.assert_array_equal(loaded.times, trajectory.times)
    np.testing.assert_array_equal(loaded.energies, trajectory.energies)
    for mu, nu in zip(loaded.measures, trajectory.measures, strict=True):
        np.testing.assert_array_equal(mu.weights, nu.weights)
        np.testing.assert_array_equal(mu.points, nu.points)
        assert mu.grid.shape == nu.grid.shape and mu.grid.lo == nu.grid.lo and mu.grid.hi == nu.grid.hi
        assert mu.cell_volume == nu.cell_volume
    assert loaded.stats == [dict(s) for s in trajectory.stats]
    assert loaded.stop_reason == trajectory.stop_reason
    assert read_metadata(path) == {"note": "x"}
    assert not list(path.parent.glob(".*partial*"))  # no temporary file left behind


def test_trajectory_round_trip_without_grid(tmp_path):
    rng = np.random.default_rng(0)
    measures = [jk.Measure(rng.normal(size=(n, 2)), rng.random(n)) for n in (5, 7)]
    trajectory = jk.Trajectory(np.array([0.0, 0.5]), measures, np.array([2.0, 1.0]), [{"tau": 0.5}], "energy")
    loaded = jk.load(save_trajectory(tmp_path / "particles.npz", trajectory))
    for mu, nu in zip(loaded.measures, measures, strict=True):
        assert mu.grid is None
        np.testing.assert_array_equal(mu.points, nu.points)
        np.testing.assert_array_equal(mu.weights, nu.weights)
    assert loaded.stop_reason == "energy"


def test_load_rejects_other_files(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a jko_ift trajectory"):
        jk.load(other)
    with pytest.raises(ValueError, match="no trajectory file"):
        jk.load(tmp_path / "absent.npz")


@pytest.mark.parametrize("kind", ["particle", "splitting", "explicit"])
def test_particle_methods_run_from_a_config(kind):
    spec = load_config({"problem": {"name": "mmd_flow", "cells": 12},
                        "method": {"kind": kind}, "run": {"tau": 0.2, "steps": 2}})
    trajectory = jk.solve(spec.energy, spec.geometry, spec.initial, method=spec.make_method(),
                          progress=False, **spec.solve_options())
    assert len(trajectory) == 3
    assert trajectory.energies[-1] < trajectory.energies[0]
