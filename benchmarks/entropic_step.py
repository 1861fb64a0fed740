"""Benchmark of the entropic W2 JKO step (EntropicJKO) on large grids.

Problem (issue "Entropic JKO"): the Fokker-Planck energy F = Entropy + Potential(|x - c|^2 / 2),
c = (1/2, 1/2), on the unit square; initial density a Gaussian of standard deviation 0.15
centred at (0.4, 0.45); eps = 2e-3, tau = 0.02, marginal error |P 1 - a|_1 / sum(a) <= 1e-6:

    mu^{k+1} = argmin_mu F(mu) + [<C, P> + eps sum P log(P / a)] / (2 tau).

For each grid m x m (64, 128, 256, 512) one method object takes 5 consecutive steps (the
first is cold, the others warm-started) and the median time per step is reported, with the
iteration counts, the fitted exponent p of time ~ n^p (n = m^2; the separable kernel costs
O(n^1.5) per iteration), and side by side in the same run:

* dense:  the same iterations with the n x n kernel (``separable=False``) at 64x64;
* conic:  ``jk.ConicJKO()`` (Clarabel, certified gap 1e-6, the "matching accuracy") at 32x32,
          next to the entropic step at 32x32;
* log:    the log-domain iterations (``domain="log"``, needed at small eps) against the
          kernel domain at 128x128;
* plain:  the iterations without over-relaxation (``relaxation=1``) at 256x256.

Timings depend on the machine's load (other processes compete for the cores and make
OpenBLAS threads wait): the load average is printed with the table. ``--threads N`` sets the
BLAS thread count before NumPy is imported.

Run:  python benchmarks/entropic_step.py [--quick] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

TARGETS = {
    "256x256 median step (s)": ("<=", 1.0),
    "512x512 median step (s)": ("<=", 8.0),
    "dense / separable at 64x64": (">=", 20.0),
    "log / kernel domain at 128x128": ("<=", 5.0),
}
EPS, TAU, TOL = 2e-3, 0.02, 1e-6
STEPS = 5


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--quick", action="store_true", help="grids 64 and 128 only, 3 steps")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (set before NumPy)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.grids, args.steps = [64, 128], 3
    return args


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(ARGS.threads)

import numpy as np  # noqa: E402  (after the thread settings)

import jko_ift as jk  # noqa: E402
from jko_ift.methods.entropic import EntropicJKO  # noqa: E402

CENTRE = np.array([0.5, 0.5])
F = jk.Entropy() + jk.Potential(lambda x: 0.5 * ((x - CENTRE) ** 2).sum(1), lambda x: x - CENTRE)
GEOMETRY = jk.Wasserstein()


def initial_measure(m: int) -> jk.Measure:
    grid = jk.Grid([0, 0], [1, 1], [m, m])
    start = np.array([0.4, 0.45])
    return grid.measure(lambda x: np.exp(-((x - start) ** 2).sum(1) / (2 * 0.15**2)), normalize=True)


def run_steps(method, m: int, steps: int) -> dict:
    """``steps`` consecutive steps with one method object: times, iterations, statuses."""
    mu = initial_measure(m)
    times, iterations, statuses, results = [], [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        result = method.step(F, GEOMETRY, mu, TAU, throw=False)
        times.append(time.perf_counter() - start)
        iterations.append(result.info.get("iterations"))
        statuses.append(result.status)
        results.append(result)
        if result.measure is None:
            break
        mu = result.measure
    last = results[-1]
    return {"grid": f"{m}x{m}", "n": m * m, "times_s": times, "median_s": statistics.median(times),
            "first_s": times[0], "iterations": iterations, "statuses": statuses,
            "certificate": float(last.certificate), "domain": last.info.get("domain"),
            "relaxation": last.info.get("relaxation"), "objective": float(last.objective),
            "dual_gap": last.info.get("relative_dual_gap"), "first_result": results[0]}


def conic_step(m: int) -> dict:
    mu = initial_measure(m)
    start = time.perf_counter()
    result = jk.ConicJKO().step(F, GEOMETRY, mu, TAU, throw=False)
    return {"grid": f"{m}x{m}", "time_s": time.perf_counter() - start, "status": result.status,
            "certificate": float(result.certificate), "objective": float(result.objective),
            "result": result}


def fitted_exponent(rows, key) -> float:
    n = np.array([row["n"] for row in rows], float)
    y = np.array([row[key] for row in rows], float)
    return float(np.polyfit(np.log(n), np.log(y), 1)[0])


def main(args) -> int:
    warnings.simplefilter("ignore")  # the blur ratio is reported, not warned
    load = os.getloadavg() if hasattr(os, "getloadavg") else (np.nan,) * 3
    print(f"entropic W2 JKO step, Fokker-Planck on [0,1]^2: eps={EPS}, tau={TAU}, marginal tol={TOL}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cpus, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}")
    print()

    rows = []
    for m in args.grids:
        row = run_steps(EntropicJKO(eps=EPS, tol=TOL), m, args.steps)
        row["per_iteration_ms"] = 1e3 * row["median_s"] / statistics.median(row["iterations"])
        rows.append(row)
    header = (f"{'grid':>8} {'n':>7} | {'median s':>9} {'first s':>8} {'ms/iter':>8} | "
              f"{'iterations':<24} {'omega':>5} {'domain':>6} {'violation':>9} {'rel. gap':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        its = ",".join(str(i) for i in row["iterations"])
        print(f"{row['grid']:>8} {row['n']:>7} | {row['median_s']:>9.3f} {row['first_s']:>8.3f} "
              f"{row['per_iteration_ms']:>8.2f} | {its:<24} {row['relaxation']:>5.2f} "
              f"{row['domain']:>6} {row['certificate']:>9.1e} {row['dual_gap'] or 0:>8.1e}")
    exponent = exponent_iteration = None
    if len(rows) >= 2:
        exponent = fitted_exponent(rows, "median_s")
        exponent_iteration = fitted_exponent(rows, "per_iteration_ms")
        print(f"\nfitted exponent, median time per step ~ n^p: p = {exponent:.2f}; time per "
              f"iteration ~ n^p: p = {exponent_iteration:.2f} (separable kernel: 1.5)")

    # dense kernel at 64x64
    print()
    separable = run_steps(EntropicJKO(eps=EPS, tol=TOL), 64, args.steps)
    dense = run_steps(EntropicJKO(eps=EPS, tol=TOL, separable=False), 64, args.steps)
    dense_ratio = dense["median_s"] / separable["median_s"]
    agree = np.abs(dense["first_result"].measure.weights
                   - separable["first_result"].measure.weights).sum()
    print(f"64x64: separable {separable['median_s']:.4f} s, dense n x n kernel "
          f"{dense['median_s']:.4f} s (iterations {dense['iterations']}): dense/separable = "
          f"{dense_ratio:.1f}; L1 difference of the first steps {agree:.1e}")

    # conic at 32x32
    conic = conic_step(32)
    entropic32 = run_steps(EntropicJKO(eps=EPS, tol=TOL), 32, 1)
    exact = conic["result"].measure
    w2 = jk.w2(exact, entropic32["first_result"].measure) if exact is not None else np.nan
    print(f"32x32: ConicJKO {conic['time_s']:.3f} s ({conic['status']}, certificate "
          f"{conic['certificate']:.1e}, objective {conic['objective']:.6f}); EntropicJKO "
          f"{entropic32['first_s']:.4f} s (violation {entropic32['certificate']:.1e}, "
          f"objective {entropic32['objective']:.6f}, W2 to the conic step {w2:.2e}): "
          f"conic/entropic = {conic['time_s'] / entropic32['first_s']:.0f}")

    # log domain against kernel domain at 128x128
    kernel128 = run_steps(EntropicJKO(eps=EPS, tol=TOL, domain="kernel"), 128, args.steps)
    log128 = run_steps(EntropicJKO(eps=EPS, tol=TOL, domain="log"), 128, args.steps)
    log_ratio = log128["median_s"] / kernel128["median_s"]
    print(f"128x128: kernel domain {kernel128['median_s']:.4f} s (iterations "
          f"{kernel128['iterations']}), log domain {log128['median_s']:.4f} s (iterations "
          f"{log128['iterations']}): log/kernel = {log_ratio:.2f}")

    # the plain iterations (no over-relaxation) at 256x256, for reference
    plain = run_steps(EntropicJKO(eps=EPS, tol=TOL, relaxation=1.0), 256, args.steps) if (
        256 in args.grids) else None
    if plain is not None:
        print(f"256x256 plain iterations (relaxation=1): {plain['median_s']:.3f} s (iterations "
              f"{plain['iterations']})")

    by_grid = {row["grid"]: row for row in rows}
    measured = {
        "256x256 median step (s)": by_grid.get("256x256", {}).get("median_s"),
        "512x512 median step (s)": by_grid.get("512x512", {}).get("median_s"),
        "dense / separable at 64x64": dense_ratio,
        "log / kernel domain at 128x128": log_ratio,
    }
    print("\ntargets:")
    for name, (sense, bound) in TARGETS.items():
        value = measured[name]
        if value is None:
            print(f"  {name:<32} not measured in this run")
            continue
        met = value <= bound if sense == "<=" else value >= bound
        print(f"  {name:<32} {value:>8.3f}  target {sense} {bound:<5g} {'met' if met else 'NOT MET'}")
    converged = all(s == "optimal" for row in rows for s in row["statuses"])
    print(f"  all steps converged to the tolerance: {converged}")

    if args.json:
        def clean(row):
            return {k: v for k, v in row.items() if k not in ("first_result", "result")}
        out = {"eps": EPS, "tau": TAU, "tol": TOL, "load_average": load, "grids": [clean(r) for r in rows],
               "exponent": exponent, "exponent_per_iteration": exponent_iteration,
               "dense": clean(dense), "separable_64": clean(separable), "dense_ratio": dense_ratio,
               "conic_32": clean(conic), "entropic_32": clean(entropic32),
               "kernel_128": clean(kernel128), "log_128": clean(log128), "log_ratio": log_ratio,
               "plain_256": clean(plain) if plain else None,
               "measured": measured}
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
