"""Benchmark of the exact conic W2 JKO step: dense plan vs restricted plan vs DPP re-solve.

Problem: the Fokker-Planck energy F = Entropy + Potential(|x|^2 / 2) on a cell-centred grid
on [-L, L]^d, initial Gaussian with standard deviation ``--sd`` and mean shifted by
``--shift`` along the first axis (so that mass moves), one W2 JKO step of size tau:

    mu^1 = argmin_mu F(mu) + W2^2(mu, mu^0) / (2 tau).

For each grid it measures, side by side in one process,

* dense:       ``jk.ConicJKO(radius=np.inf).step(...)``, a fresh method object (includes the
               CVXPY compilation of the n^2-variable plan);
* restricted:  ``jk.ConicJKO().step(...)``, fresh (includes compilation and any doubling of
               the plan radius that the certificate asks for);
* re-solve:    a second ``.step`` on the restricted method object, from the first step's
               result (same support, new weights): only the DPP parameters change.

Timings are medians over ``--repeats`` runs, except dense runs with more than
``--dense-repeat-max`` plan entries (24x24: 331776), which are measured once.

When the dense step with default solver settings fails (Clarabel's InsufficientProgress
happens on 2-D grids), the failure and its time are reported and, unless
``--no-dense-fallback``, the dense step is solved again with Clarabel's
``max_step_fraction=0.95`` to get a reference objective ("dense*" in the table).

Default tau: 0.05 on 1-D grids; 0.3 on 2-D grids, because with spacing h = 0.5 (16x16) or
1/3 (24x24) a step of 0.05 moves the mass by about 0.08 < h and is grid locked (the plan stays
diagonal, a trivial benchmark).

With ``--tolerance-taus`` it also measures what the default Clarabel tolerances cost, which
shrink like tau^4 below tau = 0.05 (``jko_ift.methods.conic.clarabel_tolerances``): for each
grid and tau, the re-solve step (the steady state of a run) with the defaults against Clarabel's
own 1e-8 ("legacy"), side by side, as median times, iterations and their ratios.

Run:  python benchmarks/conic_step.py [--quick] [--json out.json] [--tolerance-taus 0.05 0.00625]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings

import numpy as np

import jko_ift as jk

TARGET_SPEEDUP = 10.0  # the issue: restricted at least 10x faster than dense at 24x24
TARGET_OBJECTIVE_RTOL = 1e-6  # ... with the same objective to 1e-6 relative
TARGET_GRID = "24x24"
FALLBACK_OPTIONS = {"max_step_fraction": 0.95}


def potential(x):
    return 0.5 * np.sum(x**2, axis=1)


def potential_gradient(x):
    return x


def parse_grid(text: str) -> tuple[int, ...]:
    shape = tuple(int(part) for part in text.lower().split("x"))
    if not 1 <= len(shape) <= 3 or min(shape) < 2:
        raise argparse.ArgumentTypeError(f"grid must look like 100 or 16x16, got {text!r}")
    return shape


def grid_name(shape) -> str:
    return "x".join(str(s) for s in shape)


def initial_measure(shape, half_width: float, sd: float, shift: float) -> jk.Measure:
    d = len(shape)
    grid = jk.Grid([-half_width] * d, [half_width] * d, shape)
    mean = np.zeros(d)
    mean[0] = shift
    return grid.measure(lambda x: np.exp(-np.sum((x - mean) ** 2, axis=1) / (2 * sd**2)),
                        normalize=True)


def timed_step(method, F, geometry, mu, tau):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # grid locking is reported from info, not warned
        start = time.perf_counter()
        result = method.step(F, geometry, mu, tau, throw=False)
        elapsed = time.perf_counter() - start
    return elapsed, result


def summary(result, elapsed) -> dict:
    info = result.info
    return {
        "time_s": elapsed,
        "status": result.status,
        "solver_status": str(info.get("solver_status")),
        "certificate": float(result.certificate),
        "objective": float(result.objective),
        "plan_entries": info.get("plan_entries"),
        "radius": info.get("radius"),
        "iterations": info.get("iterations"),
        "solve_time_s": info.get("solve_time"),  # Clarabel's own time
        "cvxpy_solve_wall_s": info.get("wall_time"),  # problem.solve(): canonicalize + solve + unpack
        "compiled": info.get("compiled"),
        "moved_fraction": info.get("moved_fraction"),
        "grid_locked": info.get("grid_locked"),
        "exclusion_violation": info.get("exclusion_violation"),
    }


def median_runs(make_method, F, geometry, mu, tau, repeats):
    """Run a fresh method `repeats` times: (median time, last result, last method, all times)."""
    times, result, method = [], None, None
    for _ in range(repeats):
        method = make_method()
        elapsed, result = timed_step(method, F, geometry, mu, tau)
        times.append(elapsed)
    return statistics.median(times), result, method, times


def bench_grid(shape, args) -> dict:
    F = jk.Entropy() + jk.Potential(potential, potential_gradient)
    geometry = jk.Wasserstein()
    mu = initial_measure(shape, args.half_width, args.sd, args.shift)
    tau = args.tau_1d if len(shape) == 1 else args.tau_2d
    n = mu.n
    row = {"grid": grid_name(shape), "n": n, "tau": tau, "dense_plan_entries": n * n}

    # restricted: fresh object each time (compile + radius doubling included)
    t_restricted, restricted, method, times = median_runs(
        lambda: jk.ConicJKO(solver_options=dict(args.solver_options)), F, geometry, mu, tau,
        args.repeats)
    row["restricted"] = summary(restricted, t_restricted) | {"times_s": times}

    # re-solve through the compiled problem, from the first step's result (same support)
    if restricted.measure is not None:
        mu1 = restricted.measure
        times, resolve = [], None
        for _ in range(args.repeats):
            elapsed, resolve = timed_step(method, F, geometry, mu1, tau)
            times.append(elapsed)
        row["resolve"] = summary(resolve, statistics.median(times)) | {"times_s": times}
    else:
        row["resolve"] = None

    # dense: fresh object (compile included); the largest measured once
    dense_repeats = args.repeats if n * n <= args.dense_repeat_max else 1
    if args.skip_dense_over and n * n > args.skip_dense_over:
        row["dense"] = row["dense_reference"] = None
    else:
        t_dense, dense, _, times = median_runs(
            lambda: jk.ConicJKO(radius=np.inf, solver_options=dict(args.solver_options)),
            F, geometry, mu, tau, dense_repeats)
        row["dense"] = summary(dense, t_dense) | {"times_s": times}
        row["dense_reference"] = None
        if dense.measure is None and not args.no_dense_fallback:
            elapsed, reference = timed_step(
                jk.ConicJKO(radius=np.inf,
                            solver_options={**args.solver_options, **FALLBACK_OPTIONS}),
                F, geometry, mu, tau)
            row["dense_reference"] = summary(reference, elapsed) | {"options": FALLBACK_OPTIONS}

    # comparisons
    reference = row["dense"] if row["dense"] and row["dense"]["status"] == "optimal" else (
        row["dense_reference"])
    row["reference"] = ("dense" if reference is row["dense"] else
                        "dense*" if reference is not None else None)
    rest = row["restricted"]
    if reference is not None and reference["status"] == "optimal" and rest["status"] == "optimal":
        row["objective_rel_diff"] = abs(reference["objective"] - rest["objective"]) / max(
            1.0, abs(reference["objective"]))
    else:
        row["objective_rel_diff"] = None
    row["dense_over_restricted"] = reference["time_s"] / rest["time_s"] if reference else None
    row["restricted_over_resolve"] = (rest["time_s"] / row["resolve"]["time_s"]
                                      if row["resolve"] else None)
    return row


#: Clarabel's own stopping tolerances, the defaults of every step before they shrank with tau.
LEGACY_TOLERANCES = {"tol_gap_abs": 1e-8, "tol_gap_rel": 1e-8, "tol_feas": 1e-8}


def bench_tolerances(shape, tau, args) -> dict:
    """Re-solve time and iterations with the default tolerances against LEGACY_TOLERANCES."""
    F = jk.Entropy() + jk.Potential(potential, potential_gradient)
    mu = initial_measure(shape, args.half_width, args.sd, args.shift)
    row = {"grid": grid_name(shape), "n": mu.n, "tau": tau}
    for name, options in (("legacy", LEGACY_TOLERANCES), ("default", {})):
        method = jk.ConicJKO(solver_options={**options, **args.solver_options})
        _, first = timed_step(method, F, jk.Wasserstein(), mu, tau)  # compile, settle the radius
        start = first.measure if first.measure is not None else mu
        times, result = [], None
        for _ in range(args.repeats):
            elapsed, result = timed_step(method, F, jk.Wasserstein(), start, tau)
            times.append(elapsed)
        row[name] = summary(result, statistics.median(times)) | {
            "tolerance": result.info.get("tolerance"), "times_s": times}
    legacy, default = row["legacy"], row["default"]
    row["time_ratio"] = default["time_s"] / legacy["time_s"]
    row["iteration_ratio"] = (default["iterations"] / legacy["iterations"]
                              if legacy["iterations"] else None)
    return row


def print_tolerance_table(rows, out=sys.stdout):
    header = (f"{'grid':>7} {'n':>4} {'tau':>8} | {'tolerance':>9} | {'iters legacy/default':>20} "
              f"{'ratio':>5} | {'time s legacy':>13} {'default':>8} {'ratio':>5} | "
              f"{'status legacy/default':>21}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in rows:
        legacy, default = row["legacy"], row["default"]
        print(f"{row['grid']:>7} {row['n']:>4} {row['tau']:>8.5g} | {default['tolerance']:>9.1e} | "
              f"{legacy['iterations']!s:>9}/{default['iterations']!s:<10} "
              f"{fmt(row['iteration_ratio'], '5.2f'):>5} | {legacy['time_s']:>13.3f} "
              f"{default['time_s']:>8.3f} {row['time_ratio']:>5.2f} | "
              f"{legacy['status'] + '/' + default['status']:>21}", file=out)


def fmt(value, spec):
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec)


def short_status(entry) -> str:
    if entry is None:
        return "-"
    ours, solver = entry["status"], entry["solver_status"]
    ours = "solver_error" if ours.startswith("solver_error") else ours
    solver = "solver_error" if solver.startswith("solver_error") else solver
    return f"{ours}/{solver}"


def print_table(rows, out=sys.stdout):
    header = (f"{'grid':>7} {'n':>4} {'tau':>5} | {'dense s':>8} {'restr s':>8} {'resolve s':>9} | "
              f"{'dense/restr':>11} {'restr/resolve':>13} | {'obj rel diff':>12} | "
              f"{'entries':>7} {'of n^2':>6} {'radius':>6} {'certificate':>11} {'moved':>6}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in rows:
        rest, resolve = row["restricted"], row["resolve"]
        dense = row["dense"]
        ref = row["dense_reference"]
        if dense is None:
            dense_time = "skipped"
        else:
            dense_time = fmt(dense["time_s"], "8.3f")
            if dense["status"] != "optimal":
                dense_time = f"{dense['time_s']:7.2f}!"
        ratio = fmt(row["dense_over_restricted"], "10.1f")
        if row["reference"] == "dense*":
            ratio += "*"
        print(f"{row['grid']:>7} {row['n']:>4} {row['tau']:>5.2f} | {dense_time:>8} "
              f"{fmt(rest['time_s'], '8.3f'):>8} {fmt(resolve and resolve['time_s'], '9.3f'):>9} | "
              f"{ratio:>11} {fmt(row['restricted_over_resolve'], '13.1f'):>13} | "
              f"{fmt(row['objective_rel_diff'], '12.2e'):>12} | "
              f"{rest['plan_entries'] or 0:>7} {(rest['plan_entries'] or 0) / row['n']**2:>6.3f} "
              f"{fmt(rest['radius'], '6.3f'):>6} {fmt(rest['certificate'], '11.2e'):>11} "
              f"{fmt(rest['moved_fraction'], '6.3f'):>6}", file=out)
        if ref is not None:
            print(f"{'':>7} dense* (max_step_fraction=0.95): {ref['time_s']:.3f} s, "
                  f"{short_status(ref)}, objective {ref['objective']:.10f}", file=out)
    print(file=out)
    print(f"{'grid':>7} | {'status dense (ours/Clarabel)':<34} {'restricted':<30} {'re-solve':<30} | "
          f"{'iters d/r/rs':>12} {'Clarabel s restr/resolve':>24} {'compiled rs':>11}", file=out)
    for row in rows:
        rest, resolve, dense = row["restricted"], row["resolve"], row["dense"]
        iters = "/".join(str(e["iterations"]) if e and e["iterations"] is not None else "-"
                         for e in (dense, rest, resolve))
        clarabel = (f"{fmt(rest['solve_time_s'], '.3f')}/{fmt(resolve and resolve['solve_time_s'], '.3f')}")
        print(f"{row['grid']:>7} | {short_status(dense):<34} {short_status(rest):<30} "
              f"{short_status(resolve):<30} | {iters:>12} {clarabel:>24} "
              f"{str(resolve and resolve['compiled']):>11}", file=out)


def target_line(rows) -> str:
    row = next((r for r in rows if r["grid"] == TARGET_GRID), None)
    if row is None:
        return f"target ({TARGET_GRID}): not measured in this run"
    speedup, diff = row["dense_over_restricted"], row["objective_rel_diff"]
    if speedup is None or diff is None:
        why = "no optimal dense reference" if speedup is None or row["reference"] is None else (
            "a step was not optimal")
        return f"target ({TARGET_GRID}): cannot be judged ({why})"
    met = speedup >= TARGET_SPEEDUP and diff <= TARGET_OBJECTIVE_RTOL
    ref = ("dense reference solved with max_step_fraction=0.95, default dense FAILED"
           if row["reference"] == "dense*" else "dense with default settings")
    return (f"target ({TARGET_GRID}: restricted >= {TARGET_SPEEDUP:g}x faster than dense, objective "
            f"within {TARGET_OBJECTIVE_RTOL:g} relative): {'MET' if met else 'NOT MET'} -- "
            f"speed-up {speedup:.1f}x, objective difference {diff:.2e} ({ref})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", type=parse_grid, nargs="+",
                        default=[(100,), (200,), (16, 16), (24, 24)],
                        help="grids, e.g. 100 200 16x16 24x24 (default)")
    parser.add_argument("--quick", action="store_true",
                        help="grids 100 and 16x16, one repeat (a smoke run, a few seconds)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per median (default 3)")
    parser.add_argument("--dense-repeat-max", type=int, default=100_000,
                        help="dense plans with more entries are timed once (default 100000)")
    parser.add_argument("--skip-dense-over", type=int, default=0,
                        help="skip the dense step above this many plan entries (0: never)")
    parser.add_argument("--no-dense-fallback", action="store_true",
                        help="do not re-solve a failed dense step with max_step_fraction=0.95")
    parser.add_argument("--tau-1d", type=float, default=0.05)
    parser.add_argument("--tau-2d", type=float, default=0.3)
    parser.add_argument("--sd", type=float, default=0.8, help="initial standard deviation")
    parser.add_argument("--shift", type=float, default=1.0, help="initial mean along axis 0")
    parser.add_argument("--half-width", type=float, default=4.0, help="box [-L, L]^d")
    parser.add_argument("--solver-options", type=json.loads, default={},
                        help='Clarabel settings for all three steps, as JSON, e.g. '
                             '\'{"direct_solve_method": "qdldl"}\'')
    parser.add_argument("--tolerance-taus", type=float, nargs="*", default=[],
                        help="also compare the default tolerances with Clarabel's 1e-8 at these taus")
    parser.add_argument("--json", help="also write the table (and raw timings) to this path")
    args = parser.parse_args(argv)
    if args.quick:
        args.grids, args.repeats = [(100,), (16, 16)], 1

    # warm-up: CVXPY and Clarabel do one-off work on their first solve
    bench_args = argparse.Namespace(**{**vars(args), "repeats": 1})
    bench_grid((20,), bench_args)

    rows = []
    for shape in args.grids:
        start = time.perf_counter()
        rows.append(bench_grid(shape, args))
        print(f"[{grid_name(shape)} done in {time.perf_counter() - start:.1f} s]", file=sys.stderr,
              flush=True)

    print(f"W2 JKO step of Entropy + Potential(|x|^2/2), Gaussian sd={args.sd} mean shift "
          f"{args.shift} on [-{args.half_width:g}, {args.half_width:g}]^d; ConicJKO (Clarabel"
          f"{', ' + json.dumps(args.solver_options) if args.solver_options else ''}); "
          f"median of {args.repeats} (dense with > {args.dense_repeat_max} entries: once).")
    print("times in seconds, per step, including compilation for dense and restricted; "
          "'!' dense failed, '*' ratio against dense* (see below)\n")
    print_table(rows)
    line = target_line(rows)
    print("\n" + line)
    tolerance_rows = [bench_tolerances(shape, tau, args) for shape in args.grids
                      for tau in args.tolerance_taus]
    if tolerance_rows:
        print(f"\nDefault tolerances (shrinking like tau^4 below 0.05) against Clarabel's 1e-8: the "
              f"re-solve step, median of {args.repeats}\n")
        print_tolerance_table(tolerance_rows)
    if args.json:
        payload = {"rows": rows, "target": line, "tolerance_rows": tolerance_rows,
                   "args": {k: (list(map(list, v)) if k == "grids" else v)
                            for k, v in vars(args).items()},
                   "python": platform.python_version(), "machine": platform.machine()}
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2, default=float)
    return rows


if __name__ == "__main__":
    main()
