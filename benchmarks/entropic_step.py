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
* plain:  the iterations without over-relaxation (``relaxation=1``) at 256x256;
* Peyre:  a minimal NumPy implementation of G. Peyre's JKO-Sinkhorn iteration ("Entropic
          approximation of Wasserstein gradient flows", SIAM J. Imaging Sci. 2015) with the
          over-relaxation 1.8 of both scalings, separable kernel, the same stopping rule, run on
          the same input measures as the library (each step warm-started from its own last
          scaling): its iteration counts, and the L1 distance between the two steps;
* floor:  two separable kernel applications K_0 V K_1^T in plain NumPy (the work of one
          iteration), timed after each step as many times in a row as the step had iterations
          (the mean: both sides are exposed to the machine's load over the same span): the
          time per iteration of a step (its iterations alone, and its wall time with fixed
          costs) is reported as a multiple of it.

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
from pathlib import Path

TARGETS = {
    "256x256 median step (s)": ("<=", 1.0),
    "512x512 median step (s)": ("<=", 8.0),
    "iteration / two kernel applications, 256x256": ("<=", 1.5),
    "step / iterations / two kernel applications, 256x256": ("<=", 1.5),
    "iterations / Peyre's (omega 1.8), worst step": ("<=", 1.0),
    "L1 distance to Peyre's step / tol, worst step": ("<=", 10.0),
    "dense / separable at 64x64": (">=", 20.0),
    "log / kernel domain at 128x128": ("<=", 5.0),
}
EPS, TAU, TOL = 2e-3, 0.02, 1e-6
STEPS = 5
PEYRE_RELAXATION = 1.8


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--quick", action="store_true", help="grids 64 and 128 only, 3 steps")
    parser.add_argument("--no-side", action="store_true",
                        help="skip the side-by-side runs (dense, conic, log, plain)")
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package
import jko_ift as jk  # noqa: E402
from jko_ift.methods.entropic import EntropicJKO  # noqa: E402

CENTRE = np.array([0.5, 0.5])
F = jk.Entropy() + jk.Potential(lambda x: 0.5 * ((x - CENTRE) ** 2).sum(1), lambda x: x - CENTRE)
GEOMETRY = jk.Wasserstein()


def initial_measure(m: int) -> jk.Measure:
    grid = jk.Grid([0, 0], [1, 1], [m, m])
    start = np.array([0.4, 0.45])
    return grid.measure(lambda x: np.exp(-((x - start) ** 2).sum(1) / (2 * 0.15**2)), normalize=True)


class Peyre:
    """G. Peyre's JKO-Sinkhorn iteration (SIAM J. Imaging Sci. 2015) for this energy, minimal
    NumPy, with over-relaxation omega of both scalings (a <- a^(1 - omega) a_new^omega):

        a = p / (K b),   b = prox^KL_{sigma F}(K^T a) / (K^T a),   sigma = 2 tau / eps,

    F(q) = sum q log(q / h^2) + V q, whose KL-prox is log q' = (log r + sigma (log h^2 - 1 - V))
    / (1 + sigma); K = K_0 (x) K_1 applied as K_0 X K_1^T. Stops when |a K b - p|_1 / sum p <= tol
    (the library's rule). Each call starts from the b of the last call (a warm start)."""

    def __init__(self, m: int, omega: float = PEYRE_RELAXATION):
        grid = jk.Grid([0, 0], [1, 1], [m, m])
        x = (np.arange(m) + 0.5) / m
        self.kernel = np.exp(-((x[:, None] - x[None, :]) ** 2) / EPS)
        centre = 0.5 * ((grid.points - CENTRE) ** 2).sum(1).reshape(m, m)
        self.sigma, self.omega = 2 * TAU / EPS, omega
        self.offset = self.sigma * (np.log(grid.cell_volume) - 1.0 - centre)
        self.b = np.ones((m, m))

    def apply(self, w):
        return self.kernel @ w @ self.kernel.T

    def step(self, p: np.ndarray, max_iter: int = 20_000):
        """(new weights (m, m), iterations) for the weights p (m, m) of mu^k."""
        omega, a, b = self.omega, np.ones_like(p), self.b
        for iteration in range(max_iter):
            kb = self.apply(b)
            if iteration and np.abs(a * kb - p).sum() / p.sum() <= TOL:
                break
            a = a ** (1 - omega) * (p / kb) ** omega
            ka = self.apply(a)
            b_new = np.exp((np.log(ka) + self.offset) / (1 + self.sigma)) / ka
            b = b ** (1 - omega) * b_new**omega
        self.b = b
        return b * self.apply(a), iteration


def kernel_floor(m: int, repeats: int = 5) -> float:
    """Seconds of two separable kernel applications K_0 V K_1^T at m x m (plain NumPy): the mean
    over ``repeats`` consecutive pairs, timed as a whole like the iterations of a step (given as
    many repeats as the step had iterations, both sides see the machine's load over the same
    span; a median of a few short repeats skips the preemptions that the loop pays)."""
    x = (np.arange(m) + 0.5) / m
    K = np.exp(-((x[:, None] - x[None, :]) ** 2) / EPS)
    V = np.random.default_rng(0).random((m, m))
    start = time.perf_counter()
    for _ in range(repeats):
        K @ V @ K.T
        K @ V @ K.T
    return (time.perf_counter() - start) / repeats


def run_steps(method, m: int, steps: int, compare: bool = False) -> dict:
    """``steps`` consecutive steps with one method object: times, iterations, statuses; with
    ``compare``, Peyre's iteration on the same input measures and the kernel floor in between."""
    mu = initial_measure(m)
    times, iterations, statuses, results, floors, peyre, loops = [], [], [], [], [], [], []
    comparator = Peyre(m) if compare else None
    for _ in range(steps):
        start = time.perf_counter()
        result = method.step(F, GEOMETRY, mu, TAU, throw=False)
        times.append(time.perf_counter() - start)
        iterations.append(result.info.get("iterations"))
        loops.append(result.info.get("iteration_time", np.nan))
        statuses.append(result.status)
        results.append(result)
        if result.measure is None:
            break
        if compare:
            floors.append(kernel_floor(m, max(5, result.info.get("iterations") or 0)))
            start = time.perf_counter()
            weights, count = comparator.step(mu.weights.reshape(m, m))
            distance = np.abs(weights.reshape(-1) - result.measure.weights).sum() / mu.mass
            peyre.append({"iterations": count, "time_s": time.perf_counter() - start,
                          "l1": float(distance)})
        mu = result.measure
    last = results[-1]
    return {"grid": f"{m}x{m}", "n": m * m, "times_s": times, "median_s": statistics.median(times),
            "first_s": times[0], "iterations": iterations, "statuses": statuses,
            "certificate": float(last.certificate), "domain": last.info.get("domain"),
            "relaxation": last.info.get("relaxation"), "objective": float(last.objective),
            "dual_gap": last.info.get("relative_dual_gap"), "first_result": results[0],
            "floor_s": floors, "peyre": peyre, "loop_s": loops}


def comparisons(row) -> dict:
    """Per-iteration time over the kernel floor (median over the steps; of the iterations
    alone, info["iteration_time"], and of the whole step), iterations over
    Peyre's and the L1 distance to Peyre's step (worst step)."""
    def per_iteration(times):
        return statistics.median(t / max(i, 1) / f for t, i, f in
                                 zip(times, row["iterations"], row["floor_s"], strict=False))

    ratios = [i / max(p["iterations"], 1) for i, p in zip(row["iterations"], row["peyre"], strict=False)]
    return {"per_iteration": per_iteration(row["loop_s"]),
            "per_step_iteration": per_iteration(row["times_s"]),
            "iterations": max(ratios), "l1_over_tol": max(p["l1"] for p in row["peyre"]) / TOL}


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


def print_grids(rows) -> None:
    header = (f"{'grid':>8} {'n':>7} | {'median s':>9} {'first s':>8} {'ms/iter':>8} {'/floor':>6} "
              f"{'step':>5} | "
              f"{'iterations':<20} {'Peyre 1.8':<20} {'L1/tol':>6} | {'omega':>5} {'domain':>6} "
              f"{'violation':>9} {'rel. gap':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        its = ",".join(str(i) for i in row["iterations"])
        peyre = ",".join(str(p["iterations"]) for p in row["peyre"])
        c = row["compare"]
        print(f"{row['grid']:>8} {row['n']:>7} | {row['median_s']:>9.3f} {row['first_s']:>8.3f} "
              f"{row['per_iteration_ms']:>8.2f} {c['per_iteration']:>6.2f} {c['per_step_iteration']:>5.2f} | "
              f"{its:<20} {peyre:<20} "
              f"{c['l1_over_tol']:>6.2f} | {row['relaxation']:>5.2f} {row['domain']:>6} "
              f"{row['certificate']:>9.1e} {row['dual_gap'] or 0:>8.1e}")
    print("(/floor: the time per iteration (in the iterations, info['iteration_time']) over two "
          "separable kernel applications K_0 V K_1^T in NumPy timed between the steps; step: the same "
          "with the step's wall time, set-up and checks included; L1/tol: the worst L1 distance "
          "between the library's step and Peyre's, over the mass, in units of tol)")
    if len(rows) >= 2:
        exponent = fitted_exponent(rows, "median_s")
        exponent_iteration = fitted_exponent(rows, "per_iteration_ms")
        print(f"\nfitted exponent, median time per step ~ n^p: p = {exponent:.2f}; time per "
              f"iteration ~ n^p: p = {exponent_iteration:.2f} (separable kernel: 1.5)")


def side_by_side(args) -> dict:
    """The dense kernel, ConicJKO, the log domain and the plain iterations, printed."""
    out = {}
    separable = run_steps(EntropicJKO(eps=EPS, tol=TOL), 64, args.steps)
    dense = run_steps(EntropicJKO(eps=EPS, tol=TOL, separable=False), 64, args.steps)
    out["dense_ratio"] = dense["median_s"] / separable["median_s"]
    agree = np.abs(dense["first_result"].measure.weights
                   - separable["first_result"].measure.weights).sum()
    print(f"64x64: separable {separable['median_s']:.4f} s, dense n x n kernel "
          f"{dense['median_s']:.4f} s (iterations {dense['iterations']}): dense/separable = "
          f"{out['dense_ratio']:.1f}; L1 difference of the first steps {agree:.1e}")

    conic = conic_step(32)
    entropic32 = run_steps(EntropicJKO(eps=EPS, tol=TOL), 32, 1)
    exact = conic["result"].measure
    w2 = jk.w2(exact, entropic32["first_result"].measure) if exact is not None else np.nan
    print(f"32x32: ConicJKO {conic['time_s']:.3f} s ({conic['status']}, certificate "
          f"{conic['certificate']:.1e}, objective {conic['objective']:.6f}); EntropicJKO "
          f"{entropic32['first_s']:.4f} s (violation {entropic32['certificate']:.1e}, "
          f"objective {entropic32['objective']:.6f}, W2 to the conic step {w2:.2e}): "
          f"conic/entropic = {conic['time_s'] / entropic32['first_s']:.0f}")

    kernel128 = run_steps(EntropicJKO(eps=EPS, tol=TOL, domain="kernel"), 128, args.steps)
    log128 = run_steps(EntropicJKO(eps=EPS, tol=TOL, domain="log"), 128, args.steps)
    out["log_ratio"] = log128["median_s"] / kernel128["median_s"]
    print(f"128x128: kernel domain {kernel128['median_s']:.4f} s (iterations "
          f"{kernel128['iterations']}), log domain {log128['median_s']:.4f} s (iterations "
          f"{log128['iterations']}): log/kernel = {out['log_ratio']:.2f}")

    if 256 in args.grids:
        plain = run_steps(EntropicJKO(eps=EPS, tol=TOL, relaxation=1.0), 256, args.steps)
        print(f"256x256 plain iterations (relaxation=1): {plain['median_s']:.3f} s (iterations "
              f"{plain['iterations']})")
    return out


def print_targets(measured: dict) -> None:
    print("\ntargets:")
    for name, (sense, bound) in TARGETS.items():
        value = measured.get(name)
        if value is None:
            print(f"  {name:<46} not measured in this run")
            continue
        met = value <= bound if sense == "<=" else value >= bound
        print(f"  {name:<46} {value:>8.3f}  target {sense} {bound:<5g} {'met' if met else 'NOT MET'}")


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
        row = run_steps(EntropicJKO(eps=EPS, tol=TOL), m, args.steps, compare=True)
        row["per_iteration_ms"] = 1e3 * row["median_s"] / statistics.median(row["iterations"])
        row["compare"] = comparisons(row)
        rows.append(row)
    print_grids(rows)
    print()
    extra = side_by_side(args) if not args.no_side else {"dense_ratio": None, "log_ratio": None}
    by_grid = {row["grid"]: row for row in rows}
    measured = {
        "256x256 median step (s)": by_grid.get("256x256", {}).get("median_s"),
        "512x512 median step (s)": by_grid.get("512x512", {}).get("median_s"),
        "dense / separable at 64x64": extra["dense_ratio"],
        "log / kernel domain at 128x128": extra["log_ratio"],
    }
    if "256x256" in by_grid:
        compared = by_grid["256x256"]["compare"]
        measured["iteration / two kernel applications, 256x256"] = compared["per_iteration"]
        measured["step / iterations / two kernel applications, 256x256"] = compared["per_step_iteration"]
    measured["iterations / Peyre's (omega 1.8), worst step"] = max(r["compare"]["iterations"] for r in rows)
    measured["L1 distance to Peyre's step / tol, worst step"] = max(r["compare"]["l1_over_tol"] for r in rows)
    print_targets(measured)
    converged = all(s == "optimal" for row in rows for s in row["statuses"])
    print(f"  all steps converged to the tolerance: {converged}")
    if args.json:
        def clean(row):
            return {k: v for k, v in row.items() if k not in ("first_result", "result")}
        out = {"eps": EPS, "tau": TAU, "tol": TOL, "load_average": load,
               "grids": [clean(r) for r in rows], **extra, "measured": measured}
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
