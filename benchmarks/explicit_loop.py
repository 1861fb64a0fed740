"""Benchmark of the explicit particle loops: ``jk.solve`` against a minimal NumPy loop.

The 2-D experiment of Gladin et al. (``problems.paper_2d``: 100 particles from N((5, 5), I), 100
target samples, Gaussian kernel of width 10, F = 1/2 MMD^2), run by the library as
``jk.solve(F, s.geometry, mu0, tau=s.tau, steps=K, method=s.method, progress=False)`` with
``s = problems.paper_scheme(...)``, and by a NumPy loop of the same algorithm written here from
its formulas (``numpy_ift``, ``numpy_mmd_flow``: dense kernel matrices, each computed once per
point set and reused, no checks). The loop returns what ``jk.solve`` returns: the final positions
and weights and the energy F(mu^k) of every iterate (``Trajectory.energies``); the energy of the
IFT loop comes from the kernel matrices its next step uses anyway, while the noisy MMD-flow
steps evaluate the kernel at the perturbed points for the gradient and at the new points for
the energy, in both programs:

* IFT:       the authors' loop, lr = 50, lr_w = 0.1 (tau = 1, tau beta = 0.2): the explicit
             "euclidean" position step, then one projected-gradient weight step on the new
             positions, Euclidean projection onto the simplex;
* MMD flow:  their baseline with noise 10 for the first half of the steps (the witness of the
             perturbed particles at the perturbed particles), the same random stream.

Both run in one process, interleaved (library, loop, library, ...), --repeats times; the ratio
of the median CPU times (process time: steadier than the wall clock on a shared machine; BLAS
runs these 100 x 100 products on one thread) and the median of the pairwise ratios are
printed, with "met" when the first is at most 1.5 (the target), and the wall-time ratio.
The final positions, weights and all energies of the two must agree to 1e-10.

Run:  python benchmarks/explicit_loop.py [--steps 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

import jko_ift as jk
from jko_ift.problems import paper_2d, paper_scheme

TARGET_RATIO = 1.5
AGREEMENT = 1e-10


def simplex_projection(v: np.ndarray, mass: float) -> np.ndarray:
    """Euclidean projection onto {b >= 0, sum b = mass} (sort based)."""
    u = np.sort(v)[::-1]
    excess = np.cumsum(u) - mass
    rank = np.count_nonzero(u - excess / np.arange(1, v.size + 1) > 0)
    return np.maximum(v - excess[rank - 1] / rank, 0.0)


def gaussian(x: np.ndarray, y: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))


def witness_gradient(x, kxx, kxy, a, y, q, sigma):
    """grad f(x_i), f = sum_j a_j k(., x_j) - sum_l q_l k(., y_l): grad_x k = -k (x - y) / sigma^2,
    from the kernel matrices kxx = k(x, x), kxy = k(x, y)."""
    kxx, kxy = kxx * a, kxy * q
    return -(x * (kxx.sum(1) - kxy.sum(1))[:, None] - kxx @ x + kxy @ y) / sigma**2


def energy(kxx, kxy, a, q, target_term):
    """F = 1/2 MMD^2 = 1/2 (a K_xx a - 2 a K_xy q + q K_yy q)."""
    return max(0.5 * (a @ kxx @ a - 2 * a @ kxy @ q + target_term), 0.0)


def numpy_ift(x, a, y, q, sigma, tau, eta, steps):
    """The authors' IFT loop: x_i -= tau (n a_i / M) grad f(x_i); a = P(a - eta f(new x)); the
    energy of every iterate. One pair of kernel matrices per step."""
    mass, n, target_term = a.sum(), a.size, q @ gaussian(y, y, sigma) @ q
    kxx, kxy = gaussian(x, x, sigma), gaussian(x, y, sigma)
    energies = [energy(kxx, kxy, a, q, target_term)]
    for _ in range(steps):
        x = x - tau * (n * a / mass)[:, None] * witness_gradient(x, kxx, kxy, a, y, q, sigma)
        kxx, kxy = gaussian(x, x, sigma), gaussian(x, y, sigma)
        a = simplex_projection(a - eta * (kxx @ a - kxy @ q), mass)
        energies.append(energy(kxx, kxy, a, q, target_term))
    return x, a, np.array(energies)


def numpy_mmd_flow(x, a, y, q, sigma, tau, steps, noise, noise_steps, rng):
    """Arbel et al.'s flow: x_i -= tau grad f(x_i), with noise the witness of the perturbed
    particles at the perturbed particles for the first ``noise_steps`` steps; the energy of
    every iterate (a second pair of kernel matrices in the noisy steps)."""
    target_term = q @ gaussian(y, y, sigma) @ q
    kxx, kxy = gaussian(x, x, sigma), gaussian(x, y, sigma)
    energies = [energy(kxx, kxy, a, q, target_term)]
    for k in range(steps):
        if k < noise_steps:
            at = x + noise * rng.standard_normal(x.shape)
            x = x - tau * witness_gradient(at, gaussian(at, at, sigma), gaussian(at, y, sigma), a, y, q,
                                           sigma)
        else:
            x = x - tau * witness_gradient(x, kxx, kxy, a, y, q, sigma)
        kxx, kxy = gaussian(x, x, sigma), gaussian(x, y, sigma)
        energies.append(energy(kxx, kxy, a, q, target_term))
    return x, a, np.array(energies)


def library(F, mu0, scheme, steps):
    run = jk.solve(F, scheme.geometry, mu0, tau=scheme.tau, steps=steps, method=scheme.method,
                   progress=False)
    return run.final.points, run.final.weights, run.energies


def cases(steps: int):
    e = paper_2d("mixture", 100, 100, seed=0)
    x, a, y, q = e.initial.points, e.initial.weights, e.target.points, e.target.weights
    sigma, n, seed = e.kernel.sigma, e.initial.n, 7
    noise_steps = steps // 2

    def ift():
        return paper_scheme(e.kernel, 50.0, n, weight_lr=0.1)

    def mmd():
        return paper_scheme(e.kernel, 50.0, n, noise=10.0, noise_steps=noise_steps, seed=seed)

    def noise_rng():  # the stream of paper_scheme's noise (its first SeedSequence child)
        return np.random.default_rng(int(np.random.SeedSequence(seed).generate_state(2)[0]))

    s = ift()
    eta = s.tau * s.geometry.beta
    return {
        "IFT (paper loop)": (lambda: library(e.energy, e.initial, ift(), steps),
                             lambda: numpy_ift(x, a, y, q, sigma, s.tau, eta, steps)),
        "MMD flow + noise": (lambda: library(e.energy, e.initial, mmd(), steps),
                             lambda: numpy_mmd_flow(x, a, y, q, sigma, s.tau, steps, 10.0,
                                                    noise_steps, noise_rng())),
    }


def timed(run):
    """(CPU seconds of this process, wall seconds, run's result): on a shared machine the CPU
    time is the steadier measure (the other processes' load stretches the wall time)."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = run()
    return time.process_time() - cpu, time.perf_counter() - wall, out


def main(argv=None):
    warnings.simplefilter("ignore")  # the runs warn (clipping, dissipation): not timed here
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"2-D paper run, 100 particles, {args.steps} steps; library vs NumPy loop, interleaved, "
          f"{args.repeats} repeats (CPU seconds, median; wall ratio for reference)")
    print(f"{'case':20s} {'library':>9s} {'numpy':>9s} {'ratio':>7s} {'pairwise':>9s} {'wall':>6s} "
          f"{'max diff':>9s}  target <= {TARGET_RATIO}")
    verdicts = []
    for label, (ours, theirs) in cases(args.steps).items():
        ours(), theirs()  # warm-up
        cpu, wall, diff = {"ours": [], "theirs": []}, {"ours": [], "theirs": []}, 0.0
        for _ in range(args.repeats):
            results = {}
            for name, run in (("ours", ours), ("theirs", theirs)):
                seconds, elapsed, results[name] = timed(run)
                cpu[name].append(seconds)
                wall[name].append(elapsed)
            diff = max([diff] + [float(np.max(np.abs(p - r)))
                                 for p, r in zip(results["ours"], results["theirs"], strict=True)])
        assert diff <= AGREEMENT, f"{label}: library and NumPy loop differ by {diff:.3g}"
        mine, reference = np.median(cpu["ours"]), np.median(cpu["theirs"])
        ratio = mine / reference
        pairwise = float(np.median(np.array(cpu["ours"]) / np.array(cpu["theirs"])))
        wall_ratio = np.median(wall["ours"]) / np.median(wall["theirs"])
        met = ratio <= TARGET_RATIO
        verdicts.append(met)
        print(f"{label:20s} {mine:9.3f} {reference:9.3f} {ratio:7.2f} {pairwise:9.2f} {wall_ratio:6.2f} "
              f"{diff:9.1e}  {'met' if met else 'NOT met'}")
    return verdicts


if __name__ == "__main__":
    main()
