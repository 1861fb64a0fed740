"""The driver: one step (``jko_step``) and whole runs (``solve`` -> ``Trajectory``).

``solve`` takes fixed steps (``tau`` with ``steps`` or ``t_final``: a ``ConstantStepSize``
that accepts every step) or, with a ``StepController``, error-controlled ones up to
``t_final``, in one loop; it saves every step or only at ``save_at``, and stops early at
stationarity (``stop_rate``), at an energy level (``stop_energy``) or when its ``callback``
says so. ``Trajectory.stop_reason`` says why a run ended, and ``Trajectory.state`` (the
method's and the controller's state) lets ``solve(..., resume=trajectory)`` continue it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .control import ConstantStepSize, ControllerState, StepController
from .diagnostics import dissipation_slack
from .display import Table, format_value, html_summary, progress_bar, showing_iterations, text_summary
from .energies import Energy
from .geometries import Geometry
from .measures import Measure, with_array_type
from .methods import SolverError, StepResult, grid_motion
from .methods.base import (
    Method,
    MethodState,
    Status,
    check_step_input,
    in_input_type,
    on_input_device,
    positive_finite,
    warn_user,
)
from .methods.entropic import BLUR_WARN_RATIO
from .run_warnings import RunWarning, WarningLog

__all__ = ["DissipationWarning", "RunState", "RunWarning", "SolverError", "StepReport", "StepResult",
           "Trajectory", "jko_step", "solve"]

#: Slack allowed in F(mu^{k+1}) + D^2/(2 tau) <= F(mu^k), relative to max(1, |F(mu^k)|):
#: the solvers certify their objective to about 1e-8 relative; 1e-6 leaves room for the
#: D^2 of inf-convolutions, evaluated at the solver's intermediate measure.
DISSIPATION_RTOL = 1e-6

#: Consecutive uncertified step solves after which an adaptive run gives up: a solver
#: failure that smaller steps do not cure is not a step-size problem.
MAX_SOLVER_RETRIES = 3

#: Times closer than this (relative to t_final) are the same time.
TIME_RTOL = 1e-9


class DissipationWarning(UserWarning):
    """A step broke the discrete dissipation inequality beyond DISSIPATION_RTOL."""


def jko_step(F: Energy, geometry: Geometry, mu: Measure, tau: float, method=None,
             throw: bool = True) -> StepResult:
    r"""One JKO (minimizing-movement) step from :math:`\mu^k`.

    Parameters
    ----------
    F : Energy
        The energy that decreases.
    geometry : Geometry
        The geometry of the step (its squared distance :math:`D^2`).
    mu : Measure
        The current measure :math:`\mu^k`.
    tau : float
        The step size :math:`\tau > 0`.
    method : Method, optional
        How the step is computed; default :class:`~jko_ift.ConicJKO` (exact, on the support of
        ``mu``).
    throw : bool, default True
        Raise :class:`~jko_ift.SolverError` when the step fails; with False the failure is
        returned as the result's ``status``.

    Returns
    -------
    StepResult
        ``measure`` (:math:`\mu^{k+1}`), ``objective``
        (:math:`F(\mu^{k+1}) + D^2/(2\tau)`), ``energy``, ``distance_sq``, ``status``,
        ``certificate`` (a relative duality gap or optimality residual) and ``info``.

    Raises
    ------
    ValueError
        If ``method`` is not a method, or the inputs do not fit together.
    SolverError
        If the step fails and ``throw`` is True.

    Notes
    -----
    .. math::

        \mu^{k+1} \in \mathop{\mathrm{argmin}}_\mu\; F(\mu) + \frac{1}{2\tau} D^2(\mu, \mu^k).

    See Also
    --------
    solve : many steps, with a trajectory and its diagnostics.

    Examples
    --------
    >>> mu = jk.Measure([[0.0], [1.0]], [0.5, 0.5])
    >>> F = jk.KL(mu.with_weights([0.2, 0.8]))
    >>> r = jk.jko_step(F, jk.Hellinger(), mu, 0.5)
    >>> r.status, bool(r.objective <= F.value(mu))
    ('optimal', True)
    """
    method = _check_method(method)
    F, geometry = on_input_device(F, geometry, mu)  # for duck-typed methods too
    return in_input_type(method.step(F, geometry, mu, tau, throw=throw), mu)


def _check_method(method):
    """The method (``ConicJKO()`` for None), or a ValueError naming what was passed (a class
    instead of an instance too)."""
    if method is None:
        from .methods.conic import ConicJKO  # CVXPY is imported when the conic step is used

        return ConicJKO()
    if isinstance(method, type) or not hasattr(method, "step"):
        raise ValueError(f"method must be a jko_ift method instance such as jk.ConicJKO(), got {method!r}")
    return method


def _check_stop_level(value, name: str):
    """stop_energy / stop_rate: None or a real number (not NaN), else a ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or np.isnan(value):
        raise ValueError(f"{name} must be a number or None, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Trajectory:
    """A run: saved times (k+1,), measures [k+1], energies (k+1,), and stats, one dict per
    attempted step (adaptive runs record rejected steps too, with ``accepted=False``).

    stop_reason: "steps" or "t_final" (ran to the end), "stationary" (dissipation rate
    below ``stop_rate``), "energy" (reached ``stop_energy``), "callback" (the callback asked
    to stop), "failed" (``throw=False``) or "running" (a snapshot, ``StepReport.trajectory``).
    warnings: what went wrong or was flagged during the run, one ``RunWarning`` per cause with
    how many steps raised it (each is also warned once, at the end of the run).
    state: where the run stands (``RunState``: the method's and the controller's state), for
    ``solve(..., resume=trajectory)``; None for a trajectory read from files.
    scheme: the method's class and the geometry ("ConicJKO in IFT(...)"), saved with the
    trajectory's file; "" when unknown (a file written before the scheme was saved).

    In a notebook a trajectory shows its summary (``_repr_html_``: scheme, steps, energies,
    statuses, timings, warnings); ``plot()`` draws its energy, ``stats_table()`` gives its
    per-step statistics as a table.
    """

    times: np.ndarray
    measures: list
    energies: np.ndarray
    stats: list = field(default_factory=list)
    stop_reason: str = "steps"
    warnings: tuple[RunWarning, ...] = ()
    state: RunState | None = field(default=None, repr=False, compare=False)
    scheme: str = field(default="", compare=False)

    def __len__(self) -> int:
        return len(self.measures)

    def _summary(self) -> tuple[str, list, list]:
        """(title, fields, notes) of the run's summary (``display``)."""
        accepted = [s for s in self.stats if s.get("accepted", True)]
        taus = self.taus
        fields = [("stop reason", self.stop_reason),
                  ("steps", f"{len(accepted)} accepted" + (f", {len(self.stats) - len(accepted)} "
                                                          "rejected" if len(accepted) < len(self.stats)
                                                          else "")),
                  ("saved measures", len(self.measures)),
                  ("time", f"{format_value(float(self.times[0]))} to {format_value(float(self.times[-1]))}"),
                  ("energy", f"{format_value(float(self.energies[0]))} to "
                             f"{format_value(float(self.energies[-1]))}")]
        if taus.size:
            fields.append(("tau", format_value(float(taus[0])) if np.ptp(taus) == 0
                           else f"{format_value(float(taus.min()))} to {format_value(float(taus.max()))}"))
        statuses: dict = {}
        for s in self.stats:
            statuses[str(s.get("status"))] = statuses.get(str(s.get("status")), 0) + 1
        if statuses:
            fields.append(("statuses", ", ".join(f"{k}: {v}" for k, v in statuses.items())))
        certificates = [s["certificate"] for s in accepted if s.get("certificate") is not None]
        if certificates:
            fields.append(("worst certificate", float(np.max(certificates))))
        iterations = [s["iterations"] for s in self.stats if s.get("iterations") is not None]
        if iterations:
            fields.append(("solver iterations", f"{int(np.sum(iterations))} in all, at most "
                                                f"{int(np.max(iterations))} in a step"))
        walls = [s.get("wall_time") or 0.0 for s in self.stats]
        if walls:
            fields.append(("wall time", f"{format_value(float(np.sum(walls)))} s (slowest step "
                                        f"{format_value(float(np.max(walls)))} s)"))
        title = "Trajectory" + (f": {self.scheme}" if self.scheme else "")
        return title, fields, [str(w) for w in self.warnings]

    def __repr__(self) -> str:
        return text_summary(*self._summary())

    def _repr_html_(self) -> str:
        """The run's summary for a notebook: scheme, steps, energies, statuses, timings,
        warnings (every text escaped)."""
        return html_summary(*self._summary())

    def stats_table(self) -> Table:
        """The per-step statistics (``stats``: step, tau, wall time, status, certificate,
        iterations, ...) as a ``display.Table``; ``.to_frame()`` makes it a pandas DataFrame.

        Returns
        -------
        Table
        """
        return Table(self.stats)

    def plot(self, ax=None, *, label: str | None = None, **style):
        """Energy against time (log scale when every energy is positive), markers at the saved
        states.

        Parameters
        ----------
        ax : matplotlib.axes.Axes, optional
            The Axes to draw into (default: a new figure's).
        label : str, optional
            The legend entry (default: ``scheme``).
        **style
            Passed to ``Axes.plot`` (color, linestyle, marker, ...).

        Returns
        -------
        matplotlib.axes.Axes
        """
        from .plotting import draw_energy  # plotting sits above solve: imported when drawing

        return draw_energy(self, ax=ax, label=label, **style)

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
          progress: bool = True, throw: bool = True,
          callback: Callable[[StepReport], object] | None = None,
          resume: Trajectory | None = None) -> Trajectory:
    r"""Run JKO steps from :math:`\mu^0`: ``steps`` steps of size ``tau``, or up to ``t_final``.

    Parameters
    ----------
    F : Energy
        The energy that decreases.
    geometry : Geometry
        The geometry of the steps.
    mu0 : Measure
        The initial measure.
    tau : float, optional
        The step size; with ``controller``, the first step (optional there).
    steps : int, optional
        Number of steps (fixed steps).
    t_final : float, optional
        Final time: fixed steps up to it, or, with ``controller``, error-controlled steps
        (needed there).
    method : Method, optional
        How each step is computed; default :class:`~jko_ift.ConicJKO`.
    controller : StepController, optional
        Error-controlled step sizes (see :class:`~jko_ift.StepController`).
    save_at : sequence of float, optional
        Times at which to keep the measure (default: every accepted step).
    stop_rate : float, optional
        Stop once :math:`(F(\mu^k) - F(\mu^{k+1}))/\tau` is below it (``"stationary"``).
    stop_energy : float, optional
        Stop once :math:`F(\mu^k) \le` ``stop_energy`` (``"energy"``).
    progress : bool, default True
        Show a progress bar.
    throw : bool, default True
        Raise when a step fails; with False the run ends early (``stop_reason == "failed"``)
        and its stats say why.
    callback : callable, optional
        ``callback(report)`` after every accepted step, with a ``StepReport`` (step, t, tau,
        energy, measure, the step's stats, and ``report.trajectory()``, the run so far,
        resumable); a truthy return value stops the run (``"callback"``).
    resume : Trajectory, optional
        A trajectory of this problem (a snapshot or a run that stopped early) to continue,
        with its method and controller state (``Trajectory.state``; without one, from its last
        measure with fresh states). The other arguments are those of the whole run
        (``steps`` and ``t_final`` count from ``mu0``), so a run resumed from any of its
        snapshots ends as the uninterrupted run, bit for bit where the method's state is kept.

    Returns
    -------
    Trajectory
        ``times``, ``measures``, ``energies``, ``stats`` (one dict per step: wall time,
        status, certificate, objective, :math:`D^2`, the slack of the dissipation
        inequality, ...), ``stop_reason`` and ``warnings`` (one ``RunWarning`` per cause, with
        how many steps raised it).

    Raises
    ------
    ValueError
        If neither ``tau`` nor ``controller`` is given, or the arguments do not fit together.
    SolverError
        If a step fails and ``throw`` is True.

    Notes
    -----
    Each step is :math:`\mu^{k+1} \in \mathop{\mathrm{argmin}}_\mu F(\mu) +
    D^2(\mu, \mu^k)/(2\tau)` (or the method's approximation of it). Every step records the
    slack of the dissipation inequality

    .. math::

        F(\mu^{k+1}) + \frac{1}{2\tau} D^2(\mu^{k+1}, \mu^k) \le F(\mu^k),

    which every exact JKO step satisfies (compare with :math:`\mu = \mu^k`); a violation
    beyond ``DISSIPATION_RTOL`` warns (:class:`~jko_ift.DissipationWarning`). Warnings raised
    inside the steps are reported once per cause at the end of the run, with their count.

    See Also
    --------
    jko_step : one step.

    Examples
    --------
    >>> mu0 = jk.Measure([[1.0], [2.0]], [0.5, 0.5])
    >>> F = jk.Potential(lambda x: 0.5 * x[:, 0] ** 2, lambda x: x)
    >>> tr = jk.solve(F, jk.Wasserstein(), mu0, tau=0.5, steps=4, method=jk.ParticleJKO(),
    ...               progress=False)
    >>> tr.stop_reason, len(tr.measures), bool(np.all(np.diff(tr.energies) < 0))
    ('steps', 5, True)
    >>> tr.final.points.ravel().round(4).tolist()  # x / (1 + tau)^4
    [0.1975, 0.3951]
    """
    if controller is None and tau is None:
        raise ValueError("give tau (a fixed step) or controller=jk.StepController(...)")
    # the masses are checked (and warned about) by every step, inside the run's log
    check_step_input(F, geometry, mu0, 1.0 if tau is None else tau, warn_masses=False)
    method = _check_method(method)
    stop_rate = _check_stop_level(stop_rate, "stop_rate")
    stop_energy = _check_stop_level(stop_energy, "stop_energy")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be a callable(StepReport) or None, got {callback!r}")
    if controller is not None:
        if not isinstance(controller, StepController):
            raise ValueError(f"controller must be a jk.StepController, got {controller!r}")
        if t_final is None or steps is not None:
            raise ValueError("an adaptive run needs t_final (and no steps)")
        t_final = _positive_time(t_final)
    else:
        tau = float(tau)
        controller = ConstantStepSize(tau, _step_count(tau, steps, t_final))
        t_final = controller.t_final
    F, geometry = on_input_device(F, geometry, mu0)
    run = _Run(F, geometry, method, mu0, t_final, save_at, stop_rate, stop_energy, throw, callback)
    if isinstance(controller, ConstantStepSize):
        run.check_save_grid(controller.tau)
    state = run.start(controller, tau, resume)
    return run.reporting(run.loop, controller, state, progress)


@dataclass(frozen=True)
class RunState:
    """Where a run stands after an accepted step: its time, measure and energy, the method's
    state (None for a method without ``advance``) and the controller's; ``extra_save``: the
    last saved measure is there only because the run stopped (a snapshot off the save
    times), and a resumed run drops it."""

    t: float
    measure: Measure
    energy: float
    method: MethodState | None
    controller: ControllerState
    extra_save: bool = False

    def to_record(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-ready metadata, arrays) for a file next to the trajectory (whose last measure
        is ``measure``): ``from_record`` reads them back. The method's warm starts and caches
        are not kept (``MethodState.to_dict``)."""
        c = self.controller
        meta = {"t": self.t, "energy": self.energy, "extra_save": self.extra_save,
                "method": None if self.method is None else self.method.to_dict(),
                "controller": {"proposed": c.proposed, "previous_error": c.previous_error,
                               "attempt": c.attempt, "failures": c.failures,
                               "accepted": c.accepted,
                               "history_tau": None if c.history is None else c.history[1]}}
        arrays = {}
        if c.history is not None:
            arrays = {"history_points": c.history[0].points, "history_weights": c.history[0].weights}
        return meta, arrays

    @classmethod
    def from_record(cls, meta: dict, arrays, measure: Measure) -> RunState:
        """The state back from ``to_record``; ``measure``: the trajectory's last measure."""
        c = dict(meta["controller"])
        history_tau, history = c.pop("history_tau"), None
        if history_tau is not None:
            points = np.asarray(arrays["history_points"], float)
            weights = np.asarray(arrays["history_weights"], float)
            before = (measure.with_weights(weights) if np.array_equal(points, measure.points)
                      else Measure(points, weights))
            history = (before, float(history_tau))
        method = None if meta["method"] is None else MethodState.from_dict(meta["method"])
        return cls(float(meta["t"]), measure, float(meta["energy"]), method,
                   ControllerState(history=history, **c), bool(meta["extra_save"]))


@dataclass(frozen=True)
class StepReport:
    """What ``solve`` hands its callback after each accepted step: ``step`` (accepted steps
    so far), the time ``t`` reached, the step's ``tau``, the new ``energy`` and ``measure``,
    its ``record`` (its entry of ``Trajectory.stats``), ``t_final`` and ``steps`` (the
    number of steps of a fixed-step run, None for an adaptive one)."""

    step: int
    t: float
    tau: float
    energy: float
    measure: Measure
    record: dict
    t_final: float
    steps: int | None
    _snapshot: Callable[[], Trajectory] = field(repr=False)

    def trajectory(self) -> Trajectory:
        """The run up to this step (stop_reason "running"), with its state: what a checkpoint
        saves, and what ``solve(..., resume=...)`` continues (also when called later)."""
        return self._snapshot()


class _Run:
    """The state of one run: the current measure, what has been saved, the method's state."""

    def __init__(self, F, geometry, method, mu0, t_final, save_at, stop_rate, stop_energy, throw,
                 callback=None):
        self.F, self.geometry, self.method, self.throw = F, geometry, method, throw
        self.t_final, self.stop_rate, self.stop_energy = t_final, stop_rate, stop_energy
        self.save_at = None if save_at is None else _save_times(save_at, t_final)
        self.t, self.mu, self.energy = 0.0, mu0, F.value(mu0)
        self.times, self.measures, self.energies, self.stats = [0.0], [mu0], [self.energy], []
        self.label = f"{type(method).__name__} {type(geometry).__name__}"
        self.scheme = f"{type(method).__name__} in {geometry!r}"  # Trajectory.scheme
        self.log = WarningLog()
        self.callback = callback
        # the protocol's explicit state; a duck-typed method (only ``step``) keeps its own
        self.stateful = issubclass(type(method), Method)
        self.method_state = method.init_state(F, geometry, mu0) if self.stateful else None
        self.controller_state: ControllerState | None = None

    def check_save_grid(self, tau: float) -> None:
        if self.save_at is None:
            return
        on_grid = np.abs(self.save_at / tau - np.round(self.save_at / tau)) <= 1e-6
        if not on_grid.all():
            raise ValueError(f"with a fixed tau = {tau:g}, save_at times must be multiples of "
                             f"tau; {self.save_at[~on_grid].tolist()} are not (use a "
                             "StepController to hit arbitrary times)")

    def start(self, controller, tau, resume: Trajectory | None) -> ControllerState:
        """The controller's state at the start: fresh, or that of ``resume``."""
        if resume is None:
            if isinstance(controller, ConstantStepSize):
                return controller.init_state()
            return controller.init_state(self.t_final, tau)
        if not isinstance(resume, Trajectory):
            raise ValueError(f"resume must be a jk.Trajectory (a run or a snapshot of it), got "
                             f"{type(resume).__name__}")
        self.times, self.measures = list(resume.times), list(resume.measures)
        self.energies, self.stats = list(resume.energies), list(resume.stats)
        self.log.extend(resume.warnings)
        state = resume.state
        if state is None:  # a trajectory read from files: its last measure, fresh states
            return self._restart(controller, tau, resume)
        if state.extra_save:
            del self.times[-1], self.measures[-1], self.energies[-1]
        self.t, self.mu, self.energy = state.t, state.measure, state.energy
        if self.stateful and state.method is not None:
            self.method_state = state.method
        return state.controller

    def _restart(self, controller, tau, resume: Trajectory) -> ControllerState:
        self.t, self.mu, self.energy = float(resume.times[-1]), resume.final, float(resume.energies[-1])
        accepted = len(resume.taus)
        if isinstance(controller, ConstantStepSize):
            return controller.init_state(accepted)
        proposed = resume.taus[-1] if accepted else tau
        state = controller.init_state(self.t_final, proposed)
        return replace(state, attempt=len(resume.stats), accepted=accepted)

    def reporting(self, loop, *args) -> Trajectory:
        """Run ``loop``; then warn once per cause recorded in the steps, also when it raised."""
        try:
            return loop(*args)
        finally:
            self.log.emit()

    # -------------------------------------------------------------------- the loop
    def loop(self, controller, state: ControllerState, progress: bool) -> Trajectory:
        """Attempt steps until the controller is done: a fixed step is always accepted, an
        adaptive one when its estimated error is within the tolerance."""
        fixed = isinstance(controller, ConstantStepSize)
        # grid methods keep their support: their state is the weights alone
        norm = None if fixed else controller.norm(
            self.geometry, self.mu, bool(getattr(self.method, "keeps_support", False)),
            controller.order_of(self.method))
        self.controller_state = state
        with _ProgressBar(self, controller, state.accepted, progress) as bar:
            while not self._finished(controller, state):
                tau = self._next_tau(controller, state, norm)
                state = replace(state, attempt=state.attempt + 1)
                trial = (self._fixed_trial(tau, state.attempt) if fixed
                         else self._adaptive_trial(norm, tau, state))
                self.stats.append(trial.record)
                if trial.result is None:  # a step the solver could not certify
                    if fixed:
                        return self._trajectory("failed", state)
                    state = controller.failed(state, tau)
                    if state.failures > MAX_SOLVER_RETRIES:
                        return self._solver_failure(trial.record, state)
                    continue
                order = None if fixed else norm.order
                accepted, state = controller.accept(state, tau, trial.error, order, self.mu)
                if not accepted:
                    continue  # the trial steps are dropped: a rejection leaves no state behind
                self.method_state = trial.method_state
                reason = self._advance(tau, trial.result.measure, trial.result.energy)
                self.controller_state = state
                bar.update(tau, self.energy, trial.record)
                if self.callback is not None and self.callback(self._report(tau, controller)):
                    reason = reason or "callback"
                if reason:
                    return self._trajectory(reason, state)
        return self._trajectory("steps" if fixed else "t_final", state)

    def _finished(self, controller, state: ControllerState) -> bool:
        if isinstance(controller, ConstantStepSize):
            return controller.finished(state, self.t)
        return self.t >= self.t_final * (1 - TIME_RTOL)

    def _next_tau(self, controller, state: ControllerState, norm) -> float:
        """The tau of the next attempt: the fixed one, or the proposed one, landing on save and
        final times without a sliver of a step before them (a sliver's solver noise,
        extrapolated by tau/sliver, would spoil the next error estimate)."""
        if isinstance(controller, ConstantStepSize):
            return controller.tau
        proposed = state.proposed
        if proposed < controller.tau_min:
            raise SolverError(
                f"adaptive step size {proposed:.3g} fell below tau_min = "
                f"{controller.tau_min:.3g} at t = {self.t:.6g}: the requested accuracy "
                f"(rtol={controller.rtol:g}, atol={controller.atol:g}) needs smaller steps; "
                f"loosen rtol/atol or lower tau_min{norm.hint()}", status="tau_min")
        remaining = self._next_stop() - self.t
        return (remaining if remaining <= 1.1 * proposed
                else remaining / 2 if remaining < 2 * proposed else proposed)

    def _fixed_trial(self, tau: float, step: int) -> _Trial:
        result, record, method_state = self._attempt(self.mu, tau, step, self.method_state)
        return _Trial(result, record, method_state, 0.0)

    def _adaptive_trial(self, norm, tau: float, state: ControllerState) -> _Trial:
        """One attempt of an adaptive run: the solve(s) and the error estimate; ``result`` None
        when a solve was not certified (its record says why)."""
        start = time.perf_counter()
        history, attempt = state.history, state.attempt
        new, records, estimate, kind = None, [], None, "extrapolation"
        if norm.estimate == "extrapolation" and history is not None:
            new, record, method_state = self._attempt(self.mu, tau, attempt, self.method_state,
                                                      throw=False)
            records.append(record)
            if new is not None:
                estimate = norm.extrapolation(new.measure, self.mu, history[0], tau, history[1])
        if not records or (new is not None and estimate is None):  # no history: doubling
            new, records, estimate, method_state = self._doubling(norm, tau, attempt)
            kind = "doubling"
        failed = next((r for r in records if not Status(r["status"]).ok), None)
        if failed is not None:
            return _Trial(None, failed | {"accepted": False, "solves": len(records), "t": self.t,
                                          "error": np.inf}, None, np.inf)
        error, local = estimate
        record = {
            "step": attempt, "t": self.t, "tau": tau, "accepted": error <= 1.0, "error": error,
            "error_distance": local, "solves": len(records), "estimate": kind,
            "wall_time": time.perf_counter() - start, "status": new.status,
            "certificate": max(r["certificate"] for r in records),
            "objective": new.objective, "distance_sq": new.distance_sq,
            "dissipation_slack": min(r["dissipation_slack"] for r in records[-2:]),
            # on a fixed grid, locked sub-steps make the estimate measure the grid, not tau
            "grid_locked": any(r.get("grid_locked", False) for r in records),
            "error_bound": _summed_bound(records[-2:] if kind == "doubling" else records[-1:]),
        }
        return _Trial(new, record, method_state, error)

    def _doubling(self, norm, tau: float, attempt: int):
        """One step of tau and two of tau/2: (the two half steps' result, the solves' records,
        (normalized error, local error) or None when a solve failed, the method's state after
        the two half steps)."""
        state = self.method_state
        coarse, coarse_record, _ = self._attempt(self.mu, tau, attempt, state, throw=False)
        if coarse is None:
            return None, [coarse_record], None, None
        half, half_record, state = self._attempt(self.mu, tau / 2, attempt, state, throw=False)
        if half is None:
            return None, [coarse_record, half_record], None, None
        fine, fine_record, state = self._attempt(half.measure, tau / 2, attempt, state, throw=False)
        records = [coarse_record, half_record, fine_record]
        if fine is None:
            return None, records, None, None
        return fine, records, norm.doubling(self.mu, coarse.measure, fine.measure), state

    # -------------------------------------------------------------------- shared pieces
    def _attempt(self, mu: Measure, tau: float, step: int, state: MethodState | None,
                 throw: bool | None = None):
        """Solve one step from the method state ``state``; (result, record, the state after
        it), result None when it failed without throwing."""
        start = time.perf_counter()
        throw = self.throw if throw is None else throw
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return self._checked_step(mu, tau, step, throw, start, state)
            finally:
                self.log.record(step, caught)

    def _checked_step(self, mu: Measure, tau: float, step: int, throw: bool, start: float, state):
        if self.stateful:
            result, state = self.method.advance(self.F, self.geometry, mu, tau, state, throw=throw)
        else:
            result = jko_step(self.F, self.geometry, mu, tau, method=self.method, throw=throw)
        record = {"step": step, "tau": tau, "wall_time": time.perf_counter() - start,
                  "status": result.status, "certificate": result.certificate,
                  "objective": result.objective, "distance_sq": result.distance_sq}
        record.update({key: value for key, value in result.info.items()
                       if np.isscalar(value) and key not in record})
        if not result.ok or result.measure is None:
            return None, record, state
        # the inequality the method guarantees is for what it minimizes (entropic: with its term)
        minimized = result.info.get("regularized_objective", result.objective)
        # F(mu^k) is known when the step starts from the run's measure (fixed steps, the first
        # of a doubling): F(mu^k) - minimized, the slack of ``dissipation_slack``
        slack = (float(self.energy - minimized) if mu is self.mu
                 else dissipation_slack(self.F, mu, minimized))
        record["dissipation_slack"] = slack
        if slack < -DISSIPATION_RTOL * max(1.0, abs(minimized + slack)):
            warn_user(f"step {step}: F(mu^k+1) + D^2/(2 tau) exceeds F(mu^k) by {-slack:.3g}; "
                      f"{_dissipation_diagnosis(result)}", DissipationWarning)
        return result, record, state

    def _advance(self, tau: float, mu: Measure, energy: float) -> str | None:
        """Move to t + tau; save; return a stop reason or None."""
        rate = (self.energy - energy) / tau
        mu = with_array_type(mu, self.mu.array_type)  # results in the type the run started from
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

    def _report(self, tau: float, controller) -> StepReport:
        steps = controller.steps if isinstance(controller, ConstantStepSize) else None
        # what the snapshot needs, as it is now (the lists only grow; the states are replaced)
        saved, recorded, warned = len(self.times), len(self.stats), self.log.warnings()
        state = RunState(self.t, self.mu, self.energy, self.method_state, self.controller_state)
        return StepReport(self.controller_state.accepted, self.t, tau, self.energy, self.mu,
                          self.stats[-1], self.t_final, steps,
                          lambda: self._snapshot(saved, recorded, state, warned))

    def _snapshot(self, saved: int, recorded: int, state: RunState, warned) -> Trajectory:
        """The run when it had ``saved`` measures and ``recorded`` stats, its last measure
        saved (``RunState.extra_save`` when it is kept only for this), with its state."""
        times, measures = self.times[:saved], self.measures[:saved]
        energies = self.energies[:saved]
        if times[-1] != state.t:
            times, measures = times + [state.t], measures + [state.measure]
            energies, state = energies + [state.energy], replace(state, extra_save=True)
        return Trajectory(np.array(times), measures, np.array(energies), self.stats[:recorded],
                          "running", warned, state, self.scheme)

    def _is_save_time(self, t: float) -> bool:
        return bool(np.any(np.abs(self.save_at - t) <= TIME_RTOL * self.t_final))

    def _next_stop(self) -> float:
        if self.save_at is None:
            return self.t_final
        later = self.save_at[self.save_at > self.t + TIME_RTOL * self.t_final]
        return float(later[0]) if later.size else self.t_final

    def _solver_failure(self, record: dict, state: ControllerState) -> Trajectory:
        if not self.throw:
            return self._trajectory("failed", state)
        raise SolverError(f"adaptive run stopped at t = {self.t:.6g}: {MAX_SOLVER_RETRIES + 1} "
                          f"step solves in a row were not certified (last status "
                          f"{record['status']!r}, certificate {record['certificate']:.3g}) although "
                          f"tau was cut each time: {Status(record['status']).advice}; smaller steps "
                          "do not cure it, so try another solver or solver_options",
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

    def _trajectory(self, reason: str, state: ControllerState) -> Trajectory:
        self._check_grid_run()
        extra = reason == "callback" and self.times[-1] != self.t
        if extra:  # Trajectory.final is where the run stopped, also off the save times
            self.times.append(self.t)
            self.measures.append(self.mu)
            self.energies.append(self.energy)
        # a finished run keeps what resuming needs, not its caches (compiled programs: megabytes)
        method_state = None if self.method_state is None else self.method_state.without_cache()
        state = RunState(self.t, self.mu, self.energy, method_state, state, extra)
        return Trajectory(np.array(self.times), self.measures, np.array(self.energies),
                          self.stats, reason, self.log.warnings(), state, self.scheme)


@dataclass(frozen=True)
class _Trial:
    """One attempt: the step's result (None: not certified), its stats record, the method's
    state after it and the normalized error (0 for a fixed step)."""

    result: StepResult | None
    record: dict
    method_state: MethodState | None
    error: float


class _ProgressBar:
    """The run's progress bar (``display.progress_bar``: log lines when stderr is no terminal):
    steps for a fixed run, time for an adaptive one (disabled without ``progress``); a resumed
    run's bar starts where it stands."""

    def __init__(self, run: _Run, controller, accepted: int, progress: bool):
        if isinstance(controller, ConstantStepSize):
            self.bar = progress_bar(total=controller.steps, initial=accepted,
                                    disable=not progress, desc=run.label, unit="step")
            self.per_step = True
        else:
            self.bar = progress_bar(total=run.t_final, initial=run.t, disable=not progress,
                                    desc=run.label, unit="time",
                                    bar_format="{l_bar}{bar}| t={n:.4g}/{total:.4g} "
                                    "[{elapsed}<{remaining}{postfix}]")
            self.per_step = False

    def update(self, tau: float, energy: float, record: dict | None = None) -> None:
        """Advance by one accepted step; the postfix shows its energy and, from its stats
        ``record``, the solver's iterations and the step's wall time (what a slow step spends)."""
        self.bar.update(1 if self.per_step else tau)
        shown = {} if self.per_step else {"tau": f"{tau:.3g}"}
        shown["energy"] = f"{energy:.4g}"
        record = record or {}
        if record.get("iterations") is not None:
            shown["iterations"] = int(record["iterations"])
        if record.get("wall_time") is not None:
            shown["step"] = f"{record['wall_time']:.3g}s"
        self.bar.set_postfix(shown, refresh=False)

    def __enter__(self) -> _ProgressBar:
        self._inner = showing_iterations(self.bar)  # a long step's iterations on the bar
        self._inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._inner.__exit__(*exc)
        self.bar.close()


def _dissipation_diagnosis(result: StepResult) -> str:
    """Why a step broke the dissipation inequality: an explicit step or piece (it reports its
    ``stability_ratio`` tau kappa; status "explicit": nothing is solved, so no certificate
    measures its error) breaks it whenever tau kappa > 1, although it is stable up to 2; an
    implicit step only by an inaccurate solve."""
    ratio = result.info.get("stability_ratio")
    if ratio is None:
        return f"the solve is less accurate than certified (certificate {result.certificate:.2g})"
    return (f"the step is explicit (or has explicit pieces, whose error no certificate "
            f"measures): a time-stepping "
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
    return positive_finite(t_final, "t_final", "a positive time")


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
