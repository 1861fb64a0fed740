"""Studies over many runs: work-precision of fixed against error-controlled step sizes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .control import StepController
from .solve import Trajectory, solve


@dataclass(frozen=True)
class WorkPrecision:
    """One curve: the work (step solves) and the error of runs over a parameter.

    parameter: the number of fixed steps, or the rtol of the controller.
    """

    label: str
    parameter: np.ndarray
    solves: np.ndarray
    errors: np.ndarray
    trajectories: tuple = ()

    def solves_to_reach(self, error: float) -> float:
        """Work needed for ``error``, interpolated log-log between the runs (inf if none
        reaches it, the work of the cheapest run that does if it is below the range)."""
        order = np.argsort(self.solves)
        solves, errors = self.solves[order].astype(float), self.errors[order]
        if errors.min() > error:
            return np.inf
        if errors[0] <= error:
            return float(solves[0])
        k = int(np.argmax(errors <= error))  # first run that reaches it
        w = np.log(error / errors[k - 1]) / np.log(errors[k] / errors[k - 1])
        return float(np.exp(np.log(solves[k - 1]) + w * np.log(solves[k] / solves[k - 1])))


def work_precision(F, geometry, mu0, t_final: float, error: Callable[[Trajectory], float],
                   method_factory: Callable[[], object], steps: Sequence[int] = (),
                   rtols: Sequence[float] = (), save_at=None, controller_options=None,
                   progress: bool = False) -> tuple[WorkPrecision, WorkPrecision]:
    """Fixed runs (one per number of steps) and adaptive runs (one per rtol) of one problem.

    error(trajectory) measures a run (e.g. the largest distance to a closed form over the
    saved times); ``method_factory`` gives a fresh method per run, so that no run profits
    from another's caches. Returns (fixed, adaptive).
    """
    fixed_runs = [solve(F, geometry, mu0, tau=t_final / n, steps=n, method=method_factory(),
                        save_at=save_at, progress=progress) for n in steps]
    options = {"atol": 0.0} | dict(controller_options or {})
    adaptive_runs = [solve(F, geometry, mu0, t_final=t_final, method=method_factory(),
                           controller=StepController(rtol=rtol, **options), save_at=save_at,
                           progress=progress) for rtol in rtols]

    def curve(label, parameter, runs):
        return WorkPrecision(label, np.asarray(parameter, float),
                             np.array([run.step_solves for run in runs]),
                             np.array([error(run) for run in runs]), tuple(runs))

    return curve("fixed tau", steps, fixed_runs), curve("adaptive", rtols, adaptive_runs)
