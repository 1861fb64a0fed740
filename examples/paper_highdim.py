"""The high-dimensional experiment of Gladin et al. (2024), scaled to a CPU.

    python examples/paper_highdim.py [--dim D] [--particles N] [--steps K] [--seeds S] [--out DIR]
                                     [--full] [--device cpu|cuda] [--dtype float64|float32]

Particles from N(0, I_d) (uniform weights), the same number of target samples from the
equal-weight mixture of three Gaussians with means of norm 20 in random directions and
covariances diag(U[0.5, 5]) + P P^T, P of size d x 10 with U[0, 1] entries (the mixture is fixed
by --mixture-seed; --seed draws particles and samples); F = 1/2 MMD^2 with the kernel
exp(-|x - y|^2/200) = jk.Gaussian(10). As in the authors' code, every iteration draws fresh
target samples (as many as particles) for the update, and the MMD is measured on fixed test
samples (--fixed-target: use the test samples for the update too). Schemes, all from
jko_ift.problems.paper_scheme (the authors' loop in the library's units): the MMD flow, the MMD
flow with noise level 2 for the first 4/9 of the steps (the paper: 4000 of 9000), IFT with the
projected-gradient weight step, and IFT with the KL weight step (multiplicative update, then
the Euclidean projection onto the simplex).

Step sizes. The paper: lr = 10^4 with N = 10^4 particles, lr_w = 10^-3 (MMD) or 1 (KL). Their
code moves particle i by 2 lr w_i grad f, i.e. the W2 step tau = 2 lr / N = 2, and changes the
weights by -2 lr_w f, i.e. tau beta = 2 lr_w (paper_scheme). With fewer particles the same step
per particle needs lr = 10^4 N / 10^4 (tau = 2 whatever N), and the same relative weight
change 2 lr_w f / w_i = 2 lr_w N f needs lr_w = 10^-3 * 10^4 / N (the KL update is relative
already: lr_w = 1). These are the defaults; --lr and --weight-lr override them. (Before, this
script used a W2 step of 100 with fixed samples: 50 times the paper's.)

The paper's scale (d = 100, N = 10^4, 9000 steps, 20 seeds) is a GPU computation; the default
here is d = 20, N = 200, 900 steps, 2 seeds (about five minutes on two shared cores). Writes
mmd_highdim.png and summary_highdim.txt; a default run also copies the figure to
docs/figures/paper_highdim_mmd.png.

--full sets the paper's scale (d = 100, N = 10^4, 9000 steps, 20 seeds); --device runs the
kernel sums -- all but O(N d) of each step -- with PyTorch on that device (jko_ift.backends,
extra [torch]; blocks sized to the GPU's free memory), --dtype float32 in single precision.
``python examples/paper_highdim.py --full --device cuda`` is the paper's experiment: 20 seeds x
4 schemes x 9000 steps, each step about six kernel sums of 10^4 x 10^4 pairs in d = 100.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

from jko_ift.energies import MMD2
from jko_ift.plotting import plot_seed_curves
from jko_ift.problems import paper_highdim, paper_scheme
from jko_ift.studies import run_over_seeds

#: The paper's run: particles, position lr, weight lr (MMD and KL branches), noise level.
PAPER_PARTICLES, PAPER_LR, PAPER_WEIGHT_LR, PAPER_KL_WEIGHT_LR, NOISE = 10_000, 1e4, 1e-3, 1.0, 2.0
DEFAULTS = {"dim": 20, "particles": 200, "steps": 900, "seeds": 2}
#: --full: the paper's scale.
FULL = {"dim": 100, "particles": PAPER_PARTICLES, "steps": 9000, "seeds": 20}
DOCS_FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "paper_highdim_mmd.png"


def scaled_steps(particles: int) -> tuple[float, float]:
    """(lr, lr_w) that give N particles the paper's steps: tau = 2 and 2 lr_w N = 20."""
    return PAPER_LR * particles / PAPER_PARTICLES, PAPER_WEIGHT_LR * PAPER_PARTICLES / particles


def main(dim: int = DEFAULTS["dim"], particles: int = DEFAULTS["particles"],
         steps: int = DEFAULTS["steps"], seeds: int = DEFAULTS["seeds"], out="paper_highdim_out",
         lr: float | None = None, weight_lr: float | None = None, mixture_seed: int = 0,
         fresh_target: bool = True, docs: bool = False, device: str | None = None,
         dtype: str = "float64") -> dict:
    if device is not None:  # a device that is not there fails now, not after the first draws
        from jko_ift.backends import Backend

        Backend(device, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    noise_steps = (4 * steps) // 9
    default_lr, default_weight_lr = scaled_steps(particles)
    lr = default_lr if lr is None else lr
    weight_lr = default_weight_lr if weight_lr is None else weight_lr

    def experiment(seed):
        e = paper_highdim(dim, particles, seed=seed, mixture_seed=mixture_seed)
        return e if device is None else on_device(e, device, dtype)

    def scheme(e, s, **options):
        return paper_scheme(e.kernel, lr, e.initial.n, mass=e.initial.mass, seed=2000 + s,
                            fresh_target=e.sample_target if fresh_target else None, **options)

    schemes = {
        "MMD flow": lambda e, s: scheme(e, s),
        f"MMD flow + noise {NOISE:g} (off at {noise_steps})": lambda e, s: scheme(
            e, s, noise=NOISE, noise_steps=noise_steps),
        "IFT": lambda e, s: scheme(e, s, weight_lr=weight_lr),
        "IFT, KL weight step": lambda e, s: scheme(e, s, weight_lr=PAPER_KL_WEIGHT_LR,
                                                   weight_update="kl"),
    }
    start = time.perf_counter()
    runs = {label: run_over_seeds(label, experiment, make, range(seeds), steps)
            for label, make in schemes.items()}
    sample = schemes["IFT"](experiment(0), 0)
    figure = plot_seed_curves({f"d = {dim}, N = {particles}, {seeds} seeds, tau = {sample.tau:g}":
                               {k: r.mmd for k, r in runs.items()}},
                              out / "mmd_highdim.png", ylabel="MMD$(\\mu^k, \\pi)$ (test samples)",
                              log_x=True)
    lines = [f"high-dim: d = {dim}, N = {particles}, {steps} steps, {seeds} seeds, "
             f"{'fresh' if fresh_target else 'fixed'} target samples; lr = {lr:g}, lr_w = {weight_lr:g} "
             f"(KL: {PAPER_KL_WEIGHT_LR:g}): tau = {sample.tau:g}, tau beta = "
             f"{sample.tau * sample.geometry.beta:g}; kernel sums on "
             f"{'NumPy' if device is None else f'PyTorch {device} {dtype}'}",
             f"{'scheme':32s} {'MMD at 1/9 of the run':>22s} {'final MMD':>22s} {'s/run':>7s} failed"]
    early = steps // 9
    for label, r in runs.items():
        lines.append(f"{label:32s} {r.mean[early]:.3e} +- {r.sd[early]:.1e} {r.mean[-1]:.3e} +- "
                     f"{r.sd[-1]:.1e} {r.seconds.mean():7.1f} {r.failed}")
    lines.append(f"total {time.perf_counter() - start:.1f} s")
    (out / "summary_highdim.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if docs:
        shutil.copyfile(figure, DOCS_FIGURE)
    return {**runs, "figures": [figure]}


def on_device(experiment, device: str, dtype: str):
    """The experiment with its kernel's sums on PyTorch ``device`` (F's witness, the fresh
    targets' energies and the weight steps all sum this kernel)."""
    from jko_ift.backends import on_device as kernel_on_device

    kernel = kernel_on_device(experiment.kernel, device, dtype)
    return dataclasses.replace(experiment, kernel=kernel, energy=MMD2(experiment.target, kernel))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=DEFAULTS["dim"], help="paper: 100")
    parser.add_argument("--particles", type=int, default=DEFAULTS["particles"], help="paper: 10^4")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="paper: 9000")
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="paper: 20")
    parser.add_argument("--lr", type=float, default=None,
                        help="the authors' position lr (default: 10^4 N / 10^4, i.e. tau = 2)")
    parser.add_argument("--weight-lr", type=float, default=None,
                        help="the authors' MMD weight lr (default: 10^-3 * 10^4 / N)")
    parser.add_argument("--mixture-seed", type=int, default=0)
    parser.add_argument("--fixed-target", action="store_true",
                        help="update with the fixed test samples instead of fresh ones")
    parser.add_argument("--full", action="store_true",
                        help="the paper's scale: d = 100, N = 10^4, 9000 steps, 20 seeds (a GPU run)")
    parser.add_argument("--device", default=None,
                        help="run the kernel sums with PyTorch on this device (cpu, cuda); default NumPy")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--out", default="paper_highdim_out")
    parser.add_argument("--no-docs", action="store_true",
                        help="do not copy the figure of a default run to docs/figures/")
    args = parser.parse_args()
    if args.full:
        vars(args).update(FULL)
    default = (all(getattr(args, name) == value for name, value in DEFAULTS.items())
               and args.lr is None and args.weight_lr is None and args.mixture_seed == 0
               and not args.fixed_target and args.device is None)
    main(args.dim, args.particles, args.steps, args.seeds, args.out, args.lr, args.weight_lr,
         args.mixture_seed, not args.fixed_target, docs=default and not args.no_docs,
         device=args.device, dtype=args.dtype)
