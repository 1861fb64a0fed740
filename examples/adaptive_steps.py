"""Error-controlled JKO steps on two flows with a closed form, from far to equilibrium:

* the W2 flow of a quadratic potential V = |x - m|^2 / 2 on 20 particles in 2-D
  (jk.ParticleJKO): each particle follows x(t) = m + e^{-t} (x0 - m), so the local error
  decays like e^{-t} while the tolerance atol + rtol |x| stays of the size of |m|: the steps
  grow like e^{t/2};
* the Ornstein-Uhlenbeck (Fokker-Planck) flow, F = Entropy + |x|^2/2 under W2 from N(3, 0.5^2),
  on 1000 Lagrangian particles in 1-D (particles do not lock as a W2 step on a fixed grid does).

    python examples/adaptive_steps.py [OUT_DIR]

Writes, for each, the work-precision (largest error at the saved times against step solves:
fixed tau, and adaptive tau with both local error estimates) and the chosen taus (small while
the flow is fast, large as it settles): quadratic_work_precision.png, quadratic_step_sizes.png,
work_precision.png and step_sizes.png (Ornstein-Uhlenbeck); a default run also copies them to
docs/figures/ with the prefix adaptive_.
"""

import dataclasses
import shutil
import sys
from pathlib import Path

import jko_ift as jk
from jko_ift import problems
from jko_ift.plotting import plot_step_sizes, plot_work_precision
from jko_ift.studies import work_precision

RTOLS = [1e-1, 1e-2, 1e-3, 1e-4]
DOCS_FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def study(problem, method_factory, steps, save_at, out, prefix, title):
    """Fixed and adaptive work-precision of one problem; two figures; a table on stdout."""
    def curves(steps=(), rtols=(), **options):
        return work_precision(problem.energy, problem.geometry, problem.initial, problem.t_final,
                              problem.error, method_factory, steps=steps, rtols=rtols,
                              save_at=save_at, controller_options=options)

    fixed, _ = curves(steps=steps)
    adaptive = {estimate: dataclasses.replace(curves(rtols=RTOLS, estimate=estimate)[1],
                                              label=f"adaptive, {estimate}")
                for estimate in ("extrapolation", "doubling")}
    figures = [
        plot_work_precision([fixed, *adaptive.values()], out / f"{prefix}work_precision.png",
                            f"{title}: error against work"),
        plot_step_sizes({f"rtol={rtol:.0e}": run for rtol, run in
                         zip(RTOLS, adaptive["extrapolation"].trajectories, strict=True)},
                        out / f"{prefix}step_sizes.png", f"{title}: adaptive tau"),
    ]
    print(title)
    for estimate, curve in adaptive.items():
        for rtol, solves, error in zip(curve.parameter, curve.solves, curve.errors, strict=True):
            print(f"  {estimate:13s} rtol {rtol:.0e}: {solves:4d} solves, error {error:.2e}; fixed "
                  f"tau needs {fixed.solves_to_reach(error):.0f}")
    return figures


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    quadratic = problems.quadratic_w2_particles()
    ou = problems.ornstein_uhlenbeck_particles(n=1000, t_final=8.0)
    figures = [
        *study(quadratic, jk.ParticleJKO, [16, 32, 64, 128, 256, 512, 1024], [0.5, 1.0, 2.0, 4.0, 8.0],
               out, "quadratic_", "W2 flow of |x - m|^2/2, 20 particles"),
        *study(ou, ou.method_factory, [16, 32, 64, 128, 256, 512, 1024, 2048], [0.5, 1.0, 2.0, 4.0, 8.0],
               out, "", "Ornstein-Uhlenbeck, 1000 particles"),
    ]
    if len(sys.argv) < 2:
        for figure in figures:
            shutil.copy(figure, DOCS_FIGURES / f"adaptive_{figure.name}")
    print(f"figures in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "adaptive-example"))
