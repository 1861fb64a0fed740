"""The driver: one step (``jko_step``) and whole runs (``solve`` -> ``Trajectory``).

``solve`` takes fixed steps (``tau`` with ``steps`` or ``t_final``) or, with a
``StepController``, error-controlled ones up to ``t_final``; it saves every step or only at
``save_at``, and stops early at stationarity (``stop_rate``) or at an energy level
(``stop_energy``). ``Trajectory.stop_reason`` says why a run ended.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .control import StepController
from .diagnostics import dissipation_slack
from .energies import Energy
from .geometries import Geometry
from .measures import Measure
from .methods import BackAndForthJKO, ConicJKO, EntropicJKO, SolverError, StepResult, grid_motion
from .methods.base import check_step_input, warn_user
from .methods.entropic import BLUR_WARN_RATIO
from .run_warnings import RunWarning, WarningLog

__all__ = ["DissipationWarning", "RunWarning", "SolverError", "StepResult", "Trajectory", "jko_step",
           "solve"]

#: Slack allowed in F(mu^{k+1}) + D^2/(2 tau) <= F(mu^k), relative to max(1, |F(mu^k)|):
#: the solvers certify their objective to about 1e-8 relative; 1e-6 leaves room for the
#: D^2 of inf-convolutions, evaluated at the solver's intermediate measure.
DISSIPATION_RTOL = 1e-6

#: Consecutive uncertified step solves after which an adaptive run gives up: a solver
#: failure that smaller steps do not cure is not a step-size problem.
MAX_SOLVER_RETRIES = 3

#: Methods whose measures keep the support of mu0 (grids): they move mass, not points.
FIXED_SUPPORT = (ConicJKO, EntropicJKO, BackAndForthJKO)

#: Times closer than this (relative to t_final) are the same time.
TIME_RTOL = 1e-9


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
    """A run: saved times (k+1,), measures [k+1], energies (k+1,), and stats, one dict per
    attempted step (adaptive runs record rejected steps too, with ``accepted=False``).

    stop_reason: "steps" or "t_final" (ran to the end), "stationary" (dissipation rate
    below ``stop_rate``), "energy" (reached ``stop_energy``) or "failed" (``throw=False``).
    warnings: what went wrong or was flagged during the run, one ``RunWarning`` per cause with
    how many steps raised it (each is also warned once, at the end of the run).
    """

    times: np.ndarray
    measures: list
    energies: np.ndarray
    stats: list = field(default_factory=list)
    stop_reason: str = "steps"
    warnings: tuple[RunWarning, ...] = ()

    def __len__(self) -> int:
        return len(self.measures)

    @property
    def final(self) -> Measure:
        return self.measures[-1]

    @property
    def taus(self) -> np.ndarray:
        """The step sizes of the accepted steps."""
        return np.array([s["tau"] for s in self.stats if s.get("accepted", True)])

    @property
    def step_solves(self) -> int:
        """How many single-step problems were solved (adaptive attempts: one when the error is
        estimated by extrapolation, three by step doubling)."""
        return int(sum(s.get("solves", 1) for s in self.stats))


def solve(F: Energy, geometry: Geometry, mu0: Measure, tau: float | None = None,
          steps: int | None = None, t_final: float | None = None, method=None,
          controller: StepController | None = None, save_at=None,
          stop_rate: float | None = None, stop_energy: float | None = None,
          progress: bool = True, throw: bool = True) -> Trajectory:
    """Run JKO steps from mu0: ``steps`` steps of size tau, or up to ``t_final``.

    With ``controller`` the steps are error-controlled (``t_final`` needed; tau, if given, is
    the first step). ``save_at``: times at which to keep the measure (default: every
    accepted step). ``stop_rate``: stop once (F(mu^k) - F(mu^{k+1})) / tau < stop_rate.
    ``stop_energy``: stop once F(mu^k) <= stop_energy.

    Every step records its wall time, status, certificate, objective, D^2 and the slack of
    the dissipation inequality F(mu^{k+1}) + D^2/(2 tau) <= F(mu^k); a violation beyond
    DISSIPATION_RTOL warns (``DissipationWarning``). With ``throw=False`` a failed step
    ends the run early and its stats say why. Warnings raised inside the steps are reported
    once per cause at the end of the run, with their count, and kept in
    ``Trajectory.warnings``.
    """
    if controller is None and tau is None:
        raise ValueError("give tau (a fixed step) or controller=jk.StepController(...)")
    # the masses are checked (and warned about) by every step, inside the run's log
    check_step_input(F, geometry, mu0, 1.0 if tau is None else tau, warn_masses=False)
    method = ConicJKO() if method is None else method
    if controller is not None:
        if not isinstance(controller, StepController):
            raise ValueError(f"controller must be a jk.StepController, got {controller!r}")
        if t_final is None or steps is not None:
            raise ValueError("an adaptive run needs t_final (and no steps)")
        t_final = _positive_time(t_final)
        run = _Run(F, geometry, method, mu0, t_final, save_at, stop_rate, stop_energy, throw)
        return run.reporting(run.adaptive, controller, tau, progress)
    tau = float(tau)
    steps = _step_count(tau, steps, t_final)
    run = _Run(F, geometry, method, mu0, steps * tau, save_at, stop_rate, stop_energy, throw)
    return run.reporting(run.fixed, tau, steps, progress)


class _Run:
    """The state of one run: the current measure and what has been saved."""

    def __init__(self, F, geometry, method, mu0, t_final, save_at, stop_rate, stop_energy, throw):
        self.F, self.geometry, self.method, self.throw = F, geometry, method, throw
        self.t_final, self.stop_rate, self.stop_energy = t_final, stop_rate, stop_energy
        self.save_at = None if save_at is None else _save_times(save_at, t_final)
        self.t, self.mu, self.energy = 0.0, mu0, F.value(mu0)
        self.times, self.measures, self.energies, self.stats = [0.0], [mu0], [self.energy], []
        self.label = f"{type(method).__name__} {type(geometry).__name__}"
        self.log = WarningLog()

    def reporting(self, loop, *args) -> Trajectory:
        """Run ``loop``; then warn once per cause recorded in the steps, also when it raised."""
        try:
            return loop(*args)
        finally:
            self.log.emit()

    # -------------------------------------------------------------------- fixed steps
    def fixed(self, tau: float, steps: int, progress: bool) -> Trajectory:
        if self.save_at is not None:
            on_grid = np.abs(self.save_at / tau - np.round(self.save_at / tau)) <= 1e-6
            if not on_grid.all():
                raise ValueError(f"with a fixed tau = {tau:g}, save_at times must be multiples of "
                                 f"tau; {self.save_at[~on_grid].tolist()} are not (use a "
                                 "StepController to hit arbitrary times)")
        with tqdm(range(steps), disable=not progress, desc=self.label, unit="step") as bar:
            for k in bar:
                result, record = self._attempt(self.mu, tau, k + 1)
                self.stats.append(record)
                if result is None:
                    return self._trajectory("failed")
                reason = self._advance(tau, result.measure, result.energy)
                bar.set_postfix(energy=f"{self.energy:.4g}", refresh=False)
                if reason:
                    return self._trajectory(reason)
        return self._trajectory("steps")

    # -------------------------------------------------------------------- adaptive steps
    def adaptive(self, controller: StepController, tau: float | None, progress: bool) -> Trajectory:
        # grid methods keep their support: their state is the weights alone
        norm = controller.norm(self.geometry, self.mu, isinstance(self.method, FIXED_SUPPORT),
                               controller.order_of(self.method))
        proposed = controller.first_tau(self.t_final, tau)
        bar = tqdm(total=self.t_final, disable=not progress, desc=self.label, unit="time",
                   bar_format="{l_bar}{bar}| t={n:.4g}/{total:.4g} [{elapsed}<{remaining}{postfix}]")
        with bar:
            return self._adaptive_loop(controller, norm, proposed, bar)

    def _adaptive_loop(self, controller, norm, proposed, bar) -> Trajectory:
        previous_error, attempt, failures = None, 0, 0
        history = None  # (the measure before the last accepted step, that step's tau)
        while self.t < self.t_final * (1 - TIME_RTOL):
            # land on save and final times without a sliver of a step before them: a sliver's
            # solver noise, extrapolated by tau/sliver, would spoil the next error estimate
            remaining = self._next_stop() - self.t
            tau = (remaining if remaining <= 1.1 * proposed
                   else remaining / 2 if remaining < 2 * proposed else proposed)
            if proposed < controller.tau_min:
                raise SolverError(
                    f"adaptive step size {proposed:.3g} fell below tau_min = "
                    f"{controller.tau_min:.3g} at t = {self.t:.6g}: the requested accuracy "
                    f"(rtol={controller.rtol:g}, atol={controller.atol:g}) needs smaller steps; "
                    f"loosen rtol/atol or lower tau_min{norm.hint()}", status="tau_min")
            attempt += 1
            start = time.perf_counter()
            new, records, estimate, kind = None, [], None, "extrapolation"
            if norm.estimate == "extrapolation" and history is not None:
                new, record = self._attempt(self.mu, tau, attempt, throw=False)
                records.append(record)
                if new is not None:
                    estimate = norm.extrapolation(new.measure, self.mu, history[0], tau, history[1])
            if not records or (new is not None and estimate is None):  # no history: doubling
                new, records, estimate = self._doubling(norm, tau, attempt)
                kind = "doubling"
            failed = next((r for r in records if r["status"] != "optimal"), None)
            if failed is not None:  # a step the solver could not certify: retry smaller
                self.stats.append(failed | {"accepted": False, "solves": len(records), "t": self.t,
                                            "error": np.inf})
                failures += 1
                if failures > MAX_SOLVER_RETRIES:
                    return self._solver_failure(failed)
                proposed = tau * controller.shrink
                continue
            failures = 0
            error, local = estimate
            accepted = error <= 1.0
            self.stats.append({
                "step": attempt, "t": self.t, "tau": tau, "accepted": accepted, "error": error,
                "error_distance": local, "solves": len(records),
                "estimate": kind,
                "wall_time": time.perf_counter() - start, "status": new.status,
                "certificate": max(r["certificate"] for r in records),
                "objective": new.objective, "distance_sq": new.distance_sq,
                "dissipation_slack": min(r["dissipation_slack"] for r in records[-2:]),
                # on a fixed grid, locked sub-steps make the estimate measure the grid, not tau
                "grid_locked": any(r.get("grid_locked", False) for r in records),
                "error_bound": _summed_bound(records[-2:] if kind == "doubling" else records[-1:]),
            })
            proposed = min(proposed * controller.factor(error, previous_error, accepted, norm.order),
                           controller.tau_max)
            if not accepted:
                continue  # the trial steps are dropped: a rejection leaves no state behind
            previous_error, history = error, (self.mu, tau)
            reason = self._advance(tau, new.measure, new.energy)
            bar.update(tau)
            bar.set_postfix(tau=f"{tau:.3g}", energy=f"{self.energy:.4g}", refresh=False)
            if reason:
                return self._trajectory(reason)
        return self._trajectory("t_final")

    def _doubling(self, norm, tau: float, attempt: int):
        """One step of tau and two of tau/2: (the two half steps' result, the solves' records,
        (normalized error, local error) or None when a solve failed)."""
        coarse, coarse_record = self._attempt(self.mu, tau, attempt, throw=False)
        if coarse is None:
            return None, [coarse_record], None
        half, half_record = self._attempt(self.mu, tau / 2, attempt, throw=False)
        if half is None:
            return None, [coarse_record, half_record], None
        fine, fine_record = self._attempt(half.measure, tau / 2, attempt, throw=False)
        records = [coarse_record, half_record, fine_record]
        if fine is None:
            return None, records, None
        return fine, records, norm.doubling(self.mu, coarse.measure, fine.measure)

    # -------------------------------------------------------------------- shared pieces
    def _attempt(self, mu: Measure, tau: float, step: int, throw: bool | None = None):
        """Solve one step; (result, record), result None when it failed without throwing."""
        start = time.perf_counter()
        throw = self.throw if throw is None else throw
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return self._checked_step(mu, tau, step, throw, start)
            finally:
                self.log.record(step, caught)

    def _checked_step(self, mu: Measure, tau: float, step: int, throw: bool, start: float):
        result = jko_step(self.F, self.geometry, mu, tau, method=self.method, throw=throw)
        record = {"step": step, "tau": tau, "wall_time": time.perf_counter() - start,
                  "status": result.status, "certificate": result.certificate,
                  "objective": result.objective, "distance_sq": result.distance_sq}
        record.update({key: value for key, value in result.info.items()
                       if np.isscalar(value) and key not in record})
        if not result.ok or result.measure is None:
            return None, record
        slack = dissipation_slack(self.F, mu, result.objective)
        record["dissipation_slack"] = slack
        if slack < -DISSIPATION_RTOL * max(1.0, abs(result.objective + slack)):
            warn_user(f"step {step}: F(mu^k+1) + D^2/(2 tau) exceeds F(mu^k) by {-slack:.3g}; "
                      f"{_dissipation_diagnosis(result)}", DissipationWarning)
        return result, record

    def _advance(self, tau: float, mu: Measure, energy: float) -> str | None:
        """Move to t + tau; save; return a stop reason or None."""
        rate = (self.energy - energy) / tau
        self.t, self.mu, self.energy = self.t + tau, mu, energy
        end = self.t >= self.t_final * (1 - TIME_RTOL)
        reason = ("energy" if self.stop_energy is not None and energy <= self.stop_energy
                  else "stationary" if self.stop_rate is not None and rate < self.stop_rate
                  else None)
        # the last state is always kept, so that Trajectory.final is where the run ended
        if self.save_at is None or end or reason or self._is_save_time(self.t):
            self.times.append(self.t)
            self.measures.append(mu)
            self.energies.append(energy)
        return reason

    def _is_save_time(self, t: float) -> bool:
        return bool(np.any(np.abs(self.save_at - t) <= TIME_RTOL * self.t_final))

    def _next_stop(self) -> float:
        if self.save_at is None:
            return self.t_final
        later = self.save_at[self.save_at > self.t + TIME_RTOL * self.t_final]
        return float(later[0]) if later.size else self.t_final

    def _solver_failure(self, record: dict) -> Trajectory:
        if not self.throw:
            return self._trajectory("failed")
        raise SolverError(f"adaptive run stopped at t = {self.t:.6g}: {MAX_SOLVER_RETRIES + 1} "
                          f"step solves in a row were not certified (last status "
                          f"{record['status']!r}, certificate {record['certificate']:.3g}) although "
                          "tau was cut each time; try another solver or solver_options",
                          status=record["status"])

    def _check_grid_run(self) -> None:
        """Record a run whose grid defects add up although no step stood out
        (``grid_motion.check_run``; an entropic blur wider than a cell is not the grid's)."""
        grid = getattr(self.measures[0], "grid", None)
        stats = [s for s in self.stats if s.get("accepted", True)]
        if grid is None or not stats:
            return
        spacing = float(np.max(grid.spacing))
        blurred = any((s.get("blur_ratio") or 0.0) > BLUR_WARN_RATIO
                      or (s.get("eps") or 0.0) >= grid_motion.SUBCELL_BLUR * spacing**2 for s in stats)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grid_motion.check_run(stats, spacing, blurred)
        self.log.record(len(self.stats), caught)

    def _trajectory(self, reason: str) -> Trajectory:
        self._check_grid_run()
        return Trajectory(np.array(self.times), self.measures, np.array(self.energies),
                          self.stats, reason, self.log.warnings())


def _dissipation_diagnosis(result: StepResult) -> str:
    """Why a step broke the dissipation inequality: an explicit step (it reports its
    ``stability_ratio`` tau kappa, and its certificate is 0 by construction) breaks it whenever
    tau kappa > 1, although it is stable up to 2; an implicit step only by an inaccurate solve."""
    ratio = result.info.get("stability_ratio")
    if ratio is None:
        return f"the solve is less accurate than certified (certificate {result.certificate:.2g})"
    return (f"the step is explicit (its certificate is 0 by construction): a time-stepping "
            f"error, not a solver error. Forward Euler satisfies this inequality of the JKO step "
            f"only while tau times the curvature of F along the step is <= 1 (here about "
            f"{ratio:.3g}; the step stays stable below 2), and only as the gradient step of the "
            "geometry's own metric (reaction='projected_gradient' and velocity='euclidean' are "
            "not). Take a smaller tau, or an implicit method (jk.ParticleJKO(), "
            "jk.Splitting(transport='implicit'))")


def _summed_bound(records) -> float | None:
    """The error bound of the solves that made the kept measure (None unless each has one)."""
    bounds = [r.get("error_bound") for r in records]
    return None if any(b is None for b in bounds) else float(sum(bounds))


def _positive_time(t_final) -> float:
    try:
        t_final = float(t_final)
    except (TypeError, ValueError):
        raise ValueError(f"t_final must be a positive time, got {t_final!r}") from None
    if not (np.isfinite(t_final) and t_final > 0):
        raise ValueError(f"t_final must be a positive time, got {t_final!r}")
    return t_final


def _save_times(save_at, t_final: float) -> np.ndarray:
    times = np.sort(np.atleast_1d(np.asarray(save_at, dtype=float)))
    if times.size == 0 or not np.all(np.isfinite(times)) or times[0] <= 0 \
            or times[-1] > t_final * (1 + TIME_RTOL):
        raise ValueError(f"save_at must hold times in (0, t_final = {t_final:g}], got "
                         f"{np.asarray(save_at).tolist()}")
    return times


def _step_count(tau: float, steps, t_final) -> int:
    if (steps is None) == (t_final is None):
        raise ValueError("give exactly one of steps (a number of steps) or t_final (a time)")
    if steps is not None:
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return int(steps)
    t_final = _positive_time(t_final)
    return max(1, math.ceil(t_final / tau - 1e-9))
