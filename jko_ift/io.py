"""Files: JSON-safe conversion, atomic writes, checksummed trajectory files, results folders.

Nothing here half-writes a file: every file is first written under a temporary name in
its own folder and then moved into place with ``os.replace`` (atomic on POSIX and
Windows), and a results folder is built beside its target and renamed into place.
A crash leaves either the old file or the new one, never a truncated one. This module
only reads and writes files; running a config into a results folder is ``runner``'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = ["FolderInUseError", "ResultsFileError", "ResultsFolderError", "atomic_path", "check_writable",
           "folder_lock", "load", "read_metadata", "results_folder", "save_trajectory", "to_jsonable",
           "write_json_atomic"]


class ResultsFileError(ValueError):
    """A trajectory or checkpoint file that cannot be used: missing, empty, truncated, corrupted,
    altered after it was written (its SHA-256 checksum does not match) or not a jko_ift file."""


class ResultsFolderError(ValueError):
    """A results folder that cannot take the results: not a folder, not writable, or too little
    free space for what the run will write."""


class FolderInUseError(ResultsFolderError):
    """Another live process holds the lock of the results folder."""


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
    return _plain(obj, lambda value: value if math.isfinite(value) else None)


def _json_exact(obj):
    """Like ``to_jsonable`` but keeps NaN and infinity (written as JSON's NaN/Infinity
    extensions, which Python's ``json`` reads back), so that stats round-trip exactly."""
    return _plain(obj, lambda value: value)


def _plain(obj, real: Callable[[float], float | None]):
    """``obj`` in Python's plain types (see ``to_jsonable``), each float ``x`` as ``real(x)``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return real(float(obj))
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist(), real)
    if isinstance(obj, Mapping):
        return {str(key): _plain(value, real) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(value, real) for value in obj]
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
    descriptor = _take_lock(fcntl, path, folder)
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


def _take_lock(fcntl, path: Path, folder: Path) -> int | None:
    """An open descriptor of the lock file ``path`` holding its exclusive ``flock``; None on a file
    system without ``flock`` (some network mounts: the run goes unlocked). ``FolderInUseError``
    when another live process holds it."""
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
        except OSError:
            os.close(descriptor)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return descriptor
        os.close(descriptor)  # the holder removed the file as we opened it: lock the new one


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


def save_trajectory(path, trajectory, metadata: Mapping | None = None) -> Path:
    """Write a ``Trajectory`` to one ``.npz`` file, atomically; return the path.

    The file holds ``times`` (k,), ``energies`` (k,), the weights of all measures end to
    end with their ``sizes`` (k,), the points of the measures that are not on a grid (end
    to end, rows (N, d)), for measures on a ``Grid`` its ``lo``, ``hi`` and ``shape`` (the
    points are rebuilt from it), ``stats`` and ``metadata`` as JSON text, ``stop_reason``,
    the run's ``warnings``, its ``scheme`` (method and geometry), and ``sha256``, the checksum
    of all the other arrays (``load`` refuses a file that does not match it). ``load`` reads it
    back into an equal ``Trajectory``. Arrays only: the file is read with ``allow_pickle=False``.
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
        "scheme": np.array(str(getattr(trajectory, "scheme", ""))),
    }
    arrays[CHECKSUM_KEY] = np.array(_checksum(arrays))
    with _interrupts_deferred(), atomic_path(path) as temporary:
        with open(temporary, "wb") as stream:
            try:
                np.savez_compressed(stream, **arrays)
            except Exception as error:
                interrupt = _interrupt_behind(error)
                if interrupt is None:
                    raise
                raise interrupt from None  # Ctrl-C (or SIGTERM) during the write stays what it is
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM that arrive during the block are delivered when it ends (main thread;
    elsewhere the block runs as it is, as signals only reach the main thread). A signal in the
    middle of zipfile's handling of an archive member left the ZipFile unclosable: the run's
    message was followed by a traceback from its ``__del__`` (a SIGTERM after step 19 of 30 in
    tests/test_runner.py's random kills). A checkpoint is now written whole, then the run stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if callable(handler) or handler == signal.SIG_DFL:  # not SIG_IGN, nor one set outside Python
            previous[number] = signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])  # to the handler restored above


def _interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that ``error`` was raised while handling, if any: an interrupt while
    zipfile closes an archive member makes ZipFile.close raise ValueError ("Can't close the ZIP
    file while there is an open writing handle"), which would end the run as bad input. Signals
    wait for the write (``_interrupts_deferred``); this covers a KeyboardInterrupt raised there
    directly."""
    cause = error.__context__
    while cause is not None and not isinstance(cause, KeyboardInterrupt):
        cause = cause.__context__
    return cause


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
    a ``Trajectory``: same times, energies, weights, points, stats, stop reason and scheme; measures
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
    scheme = str(arrays["scheme"]) if "scheme" in arrays else ""  # files from before it was saved
    return Trajectory(arrays["times"], measures, arrays["energies"], json.loads(str(arrays["stats"])),
                      str(arrays["stop_reason"]), run_warnings, scheme=scheme)
