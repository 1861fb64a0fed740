"""Large steps: forward Euler loses stability past a step size, the implicit schemes do not.

    python examples/large_steps.py [--steps K] [--particles N] [--out DIR]

Energy F(mu) = sum_i a_i V(x_i) with the anisotropic quadratic V(x) = (x_1^2 + 4 x_2^2)/2
(Lip(grad V) = 4), particles from N((2, 2), I). In W2 the explicit step multiplies x_2 by
1 - 4 tau: stable only for tau < 1/2 (|1 - 4 tau| < 1), F grows like (4 tau - 1)^{2k} beyond.
The Lagrangian JKO step (jk.ParticleJKO) divides by 1 + 4 tau: stable for every tau and
dissipating energy. The same holds in the spherical WFR geometry (alpha = beta = 1) for
ExplicitEuler against the Lie splitting with implicit pieces (Splitting(order=1)).
Explicit steps past their limit return status "unstable" (``jk.solve`` would stop there); to
draw the growth the steps are taken one by one with throw=False and the flagged ones counted.
Writes large_steps.png (energy against step number, one curve per tau, one panel per scheme)
and summary_large_steps.txt.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np

import jko_ift as jk
from jko_ift.plotting import plot_seed_curves

STEP_SIZES = (0.1, 0.4, 0.6, 1.0, 3.0)
SCALE = np.array([1.0, 4.0])


def energy() -> jk.Potential:
    return jk.Potential(lambda x: 0.5 * (x**2 @ SCALE), lambda x: x * SCALE)


def initial(particles: int, seed: int = 0) -> jk.Measure:
    points = np.random.default_rng(seed).standard_normal((particles, 2)) + 2.0
    return jk.Measure(points, np.full(particles, 1.0 / particles))


def schemes() -> dict:
    return {
        "explicit, W2": (jk.ExplicitEuler, jk.Wasserstein),
        "ParticleJKO (implicit), W2": (jk.ParticleJKO, jk.Wasserstein),
        "explicit, WFR": (jk.ExplicitEuler, lambda: jk.WFR(conserve_mass=True)),
        "Splitting(order=1, implicit), WFR": (jk.Splitting, lambda: jk.WFR(conserve_mass=True)),
    }


def energies(F, geometry, mu0, tau, steps, method) -> tuple[np.ndarray, list]:
    """F(mu^k) for k = 0..steps (NaN after a step that overflowed) and the steps' statuses."""
    values, statuses, mu = np.full(steps + 1, np.nan), [], mu0
    values[0] = F.value(mu0)
    for k in range(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow of the unstable runs
            result = method.step(F, geometry, mu, tau, throw=False)
        statuses.append(result.status)
        if result.measure is None:
            break
        mu, values[k + 1] = result.measure, result.energy
    return values, statuses


def main(steps: int = 30, particles: int = 50, out="large_steps_out",
         step_sizes=STEP_SIZES) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    F, mu0 = energy(), initial(particles)
    panels, flagged, lines = {}, {}, [f"{'scheme':36s} " + " ".join(f"tau={t:<9g}" for t in step_sizes)
                         + "  (F after the last step; F(mu0) = " + f"{F.value(mu0):.3g})"]
    for label, (method, geometry) in schemes().items():
        curves, finals, flagged[label] = {}, [], {}
        for tau in step_sizes:
            values, statuses = energies(F, geometry(), mu0, tau, steps, method())
            curves[f"tau = {tau:g}"] = values
            flagged[label][f"tau = {tau:g}"] = statuses.count("unstable")
            finals.append(values[-1])
        panels[label] = curves
        lines.append(f"{label:36s} " + " ".join(f"{v:<13.3g}" for v in finals))
    lines.append("steps flagged unstable: " + "; ".join(
        f"{label} {tau}: {count}" for label, counts in flagged.items()
        for tau, count in counts.items() if count))
    figure = plot_seed_curves(panels, out / "large_steps.png", ylabel="energy $F(\\mu^k)$",
                              xlabel="step k", columns=2, title="V = (x1^2 + 4 x2^2)/2: explicit stable "
                              "only for tau < 1/2")
    (out / "summary_large_steps.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"panels": panels, "unstable": flagged, "figures": [figure]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--particles", type=int, default=50)
    parser.add_argument("--out", default="large_steps_out")
    args = parser.parse_args()
    main(args.steps, args.particles, args.out)
