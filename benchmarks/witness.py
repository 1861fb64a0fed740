"""Benchmark of the blocked kernel sums: the witness gradient against its exponential floor.

The witness gradient of N particles x (weights a) against N target samples y (weights q),

    grad f(x_i) = sum_j a_j grad_1 k(x_i, x_j) - sum_l q_l grad_1 k(x_i, y_l)
                = (jk.MMD2(target, kernel).grad_first_variation(mu)),

needs 2 N^2 kernel values; with a Gaussian kernel each is one exponential. Two floors, both
on the true arguments -|x_i - y_j|^2 / (2 sigma^2) (precomputed for a band of rows and reused):

* numpy floor:   2 N^2 exponentials the plain NumPy way, ``np.exp(arguments)`` out of place on
                 blocks of ``kernels.BLOCK_ENTRIES`` (32 MB) -- the issue's floor;
* cache floor:   the same count in place on a cache-sized block, the fastest NumPy can do.

Side by side, in one process, interleaved, best of --repeats:

* witness:  the witness gradient (two ``Kernel.grad_sum`` calls);
* plain:    the comparator, the same gradient the plain blocked NumPy way (``plain_witness_gradient``);
* values:   the witness values (two ``Kernel.apply`` calls), for reference;
* peak:     the peak of Python-allocated memory during one witness gradient (tracemalloc,
            which sees NumPy's buffers), against the N x N x d array a naive version builds.

Target (issue "Particles", point 5): N = 10^4, d = 2: witness gradient at most 2x the numpy
floor, memory O(N * block) (never N x N x d). The ratio to the cache floor is reported too.

For wide points (N = 10^4, d = 100) the matrix products dominate. Two product floors, blocks of
1000 rows, single products timed alone:

* GEMM floor:      the distance products x x^T and x y^T (2 N^2 d multiply-adds);
* gradient floor:  what the witness gradient cannot do without: the same distance products,
                   the reductions K [w, w y] of both sums (another 2 N^2 (d + 1)) and the
                   2 N^2 exponentials in place (the cache floor).

The target is 1.5x the gradient floor; the ratio to the GEMM floor alone is printed too. (1.5x
the GEMM floor is out of reach for any witness gradient: its own reductions and exponentials
take about 1.5-2x the GEMM floor at d = 100.)

Run:  python benchmarks/witness.py [--n 10000] [--d 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc

import numpy as np

import jko_ift as jk
from jko_ift import kernels

TARGET_RATIO = 2.0
#: For wide points (issue: N = 10^4, d = 100) the products dominate: the witness gradient
#: against the products and exponentials it needs (``gradient floor``).
GEMM_TARGET_RATIO = 1.5


def exponent_band(x: np.ndarray, y: np.ndarray, sigma: float, rows: int) -> np.ndarray:
    """The true exponents -|x_i - y_j|^2 / (2 sigma^2) for the first ``rows`` particles."""
    return -kernels.squared_distances(x[:rows], y) / (2 * sigma**2)


def numpy_floor(arguments: np.ndarray, count: int) -> float:
    """Seconds for ``count`` exponentials out of place, one 32 MB block at a time."""
    rows = max(1, kernels.BLOCK_ENTRIES // arguments.shape[1])
    block = np.resize(arguments, (rows, arguments.shape[1]))
    done, start = 0, time.perf_counter()
    while done < count:
        np.exp(block)
        done += block.size
    return time.perf_counter() - start


def cache_floor(arguments: np.ndarray, count: int) -> float:
    """Seconds for ``count`` exponentials in place on a cache-sized block."""
    rows = max(1, kernels.SINGLE_THREAD_WORK // (arguments.shape[1] * 4))
    source = np.ascontiguousarray(arguments[:rows])
    out = np.empty_like(source)
    done, start = 0, time.perf_counter()
    while done < count:
        np.exp(source, out=out)
        done += source.size
    return time.perf_counter() - start


def gemm_floor(x: np.ndarray, y: np.ndarray, rows: int = 1000) -> float:
    """Seconds for the two products x x^T and x y^T in blocks of ``rows`` rows: the distance
    products of a witness gradient (2 N^2 d multiply-adds)."""
    start = time.perf_counter()
    for other in (x, y):
        for first in range(0, x.shape[0], rows):
            x[first:first + rows] @ other.T
    return time.perf_counter() - start


def plain_witness_gradient(x, a, y, q, sigma: float, rows: int = 1000) -> np.ndarray:
    """The witness gradient the plain blocked NumPy way (the comparator): squared distances as
    |x|^2 + |y|^2 - 2 x y^T per block of rows, k = exp(-s / (2 sigma^2)), and
    grad f(x_i) = -(1 / sigma^2) sum_j c_j k(x_i, z_j) (x_i - z_j) for z = [x; y], c = [a; -q]."""
    z, c = np.vstack([x, y]), np.concatenate([a, -q])
    z_sq = (z * z).sum(1)
    columns = np.hstack([c[:, None], c[:, None] * z])
    out = np.empty_like(x)
    for first in range(0, x.shape[0], rows):
        block = x[first:first + rows]
        s = (block * block).sum(1)[:, None] + z_sq[None, :] - 2.0 * block @ z.T
        sums = np.exp(-np.maximum(s, 0.0) / (2 * sigma**2)) @ columns
        out[first:first + rows] = -(block * sums[:, :1] - sums[:, 1:]) / sigma**2
    return out


def reduction_floor(x: np.ndarray, y: np.ndarray, rows: int = 1000) -> float:
    """Seconds for the two reductions K [w, w y] of a witness gradient, a (rows, N) block of
    kernel values against the (N, d + 1) columns at a time (2 N^2 (d + 1) multiply-adds)."""
    block = np.full((min(rows, x.shape[0]), x.shape[0]), 0.5)
    start = time.perf_counter()
    for other in (x, y):
        columns = np.hstack([np.ones((other.shape[0], 1)), other])
        for first in range(0, x.shape[0], rows):
            block[: min(rows, x.shape[0] - first)] @ columns
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=2)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    n, d = args.n, args.d
    rng = np.random.default_rng(0)
    particles = jk.Measure(rng.normal(size=(n, d)) + 1.0, np.full(n, 1.0 / n))
    target = jk.Measure(rng.normal(size=(n, d)), np.full(n, 1.0 / n))
    F = jk.MMD2(target, jk.Gaussian(args.sigma))

    arguments = exponent_band(particles.points, target.points, args.sigma, 64)
    floors, caches, witnesses, values, gemms, reductions, plains = [], [], [], [], [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        plain = plain_witness_gradient(particles.points, particles.weights, target.points,
                                       target.weights, args.sigma)
        plains.append(time.perf_counter() - start)
        gemms.append(gemm_floor(particles.points, target.points))
        reductions.append(reduction_floor(particles.points, target.points))
        floors.append(numpy_floor(arguments, 2 * n * n))
        caches.append(cache_floor(arguments, 2 * n * n))
        start = time.perf_counter()
        gradient = F.grad_first_variation(particles)
        witnesses.append(time.perf_counter() - start)
        start = time.perf_counter()
        F.first_variation(particles)
        values.append(time.perf_counter() - start)

    tracemalloc.start()
    F.grad_first_variation(particles)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    # correctness spot check against the dense formula on a few rows
    rows = slice(0, 50)
    dense = (np.einsum("ijk,j->ik", F.kernel.gradient(particles.points[rows], particles.points),
                       particles.weights)
             - np.einsum("ijk,j->ik", F.kernel.gradient(particles.points[rows], target.points),
                         target.weights))
    error = float(np.abs(dense - gradient[rows]).max() / np.abs(dense).max())
    plain_error = float(np.abs(plain - gradient).max() / np.abs(gradient).max())

    floor, cache, witness, value = min(floors), min(caches), min(witnesses), min(values)
    naive = n * n * d * 8
    ratio = witness / floor
    print(f"python {platform.python_version()}, numpy {np.__version__}, "
          f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}, "
          f"N = {n}, d = {d}, sigma = {args.sigma:g}, best of {args.repeats}")
    print(f"{'quantity':<46} {'time [s]':>9} {'x numpy floor':>14} {'x cache floor':>14}")
    print("-" * 86)
    for label, seconds in [("numpy floor: 2 N^2 np.exp, out of place", floor),
                           ("cache floor: 2 N^2 np.exp, in place, in cache", cache),
                           ("witness gradient (2 grad_sum)", witness),
                           ("plain blocked NumPy witness gradient", min(plains)),
                           ("witness values (2 apply)", value)]:
        print(f"{label:<46} {seconds:>9.3f} {seconds / floor:>14.2f} {seconds / cache:>14.2f}")
    print(f"peak memory of the witness gradient: {peak / 2**20:.1f} MiB "
          f"(N x N x d array: {naive / 2**20:.0f} MiB; N x N: {n * n * 8 / 2**20:.0f} MiB)")
    print(f"max relative error against the dense formula (50 rows): {error:.1e}; the plain NumPy "
          f"gradient differs by {plain_error:.1e}; library / plain NumPy: {witness / min(plains):.2f}x")
    gemm = min(gemms)
    needed = gemm + min(reductions) + cache
    print(f"GEMM floor (x x^T and x y^T in blocks of 1000 rows): {gemm:.3f} s; witness gradient "
          f"{witness / gemm:.2f}x it")
    print(f"gradient floor (those products, the reductions K [w, w y]: {min(reductions):.3f} s, "
          f"and 2 N^2 exponentials in place: {cache:.3f} s): {needed:.3f} s; witness gradient "
          f"{witness / needed:.2f}x it (target: <= {GEMM_TARGET_RATIO:g}x: "
          f"{'met' if witness / needed <= GEMM_TARGET_RATIO else 'not met'})")
    # O(N block): one block of kernel values plus a few (N, d + 2) arrays (points centred and
    # lifted, the sums, the result), never anything of N x N entries
    first = next(kernels._sum_blocks(n, n, d))
    bound = (first.stop - first.start) * n * 8 + 12 * n * (d + 2) * 8
    blocked = peak <= bound
    ok = ratio <= TARGET_RATIO and blocked
    print(f"target: witness <= {TARGET_RATIO:g}x numpy floor: "
          f"{'yes' if ratio <= TARGET_RATIO else 'NO'} ({ratio:.2f}x; {witness / cache:.2f}x the "
          f"cache floor); memory O(N block): {'yes' if blocked else 'NO'} (peak {peak / 2**20:.1f} "
          f"MiB, bound {bound / 2**20:.1f} MiB: one block of {first.stop - first.start} rows and "
          "12 (N, d + 2) arrays)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"n": n, "d": d, "numpy_floor": floors, "cache_floor": caches,
                       "witness": witnesses, "values": values, "gemm_floor": gemms,
                       "reduction_floor": reductions, "plain_numpy": plains,
                       "peak_bytes": peak, "relative_error": error}, handle, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
