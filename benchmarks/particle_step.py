"""Benchmark of the implicit particle step: one ``jk.ParticleJKO`` step against one witness
gradient at the same N.

Two cases, d = 2, uniform weights, F = 1/2 MMD^2 to N target samples:

* W2:   particles N(0, I) + 1, target N(0, I), jk.Gaussian(--sigma) (the points of
        ``benchmarks/witness.py``), jk.Wasserstein(), tau = --tau;
* IFT:  the paper's 2-D problem (``problems.paper_2d``: particles N((5, 5), I), target
        N(0, [[1, .5], [.5, 2]]), jk.Gaussian(10)), jk.IFT(jk.Gaussian(10), alpha=1,
        beta=--beta, conserve_mass=True) (the spherical IFT), tau = --tau.

The comparator is one witness-gradient evaluation of the same F on the same particles
(``F.grad_first_variation``: the two blocked ``Kernel.grad_sum`` of ``benchmarks/witness.py``).
In one process, interleaved (witness, step, witness, ...), --repeats times, the medians of the
wall times; the ratio step / witness is the step's cost in witness-gradient evaluations. Targets:
a W2 step at most 15 evaluations, an IFT step at most 40 (N = 10^3 and 10^4). Printed with the
step's position iterations, objective evaluations, weight solves, status and certificate.

Run:  python benchmarks/particle_step.py [--n 1000 3000] [--case w2 ift] [--repeats 3]
      python benchmarks/particle_step.py --n 10000 --repeats 1   (the targets' N; minutes)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import numpy as np

import jko_ift as jk
from jko_ift.problems import paper_2d

TARGETS = {"w2": 15.0, "ift": 40.0}


def w2_case(n: int, sigma: float):
    rng = np.random.default_rng(0)
    particles = jk.Measure(rng.normal(size=(n, 2)) + 1.0, np.full(n, 1.0 / n))
    target = jk.Measure(rng.normal(size=(n, 2)), np.full(n, 1.0 / n))
    return jk.MMD2(target, jk.Gaussian(sigma)), jk.Wasserstein(), particles


def ift_case(n: int, beta: float):
    experiment = paper_2d("gaussian", particles=n, samples=n, seed=0)
    geometry = jk.IFT(experiment.kernel, alpha=1.0, beta=beta, conserve_mass=True)
    return experiment.energy, geometry, experiment.initial


def timed(run):
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def measure(case: str, n: int, args) -> dict:
    """Median seconds of one witness gradient and one step, interleaved, and the step's info."""
    F, geometry, mu = w2_case(n, args.sigma) if case == "w2" else ift_case(n, args.beta)
    witness, steps, result = [], [], None
    for _ in range(args.repeats):
        witness.append(timed(lambda: F.grad_first_variation(mu))[0])
        seconds, result = timed(lambda: jk.ParticleJKO().step(F, geometry, mu, args.tau, throw=False))
        steps.append(seconds)
    return {"witness": statistics.median(witness), "step": statistics.median(steps),
            "result": result}


def report(case: str, n: int, figures: dict) -> bool:
    result, info = figures["result"], figures["result"].info
    ratio = figures["step"] / figures["witness"]
    met = ratio <= TARGETS[case] and result.ok
    print(f"{case:4s} {n:7d} {figures['witness']:9.3f} {figures['step']:9.2f} {ratio:8.1f} "
          f"{info.get('position_iterations', '-')!s:>6s} {info.get('position_evaluations', '-')!s:>6s} "
          f"{info.get('weight_solves', '-')!s:>6s} {result.status:>18s} {result.certificate:9.2e}  "
          f"<= {TARGETS[case]:g}: {'met' if met else 'not met'}")
    return met


def main(argv=None):
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000])
    parser.add_argument("--case", choices=sorted(TARGETS), nargs="+", default=["w2", "ift"])
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--sigma", type=float, default=1.0, help="bandwidth of the W2 case")
    parser.add_argument("--beta", type=float, default=1.0, help="reaction rate of the IFT case")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"python {platform.python_version()}, numpy {np.__version__}, BLAS threads "
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'default')}, d = 2, tau = {args.tau:g}, "
          f"median of {args.repeats} (wall seconds)")
    print(f"{'case':4s} {'N':>7s} {'witness':>9s} {'step':>9s} {'ratio':>8s} {'pos it':>6s} "
          f"{'evals':>6s} {'w solv':>6s} {'status':>18s} {'certif.':>9s}  target")
    verdicts = [report(case, n, measure(case, n, args)) for case in args.case for n in args.n]
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
