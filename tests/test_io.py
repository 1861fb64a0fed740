"""Files: JSON-safe values, atomic writes, results folders that appear whole, the folder lock, and
trajectory files that round-trip exactly and refuse damage by name (``jko_ift.io``)."""

import json
import os

import numpy as np
import pytest
from test_config import explicit_config

import jko_ift as jk
from jko_ift.config import load_config
from jko_ift.io import (
    CHECKSUM_KEY,
    LOCK_FILE,
    FolderInUseError,
    ResultsFileError,
    folder_lock,
    read_metadata,
    results_folder,
    save_trajectory,
    to_jsonable,
    write_json_atomic,
)

# -------------------------------------------------------------------- JSON, atomic files, results folders

def test_to_jsonable_converts_numpy_and_non_finite_values():
    value = {"a": np.float32(1.5), "b": np.arange(3), "c": (np.int64(2), np.bool_(True)),
             "d": float("nan"), "e": np.array([np.inf, 1.0]), 3: None}
    assert to_jsonable(value) == {"a": 1.5, "b": [0, 1, 2], "c": [2, True], "d": None,
                                  "e": [None, 1.0], "3": None}
    with pytest.raises(TypeError, match="object"):
        to_jsonable(object())


def test_write_json_atomic_replaces_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"x": np.float64(1.0)})
    assert json.loads(path.read_text()) == {"x": 1.0}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert json.loads(path.read_text()) == {"x": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_results_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "results"
    with pytest.raises(RuntimeError), results_folder(target) as folder:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with results_folder(target) as folder:
        (folder / "one.txt").write_text("1")
    assert (target / "one.txt").read_text() == "1"
    # into an existing folder: files replaced one by one, other files left alone
    (target / "mine.txt").write_text("mine")
    with results_folder(target) as folder:
        (folder / "one.txt").write_text("2")
    assert (target / "one.txt").read_text() == "2" and (target / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


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
    assert trajectory.scheme and loaded.scheme == trajectory.scheme  # the summary names the scheme
    assert trajectory.scheme in repr(loaded)
    assert read_metadata(path) == {"note": "x"}
    assert not list(path.parent.glob(".*partial*"))  # no temporary file left behind


def test_ctrl_c_while_an_archive_member_closes_stays_an_interrupt(tmp_path, monkeypatch):
    """A KeyboardInterrupt in zipfile's close of a member made ZipFile.close raise ValueError
    (an open writing handle): the run ended as bad input (exit 2) instead of interrupted (130).
    The interrupt comes out as itself, and no file is left behind."""
    import zipfile

    close = zipfile._ZipWriteFile.close
    calls = []

    def interrupted_close(handle):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return close(handle)

    monkeypatch.setattr(zipfile._ZipWriteFile, "close", interrupted_close)
    trajectory = jk.Trajectory(np.array([0.0]), [jk.Measure(np.zeros((3, 2)), np.ones(3))],
                               np.array([1.0]), [], "running")
    with pytest.raises(KeyboardInterrupt):
        save_trajectory(tmp_path / "t.npz", trajectory)
    assert calls and list(tmp_path.iterdir()) == []


def test_ctrl_c_during_a_write_is_delivered_once_the_file_is_whole(tmp_path, monkeypatch):
    """A signal in the middle of zipfile's handling of an archive member left the ZipFile
    unclosable, and its __del__ printed a traceback after the run's message. A Ctrl-C that
    arrives while the trajectory is written now waits until the file is complete."""
    import signal

    write_array = np.lib.format.write_array
    calls = []

    def interrupted_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # in the middle of the archive
            signal.raise_signal(signal.SIGINT)
        return write_array(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", interrupted_write)
    trajectory = jk.Trajectory(np.array([0.0]), [jk.Measure(np.zeros((3, 2)), np.ones(3))],
                               np.array([1.0]), [], "running")
    with pytest.raises(KeyboardInterrupt):
        save_trajectory(tmp_path / "t.npz", trajectory)
    assert len(calls) > 2  # the write went on after the signal
    np.testing.assert_array_equal(jk.load(tmp_path / "t.npz").energies, [1.0])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored


def test_trajectory_round_trip_without_grid(tmp_path):
    rng = np.random.default_rng(0)
    measures = [jk.Measure(rng.normal(size=(n, 2)), rng.random(n)) for n in (5, 7)]
    trajectory = jk.Trajectory(np.array([0.0, 0.5]), measures, np.array([2.0, 1.0]), [{"tau": 0.5}], "energy")
    loaded = jk.load(save_trajectory(tmp_path / "particles.npz", trajectory))
    for mu, nu in zip(loaded.measures, measures, strict=True):
        assert mu.grid is None
        np.testing.assert_array_equal(mu.points, nu.points)
        np.testing.assert_array_equal(mu.weights, nu.weights)
    assert loaded.stop_reason == "energy" and loaded.scheme == ""


def test_a_file_written_before_the_scheme_was_saved_loads_with_no_scheme(tmp_path):
    from jko_ift.io import CHECKSUM_KEY, _checksum

    trajectory = jk.Trajectory(np.array([0.0]), [jk.Measure(np.zeros((1, 1)), [1.0])], np.array([0.0]),
                               scheme="ConicJKO in W2()")
    path = save_trajectory(tmp_path / "new.npz", trajectory)
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files if key != "scheme"}
    arrays[CHECKSUM_KEY] = np.array(_checksum(arrays))
    np.savez(tmp_path / "old.npz", **arrays)
    assert jk.load(tmp_path / "old.npz").scheme == ""
    assert jk.load(path).scheme == "ConicJKO in W2()"


def test_load_rejects_other_files(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a jko_ift trajectory"):
        jk.load(other)
    with pytest.raises(ValueError, match="no trajectory file"):
        jk.load(tmp_path / "absent.npz")


def test_folder_lock_refuses_a_second_holder_by_name_and_is_gone_after_release(tmp_path):
    out = tmp_path / "results"
    with folder_lock(out, {"config_file": "first.toml"}):
        record = json.loads((out / LOCK_FILE).read_text())
        assert record["config_file"] == "first.toml" and record["pid"] == os.getpid()
        with pytest.raises(FolderInUseError, match="first.toml"), folder_lock(out):
            pass
    assert not (out / LOCK_FILE).exists()
    with folder_lock(out):  # released: taken again at once
        pass


def test_a_trajectory_file_whose_arrays_were_altered_is_refused_by_its_checksum(tmp_path):
    trajectory = jk.Trajectory(np.array([0.0]), [jk.Measure(np.zeros((2, 1)), np.ones(2))], np.array([1.0]),
                               [], "steps")
    path = save_trajectory(tmp_path / "t.npz", trajectory)
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    assert CHECKSUM_KEY in arrays
    arrays["weights"] = arrays["weights"] * 2
    with open(path, "wb") as stream:
        np.savez_compressed(stream, **arrays)
    with pytest.raises(ResultsFileError, match="checksum"):
        jk.load(path)
    with pytest.raises(ResultsFileError, match="checksum"):
        read_metadata(path)
