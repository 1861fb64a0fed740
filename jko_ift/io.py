"""Results on disk: JSON-safe conversion, atomic file writes and results folders.

Nothing here half-writes a file: every file is first written under a temporary name in
its own folder and then moved into place with ``os.replace`` (atomic on POSIX and
Windows), and a results folder is built beside its target and renamed into place.
A crash leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = ["atomic_path", "load", "read_metadata", "results_folder", "save_trajectory", "to_jsonable",
           "write_json_atomic"]


def _umask() -> int:
    umask = os.umask(0o022)  # read the umask (there is no getter) and put it back at once
    os.umask(umask)
    return umask


#: Permissions of the files and folders written here, as ``open`` and ``mkdir`` would give
#: them; ``tempfile`` creates its files at 0o600 and its folders at 0o700.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def to_jsonable(obj):
    """``obj`` with numpy scalars and arrays turned into Python numbers and lists.

    Dicts (keys become strings), lists, tuples and sets are converted recursively; paths
    become strings. JSON has no NaN or infinity, so non-finite floats become ``None``.
    Anything else that ``json`` cannot write raises ``TypeError`` naming its type.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"cannot write an object of type {type(obj).__name__} to JSON; convert it to numbers, "
        "strings, lists or dicts first"
    )


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``.

    Write the file to the yielded path (an empty file, created so that no other process
    can take the name). When the block ends normally the file replaces ``path`` in one
    ``os.replace``; when it raises, the temporary file is removed and ``path`` is left as
    it was. The temporary name keeps the suffix of ``path`` so that writers that pick a
    format from it (matplotlib) work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{path.suffix}",
                                         dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def write_json_atomic(path, obj, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (see ``to_jsonable``); return the path."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n"
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path)


def check_results_target(path) -> Path:
    """Return ``path`` as a Path, or raise ``ValueError`` if it exists and is not a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"the results folder {path} exists and is not a folder; "
                         "pass another --out or remove that file")
    return path


@contextlib.contextmanager
def results_folder(path) -> Iterator[Path]:
    """Build a results folder beside ``path`` and move it into place when the block succeeds.

    Yields a fresh temporary folder (a sibling of ``path``) to write into. On success:

    * if ``path`` does not exist, the temporary folder is renamed to ``path`` (one rename,
      so the folder appears complete or not at all);
    * if ``path`` is an existing folder, each file written is moved into it with
      ``os.replace`` (each file atomic); other files already there are left alone.

    If the block raises, the temporary folder is removed and ``path`` is untouched.
    """
    path = check_results_target(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        if not path.exists():
            try:
                os.chmod(staging, DIR_MODE)
                os.rename(staging, path)
                return
            except OSError:  # appeared meanwhile: fall back to moving file by file
                pass
        for source in sorted(staging.rglob("*")):
            if source.is_file():
                destination = path / source.relative_to(staging)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------- trajectory files

#: The format tag written into every trajectory file; ``load`` refuses other formats.
TRAJECTORY_FORMAT = "jko_ift.trajectory/1"


def _json_exact(obj):
    """Like ``to_jsonable`` but keeps NaN and infinity (written as JSON's NaN/Infinity
    extensions, which Python's ``json`` reads back), so that stats round-trip exactly."""
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return _json_exact(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(key): _json_exact(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_json_exact(value) for value in obj]
    return to_jsonable(obj)


def save_trajectory(path, trajectory, metadata: Mapping | None = None) -> Path:
    """Write a ``Trajectory`` to one ``.npz`` file, atomically; return the path.

    The file holds ``times`` (k,), ``energies`` (k,), the weights of all measures end to
    end with their ``sizes`` (k,), the points of the measures that are not on a grid (end
    to end, rows (N, d)), for measures on a ``Grid`` its ``lo``, ``hi`` and ``shape`` (the
    points are rebuilt from it), ``stats`` and ``metadata`` as JSON text, ``stop_reason``
    and the run's ``warnings``. ``load`` reads it back into an equal ``Trajectory``. Arrays
    only: the file is read with ``allow_pickle=False``.
    """
    measures = list(trajectory.measures)
    if not measures:
        raise ValueError("cannot save a trajectory with no measures")
    dims = {mu.dim for mu in measures}
    if len(dims) != 1:
        raise ValueError(f"all measures of a trajectory must have one dimension, got {sorted(dims)}")
    d = dims.pop()
    on_grid = np.array([mu.grid is not None and np.array_equal(mu.points, mu.grid.points)
                        for mu in measures])
    nan_row = np.full(d, np.nan)
    arrays = {
        "format": np.array(TRAJECTORY_FORMAT),
        "times": np.asarray(trajectory.times, dtype=float),
        "energies": np.asarray(trajectory.energies, dtype=float),
        "sizes": np.array([mu.n for mu in measures], dtype=np.int64),
        "weights": np.concatenate([mu.weights for mu in measures]),
        "on_grid": on_grid,
        "points": np.concatenate([mu.points for mu, g in zip(measures, on_grid, strict=True) if not g]
                                 or [np.empty((0, d))]),
        "grid_lo": np.array([mu.grid.lo if g else nan_row for mu, g in zip(measures, on_grid, strict=True)]),
        "grid_hi": np.array([mu.grid.hi if g else nan_row for mu, g in zip(measures, on_grid, strict=True)]),
        "grid_shape": np.array([mu.grid.shape if g else np.zeros(d, int)
                                for mu, g in zip(measures, on_grid, strict=True)], dtype=np.int64),
        "stats": np.array(json.dumps(_json_exact(list(trajectory.stats)), allow_nan=True)),
        "metadata": np.array(json.dumps(_json_exact(dict(metadata or {})), allow_nan=True)),
        "stop_reason": np.array(str(trajectory.stop_reason)),
        "warnings": np.array(json.dumps([w.to_dict() for w in getattr(trajectory, "warnings", ())])),
    }
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream:
            np.savez_compressed(stream, **arrays)
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path)


def _open_trajectory(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no trajectory file at {path}; pass the trajectory.npz of a results folder")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable trajectory file ({error})") from None
    found = str(arrays.get("format", "none"))
    if found != TRAJECTORY_FORMAT:
        raise ValueError(f"{path} is not a jko_ift trajectory file (format {found!r}, "
                         f"expected {TRAJECTORY_FORMAT!r})")
    return arrays


def read_metadata(path) -> dict:
    """The ``metadata`` dict stored by ``save_trajectory`` (empty if none was given)."""
    return json.loads(str(_open_trajectory(path)["metadata"]))


def load(path):
    """Read a trajectory file written by ``save_trajectory`` (or ``jko-ift run``) back into
    a ``Trajectory``: same times, energies, weights, points, stats and stop reason; measures
    that were on a ``Grid`` get an equal grid back (so ``Entropy`` and the plots work)."""
    from .measures import Grid, Measure
    from .solve import Trajectory

    arrays = _open_trajectory(path)
    grids: dict = {}
    measures, start, point_start = [], 0, 0
    for k, size in enumerate(arrays["sizes"].tolist()):
        weights = arrays["weights"][start:start + size]
        start += size
        if arrays["on_grid"][k]:
            key = (tuple(arrays["grid_lo"][k].tolist()), tuple(arrays["grid_hi"][k].tolist()),
                   tuple(arrays["grid_shape"][k].tolist()))
            grid = grids.get(key) or grids.setdefault(key, Grid(*key))  # one Grid object shared
            measures.append(Measure(grid.points, weights, grid=grid))
        else:
            measures.append(Measure(arrays["points"][point_start:point_start + size], weights))
            point_start += size
    from .run_warnings import from_dicts

    run_warnings = from_dicts(json.loads(str(arrays["warnings"]))) if "warnings" in arrays else ()
    return Trajectory(arrays["times"], measures, arrays["energies"],
                      json.loads(str(arrays["stats"])), str(arrays["stop_reason"]), run_warnings)


# ---------------------------------------------------------------------------- runs with checkpoints

#: The files of a results folder written by ``run_config`` (and ``jko-ift run``).
SUMMARY_FILE, TRAJECTORY_FILE, ENERGY_FIGURE, CHECKPOINT_FILE = (
    "summary.json", "trajectory.npz", "energy.png", "checkpoint.npz")


def versions() -> dict:
    """Versions of Python and of the libraries a result depends on."""
    import platform

    import cvxpy
    import ot
    import scipy

    from . import __version__
    return {"jko_ift": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "cvxpy": cvxpy.__version__, "POT": ot.__version__, "python": platform.python_version()}


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


def _kept(times: np.ndarray, save_at, total_time: float) -> np.ndarray:
    """Indices of the saved states: the start, the save_at times and the last state."""
    if save_at is None:
        return np.arange(times.size)
    close = np.abs(times[:, None] - np.asarray(save_at)[None, :]) <= 1e-9 * max(total_time, 1.0)
    keep = close.any(1)
    keep[0] = keep[-1] = True
    return np.flatnonzero(keep)


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
    chunk and checkpoint) go to the ``jko_ift.io`` logger at DEBUG level.
    """
    import logging
    import time

    from .run_warnings import WarningLog
    from .solve import Trajectory, solve

    logger = logging.getLogger(__name__)
    out = check_results_target(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT_FILE
    run = spec.run
    if checkpoint_every is not None and (int(checkpoint_every) != checkpoint_every or checkpoint_every < 1):
        raise ValueError("checkpoint_every must be a positive whole number of steps, "
                         f"got {checkpoint_every!r}")
    if spec.adaptive and checkpoint_every is not None and run.save_at is None:
        raise ValueError("an adaptive run ([run.adaptive]) writes its checkpoints at its save times; "
                         "add [run] save_at = [...] to the config, or run without --checkpoint-every")
    start = time.perf_counter()
    times, measures, energies, stats = [0.0], [spec.initial], [spec.energy.value(spec.initial)], []
    done, stop_reason, resumed_from = 0, None, None
    log = WarningLog()  # the warnings of every chunk, steps counted from the start of the run
    if resume and checkpoint.exists():
        metadata = read_metadata(checkpoint)
        if metadata.get("digest") != spec.digest:
            raise ValueError(f"the checkpoint in {out} belongs to another config (its config differs "
                             "from this one); resume with the same config, or run without --resume")
        saved = load(checkpoint)
        times, measures = list(saved.times), list(saved.measures)
        energies, stats = list(saved.energies), list(saved.stats)
        log.extend(saved.warnings)
        done = resumed_from = metadata["steps_done"]
        stop_reason = metadata["stop_reason"]
        if checkpoint_every != metadata["checkpoint_every"]:
            logger.info("resuming with the checkpoint interval of the interrupted run, %s steps "
                        "(the chunks decide the result bit for bit)", metadata["checkpoint_every"])
        checkpoint_every = metadata["checkpoint_every"]
        logger.info("resuming %s from step %d (t = %.6g)", out, done, times[-1])
    elif resume:
        logger.warning("no checkpoint in %s: starting from the beginning", out)
    elif checkpoint.exists():
        checkpoint.unlink()  # a fresh run: an old checkpoint must not be resumed into it

    def write_checkpoint():
        save_trajectory(checkpoint, Trajectory(np.array(times), measures, np.array(energies),
                                               stats, stop_reason or "running", log.warnings()),
                        metadata={"digest": spec.digest, "steps_done": done,
                                  "checkpoint_every": checkpoint_every, "stop_reason": stop_reason})
        logger.debug("checkpoint at step %d written to %s (t = %.6g)", done, checkpoint, times[-1])

    if spec.adaptive and checkpoint_every is None:
        trajectory = spec.solve(progress=progress)
        times, measures = list(trajectory.times), list(trajectory.measures)
        energies, stats = list(trajectory.energies), list(trajectory.stats)
        log.extend(trajectory.warnings)
        stop_reason = trajectory.stop_reason
        done = len(trajectory.taus)
    elif spec.adaptive:
        # Chunks end at every N-th save time; each is one jk.solve whose controller starts from
        # the last accepted tau of the chunk before. A resumed run takes the same chunks, so the
        # result is the same, bit for bit, as the uninterrupted run with the same N.
        saves = np.asarray(run.save_at, float)
        ends = [float(t) for t in saves[checkpoint_every - 1::checkpoint_every]]
        ends = [t for t in ends if t < run.t_final * (1 - 1e-12)] + [run.t_final]
        bar = _time_bar(spec, run.t_final, times[-1], energies[-1], progress)
        try:
            for end in ends:
                start_t = times[-1]
                if stop_reason is not None or end <= start_t * (1 + 1e-12):
                    continue
                taus = [s["tau"] for s in stats if s.get("accepted", True)]
                controller = (run.controller if not taus
                              else dataclasses.replace(run.controller, tau0=taus[-1]))
                chunk_saves = [t - start_t for t in saves if start_t < t < end] + [end - start_t]
                part = solve(spec.energy, spec.geometry, measures[-1], t_final=end - start_t,
                             method=spec.make_method(), controller=controller,
                             save_at=chunk_saves, stop_rate=run.stop_rate,
                             stop_energy=run.stop_energy, progress=False)
                times.extend(start_t + t for t in part.times[1:])
                measures.extend(part.measures[1:])
                energies.extend(part.energies[1:].tolist())
                stats.extend(dict(s, step=done + s["step"], t=start_t + s["t"]) for s in part.stats)
                log.extend(part.warnings, done)
                done += len(part.taus)
                if part.stop_reason != "t_final":
                    stop_reason = part.stop_reason
                elif end >= run.t_final:
                    stop_reason = "t_final"
                bar.update(times[-1] - start_t)
                bar.set_postfix_str(f"energy={energies[-1]:.4g}", refresh=False)
                write_checkpoint()
        finally:
            bar.close()
    else:
        tau, total = run.tau, run.steps
        chunk = checkpoint_every or total
        bar = _run_bar(spec, total, done, times[-1], energies[-1], progress)
        counter = {"step": done}

        def on_step(result, _tau):
            counter["step"] += 1
            t = counter["step"] * tau
            energy = "-" if result.energy is None else f"{result.energy:.4g}"
            bar.set_postfix_str(f"t={t:.4g}, energy={energy}", refresh=False)
            bar.update(1)
            logger.debug("step %d of %d: t = %.6g, energy %s, status %s, certificate %s",
                         counter["step"], total, t, energy, result.status, f"{result.certificate:.2g}")

        try:
            while done < total and stop_reason is None:
                steps = min(chunk, total - done)
                logger.debug("steps %d to %d of %d (tau = %g)", done + 1, done + steps, total, tau)
                counter["step"] = done
                part = solve(spec.energy, spec.geometry, measures[-1], tau=tau, steps=steps,
                             method=_ReportingMethod(spec.make_method(), on_step),
                             stop_rate=run.stop_rate, stop_energy=run.stop_energy, progress=False)
                taken = len(part.measures) - 1
                times.extend((done + j) * tau for j in range(1, taken + 1))
                measures.extend(part.measures[1:])
                energies.extend(part.energies[1:].tolist())
                stats.extend(dict(s, step=done + s["step"]) for s in part.stats)
                log.extend(part.warnings, done)
                done += taken
                if part.stop_reason != "steps":
                    stop_reason = part.stop_reason
                elif done >= total:
                    stop_reason = "steps"
                if checkpoint_every is not None:
                    write_checkpoint()
        finally:
            bar.close()

    times_array = np.array(times)
    kept = _kept(times_array, run.save_at, float(times_array[-1]))
    trajectory = Trajectory(times_array[kept], [measures[i] for i in kept],
                            np.array(energies)[kept], stats, stop_reason, log.warnings())
    save_trajectory(out / TRAJECTORY_FILE, trajectory, metadata={"digest": spec.digest})
    accepted = [s for s in stats if s.get("accepted", True)]
    summary = {
        "command": "run",
        "config": spec.config,
        "config_file": spec.source,
        "problem": spec.name,
        "energy": repr(spec.energy),
        "geometry": repr(spec.geometry),
        "method": {"kind": spec.method_kind, "options": spec.method_options},
        "versions": versions(),
        "stop_reason": stop_reason,
        "steps": done,
        "final_time": times[-1],
        "final_energy": energies[-1],
        "checkpoint_every": checkpoint_every,
        "resumed_from_step": resumed_from,
        "wall_time": time.perf_counter() - start,
        "per_step": {
            "times": times, "energies": energies,
            "tau": [s["tau"] for s in accepted],
            "wall_time": [s.get("wall_time") for s in accepted],
            "status": [s.get("status") for s in accepted],
            "certificate": [s.get("certificate") for s in accepted],
        },
        "warnings": [w.to_dict() for w in log.warnings()],
        "stats": stats,
    }
    write_json_atomic(out / SUMMARY_FILE, summary)
    from .plotting import plot_energy  # plotting imports io: import it when needed

    label = spec.name or (Path(spec.source).stem if spec.source else "config")
    title = f"{label}: {type(spec.geometry).__name__}, {spec.method_kind}"
    plot_energy(Trajectory(times_array, measures, np.array(energies), stats, stop_reason),
                out / ENERGY_FIGURE, title=title)
    logger.info("results written to %s", out)
    return trajectory, summary
