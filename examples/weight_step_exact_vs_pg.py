"""What the exact weight step changes against the paper code's single projected-gradient step.

    python examples/weight_step_exact_vs_pg.py [--target mixture|gaussian] [--seeds K] [--steps N] [--out DIR]

The 2-D setup of examples/paper_2d.py (100 particles from N((5, 5), I), 100 target samples,
jk.Gaussian(10), the paper's position step lr = 50 and weight step lr_w = 0.1, mapped by
jko_ift.problems.paper_scheme: tau = 2 lr / n = 1, tau beta = 2 lr_w = 0.2) and three versions
of the IFT particle algorithm (docs/particles.md §3, §5):

* "exact": the explicit W2 step, then the exact MMD weight step (the QP on the simplex);
* "projected gradient": the same with the weight update b = P_simplex(a - eta f) (one projected
  gradient step on that QP, started at a);
* "authors' code": projected gradient and the Euclidean position velocity (n a_i grad f(x_i)).

Writes weight_step.png (MMD over seeds, and how many particles of the first seed carry mass),
weight_step_particles.png (snapshots, marker area ~ weight) and summary_weight_step.txt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jko_ift.methods.splitting import ift_particle_method
from jko_ift.plotting import plot_particle_snapshots, plot_seed_curves
from jko_ift.problems import paper_2d, paper_scheme
from jko_ift.studies import run_over_seeds

POSITION_LR, WEIGHT_LR = 50.0, 0.1  # the paper's steps (their lr and lr_)

VARIANTS = {
    "exact weight step": ("exact", "wasserstein"),
    "projected gradient": ("projected_gradient", "wasserstein"),
    "authors' code (PG + euclidean velocity)": ("projected_gradient", "euclidean"),
}


def main(target: str = "mixture", seeds: int = 3, steps: int = 2000, out="weight_step_out",
         particles: int = 100, samples: int = 100) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for label, (weight_step, velocity) in VARIANTS.items():
        def scheme(e, s, weight_step=weight_step, velocity=velocity):
            mapped = paper_scheme(e.kernel, POSITION_LR, e.initial.n, WEIGHT_LR, mass=e.initial.mass)
            return ift_particle_method(weight_step, velocity), mapped.geometry, mapped.tau
        runs[label] = run_over_seeds(label, lambda s: paper_2d(target, particles, samples, seed=s),
                                     scheme, range(seeds), steps, range(steps + 1))
    threshold = 1e-3 / particles
    support = {label: np.array([np.count_nonzero(r.snapshots[k].weights > threshold)
                                for k in range(steps + 1)]) for label, r in runs.items()}
    mmd_panel = f"MMD, {target} target, {seeds} seeds"
    support_panel = f"particles with weight > {threshold:g} (seed 0)"
    curves = plot_seed_curves(
        {mmd_panel: {k: r.mmd for k, r in runs.items()}, support_panel: support},
        out / "weight_step.png",
        ylabel={mmd_panel: "MMD$(\\mu^k, \\pi)$ (samples)", support_panel: "particles"}, log_x=True,
        log_y={support_panel: False})  # a count of particles: a linear axis
    picks = sorted({0, min(10, steps), min(100, steps), steps})
    snaps = plot_particle_snapshots({k: {i: r.snapshots[i] for i in picks} for k, r in runs.items()},
                                    paper_2d(target, particles, samples, seed=0).target,
                                    out / "weight_step_particles.png",
                                    title="IFT weight steps, seed 0 (marker area ~ weight)")
    lines = [f"IFT weight step, 2-D {target}: {seeds} seeds, {steps} steps",
             f"{'variant':42s} {'MMD@100':>20s} {'final MMD':>20s} support s/run"]
    for label, r in runs.items():
        at = min(100, steps)
        lines.append(f"{label:42s} {r.mean[at]:.3e} +- {r.sd[at]:.1e} {r.mean[-1]:.3e} +- "
                     f"{r.sd[-1]:.1e} {support[label][-1]:7d} {r.seconds.mean():5.1f}")
    (out / "summary_weight_step.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {**runs, "support": support, "figures": [curves, snaps]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("mixture", "gaussian"), default="mixture")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="weight_step_out")
    args = parser.parse_args()
    main(args.target, args.seeds, args.steps, args.out)
