"""Benchmark of the array backends: the witness gradient and one step of the paper's scheme on
NumPy, PyTorch CPU and (where present) PyTorch CUDA, side by side in one run.

For N particles x (uniform weights) against N target samples y in dimension d, with the paper's
kernel jk.Gaussian(10) (exp(-|x - y|^2 / 200)):

* witness:  grad f(x_i) = sum_j a_j grad k(x_i, x_j) - sum_l q_l grad k(x_i, y_l)
            (``jk.MMD2(target, kernel).grad_first_variation(mu)``: two blocked ``grad_sum``);
* step:     one step of ``problems.paper_scheme(kernel, lr, N, weight_lr)`` (IFT: explicit
            transport, then the projected-gradient weight step; the energy after it included);
* floor:    the matrix products the witness gradient cannot do without, on the same device and
            dtype, in the same row blocks: for each of its two sums the distance product
            [x, |x|^2, 1] [-2 y, 1, |y|^2]^T (N^2 (d + 2) multiply-adds) and the reduction
            K [w, w y] (N^2 (d + 1));
* dense:    the comparator for torch: the authors' formula (their code builds the MMD^2 of
            KeOps LazyTensors and differentiates it) in plain PyTorch, the N x N Gram matrices
            dense and the gradient by autograd; only where they fit (DENSE_SHARE of the GPU's
            free memory, DENSE_CPU_MAX points on CPU), else "-".

Backends: ``numpy`` (the NumPy path of kernels.py), ``torch-cpu`` and ``torch-cuda``
(``jko_ift.backends.on_device(kernel, device, dtype, keops=False)``), and where pykeops is
installed ``keops-cpu`` and ``keops-cuda`` (``keops=True``: the witness's two sums by KeOps
reductions, the authors' formula), each in float64 and float32. Every row is the median of
--repeats, the backends interleaved. One BLAS / torch / OpenMP thread on CPU
(OPENBLAS_NUM_THREADS=1, OMP_NUM_THREADS=1, torch.set_num_threads(1)): the same cores for all.

Target (d = 100, where the products dominate): the witness gradient at most TARGET_RATIO times
its floor on each backend; the torch-cpu / numpy ratio is printed (no target: the NumPy path has
refinements the generic path does not, the k-d tree of near pairs and kept small matrices).

Run:  python benchmarks/backends.py [--sizes 1000 10000] [--dims 2 100] [--large] [--repeats 3]
      [--backends torch-cpu keops-cpu ...]
      (--large adds N = 10^5: minutes per row on a CPU)
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

import jko_ift as jk  # noqa: E402
from jko_ift import backends, keops, problems  # noqa: E402

#: Witness gradient / floor at d = 100 (issue 15's benchmark: "against the GEMM floor").
TARGET_RATIO = 2.0
#: The dense comparator's Gram matrices may take this share of a GPU's free memory; on CPU it
#: runs up to DENSE_CPU_MAX points (an N x N float64 matrix of 10^4 points is 800 MB).
DENSE_SHARE, DENSE_CPU_MAX = 0.5, 2000
#: The paper's kernel and steps at N = 10^4: tau = 2 lr / N = 2, tau beta = 2 lr_w.
BANDWIDTH, LR_PER_PARTICLE, WEIGHT_LR = 10.0, 1.0, 1e-3


def available_backends() -> dict:
    """name -> kernel factory (None: the NumPy kernel)."""
    found = {"numpy": None}
    try:
        import torch
    except ImportError:
        return found
    torch.set_num_threads(1)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        found[f"torch-{device}"] = (device, "float64", False)
        found[f"torch-{device}-f32"] = (device, "float32", False)
    if keops.installed():  # KeOps's reductions (jko_ift.keops): compiled once per formula
        for device in devices:
            found[f"keops-{device}"] = (device, "float64", True)
            found[f"keops-{device}-f32"] = (device, "float32", True)
    return found


def kernel_for(spec):
    kernel = jk.Gaussian(BANDWIDTH)
    return kernel if spec is None else backends.on_device(kernel, *spec)


def synchronize(spec) -> None:
    if spec is not None and spec[0].startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(spec, run) -> float:
    synchronize(spec)
    start = time.perf_counter()
    run()
    synchronize(spec)
    return time.perf_counter() - start


def floor_run(spec, x, y, w):
    """The witness gradient's matrix products alone, blocked as the sums block them."""
    if spec is None:
        xp, lift = np, (lambda a: np.asarray(a))
        rows = max(1, backends.BLOCK_ENTRIES // y.shape[0])
    else:
        import torch

        backend = backends.Backend(*spec)
        xp, lift = torch, backend.asarray
        rows = backends.block_rows(lift(x[:1]), y.shape[0])
    n, d = x.shape
    lifted_x = lift(np.hstack([x, (x * x).sum(1)[:, None], np.ones((n, 1))]))
    lifted_y = lift(np.vstack([-2 * y.T, np.ones((1, y.shape[0])), (y * y).sum(1)[None]]))
    columns = lift(np.hstack([w[:, None], w[:, None] * y]))

    def run():
        for _ in range(2):  # the two sums: over the particles and over the target
            for start in range(0, n, rows):
                xp.matmul(xp.matmul(lifted_x[start:start + rows], lifted_y), columns)
    return run


def dense_run(spec, x, y, w):
    """The witness gradient the authors' way in plain PyTorch: d/dx of
    MMD^2 / 2 = (w K_xx w - 2 w K_xy q + const) / 2 (dense Gram matrices, autograd); None where
    the matrices do not fit."""
    if spec is None:
        return None
    import torch

    backend = backends.Backend(*spec)
    n = x.shape[0]
    itemsize = 4 if spec[1] == "float32" else 8
    if spec[0].startswith("cuda"):
        if 3 * n * n * itemsize > DENSE_SHARE * torch.cuda.mem_get_info()[0]:
            return None
    elif n > DENSE_CPU_MAX:
        return None
    tx, ty, tw = backend.asarray(x), backend.asarray(y), backend.asarray(w)
    rate = 0.5 / BANDWIDTH**2

    def run():
        z = tx.clone().requires_grad_(True)
        own = torch.exp(-rate * torch.cdist(z, z) ** 2) @ tw
        cross = torch.exp(-rate * torch.cdist(z, ty) ** 2) @ tw
        (0.5 * (tw @ own) - tw @ cross).backward()
        return z.grad / tw[:, None]  # d/dx_i of the loss is w_i grad f(x_i)
    return run


def quiet(run, *args, **options):
    """run(*args, **options) without the step's warnings (weights clipped at zero: one step of
    IFT at the paper's weight step on these random points)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(*args, **options)


def cases(n: int, d: int, spec):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d)) + 1.0
    mu, target = jk.Measure(x, np.full(n, 1.0 / n)), jk.Measure(y, np.full(n, 1.0 / n))
    kernel = kernel_for(spec)
    F = jk.MMD2(target, kernel)
    scheme = problems.paper_scheme(kernel, lr=LR_PER_PARTICLE * n, n_particles=n, weight_lr=WEIGHT_LR)
    return {"witness": lambda: F.grad_first_variation(mu),
            "step": lambda: quiet(scheme.method.step, F, scheme.geometry, mu, scheme.tau, throw=False),
            "floor": floor_run(spec, x, y, np.full(n, 1.0 / n)),
            "dense": dense_run(spec, x, y, np.full(n, 1.0 / n))}


def bench(n: int, d: int, specs: dict, repeats: int) -> dict:
    """median seconds[(backend, what)], the backends interleaved in every repeat."""
    runs = {name: cases(n, d, spec) for name, spec in specs.items()}
    for name, spec in specs.items():  # warm-up: uploads, caches, lazy imports
        timed(spec, runs[name]["witness"])
    times: dict = {}
    for _ in range(repeats):
        for name, spec in specs.items():
            for what, run in runs[name].items():
                if run is not None:
                    times.setdefault((name, what), []).append(timed(spec, run))
    return {key: statistics.median(values) for key, values in times.items()}


def report(n: int, d: int, specs: dict, times: dict) -> list[str]:
    lines = []
    numpy_witness, numpy_step = times[("numpy", "witness")], times[("numpy", "step")]
    for name in specs:
        witness, step, floor = (times[(name, w)] for w in ("witness", "step", "floor"))
        dense = f"{times[(name, 'dense')] * 1e3:10.1f}" if (name, "dense") in times else f"{'-':>10s}"
        ratio = witness / floor
        verdict = ("met" if ratio <= TARGET_RATIO else "not met") if d >= 100 else "-"
        lines.append(f"{n:>7d} {d:>4d} {name:>15s} {witness * 1e3:11.1f} {floor * 1e3:10.1f} "
                     f"{ratio:6.2f} {verdict:>8s} {dense} {step * 1e3:11.1f} {witness / numpy_witness:8.2f} "
                     f"{step / numpy_step:8.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 100])
    parser.add_argument("--large", action="store_true", help="add N = 10^5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="only these (torch-cpu, torch-cpu-f32, keops-cpu, ...; numpy always runs)")
    args = parser.parse_args()
    sizes = args.sizes + ([100_000] if args.large else [])
    specs = available_backends()
    if args.backends:
        specs = {name: spec for name, spec in specs.items() if name == "numpy" or name in args.backends}
    print(f"{platform.processor() or platform.machine()}, backends: {', '.join(specs)}; one thread on CPU; "
          f"median of {args.repeats}; target at d = 100: witness <= {TARGET_RATIO:g} x floor")
    print(f"{'N':>7s} {'d':>4s} {'backend':>15s} {'witness ms':>11s} {'floor ms':>10s} {'ratio':>6s} "
          f"{'target':>8s} {'dense ms':>10s} {'step ms':>11s} {'w/numpy':>8s} {'s/numpy':>8s}")
    for n in sizes:
        for d in args.dims:
            print("\n".join(report(n, d, specs, bench(n, d, specs, args.repeats))), flush=True)


if __name__ == "__main__":
    main()
