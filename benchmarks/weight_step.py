"""Benchmark of the exact MMD weight step: ours (``solve_weight_qp``) vs CVXPY + Clarabel.

The weight step of the IFT particle algorithm (Gladin et al., NeurIPS 2024) on n particles:

    b = argmin_{b in simplex}  F(b) + (b - a)^T (K + ridge I)(b - a) / (2 eta),
    F = 1/2 MMD^2(sum_i b_i delta_{x_i}, target),

a convex QP min 1/2 b^T H b - g^T b with H = K + (K + ridge I) / eta, g = K_xy q + (K + ridge I) a / eta,
uniform weights a, n target samples, eta = 0.1 (half the paper's weight step, tau beta = 2 lr_w =
0.2), ridge 1e-8 (jk.MMD default), Gaussian kernel exp(-|x - y|^2 / (2 sigma^2)). Two instances:

* "overlap" (the targets): particles from N(0, I_2), target from N(0.5, 0.49 I_2), sigma 0.5, 1
  and 10. The target overlaps the particles, so the minimizer carries mass on most of them
  (dense: 800-1000 of 1000), the case where an active set grown one particle at a time is slow;
* "paper": the paper's 2-D experiment scaled to n: target from the mixture of N(0, [[1, .5],
  [.5, 2]]), N((3, -1), I), N((1, 4), [[3, .5], [.5, 1]]); particles from N((5, 5), I) pulled a
  third of the way towards it (mid-run); sigma 10 and 1. Sparse minimizers (12-80 particles).

Side by side in one process, on the same H and g, interleaved, medians of --repeats runs, each
timed call started with H read once (in cache, as in a step, which builds H right before the
solve) ("/chol" and "cl/ch": ours and Clarabel in units of one LAPACK Cholesky factorization of H
timed in the same loop, the floor of the dense path):

* ours:      ``solve_weight_qp(H, g, mass=1, start=a)``;
* Clarabel:  CVXPY problem 0.5 quad_form(b, psd_wrap(H)) - g^T b, b >= 0, sum(b) = 1, solved
             with Clarabel at its defaults; "wall" includes CVXPY's compilation (what a user
             pays), "solve" is Clarabel's own solve time.

Target (issue "Implicit particle steps at research scale", point 4): on the overlap instance at
n = 1000, ours at least 50x faster than CVXPY-Clarabel (wall) at sigma 0.5, 1 and 10, at the same
objective (1e-8 relative); n = 10^4 in seconds (--large 10000: ours alone, certified; the dense
n x n H is 800 MB; the low-rank path keeps beside it only n x rank factor rows, no n x n factor).
"method" says which path solved it: dense_active_set (one Cholesky factorization of H) or
low_rank_active_set (pivoted Cholesky of H minus its ridge, CG on H; "/chol" below 1 there).

BLAS threads: set to 1 by default (before NumPy loads) because Clarabel is single-threaded
and because OpenBLAS threads on a machine whose cores are busy made our small products up to
10x slower; pass --blas-threads 0 to keep the environment's setting.

--limits times, in the same units and the same loop, what bounds the overlap rows at n = 1000: the dense
path started on the final zero set (its route with a perfect guess of the zeros), the factorization of H on
the final support alone with its face solve and certificate (the floor of any method that factors only the
free weights), and the cheapest guesses of the zero set measured: LAPACK's pivoted Cholesky (pstrf) and
random Nystrom rows to the rank k at which the pivoted residual of H is within LIMIT_RESIDUAL of the ridge,
with the number of weights on which the zero set of that rank-k surrogate (F^T F plus the residual
diagonal) differs from ours.

Run:  python benchmarks/weight_step.py [--repeats 3] [--large 10000] [--json out.json] [--limits]
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0, 10.0],
                        help="bandwidths of the overlap instance")
    parser.add_argument("--paper-sigmas", type=float, nargs="*", default=[10.0, 1.0],
                        help="bandwidths of the paper instance (none: skip it)")
    parser.add_argument("--large", type=int, nargs="*", default=[],
                        help="sizes timed for ours alone on the overlap instance (e.g. 10000)")
    parser.add_argument("--large-sigmas", type=float, nargs="+", default=[10.0, 1.0, 0.5])
    parser.add_argument("--eta", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clarabel-max", type=int, default=2000)
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--limits", action="store_true",
                        help="also time the bounds that limit the overlap rows at n = 1000 (see limits())")
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
from scipy.linalg import lapack  # noqa: E402

import jko_ift as jk  # noqa: E402
from jko_ift.methods.weights import mmd_step, solve_weight_qp  # noqa: E402

TARGET_SIZE = 1000
TARGET_SPEEDUP = 50.0
TARGET_OBJECTIVE_RTOL = 1e-8
RIDGE = 1e-8
LIMIT_RESIDUAL = 2.5


def mixture_samples(n, rng):
    means = np.array([[0.0, 0.0], [3.0, -1.0], [1.0, 4.0]])
    covariances = np.array([[[1.0, 0.5], [0.5, 2.0]], np.eye(2), [[3.0, 0.5], [0.5, 1.0]]])
    component = rng.integers(0, 3, n)
    normal = rng.standard_normal((n, 2))
    factors = np.linalg.cholesky(covariances)
    return means[component] + np.einsum("nij,nj->ni", factors[component], normal)


def points(name, n, seed):
    """(particles, target) of the named instance (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if name == "overlap":
        return rng.standard_normal((n, 2)), 0.5 + 0.7 * rng.standard_normal((n, 2))
    target = mixture_samples(n, rng)
    start = rng.standard_normal((n, 2)) + 5.0
    return start + (target.mean(0) - 5.0) / 3.0, target  # mid-run: a third of the way


def instance(name, n, sigma, eta, seed):
    """H, g of the weight step (one n x n array: K scaled in place), the uniform weights a, and
    (F, kernel, measure) for the whole step."""
    particles, target = points(name, n, seed)
    kernel = jk.Gaussian(sigma)
    a = np.full(n, 1.0 / n)
    H = kernel(particles, particles)
    g = kernel.apply(particles, target, np.full(n, 1.0 / n)) + (H @ a + RIDGE * a) / eta
    H *= 1.0 + 1.0 / eta
    H[np.diag_indices(n)] += RIDGE / eta
    measure = jk.Measure(particles, a)
    F = jk.MMD2(jk.Measure(target, np.full(n, 1.0 / n)), kernel)
    return H, g, a, (F, kernel, measure)


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


def timed(function):
    t0 = time.perf_counter()
    value = function()
    return value, time.perf_counter() - t0


def warm(H):
    """Read H once, so that every timed call starts with it in cache, as a step does (it builds H
    right before the solve). Interleaved without it, ours ran right after Clarabel with H evicted
    and the floor right after ours with H cached: 0.1-0.15 of a factorization between the two."""
    return float(H.sum())


def measure_row(name, n, sigma, args, with_clarabel=True, with_step=True):
    """Ours (and Clarabel, interleaved) on one instance: a dict of figures."""
    H, g, a, (F, kernel, measure) = instance(name, n, sigma, args.eta, args.seed)
    ours, walls, solves, floors, solution, reference = [], [], [], [], None, None
    for _ in range(args.repeats):
        warm(H)
        solution, seconds = timed(lambda: solve_weight_qp(H, g, 1.0, start=a))
        ours.append(seconds)
        if with_clarabel:  # the floor of the dense path: one LAPACK Cholesky factorization of H
            warm(H)
            floors.append(timed(lambda: lapack.dpotrf(H.T, lower=1, clean=0))[1])
        if with_clarabel:
            warm(H)
            reference = clarabel(H, g)
            walls.append(reference[1])
            solves.append(reference[2])
    row = {"instance": name, "n": n, "sigma": sigma, "support": solution.info["support"],
           "ours": statistics.median(ours), "ours_all": ours, "iterations": solution.iterations,
           "method": solution.method, "objective": solution.objective, "gap": solution.gap,
           "status": solution.status}
    if with_step:  # the whole reaction step from the particles (Gram assembly included), once
        step, row["step"] = timed(lambda: mmd_step(F, jk.MMD(kernel, ridge=RIDGE), measure.points, a,
                                                   args.eta, True, energy_scale=F.value(measure)))
        row["step_status"] = step.status
    if with_clarabel:
        value = reference[0]
        row.update(clarabel_objective=value, clarabel_wall=statistics.median(walls),
                   clarabel_all=walls, clarabel_solve=statistics.median(solves),
                   clarabel_status=reference[3],
                   relative_difference=(solution.objective - value) / abs(value))
        row.update(speedup=row["clarabel_wall"] / row["ours"],
                   speedup_vs_solve=row["clarabel_solve"] / row["ours"],
                   cholesky=statistics.median(floors))
    return row


def print_row(row):
    clar = (f"{row['clarabel_wall']:>10.3f} {row['clarabel_solve']:>10.3f} "
            f"{row['speedup']:>7.0f}x {row['speedup_vs_solve']:>7.0f}x "
            f"{row['relative_difference']:>9.1e} {row['ours'] / row['cholesky']:>6.1f} "
            f"{row['clarabel_wall'] / row['cholesky']:>6.0f}") if "speedup" in row else \
        f"{'skipped':>10} {'':>10} {'':>8} {'':>8} {'':>9} {'':>6} {'':>6}"
    step = f"{row['step']:>9.4f}" if "step" in row else f"{'':>9}"
    print(f"{row['instance']:>8} {row['n']:>6} {row['sigma']:>5g} {row['support']:>7} "
          f"{row['iterations']:>5} {row['ours']:>9.4f} {step} {clar} {row['gap']:>9.1e} "
          f"{row['status']:>8} {row['method']}", flush=True)


def verdicts(rows):
    """Met / not met per target row; returns whether all were met."""
    met = []
    for row in rows:
        if row["instance"] == "overlap" and row["n"] == TARGET_SIZE and "speedup" in row:
            same = abs(row["relative_difference"]) <= TARGET_OBJECTIVE_RTOL
            fast = row["speedup"] >= TARGET_SPEEDUP
            met.append(same and fast and row["status"] == "optimal")
            print(f"target n = {TARGET_SIZE}, sigma = {row['sigma']:g}: speedup "
                  f"{row['speedup']:.0f}x (>= {TARGET_SPEEDUP:.0f}x: {'yes' if fast else 'NO'}), "
                  f"objective difference {row['relative_difference']:.1e} (<= "
                  f"{TARGET_OBJECTIVE_RTOL:g}: {'yes' if same else 'NO'}): "
                  f"{'met' if met[-1] else 'NOT MET'}")
        if row["n"] >= 5000:
            print(f"{row['instance']} n = {row['n']}, sigma = {row['sigma']:g}: {row['status']} in "
                  f"{row['ours']:.2f} s (certified gap {row['gap']:.1e}, {row['iterations']} "
                  f"iterations, {row['method']})")
    return all(met)


def free_set_floor(H, g, free):
    """Factor H on ``free`` alone, solve its face (sum = 1) and compute H b: the floor of a method
    that knows the support."""
    block = np.take(np.take(H, free, axis=0), free, axis=1)
    factor, _ = lapack.dpotrf(block.T, lower=1, overwrite_a=1, clean=0)  # symmetric: no copy
    x = lapack.dpotrs(factor, np.column_stack([g[free], np.ones(free.size)]), lower=1)[0]
    b = np.zeros(g.size)
    b[free] = x[:, 0] + (1.0 - x[:, 0].sum()) / x[:, 1].sum() * x[:, 1]
    return H @ b - g


def nystrom_rows(H, pivots):
    """Rows L_PP^{-1} H_P. of the Nystrom factor on ``pivots``."""
    rows = np.take(H, pivots, axis=0)
    factor, _ = lapack.dpotrf(rows[:, pivots], lower=1)
    return lapack.dtrtrs(factor, rows, lower=1)[0]


def limits(sigma, args):
    """The bounds of the module docstring (--limits) for the overlap instance at n = TARGET_SIZE."""
    n = TARGET_SIZE
    H, g, a, _ = instance("overlap", n, sigma, args.eta, args.seed)
    solution = solve_weight_qp(H, g, 1.0, start=a)
    free = np.flatnonzero(solution.weights > 0)
    pivoted, order, _, _ = lapack.dpstrf(H.T, tol=-1.0, lower=1)  # all n pivots
    residual = np.diag(pivoted) ** 2
    rank = int(np.argmax(residual <= LIMIT_RESIDUAL * RIDGE / args.eta)) + 1
    tolerance = residual[rank - 1] * (1 - 1e-9)
    rows = np.zeros((rank, n))
    rows[:, order - 1] = np.tril(pivoted)[:, :rank].T
    diagonal = H.diagonal() - np.einsum("ij,ij->j", rows, rows)
    diagonal[order[:rank] - 1] = 0.0
    guess = solve_weight_qp(rows.T @ rows + np.diag(diagonal), g, 1.0, start=a).weights > 0
    sample = np.sort(np.random.default_rng(args.seed).choice(n, rank, replace=False))
    calls = {"ours": lambda: solve_weight_qp(H, g, 1.0, start=a),
             "dense path started on the final zeros": lambda: solve_weight_qp(H, g, 1.0,
                                                                              start=solution.weights),
             f"factor of the final support ({free.size}) only": lambda: free_set_floor(H, g, free),
             f"pivoted Cholesky (pstrf) to rank {rank}": lambda: lapack.dpstrf(H.T, tol=tolerance,
                                                                               lower=1),
             f"random Nystrom rows of rank {rank}": lambda: nystrom_rows(H, sample),
             "Cholesky factorization": lambda: lapack.dpotrf(H.T, lower=1, clean=0)}
    times = {name: [] for name in calls}
    clarabel_walls = []
    for _ in range(args.repeats):
        for name, call in calls.items():
            warm(H)
            times[name].append(timed(call)[1])
        warm(H)
        clarabel_walls.append(clarabel(H, g)[1])
    floor = statistics.median(times["Cholesky factorization"])
    budget = statistics.median(clarabel_walls) / floor / TARGET_SPEEDUP
    print(f"limits, overlap n = {n}, sigma = {sigma:g}, in Cholesky factorizations of H "
          f"({TARGET_SPEEDUP:.0f}x Clarabel: at most {budget:.2f}):")
    for name in list(calls)[:-1]:
        print(f"  {name:<45} {statistics.median(times[name]) / floor:>6.2f}")
    print(f"  (the rank-{rank} surrogate's support differs from ours in "
          f"{int(np.count_nonzero(guess != (solution.weights > 0)))} of {n} weights)", flush=True)


def main():
    args = ARGS
    print(f"python {platform.python_version()}, numpy {np.__version__}, cvxpy {cp.__version__}, "
          f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}, eta {args.eta}, "
          f"ridge {RIDGE}, medians of {args.repeats} (ours and Clarabel interleaved)")
    header = (f"{'instance':>8} {'n':>6} {'sigma':>5} {'support':>7} {'iters':>5} {'ours [s]':>9} "
              f"{'step [s]':>9} {'clar wall':>10} {'clar solve':>10} {'speedup':>8} {'vs solve':>8} "
              f"{'rel diff':>9} {'/chol':>6} {'cl/ch':>6} {'our gap':>9} {'status':>8} method")
    print(header)
    print("-" * len(header))
    rows = []
    cases = [("overlap", s) for s in args.sigmas] + [("paper", s) for s in args.paper_sigmas]
    for name, sigma in cases:
        for n in args.sizes:
            rows.append(measure_row(name, n, sigma, args, with_clarabel=n <= args.clarabel_max))
            print_row(rows[-1])
    for n in args.large:
        for sigma in args.large_sigmas:
            rows.append(measure_row("overlap", n, sigma, args, with_clarabel=False,
                                    with_step=False))
            print_row(rows[-1])
    print()
    met = verdicts(rows)
    if args.limits:
        print()
        for sigma in args.sigmas:
            limits(sigma, args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "args": vars(args)}, handle, indent=2, default=float)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
