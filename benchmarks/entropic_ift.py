"""Entropic IFT steps against ConicJKO, side by side in one run (docs/entropic.md §8b).

1. One step of 1/2 MMD^2 under IFT(Gaussian(0.6), alpha=1, beta=0.7) on a 240-cell grid of
   [-3, 2]: start N(-1, 0.12), target N(0.6, 0.2) (variances, both normalized on the grid),
   tau = 0.15, at eps = 4e-2, 1e-2, 2.5e-3: seconds, W1 to the conic step, warnings raised.
2. examples/configs/ift_mixture.toml (20 x 20 grid, IFT alpha = 20, beta = 1, tau = 0.25),
   3 steps with EntropicJKO(eps) and with the config's ConicJKO, interleaved; target: the
   entropic total at most the conic one.
3. Bounded time: 1/2 MMD^2 under IFT(Gaussian(0.3)) on an 8 x 8 grid at eps = 1e-8 (one step
   ran over 15 minutes once): it must end within BOUNDED_SECONDS, converged or with a
   SolverError naming the residual and the fix.

Run:  python benchmarks/entropic_ift.py [--threads 1] [--eps 1e-2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (set before NumPy)")
    parser.add_argument("--eps", type=float, default=1e-2, help="eps of the mixture run")
    parser.add_argument("--skip-mixture", action="store_true")
    return parser.parse_args()


ARGS = parse()
if ARGS.threads is not None:
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(ARGS.threads)

import numpy as np  # noqa: E402
import ot  # noqa: E402

sys.path.insert(0, str(ROOT))
import jko_ift as jk  # noqa: E402
from jko_ift.config import load_config  # noqa: E402


def timed(F, geometry, mu, tau, method):
    """One jk.jko_step: (result, seconds, {warning class: count})."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        result = jk.jko_step(F, geometry, mu, tau, method=method)
        seconds = time.perf_counter() - start
    counts: dict = {}
    for w in caught:
        counts[w.category.__name__] = counts.get(w.category.__name__, 0) + 1
    return result, seconds, counts


def issue_problem():
    grid = jk.Grid([-3.0], [2.0], (240,))
    x = grid.points[:, 0]

    def gauss(mean, var):
        w = np.exp(-(x - mean) ** 2 / (2 * var))
        return w / w.sum()

    kernel = jk.Gaussian(0.6)
    target = jk.Measure(grid.points, gauss(0.6, 0.2))
    return (jk.MMD2(target, kernel), jk.IFT(kernel, alpha=1.0, beta=0.7),
            jk.Measure(grid.points, gauss(-1.0, 0.12)), 0.15, x)


def one_step_table():
    F, geometry, mu0, tau, x = issue_problem()
    exact, conic_s, _ = timed(F, geometry, mu0, tau, jk.ConicJKO())
    print(f"1-D IFT step (240 cells), ConicJKO: {conic_s:.2f} s")
    print(f"{'eps':>8} {'entropic s':>11} {'ratio':>7} {'W1 to conic':>12} {'iterations':>10}  warnings")
    for eps in (4e-2, 1e-2, 2.5e-3):
        result, seconds, counts = timed(F, geometry, mu0, tau, jk.EntropicJKO(eps))
        w1 = ot.emd2_1d(x, x, result.measure.weights, exact.measure.weights, metric="euclidean")
        print(f"{eps:8.1e} {seconds:11.2f} {seconds / conic_s:7.2f} {w1:12.3g} "
              f"{result.info['iterations']:10d}  {counts or '-'}")


def mixture_table(eps):
    spec = load_config(ROOT / "examples/configs/ift_mixture.toml")
    F, geometry, tau = spec.energy, spec.geometry, spec.run.tau
    entropic, conic = jk.EntropicJKO(eps), jk.ConicJKO()
    mu_e = mu_c = spec.initial
    totals = [0.0, 0.0]
    print(f"\nexamples/configs/ift_mixture.toml, 3 steps, EntropicJKO(eps={eps:g}) vs ConicJKO")
    for k in range(spec.run.steps):
        r_e, s_e, c_e = timed(F, geometry, mu_e, tau, entropic)
        r_c, s_c, _ = timed(F, geometry, mu_c, tau, conic)
        totals[0] += s_e
        totals[1] += s_c
        mmd = jk.mmd(r_e.measure, r_c.measure, geometry.reaction.kernel)
        print(f"step {k}: entropic {s_e:6.2f} s ({r_e.info['iterations']} iterations) | conic "
              f"{s_c:6.2f} s | MMD(entropic, conic) {mmd:.3g} | warnings {c_e or '-'}")
        mu_e, mu_c = r_e.measure, r_c.measure
    ratio = totals[0] / totals[1]
    print(f"total: entropic {totals[0]:.1f} s, conic {totals[1]:.1f} s, ratio {ratio:.2f}")
    print(f"target: entropic / conic <= 1: {ratio:.2f} {'met' if ratio <= 1 else 'NOT MET'}")


BOUNDED_SECONDS = 10.0


def bounded_time_case():
    grid = jk.Grid([0.0, 0.0], [1.0, 1.0], (8, 8))
    mu0 = grid.measure(lambda p: np.exp(-np.sum((p - 0.3) ** 2, 1) / 0.05), normalize=True)
    target = grid.measure(lambda p: np.exp(-np.sum((p - 0.7) ** 2, 1) / 0.05), normalize=True)
    kernel = jk.Gaussian(0.3)
    start = time.perf_counter()
    try:
        result = jk.jko_step(jk.MMD2(target, kernel), jk.IFT(kernel), mu0, 0.1,
                             method=jk.EntropicJKO(1e-8))
        outcome = f"{result.status}, violation {result.certificate:.2g}"
    except jk.SolverError as error:
        outcome = f"SolverError: {str(error)[:160]}..."
    seconds = time.perf_counter() - start
    print(f"\n8x8 grid, IFT, eps = 1e-8: {seconds:.2f} s, {outcome}")
    print(f"target: ends within {BOUNDED_SECONDS:g} s: {'met' if seconds <= BOUNDED_SECONDS else 'NOT MET'}")


if __name__ == "__main__":
    print(f"load average {os.getloadavg()}, BLAS threads {ARGS.threads or 'default'}")
    one_step_table()
    if not ARGS.skip_mixture:
        mixture_table(ARGS.eps)
    bounded_time_case()
