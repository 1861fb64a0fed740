"""The driver: one step (``jko_step``) and whole runs (``solve`` -> ``Trajectory``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .diagnostics import dissipation_slack
from .energies import Energy
from .geometries import Geometry
from .measures import Measure
from .methods import ConicJKO, SolverError, StepResult
from .methods.base import check_step_input, warn_user

__all__ = ["DissipationWarning", "SolverError", "StepResult", "Trajectory", "jko_step", "solve"]

#: Slack allowed in F(mu^{k+1}) + D^2/(2 tau) <= F(mu^k), relative to max(1, |F(mu^k)|):
#: the solvers certify their objective to about 1e-8 relative; 1e-6 leaves room for the
#: D^2 of inf-convolutions, evaluated at the solver's intermediate measure.
DISSIPATION_RTOL = 1e-6


class DissipationWarning(UserWarning):
    """A step broke the discrete dissipation inequality beyond DISSIPATION_RTOL."""


def jko_step(F: Energy, geometry: Geometry, mu: Measure, tau: float, method=None,
             throw: bool = True) -> StepResult:
    """One step mu^{k+1} = argmin_mu F(mu) + D^2(mu, mu^k) / (2 tau) (default: ConicJKO)."""
    method = ConicJKO() if method is None else method
    if not hasattr(method, "step"):
        raise ValueError(f"method must be a jko_ift method such as jk.ConicJKO(), got {method!r}")
    return method.step(F, geometry, mu, tau, throw=throw)


@dataclass(frozen=True)
class Trajectory:
    """A run: times (k+1,), measures [k+1], energies (k+1,), stats [k] (one dict per step)."""

    times: np.ndarray
    measures: list
    energies: np.ndarray
    stats: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.measures)

    @property
    def final(self) -> Measure:
        return self.measures[-1]


def solve(F: Energy, geometry: Geometry, mu0: Measure, tau: float, steps: int | None = None,
          t_final: float | None = None, method=None, progress: bool = True,
          throw: bool = True) -> Trajectory:
    """Run ``steps`` JKO steps of size tau (or up to ``t_final``) from mu0.

    Every step records its wall time, status, certificate, objective, D^2 and the slack of
    the dissipation inequality F(mu^{k+1}) + D^2/(2 tau) <= F(mu^k); a violation beyond
    DISSIPATION_RTOL warns (``DissipationWarning``). With ``throw=False`` a failed step
    ends the run early and its stats say why.
    """
    tau = check_step_input(F, geometry, mu0, tau)
    steps = _step_count(tau, steps, t_final)
    method = ConicJKO() if method is None else method
    times, measures, energies, stats = [0.0], [mu0], [F.value(mu0)], []
    label = f"{type(method).__name__} {type(geometry).__name__}"
    bar = tqdm(range(steps), disable=not progress, desc=label, unit="step")
    for k in bar:
        start = time.perf_counter()
        result = jko_step(F, geometry, measures[-1], tau, method=method, throw=throw)
        record = {"step": k + 1, "tau": tau, "wall_time": time.perf_counter() - start,
                  "status": result.status, "certificate": result.certificate,
                  "objective": result.objective, "distance_sq": result.distance_sq}
        record.update({key: value for key, value in result.info.items()
                       if np.isscalar(value) and key not in record})
        if not result.ok or result.measure is None:
            stats.append(record)
            break
        slack = dissipation_slack(F, measures[-1], result.objective)
        record["dissipation_slack"] = slack
        if slack < -DISSIPATION_RTOL * max(1.0, abs(energies[-1])):
            warn_user(f"step {k + 1}: F(mu^k+1) + D^2/(2 tau) exceeds F(mu^k) by {-slack:.3g}; "
                      f"the solve is less accurate than certified (certificate "
                      f"{result.certificate:.2g})", DissipationWarning)
        stats.append(record)
        times.append(times[-1] + tau)
        measures.append(result.measure)
        energies.append(result.energy)
        bar.set_postfix(energy=f"{result.energy:.4g}")
    return Trajectory(np.array(times), measures, np.array(energies), stats)


def _step_count(tau: float, steps, t_final) -> int:
    if (steps is None) == (t_final is None):
        raise ValueError("give exactly one of steps (a number of steps) or t_final (a time)")
    if steps is not None:
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return int(steps)
    if not (np.isfinite(t_final) and t_final > 0):
        raise ValueError(f"t_final must be a positive time, got {t_final!r}")
    return max(1, math.ceil(t_final / tau - 1e-9))
