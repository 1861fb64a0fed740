"""``runner.run_config`` through ``jko-ift run``: the results folder, checkpoints and resume (bit for bit
the uninterrupted run), the progress bar and log; then fault injection: corrupted, truncated and
altered checkpoints, folders that cannot take the results, two runs into one folder, Ctrl-C and kills
at random points. Whatever happens, no result is lost or silently replaced, and no input ends in a
traceback."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_CONFIG

import jko_ift as jk
import jko_ift.io as jio
import jko_ift.runner as jrun
from jko_ift.cli import EXIT_CODES, build_parser, main
from jko_ift.config import RunSpec, load_config
from jko_ift.methods import SolverError

REPO = Path(__file__).resolve().parents[1]

#: The same flow run long enough to be killed in the middle: each step with its checkpoint takes
#: 20 to 100 ms on this machine, so 30 steps last about 1 to 3 s.
LONG_CONFIG = SMALL_CONFIG.replace("steps = 5", "steps = 30")
#: Seconds a subprocess may take to start (importing cvxpy and POT takes 3 to 8 s on 2 shared
#: cores) and write its first checkpoint.
START_TIMEOUT_S = 90
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(config, out, *options) -> int:
    return main(["run", str(config), "--out", str(out), "--quiet", *options])


def weights(trajectory):
    return np.stack([mu.weights for mu in trajectory.measures])


def status(out) -> str:
    return json.loads((out / "summary.json").read_text())["status"]


def uninterrupted(tmp_path_factory, config: str, every: int):
    """The trajectory of an uninterrupted run of ``config`` with checkpoints every ``every`` steps."""
    folder = tmp_path_factory.mktemp("reference")
    (folder / "config.toml").write_text(config)
    assert run(folder / "config.toml", folder / "out", "--checkpoint-every", str(every)) == 0
    return jk.load(folder / "out" / "trajectory.npz")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of SMALL_CONFIG with checkpoints every 2 steps."""
    return uninterrupted(tmp_path_factory, SMALL_CONFIG, 2)


@pytest.fixture
def no_compute(monkeypatch):
    """Any step computed fails the test: the faults below must be found before the compute."""
    def refuse(self):
        raise AssertionError("a step was computed before the fault was reported")
    monkeypatch.setattr(RunSpec, "make_method", refuse)


def assert_one_clear_message(err: str, *parts: str) -> None:
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err


# ---------------------------------------------------------------------------- runs, checkpoints, resume

def test_run_writes_the_results_folder(config, tmp_path):
    out = tmp_path / "results"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"summary.json", "trajectory.npz", "energy.png", "steps.csv"}
    summary = json.loads((out / "summary.json").read_text())
    # the per-step statistics, one row per step: what a slow or failed step is explained by
    steps = (out / "steps.csv").read_text().splitlines()
    assert steps[0].startswith("step,t,tau,accepted,wall_time,status,certificate") and len(steps) == 6
    assert steps[1].startswith("1,0.0,0.3,True,") and ",optimal," in steps[1]
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
    real_save = jrun.save_trajectory
    written = []

    def save_then_crash(path, trajectory, metadata=None):
        real_save(path, trajectory, metadata)
        written.append(metadata["steps_done"])
        raise Crash

    monkeypatch.setattr(jrun, "save_trajectory", save_then_crash)
    with pytest.raises(Crash):
        main(["run", str(config), "--out", str(out), "--checkpoint-every", "2", "--quiet"])
    monkeypatch.setattr(jrun, "save_trajectory", real_save)
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


class _Flagged(UserWarning):
    pass


def test_warnings_of_a_resumed_run_keep_their_step_numbers(config, tmp_path, monkeypatch):
    """A warning raised in every step, before and after a crash: summary.json lists it once, with
    the count and the first and last steps of the whole run."""
    real_make = RunSpec.make_method

    class Flagging:
        def __init__(self, method):
            self.method = method

        def step(self, *args, **kwargs):
            warnings.warn("flagged step", _Flagged, stacklevel=2)
            return self.method.step(*args, **kwargs)

    monkeypatch.setattr(RunSpec, "make_method", lambda self: Flagging(real_make(self)))
    out = tmp_path / "results"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crash_after_first_checkpoint(config, out, monkeypatch)
        assert run(config, out, "--resume") == 0
    listed = json.loads((out / "summary.json").read_text())["warnings"]
    assert [(w["category"], w["count"], w["first_step"], w["last_step"]) for w in listed] == [
        ("_Flagged", 5, 1, 5)]


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
    """Checkpoints every two accepted steps (between save times: the checkpoint keeps the
    controller's history); a crash after the first, then --resume."""
    config = tmp_path / "adaptive.toml"
    config.write_text(ADAPTIVE_CONFIG)
    straight = tmp_path / "straight"
    assert main(["run", str(config), "--out", str(straight), "--checkpoint-every", "2", "--quiet"]) == 0

    crashed = tmp_path / "crashed"
    crash_after_first_checkpoint(config, crashed, monkeypatch)
    first_chunk = jk.load(crashed / "checkpoint.npz")
    assert len(first_chunk.taus) == 2 and first_chunk.times[-1] < 0.5  # before the first save time
    assert jio.read_metadata(crashed / "checkpoint.npz")["run_state"]["controller"]["accepted"] == 2

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


def test_adaptive_checkpoints_need_no_save_times(tmp_path, monkeypatch):
    config = tmp_path / "adaptive.toml"
    config.write_text(ADAPTIVE_CONFIG.replace("save_at = [0.5, 1.0, 1.5, 2.0]\n", ""))
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(["run", str(config), "--out", str(straight), "--checkpoint-every", "2", "--quiet"]) == 0
    assert crash_after_first_checkpoint(config, crashed, monkeypatch) == [2]
    assert main(["run", str(config), "--out", str(crashed), "--resume", "--quiet"]) == 0
    resumed, reference = jk.load(crashed / "trajectory.npz"), jk.load(straight / "trajectory.npz")
    np.testing.assert_array_equal(weights(resumed), weights(reference))
    np.testing.assert_array_equal(resumed.times, reference.times)


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


# ---------------------------------------------------------------------------- progress and logging

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


# ---------------------------------------------------------------------------- faults: checkpoints

@pytest.fixture(scope="module")
def crashed_folder(tmp_path_factory):
    """A folder left by a run of SMALL_CONFIG killed after its checkpoint at step 2."""
    folder = tmp_path_factory.mktemp("crashed")
    (folder / "small.toml").write_text(SMALL_CONFIG)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _crash_after_first_checkpoint(folder / "small.toml", folder / "out", monkeypatch)
    return folder / "out"


@pytest.fixture
def crashed(crashed_folder, tmp_path) -> Path:
    """A copy of ``crashed_folder``'s checkpoint in a fresh folder; returns its path."""
    out = tmp_path / "crashed"
    shutil.copytree(crashed_folder, out)
    return out / "checkpoint.npz"


def _crash_after_first_checkpoint(config, out, monkeypatch) -> Path:
    real_save = jrun.save_trajectory

    class Kill(BaseException):
        pass

    def save_then_die(path, trajectory, metadata=None):
        real_save(path, trajectory, metadata)
        raise Kill

    monkeypatch.setattr(jrun, "save_trajectory", save_then_die)
    with pytest.raises(Kill):
        run(config, out, "--checkpoint-every", "2")
    monkeypatch.setattr(jrun, "save_trajectory", real_save)
    return out / "checkpoint.npz"


def _truncate(data: bytes, fraction: float) -> bytes:
    return data[:int(len(data) * fraction)]


def _flip(data: bytes, fraction: float) -> bytes:
    at = int(len(data) * fraction)
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


CORRUPTIONS = {
    "empty": lambda data: b"",
    "garbage": lambda data: b"not a checkpoint at all\n" * 10,
    "a pickle": lambda data: b"\x80\x04K\x01.",  # numpy would say 'allow_pickle'
    **{f"truncated to {f:.0%}": (lambda data, f=f: _truncate(data, f)) for f in (0.01, 0.3, 0.6, 0.9, 0.99)},
    **{f"byte flipped at {f:.0%}": (lambda data, f=f: _flip(data, f)) for f in (0.05, 0.4, 0.8)},
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_damaged_checkpoint_is_refused_by_name_or_resumes_exactly(name, config, crashed, capsys, reference):
    """Each damage gives exit 2 and one message naming the file, what is wrong and what to do,
    or (a flip in bytes nobody reads) a resume identical to the uninterrupted run."""
    checkpoint, out = crashed, crashed.parent
    checkpoint.write_bytes(CORRUPTIONS[name](checkpoint.read_bytes()))
    capsys.readouterr()
    code = run(config, out, "--resume")
    err = capsys.readouterr().err
    if code == 0:  # the damage missed every byte that is read: the run must be the same
        np.testing.assert_array_equal(weights(jk.load(out / "trajectory.npz")), weights(reference))
        return
    assert code == 2
    assert_one_clear_message(err, str(checkpoint), "delete", "without --resume")


def _rewrite(path: Path, change) -> None:
    """Rewrite the arrays of an .npz file after ``change(arrays)``, keeping its stored checksum."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    change(arrays)
    with open(path, "wb") as stream:
        np.savez_compressed(stream, **arrays)


def test_an_altered_checkpoint_is_refused_by_its_checksum(config, crashed, capsys):
    checkpoint, out = crashed, crashed.parent

    def double_a_weight(arrays):
        arrays["weights"] = arrays["weights"].copy()
        arrays["weights"][-1] *= 2

    _rewrite(checkpoint, double_a_weight)  # a well-formed file: only the checksum tells
    capsys.readouterr()
    assert run(config, out, "--resume") == 2
    assert_one_clear_message(capsys.readouterr().err, str(checkpoint), "checksum", "delete")
    with pytest.raises(jio.ResultsFileError, match="checksum"):
        jk.load(checkpoint)


def test_a_checkpoint_without_checksum_is_not_resumed(config, crashed, capsys):
    checkpoint, out = crashed, crashed.parent
    _rewrite(checkpoint, lambda arrays: arrays.pop(jio.CHECKSUM_KEY))
    capsys.readouterr()
    assert run(config, out, "--resume") == 2
    assert_one_clear_message(capsys.readouterr().err, "no checksum", "delete")
    assert jk.load(checkpoint).measures  # a plain load still reads files from before checksums


def test_a_checkpoint_whose_step_count_disagrees_with_its_states_is_refused(config, crashed, capsys):
    checkpoint, out = crashed, crashed.parent

    def claim_more_steps(arrays):
        metadata = json.loads(str(arrays["metadata"]))
        arrays["metadata"] = np.array(json.dumps(dict(metadata, steps_done=4)))
        arrays[jio.CHECKSUM_KEY] = np.array(jio._checksum(arrays))

    _rewrite(checkpoint, claim_more_steps)
    capsys.readouterr()
    assert run(config, out, "--resume") == 2
    assert_one_clear_message(capsys.readouterr().err, "inconsistent", "delete")


@pytest.mark.parametrize("damage", ["empty", "truncated", "not a zip"])
def test_load_names_a_damaged_trajectory_file(damage, config, tmp_path):
    out = tmp_path / "results"
    assert run(config, out) == 0
    path = out / "trajectory.npz"
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "not a zip": b"{}"}[damage])
    with pytest.raises(jio.ResultsFileError, match=str(path)):
        jk.load(path)


# ---------------------------------------------------------------------------- the results folder

def test_a_folder_that_cannot_be_created_is_refused_before_any_step(config, tmp_path, capsys, no_compute):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert run(config, blocker / "results") == 2  # a folder under a file: even root cannot make it
    assert_one_clear_message(capsys.readouterr().err, "cannot write results", "pass another --out")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_read_only_folder_is_refused_before_any_step(config, tmp_path, capsys, monkeypatch, no_compute):
    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o500)
    try:
        if os.access(out, os.W_OK):  # root writes anyway: make the probe fail as the OS would
            def denied(*args, **kwargs):
                raise PermissionError(13, "Permission denied", str(out))
            monkeypatch.setattr(jio.tempfile, "mkstemp", denied)
        assert run(config, out) == 2
        assert_one_clear_message(capsys.readouterr().err, "cannot write results", "Permission denied")
    finally:
        out.chmod(0o700)


def test_too_little_free_space_is_refused_before_any_step(config, tmp_path, capsys, monkeypatch, no_compute):
    monkeypatch.setattr(jio.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    assert run(config, tmp_path / "results", "--checkpoint-every", "1") == 2
    assert_one_clear_message(capsys.readouterr().err, "too little free space", "MiB")


def test_a_disk_that_fills_during_the_run_keeps_the_checkpoint_and_says_so(config, tmp_path, capsys,
                                                                          monkeypatch):
    out = tmp_path / "results"
    real_save = jrun.save_trajectory

    def full_at_the_end(path, trajectory, metadata=None):
        if Path(path).name == jrun.TRAJECTORY_FILE:
            raise OSError(28, "No space left on device")
        return real_save(path, trajectory, metadata)

    monkeypatch.setattr(jrun, "save_trajectory", full_at_the_end)
    assert run(config, out, "--checkpoint-every", "2") == 2
    assert_one_clear_message(capsys.readouterr().err, "No space left", "checkpoint at step 5", "--resume")
    assert status(out) == "running" and not (out / "trajectory.npz").exists()
    monkeypatch.setattr(jrun, "save_trajectory", real_save)
    assert run(config, out, "--resume") == 0 and status(out) == "complete"


def test_a_fresh_run_marks_the_folder_and_removes_older_results(config, tmp_path, monkeypatch):
    """A fresh run killed after its first step into a folder of complete results leaves a folder
    that says 'running', not the old results."""
    out = tmp_path / "results"
    assert run(config, out) == 0 and status(out) == "complete"

    class Kill(BaseException):
        pass

    def die(self):
        raise Kill
    monkeypatch.setattr(RunSpec, "make_method", die)
    with pytest.raises(Kill):
        run(config, out)
    assert status(out) == "running"
    assert not (out / "trajectory.npz").exists() and not (out / "energy.png").exists()


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(config, tmp_path, capsys, no_compute):
    out = tmp_path / "results"
    with jio.folder_lock(out, {"config_file": "other.toml"}):
        assert run(config, out) == 2
    assert_one_clear_message(capsys.readouterr().err, "in use by another run", f"pid {os.getpid()}",
                             "other.toml")
    assert not (out / jio.LOCK_FILE).exists()


def test_the_lock_of_a_dead_run_is_taken_over(config, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    (out / jio.LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "config_file": "killed.toml"}))
    assert run(config, out) == 0 and status(out) == "complete"
    assert not (out / jio.LOCK_FILE).exists()


# ---------------------------------------------------------------------------- interrupts and exit codes

def test_ctrl_c_says_where_it_stopped_and_how_to_resume(config, tmp_path, capsys, monkeypatch, reference):
    out = tmp_path / "results"
    real_make = RunSpec.make_method
    steps = []

    class Interrupting:
        def __init__(self, method):
            self.method = method

        def step(self, *args, **kwargs):
            if len(steps) == 3:
                raise KeyboardInterrupt
            steps.append(1)
            return self.method.step(*args, **kwargs)

    monkeypatch.setattr(RunSpec, "make_method", lambda self: Interrupting(real_make(self)))
    assert run(config, out, "--checkpoint-every", "2") == 130
    err = capsys.readouterr().err
    assert_one_clear_message(err, "interrupted after step 3 of 5 (t = 0.9)", "checkpoint at step 2",
                             "--resume")
    assert len(err.strip().splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["checkpoint_step"] == 2
    monkeypatch.setattr(RunSpec, "make_method", real_make)
    assert run(config, out, "--resume") == 0
    np.testing.assert_array_equal(weights(jk.load(out / "trajectory.npz")), weights(reference))


def test_ctrl_c_without_checkpoints_says_how_to_make_a_run_resumable(config, tmp_path, capsys, monkeypatch):
    def interrupt(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(RunSpec, "make_method", interrupt)
    assert run(config, tmp_path / "results") == 130
    assert_one_clear_message(capsys.readouterr().err, "interrupted after step 0", "--checkpoint-every N")


def test_a_failed_step_exits_1_and_is_recorded(config, tmp_path, capsys, monkeypatch):
    def fail(self):
        raise SolverError("the solver gave up; raise max_iter")
    monkeypatch.setattr(RunSpec, "make_method", fail)
    out = tmp_path / "results"
    assert run(config, out) == 1
    assert_one_clear_message(capsys.readouterr().err, "a JKO step failed", "raise max_iter")
    assert status(out) == "failed"


def test_an_internal_error_exits_3_with_where_to_report_and_verbose_shows_the_traceback(config, tmp_path,
                                                                                      capsys, monkeypatch):
    def bug(self):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(RunSpec, "make_method", bug)
    assert run(config, tmp_path / "quiet") == 3
    assert_one_clear_message(capsys.readouterr().err, "internal error", "ZeroDivisionError", "report", "-v")
    assert main(["run", str(config), "--out", str(tmp_path / "verbose"), "--verbose"]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_a_config_that_is_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes(SMALL_CONFIG.replace("mmd_flow", "mmd_fl\xf6w").encode("latin-1"))
    assert run(path, tmp_path / "out") == 2
    assert_one_clear_message(capsys.readouterr().err, str(path))


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "exit codes" in text
    for code in EXIT_CODES:
        assert f"  {code} " in text


# ---------------------------------------------------------------------------- real signals

def _default_sigint() -> None:
    """In the child: SIGINT as a terminal delivers it. A child inherits an ignored SIGINT (a
    suite started in the background by a non-interactive shell ignores it), and Python then
    keeps ignoring it: the interrupt is lost and the run goes on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(config: Path, out: Path, *options) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "jko_ift.cli", "run", str(config), "--out", str(out),
                             "--quiet", "--checkpoint-every", "1", *options],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint if os.name == "posix" else None)


def _wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run wrote no checkpoint"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """The uninterrupted run of LONG_CONFIG with checkpoints every step."""
    return uninterrupted(tmp_path_factory, LONG_CONFIG, 1)


def _kill_and_check(tmp_path, sig: int, delay: float, reference) -> None:
    """Run LONG_CONFIG in a subprocess into a folder of old complete results of another config,
    send ``sig`` ``delay`` seconds after its first checkpoint, and check that the folder never
    shows the old results as this run's (its summary.json is this run's, not "complete" unless
    the run ended, and any trajectory.npz is this config's), and that --resume then completes it
    exactly."""
    config, old = tmp_path / "long.toml", tmp_path / "old.toml"
    config.write_text(LONG_CONFIG)
    old.write_text(SMALL_CONFIG.replace("tau = 0.3", "tau = 0.2"))
    out = tmp_path / "results"
    assert run(old, out) == 0  # complete results of another config in the folder
    process = _start(config, out)
    _wait_for(out / "checkpoint.npz", process)
    time.sleep(delay)
    process.send_signal(sig)
    _, err = process.communicate(timeout=START_TIMEOUT_S)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config_file"] == str(config)  # never the old run's summary
    if (out / "trajectory.npz").exists():  # this run's (written at the end), never the old one
        assert jio.read_metadata(out / "trajectory.npz")["digest"] == load_config(config).digest
    if summary["status"] == "complete":  # it finished (the signal may still hit its exit)
        assert (out / "trajectory.npz").exists()
    else:
        assert summary["status"] in ("running", "interrupted")
        if sig in (signal.SIGINT, signal.SIGTERM):
            assert process.returncode == 128 + sig
            verb = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
            assert_one_clear_message(err, verb, "after step", "--resume")
            assert len(err.strip().splitlines()) == 1
    assert run(config, out, "--resume") == 0 and status(out) == "complete"
    np.testing.assert_array_equal(weights(jk.load(out / "trajectory.npz")), weights(reference))


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_ctrl_c_of_a_real_run_exits_130_in_one_line(tmp_path):
    """SIGINT to a real run (in the solver or a checkpoint write): one line, exit 130, the
    folder marked interrupted with its last checkpoint (resuming it exactly is tested above)."""
    config = tmp_path / "endless.toml"
    config.write_text(SMALL_CONFIG.replace("steps = 5", "steps = 100000"))  # alive until interrupted
    out = tmp_path / "results"
    process = _start(config, out)
    _wait_for(out / "checkpoint.npz", process)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=START_TIMEOUT_S)
    assert process.returncode == 130
    assert_one_clear_message(err, "interrupted after step", "of 100000", "--resume")
    assert len(err.strip().splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["checkpoint_step"] == jio.read_metadata(out / "checkpoint.npz")["steps_done"] >= 1


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_of_a_real_run_exits_143_in_one_line(tmp_path):
    """SIGTERM (a batch scheduler's kill) to a real run: as Ctrl-C, one line naming --resume, exit
    143, the folder marked interrupted with its last checkpoint, intact (resuming it exactly is
    tested above and, after random kills, in the slow sweep)."""
    config = tmp_path / "long.toml"
    config.write_text(LONG_CONFIG.replace("steps = 30", "steps = 100000"))  # alive until terminated
    out = tmp_path / "results"
    process = _start(config, out)
    _wait_for(out / "checkpoint.npz", process)
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=START_TIMEOUT_S)
    assert process.returncode == 143 == 128 + signal.SIGTERM and 143 in EXIT_CODES
    assert_one_clear_message(err, "terminated (SIGTERM) after step", "of 100000", "--resume")
    assert len(err.strip().splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert summary["checkpoint_step"] == jio.read_metadata(out / "checkpoint.npz")["steps_done"] >= 1
    jk.load(out / "checkpoint.npz", require_checksum=True)  # consistent, checksummed


#: Kill trials of the slow sweep: random delays after the first checkpoint, the three signals.
SLOW_TRIALS = 8


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("trial", range(SLOW_TRIALS))
def test_kills_at_random_points(tmp_path, trial, long_reference):
    """kill -9, Ctrl-C and SIGTERM at random times after the first checkpoint."""
    rng = np.random.default_rng(trial)
    sig = (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)[trial % 3]
    _kill_and_check(tmp_path, sig, float(rng.uniform(0.0, 1.5)), long_reference)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="POSIX locks")
def test_two_real_runs_into_one_folder_one_refused(tmp_path):
    """A second config started into the folder of a running one is refused (exit 2) naming the
    holder; the folder keeps the holder's run."""
    first, second = tmp_path / "first.toml", tmp_path / "second.toml"
    first.write_text(LONG_CONFIG.replace("steps = 30", "steps = 5000"))  # alive until interrupted
    second.write_text(LONG_CONFIG.replace("tau = 0.3", "tau = 0.2"))
    out = tmp_path / "results"
    holder = _start(first, out)
    try:
        _wait_for(out / "checkpoint.npz", holder)
        other = _start(second, out)
        _, err = other.communicate(timeout=START_TIMEOUT_S)
        assert holder.poll() is None, "the first run ended before the second started: make it longer"
    finally:
        holder.send_signal(signal.SIGINT)
        holder.communicate(timeout=START_TIMEOUT_S)
    assert other.returncode == 2 and holder.returncode == 130
    assert_one_clear_message(err, "in use by another run", str(first))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config_file"] == str(first) and summary["status"] == "interrupted"


def test_ctrl_c_of_an_adaptive_run_says_how_far_it_got(tmp_path, capsys, monkeypatch):
    """An adaptive run counts its accepted steps as a fixed one does."""
    config = tmp_path / "adaptive.toml"
    adaptive_run = "t_final = 2.0\nsave_at = [0.5, 1.0, 2.0]\n\n[run.adaptive]\nrtol = 1e-2\natol = 0.0\n"
    config.write_text(SMALL_CONFIG.replace("tau = 0.3\nsteps = 5\n", adaptive_run))
    real_save = jrun.save_trajectory

    def interrupt_at_the_second_checkpoint(path, trajectory, metadata=None):
        if metadata["steps_done"] == 2:
            raise KeyboardInterrupt
        return real_save(path, trajectory, metadata)

    monkeypatch.setattr(jrun, "save_trajectory", interrupt_at_the_second_checkpoint)
    assert run(config, tmp_path / "results", "--checkpoint-every", "1") == 130
    assert_one_clear_message(capsys.readouterr().err, "interrupted after step 2 of an adaptive run",
                             "to t_final = 2 (t = ", "the checkpoint at step 1", "--resume")
