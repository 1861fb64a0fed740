"""Running a checked config into a results folder: checkpoints, resume and the summary.

``run_config`` reads nothing and computes nothing itself: the config was read and checked by
``config.load_config``, the steps are one ``jk.solve`` call (its ``callback`` moves the progress
bar and writes the checkpoints, its ``resume`` continues a checkpoint with the method's and the
controller's state), and every file is written by ``io`` (atomically, with checksums) and
``plotting``. What lives here is the bookkeeping of one run: where it stands for an interrupt's
message (Ctrl-C or SIGTERM), and ``summary.json``'s status (running, complete, interrupted,
failed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .config import keeps_support
from .display import progress_bar, showing_iterations
from .io import (
    ResultsFileError,
    ResultsFolderError,
    check_writable,
    folder_lock,
    load,
    read_metadata,
    save_trajectory,
    write_json_atomic,
)
from .plotting import plot_energy
from .solve import RunState, Trajectory

__all__ = ["CHECKPOINT_FILE", "ENERGY_FIGURE", "STEPS_FILE", "SUMMARY_FILE", "TRAJECTORY_FILE",
           "RunInterrupted", "estimated_bytes", "run_config", "versions", "write_steps"]

logger = logging.getLogger(__name__)

#: The files of a results folder written by ``run_config`` (and ``jko-ift run``).
SUMMARY_FILE, TRAJECTORY_FILE, ENERGY_FIGURE, CHECKPOINT_FILE, STEPS_FILE = (
    "summary.json", "trajectory.npz", "energy.png", "checkpoint.npz", "steps.csv")
#: The first columns of steps.csv (one row per attempted step); every other statistic a step
#: reported (its method's iterations, eps, solve time, ...) follows, a column each.
STEP_COLUMNS = ("step", "t", "tau", "accepted", "wall_time", "status", "certificate", "iterations",
                "objective", "distance_sq", "dissipation_slack")
#: What to do about a checkpoint that cannot be resumed.
CHECKPOINT_ADVICE = "delete {checkpoint} and run again without --resume (the run starts from the beginning)"
#: The result files of a run, removed when a run starts in their folder (summary.json is replaced).
RESULT_FILES = (TRAJECTORY_FILE, ENERGY_FIGURE, STEPS_FILE)
#: summary.json holds per step its time, energy, tau, wall time, status, certificate and the
#: step's stats: about 300 to 500 bytes (measured on the example configs); twice that, to be safe.
SUMMARY_BYTES_PER_STEP = 1000
#: Relative slack of "the run reached t_final" (as ``jk.solve``'s).
TIME_RTOL = 1e-9


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT) or SIGTERM; the message says where it stopped and how to
    resume. ``steps_done`` and ``time`` are the last completed step and its time; ``exit_code``
    is 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as shells report it."""

    def __init__(self, message: str, steps_done: int, time: float, signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.steps_done, self.time = steps_done, time
        self.exit_code = 128 + int(signal_number)


class _Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler of a run: stops it as Ctrl-C does."""

    exit_code = 128 + signal.SIGTERM


def versions() -> dict:
    """Versions of Python and of the libraries a result depends on, read from the installed
    packages' metadata: importing them takes seconds (POT imports every array library it
    finds), at the end of a run, where an interrupt must still find the run's own handler."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    from . import __version__
    return {"jko_ift": __version__, "numpy": np.__version__, "scipy": installed("scipy"),
            "cvxpy": installed("cvxpy"), "POT": installed("POT"), "python": platform.python_version()}


# ---------------------------------------------------------------------------- where the run stands

@dataclasses.dataclass
class _Position:
    """Where a run in ``out`` stands (mutable: the steps move it), for the checkpoints and an
    interrupt's message: ``previous`` is the checkpoint's run it resumes (None: a fresh run),
    ``step`` and ``t`` the last accepted step and its time, ``checkpoint`` the last checkpoint's
    (step, t) or None."""

    spec: object
    out: Path
    checkpoint_every: int | None
    previous: Trajectory | None = None
    resumed_from: int | None = None
    step: int = 0
    t: float = 0.0
    checkpoint: tuple | None = None


def _resumed(spec, out: Path, checkpoint_every: int | None) -> _Position:
    """The run saved in ``out``'s checkpoint, checked against ``spec`` (same config digest, a
    step count that agrees with the states it holds, a matching checksum, a readable state)."""
    checkpoint = out / CHECKPOINT_FILE
    advice = CHECKPOINT_ADVICE.format(checkpoint=checkpoint)
    metadata = read_metadata(checkpoint, advice, require_checksum=True)
    if metadata.get("digest") != spec.digest:
        raise ValueError(f"the checkpoint in {out} belongs to another config (its config differs "
                         "from this one); resume with the same config, or run without --resume")
    saved = load(checkpoint, advice, require_checksum=True)
    done = _checkpoint_position(metadata, saved, checkpoint, advice)
    try:
        state = RunState.from_record(metadata["run_state"], metadata["run_state_arrays"], saved.final)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise ResultsFileError(f"{checkpoint} holds no readable run state ({type(error).__name__}: "
                               f"{error}); {advice}") from None
    previous = dataclasses.replace(saved, state=state, stop_reason=metadata.get("stop_reason") or "running")
    every = metadata["checkpoint_every"] if checkpoint_every is None else checkpoint_every
    t = float(state.t)
    logger.info("resuming %s from step %d (t = %.6g)", out, done, t)
    return _Position(spec, out, every, previous, done, done, t, (done, t))


def _checkpoint_position(metadata: Mapping, saved, checkpoint: Path, advice: str) -> int:
    """The steps done of a checkpoint, checked against the states it holds."""
    done = metadata.get("steps_done")
    accepted = sum(1 for s in saved.stats if s.get("accepted", True))
    if not isinstance(done, int) or isinstance(done, bool) or done != accepted or done < 0 \
            or "checkpoint_every" not in metadata:
        raise ResultsFileError(f"{checkpoint} is inconsistent: it says {done!r} steps were done but holds "
                               f"{accepted} accepted steps; {advice}")
    return done


def _start(spec, out: Path, resume: bool, checkpoint_every: int | None) -> _Position:
    """Where the run starts: its checkpoint when resuming (if there is one), else the initial
    measure (and an old checkpoint is removed: it must not be resumed into a fresh run)."""
    checkpoint = out / CHECKPOINT_FILE
    if resume and checkpoint.exists():
        return _resumed(spec, out, checkpoint_every)
    if resume:
        logger.warning("no checkpoint in %s: starting from the beginning", out)
    elif checkpoint.exists():
        checkpoint.unlink()
    return _Position(spec, out, checkpoint_every)


def _write_checkpoint(position: _Position, trajectory: Trajectory) -> None:
    """Replace the checkpoint by ``trajectory`` (the run so far, with its state: the method's
    counters and generator, the controller's history), atomically, with its checksum."""
    meta, arrays = trajectory.state.to_record()
    done = len(trajectory.taus)
    stop_reason = None if trajectory.stop_reason == "running" else trajectory.stop_reason
    checkpoint = position.out / CHECKPOINT_FILE
    save_trajectory(checkpoint, trajectory, {
        "digest": position.spec.digest, "steps_done": done, "time": trajectory.state.t,
        "checkpoint_every": position.checkpoint_every, "stop_reason": stop_reason,
        "run_state": meta, "run_state_arrays": {key: value.tolist() for key, value in arrays.items()}})
    position.checkpoint = (done, trajectory.state.t)
    logger.debug("checkpoint at step %d written to %s (t = %.6g)", done, checkpoint, trajectory.state.t)


# ---------------------------------------------------------------------------- the steps

def _take_steps(position: _Position, progress: bool) -> Trajectory:
    """The run's steps from ``position`` on: one ``jk.solve`` of the whole run (resuming the
    checkpoint's, if any), then its last checkpoint. A fixed-step run keeps every state (the
    summary lists them; ``save_at`` picks the saved ones afterwards); an adaptive run lands on
    its save times."""
    spec, previous = position.spec, position.previous
    if previous is not None and previous.stop_reason != "running":
        return previous  # the checkpoint is of a run that ended
    bar = _bar(spec, position, progress)
    try:
        with showing_iterations(bar):  # a long step's iterations and residual on the bar
            trajectory = spec.solve(progress=False, callback=_reporter(position, bar), resume=previous,
                                    **({} if spec.adaptive else {"save_at": None}))
    finally:
        bar.close()
    if position.checkpoint_every is not None:
        _write_checkpoint(position, trajectory)
    return trajectory


def _reporter(position: _Position, bar):
    """``solve``'s callback: the bar, the position, the log, and a checkpoint every
    ``checkpoint_every`` accepted steps (the last one is written when the run ends)."""
    every = position.checkpoint_every

    def on_step(report) -> bool:
        position.step, position.t = report.step, report.t
        bar.update(1 if report.steps is not None else report.tau)
        bar.set_postfix_str(f"t={report.t:.4g}, energy={report.energy:.4g}", refresh=False)
        of = f" of {report.steps}" if report.steps is not None else ""
        logger.debug("step %d%s: t = %.6g, energy %.6g, status %s, certificate %s", report.step, of,
                     report.t, report.energy, report.record.get("status"),
                     f"{report.record.get('certificate', float('nan')):.2g}")
        last = report.t >= report.t_final * (1 - TIME_RTOL)
        if every is not None and report.step % every == 0 and not last:
            snapshot = report.trajectory()
            _write_checkpoint(position, snapshot)
            if snapshot.state.method is not None:  # the run's own state: from here on the run
                snapshot.state.method.forget()     # steps as its copy resumed from the file
        return False
    return on_step


def _bar(spec, position: _Position, progress: bool):
    """The one progress bar of a run on stderr (disabled without ``progress``): steps done of the
    total for fixed steps, time done of t_final for adaptive ones; a resumed run's starts at its
    checkpoint."""
    label = f"{spec.method_kind} {type(spec.geometry).__name__}"
    previous = position.previous
    energy = spec.energy.value(spec.initial) if previous is None else float(previous.state.energy)
    if spec.adaptive:
        bar = progress_bar(total=spec.run.t_final, initial=position.t, disable=not progress, desc=label,
                           unit="time",
                           bar_format="{l_bar}{bar}| t={n:.4g}/{total:.4g} [{elapsed}<{remaining}{postfix}]")
    else:
        bar = progress_bar(total=spec.run.steps, initial=position.step, disable=not progress, desc=label,
                           unit="step")
    bar.set_postfix_str(f"t={position.t:.4g}, energy={energy:.4g}", refresh=False)
    return bar


# ---------------------------------------------------------------------------- the results

def _kept(times: np.ndarray, save_at, total_time: float) -> np.ndarray:
    """Indices of the saved states: the start, the save_at times and the last state."""
    if save_at is None:
        return np.arange(times.size)
    close = np.abs(times[:, None] - np.asarray(save_at)[None, :]) <= 1e-9 * max(total_time, 1.0)
    keep = close.any(1)
    keep[0] = keep[-1] = True
    return np.flatnonzero(keep)


def _summary(position: _Position, run: Trajectory, wall_time: float) -> dict:
    """summary.json of a complete run: the config, versions, per-step lists, warnings, stats."""
    spec = position.spec
    accepted = [s for s in run.stats if s.get("accepted", True)]
    return {
        "status": "complete",
        "command": "run",
        "config": spec.config,
        "config_file": spec.source,
        "problem": spec.name,
        "energy": repr(spec.energy),
        "geometry": repr(spec.geometry),
        "method": {"kind": spec.method_kind, "options": spec.method_options},
        "versions": versions(),
        "stop_reason": run.stop_reason,
        "steps": len(accepted),
        "final_time": float(run.times[-1]),
        "final_energy": float(run.energies[-1]),
        "checkpoint_every": position.checkpoint_every,
        "resumed_from_step": position.resumed_from,
        "wall_time": wall_time,
        "per_step": {
            "times": run.times.tolist(), "energies": run.energies.tolist(),
            "tau": [s["tau"] for s in accepted],
            "wall_time": [s.get("wall_time") for s in accepted],
            "status": [s.get("status") for s in accepted],
            "certificate": [s.get("certificate") for s in accepted],
        },
        "warnings": [w.to_dict() for w in run.warnings],
        "stats": run.stats,
    }


def _saved_trajectory(spec, run: Trajectory) -> Trajectory:
    """The states the config asks to save (the start, its save_at times and the last)."""
    kept = _kept(run.times, spec.run.save_at, float(run.times[-1]))
    return Trajectory(run.times[kept], [run.measures[i] for i in kept], run.energies[kept],
                      run.stats, run.stop_reason, run.warnings, scheme=run.scheme)


def write_steps(path, stats) -> Path:
    """Write the per-step statistics of a run (``Trajectory.stats``) as CSV, one row per attempted
    step: ``STEP_COLUMNS`` first (step, t the time it starts from, tau, accepted, wall time,
    status, certificate, solver iterations, ...), then every other scalar a step reported.

    Parameters
    ----------
    path : path-like
        The CSV file (written atomically).
    stats : sequence of dict
        The run's ``stats``.

    Returns
    -------
    pathlib.Path
    """
    from .studies import write_table

    rows, t = [], 0.0
    for record in stats:  # t: the time the step starts from (fixed runs do not record it)
        row = {"t": t, "accepted": True, **record}
        rows.append(row)
        if row["accepted"]:
            t = row["t"] + row["tau"]
    seen = dict.fromkeys(STEP_COLUMNS)
    for record in rows:
        seen.update(dict.fromkeys(record))
    columns = [c for c in seen if any(c in record for record in rows)] if rows else list(STEP_COLUMNS)
    write_table(path, rows, columns)
    return Path(path)


def _write_results(position: _Position, run: Trajectory, summary: dict) -> Trajectory:
    """trajectory.npz, energy.png, then summary.json: until it says "complete", the folder's
    results are not. A full disk says what was kept; an interrupt says how to resume."""
    spec, out = position.spec, position.out
    label = spec.name or (Path(spec.source).stem if spec.source else "config")
    title = f"{label}: {type(spec.geometry).__name__}, {spec.method_kind}"
    trajectory = _saved_trajectory(spec, run)
    try:
        save_trajectory(out / TRAJECTORY_FILE, trajectory, {"digest": spec.digest})
        write_steps(out / STEPS_FILE, run.stats)
        plot_energy(run, out / ENERGY_FIGURE, title=title)
        write_json_atomic(out / SUMMARY_FILE, summary)
    except KeyboardInterrupt as interrupt:
        raise _interrupted(position, interrupt) from None
    except OSError as error:
        kept = (f"the checkpoint at step {summary['steps']} is kept: free space, then run again with "
                "--resume" if position.checkpoint_every is not None else "nothing was saved")
        raise ResultsFolderError(f"the run finished but its results could not be written into {out} "
                                 f"({error.strerror or error}); {kept}") from None
    return trajectory


# ---------------------------------------------------------------------------- the run

def run_config(spec, out, resume: bool = False, checkpoint_every: int | None = None,
               progress: bool = True) -> tuple:
    """Run a checked config (``config.load_config``) into the results folder ``out``.

    Writes ``summary.json`` (the config, library versions, per-step energies, timings and
    statuses, the stop reason, the run's warnings with their counts), ``trajectory.npz``
    (``jk.load`` reads it) and ``energy.png``, each atomically. The run is one ``jk.solve``;
    with ``checkpoint_every = N`` its callback replaces ``checkpoint.npz`` atomically after
    every N accepted steps (fixed or adaptive) and at the end, with the run so far and its state
    (the method's counters and random generator, the step-size controller's history);
    ``resume=True`` continues from that checkpoint (same config required) through ``solve``'s
    ``resume``, so the result is the same, bit for bit, as the uninterrupted run with the same N
    (a checkpoint keeps no warm starts or caches, so the running method drops its own at each
    checkpoint too). Returns (trajectory, summary).

    ``progress=True`` shows one bar for the whole run on stderr (steps done of the total, or
    time done of t_final for adaptive runs, with the current time and energy; a resumed run
    starts at its checkpoint). Details (each step and checkpoint) go to the ``jko_ift.runner``
    logger at DEBUG level.

    Faults: the folder is checked for writability and free space before any step
    (``ResultsFolderError``), and locked for the run (``folder_lock``: a second run into it gets
    ``FolderInUseError``). ``summary.json`` says ``"status": "running"`` from the start (older
    results in the folder are removed then), and ``"complete"``, ``"interrupted"`` or ``"failed"``
    at the end, so a killed run never leaves complete-looking results. A checkpoint that is
    truncated, corrupted or altered (its SHA-256 checksum does not match) is refused with
    ``ResultsFileError``. Ctrl-C, or SIGTERM (a batch scheduler's kill) in the main thread,
    raises ``RunInterrupted`` saying where the run stopped and how to resume.
    """
    if checkpoint_every is not None and (int(checkpoint_every) != checkpoint_every or checkpoint_every < 1):
        raise ValueError("checkpoint_every must be a positive whole number of steps, "
                         f"got {checkpoint_every!r}")
    out = check_writable(out, needed_bytes=estimated_bytes(spec, checkpoint_every))
    with folder_lock(out, {"command": "run", "config_file": spec.source, "digest": spec.digest}), \
            _sigterm_interrupts():
        return _run_in_folder(spec, out, resume, checkpoint_every, progress)


def estimated_bytes(spec, checkpoint_every: int | None) -> int:
    """A cheap upper estimate of the bytes a run writes: every state's weights, and its points
    unless it stays on its grid (a method that keeps its support, from a grid measure: the file
    stores the grid), as uncompressed float64 in trajectory.npz, twice more for checkpoint.npz
    (the new one is written beside the old), and ``SUMMARY_BYTES_PER_STEP`` per step in
    summary.json. An adaptive run's step count is not known before it runs: its save times (or
    only its ends) count."""
    run, mu = spec.run, spec.initial
    steps = (run.steps or 0) if not spec.adaptive else len(run.save_at or ()) + 1
    on_grid = mu.grid is not None and keeps_support(spec.method_kind)
    state = mu.n * (1 if on_grid else mu.dim + 1) * 8
    copies = 1 + (2 if checkpoint_every is not None else 0)
    return (steps + 1) * (state * copies + SUMMARY_BYTES_PER_STEP)


def _run_in_folder(spec, out: Path, resume: bool, checkpoint_every: int | None, progress: bool) -> tuple:
    """``run_config`` in the checked, locked folder ``out``: start or resume, say "running", take
    the steps, then write the results (a failure or an interrupt on the way is recorded in
    summary.json)."""
    start = time.perf_counter()
    position = _start(spec, out, resume, checkpoint_every)
    _mark_running(position)
    try:
        run = _take_steps(position, progress)
        summary = _summary(position, run, time.perf_counter() - start)
    except KeyboardInterrupt as interrupt:
        raise _interrupted(position, interrupt) from None
    except Exception as error:
        _write_status(position, "failed", {"error": f"{type(error).__name__}: {error}",
                                           "steps_done": position.step, "time": position.t})
        raise
    trajectory = _write_results(position, run, summary)
    logger.info("results written to %s", out)
    return trajectory, summary


@contextlib.contextmanager
def _sigterm_interrupts():
    """While a run goes, SIGTERM stops it as Ctrl-C does (checkpoint kept, summary.json says
    "interrupted", exit 143); only the main thread can take signals, elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------- the run's status

def _write_status(position: _Position, status: str, details: Mapping) -> None:
    """Write a summary.json saying the run's ``status`` (running, interrupted, failed) and
    ``details``; never raises (it runs while another error is on its way out)."""
    import datetime

    spec = position.spec
    summary = {"status": status, "command": "run", "config": spec.config, "config_file": spec.source,
               "problem": spec.name, "pid": os.getpid(),
               "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **details}
    with contextlib.suppress(OSError, TypeError, ValueError):
        write_json_atomic(position.out / SUMMARY_FILE, summary)


def _mark_running(position: _Position) -> None:
    """Say in summary.json that a run is in progress, then remove the results of any earlier run
    in ``out``: a run killed from here on leaves a folder that says it is incomplete."""
    spec = position.spec
    write_json_atomic(position.out / SUMMARY_FILE, {
        "status": "running", "command": "run", "config": spec.config, "config_file": spec.source,
        "problem": spec.name, "pid": os.getpid(), "resumed_from_step": position.resumed_from,
        "checkpoint_every": position.checkpoint_every})
    for name in RESULT_FILES:
        with contextlib.suppress(FileNotFoundError):
            (position.out / name).unlink()


def _interrupted(position: _Position, interrupt: KeyboardInterrupt) -> RunInterrupted:
    """The ``RunInterrupted`` of a run stopped by Ctrl-C or SIGTERM at ``position`` (and its
    summary.json)."""
    spec = position.spec
    step, t, saved = position.step, position.t, position.checkpoint
    with contextlib.suppress(ValueError, KeyError, TypeError):  # the file is the truth: an interrupt
        metadata = read_metadata(position.out / CHECKPOINT_FILE, require_checksum=True)  # may follow
        if metadata.get("digest") == spec.digest:                                        # its write
            saved = (int(metadata["steps_done"]), float(metadata["time"]))
            step, t = max(step, saved[0]), max(t, saved[1])
    terminated = isinstance(interrupt, _Terminated)
    verb = "terminated (SIGTERM)" if terminated else "interrupted"
    total = (f"of an adaptive run to t_final = {spec.run.t_final:g}" if spec.adaptive
             else f"of {spec.run.steps}")
    where = f"{verb} after step {step} {total} (t = {t:.6g})"
    if saved is not None:
        how = (f"the checkpoint at step {saved[0]} (t = {saved[1]:.6g}) is kept: run the same command "
               "with --resume to continue from it")
    elif position.checkpoint_every is not None:
        how = ("no checkpoint was written yet (the first comes after "
               f"{position.checkpoint_every} steps): run the same command again to start over")
    else:
        how = "nothing was saved: run with --checkpoint-every N to be able to resume an interrupted run"
    _write_status(position, "interrupted", {"steps_done": step, "time": t,
                                            "signal": "SIGTERM" if terminated else "SIGINT",
                                            "checkpoint_step": None if saved is None else saved[0]})
    number = signal.SIGTERM if terminated else signal.SIGINT
    return RunInterrupted(f"{where}; {how}", step, t, number)
