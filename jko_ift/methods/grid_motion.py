"""How far a W2 step on a fixed grid moved mass, against how far the flow would (theory §7).

A W2 step on a grid of spacing h cannot move mass by less than a cell: once the displacement
tau alpha |grad f| of the flow is below h the step is *locked* (moves nothing), and while it
is a few cells the step rounds it to whole cells (the *h / tau rounding regime*: an error
C2 h / tau next to the time error C1 tau). Both fixed-support methods (``ConicJKO``,
``EntropicJKO``) measure their step here and warn ``GridLockingWarning``; the studies reuse the
same numbers (``studies.locked_steps``, ``studies.grid_share``).

Per step, in cells of the grid (|v|_1 / h = sum_k |v_k| / h_k, mass-weighted means):

* ``moved_fraction``: the mass the step carried out of its cell (conic: off the plan's
  diagonal; entropic: E_a min(1, |T(x) - x|_1 / h) with T the barycentric map of the plan, which
  the symmetric Gibbs blur does not move);
* ``expected_moved_fraction``: E_mu min(1, tau alpha |grad f(mu)|_1 / h), what the flow carries
  across cell faces in one step (mass spread evenly in a cell crosses a face with probability
  displacement / h);
* ``displacement_cells``: E_a |T(x) - x|_1 / h, the step's mean displacement;
* ``flow_displacement_cells``: tau alpha E_nu |grad f(nu)|_1 / h at the new measure nu: the
  implicit step moves x to y = x - tau alpha grad f(nu)(y), so a step that resolves the flow has
  ``displacement_cells`` = ``flow_displacement_cells`` (up to the O(h) error of the gradient);
* ``flow_change_cells``: tau alpha E_nu |grad f(nu) - grad f(mu)|_1 / h, twice the local error of
  the implicit Euler step (tau / 2 |v_{k+1} - v_k|), the time error the step makes anyway.

The step's grid defect |displacement - flow displacement| against its time error
flow_change / 2 says which of the two errors the step adds to: ``rounding_ratio``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .base import warn_user
from .gibbs import positive_coordinates

#: A step moved "nothing" when at most this fraction of the mass left its cell (a locked conic
#: step leaves 1e-9 to 1e-5 off the diagonal: interior-point noise).
LOCKED_FRACTION = 1e-6
#: A step is locked when it moved less than this fraction of ``expected_moved_fraction``.
#: Measured on W2 Ornstein-Uhlenbeck runs on coarse grids (tests/test_grid_regimes.py): locked
#: steps move 1e-5 to 9e-3 of it, steps that move freely 0.9 to 1.9 times it; in between are
#: steps sliding into a lock (conic) or crawling (entropic with eps < h^2 / 2), which the
#: rounding criterion catches.
STALL_RATIO = 1e-2
#: A step is in the h / tau rounding regime when its grid defect exceeds this multiple of its
#: time error (``rounding_ratio``). Measured on W2 Ornstein-Uhlenbeck (tests/test_grid_regimes.py):
#: steps of runs whose error is their time error reach 0.4 (N(2, 0.25) on 400 cells of [-4, 6],
#: tau = 0.1) and 3.3 (the shipped config, 280 cells, tau = 0.1: the step snaps a displacement of
#: 5.5 cells to 5 or 6, alternately, so that the run's error stays its time error); steps of runs
#: whose grid error is 2.5 to 8 times the time error reach 9 to 20, and the sub-cell steps before
#: locking 25 to 100. A run whose per-step defects stay below this but add up is caught at its
#: end (``check_run``, ``ROUNDING_SHARE``).
ROUNDING_RATIO = 4.0
#: An entropic step locks and rounds like the exact grid step only while its Gibbs blur (variance
#: eps / 2 per axis) stays inside a cell: eps < SUBCELL_BLUR h^2. Above it the blur represents
#: sub-cell motion (at the price of a spurious diffusion eps / (4 tau), the blur's diagnosis) and
#: shifts barycentres by itself. Measured on Ornstein-Uhlenbeck (tests/test_grid_regimes.py):
#: eps / h^2 = 0.1 locks like ConicJKO, eps / h^2 = 1 and 1.6 never lock.
SUBCELL_BLUR = 0.5
#: A run is in the rounding regime when its grid defect, summed with signs over the steps,
#: exceeds this share of its time-error estimate (``grid_share``). Measured on W2
#: Ornstein-Uhlenbeck (tests/test_grid_regimes.py): runs whose error is their time error have
#: shares 0.001 to 0.054 (the shipped config at tau = 0.1, whose +-0.5 cell snapping alternates
#: and cancels); runs whose grid error is 1 to 2.5 times the time error have 0.3 to 1.7, more
#: beyond. The estimate undershoots the grid error by a factor 2 to 4, hence a threshold below 1.
ROUNDING_SHARE = 0.1
#: Rounding is only judged on steps whose grid defect is at least this many cells: below it the
#: step and the flow agree to the accuracy of the gradient on the grid (O(h) in the velocity).
ROUNDING_FLOOR_CELLS = 0.02


class GridLockingWarning(UserWarning):
    """A W2 step on a fixed grid moved no mass (locked), or rounded the flow's displacement to
    whole cells (the h / tau rounding regime), because tau alpha |grad f| is not large against
    the grid spacing h."""


def _flow_cells(energy, geometry, mu, tau) -> tuple[np.ndarray, np.ndarray] | None:
    """(cells (n,), velocity (n, d)) with cells_i = tau alpha |grad f(mu)(x_i)|_1 / h, or None
    off a grid, without transport, or when grad f is not available."""
    grid = getattr(mu, "grid", None)
    if grid is None or geometry is None or not getattr(geometry, "has_transport", False):
        return None
    try:
        with np.errstate(all="ignore"):
            velocity = geometry.alpha * np.asarray(energy.grad_first_variation(mu), dtype=float)
    except (ValueError, ZeroDivisionError, NotImplementedError):
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        cells = np.abs(velocity) @ _per_cell(tau, grid.spacing)  # a matrix-vector product: one pass
    return cells, velocity


def _per_cell(tau: float, spacing) -> np.ndarray:
    """tau / h per axis: a displacement of tau |v_j| is tau |v_j| / h_j cells along axis j
    (at most the largest float, so that a zero velocity stays 0 cells in a product with it)."""
    with np.errstate(over="ignore"):
        return np.minimum(np.float64(tau) / np.asarray(spacing, dtype=float), np.finfo(float).max)


def _mean(weights: np.ndarray, values: np.ndarray) -> float | None:
    """The weighted mean of the finite values where the weights are positive (None if none)."""
    usable = (weights > 0) & np.isfinite(values)
    mass = float(weights @ usable)
    if not mass > 0:
        return None
    return float(weights @ np.where(usable, values, 0.0)) / mass


def expected_moved_fraction(energy, geometry, mu, tau: float) -> float | None:
    """The fraction of the mass that the flow carries out of its grid cell in one step of tau:
    E_mu min(1, tau alpha |grad f|_1 / h), with |v|_1 / h = sum_j |v_j| / h_j (mass spread
    evenly in a cell crosses a face with probability displacement / h). None off a grid, without
    transport, or when grad f is not available."""
    flow = _flow_cells(energy, geometry, mu, tau)
    return None if flow is None else _mean(mu.weights, np.minimum(1.0, flow[0]))


def barycentric_motion(mu, plan_times: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
    """(moved fraction, mean displacement in cells) of the barycentric map of a plan on mu's grid.

    plan_times(w) = P w for positive w: (n,) -> (n,). T(x_i) = (P x)_i / (P 1)_i per axis; the
    displacement of row i is |T(x_i) - x_i|_1 / h; returns E_a min(1, .) and E_a (.). The
    coordinates are shifted to be positive (products in the log domain need w > 0).
    """
    spacing, weights = np.asarray(mu.grid.spacing), mu.weights
    with np.errstate(all="ignore"):
        rows = plan_times(np.ones(mu.n))
        cells = np.zeros(mu.n)
        for k, z in enumerate(positive_coordinates(mu.points)):
            cells += np.abs(plan_times(z) / rows - z) / spacing[k]
    cells = np.where(rows > 0, cells, np.nan)
    moved = _mean(weights, np.minimum(1.0, cells))
    displacement = _mean(weights, cells)
    return (0.0 if moved is None else moved), (0.0 if displacement is None else displacement)


@dataclass(frozen=True)
class GridMotion:
    """The motion of one W2 step on a grid against the flow's (module docstring); all in cells."""

    h: float
    tau: float
    moved_fraction: float
    expected_moved_fraction: float
    displacement_cells: float
    flow_displacement_cells: float
    flow_change_cells: float
    max_displacement: float

    @property
    def locked(self) -> bool:
        """Moved (almost) nothing where the flow would have carried mass across cells: less than
        STALL_RATIO of it, or nothing at all while the largest displacement is below a cell."""
        if self.expected_moved_fraction > LOCKED_FRACTION:
            if self.moved_fraction < STALL_RATIO * self.expected_moved_fraction:
                return True
        return (self.moved_fraction <= LOCKED_FRACTION
                and 1e-12 * self.h < self.max_displacement < self.h)

    @property
    def grid_defect_cells(self) -> float:
        return abs(self.displacement_cells - self.flow_displacement_cells)

    @property
    def rounding_ratio(self) -> float:
        """Grid defect over the step's time error (flow_change / 2): above 1 the grid dominates."""
        time_error = 0.5 * self.flow_change_cells
        return self.grid_defect_cells / time_error if time_error > 0 else np.inf

    @property
    def rounding(self) -> bool:
        return (not self.locked and self.grid_defect_cells >= ROUNDING_FLOOR_CELLS
                and self.rounding_ratio > ROUNDING_RATIO)

    def info(self) -> dict:
        return {"expected_moved_fraction": self.expected_moved_fraction,
                "displacement_cells": self.displacement_cells,
                "flow_displacement_cells": self.flow_displacement_cells,
                "flow_change_cells": self.flow_change_cells,
                "rounding_ratio": self.rounding_ratio,
                "grid_locked": self.locked, "grid_rounding": self.rounding}


def measure_step(energy, geometry, mu, new, tau: float, moved_fraction: float,
                 displacement_cells: float) -> GridMotion | None:
    """The ``GridMotion`` of the step mu -> new (None off a grid, without transport, or without
    a finite grad f)."""
    old = _flow_cells(energy, geometry, mu, tau)
    after = _flow_cells(energy, geometry, new, tau)
    if old is None or after is None:
        return None
    expected = _mean(mu.weights, np.minimum(1.0, old[0]))
    flow = _mean(new.weights, after[0])
    spacing = np.asarray(mu.grid.spacing)
    with np.errstate(invalid="ignore", over="ignore"):
        change = np.abs(after[1] - old[1]) @ _per_cell(tau, spacing)
    change = _mean(new.weights, change)
    if expected is None or flow is None:
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        speed = tau * np.sqrt(np.einsum("ij,ij->i", old[1], old[1]))
    speed = speed[(mu.weights > 0) & np.isfinite(speed)]
    return GridMotion(float(spacing.max()), float(tau), float(moved_fraction), expected,
                      float(displacement_cells), flow, 0.0 if change is None else change,
                      float(speed.max()) if speed.size else 0.0)


def check_step(energy, geometry, mu, new, tau: float, moved_fraction: float,
               displacement_cells: float, info: dict, judge_rounding: bool = True) -> GridMotion | None:
    """Measure the step (``measure_step``), record it in ``info`` and warn
    ``GridLockingWarning`` when it is locked or in the rounding regime. ``judge_rounding=False``
    where the displacement is not the grid's doing (an entropic step whose blur dominates moves
    barycentres towards the mean of the new measure: ``EntropicBlurWarning`` says so)."""
    motion = measure_step(energy, geometry, mu, new, tau, moved_fraction, displacement_cells)
    if motion is None:
        return None
    info.update(motion.info())
    info["grid_rounding"] = judge_rounding and motion.rounding
    if motion.locked:
        warn_user(_locked_message(motion), GridLockingWarning)
    elif info["grid_rounding"]:
        warn_user(_rounding_message(motion), GridLockingWarning)
    return motion


def time_error_cells(stats) -> float | None:
    """A run's time-error estimate in grid cells from its steps' records: the sum of the local
    errors of the implicit Euler steps, tau alpha / 2 E|grad f_{k+1} - grad f_k|_1 / h
    (``flow_change_cells``); None when the steps carry no grid statistics."""
    changes = [s["flow_change_cells"] for s in stats if "flow_change_cells" in s]
    return 0.5 * float(np.sum(changes)) if changes else None


def grid_share(stats) -> float | None:
    """The grid's share of a run's error from its steps' records:
    |sum_k (step displacement - flow displacement)| / ``time_error_cells``, both in cells.

    Each step on a grid moves mass by whole cells where the flow moves it by tau alpha |grad f|
    (theory §7): the difference accumulates into an error C2 h / tau next to the time error
    C1 tau. Signed, because snapping that alternates (+-0.5 cell) cancels over the run. None
    without grid statistics; inf when the run has a grid defect but no time error.
    """
    stats = [s for s in stats if "flow_change_cells" in s]
    if not stats:
        return None
    defect = abs(sum(s["displacement_cells"] - s["flow_displacement_cells"] for s in stats))
    time_error = time_error_cells(stats)
    if time_error > 0:
        return float(defect / time_error)
    return 0.0 if defect == 0 else float("inf")


def check_run(stats, spacing: float, blurred: bool = False) -> float | None:
    """Warn ``GridLockingWarning`` for a run whose steps each stayed below ``ROUNDING_RATIO``
    but whose grid defects add up to more than ``ROUNDING_SHARE`` of its time error (a run
    with a locked or rounding step has already warned). ``blurred``: an entropic run whose
    blur moves barycentres by itself (not the grid's doing); spacing: the grid's largest h.
    Returns the share."""
    share = grid_share(stats)
    flagged = any(s.get("grid_locked") or s.get("grid_rounding") for s in stats)
    if share is not None and share > ROUNDING_SHARE and not (flagged or blurred):
        warn_user(f"grid rounding over the run (h/tau regime): the steps' displacements differ "
                  f"from the flow's by {share:.2g} times the run's time-error estimate "
                  f"({time_error_cells(stats):.3g} cells, h = {spacing:.3g}), though no single step "
                  f"stood out: part of the error is the grid's and does not shrink with tau. "
                  f"{_FIX}", GridLockingWarning)
    return share


_FIX = ("Refine the grid so that tau*alpha*|grad f| spans many cells (a tau -> 0 study must refine "
        "h faster than tau: h ~ tau^2 keeps first order), take larger steps, or use moving "
        "particles (jk.ParticleJKO, jk.Splitting), which do not lock")


def _locked_message(motion: GridMotion) -> str:
    return (f"grid locking: the W2 step moved a fraction {motion.moved_fraction:.1e} of the mass "
            f"where the flow carries {motion.expected_moved_fraction:.2g} of it across cells, "
            f"because the displacement tau*alpha*max|grad f| = {motion.max_displacement:.3g} "
            f"(tau = {motion.tau:.3g}) is not large against the grid spacing h = {motion.h:.3g}: "
            f"the step leaves the measure where it was. {_FIX}")


def _rounding_message(motion: GridMotion) -> str:
    ratio = motion.rounding_ratio
    versus = (f"{ratio:.2g} times its time error" if np.isfinite(ratio)
              else "all of its error (the flow's velocity does not change: no time error)")
    return (f"grid rounding (h/tau regime): the W2 step moved mass by {motion.displacement_cells:.3g} "
            f"cells on average where the flow moves it by {motion.flow_displacement_cells:.3g} "
            f"(h = {motion.h:.3g}, tau = {motion.tau:.3g}): the grid error of the step is {versus}, "
            f"and it does not shrink with tau. {_FIX}")
