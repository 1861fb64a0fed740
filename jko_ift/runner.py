"""Running a checked config into a results folder: chunks, checkpoints, resume and the summary.

``run_config`` reads nothing and computes nothing itself: the config was read and checked by
``config.load_config``, the steps are ``jk.solve``'s, and every file is written by ``io``
(atomically, with checksums) and ``plotting``. What lives here is the bookkeeping of one run:
the chunks between checkpoints, the state a resumed run continues from, the run's warnings
merged across chunks, and ``summary.json``'s status (running, complete, interrupted, failed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .config import FIXED_SUPPORT_METHODS
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
from .run_warnings import WarningLog
from .solve import Trajectory, solve

__all__ = ["CHECKPOINT_FILE", "ENERGY_FIGURE", "SUMMARY_FILE", "TRAJECTORY_FILE", "RunInterrupted",
           "estimated_bytes", "run_config", "versions"]

logger = logging.getLogger(__name__)

#: The files of a results folder written by ``run_config`` (and ``jko-ift run``).
SUMMARY_FILE, TRAJECTORY_FILE, ENERGY_FIGURE, CHECKPOINT_FILE = (
    "summary.json", "trajectory.npz", "energy.png", "checkpoint.npz")
#: What to do about a checkpoint that cannot be resumed.
CHECKPOINT_ADVICE = "delete {checkpoint} and run again without --resume (the run starts from the beginning)"
#: The result files of a run, removed when a run starts in their folder (summary.json is replaced).
RESULT_FILES = (TRAJECTORY_FILE, ENERGY_FIGURE)
#: summary.json holds per step its time, energy, tau, wall time, status, certificate and the
#: step's stats: about 300 to 500 bytes (measured on the example configs); twice that, to be safe.
SUMMARY_BYTES_PER_STEP = 1000


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (``KeyboardInterrupt``); the message says where it stopped and how
    to resume. ``steps_done`` and ``time`` are the last completed step and its time."""

    def __init__(self, message: str, steps_done: int, time: float):
        super().__init__(message)
        self.steps_done, self.time = steps_done, time


def versions() -> dict:
    """Versions of Python and of the libraries a result depends on."""
    import platform

    import cvxpy
    import ot
    import scipy

    from . import __version__
    return {"jko_ift": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "cvxpy": cvxpy.__version__, "POT": ot.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------------------- the run's state

@dataclasses.dataclass
class _RunState:
    """Everything a run has produced so far (mutable: the chunks append to it).

    ``times``, ``measures`` and ``energies`` hold every state from the start (k + 1 of them after
    k steps), ``stats`` every step's stats with steps counted from the start of the run, ``log``
    the warnings of every chunk. ``position`` is where the run is for an interrupt's message: the
    last completed step, its time and the last checkpoint's (step, time), or None.
    """

    times: list
    measures: list
    energies: list
    stats: list
    log: WarningLog
    checkpoint_every: int | None
    done: int = 0
    stop_reason: str | None = None
    resumed_from: int | None = None
    position: dict = dataclasses.field(default_factory=dict)

    def trajectory(self, stop_reason=None) -> Trajectory:
        """Every state so far as a ``Trajectory``."""
        return Trajectory(np.array(self.times), self.measures, np.array(self.energies), self.stats,
                          stop_reason, self.log.warnings())

    def extend(self, part: Trajectory, times, stats) -> None:
        """Append a chunk ``part`` (its states after the first) at ``times``, with ``stats``."""
        self.times.extend(times)
        self.measures.extend(part.measures[1:])
        self.energies.extend(part.energies[1:].tolist())
        self.stats.extend(stats)
        self.log.extend(part.warnings, self.done)

    def accepted_taus(self) -> list:
        return [s["tau"] for s in self.stats if s.get("accepted", True)]


def _fresh_state(spec, checkpoint_every: int | None) -> _RunState:
    return _RunState([0.0], [spec.initial], [spec.energy.value(spec.initial)], [], WarningLog(),
                     checkpoint_every)


def _resumed_state(spec, out: Path, checkpoint_every: int | None) -> _RunState:
    """The state saved in ``out``'s checkpoint, checked against ``spec`` (same config digest, a
    step count that agrees with the states it holds, a matching checksum)."""
    checkpoint = out / CHECKPOINT_FILE
    advice = CHECKPOINT_ADVICE.format(checkpoint=checkpoint)
    metadata = read_metadata(checkpoint, advice, require_checksum=True)
    if metadata.get("digest") != spec.digest:
        raise ValueError(f"the checkpoint in {out} belongs to another config (its config differs "
                         "from this one); resume with the same config, or run without --resume")
    saved = load(checkpoint, advice, require_checksum=True)
    done, stop_reason = _checkpoint_position(metadata, saved, checkpoint, advice)
    if checkpoint_every != metadata["checkpoint_every"]:
        logger.info("resuming with the checkpoint interval of the interrupted run, %s steps "
                    "(the chunks decide the result bit for bit)", metadata["checkpoint_every"])
    log = WarningLog()
    log.extend(saved.warnings)
    state = _RunState(list(saved.times), list(saved.measures), list(saved.energies), list(saved.stats),
                      log, metadata["checkpoint_every"], done, stop_reason, resumed_from=done)
    logger.info("resuming %s from step %d (t = %.6g)", out, done, state.times[-1])
    return state


def _checkpoint_position(metadata: Mapping, saved, checkpoint: Path, advice: str) -> tuple:
    """(steps done, stop reason) of a checkpoint, checked against the states it holds."""
    done, stop_reason = metadata.get("steps_done"), metadata.get("stop_reason")
    accepted = sum(1 for s in saved.stats if s.get("accepted", True))
    if not isinstance(done, int) or isinstance(done, bool) or done != accepted or done < 0 \
            or "checkpoint_every" not in metadata:
        raise ResultsFileError(f"{checkpoint} is inconsistent: it says {done!r} steps were done but holds "
                               f"{accepted} accepted steps; {advice}")
    return done, stop_reason


def _start(spec, out: Path, resume: bool, checkpoint_every: int | None) -> _RunState:
    """The state the run starts from: its checkpoint when resuming (if there is one), else the
    initial measure (and an old checkpoint is removed: it must not be resumed into a fresh run)."""
    checkpoint = out / CHECKPOINT_FILE
    if resume and checkpoint.exists():
        state = _resumed_state(spec, out, checkpoint_every)
    else:
        if resume:
            logger.warning("no checkpoint in %s: starting from the beginning", out)
        elif checkpoint.exists():
            checkpoint.unlink()
        state = _fresh_state(spec, checkpoint_every)
    state.position = {"step": state.done, "t": state.times[-1],
                      "checkpoint": (state.done, state.times[-1]) if state.resumed_from is not None else None}
    return state


def _write_checkpoint(spec, out: Path, state: _RunState) -> None:
    """Replace ``out``'s checkpoint by every state so far (atomically, with its checksum)."""
    checkpoint = out / CHECKPOINT_FILE
    save_trajectory(checkpoint, state.trajectory(state.stop_reason or "running"),
                    metadata={"digest": spec.digest, "steps_done": state.done, "time": state.times[-1],
                              "checkpoint_every": state.checkpoint_every, "stop_reason": state.stop_reason})
    state.position.update(step=state.done, t=state.times[-1], checkpoint=(state.done, state.times[-1]))
    logger.debug("checkpoint at step %d written to %s (t = %.6g)", state.done, checkpoint, state.times[-1])


# ---------------------------------------------------------------------------- the steps

def _run_adaptive_whole(spec, state: _RunState, progress: bool) -> None:
    """An adaptive run without checkpoints: one ``jk.solve``, with its own progress bar."""
    trajectory = spec.solve(progress=progress)
    state.times, state.measures = list(trajectory.times), list(trajectory.measures)
    state.energies, state.stats = list(trajectory.energies), list(trajectory.stats)
    state.log.extend(trajectory.warnings)
    state.stop_reason = trajectory.stop_reason
    state.done = len(trajectory.taus)


def _adaptive_chunk_ends(run, checkpoint_every: int) -> list[float]:
    """The ends of an adaptive run's chunks: every N-th save time, and t_final."""
    saves = np.asarray(run.save_at, float)
    ends = [float(t) for t in saves[checkpoint_every - 1::checkpoint_every]]
    return [t for t in ends if t < run.t_final * (1 - 1e-12)] + [run.t_final]


def _run_adaptive_chunks(spec, out: Path, state: _RunState, progress: bool) -> None:
    """An adaptive run in chunks ending at every N-th save time, each one ``jk.solve`` whose
    controller starts from the last accepted tau of the chunk before, with a checkpoint after it.
    A resumed run takes the same chunks, so the result is the same, bit for bit, as the
    uninterrupted run with the same N."""
    run = spec.run
    saves = np.asarray(run.save_at, float)
    bar = _time_bar(spec, run.t_final, state.times[-1], state.energies[-1], progress)
    try:
        for end in _adaptive_chunk_ends(run, state.checkpoint_every):
            start_t = state.times[-1]
            if state.stop_reason is not None or end <= start_t * (1 + 1e-12):
                continue
            taus = state.accepted_taus()
            controller = run.controller if not taus else dataclasses.replace(run.controller, tau0=taus[-1])
            chunk_saves = [t - start_t for t in saves if start_t < t < end] + [end - start_t]
            part = solve(spec.energy, spec.geometry, state.measures[-1], t_final=end - start_t,
                         method=spec.make_method(), controller=controller, save_at=chunk_saves,
                         stop_rate=run.stop_rate, stop_energy=run.stop_energy, progress=False)
            state.extend(part, [start_t + t for t in part.times[1:]],
                         [dict(s, step=state.done + s["step"], t=start_t + s["t"]) for s in part.stats])
            state.done += len(part.taus)
            if part.stop_reason != "t_final":
                state.stop_reason = part.stop_reason
            elif end >= run.t_final:
                state.stop_reason = "t_final"
            bar.update(state.times[-1] - start_t)
            bar.set_postfix_str(f"energy={state.energies[-1]:.4g}", refresh=False)
            _write_checkpoint(spec, out, state)
    finally:
        bar.close()


def _step_reporter(state: _RunState, bar, tau: float, total: int, counter: dict) -> Callable:
    """``on_step(result, tau)`` of a fixed-step run: moves the bar, the position and the log."""
    def on_step(result, _tau):
        counter["step"] += 1
        t = counter["step"] * tau
        state.position.update(step=counter["step"], t=t)
        energy = "-" if result.energy is None else f"{result.energy:.4g}"
        bar.set_postfix_str(f"t={t:.4g}, energy={energy}", refresh=False)
        bar.update(1)
        logger.debug("step %d of %d: t = %.6g, energy %s, status %s, certificate %s",
                     counter["step"], total, t, energy, result.status, f"{result.certificate:.2g}")
    return on_step


def _run_fixed_chunks(spec, out: Path, state: _RunState, progress: bool) -> None:
    """A fixed-step run in chunks of N steps (one chunk without checkpoints), each one
    ``jk.solve`` from the last measure with a fresh method, with a checkpoint after it."""
    run = spec.run
    tau, total = run.tau, run.steps
    chunk = state.checkpoint_every or total
    bar = _run_bar(spec, total, state.done, state.times[-1], state.energies[-1], progress)
    counter = {"step": state.done}
    on_step = _step_reporter(state, bar, tau, total, counter)
    try:
        while state.done < total and state.stop_reason is None:
            done = state.done
            steps = min(chunk, total - done)
            logger.debug("steps %d to %d of %d (tau = %g)", done + 1, done + steps, total, tau)
            counter["step"] = done
            part = solve(spec.energy, spec.geometry, state.measures[-1], tau=tau, steps=steps,
                         method=_ReportingMethod(spec.make_method(), on_step),
                         stop_rate=run.stop_rate, stop_energy=run.stop_energy, progress=False)
            taken = len(part.measures) - 1
            state.extend(part, [(done + j) * tau for j in range(1, taken + 1)],
                         [dict(s, step=done + s["step"]) for s in part.stats])
            state.done += taken
            if part.stop_reason != "steps":
                state.stop_reason = part.stop_reason
            elif state.done >= total:
                state.stop_reason = "steps"
            if state.checkpoint_every is not None:
                _write_checkpoint(spec, out, state)
    finally:
        bar.close()


def _run_steps(spec, out: Path, state: _RunState, progress: bool) -> None:
    """Take the run's steps from ``state`` on, the way its config and checkpoints ask."""
    if spec.adaptive and state.checkpoint_every is None:
        _run_adaptive_whole(spec, state, progress)
    elif spec.adaptive:
        _run_adaptive_chunks(spec, out, state, progress)
    else:
        _run_fixed_chunks(spec, out, state, progress)


class _ReportingMethod:
    """A method that hands every step it takes to ``on_step(result, tau)`` (a progress bar, the
    log) and returns the result unchanged: the run is the same, bit for bit.

    ``jk.solve`` calls ``method.step`` once per fixed step; everything else is the wrapped
    method's (attributes, ``repr``, and ``isinstance`` through ``__class__``, so that code that
    dispatches on the method's class sees the method itself).
    """

    def __init__(self, method, on_step: Callable):
        self._method, self._on_step = method, on_step

    def step(self, F, geometry, mu, tau, throw: bool = True):
        result = self._method.step(F, geometry, mu, tau, throw=throw)
        self._on_step(result, tau)
        return result

    @property
    def __class__(self):  # isinstance(reporting, ConicJKO) is True when it wraps a ConicJKO
        return type(self._method)

    def __getattr__(self, name):
        return getattr(self._method, name)

    def __repr__(self) -> str:
        return repr(self._method)


def _run_bar(spec, total: int, done: int, t: float, energy: float, progress: bool):
    """The one progress bar of a fixed-step run (tqdm on stderr; disabled without progress)."""
    from tqdm.auto import tqdm

    label = f"{spec.method_kind} {type(spec.geometry).__name__}"
    bar = tqdm(total=total, initial=done, disable=not progress, desc=label, unit="step",
               dynamic_ncols=True)
    bar.set_postfix_str(f"t={t:.4g}, energy={energy:.4g}", refresh=False)
    return bar


def _time_bar(spec, total_time: float, t: float, energy: float, progress: bool):
    """The one progress bar of an adaptive run in chunks: time done of t_final."""
    from tqdm.auto import tqdm

    label = f"{spec.method_kind} {type(spec.geometry).__name__}"
    bar = tqdm(total=total_time, initial=t, disable=not progress, desc=label, unit="time",
               dynamic_ncols=True,
               bar_format="{l_bar}{bar}| t={n:.4g}/{total:.4g} [{elapsed}<{remaining}{postfix}]")
    bar.set_postfix_str(f"energy={energy:.4g}", refresh=False)
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


def _summary(spec, state: _RunState, wall_time: float) -> dict:
    """summary.json of a complete run: the config, versions, per-step lists, warnings, stats."""
    accepted = [s for s in state.stats if s.get("accepted", True)]
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
        "stop_reason": state.stop_reason,
        "steps": state.done,
        "final_time": state.times[-1],
        "final_energy": state.energies[-1],
        "checkpoint_every": state.checkpoint_every,
        "resumed_from_step": state.resumed_from,
        "wall_time": wall_time,
        "per_step": {
            "times": state.times, "energies": state.energies,
            "tau": [s["tau"] for s in accepted],
            "wall_time": [s.get("wall_time") for s in accepted],
            "status": [s.get("status") for s in accepted],
            "certificate": [s.get("certificate") for s in accepted],
        },
        "warnings": [w.to_dict() for w in state.log.warnings()],
        "stats": state.stats,
    }


def _saved_trajectory(spec, state: _RunState) -> Trajectory:
    """The states the config asks to save (the start, its save_at times and the last)."""
    times = np.array(state.times)
    kept = _kept(times, spec.run.save_at, float(times[-1]))
    return Trajectory(times[kept], [state.measures[i] for i in kept], np.array(state.energies)[kept],
                      state.stats, state.stop_reason, state.log.warnings())


def _write_results(spec, out: Path, state: _RunState, trajectory: Trajectory, summary: dict) -> None:
    """trajectory.npz, energy.png, then summary.json: until it says "complete", the folder's
    results are not. A full disk says what was kept; Ctrl-C says how to resume."""
    label = spec.name or (Path(spec.source).stem if spec.source else "config")
    title = f"{label}: {type(spec.geometry).__name__}, {spec.method_kind}"
    try:
        save_trajectory(out / TRAJECTORY_FILE, trajectory, metadata={"digest": spec.digest})
        plot_energy(state.trajectory(state.stop_reason), out / ENERGY_FIGURE, title=title)
        write_json_atomic(out / SUMMARY_FILE, summary)
    except KeyboardInterrupt:
        raise _interrupted(spec, out, state) from None
    except OSError as error:
        kept = (f"the checkpoint at step {state.done} is kept: free space, then run again with --resume"
                if state.checkpoint_every is not None else "nothing was saved")
        raise ResultsFolderError(f"the run finished but its results could not be written into {out} "
                                 f"({error.strerror or error}); {kept}") from None


# ---------------------------------------------------------------------------- the run

def run_config(spec, out, resume: bool = False, checkpoint_every: int | None = None,
               progress: bool = True) -> tuple:
    """Run a checked config (``config.load_config``) into the results folder ``out``.

    Writes ``summary.json`` (the config, library versions, per-step energies, timings and
    statuses, the stop reason, the run's warnings with their counts), ``trajectory.npz``
    (``jk.load`` reads it) and ``energy.png``, each atomically. With ``checkpoint_every = N``
    the run goes in chunks of N steps (an adaptive run: up to every N-th of its save times, each
    chunk's controller starting from the last accepted tau), each one a ``jk.solve`` from the
    last measure with a fresh method object, and after each chunk ``checkpoint.npz`` is replaced
    atomically; ``resume=True`` continues from that checkpoint (same config required) in the
    same chunks, so the result is the same, bit for bit, as the uninterrupted run with the same
    N. Returns (trajectory, summary).

    ``progress=True`` shows one bar for the whole run on stderr (steps done of the total, ETA,
    the current time and energy; a resumed run starts at its checkpoint's step), whatever the
    chunks; adaptive runs show ``jk.solve``'s bar (time done of t_final). Details (each step,
    chunk and checkpoint) go to the ``jko_ift.runner`` logger at DEBUG level.

    Faults: the folder is checked for writability and free space before any step
    (``ResultsFolderError``), and locked for the run (``folder_lock``: a second run into it gets
    ``FolderInUseError``). ``summary.json`` says ``"status": "running"`` from the start (older
    results in the folder are removed then), and ``"complete"``, ``"interrupted"`` or ``"failed"``
    at the end, so a killed run never leaves complete-looking results. A checkpoint that is
    truncated, corrupted or altered (its SHA-256 checksum does not match) is refused with
    ``ResultsFileError``. Ctrl-C raises ``RunInterrupted`` saying where the run stopped and how to
    resume.
    """
    if checkpoint_every is not None and (int(checkpoint_every) != checkpoint_every or checkpoint_every < 1):
        raise ValueError("checkpoint_every must be a positive whole number of steps, "
                         f"got {checkpoint_every!r}")
    if spec.adaptive and checkpoint_every is not None and spec.run.save_at is None:
        raise ValueError("an adaptive run ([run.adaptive]) writes its checkpoints at its save times; "
                         "add [run] save_at = [...] to the config, or run without --checkpoint-every")
    out = check_writable(out, needed_bytes=estimated_bytes(spec, checkpoint_every))
    with folder_lock(out, {"command": "run", "config_file": spec.source, "digest": spec.digest}):
        return _run_in_folder(spec, out, resume, checkpoint_every, progress)


def estimated_bytes(spec, checkpoint_every: int | None) -> int:
    """A cheap upper estimate of the bytes a run writes: every state's weights, and its points
    unless it stays on its grid (a fixed-support method from a grid measure: the file stores the
    grid), as uncompressed float64 in trajectory.npz, twice more for checkpoint.npz (the new one is
    written beside the old), and ``SUMMARY_BYTES_PER_STEP`` per step in summary.json. An adaptive
    run's step count is not known before it runs: its save times (or only its ends) count."""
    run, mu = spec.run, spec.initial
    steps = (run.steps or 0) if not spec.adaptive else len(run.save_at or ()) + 1
    on_grid = mu.grid is not None and spec.method_kind in FIXED_SUPPORT_METHODS
    state = mu.n * (1 if on_grid else mu.dim + 1) * 8
    copies = 1 + (2 if checkpoint_every is not None else 0)
    return (steps + 1) * (state * copies + SUMMARY_BYTES_PER_STEP)


def _run_in_folder(spec, out: Path, resume: bool, checkpoint_every: int | None, progress: bool) -> tuple:
    """``run_config`` in the checked, locked folder ``out``: start or resume, say "running", take
    the steps, then write the results (a failure or Ctrl-C on the way is recorded in summary.json)."""
    start = time.perf_counter()
    state = _start(spec, out, resume, checkpoint_every)
    _mark_running(spec, out, state.resumed_from, state.checkpoint_every)
    try:
        _run_steps(spec, out, state, progress)
    except KeyboardInterrupt:
        raise _interrupted(spec, out, state) from None
    except Exception as error:
        _write_status(out, spec, "failed", {"error": f"{type(error).__name__}: {error}",
                                           "steps_done": state.position["step"],
                                           "time": state.position["t"]})
        raise
    trajectory = _saved_trajectory(spec, state)
    summary = _summary(spec, state, time.perf_counter() - start)
    _write_results(spec, out, state, trajectory, summary)
    logger.info("results written to %s", out)
    return trajectory, summary


# ---------------------------------------------------------------------------- the run's status

def _write_status(out: Path, spec, status: str, details: Mapping) -> None:
    """Write a summary.json saying the run's ``status`` (running, interrupted, failed) and
    ``details``; never raises (it runs while another error is on its way out)."""
    import datetime

    summary = {"status": status, "command": "run", "config": spec.config, "config_file": spec.source,
               "problem": spec.name, "pid": os.getpid(),
               "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **details}
    with contextlib.suppress(OSError, TypeError, ValueError):
        write_json_atomic(out / SUMMARY_FILE, summary)


def _mark_running(spec, out: Path, resumed_from: int | None, checkpoint_every: int | None) -> None:
    """Say in summary.json that a run is in progress, then remove the results of any earlier run
    in ``out``: a run killed from here on leaves a folder that says it is incomplete."""
    write_json_atomic(out / SUMMARY_FILE, {
        "status": "running", "command": "run", "config": spec.config, "config_file": spec.source,
        "problem": spec.name, "pid": os.getpid(), "resumed_from_step": resumed_from,
        "checkpoint_every": checkpoint_every})
    for name in RESULT_FILES:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def _interrupted(spec, out: Path, state: _RunState) -> RunInterrupted:
    """The ``RunInterrupted`` of a run stopped by Ctrl-C at ``state.position`` (and its summary.json)."""
    position, checkpoint_every = state.position, state.checkpoint_every
    step, t, saved = position["step"], position["t"], position["checkpoint"]
    with contextlib.suppress(ValueError, KeyError, TypeError):  # the file is the truth: an interrupt
        metadata = read_metadata(out / CHECKPOINT_FILE, require_checksum=True)  # may follow its write
        if metadata.get("digest") == spec.digest:
            saved = (int(metadata["steps_done"]), float(metadata["time"]))
            step, t = max(step, saved[0]), max(t, saved[1])
    if spec.adaptive:  # its steps are counted only at its checkpoints
        where = "interrupted during an adaptive run" + (f" (done up to t = {t:.6g})" if step else "")
    else:
        where = f"interrupted after step {step} of {spec.run.steps} (t = {t:.6g})"
    if saved is not None:
        how = (f"the checkpoint at step {saved[0]} (t = {saved[1]:.6g}) is kept: run the same command "
               "with --resume to continue from it")
    elif checkpoint_every is not None:
        how = ("no checkpoint was written yet (the first comes after "
               f"{checkpoint_every} steps): run the same command again to start over")
    else:
        how = "nothing was saved: run with --checkpoint-every N to be able to resume an interrupted run"
    _write_status(out, spec, "interrupted", {"steps_done": step, "time": t,
                                             "checkpoint_step": None if saved is None else saved[0]})
    return RunInterrupted(f"{where}; {how}", step, t)
