"""Results on disk: JSON-safe conversion, atomic file writes and results folders.

Nothing here half-writes a file: every file is first written under a temporary name in
its own folder and then moved into place with ``os.replace`` (atomic on POSIX and
Windows), and a results folder is built beside its target and renamed into place.
A crash leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = ["atomic_path", "results_folder", "to_jsonable", "write_json_atomic"]


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
