"""``jko-ift sweep``: a grid of parameter values on Dask distributed gives the same table as
the same sweep run serially."""

import csv
import json

import pytest

from jko_ift.cli import main
from jko_ift.config import ConfigError
from jko_ift.studies import parse_value, sweep, sweep_cases

CONFIG = {"problem": {"name": "mmd_flow", "cells": 10}, "method": {"kind": "conic"},
          "run": {"tau": 0.3, "steps": 4}}
PARAMS = {"run.tau": [0.3, 0.1], "problem.kernel_width": [1.0, 2.0]}


def without_wall_time(rows):
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]


def test_local_cluster_sweep_equals_serial_sweep(capsys):
    serial = sweep(CONFIG, PARAMS, serial=True)
    assert capsys.readouterr().err == ""  # no bar unless asked for
    parallel = sweep(CONFIG, PARAMS, workers=2, progress=True)  # a LocalCluster of 2 worker processes
    err = capsys.readouterr().err
    assert "sweep: 100%" in err and "4/4 [" in err  # one bar over the cases, as they complete
    assert [(r["run.tau"], r["problem.kernel_width"]) for r in serial] == [
        (0.3, 1.0), (0.3, 2.0), (0.1, 1.0), (0.1, 2.0)]
    assert without_wall_time(parallel) == without_wall_time(serial)
    assert all(r["steps"] == 4 and r["stop_reason"] == "steps" for r in serial)
    assert len({r["final_energy"] for r in serial}) == 4


def test_values_and_cases():
    assert parse_value("1") == 1 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("ift") == "ift" and parse_value('"ift"') == "ift" and parse_value("[1, 2]") == [1, 2]
    assert sweep_cases(CONFIG, {"a.b": [1, 2], "c": ["x"]}) == [{"a.b": 1, "c": "x"}, {"a.b": 2, "c": "x"}]


def test_every_case_is_checked_before_running():
    with pytest.raises(ConfigError, match="geometry.kind") as info:
        sweep(CONFIG, {"geometry.kind": ["mmd", "ifft"]}, serial=True)
    assert "geometry.kind='ifft'" in str(info.value)


def test_sweep_cli_serial(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text('[problem]\nname = "mmd_flow"\ncells = 10\n[run]\ntau = 0.3\nsteps = 3\n')
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--param", "run.tau=0.3,0.1", "--serial", "--out", str(out),
                 "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"] == {"run.tau": [0.3, 0.1]} and len(summary["rows"]) == 2
    with open(out / "sweep.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [float(r["run.tau"]) for r in rows] == [0.3, 0.1]
    assert float(rows[0]["final_energy"]) == summary["rows"][0]["final_energy"]


def test_sweep_cli_errors(tmp_path, capsys):
    path = tmp_path / "small.toml"
    path.write_text('[problem]\nname = "mmd_flow"\ncells = 10\n[run]\ntau = 0.3\nsteps = 3\n')
    assert main(["sweep", str(path), "--param", "run.tua=0.1", "--serial", "--out", str(tmp_path / "x")]) == 2
    assert "run.tua" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--param", "run.tau"])
    with pytest.raises(SystemExit) as info:
        main(["sweep", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in ("--param", "--scheduler", "--workers", "--serial"))


def test_sweep_on_an_existing_scheduler():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        rows = sweep(CONFIG, {"run.tau": [0.3, 0.1]}, scheduler=cluster.scheduler_address)
    assert without_wall_time(rows) == without_wall_time(sweep(CONFIG, {"run.tau": [0.3, 0.1]}, serial=True))


def test_sweep_over_the_seeds_of_a_particle_support():
    config = {"problem": {"support": {"kind": "particles", "n": 12, "seed": 0},
                          "initial": {"kind": "gaussian", "mean": [5.0, 5.0], "cov": 1.0},
                          "energy": {"kind": "mmd2", "target": {"kind": "paper_mixture", "n": 12}},
                          "kernel": {"kind": "gaussian", "sigma": 10.0}},
              "geometry": {"kind": "ift", "alpha": 50.0, "beta": 0.1, "conserve_mass": True},
              "method": {"kind": "splitting", "transport": "explicit", "reaction": "exact"},
              "run": {"tau": 1.0, "steps": 3}}
    rows = sweep(config, {"problem.support.seed": [0, 1, 2]}, serial=True)
    assert [r["problem.support.seed"] for r in rows] == [0, 1, 2]
    assert len({r["final_energy"] for r in rows}) == 3  # each seed its own draw
    assert all(r["steps"] == 3 and r["grid_locked_steps"] == 0 for r in rows)
