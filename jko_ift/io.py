"""Results on disk: JSON-safe conversion, atomic file writes and results folders.

Nothing here half-writes a file: every file is first written under a temporary name in
its own folder and then moved into place with ``os.replace`` (atomic on POSIX and
Windows), and a results folder is built beside its target and renamed into place.
A crash leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = ["FolderInUseError", "ResultsFileError", "ResultsFolderError", "RunInterrupted", "atomic_path",
           "check_writable", "folder_lock", "load", "read_metadata", "results_folder", "save_trajectory",
           "to_jsonable", "write_json_atomic"]


class ResultsFileError(ValueError):
    """A trajectory or checkpoint file that cannot be used: missing, empty, truncated, corrupted,
    altered after it was written (its SHA-256 checksum does not match) or not a jko_ift file."""


class ResultsFolderError(ValueError):
    """A results folder that cannot take the results: not a folder, not writable, or too little
    free space for what the run will write."""


class FolderInUseError(ResultsFolderError):
    """Another live process holds the lock of the results folder."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (``KeyboardInterrupt``); the message says where it stopped and how
    to resume. ``steps_done`` and ``time`` are the last completed step and its time."""

    def __init__(self, message: str, steps_done: int, time: float):
        super().__init__(message)
        self.steps_done, self.time = steps_done, time


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
    """Return ``path`` as a Path, or raise ``ResultsFolderError`` if it exists and is not a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ResultsFolderError(f"the results folder {path} exists and is not a folder; "
                                 "pass another --out or remove that file")
    return path


#: Free space asked for beyond a run's own estimate: the energy figure and summary.json with its
#: per-step lists (an energy.png is 40 to 80 kB, a 1000-step summary.json about 1 MB).
SPACE_MARGIN_BYTES = 8 * 2**20


def check_writable(path, needed_bytes: int = 0, create: bool = True) -> Path:
    """Check, before any compute, that results can be written at ``path``; return it as a Path.

    With ``create`` the folder is made (with its parents) and a probe file is created and removed
    in it; without, the probe goes into the folder that will hold ``path`` (``results_folder``
    builds its results beside ``path``), and into ``path`` too if it exists. Also asks the file
    system for its free space (``shutil.disk_usage``) and refuses when it is below ``needed_bytes``
    + ``SPACE_MARGIN_BYTES``. Raises ``ResultsFolderError`` saying what is wrong and what to do.
    """
    path = check_results_target(path)
    folders = [path] if create else [path.absolute().parent] + ([path] if path.exists() else [])
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
            os.close(handle)
            os.unlink(probe)
        free = shutil.disk_usage(folders[0]).free
    except OSError as error:
        raise ResultsFolderError(
            f"cannot write results into {path}: {error.strerror or error}"
            f"{f' ({error.filename})' if error.filename else ''}; make it writable or pass another --out"
        ) from None
    needed = int(needed_bytes) + SPACE_MARGIN_BYTES
    if free < needed:
        raise ResultsFolderError(
            f"too little free space for the results in {path}: {free / 2**20:.1f} MiB free, about "
            f"{needed / 2**20:.1f} MiB needed; free some space or pass another --out")
    return path


#: The lock file of a results folder; it exists only while a run holds the folder.
LOCK_FILE = ".jko-ift.lock"


def _lock_holder(descriptor: int) -> str:
    """What the lock file says about the run that holds it (pid, command, config, start)."""
    os.lseek(descriptor, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(descriptor, 1 << 16).decode("utf-8") or "{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or not holder:
        return "a process that is still starting"
    parts = [f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"]
    if holder.get("config_file"):
        parts.append(f"config {holder['config_file']}")
    if holder.get("digest"):
        parts.append(f"config digest {str(holder['digest'])[:12]}")
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    return ", ".join(parts)


@contextlib.contextmanager
def folder_lock(folder, holder: Mapping | None = None) -> Iterator[Path]:
    """Hold the lock of the results folder ``folder`` (created if missing) for the block.

    The lock is an exclusive ``flock`` on ``folder / LOCK_FILE``, which records ``holder`` (with
    the pid, host and start time added). The kernel drops the lock when its process ends, however
    it ends, so the lock of a killed run is taken over at once and never goes stale. A second run
    into a held folder raises ``FolderInUseError`` naming the holder. The file is removed on
    release while still locked; a run that opened the removed file sees that its inode is gone and
    locks the new file instead. Where ``fcntl`` is missing (Windows) the folder is not locked.
    """
    import datetime
    import socket

    folder = check_results_target(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield folder
        return
    path = folder / LOCK_FILE
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _lock_holder(descriptor)
            os.close(descriptor)
            raise FolderInUseError(
                f"the results folder {folder} is in use by another run ({who}); wait for it to finish, "
                "or pass another --out") from None
        except OSError:  # a file system without flock (some network mounts): run unlocked
            os.close(descriptor)
            descriptor = None
            break
        try:
            current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(descriptor)  # the holder removed the file as we opened it: lock the new one
    if descriptor is None:
        with contextlib.suppress(OSError):
            path.unlink()
        yield folder
        return
    record = {**dict(holder or {}), "pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps(to_jsonable(record)).encode("utf-8"))
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(descriptor)


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
#: The array holding the SHA-256 checksum of all the other arrays of a trajectory file.
CHECKSUM_KEY = "sha256"


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
    and the run's ``warnings``, and ``sha256``, the checksum of all the other arrays (``load``
    refuses a file that does not match it). ``load`` reads it back into an equal ``Trajectory``.
    Arrays only: the file is read with ``allow_pickle=False``.
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
    arrays[CHECKSUM_KEY] = np.array(_checksum(arrays))
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream:
            np.savez_compressed(stream, **arrays)
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path)


#: What to do about a trajectory file that cannot be read (``load``).
LOAD_ADVICE = "write it again (rerun the command that made it)"
#: The first bytes of a zip archive, which every ``.npz`` file is.
ZIP_MAGIC = b"PK\x03\x04"


def _checksum(arrays: Mapping) -> str:
    """SHA-256 of every array of a trajectory file but the checksum itself: names, dtypes, shapes
    and bytes, in sorted order of the names."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        if key == CHECKSUM_KEY:
            continue
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}\0{value.dtype.str}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _read_arrays(path: Path, advice: str) -> dict:
    """The arrays of the ``.npz`` file ``path``; ``ResultsFileError`` for anything else."""
    def refuse(what: str):
        return ResultsFileError(f"{path} {what}; {advice}")

    if not path.exists():
        raise ResultsFileError(f"no trajectory file at {path}; pass the trajectory.npz of a results folder")
    if not path.is_file():
        raise refuse("is not a file")
    with open(path, "rb") as stream:
        head = stream.read(len(ZIP_MAGIC))
    if not head:
        raise refuse("is empty (0 bytes): a run was stopped before it was written, or it was cleared")
    if head != ZIP_MAGIC:
        raise refuse(f"is not a jko_ift trajectory file (an .npz archive starts with {ZIP_MAGIC!r}, "
                     f"this one with {head!r})")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as error:  # noqa: BLE001 - zipfile, zlib, EOF and numpy errors alike
        raise refuse(f"is truncated or corrupted ({type(error).__name__}: {error})") from None


def _open_trajectory(path, advice: str = LOAD_ADVICE, require_checksum: bool = False) -> dict:
    """The checked arrays of the trajectory file ``path``.

    Refuses (``ResultsFileError``, naming the file, what is wrong and ``advice``) a missing, empty,
    truncated or corrupted file, one of another format, and one whose arrays do not match the
    SHA-256 checksum stored with them. Files written before checksums existed have none: they are
    read, unless ``require_checksum`` (checkpoints are resumed only when their checksum matches).
    """
    path = Path(path)
    arrays = _read_arrays(path, advice)
    found = str(arrays.get("format", "none"))
    if found != TRAJECTORY_FORMAT:
        raise ResultsFileError(f"{path} is not a jko_ift trajectory file (format {found!r}, "
                               f"expected {TRAJECTORY_FORMAT!r}); {advice}")
    if CHECKSUM_KEY in arrays:
        if str(arrays[CHECKSUM_KEY]) != _checksum(arrays):
            raise ResultsFileError(f"{path} was altered or damaged after it was written: its arrays do not "
                                   f"match the SHA-256 checksum stored with them; {advice}")
    elif require_checksum:
        raise ResultsFileError(f"{path} has no checksum (it was written by an older jko_ift, or altered), "
                               f"so it cannot be trusted; {advice}")
    return arrays


def read_metadata(path, advice: str = LOAD_ADVICE, require_checksum: bool = False) -> dict:
    """The ``metadata`` dict stored by ``save_trajectory`` (empty if none was given); a file that
    cannot be read raises ``ResultsFileError`` (see ``load``)."""
    arrays = _open_trajectory(path, advice, require_checksum)
    try:
        metadata = json.loads(str(arrays["metadata"]))
    except (KeyError, ValueError) as error:
        raise ResultsFileError(f"{path} has no readable metadata ({error}); {advice}") from None
    if not isinstance(metadata, dict):
        raise ResultsFileError(f"{path} has metadata of type {type(metadata).__name__}, not a dict; {advice}")
    return metadata


def load(path, advice: str = LOAD_ADVICE, require_checksum: bool = False):
    """Read a trajectory file written by ``save_trajectory`` (or ``jko-ift run``) back into
    a ``Trajectory``: same times, energies, weights, points, stats and stop reason; measures
    that were on a ``Grid`` get an equal grid back (so ``Entropy`` and the plots work).

    A missing, empty, truncated, corrupted or altered file (its SHA-256 checksum does not match)
    raises ``ResultsFileError`` (a ``ValueError``) naming the file, what is wrong and ``advice``.
    """
    arrays = _open_trajectory(path, advice, require_checksum)
    try:
        return _trajectory_from_arrays(arrays)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise ResultsFileError(f"{path} holds an inconsistent trajectory ({type(error).__name__}: {error}); "
                               f"{advice}") from None


def _trajectory_from_arrays(arrays: Mapping):
    from .measures import Grid, Measure
    from .solve import Trajectory

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
    from .config import FIXED_SUPPORT_METHODS

    run, mu = spec.run, spec.initial
    steps = (run.steps or 0) if not spec.adaptive else len(run.save_at or ()) + 1
    on_grid = mu.grid is not None and spec.method_kind in FIXED_SUPPORT_METHODS
    state = mu.n * (1 if on_grid else mu.dim + 1) * 8
    copies = 1 + (2 if checkpoint_every is not None else 0)
    return (steps + 1) * (state * copies + SUMMARY_BYTES_PER_STEP)


#: summary.json holds per step its time, energy, tau, wall time, status, certificate and the
#: step's stats: about 300 to 500 bytes (measured on the example configs); twice that, to be safe.
SUMMARY_BYTES_PER_STEP = 1000


def _run_in_folder(spec, out: Path, resume: bool, checkpoint_every: int | None, progress: bool) -> tuple:
    """``run_config`` in the checked, locked folder ``out``."""
    import logging
    import time

    from .run_warnings import WarningLog
    from .solve import Trajectory, solve

    logger = logging.getLogger(__name__)
    checkpoint = out / CHECKPOINT_FILE
    run = spec.run
    start = time.perf_counter()
    times, measures, energies, stats = [0.0], [spec.initial], [spec.energy.value(spec.initial)], []
    done, stop_reason, resumed_from = 0, None, None
    log = WarningLog()  # the warnings of every chunk, steps counted from the start of the run
    if resume and checkpoint.exists():
        advice = CHECKPOINT_ADVICE.format(checkpoint=checkpoint)
        metadata = read_metadata(checkpoint, advice, require_checksum=True)
        if metadata.get("digest") != spec.digest:
            raise ValueError(f"the checkpoint in {out} belongs to another config (its config differs "
                             "from this one); resume with the same config, or run without --resume")
        saved = load(checkpoint, advice, require_checksum=True)
        done, stop_reason = _checkpoint_position(metadata, saved, checkpoint, advice)
        times, measures = list(saved.times), list(saved.measures)
        energies, stats = list(saved.energies), list(saved.stats)
        log.extend(saved.warnings)
        resumed_from = done
        if checkpoint_every != metadata["checkpoint_every"]:
            logger.info("resuming with the checkpoint interval of the interrupted run, %s steps "
                        "(the chunks decide the result bit for bit)", metadata["checkpoint_every"])
        checkpoint_every = metadata["checkpoint_every"]
        logger.info("resuming %s from step %d (t = %.6g)", out, done, times[-1])
    elif resume:
        logger.warning("no checkpoint in %s: starting from the beginning", out)
    elif checkpoint.exists():
        checkpoint.unlink()  # a fresh run: an old checkpoint must not be resumed into it
    _mark_running(spec, out, resumed_from, checkpoint_every)
    # Where the run is: the last completed step and its time, and the last checkpoint's.
    position = {"step": done, "t": times[-1],
                "checkpoint": (done, times[-1]) if resumed_from is not None else None}

    def write_checkpoint():
        save_trajectory(checkpoint, Trajectory(np.array(times), measures, np.array(energies),
                                               stats, stop_reason or "running", log.warnings()),
                        metadata={"digest": spec.digest, "steps_done": done, "time": times[-1],
                                  "checkpoint_every": checkpoint_every, "stop_reason": stop_reason})
        position.update(step=done, t=times[-1], checkpoint=(done, times[-1]))
        logger.debug("checkpoint at step %d written to %s (t = %.6g)", done, checkpoint, times[-1])

    try:
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
                position.update(step=counter["step"], t=t)
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

    except KeyboardInterrupt:
        raise _interrupted(spec, out, position, checkpoint_every) from None
    except Exception as error:
        _write_status(out, spec, "failed", {"error": f"{type(error).__name__}: {error}",
                                           "steps_done": position["step"], "time": position["t"]})
        raise

    times_array = np.array(times)
    kept = _kept(times_array, run.save_at, float(times_array[-1]))
    trajectory = Trajectory(times_array[kept], [measures[i] for i in kept],
                            np.array(energies)[kept], stats, stop_reason, log.warnings())
    accepted = [s for s in stats if s.get("accepted", True)]
    summary = {
        "status": "complete",
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
    from .plotting import plot_energy  # plotting imports io: import it when needed

    label = spec.name or (Path(spec.source).stem if spec.source else "config")
    title = f"{label}: {type(spec.geometry).__name__}, {spec.method_kind}"
    try:  # summary.json last: until it says "complete", the folder's results are not
        save_trajectory(out / TRAJECTORY_FILE, trajectory, metadata={"digest": spec.digest})
        plot_energy(Trajectory(times_array, measures, np.array(energies), stats, stop_reason),
                    out / ENERGY_FIGURE, title=title)
        write_json_atomic(out / SUMMARY_FILE, summary)
    except KeyboardInterrupt:
        raise _interrupted(spec, out, position, checkpoint_every) from None
    except OSError as error:
        kept = (f"the checkpoint at step {done} is kept: free space, then run again with --resume"
                if checkpoint_every is not None else "nothing was saved")
        raise ResultsFolderError(f"the run finished but its results could not be written into {out} "
                                 f"({error.strerror or error}); {kept}") from None
    logger.info("results written to %s", out)
    return trajectory, summary


#: What to do about a checkpoint that cannot be resumed.
CHECKPOINT_ADVICE = "delete {checkpoint} and run again without --resume (the run starts from the beginning)"
#: The result files of a run, removed when a run starts in their folder (summary.json is replaced).
RESULT_FILES = (TRAJECTORY_FILE, ENERGY_FIGURE)


def _checkpoint_position(metadata: Mapping, saved, checkpoint: Path, advice: str) -> tuple:
    """(steps done, stop reason) of a checkpoint, checked against the states it holds."""
    done, stop_reason = metadata.get("steps_done"), metadata.get("stop_reason")
    accepted = sum(1 for s in saved.stats if s.get("accepted", True))
    if not isinstance(done, int) or isinstance(done, bool) or done != accepted or done < 0 \
            or "checkpoint_every" not in metadata:
        raise ResultsFileError(f"{checkpoint} is inconsistent: it says {done!r} steps were done but holds "
                               f"{accepted} accepted steps; {advice}")
    return done, stop_reason


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


def _interrupted(spec, out: Path, position: Mapping, checkpoint_every: int | None) -> RunInterrupted:
    """The ``RunInterrupted`` of a run stopped by Ctrl-C at ``position`` (and its summary.json)."""
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
