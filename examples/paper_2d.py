"""The 2-D experiments of Gladin et al., "Interaction-Force Transport Gradient Flows" (2024).

    python examples/paper_2d.py [--target gaussian|mixture|both] [--seeds K] [--steps N] [--out DIR]

Initial particles N((5, 5), I), 100 particles and 100 target samples (uniform weights), F = 1/2
MMD^2 with the Gaussian kernel exp(-|x - y|^2 / (2 * 10^2)) (jk.Gaussian(10): "bandwidth 10" read
as sigma = 10, the convention of the authors' code, whose high-dimensional kernel
exp(-|x - y|^2/200) is the same sigma). Schemes:

* MMD flow (Arbel et al. 2019): ExplicitEuler in W2, position step tau = 50;
* MMD flow with noise injection: the same with noise level 10 for the first 3000 steps (the
  witness gradient evaluated at x_i + 10 u_i, Arbel et al.'s variant);
* IFT: the paper's particle algorithm, ift_particle_method() = an explicit W2 step with
  position step 50, then the exact MMD weight step (QP on the simplex) with weight step 0.1:
  jk.IFT(kernel, alpha=50, beta=0.1, conserve_mass=True), tau = 1.

Writes mmd_<target>.png (mean and spread of MMD(mu^k, target samples) over seeds, log scale),
particles_<target>.png (snapshots of the first seed, marker area ~ weight) and
summary_<target>.txt to --out; a default run also copies the figures to docs/figures/.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

import jko_ift as jk
from jko_ift.methods.splitting import ift_particle_method
from jko_ift.plotting import plot_particle_snapshots, plot_seed_curves
from jko_ift.problems import paper_2d, run_over_seeds

DEFAULTS = {"seeds": 5, "steps": 6000}
POSITION_STEP, WEIGHT_STEP, NOISE, NOISE_STEPS = 50.0, 0.1, 10.0, 3000
DOCS_FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def schemes(steps: int) -> dict:
    """label -> make_scheme(experiment, seed) -> (method, geometry, tau)."""
    noise_steps = min(NOISE_STEPS, steps // 2) if steps < 2 * NOISE_STEPS else NOISE_STEPS
    return {
        "MMD flow": lambda e, s: (jk.ExplicitEuler(), jk.Wasserstein(), POSITION_STEP),
        f"MMD flow + noise (off at {noise_steps})": lambda e, s: (
            jk.ExplicitEuler(noise=NOISE, noise_steps=noise_steps, seed=1000 + s),
            jk.Wasserstein(), POSITION_STEP),
        "IFT": lambda e, s: (
            ift_particle_method(), jk.IFT(e.kernel, POSITION_STEP, WEIGHT_STEP,
                                          conserve_mass=True), 1.0),
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
        out / f"mmd_{target}.png", ylabel="MMD$(\\mu^k, \\pi)$ (samples)")
    snaps = plot_particle_snapshots({k: r.snapshots for k, r in runs.items()}, experiment.target,
                                    out / f"particles_{target}.png",
                                    title=f"2-D {target} target, seed 0 (marker area ~ weight)")
    lines = [f"2-D {target}: {seeds} seeds, {steps} steps, {particles} particles, {samples} samples",
             f"{'scheme':45s} {'MMD@1000':>20s} {'final MMD':>22s} {'s/run':>7s}"]
    for label, r in runs.items():
        at = min(1000, steps)
        lines.append(f"{label:45s} {r.mean[at]:.3e} +- {r.sd[at]:.1e} "
                     f"{r.mean[-1]:.3e} +- {r.sd[-1]:.1e}  {r.seconds.mean():6.1f}")
    noisy = [r for k, r in runs.items() if "noise" in k][0]
    ift = runs["IFT"]
    reach = np.nonzero(ift.mean <= noisy.mean[-1])[0]
    lines.append("first step at which IFT's mean MMD <= the noisy MMD flow's final mean: "
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
