"""The 2-D experiments of Gladin et al., "Interaction-Force Transport Gradient Flows" (2024).

    python examples/paper_2d.py [--target gaussian|mixture|both] [--seeds K] [--steps N] [--out DIR]

Initial particles N((5, 5), I), 100 particles and 100 target samples (uniform weights), F = 1/2
MMD^2 with the Gaussian kernel exp(-|x - y|^2 / (2 * 10^2)) (jk.Gaussian(10): "bandwidth 10" read
as sigma = 10, the convention of the authors' code, whose high-dimensional kernel
exp(-|x - y|^2/200) is the same sigma). Schemes:

* MMD flow (Arbel et al. 2019), the authors' baseline;
* MMD flow with noise injection: noise level 10 for the first 3000 steps (the authors' code
  evaluates the witness gradient of the perturbed particles x_i + 10 u_i);
* IFT: the authors' loop (explicit position step, then one projected-gradient step of the
  weights on the new positions, Euclidean projection onto the simplex);
* IFT, exact weight step: the authors' loop with the MMD weight step solved exactly (the QP on
  the simplex), same step sizes;
* WFR: the same position step, then the authors' KL weight step (multiplicative, projected onto
  the simplex, lr_w = 1, as in their 100-D experiment and ``jko-ift demo``).

All four come from jko_ift.problems.paper_scheme with the paper's position step lr = 50 and
weight step lr_w = 0.1, which in the library's units is tau = 2 lr / n = 1 (the W2 step,
alpha = 1) and tau beta = 2 lr_w = 0.2: the authors' code differentiates MMD^2 = 2F and moves
particle i by 2 lr w_i grad f. (Before, this script ran alpha = 50, beta = 0.1: 50 times the
paper's position step.) The target samples are fixed (the 2-D runs are not in the authors'
published code; their 100-D runs redraw them, see paper_highdim.py).

Writes mmd_<target>.png (mean and spread of MMD(mu^k, target samples) over seeds, log scales),
particles_<target>.png (snapshots of the first seed, marker area ~ weight) and
summary_<target>.txt to --out; a default run also copies the figures to docs/figures/.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from jko_ift.plotting import plot_particle_snapshots, plot_seed_curves
from jko_ift.problems import paper_2d, paper_scheme
from jko_ift.studies import run_over_seeds

#: The paper: 50 seeds. Three keep a 2-D run (both targets, four schemes) near ten minutes
#: on two shared cores.
DEFAULTS = {"seeds": 3, "steps": 6000}
#: The paper's position and weight steps (their lr and lr_), noise level and noise steps.
POSITION_LR, WEIGHT_LR, NOISE, NOISE_STEPS = 50.0, 0.1, 10.0, 3000
#: The KL weight step of WFR (the authors' lr_ of their KL branch; jko-ift demo's too).
WFR_WEIGHT_LR = 1.0
DOCS_FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def schemes(steps: int) -> dict:
    """label -> make_scheme(experiment, seed) -> PaperScheme (method, geometry, tau)."""
    noise_steps = min(NOISE_STEPS, steps // 2) if steps < 2 * NOISE_STEPS else NOISE_STEPS

    def scheme(e, **options):
        return paper_scheme(e.kernel, POSITION_LR, e.initial.n, mass=e.initial.mass, **options)

    return {
        "MMD flow": lambda e, s: scheme(e),
        f"MMD flow + noise (off at {noise_steps})": lambda e, s: scheme(
            e, noise=NOISE, noise_steps=noise_steps, seed=1000 + s),
        "IFT": lambda e, s: scheme(e, weight_lr=WEIGHT_LR),
        "IFT, exact weight step": lambda e, s: scheme(e, weight_lr=WEIGHT_LR, exact_weight_step=True),
        "WFR": lambda e, s: scheme(e, weight_lr=WFR_WEIGHT_LR, weight_update="kl"),
    }


def snapshot_steps(steps: int) -> list[int]:
    return sorted({0, min(100, steps), min(1000, steps), steps})


def run_target(target: str, seeds: int, steps: int, out: Path, particles: int = 100,
               samples: int = 100) -> dict:
    """Run the three schemes on one target; write the figures and a summary; return
    {label: SeedRuns} plus the figure paths under "figures"."""
    runs = {}
    for label, make in schemes(steps).items():
        runs[label] = run_over_seeds(
            label, lambda seed: paper_2d(target, particles, samples, seed=seed), make,
            range(seeds), steps, snapshot_steps(steps))
    experiment = paper_2d(target, particles, samples, seed=0)
    curves = plot_seed_curves(
        {f"2-D, {target} target, {seeds} seeds": {k: r.mmd for k, r in runs.items()}},
        out / f"mmd_{target}.png", ylabel="MMD$(\\mu^k, \\pi)$ (samples)", log_x=True)
    snaps = plot_particle_snapshots({k: r.snapshots for k, r in runs.items()}, experiment.target,
                                    out / f"particles_{target}.png",
                                    title=f"2-D {target} target, seed 0 (marker area ~ weight)")
    scheme = schemes(steps)["IFT"](experiment, 0)
    lines = [f"2-D {target}: {seeds} seeds, {steps} steps, {particles} particles, {samples} samples; "
             f"lr = {POSITION_LR:g}, lr_w = {WEIGHT_LR:g}: tau = {scheme.tau:g}, "
             f"tau beta = {scheme.tau * scheme.geometry.beta:g}",
             f"{'scheme':45s} {'MMD@1000':>20s} {'final MMD':>22s} {'s/run':>7s}"]
    for label, r in runs.items():
        at = min(1000, steps)
        lines.append(f"{label:45s} {r.mean[at]:.3e} +- {r.sd[at]:.1e} "
                     f"{r.mean[-1]:.3e} +- {r.sd[-1]:.1e}  {r.seconds.mean():6.1f}")
    noisy = [r for k, r in runs.items() if "noise" in k][0]
    for label in ("IFT", "IFT, exact weight step"):
        reach = np.nonzero(runs[label].mean <= noisy.mean[-1])[0]
        lines.append(f"first step at which {label}'s mean MMD <= the noisy MMD flow's final mean: "
                     + (str(int(reach[0])) if reach.size else "never"))
    (out / f"summary_{target}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {**runs, "figures": [curves, snaps]}


def main(target: str = "both", seeds: int = DEFAULTS["seeds"], steps: int = DEFAULTS["steps"],
         out="paper_2d_out", docs: bool = False, particles: int = 100, samples: int = 100) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in (("gaussian", "mixture") if target == "both" else (target,)):
        start = time.perf_counter()
        results[name] = run_target(name, seeds, steps, out, particles, samples)
        print(f"{name}: {time.perf_counter() - start:.1f} s")
        if docs:
            DOCS_FIGURES.mkdir(parents=True, exist_ok=True)
            for figure in results[name]["figures"]:
                shutil.copyfile(figure, DOCS_FIGURES / f"paper_2d_{figure.name}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("gaussian", "mixture", "both"), default="both")
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="paper: 50")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--out", default="paper_2d_out")
    parser.add_argument("--no-docs", action="store_true",
                        help="do not copy the figures of a default run to docs/figures/")
    args = parser.parse_args()
    default = args.seeds == DEFAULTS["seeds"] and args.steps == DEFAULTS["steps"]
    main(args.target, args.seeds, args.steps, args.out, docs=default and not args.no_docs)
