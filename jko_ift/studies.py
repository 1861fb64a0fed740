"""Studies over many runs: work-precision of fixed against error-controlled step sizes, tau -> 0
convergence studies (``convergence_study``), scheme comparisons (``compare_schemes``) and
parameter sweeps (``sweep``, serial or on Dask distributed)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .control import StepController
from .display import Table, html_summary, text_summary
from .methods import grid_motion
from .methods.grid_motion import (
    LOCKED_FRACTION,
    ROUNDING_SHARE,
    STALL_RATIO,
    SUBCELL_BLUR,
    expected_moved_fraction,
)
from .solve import DissipationWarning, Trajectory, solve

if TYPE_CHECKING:
    from .problems import ParticleExperiment

#: Details of the studies (one line per run, scheme or case) at DEBUG level; ``jko-ift -v`` shows them.
logger = logging.getLogger(__name__)


def _progress_bar(total: int, label: str, unit: str, progress: bool):
    """One bar over the runs of a study on stderr (``display.progress_bar``: log lines when stderr
    is no terminal; disabled without progress)."""
    from .display import progress_bar

    return progress_bar(total=total, disable=not progress, desc=label, unit=unit)


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
    saved times); ``method_factory`` gives the method of each run (``jk.solve`` gives every
    run its own method state, so no run profits from another's caches; a factory also serves
    duck-typed methods that keep their own). ``controller_options``: the other ``StepController`` fields, the
    same for every rtol (atol included: its default gives the components at 0, a cell without
    mass or a coordinate near 0, a tolerance). Returns (fixed, adaptive).
    """
    fixed_runs = [solve(F, geometry, mu0, tau=t_final / n, steps=n, method=method_factory(),
                        save_at=save_at, progress=progress) for n in steps]
    options = dict(controller_options or {})
    adaptive_runs = [solve(F, geometry, mu0, t_final=t_final, method=method_factory(),
                           controller=StepController(rtol=rtol, **options), save_at=save_at,
                           progress=progress) for rtol in rtols]

    def curve(label, parameter, runs):
        return WorkPrecision(label, np.asarray(parameter, float),
                             np.array([run.step_solves for run in runs]),
                             np.array([error(run) for run in runs]), tuple(runs))

    return curve("fixed tau", steps, fixed_runs), curve("adaptive", rtols, adaptive_runs)


# ---------------------------------------------------------------------------- tau -> 0 studies

#: Grid locking (a step that moved less than ``STALL_RATIO`` of what the flow carries across cells,
#: or nothing) is judged by the methods' own ``grid_motion`` (re-exported here), and so is the
#: h / tau rounding regime of a whole run (``ROUNDING_SHARE`` of its time error, ``grid_share``).

#: Entropic diffusion flags a row when its estimated error, sqrt(s^2 + d eps t / (2 tau)) - s (the
#: spurious heat flow eps / (4 tau) acting for t on a measure of spread s, without the flow's own
#: contraction), exceeds this multiple of the run's time-error estimate (in length: h times the
#: cells of ``grid_share``; off a grid, of the row's error). Measured on Ornstein-Uhlenbeck from
#: N(2, 0.25) on [-4, 6] to t = 1 (tests/test_grid_regimes.py): eps = 1e-3 on 400 cells, a clean
#: order-1 run, reaches 0.65 at tau = 0.025; eps = 1e-2 on 100 cells, whose error rises as tau
#: shrinks below 0.05, gives 1.6 at tau = 0.05 and 6 at tau = 0.025.
DIFFUSION_MARGIN = 0.5
#: Solver tolerance flags a row when the accumulated error bound of its steps (the sum of
#: ``info["error_bound"]``, docs/conic.md §8) exceeds this fraction of the row's error: then the
#: solver's error is not well below the scheme's and bends the fitted order. Measured on the
#: Hellinger flow of KL (tests/test_convergence.py): with the default tolerances the sum stays
#: below 3.5 % of the error (tau 0.05 ... 0.00625); with Clarabel at 1e-8 it reaches 38 % at
#: tau = 0.0125 and 180 % at 0.00625, where the order drops.
SOLVER_MARGIN = 0.1
#: Steps without an error bound flag the row when their relative certificate exceeds this
#: fraction of the error: a weak check (a relative residual is not an error), kept as it was.
CERTIFICATE_MARGIN = 1.0

COLUMNS = ("tau", "h", "steps", "locked_steps", "grid_share", "error", "wall_time", "flags")


@dataclass(frozen=True, repr=False)
class ConvergenceStudy:
    """The table of a tau -> 0 study and the order fitted on its clean rows.

    rows: one dict per tau with ``tau``, ``h`` (grid spacing, None off a grid), ``steps``,
    ``locked_steps`` (how many steps were grid-locked, ``locked_steps``), ``grid_share`` (the
    grid's share of the error, ``grid_share``; None without grid statistics), ``error``,
    ``wall_time`` and ``flags`` (a list of the regimes that spoil the order there:
    ``"grid_locking in k/n steps"``, ``"grid_rounding"``, ``"entropic_diffusion"``,
    ``"solver_tolerance"``, ``"error_grows_as_tau_shrinks"``, ``"reference_spoiled"``).
    ``order`` is ``diagnostics.convergence_order`` over the unflagged rows (None with fewer than
    two), ``order_all`` over every row. ``reference`` says what the errors are measured against;
    ``reference_flags`` the regimes found in the reference run itself (a fine run; empty for a
    closed form): when there are any, every row is flagged ``reference_spoiled`` and no order is
    fitted.
    """

    rows: list
    order: object
    order_all: object
    reference: str
    distance: str
    trajectories: tuple = ()
    reference_flags: tuple = ()

    @property
    def interval(self) -> tuple[float, float] | None:
        """95% confidence interval of ``order`` (None without a clean fit)."""
        return None if self.order is None else self.order.interval()

    @property
    def flagged(self) -> bool:
        return any(row["flags"] for row in self.rows) or bool(self.reference_flags)

    def summary(self) -> dict:
        def fit(order):
            if order is None:
                return None
            lo, hi = order.interval()
            return {"order": order.order, "stderr": order.stderr, "constant": order.constant,
                    "samples": order.samples, "interval95": [lo, hi]}
        return {"reference": self.reference, "reference_flags": list(self.reference_flags),
                "distance": self.distance, "rows": self.rows,
                "order": fit(self.order), "order_all_rows": fit(self.order_all),
                "flagged_rows": [row["tau"] for row in self.rows if row["flags"]]}

    def _summary(self) -> tuple[str, list, list, Table]:
        fields = [("reference", self.reference), ("distance", self.distance), ("runs", len(self.rows))]
        if self.order is not None:
            lo, hi = self.order.interval()
            fields.append(("order (clean rows)", f"{self.order.order:.3f} (95%: {lo:.3f} to {hi:.3f}, "
                                                 f"{self.order.samples} rows)"))
        else:
            fields.append(("order (clean rows)", "not fitted: fewer than two unflagged rows"))
        if self.order_all is not None:
            fields.append(("order (all rows)", self.order_all.order))
        walls = [r["wall_time"] for r in self.rows if r.get("wall_time") is not None]
        if walls:
            fields.append(("wall time", f"{sum(walls):.4g} s"))
        notes = [f"tau = {row['tau']:g}: {', '.join(row['flags'])}" for row in self.rows if row["flags"]]
        notes += [f"reference run: {flag}" for flag in self.reference_flags]
        return "ConvergenceStudy", fields, notes, self.table()

    def table(self) -> Table:
        """The rows (``COLUMNS``) as a ``display.Table``; ``.to_frame()`` for pandas."""
        return Table(self.rows, COLUMNS)

    def to_frame(self):
        """The rows as a pandas DataFrame (needs pandas: ``pip install pandas``)."""
        return self.table().to_frame()

    def __repr__(self) -> str:
        return text_summary(*self._summary())

    def _repr_html_(self) -> str:
        """The study for a notebook: reference, fitted order with its interval, the flags and the
        table of runs (text escaped)."""
        return html_summary(*self._summary())

    def plot(self, ax=None, *, title: str | None = None):
        """Error against tau, log-log: the runs, the flagged rows, the fit and a slope-1 guide
        (``plotting.draw_convergence``).

        Parameters
        ----------
        ax : matplotlib.axes.Axes, optional
            The Axes to draw the study into (default: those of a new figure).
        title : str, optional
            The Axes' title (e.g. the problem's name).

        Returns
        -------
        matplotlib.axes.Axes
        """
        from .plotting import draw_convergence

        return draw_convergence(self, ax, title=title)


def _grid_spacing(mu) -> float | None:
    grid = getattr(mu, "grid", None)
    return None if grid is None else float(np.max(grid.spacing))


def _steps_for(t_final: float, tau: float) -> int:
    steps = int(round(t_final / tau))
    if steps < 1 or abs(steps * tau - t_final) > 1e-9 * max(t_final, 1.0):
        raise ValueError(f"t_final = {t_final:g} is not a whole number of steps of tau = {tau:g}; "
                         "choose step sizes that divide the final time")
    return steps


def _accepted(trajectory) -> list:
    return [s for s in trajectory.stats if s.get("accepted", True)]


def locked_steps(trajectory, energy=None, geometry=None) -> tuple[int, int]:
    """(locked, steps): how many accepted steps of a run were grid-locked, out of how many.

    A W2 step on a fixed grid is locked when the method says so (``info["grid_locked"]``, see
    ``methods.grid_motion``: it moved less than ``STALL_RATIO`` of the mass the flow carries
    across cells), or, for stats without that verdict, when it moved at most
    ``LOCKED_FRACTION`` of the mass or, given the run's ``energy`` and ``geometry`` and a
    trajectory that saved every step, less than ``STALL_RATIO`` times
    ``expected_moved_fraction``. Steps without a transport plan (``moved_fraction``) never count.
    """
    stats = _accepted(trajectory)
    every_step = energy is not None and len(trajectory.measures) == len(stats) + 1
    locked = 0
    for k, s in enumerate(stats):
        moved = s.get("moved_fraction")
        if "grid_locked" in s and (s["grid_locked"] or "expected_moved_fraction" in s):
            locked += bool(s["grid_locked"])
        elif moved is not None and moved <= LOCKED_FRACTION:
            locked += 1
        elif moved is not None and every_step:
            expected = expected_moved_fraction(energy, geometry, trajectory.measures[k], s["tau"])
            locked += expected is not None and expected > LOCKED_FRACTION and moved < STALL_RATIO * expected
    return locked, len(stats)


def time_error_cells(trajectory) -> float | None:
    """The run's time-error estimate in grid cells (``methods.grid_motion.time_error_cells``)."""
    return grid_motion.time_error_cells(_accepted(trajectory))


def grid_share(trajectory) -> float | None:
    """The grid's share of a run's error, estimated from its steps (``methods.grid_motion``):
    |sum_k (step displacement - flow displacement)| / ``time_error_cells``, both in cells."""
    return grid_motion.grid_share(_accepted(trajectory))


def entropic_diffusion_error(trajectory, t_final: float, dim: int) -> float | None:
    """The error the entropic blur adds by t_final, sqrt(s^2 + d eps t / (2 tau)) - s: the spurious
    heat flow of coefficient eps / (4 tau) (theory §7) spreading the final measure of rms radius s
    (without the flow's own contraction, so an upper estimate). None without entropic steps."""
    stats = _accepted(trajectory)
    eps = [s["eps"] for s in stats if s.get("eps") is not None]
    if not eps:
        return None
    tau = float(np.mean([s["tau"] for s in stats]))
    final = trajectory.measures[-1] if trajectory.measures else None
    spread = 0.0
    if final is not None and getattr(final, "mass", 0) > 0:
        spread = float(np.sqrt(max(np.trace(np.atleast_2d(final.covariance())), 0.0)))
    return float(np.sqrt(spread**2 + dim * max(eps) * t_final / (2 * tau)) - spread)


def _flags(trajectory, error: float, t_final: float, dim: int, energy=None, geometry=None,
           locked: tuple[int, int] | None = None) -> list[str]:
    """The regimes that spoil the order in this run (see ``convergence_study``); ``locked`` is
    ``locked_steps(trajectory, energy, geometry)`` if already computed."""
    flags = []
    stats = _accepted(trajectory)
    locked, steps = locked if locked is not None else locked_steps(trajectory, energy, geometry)
    # Any locked step flags the row. A locked step leaves the measure where it was: an error of
    # about tau alpha |grad f| (the whole displacement of the step), the size of the global
    # O(tau) error itself, so even one such step changes the error constant of the row. And the
    # share of locked steps is not the same across rows (locking sets in once tau alpha |grad f|
    # < h, so smaller tau lock earlier and more often on a fixed grid): the error of the row is
    # a mix of scheme error and frozen steps that does not scale like tau^order.
    if locked:
        flags.append(f"grid_locking in {locked}/{steps} steps")
    from .methods.entropic import BLUR_WARN_RATIO

    # a blur that dominates a step, or spans a cell, moves barycentres by itself: that displacement
    # is the entropic diffusion's, not the grid's (methods.grid_motion.SUBCELL_BLUR)
    h = _grid_spacing(trajectory.measures[-1]) if trajectory.measures else None
    dominated = max((s.get("blur_ratio") or 0.0 for s in stats), default=0.0) > BLUR_WARN_RATIO
    wide = h is not None and max((s.get("eps") or 0.0 for s in stats), default=0.0) >= SUBCELL_BLUR * h**2
    share = grid_share(trajectory)
    if share is not None and share > ROUNDING_SHARE and not (dominated or wide):
        flags.append("grid_rounding")
    # entropic diffusion only where the grid does not explain the error: a locked entropic run
    # (eps below h^2) is grid locking, and a smaller eps would make it worse
    if not flags and _diffusion_dominates(trajectory, error, t_final, dim, h, dominated):
        flags.append("entropic_diffusion")
    if _solver_tolerance_spoils(stats, error):
        flags.append("solver_tolerance")
    if trajectory.stop_reason not in ("steps", "t_final"):
        flags.append(f"stopped_{trajectory.stop_reason}")
    return flags


def _diffusion_dominates(trajectory, error: float, t_final: float, dim: int, h: float | None,
                         dominated: bool) -> bool:
    """Whether the entropic blur of the run (if any) dominates a step or its diffusion error
    (``entropic_diffusion_error``) exceeds ``DIFFUSION_MARGIN`` times the run's time error (in
    cells times h where the grid says, else ``error``)."""
    blur_error = entropic_diffusion_error(trajectory, t_final, dim)
    if blur_error is None:
        return False
    cells = time_error_cells(trajectory)
    scale = cells * h if cells is not None and h is not None else error
    return dominated or blur_error > DIFFUSION_MARGIN * scale


def _solver_tolerance_spoils(stats, error: float) -> bool:
    """Whether the steps' solver errors are not well below the run's ``error``.

    The steps' error bounds add up (a non-expansive step map carries each step's error to the
    end; the flows here contract). Steps without a bound (transport geometries on a fixed support,
    entropic and particle methods) are judged by their relative certificate only."""
    bounds = [s.get("error_bound") for s in stats]
    bounded = [b for b in bounds if b is not None]
    certificates = [s["certificate"] for s, b in zip(stats, bounds, strict=True)
                    if b is None and s.get("certificate") is not None]
    return bool((bounded and sum(bounded) > SOLVER_MARGIN * error)
                or (certificates and max(certificates) > CERTIFICATE_MARGIN * error)
                or not np.isfinite(sum(bounded) + max(certificates, default=0.0)))


def _flag_growing_errors(rows) -> None:
    """Flag every row whose error exceeds that of the row with the next larger tau (rows in
    decreasing tau): a consistent scheme's error shrinks with tau, so such a row is in a regime
    the other flags missed, and must not enter the fitted order."""
    for previous, row in zip(rows[:-1], rows[1:], strict=True):
        if (row["error"] is not None and previous["error"] is not None
                and row["error"] > previous["error"]):
            if not row["flags"]:
                row["flags"].append("error_grows_as_tau_shrinks")


def _reference_flags(trajectory, t_final: float, dim: int, finest_tau: float, smallest_error: float) -> list:
    """The regimes of the fine reference run: any locked step; a grid share whose error, against
    the finest row's time error (reference_tau / finest_tau times larger), is above
    ``ROUNDING_SHARE``; an entropic diffusion error above ``DIFFUSION_MARGIN`` times the
    smallest error of the rows."""
    flags = []
    locked, steps = locked_steps(trajectory)
    if locked:
        flags.append(f"grid_locking in {locked}/{steps} steps")
    share = grid_share(trajectory)
    reference_tau = float(np.mean([s["tau"] for s in _accepted(trajectory)]))
    if share is not None and share * reference_tau / finest_tau > ROUNDING_SHARE:
        flags.append("grid_rounding")
    blur_error = entropic_diffusion_error(trajectory, t_final, dim)
    if blur_error is not None and not flags and blur_error > DIFFUSION_MARGIN * smallest_error:
        flags.append("entropic_diffusion")
    return flags


def _fit(rows):
    from .diagnostics import convergence_order

    usable = [r for r in rows if r["error"] is not None and np.isfinite(r["error"]) and r["error"] > 0]
    if len(usable) < 2 or len({r["tau"] for r in usable}) < 2:
        return None
    return convergence_order([r["tau"] for r in usable], [r["error"] for r in usable])


def convergence_study(problem, taus: Sequence[float], *, method_factory: Callable[[], object] | None = None,
                      t_final: float | None = None, refine: Callable[[float], object] | None = None,
                      reference: str = "auto", reference_tau: float | None = None,
                      distance: str = "mmd", kernel=None, keep_trajectories: bool = False,
                      progress: bool = False) -> ConvergenceStudy:
    """Run ``problem`` once per step size tau to ``t_final`` and fit error ~ C tau^order.

    problem: anything with ``energy``, ``geometry``, ``initial``, ``t_final`` and optionally
    ``error`` (a ``problems.Problem``). refine: a callable tau -> problem that refines the grid
    with tau (then ``h`` shrinks with tau; without it the grid is fixed). method_factory: a
    fresh method per run (default ``ConicJKO``).

    The reference: ``"closed_form"`` (``problem.error(trajectory)``, the largest distance to
    the exact flow over the saved times), ``"fine"`` (a run with step ``reference_tau``,
    default min(taus) / 8, on the finest problem; the error is ``distance`` = ``"mmd"`` (with
    ``kernel``, default the problem's kernel or a Gaussian of width 1) or ``"w2"`` between the
    final measures) or ``"auto"`` (closed form when the problem has one).

    Every row is flagged where a known regime spoils the order: ``grid_locking in k/n steps``
    (k of its n W2 steps moved no mass, or far less than the flow would, because tau alpha
    |grad f| is below the grid spacing; any k > 0 flags, see ``locked_steps``), ``grid_rounding``
    (the h / tau regime: the steps round the flow's displacement to whole cells and the grid's
    share of the error, ``grid_share``, is above ``ROUNDING_SHARE``), ``entropic_diffusion`` (an
    entropic method, not grid-flagged, whose spurious diffusion error
    ``entropic_diffusion_error`` exceeds ``DIFFUSION_MARGIN`` times the run's time error, or
    whose blur dominates a step), ``solver_tolerance`` (the steps' accumulated error bound not
    well below the error, ``SOLVER_MARGIN``; a relative certificate where a step has no bound),
    ``error_grows_as_tau_shrinks`` (an otherwise clean row whose error exceeds that of the next
    larger tau) and ``reference_spoiled`` (every row, when the fine reference run is itself
    locked, rounded or blurred: ``reference_flags``). The order is fitted on the unflagged rows
    only.

    progress: one bar over the runs (the reference run, then one per tau) with the last error;
    each row is logged at DEBUG level (logger ``jko_ift.studies``).
    """
    taus = _checked_taus(taus, distance, reference)
    method_factory = method_factory or _default_method
    t_final = float(t_final if t_final is not None else problem.t_final)
    steps = [_steps_for(t_final, tau) for tau in taus]  # check before computing anything
    problems_by_tau = [refine(tau) if refine is not None else problem for tau in taus]
    ref = _choose_reference(problem, problems_by_tau[0], t_final, taus[-1], reference, reference_tau,
                            distance, kernel)
    rows, trajectories = [], []
    with _progress_bar(len(taus) + (not ref.closed), "converge", "run", progress) as bar:
        reference_run = None
        if not ref.closed:
            bar.set_postfix_str(f"reference run, tau={ref.tau:g}")
            reference_run, wall = _timed_run(problems_by_tau[-1], ref.tau, ref.steps, method_factory)
            bar.update(1)
            logger.debug("reference run: tau = %g, %d steps, %.2f s", ref.tau, ref.steps, wall)
        for p, tau, n in zip(problems_by_tau, taus, steps, strict=True):
            bar.set_postfix_str(f"running tau={tau:g}")
            trajectory, wall = _timed_run(p, tau, n, method_factory)
            row = _study_row(p, tau, n, trajectory, wall, ref.error(p, trajectory, reference_run), t_final)
            rows.append(row)
            if keep_trajectories:
                trajectories.append(trajectory)
            bar.set_postfix_str(f"tau={tau:g}: error={row['error']:.3g}", refresh=False)
            bar.update(1)
    _flag_growing_errors(rows)
    reference_flags = () if ref.closed else _flag_spoiled_reference(rows, reference_run, ref, t_final,
                                                                     problem.initial.dim, taus[-1])
    clean = [r for r in rows if not r["flags"]]
    return ConvergenceStudy(rows, _fit(clean), _fit(rows), ref.description(), distance if not ref.closed
                            else "closed form", tuple(trajectories), reference_flags)


def _default_method():
    from .methods import ConicJKO

    return ConicJKO()


def _checked_taus(taus, distance: str, reference: str) -> list[float]:
    """The step sizes of a convergence study in decreasing order, its options checked."""
    taus = sorted((float(t) for t in taus), reverse=True)
    if len(taus) < 2 or any(not (np.isfinite(t) and t > 0) for t in taus):
        raise ValueError(f"a convergence study needs at least two positive step sizes, got {taus}")
    if distance not in ("mmd", "w2"):
        raise ValueError(f"distance must be 'mmd' or 'w2', got {distance!r}")
    if reference not in ("auto", "closed_form", "fine"):
        raise ValueError(f"reference must be 'auto', 'closed_form' or 'fine', got {reference!r}")
    return taus


@dataclass(frozen=True)
class _Reference:
    """What a convergence study measures its errors against: the closed form of the problem
    (``closed``), or the final measure of a fine run (step ``tau``, ``steps`` steps) in the
    ``distance`` "mmd" (with ``kernel``) or "w2"."""

    closed: bool
    distance: str
    tau: float | None = None
    steps: int | None = None
    kernel: object = None

    def description(self) -> str:
        if self.closed:
            return "closed form (problem.error: largest distance over the saved times)"
        return (f"run with tau = {self.tau:g} ({self.steps} steps) on the finest problem; "
                f"{self.distance} distance between the final measures")

    def error(self, problem, trajectory, reference_run) -> float:
        from .diagnostics import mmd, w2

        if self.closed:
            return float(problem.error(trajectory))
        if self.distance == "mmd":
            return mmd(trajectory.final, reference_run.final, self.kernel)
        return w2(trajectory.final, reference_run.final)


def _choose_reference(problem, first, t_final: float, finest_tau: float, reference: str,
                      reference_tau: float | None, distance: str, kernel) -> _Reference:
    """The closed form when ``first`` (the problem of the largest tau) has one and ``reference``
    allows it, else a fine run with step ``reference_tau`` (default finest_tau / 8)."""
    from .kernels import Gaussian

    closed = getattr(first, "error", None) is not None
    if reference == "closed_form" and not closed:
        raise ValueError("this problem has no closed form (problem.error is None); use reference='fine'")
    if closed and reference != "fine":
        return _Reference(True, distance)
    fine_tau = float(reference_tau) if reference_tau is not None else finest_tau / 8
    fine_steps = _steps_for(t_final, fine_tau)
    if kernel is None:
        kernel = (getattr(problem.energy, "kernel", None) or getattr(problem.geometry, "kernel", None)
                  or Gaussian(1.0))
    return _Reference(False, distance, fine_tau, fine_steps, kernel)


def _timed_run(p, tau: float, n: int, method_factory) -> tuple:
    """(trajectory, wall time) of ``n`` steps of size ``tau`` on the problem ``p``."""
    start = time.perf_counter()
    trajectory = solve(p.energy, p.geometry, p.initial, tau=tau, steps=n, method=method_factory(),
                       progress=False)
    return trajectory, time.perf_counter() - start


def _study_row(p, tau: float, n: int, trajectory, wall: float, error: float, t_final: float) -> dict:
    """The row of one run of a convergence study, with its flags (logged at DEBUG level)."""
    locked = locked_steps(trajectory, p.energy, p.geometry)
    flags = _flags(trajectory, error, t_final, p.initial.dim, locked=locked)
    logger.debug("tau = %g: %d steps, error %.6g, %d locked, %.2f s%s", tau, n, error, locked[0],
                 wall, f" ({', '.join(flags)})" if flags else "")
    return {"tau": tau, "h": _grid_spacing(p.initial), "steps": n, "locked_steps": locked[0],
            "grid_share": grid_share(trajectory), "error": error, "wall_time": wall, "flags": flags}


def _flag_spoiled_reference(rows, reference_run, ref: _Reference, t_final: float, dim: int,
                            finest_tau: float) -> tuple:
    """The flags of the fine reference run (``_reference_flags``); when there are any, every row
    gets ``reference_spoiled`` and a warning says why and what to do."""
    errors = [r["error"] for r in rows if r["error"] is not None and np.isfinite(r["error"])]
    reference_flags = tuple(_reference_flags(reference_run, t_final, dim, finest_tau,
                                             min(errors, default=np.inf)))
    if reference_flags:
        logger.warning("the reference run (tau = %g) is itself spoiled (%s): the errors are measured "
                       "against a wrong flow, every row is flagged and no order is fitted. Refine the "
                       "grid with tau (refine=, --refine-grid), use a problem with a closed form, or "
                       "particles", ref.tau, ", ".join(reference_flags))
        for row in rows:
            row["flags"].append("reference_spoiled")
    return reference_flags


# ---------------------------------------------------------------------------- scheme comparisons

def _target_mmd2(F, mu, kernel=None) -> float | None:
    """MMD^2(mu, target) when the energy (or a term of a sum) has a measure target."""
    from .diagnostics import mmd as mmd_distance
    from .measures import Measure

    candidates = [F] + list(getattr(F, "terms", ()) or ())
    for term in candidates:
        target = getattr(term, "target", None)
        k = kernel or getattr(term, "kernel", None)
        if isinstance(target, Measure) and k is not None:
            return mmd_distance(mu, target, k, squared=True)
    return None


#: The columns of a scheme comparison's table (``compare_schemes``).
COMPARE_COLUMNS = ("label", "method", "geometry", "final_energy", "mmd2_to_target", "steps", "final_time",
                   "wall_time", "stop_reason", "error")
#: The columns a comparison's summary shows (the method's and geometry's reprs are in the table).
COMPARE_SHOWN = ("label", "final_energy", "mmd2_to_target", "steps", "final_time", "wall_time",
                 "stop_reason", "error")


class SchemeComparison(NamedTuple):
    """The result of ``compare_schemes``: ``rows`` (a ``display.Table``, one row per scheme) and
    ``trajectories`` (label -> Trajectory of each scheme that did not fail).

    It unpacks as the pair ``rows, trajectories``. In a notebook it shows its table;
    ``plot()`` overlays the energies (a failed scheme gets a legend entry saying why);
    ``to_frame()`` gives the table as a pandas DataFrame.
    """

    rows: Table
    trajectories: dict

    @property
    def failed(self) -> dict:
        """label -> error message of each scheme that failed."""
        return {row["label"]: row["error"] for row in self.rows if row["error"] is not None}

    def to_frame(self):
        """The table as a pandas DataFrame (needs pandas: ``pip install pandas``)."""
        return self.rows.to_frame()

    def _summary(self) -> tuple[str, list, list, Table, tuple]:
        fields = [("schemes", len(self.rows)), ("failed", len(self.failed))]
        notes = [f"{label} failed: {error}" for label, error in self.failed.items()]
        return "SchemeComparison", fields, notes, self.rows, COMPARE_SHOWN

    def __repr__(self) -> str:
        return text_summary(*self._summary())

    def _repr_html_(self) -> str:
        """The comparison for a notebook: how many schemes ran and failed, why, and the table."""
        return html_summary(*self._summary())

    def plot(self, ax=None, *, title: str | None = None):
        """The energies of the schemes against time, overlaid, one style each; each failed scheme
        named in the legend (``plotting.draw_energy_decay``).

        Parameters
        ----------
        ax : matplotlib.axes.Axes, optional
            The Axes to overlay the energies in (default: those of a new figure).
        title : str, optional
            The Axes' title (e.g. the step size shared by the schemes).

        Returns
        -------
        matplotlib.axes.Axes
        """
        from .plotting import draw_energy_decay

        return draw_energy_decay(self.trajectories, ax, failed=self.failed, title=title)


def compare_schemes(energy, initial, schemes, tau: float, steps: int, *, kernel=None,
                    progress: bool = False, throw: bool = False) -> SchemeComparison:
    """Run one problem through several schemes; return a ``SchemeComparison``, which unpacks as
    (table rows, label -> Trajectory).

    schemes: label -> (method_factory, geometry) (a mapping) or a sequence of
    (label, method_factory, geometry). Each row: ``label``, ``method``, ``geometry``,
    ``final_energy``, ``mmd2_to_target`` (when the energy has a target; kernel: ``kernel`` or
    the energy's own), ``steps`` taken, ``final_time``, ``wall_time``, ``stop_reason`` and
    ``error`` (the message if the scheme failed; with ``throw=True`` it raises instead).
    Draw the overlaid energy decay with ``.plot()`` (or ``plotting.plot_energy_decay``).
    progress: one bar over the schemes; each scheme is logged at DEBUG level.
    """
    items = list(schemes.items()) if isinstance(schemes, dict) else [(a, (b, c)) for a, b, c in schemes]
    if not items:
        raise ValueError("compare_schemes needs at least one scheme")
    rows, trajectories = [], {}
    with _progress_bar(len(items), "compare", "scheme", progress) as bar:
        for label, (factory, geometry) in items:
            bar.set_postfix_str(f"running {label}")
            row, trajectory = _compare_one(label, factory, geometry, energy, initial, tau, steps,
                                           kernel, throw)
            bar.update(1)
            rows.append(row)
            if trajectory is not None:
                trajectories[label] = trajectory
            logger.debug("%s: %s (%.2f s)", label, f"final energy {row['final_energy']:.6g}"
                         if row["error"] is None else f"failed: {row['error']}", row["wall_time"])
    return SchemeComparison(Table(rows, COMPARE_COLUMNS), trajectories)


def _compare_one(label, factory, geometry, energy, initial, tau, steps, kernel, throw) -> tuple:
    """One scheme of ``compare_schemes``: (its row, its trajectory or None if it failed)."""
    # a method object is used as it is; a class or factory is called for a fresh one
    method = factory if hasattr(factory, "step") and not isinstance(factory, type) else factory()
    row = {"label": label, "method": repr(method), "geometry": repr(geometry), "final_energy": None,
           "mmd2_to_target": None, "steps": 0, "final_time": 0.0, "wall_time": None,
           "stop_reason": None, "error": None}
    start = time.perf_counter()
    try:
        trajectory = solve(energy, geometry, initial, tau=tau, steps=steps, method=method,
                           progress=False, throw=True)
    except (ValueError, RuntimeError) as error:  # SolverError is a RuntimeError
        if throw:
            raise
        row.update(wall_time=time.perf_counter() - start, stop_reason="failed", error=str(error))
        return row, None
    row.update(final_energy=float(trajectory.energies[-1]),
               mmd2_to_target=_target_mmd2(energy, trajectory.final, kernel),
               steps=len(trajectory.taus), final_time=float(trajectory.times[-1]),
               wall_time=time.perf_counter() - start, stop_reason=trajectory.stop_reason)
    return row, trajectory


# ---------------------------------------------------------------------------- tables

def write_table(path, rows: Sequence[Mapping], columns: Sequence[str] | None = None):
    """Write rows (dicts) as CSV, atomically; lists become ';'-joined text, None empty."""
    import csv
    import io as text_io

    from .io import atomic_path

    columns = list(columns or (rows[0].keys() if rows else []))
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if isinstance(value, (list, tuple)):
                value = ";".join(map(str, value))
            elif value is None:
                value = ""
            elif isinstance(value, (float, np.floating)):
                value = repr(float(value))
            cells.append(value)
        writer.writerow(cells)
    with atomic_path(path) as temporary:
        temporary.write_text(buffer.getvalue(), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- configs as studies

def scheme_configs(raw: Mapping, methods=None, geometries=None) -> dict:
    """label "method/geometry" -> the variant of the config ``raw`` for each pair of the method
    kinds ``methods`` and geometry kinds ``geometries`` (default: the config's own). A geometry
    takes the fields of the config's [geometry] that apply to it, a method the options of [method]
    if it is the same kind (``jko-ift compare``)."""
    from .config import GEOMETRY_KEYS

    base_method = raw.get("method", {"kind": "conic"})
    base_geometry = raw.get("geometry")
    methods = methods or [base_method.get("kind", "conic") if isinstance(base_method, dict) else "conic"]
    variants = {}
    for method in methods:
        method_table = base_method if isinstance(base_method, dict) and base_method.get("kind") == method \
            else {"kind": method}
        for geometry in geometries or [None]:
            config = set_field(raw, "method", dict(method_table))
            if geometry is not None:
                table = {"kind": geometry}
                if isinstance(base_geometry, dict):
                    table.update({k: v for k, v in base_geometry.items()
                                  if k in GEOMETRY_KEYS.get(geometry, ())})
                config = set_field(config, "geometry", table)
            label = f"{method}/{geometry or (base_geometry or {}).get('kind', 'default')}"
            variants[label] = config
    return variants


def set_field(config: Mapping, dotted: str, value) -> dict:
    """A deep copy of ``config`` with ``dotted`` (``"run.tau"``, ``"geometry.alpha"``) set."""
    import copy

    result = copy.deepcopy(dict(config))
    keys = dotted.split(".")
    if not all(keys):
        raise ValueError(f"not a dotted field path: {dotted!r} (e.g. run.tau or geometry.alpha)")
    table = result
    for i, key in enumerate(keys[:-1]):
        child = table.get(key, {})
        if not isinstance(child, Mapping):
            raise ValueError(f"cannot set {dotted}: {'.'.join(keys[:i + 1])} is not a table")
        table[key] = child = dict(child)
        table = child
    table[keys[-1]] = value
    return result


class _ConfigProblem:
    """A checked config (``RunSpec``) seen as a problem: energy, geometry, initial, t_final and,
    for a named problem with its own geometry, the closed-form ``error``."""

    def __init__(self, spec):
        from . import problems as named_problems

        self.spec = spec
        self.energy, self.geometry, self.initial = spec.energy, spec.geometry, spec.initial
        run = spec.run
        self.t_final = run.t_final if run.controller is not None else run.steps * run.tau
        self.error = None
        if spec.name is not None and "geometry" not in spec.config:
            overrides = {k: v for k, v in spec.config["problem"].items() if k != "name"}
            self.error = named_problems.PROBLEMS[spec.name](**overrides).error


def problem_from_config(config):
    """A config (path, dict or ``RunSpec``) as a problem for ``convergence_study``."""
    from .config import RunSpec, load_config

    return _ConfigProblem(config if isinstance(config, RunSpec) else load_config(config))


def refined_config(config: Mapping, tau: float, tau0: float) -> dict:
    """``config`` with its grid refined by tau0 / tau (cells per axis; h proportional to tau):
    ``problem.cells`` of a named problem (its default if not given) or ``problem.support.shape``."""
    import inspect

    from . import problems as named_problems
    from .config import ConfigError

    factor = tau0 / tau
    problem = config.get("problem", {})
    if "name" in problem:
        factory = named_problems.PROBLEMS.get(problem["name"])
        parameters = inspect.signature(factory).parameters if factory else {}
        if "cells" not in parameters:
            raise ConfigError("problem.name", f"the named problem {problem['name']!r} has no 'cells' "
                              "argument: its grid cannot be refined (run without --refine-grid)")
        cells = problem.get("cells", parameters["cells"].default)
        return set_field(config, "problem.cells", max(1, int(round(cells * factor))))
    support = problem.get("support", {})
    if isinstance(support, Mapping) and support.get("kind") == "particles":
        raise ConfigError("problem.support.kind", "a particle support has no grid to refine (and no grid "
                          "locking: particles move freely); run without --refine-grid")
    shape = support.get("shape") if isinstance(support, Mapping) else None
    if shape is None:
        raise ConfigError("problem.support.shape", "missing; a grid is needed to refine it")
    shape = shape if isinstance(shape, list) else [shape]
    return set_field(config, "problem.support.shape", [max(1, int(round(s * factor))) for s in shape])


def config_convergence_study(config, taus: Sequence[float], refine_grid: bool = False,
                             **options) -> ConvergenceStudy:
    """``convergence_study`` of a config (path or dict): its problem, geometry and method, to the
    final time of its [run]; with ``refine_grid`` the grid is refined with tau (h ~ tau, the
    config's grid at the largest tau). Every variant is checked before any run."""
    from .config import load_config, read_config

    raw, _ = read_config(config) if not isinstance(config, Mapping) else (dict(config), None)
    spec = load_config(raw)
    if spec.adaptive:
        from .config import ConfigError
        raise ConfigError("run.adaptive", "a convergence study runs fixed steps; remove [run.adaptive] "
                          "and give tau with steps or t_final")
    taus = sorted((float(t) for t in taus), reverse=True)
    problem = _ConfigProblem(spec)
    refine = None
    if refine_grid:
        variants = {tau: _ConfigProblem(load_config(refined_config(raw, tau, taus[0]))) for tau in taus}
        refine = variants.__getitem__
    options.setdefault("method_factory", spec.make_method)
    return convergence_study(problem, taus, refine=refine, **options)


# ---------------------------------------------------------------------------- sweeps

def parse_value(text: str):
    """A command-line value as TOML reads it (1 -> int, 0.5 -> float, true -> bool, "x" or x ->
    string, [1, 2] -> list)."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        return tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def sweep_cases(config: Mapping, params: Mapping[str, Sequence]) -> list[dict]:
    """The grid of parameter values: one dict {dotted field: value} per case (the last field
    varies fastest). Each case's config is ``set_field`` of all its values."""
    import itertools

    names = list(params)
    for name in names:
        if not params[name]:
            raise ValueError(f"--param {name} has no values")
    grid = itertools.product(*(params[n] for n in names))
    return [dict(zip(names, values, strict=True)) for values in grid]


def run_case(config: Mapping, values: Mapping | None = None) -> dict:
    """Run one config (a dict) to its end; the row of a sweep table. Top-level so that Dask can
    send it to a worker."""
    from .config import load_config

    spec = load_config(config)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trajectory = spec.solve(progress=False)
    wall = time.perf_counter() - start
    stats = [s for s in trajectory.stats if s.get("accepted", True)]
    row = dict(values or {})
    row.update(final_energy=float(trajectory.energies[-1]),
               mmd2_to_target=_target_mmd2(spec.energy, trajectory.final),
               steps=len(trajectory.taus), final_time=float(trajectory.times[-1]),
               stop_reason=trajectory.stop_reason,
               max_certificate=max((s.get("certificate") or 0.0 for s in stats), default=None),
               grid_locked_steps=locked_steps(trajectory, spec.energy, spec.geometry)[0],
               wall_time=wall)
    return row


def sweep(config, params: Mapping[str, Sequence], *, serial: bool = False, scheduler: str | None = None,
          workers: int = 2, processes: bool = True, progress: bool = False) -> Table:
    """Run every case of the grid ``params`` ({dotted field: values}) of ``config`` (path or dict).

    Every case is checked (``load_config``) before anything runs. ``serial=True`` runs them
    here one after the other; otherwise on Dask distributed: the scheduler at ``scheduler``
    (an address such as ``tcp://host:8786``) or a ``LocalCluster`` of ``workers`` workers
    (processes, one thread each, unless ``processes=False``). Returns the rows in case order:
    the parameter values, then final_energy, mmd2_to_target, steps, final_time, stop_reason,
    max_certificate, grid_locked_steps and wall_time, as a ``display.Table`` (a list of dicts;
    ``.to_frame()`` for pandas). progress: one bar over the cases, advanced as they complete (in
    any order on Dask); each case is logged at DEBUG level.
    """
    from .config import ConfigError, load_config, read_config

    raw, _ = read_config(config) if not isinstance(config, Mapping) else (dict(config), None)
    cases = sweep_cases(raw, params)
    configs = []
    for values in cases:
        variant = raw
        for name, value in values.items():
            variant = set_field(variant, name, value)
        try:
            load_config(variant)
        except ConfigError as error:
            where = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ConfigError(error.field, f"{str(error).split(': ', 1)[1]} (in the case {where})") from None
        configs.append(variant)
    with _progress_bar(len(cases), "sweep", "case", progress) as bar:
        if serial:
            rows = []
            for index, (variant, values) in enumerate(zip(configs, cases, strict=True)):
                rows.append(run_case(variant, values))
                _case_done(bar, index, cases, rows[-1])
            return Table(rows)
        from dask.distributed import Client, LocalCluster

        if scheduler is not None:
            with Client(scheduler) as client:
                return Table(_gather(client, configs, cases, bar))
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            return Table(_gather(client, configs, cases, bar))


def _case_done(bar, index: int, cases: Sequence[Mapping], row: Mapping) -> None:
    """Advance the sweep's bar by one finished case (``cases[index]``) and log it."""
    values, count = ", ".join(f"{k}={v!r}" for k, v in cases[index].items()), len(cases)
    bar.set_postfix_str(f"{values}: energy={row['final_energy']:.4g}", refresh=False)
    bar.update(1)
    logger.debug("case %d of %d (%s): final energy %.8g, %d steps to t = %.6g, %s, %.2f s", index + 1,
                 count, values, row["final_energy"], row["steps"], row["final_time"], row["stop_reason"],
                 row["wall_time"])


def _gather(client, configs, cases, bar) -> list[dict]:
    """Run the cases on a Dask client; advance the bar as each one completes; rows in case order."""
    from dask.distributed import as_completed

    futures = client.map(run_case, configs, cases, pure=False)
    index = {future.key: i for i, future in enumerate(futures)}
    for future in as_completed(futures):
        if future.status == "finished":
            _case_done(bar, index[future.key], cases, future.result())
    return client.gather(futures)


# ---------------------------------------------------------------------------- particle schemes over seeds

@dataclass(frozen=True)
class SeedRuns:
    """Runs of one scheme over seeds: ``mmd`` (seeds, steps + 1) = MMD(mu^k, target samples)
    = sqrt(2 F); ``snapshots``: step -> measure of the first seed; ``seconds``: wall time of
    each run."""

    label: str
    mmd: np.ndarray
    snapshots: dict
    seconds: np.ndarray
    warnings: int = 0
    failed: int = 0

    @property
    def mean(self) -> np.ndarray:
        return self.mmd.mean(axis=0)

    @property
    def sd(self) -> np.ndarray:
        return self.mmd.std(axis=0, ddof=1) if self.mmd.shape[0] > 1 else np.zeros(self.mmd.shape[1])


def run_over_seeds(label: str, make_experiment: Callable[[int], ParticleExperiment],
                   make_scheme: Callable[[ParticleExperiment, int], tuple], seeds, steps: int,
                   snapshot_steps=()) -> SeedRuns:
    """Run a particle scheme once per seed and collect the MMD curves.

    make_experiment(seed) -> ParticleExperiment; make_scheme(experiment, seed) -> (method,
    geometry, tau) or a ``PaperScheme``, a fresh method object per run (they own their noise
    generators). Every
    step's energy is kept (the MMD curve); measures only at ``snapshot_steps`` of the first
    seed. The dissipation inequality of jk.solve does not hold for explicit schemes; its
    warnings are counted in ``warnings``, not shown. A run whose step fails (SolverError)
    ends there: its curve is NaN afterwards and it is counted in ``failed``.
    """
    curves, seconds, snapshots, caught, failed = [], [], {}, 0, 0
    for index, seed in enumerate(seeds):
        experiment = make_experiment(seed)
        method, geometry, tau = make_scheme(experiment, seed)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always", DissipationWarning)
            trajectory = solve(experiment.energy, geometry, experiment.initial, tau=tau,
                               steps=steps, method=method, progress=False, throw=False)
        failed += trajectory.stop_reason == "failed"
        caught += sum(issubclass(w.category, DissipationWarning) for w in record)
        seconds.append(time.perf_counter() - start)
        energies = np.full(steps + 1, np.nan)
        energies[:len(trajectory.energies)] = trajectory.energies
        curves.append(np.sqrt(2 * np.maximum(energies, 0.0)))
        if index == 0:
            snapshots = {k: trajectory.measures[k] for k in snapshot_steps
                         if 0 <= k < len(trajectory.measures)}
    return SeedRuns(label, np.array(curves), snapshots, np.array(seconds), caught, failed)
