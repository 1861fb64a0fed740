"""Benchmark of the exact MMD weight step: our active-set solver vs CVXPY + Clarabel.

The weight step of the IFT particle algorithm (Gladin et al., NeurIPS 2024) on n particles:

    b = argmin_{b in simplex}  F(b) + (b - a)^T (K + ridge I)(b - a) / (2 eta),
    F = 1/2 MMD^2(sum_i b_i delta_{x_i}, target),

a convex QP min 1/2 b^T H b - g^T b with H = K + (K + ridge I) / eta, g = K_xy q + (K + ridge I) a / eta.
Instance (the paper's 2-D experiment, scaled to n particles): n target samples from the
mixture of N(0, [[1, .5], [.5, 2]]), N((3, -1), I), N((1, 4), [[3, .5], [.5, 1]]); particles
from N((5, 5), I) pulled a third of the way towards the target (mid-run); uniform weights a;
eta = 0.1 (half the paper's weight step, tau beta = 2 lr_w = 0.2); ridge 1e-8 (jk.MMD default);
Gaussian kernel exp(-|x - y|^2 / (2 sigma^2)) with sigma = 10 (the paper's bandwidth read as sigma) and a
sharper sigma = 1.

Side by side in one process, on the same H and g:

* ours:      ``solve_weight_qp(H, g, mass=1, start=a)`` (median of --repeats runs);
* Clarabel:  CVXPY problem 0.5 quad_form(b, psd_wrap(H)) - g^T b, b >= 0, sum(b) = 1, solved
             with Clarabel at its defaults; "wall" includes CVXPY's compilation (what a user
             pays), "solve" is Clarabel's own solve time. Measured once per size.

Target (issue "Particles", point 3): at n = 1000 ours at least 50x faster than CVXPY-Clarabel
(wall) at the same objective (1e-8 relative); n = 5000 solved (certified). Clarabel is skipped
above --clarabel-max points (a dense n x n quadratic form: minutes and gigabytes at 5000).

BLAS threads: set to 1 by default (before NumPy loads) because Clarabel is single-threaded
and because OpenBLAS threads on a machine whose cores are busy made our small products up to
10x slower; pass --blas-threads 0 to keep the environment's setting.

Run:  python benchmarks/weight_step.py [--sizes 1000 5000] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[10.0, 1.0])
    parser.add_argument("--eta", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clarabel-max", type=int, default=2000)
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None)
    return parser.parse_args(argv)


ARGS = parse_args()
if ARGS.blas_threads > 0:  # before NumPy is imported
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(ARGS.blas_threads)

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import cvxpy as cp  # noqa: E402
import numpy as np  # noqa: E402

import jko_ift as jk  # noqa: E402
from jko_ift.methods.weights import mmd_step, solve_weight_qp  # noqa: E402

TARGET_SIZE = 1000
TARGET_SPEEDUP = 50.0
TARGET_OBJECTIVE_RTOL = 1e-8
RIDGE = 1e-8


def mixture_samples(n, rng):
    means = np.array([[0.0, 0.0], [3.0, -1.0], [1.0, 4.0]])
    covariances = np.array([[[1.0, 0.5], [0.5, 2.0]], np.eye(2), [[3.0, 0.5], [0.5, 1.0]]])
    component = rng.integers(0, 3, n)
    normal = rng.standard_normal((n, 2))
    factors = np.linalg.cholesky(covariances)
    return means[component] + np.einsum("nij,nj->ni", factors[component], normal)


def instance(n, sigma, eta, seed):
    rng = np.random.default_rng(seed)
    target = mixture_samples(n, rng)
    start = rng.standard_normal((n, 2)) + 5.0
    particles = start + (target.mean(0) - 5.0) / 3.0  # mid-run: a third of the way
    kernel = jk.Gaussian(sigma)
    a = np.full(n, 1.0 / n)
    t0 = time.perf_counter()
    K = kernel(particles, particles)
    c = kernel.apply(particles, target, np.full(n, 1.0 / n))
    G = K + RIDGE * np.eye(n)
    H = K + G / eta
    g = c + G @ a / eta
    assembly = time.perf_counter() - t0
    measure = jk.Measure(particles, a)
    F = jk.MMD2(jk.Measure(target, np.full(n, 1.0 / n)), kernel)
    return H, g, a, assembly, (F, kernel, measure)


def clarabel(H, g):
    b = cp.Variable(g.size, nonneg=True)
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(b, cp.psd_wrap(H)) - g @ b),
                         [cp.sum(b) == 1.0])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem.solve(solver="CLARABEL")
    wall = time.perf_counter() - t0
    return problem.value, wall, problem.solver_stats.solve_time, problem.status


def main():
    args = ARGS
    rows = []
    print(f"python {platform.python_version()}, numpy {np.__version__}, cvxpy {cp.__version__}, "
          f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}, eta {args.eta}, "
          f"ridge {RIDGE}")
    header = (f"{'n':>5} {'sigma':>5} {'support':>7} {'ours [s]':>9} {'step [s]':>9} "
              f"{'clarabel wall':>13} {'clar solve':>10} {'speedup':>8} {'vs solve':>8} "
              f"{'rel diff':>9} {'our gap':>9} {'status':>8}")
    print(header)
    print("-" * len(header))
    for sigma in args.sigmas:
        for n in args.sizes:
            H, g, a, assembly, (F, kernel, measure) = instance(n, sigma, args.eta, args.seed)
            times, solution = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                solution = solve_weight_qp(H, g, 1.0, start=a)
                times.append(time.perf_counter() - t0)
            ours = statistics.median(times)
            # the whole reaction step from the particles (Gram assembly included), once
            t0 = time.perf_counter()
            step = mmd_step(F, jk.MMD(kernel, ridge=RIDGE), measure.points, a, args.eta, True,
                            energy_scale=F.value(measure))
            step_time = time.perf_counter() - t0
            row = {"n": n, "sigma": sigma, "support": solution.info["support"], "ours": ours,
                   "ours_all": times, "step": step_time, "assembly": assembly,
                   "objective": solution.objective, "gap": solution.gap,
                   "status": solution.status, "step_status": step.status}
            if n <= args.clarabel_max:
                value, wall, solve, status = clarabel(H, g)
                row.update(clarabel_objective=value, clarabel_wall=wall, clarabel_solve=solve,
                           clarabel_status=status, speedup=wall / ours,
                           speedup_vs_solve=solve / ours,
                           relative_difference=(solution.objective - value) / abs(value))
            rows.append(row)
            clar = (f"{row['clarabel_wall']:>13.3f} {row['clarabel_solve']:>10.3f} "
                    f"{row['speedup']:>7.0f}x {row['speedup_vs_solve']:>7.0f}x "
                    f"{row['relative_difference']:>9.1e}") if "speedup" in row else \
                f"{'skipped':>13} {'':>10} {'':>8} {'':>8} {'':>9}"
            print(f"{n:>5} {sigma:>5g} {row['support']:>7} {ours:>9.4f} {step_time:>9.4f} {clar} "
                  f"{solution.gap:>9.1e} {solution.status:>8}", flush=True)
    print()
    verdicts = []
    for row in rows:
        if row["n"] == TARGET_SIZE and "speedup" in row:
            same = abs(row["relative_difference"]) <= TARGET_OBJECTIVE_RTOL
            fast = row["speedup"] >= TARGET_SPEEDUP
            verdicts.append(same and fast)
            print(f"target n = {TARGET_SIZE}, sigma = {row['sigma']:g}: speedup "
                  f"{row['speedup']:.0f}x (>= {TARGET_SPEEDUP:.0f}x: {'yes' if fast else 'NO'}), "
                  f"objective difference {row['relative_difference']:.1e} (<= "
                  f"{TARGET_OBJECTIVE_RTOL:g}: {'yes' if same else 'NO'})")
        if row["n"] >= 5000:
            print(f"n = {row['n']}, sigma = {row['sigma']:g}: {row['status']} in {row['ours']:.2f} s "
                  f"(certified gap {row['gap']:.1e}), whole step {row['step']:.2f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "args": vars(args)}, handle, indent=2, default=float)
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
