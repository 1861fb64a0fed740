"""Configs as data: every field checked before any computation, errors that name the field,
the example configs load and run (trajectory files: test_io.py)."""

from pathlib import Path

import numpy as np
import pytest

import jko_ift as jk
from jko_ift.config import ConfigError, load_config, tomllib  # tomli on Python 3.10

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
    return _apply(config, **changes)


def _apply(config: dict, **changes) -> dict:
    """Set (or with None remove) dotted fields of ``config`` in place; return it."""
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
    if support is not None and support.get("kind", "grid") == "grid" and len(support["shape"]) == 2:
        support["shape"] = [min(n, TEST_CELLS_2D) for n in support["shape"]]
        spec = load_config(config)
    options = {"steps": 2} if not spec.adaptive else {}
    trajectory = spec.solve(progress=False, save_at=None, **options)
    assert len(trajectory) == 3
    assert trajectory.energies[-1] < trajectory.energies[0]


def test_there_are_example_configs():
    assert {p.stem for p in EXAMPLE_CONFIGS} >= {"mmd_flow", "ornstein_uhlenbeck", "ift_mixture",
                                                 "ift_particles"}


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
    ({"method.solver": "MOSEK-X"}, "method.solver", ["unknown solver"]),
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
    spec = load_config(explicit_config(**{"run": {"t_final": 0.4, "adaptive": {
        "rtol": 1e-2, "atol": 0.0, "estimate": "doubling"}}}))
    assert spec.run.controller.estimate == "doubling" and spec.run.controller.atol == 0.0
    error = error_of(explicit_config(**{"run": {"t_final": 0.4, "adaptive": {"estimate": "doubleing"}}}))
    assert error.field == "run.adaptive.estimate" and "did you mean 'doubling'" in str(error)
    assert "'extrapolation', 'doubling'" in str(error)


@pytest.mark.parametrize("kind", ["particle", "splitting", "explicit"])
def test_particle_methods_run_from_a_config(kind):
    spec = load_config({"problem": {"name": "mmd_flow", "cells": 12},
                        "method": {"kind": kind}, "run": {"tau": 0.2, "steps": 2}})
    trajectory = jk.solve(spec.energy, spec.geometry, spec.initial, method=spec.make_method(),
                          progress=False, **spec.solve_options())
    assert len(trajectory) == 3
    assert trajectory.energies[-1] < trajectory.energies[0]


# ---------------------------------------------------------------------------- particle supports

def particle_config(**changes) -> dict:
    """A small particle problem: the paper's IFT particle algorithm on 20 particles."""
    config = {
        "problem": {
            "support": {"kind": "particles", "n": 20, "seed": 3},
            "initial": {"kind": "gaussian", "mean": [5.0, 5.0], "cov": 1.0},
            "energy": {"kind": "mmd2", "target": {"kind": "paper_mixture", "n": 30}},
            "kernel": {"kind": "gaussian", "sigma": 10.0},
        },
        "geometry": {"kind": "ift", "alpha": 50.0, "beta": 0.1, "conserve_mass": True},
        "method": {"kind": "splitting", "transport": "explicit", "reaction": "exact"},
        "run": {"tau": 1.0, "steps": 3},
    }
    return _apply(config, **changes)


@pytest.mark.filterwarnings("ignore::jko_ift.DissipationWarning")  # explicit steps promise none
def test_particle_example_is_the_papers_seed_zero_run():
    """examples/configs/ift_particles.toml draws the particles and samples of
    problems.paper_2d("mixture", seed=0) and runs the authors' loop with their step sizes
    (problems.paper_scheme): the same steps, bit for bit."""
    from jko_ift.problems import paper_2d, paper_scheme

    spec = load_config(EXAMPLES / "ift_particles.toml")
    experiment = paper_2d("mixture", particles=100, samples=100, seed=0)
    assert spec.initial.grid is None
    np.testing.assert_array_equal(spec.initial.points, experiment.initial.points)
    np.testing.assert_array_equal(spec.initial.weights, experiment.initial.weights)
    np.testing.assert_array_equal(spec.energy.target.points, experiment.target.points)
    assert spec.energy.kernel == experiment.kernel
    ours = spec.solve(progress=False, steps=5, save_at=None)
    scheme = paper_scheme(experiment.kernel, lr=50.0, n_particles=100, weight_lr=0.1)
    assert spec.run.tau == scheme.tau and spec.geometry == scheme.geometry
    theirs = jk.solve(experiment.energy, scheme.geometry, experiment.initial, tau=scheme.tau,
                      steps=5, method=scheme.method, progress=False)
    np.testing.assert_array_equal(ours.energies, theirs.energies)
    np.testing.assert_array_equal(ours.final.points, theirs.final.points)


def test_particle_support_draws_the_initial_measure():
    spec = load_config(particle_config(**{"problem.initial": {"kind": "gaussian", "mean": [1.0, -2.0, 0.5],
                                                              "cov": [[2.0, 0.5, 0.0], [0.5, 1.0, 0.0],
                                                                      [0.0, 0.0, 0.5]], "mass": 2.0},
                                          "problem.support.n": 4000,
                                          "problem.energy.target": {"kind": "gaussian", "mean": [0.0] * 3,
                                                                    "cov": 1.0, "seed": 7}}))
    mu = spec.initial
    assert mu.points.shape == (4000, 3) and mu.grid is None
    np.testing.assert_allclose(mu.weights, 2.0 / 4000)
    # the sample mean and covariance of 4000 draws: within 5 standard errors (~ 5 / sqrt(4000))
    np.testing.assert_allclose(mu.mean(), [1.0, -2.0, 0.5], atol=5 * np.sqrt(2.0 / 4000))
    np.testing.assert_allclose(mu.covariance(), [[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.5]],
                               atol=5 * 2.0 * np.sqrt(2.0 / 4000))
    target = spec.energy.target
    assert target.points.shape == (4000, 3) and np.isclose(target.mass, 1.0)  # n: as many as particles
    # a target with its own seed does not depend on the particles
    again = load_config(particle_config(**{"problem.support.n": 10, "problem.support.seed": 0,
                                           "problem.initial.mean": [0.0, 0.0, 0.0],
                                           "problem.energy.target": {"kind": "gaussian", "mean": [0.0] * 3,
                                                                     "cov": 1.0, "seed": 7, "n": 4000}}))
    np.testing.assert_array_equal(again.energy.target.points, target.points)
    # same seed, same draw; another seed, another draw
    assert np.array_equal(load_config(particle_config()).initial.points,
                          load_config(particle_config()).initial.points)
    assert not np.array_equal(load_config(particle_config()).initial.points,
                              load_config(particle_config(**{"problem.support.seed": 4})).initial.points)


@pytest.mark.parametrize("kind", ["conic", "particle", "explicit"])
def test_particle_config_runs_with_fixed_and_moving_support_methods(kind):
    """Fixed-support methods run on particles too (the weights change, the points stay)."""
    spec = load_config(particle_config(**{"method": {"kind": kind}, "geometry.kind": "mmd",
                                          "geometry.alpha": None, "geometry.beta": None}))
    trajectory = spec.solve(progress=False)
    assert len(trajectory) == 4 and trajectory.energies[-1] < trajectory.energies[0]
    assert trajectory.final.grid is None


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"problem.support.kind": "particle"}, "problem.support.kind", ["did you mean 'particles'", "'grid'"]),
    ({"problem.support.shape": [10, 10]}, "problem.support.shape", ["grid supports", "'n', 'seed'"]),
    ({"problem.support.n": None}, "problem.support.n", ["missing", "number of particles"]),
    ({"problem.support.n": 0}, "problem.support.n", ["positive whole number"]),
    ({"problem.support.seed": -1}, "problem.support.seed", ["whole number >= 0"]),
    ({"problem.support.sed": 1}, "problem.support.sed", ["did you mean 'seed'"]),
    ({"problem.initial.normalize": True}, "problem.initial.normalize", ["grid field", "'mass'"]),
    ({"problem.initial.mass": -1.0}, "problem.initial.mass", ["positive"]),
    ({"problem.initial.cov": [1.0, -1.0]}, "problem.initial.cov", ["positive"]),
    ({"problem.energy.target.n": 0}, "problem.energy.target.n", ["positive whole number"]),
    ({"problem.energy.target.sed": 5}, "problem.energy.target.sed", ["did you mean 'seed'", "'n'"]),
    ({"problem.initial.mean": [0.0, 0.0, 0.0]}, "problem.energy.target.kind", ["2-D target", "3-D"]),
    ({"problem.energy": {"kind": "entropy"}}, "problem.energy.kind", ["d = 2", "grid support"]),
    ({"problem.energy": {"kind": "porous_medium"}}, "problem.energy.kind", ["d = 2", "grid support"]),
    ({"problem.energy": {"kind": "kl", "target": {"kind": "paper_mixture"}}}, "problem.energy.kind",
     ["mmd2", "grid support"]),
])
def test_particle_config_errors_name_the_field(changes, field, words):
    error = error_of(particle_config(**changes))
    assert error.field == field
    for word in words:
        assert word in str(error), str(error)


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"problem.support.n": 10}, "problem.support.n", ["particles supports", "'lo', 'hi', 'shape'"]),
    ({"problem.initial.mass": 2.0}, "problem.initial.mass", ["particle supports", "normalize"]),
    ({"problem.energy.target.n": 10}, "problem.energy.target.n", ["particle support", "grid's points"]),
])
def test_particle_fields_on_a_grid_name_the_field(changes, field, words):
    error = error_of(explicit_config(**changes))
    assert error.field == field
    for word in words:
        assert word in str(error), str(error)


def _entropy_on_1d_particles() -> bool:
    try:
        jk.Entropy().value(jk.Measure(np.linspace(0.0, 1.0, 5)[:, None], np.full(5, 0.2)))
    except ValueError:
        return False
    return True


def test_entropy_on_1d_particles_is_allowed_only_where_the_energy_evaluates_it():
    config = particle_config(**{"problem.initial": {"kind": "gaussian", "mean": [0.0], "cov": 1.0},
                                "problem.energy": [{"kind": "entropy"}, {"kind": "potential_quadratic"}],
                                "geometry": {"kind": "wasserstein"}, "method": {"kind": "particle"}})
    if not _entropy_on_1d_particles():
        error = error_of(config)
        assert error.field == "problem.energy[0].kind" and "1-D particle measure" in str(error)
        assert "grid support" in str(error)
        return
    spec = load_config(config)  # the Lagrangian entropy of 1-D particles (sorted when drawn)
    assert spec.initial.dim == 1 and np.all(np.diff(spec.initial.points[:, 0]) > 0)
    trajectory = spec.solve(progress=False, steps=2)
    assert trajectory.energies[-1] < trajectory.energies[0]
    error = error_of(_apply(config, **{"method": {"kind": "conic"}}))  # fixed points need a cell volume
    assert error.field == "method.kind" and "particle method" in str(error)


# ------------------------------------------------------------------------- hostile configs

def named_config(**changes) -> dict:
    config = {"problem": {"name": "mmd_flow", "cells": 10}, "method": {"kind": "conic"},
              "run": {"tau": 0.25, "steps": 2}}
    return _apply(config, **changes)


@pytest.mark.parametrize(("config", "field", "words"), [
    (named_config(**{"problem.name": ["mmd_flow"]}), "problem.name", ["unknown problem"]),
    (named_config(**{"problem.t_final": -1.0}), "problem.t_final", ["positive"]),
    (named_config(**{"method.cache_size": -1}), "method.cache_size", ["positive whole number"]),
    (named_config(**{"method.gap_tol": -1.0}), "method.gap_tol", ["(0, 1]"]),
    (named_config(**{"method.gap_tol": "tight"}), "method.gap_tol", ["(0, 1]"]),
    (named_config(**{"method": {"kind": "splitting", "max_iter": -5}}), "method.max_iter", ["-5"]),
    (named_config(**{"method": {"kind": "explicit", "noise_steps": 2.5}}), "method.noise_steps",
     ["whole number"]),
    (named_config(**{"method.solver_options": {"bogus": 1}}), "method.solver_options.bogus",
     ["unknown CLARABEL setting"]),
    (named_config(**{"method.solver": "SCS", "method.solver_options": {"log_csv_filename": "x.csv"}}),
     "method.solver_options.log_csv_filename", ["write a file"]),
    (named_config(**{"run.steps": None, "run.tau": 1e-300, "run.t_final": 1e10}), "run.tau",
     ["steps, more than"]),
    (named_config(**{"run.steps": 10**12}), "run.steps", ["more than"]),
    (named_config(**{"problem.cells": 1_000_000_000}), "problem.cells", ["GiB", "available"]),
    (named_config(**{"problem.cells": 100_000, "run.steps": 10**7}), "run.steps",
     ["measures", "save_at"]),
    (explicit_config(**{"problem.support.shape": [100000, 100000]}), "problem.support.shape",
     ["GiB", "available"]),
    (explicit_config(**{"problem.support": {"kind": "particles", "n": 10**12},
                        "problem.initial": {"kind": "gaussian", "mean": [0.0, 0.0], "cov": 1.0}}),
     "problem.support.n", ["GiB"]),
])
def test_hostile_configs_get_a_config_error_naming_the_field(config, field, words):
    """Each of these gave a traceback (TypeError, OverflowError, MemoryError), ran silently
    (t_final = -1: one step) or hung (gap_tol = -1)."""
    error = error_of(config)
    assert error.field == field, str(error)
    for word in words:
        assert word in str(error), str(error)


def test_unreadable_files_name_the_file(tmp_path):
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"[run]\ntau = 0.1 # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin.toml is not UTF-8 text.*0xe9"):
        load_config(latin)
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="deep.toml nests arrays or tables too deeply"):
        load_config(deep)
