"""``jko-ift run CONFIG``: the results folder, checkpoints, and --resume after a crash giving
the same result, bit for bit, as an uninterrupted run."""

import json
import logging

import numpy as np
import pytest
from conftest import SMALL_CONFIG

import jko_ift as jk
import jko_ift.io as jio
from jko_ift.cli import build_parser, main
from jko_ift.config import load_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_OPTIONS = ("--out", "--resume", "--quiet", "--checkpoint-every", "--verbose")



@pytest.fixture(autouse=True)
def _restore_log_level():
    """The CLI sets the level of the 'jko_ift' logger (--quiet, --verbose); put it back."""
    logger = logging.getLogger("jko_ift")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL_CONFIG)
    return path


def weights(trajectory):
    return np.stack([mu.weights for mu in trajectory.measures])


def test_run_writes_the_results_folder(config, tmp_path):
    out = tmp_path / "results"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"summary.json", "trajectory.npz", "energy.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["problem"] == {"name": "mmd_flow", "cells": 10}
    assert set(summary["versions"]) >= {"jko_ift", "numpy", "cvxpy", "POT"}
    assert summary["stop_reason"] == "steps" and summary["steps"] == 5
    assert len(summary["per_step"]["energies"]) == 6 and len(summary["per_step"]["wall_time"]) == 5
    trajectory = jk.load(out / "trajectory.npz")
    np.testing.assert_allclose(trajectory.times, 0.3 * np.arange(6))
    np.testing.assert_array_equal(trajectory.energies, summary["per_step"]["energies"])
    assert trajectory.final.grid is not None
    assert (out / "energy.png").read_bytes().startswith(PNG_SIGNATURE)
    # the same steps as jk.solve on the same problem
    spec_run = jk.solve(*_problem(), tau=0.3, steps=5, progress=False)
    np.testing.assert_allclose(weights(trajectory), weights(spec_run), atol=1e-9)


def _problem():
    from jko_ift.problems import mmd_flow
    problem = mmd_flow(cells=10)
    return problem.energy, problem.geometry, problem.initial


class Crash(BaseException):
    """A crash that nothing catches (as a kill): the CLI turns every Exception into a message."""


def crash_after_first_checkpoint(config, out, monkeypatch) -> list:
    """Run ``config`` with checkpoints every 2 (steps or save times) and crash right after the
    first checkpoint is written; returns the steps_done of the checkpoints written."""
    real_save = jio.save_trajectory
    written = []

    def save_then_crash(path, trajectory, metadata=None):
        real_save(path, trajectory, metadata)
        written.append(metadata["steps_done"])
        raise Crash

    monkeypatch.setattr(jio, "save_trajectory", save_then_crash)
    with pytest.raises(Crash):
        main(["run", str(config), "--out", str(out), "--checkpoint-every", "2", "--quiet"])
    monkeypatch.setattr(jio, "save_trajectory", real_save)
    return written


def test_resume_after_a_crash_is_identical_to_an_uninterrupted_run(config, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert main(["run", str(config), "--out", str(straight), "--checkpoint-every", "2", "--quiet"]) == 0

    # crash during the second chunk (steps 3-4), after the checkpoint at step 2 was written
    crashed = tmp_path / "crashed"
    assert crash_after_first_checkpoint(config, crashed, monkeypatch) == [2]
    assert jio.read_metadata(crashed / "checkpoint.npz")["steps_done"] == 2
    assert not (crashed / "trajectory.npz").exists()

    assert main(["run", str(config), "--out", str(crashed), "--resume", "--quiet"]) == 0
    resumed, reference = jk.load(crashed / "trajectory.npz"), jk.load(straight / "trajectory.npz")
    np.testing.assert_array_equal(weights(resumed), weights(reference))  # exact, not close
    np.testing.assert_array_equal(resumed.times, reference.times)
    np.testing.assert_array_equal(resumed.energies, reference.energies)
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 5
    assert [s["step"] for s in resumed.stats] == [1, 2, 3, 4, 5]


ADAPTIVE_CONFIG = """
[problem]
name = "mmd_flow"
cells = 10

[method]
kind = "conic"

[run]
t_final = 2.0
save_at = [0.5, 1.0, 1.5, 2.0]

[run.adaptive]
rtol = 1e-2
atol = 0.0
"""


def test_adaptive_run_resumed_after_a_crash_is_identical(tmp_path, monkeypatch):
    """Checkpoints at every second save time; a crash after the first, then --resume."""
    config = tmp_path / "adaptive.toml"
    config.write_text(ADAPTIVE_CONFIG)
    straight = tmp_path / "straight"
    assert main(["run", str(config), "--out", str(straight), "--checkpoint-every", "2", "--quiet"]) == 0

    crashed = tmp_path / "crashed"
    crash_after_first_checkpoint(config, crashed, monkeypatch)
    first_chunk = jk.load(crashed / "checkpoint.npz")
    assert first_chunk.times[-1] == pytest.approx(1.0)  # the second save time

    assert main(["run", str(config), "--out", str(crashed), "--resume", "--quiet"]) == 0
    resumed, reference = jk.load(crashed / "trajectory.npz"), jk.load(straight / "trajectory.npz")
    np.testing.assert_array_equal(weights(resumed), weights(reference))  # exact, not close
    np.testing.assert_array_equal(resumed.times, reference.times)
    np.testing.assert_allclose(reference.times, [0.0, 0.5, 1.0, 1.5, 2.0], rtol=1e-12)
    assert resumed.stop_reason == "t_final"
    # the chunks do not spoil accuracy: the MMD flow's closed form, as an unchunked run
    from jko_ift.problems import mmd_flow
    problem = mmd_flow(cells=10)
    whole = jk.solve(problem.energy, problem.geometry, problem.initial, t_final=2.0,
                     controller=jk.StepController(rtol=1e-2, atol=0.0), save_at=[0.5, 1.0, 1.5, 2.0],
                     progress=False)
    assert problem.error(reference) < 2 * problem.error(whole)


def test_adaptive_checkpoints_need_save_times(tmp_path, capsys):
    config = tmp_path / "adaptive.toml"
    config.write_text(ADAPTIVE_CONFIG.replace("save_at = [0.5, 1.0, 1.5, 2.0]\n", ""))
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--checkpoint-every", "2",
                 "--quiet"]) == 2
    assert "add [run] save_at" in capsys.readouterr().err


def test_a_half_written_checkpoint_never_replaces_the_last_one(config, tmp_path, monkeypatch):
    out = tmp_path / "results"
    real_savez = np.savez_compressed
    calls = []

    def fail_on_second(stream, **arrays):
        calls.append(1)
        if len(calls) == 2:
            stream.write(b"half a file")
            raise Crash
        real_savez(stream, **arrays)

    monkeypatch.setattr(np, "savez_compressed", fail_on_second)
    with pytest.raises(Crash):
        main(["run", str(config), "--out", str(out), "--checkpoint-every", "2", "--quiet"])
    monkeypatch.setattr(np, "savez_compressed", real_savez)
    assert jio.read_metadata(out / "checkpoint.npz")["steps_done"] == 2  # the first one, intact
    # no temporary file left; summary.json says the run did not finish
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["status"] == "running"


def test_resume_refuses_a_checkpoint_of_another_config(config, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", str(config), "--out", str(out), "--checkpoint-every", "2", "--quiet"]) == 0
    config.write_text(SMALL_CONFIG.replace("tau = 0.3", "tau = 0.2"))
    assert main(["run", str(config), "--out", str(out), "--resume", "--quiet"]) == 2
    assert "another config" in capsys.readouterr().err


def test_config_error_is_reported_before_any_computation(tmp_path, capsys):
    path = tmp_path / "typo.toml"
    path.write_text(SMALL_CONFIG.replace('kind = "conic"', 'kind = "conik"'))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "method.kind" in err and "did you mean 'conic'" in err and "'entropic'" in err
    assert not (tmp_path / "out").exists()


def test_run_help_explains_each_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in RUN_OPTIONS + ("CONFIG",):
        assert option in text
    assert "checkpoint.npz" in text and "jk.load" in text


def particle_config(small_ift_particles) -> str:
    """The shipped IFT particle config on 20 particles and 30 samples, 4 steps."""
    return small_ift_particles(particles=20, samples=30, seed=1)


def test_particle_config_runs_checkpoints_and_reloads(tmp_path, small_ift_particles):
    path = tmp_path / "particles.toml"
    path.write_text(particle_config(small_ift_particles))
    out = tmp_path / "results"
    assert main(["run", str(path), "--out", str(out), "--checkpoint-every", "2", "--quiet"]) == 0
    trajectory = jk.load(out / "trajectory.npz")
    assert len(trajectory) == 5 and all(mu.grid is None for mu in trajectory.measures)
    assert trajectory.final.points.shape == (20, 2)
    reference = load_config(path).solve(progress=False)
    np.testing.assert_array_equal(trajectory.energies, reference.energies)
    np.testing.assert_array_equal(trajectory.final.points, reference.final.points)
    np.testing.assert_array_equal(trajectory.final.weights, reference.final.weights)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["problem"]["support"] == {"kind": "particles", "n": 20, "seed": 1}


def test_particle_config_errors_name_the_field_on_the_command_line(tmp_path, capsys,
                                                                  small_ift_particles):
    PARTICLE_CONFIG = particle_config(small_ift_particles)
    path = tmp_path / "bad.toml"
    path.write_text(PARTICLE_CONFIG.replace(
        'kind = "mmd2"\ntarget = { kind = "paper_mixture", n = 30 }   # 100 samples, weights 1/100',
        'kind = "entropy"'))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "problem.energy.kind" in err and "particle supports in d = 2" in err and "grid support" in err
    path.write_text(PARTICLE_CONFIG.replace("seed = 1 ", "shape = [10, 10]\nseed = 1 "))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "problem.support.shape" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- progress and logging

def test_quiet_prints_only_the_results_folder(config, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", str(config), "--out", str(out), "--checkpoint-every", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"results in {out.absolute()}\n"
    assert captured.err == ""


def test_one_progress_bar_across_checkpoint_chunks(config, tmp_path, capsys):
    """Chunks of 2 steps, one bar of 5 steps on stderr (with the time and energy), stdout clean."""
    out = tmp_path / "results"
    assert main(["run", str(config), "--out", str(out), "--checkpoint-every", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"results in {out.absolute()}\n"
    assert "5/5" in captured.err and "energy=" in captured.err and "t=1.5" in captured.err
    assert "2/2" not in captured.err and "1/1" not in captured.err  # no bar per chunk


def test_resumed_bar_starts_at_the_checkpoint(config, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results"
    crash_after_first_checkpoint(config, out, monkeypatch)
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and " 2/5 " in err and "5/5" in err and " 0/5 " not in err


def test_verbose_logs_every_step(config, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", str(config), "--out", str(out), "-v", "--checkpoint-every", "2"]) == 0
    err = capsys.readouterr().err
    for step in range(1, 6):
        assert f"jko-ift: step {step} of 5: t = {0.3 * step:.6g}, energy" in err
    assert "checkpoint at step 4 written" in err
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args(["run", "x.toml", "--quiet", "--verbose"])
