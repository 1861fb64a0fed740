"""Error-controlled JKO steps on the Ornstein-Uhlenbeck (Fokker-Planck) flow, which has a
closed form: F = Entropy + |x|^2/2 under W2 from N(3, 0.5^2), on 1000 Lagrangian particles in
1-D (jk.ParticleJKO; particles do not lock on a grid as a W2 step on a fixed grid does).

    python examples/adaptive_steps.py [OUT_DIR]

Writes work_precision.png (largest W2 error at t = 0.5, 1, 2, 4, 8 against step solves: fixed
tau, and adaptive tau with both local error estimates) and step_sizes.png (the chosen taus:
small while the flow is fast, large as it settles); a default run also copies them to
docs/figures/ as adaptive_work_precision.png and adaptive_step_sizes.png.
"""

import dataclasses
import shutil
import sys
from pathlib import Path

from jko_ift import problems
from jko_ift.plotting import plot_step_sizes, plot_work_precision
from jko_ift.studies import work_precision

SAVE_AT = [0.5, 1.0, 2.0, 4.0, 8.0]
STEPS = [16, 32, 64, 128, 256, 512, 1024, 2048]
RTOLS = [1e-1, 1e-2, 1e-3, 1e-4]
DOCS_FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    problem = problems.ornstein_uhlenbeck_particles(n=1000, t_final=8.0)

    def study(steps=(), rtols=(), **options):
        return work_precision(problem.energy, problem.geometry, problem.initial, problem.t_final,
                              problem.error, problem.method_factory, steps=steps, rtols=rtols,
                              save_at=SAVE_AT, controller_options=options)

    fixed, _ = study(steps=STEPS)
    curves = {estimate: dataclasses.replace(study(rtols=RTOLS, estimate=estimate)[1],
                                            label=f"adaptive, {estimate}")
              for estimate in ("extrapolation", "doubling")}
    figures = [
        plot_work_precision([fixed, *curves.values()], out / "work_precision.png",
                            "Ornstein-Uhlenbeck on 1000 particles: W2 error against work"),
        plot_step_sizes({f"rtol={rtol:.0e}": run for rtol, run in
                         zip(RTOLS, curves["extrapolation"].trajectories, strict=True)},
                        out / "step_sizes.png", "adaptive tau from far to equilibrium"),
    ]
    for estimate, curve in curves.items():
        for rtol, solves, error in zip(curve.parameter, curve.solves, curve.errors, strict=True):
            print(f"{estimate:13s} rtol {rtol:.0e}: {solves:4d} solves, error {error:.2e}; fixed "
                  f"tau needs {fixed.solves_to_reach(error):.0f}")
    if len(sys.argv) < 2:
        for figure in figures:
            shutil.copy(figure, DOCS_FIGURES / f"adaptive_{figure.name}")
    print(f"figures in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "adaptive-example"))
