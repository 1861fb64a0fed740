"""Smoke tests of the example scripts: each main() at tiny sizes writes its figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_figures(result: dict, *names: str, folder: Path) -> None:
    for path in result["figures"]:
        assert Path(path).is_file() and Path(path).stat().st_size > 1000
    for name in names:
        assert (folder / name).is_file()


@pytest.mark.parametrize("target", ["gaussian", "mixture"])
def test_paper_2d(tmp_path, target):
    result = load("paper_2d").main(target, seeds=2, steps=4, out=tmp_path, particles=12,
                                   samples=10)
    runs = result[target]
    check_figures(runs, f"mmd_{target}.png", f"particles_{target}.png", f"summary_{target}.txt",
                  folder=tmp_path)
    for label in ("MMD flow", "IFT", "IFT, exact weight step"):
        assert runs[label].mmd.shape == (2, 5)
        assert np.all(np.isfinite(runs[label].mmd))
    assert runs["IFT"].mmd[:, -1].mean() < runs["IFT"].mmd[:, 0].mean()
    # the paper's lr = 50 and lr_w = 0.1 on 12 particles: tau = 2 lr / 12, tau beta = 2 lr_w
    assert "tau = 8.33333, tau beta = 0.2" in (tmp_path / f"summary_{target}.txt").read_text()


def test_paper_highdim(tmp_path):
    result = load("paper_highdim").main(dim=3, particles=15, steps=4, seeds=2, out=tmp_path)
    check_figures(result, "mmd_highdim.png", "summary_highdim.txt", folder=tmp_path)
    for label in ("IFT", "IFT, KL weight step"):
        assert result[label].mmd.shape == (2, 5) and result[label].failed == 0
    # the paper's steps scaled to 15 particles: the W2 step tau = 2 whatever N
    summary = (tmp_path / "summary_highdim.txt").read_text()
    assert "fresh target samples" in summary and "tau = 2," in summary


def test_large_steps(tmp_path):
    result = load("large_steps").main(steps=4, particles=6, out=tmp_path, step_sizes=(0.1, 1.0))
    check_figures(result, "large_steps.png", folder=tmp_path)
    explicit, implicit = result["panels"]["explicit, W2"], result["panels"]["ParticleJKO (implicit), W2"]
    assert explicit["tau = 1"][-1] > explicit["tau = 1"][0]  # unstable past tau = 1/2
    assert result["unstable"]["explicit, W2"] == {"tau = 0.1": 0, "tau = 1": 4}  # and flagged
    assert np.all(np.diff(implicit["tau = 1"]) < 0)  # implicit: dissipates


def test_weight_step_exact_vs_pg(tmp_path):
    result = load("weight_step_exact_vs_pg").main(seeds=1, steps=4, out=tmp_path, particles=12,
                                                  samples=10)
    check_figures(result, "weight_step.png", "weight_step_particles.png", folder=tmp_path)
    assert set(result["support"]) == {"exact weight step", "projected gradient",
                                      "authors' code (PG + euclidean velocity)"}


def test_fine_grid_tau_limit(tmp_path):
    result = load("fine_grid_tau_limit").main(cells=32, conic_cells=8, t_final=0.1, taus=(0.1, 0.05),
                                              out=tmp_path, entropic_cells=None)
    check_figures(result, "fine_grid_tau_limit.png", "summary_fine_grid_tau_limit.txt", folder=tmp_path)
    fine = next(study for label, (study, _) in result["studies"].items() if "BackAndForth" in label)
    assert not any(row["flags"] for row in fine.rows)  # the exact grid step never locks
