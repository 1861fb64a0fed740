"""Error-controlled JKO steps on the MMD flow of 1/2 MMD^2 (closed form pi + e^{-t}(mu0 - pi)).

    python examples/adaptive_steps.py [OUT_DIR]

Writes work_precision.png (error against step solves, fixed tau against adaptive) and
step_sizes.png (the chosen taus: small while the flow is fast, large as it slows down).
"""

import sys
from pathlib import Path

import numpy as np

import jko_ift as jk
from jko_ift import problems
from jko_ift.plotting import plot_step_sizes, plot_work_precision
from jko_ift.studies import work_precision


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    problem = problems.mmd_flow(t_final=8.0)
    save_at = np.linspace(0.5, problem.t_final, 16)
    fixed, adaptive = work_precision(problem.energy, problem.geometry, problem.initial,
                                     problem.t_final, problem.error, jk.ConicJKO,
                                     steps=[16, 32, 64, 128, 256, 512], rtols=[1e-1, 1e-2, 1e-3],
                                     save_at=save_at)
    plot_work_precision([fixed, adaptive], out / "work_precision.png",
                        "MMD flow of 1/2 MMD^2: error against work")
    runs = {f"rtol={rtol:.0e}": run for rtol, run in zip(adaptive.parameter, adaptive.trajectories,
                                                         strict=True)}
    plot_step_sizes(runs, out / "step_sizes.png", "adaptive tau along the MMD flow")
    for rtol, solves, error in zip(adaptive.parameter, adaptive.solves, adaptive.errors, strict=True):
        print(f"rtol {rtol:.0e}: {solves} solves, error {error:.2e}; fixed tau needs "
              f"{fixed.solves_to_reach(error):.0f}")
    print(f"figures in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "adaptive-example"))
