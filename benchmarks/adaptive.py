"""Work-precision of error-controlled against fixed step sizes, side by side in one run.

    python benchmarks/adaptive.py [--quick] [--no-ift] [--only NAME ...] [--json PATH]

For each problem: fixed-tau runs over a range of step counts and adaptive runs over a range
of rtol (atol at its default, 1e-6) with both local error estimates (extrapolation: one solve
per attempt; step doubling: three), the work (step solves) and the error (largest distance to
the reference over the saved times). For every adaptive run it prints the work the fixed runs
need for the same error (log-log interpolation), the ratio (> 1: adaptive is cheaper) and the
growth of the steps (largest accepted tau over the second one).
Problems (``--only``): "quadratic", the W2 flow of a quadratic potential on 2-D particles
(closed form; minimum off the origin, where the tolerance atol + rtol |x| stays of the size of
the minimum, and at the origin, where it decays with the flow); "mmd", the MMD flow of
1/2 MMD^2 (closed form); "ou", the Ornstein-Uhlenbeck (Fokker-Planck) flow on 1-D Lagrangian
particles to t = 8 (closed form; particles do not lock on a grid); "ift", IFT to the paper's
2-D mixture target on 50 particles (jk.ParticleJKO, implicit positions and exact weights) and
on a 14 x 14 grid (jk.ConicJKO, where transport locks; not with --no-ift), whose references
are fixed runs with a much smaller tau.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import jko_ift as jk
from jko_ift import problems
from jko_ift.studies import work_precision


def ift_reference_error(problem, steps, save_at, method=None):
    """error(trajectory) against a fixed run with ``steps`` steps, in MMD at the save times."""
    reference = jk.solve(problem.energy, problem.geometry, problem.initial,
                         tau=problem.t_final / steps, steps=steps, save_at=save_at, method=method,
                         progress=False)
    kernel = problem.energy.kernel
    by_time = dict(zip(np.round(reference.times, 9), reference.measures, strict=True))

    def error(trajectory):
        return max(jk.mmd(mu, by_time[round(t, 9)], kernel)
                   for t, mu in zip(trajectory.times, trajectory.measures, strict=True))

    return error


#: The controllers compared on every problem: (label, StepController options).
VARIANTS = (("extrapolation", {"estimate": "extrapolation"}), ("doubling", {"estimate": "doubling"}))


def step_growth(trajectory) -> float:
    """The largest accepted tau over the first one that had a history (the second): how much the
    controller let the steps grow (the first step is tau0; later ones are cut at save times)."""
    taus = trajectory.taus
    return float(taus.max() / taus[1]) if len(taus) > 2 else float("nan")


def run(problem, steps, rtols, save_at, method_factory=jk.ConicJKO, error=None, variants=VARIANTS):
    start = time.perf_counter()
    error = error or problem.error
    fixed, _ = work_precision(problem.energy, problem.geometry, problem.initial, problem.t_final,
                              error, method_factory, steps=steps, save_at=save_at)
    rows = []
    saves = [round(float(t), 3) for t in save_at]
    print(f"\n{problem.name}: t_final = {problem.t_final:g}, saves at {saves}")
    header = ("run", "solves", "error", "rejected", "fixed solves", "ratio", "growth")
    print("  {:>26} {:>7} {:>10} {:>8} {:>12} {:>6} {:>6}".format(*header))
    for n, solves, err in zip(fixed.parameter, fixed.solves, fixed.errors, strict=True):
        print(f"  {f'fixed n={n:.0f}':>26} {solves:7d} {err:10.3e}")
        rows.append({"run": "fixed", "steps": int(n), "solves": int(solves), "error": err})
    for label, options in variants:
        _, adaptive = work_precision(problem.energy, problem.geometry, problem.initial,
                                     problem.t_final, error, method_factory, rtols=rtols,
                                     save_at=save_at, controller_options=options)
        for rtol, solves, err, trajectory in zip(adaptive.parameter, adaptive.solves,
                                                 adaptive.errors, adaptive.trajectories, strict=True):
            rejected = sum(not s["accepted"] for s in trajectory.stats)
            locked = sum(bool(s.get("grid_locked")) for s in trajectory.stats)
            needed = fixed.solves_to_reach(err)
            ratio = needed / solves
            growth = step_growth(trajectory)
            print(f"  {f'{label} {rtol:.0e}':>26} {solves:7d} {err:10.3e} {rejected:8d} "
                  f"{needed:12.1f} {ratio:6.2f} {growth:6.2f}"
                  + (f"  ({locked} grid-locked)" if locked else ""))
            rows.append({"run": "adaptive", "variant": label, "options": options, "rtol": rtol,
                         "solves": int(solves), "error": err, "rejected": rejected,
                         "grid_locked": locked, "fixed_solves_same_error": needed,
                         "ratio": ratio, "step_growth": growth, "taus": trajectory.taus.tolist()})
    print(f"  ({time.perf_counter() - start:.1f} s)")
    return {"problem": problem.name, "rows": rows}


GROUPS = ("quadratic", "mmd", "ou", "ift")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke test)")
    parser.add_argument("--no-ift", action="store_true", help="skip the (slower) 2-D IFT grid problem")
    parser.add_argument("--json", help="also write the tables to this JSON file")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=GROUPS,
                        help="run only these groups of problems")
    args = parser.parse_args(argv)
    results = []
    if "quadratic" in args.only:
        results += quadratic_runs(args.quick)
    if "mmd" in args.only:
        results.append(mmd_runs(args.quick))
    if "ou" in args.only:
        results.append(ou_runs(args.quick))
    if "ift" in args.only:
        results += ift_runs(args.quick, grid=not args.no_ift)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


def quadratic_runs(quick):
    """The W2 flow of a quadratic potential, whose steps must grow as the flow slows."""
    results = []
    rtols = [1e-2, 1e-3] if quick else [1e-2, 1e-3, 1e-4]
    steps = [16, 64] if quick else [16, 32, 64, 128, 256, 512]
    for minimum, t_final in [((1.0, 0.5), 4.0), ((1.0, 0.5), 8.0), ((0.0, 0.0), 4.0)]:
        quadratic = problems.quadratic_w2_particles(minimum, (3.0, 2.0), t_final)
        save = [t for t in (0.5, 1.0, 2.0, 4.0, 8.0) if t <= t_final]
        results.append(run(quadratic, steps, rtols, save, jk.ParticleJKO))
    return results


def mmd_runs(quick):
    mmd = problems.mmd_flow(t_final=8.0)
    save = np.linspace(0.5, mmd.t_final, 16)
    steps = [16, 32, 64, 128] if quick else [16, 32, 64, 128, 256, 512, 1024]
    rtols = [1e-1, 1e-2] if quick else [1e-1, 1e-2, 1e-3, 1e-4]
    return run(mmd, steps, rtols, save)


def ou_runs(quick):
    # from far (N(3, 0.5^2)) to equilibrium: fast early, slow late
    ou = problems.ornstein_uhlenbeck_particles(n=1000, t_final=8.0)
    save = [0.5, 1.0, 2.0, 4.0, 8.0]
    steps = [16, 32, 64] if quick else [16, 32, 64, 128, 256, 512, 1024, 2048]
    rtols = [1e-1, 1e-2] if quick else [1e-1, 1e-2, 1e-3, 1e-4]
    # the equilibrium sits at the origin, where rtol |x| vanishes: atol (a length) or the W2
    # distance over the spread give the particles near 0 a tolerance
    variants = (*VARIANTS, ("extrap., atol=1e-3", {"atol": 1e-3}), ("extrap., W2", {"distance": "w2"}))
    return run(ou, steps, rtols, save, ou.method_factory, variants=variants)


def ift_runs(quick, grid=True):
    results = []
    # IFT(alpha = 50, beta = 0.1) on the paper's particles: no grid to lock. The transport is 50
    # times the authors' loop (paper_scheme maps their steps to tau alpha = 1, tau beta = 0.2 for
    # 100 particles); a fast flow that gives the controller a wide range of step sizes
    experiment = problems.paper_2d("mixture", particles=50, samples=50, seed=0)
    ift = problems.Problem("ift_paper_particles", experiment.energy,
                           jk.IFT(experiment.kernel, 50.0, 0.1, conserve_mass=True),
                           experiment.initial, 16.0)
    save = [2.0, 4.0, 8.0, 16.0]
    steps = [8, 16, 32] if quick else [8, 16, 32, 64, 128, 256]
    rtols = [1e-1] if quick else [1e-1, 1e-2, 1e-3]
    error = ift_reference_error(ift, 8 * steps[-1], save, jk.ParticleJKO())
    results.append(run(ift, steps, rtols, save, jk.ParticleJKO, error=error))

    if grid:
        ift = problems.ift_paper_mixture()
        save = np.linspace(0.25, ift.t_final, 8)
        steps = [8, 16] if quick else [8, 16, 32, 64]
        rtols = [1e-1] if quick else [1e-1, 3e-2, 1e-2]
        with jk_quiet():
            error = ift_reference_error(ift, 8 * steps[-1], save)
            results.append(run(ift, steps, rtols, save, error=error))
    return results


def jk_quiet():
    """Grid locking is expected at the smallest steps of these fixed grids; count, not print."""
    import warnings

    manager = warnings.catch_warnings()
    manager.__enter__()
    warnings.simplefilter("ignore", jk.GridLockingWarning)

    class _Exit:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return manager.__exit__(*exc)

    return _Exit()


if __name__ == "__main__":
    main()
