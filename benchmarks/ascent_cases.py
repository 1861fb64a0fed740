"""How often BackAndForthJKO certifies its steps, on ten multi-step runs (a check for tuning its ascent).

The dual of the grid step has kinks (docs/theory.md §10), so where its ascent stops depends on
its constants, and a change that helps one problem can hurt another. This benchmark runs, for
each setting given, the same ten runs and prints per run: the steps certified (certificate <=
tol = 1e-4), the worst certificate, the iterations and the time:

* 1-D Fokker-Planck (Entropy + x^2/2 on [-3, 3]) from a Gaussian of standard deviation 0.3 at 1:
  512 cells at tau = 0.05, 0.025, 0.0125 (six steps each), 2048 cells at tau = 0.025;
* 2-D Fokker-Planck, the same data on [-3, 3]^2, 128^2, tau = 0.05 and 0.025 (four steps);
* the porous-medium example of benchmarks/fine_grid.py at 128^2 (three steps) and 256^2 (two);
* PorousMedium(3) from a bump on [-1, 1]^2, 128^2, tau = 0.01 (three steps);
* 0.01 Entropy + the porous-medium example's energy, 128^2 (two steps).

Run:  OPENBLAS_NUM_THREADS=1 python benchmarks/ascent_cases.py [--set GROW=1.5,SHRINK=0.5] [--set ...]
(each --set overrides constants of jko_ift.methods.back_and_forth; none: the defaults).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import jko_ift as jk
from fine_grid import problem as porous_medium
from jko_ift.methods import back_and_forth

TOL = 1e-4


def fokker_planck(cells: int, dim: int):
    grid = jk.Grid([-3.0] * dim, [3.0] * dim, (cells,) * dim)
    centre = np.array([1.0, 0.5][:dim])
    mu = grid.measure(lambda x: np.exp(-np.sum((x - centre) ** 2, axis=1) / (2 * 0.3**2)), normalize=True)
    return grid, jk.Entropy() + jk.Potential(lambda x: np.sum(x**2, axis=1) / 2), mu


def barenblatt_like(cells: int):
    grid = jk.Grid([-1.0, -1.0], [1.0, 1.0], (cells, cells))
    return grid, jk.PorousMedium(3), grid.measure(lambda x: np.maximum(0.3 - np.sum(x**2, axis=1), 0.0),
                                                  normalize=True)


def mixed(cells: int):
    grid, F, mu = porous_medium(cells)
    return grid, 0.01 * jk.Entropy() + F, mu


#: (label, problem, tau, steps)
RUNS = [("FP 1-D 512, tau 0.05", lambda: fokker_planck(512, 1), 0.05, 6),
        ("FP 1-D 512, tau 0.025", lambda: fokker_planck(512, 1), 0.025, 6),
        ("FP 1-D 512, tau 0.0125", lambda: fokker_planck(512, 1), 0.0125, 6),
        ("FP 1-D 2048, tau 0.025", lambda: fokker_planck(2048, 1), 0.025, 6),
        ("FP 2-D 128^2, tau 0.05", lambda: fokker_planck(128, 2), 0.05, 4),
        ("FP 2-D 128^2, tau 0.025", lambda: fokker_planck(128, 2), 0.025, 4),
        ("porous medium 128^2", lambda: porous_medium(128), 0.1, 3),
        ("PorousMedium(3) 128^2", lambda: barenblatt_like(128), 0.01, 3),
        ("entropy + porous 128^2", lambda: mixed(128), 0.1, 2),
        ("porous medium 256^2", lambda: porous_medium(256), 0.1, 2)]


def run(problem, tau: float, steps: int) -> tuple[int, float, int, float]:
    """(steps certified, worst certificate, iterations, seconds) of one method object's run."""
    _, F, mu = problem()
    method, certificates, iterations = jk.BackAndForthJKO(tol=TOL), [], 0
    start = time.perf_counter()
    for _ in range(steps):
        result = method.step(F, jk.Wasserstein(), mu, tau, throw=False)
        certificates.append(result.certificate)
        iterations += result.info["iterations"]
        mu = result.measure
    return sum(c <= TOL for c in certificates), max(certificates), iterations, time.perf_counter() - start


def settings(text: str) -> dict:
    pairs = [item.split("=") for item in text.split(",") if item]
    for name, _ in pairs:
        if not hasattr(back_and_forth, name):
            raise SystemExit(f"--set: jko_ift.methods.back_and_forth has no constant {name!r}")
    return {name: type(getattr(back_and_forth, name))(float(value)) for name, value in pairs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE,... (a setting to compare)")
    args = parser.parse_args()
    print(f"BackAndForthJKO, tol = {TOL:g}; load average {os.getloadavg()[0]:.2f}")
    for text in args.set or [""]:
        changes = settings(text)
        defaults = {name: getattr(back_and_forth, name) for name in changes}
        for name, value in changes.items():
            setattr(back_and_forth, name, value)
        print(f"\n{text or 'defaults'}:")
        certified = total = 0
        for label, problem, tau, steps in RUNS:
            ok, worst, iterations, seconds = run(problem, tau, steps)
            certified, total = certified + ok, total + steps
            print(f"  {label:<26} certified {ok}/{steps}, worst {worst:.1e}, {iterations:5d} iterations, {seconds:5.1f} s")
        print(f"  all: {certified} of {total} steps certified")
        for name in changes:
            setattr(back_and_forth, name, defaults[name])


if __name__ == "__main__":
    main()
