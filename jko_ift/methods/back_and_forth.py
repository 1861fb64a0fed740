"""Exact W2 JKO steps of a density on a grid, through the dual (back-and-forth method).

The step of ``BackAndForthJKO`` is the discrete problem of docs/theory.md §10: mass of cell j of
mu^k moves to any point z of the grid's box and is split between the grid nodes around z by
linear interpolation (axis by axis), at the cost |z - y_j|^2 / (2 tau) (axis by axis), so it
can move by less than a cell and the step does not lock. Its dual in the potential phi on the
nodes is

    D(phi) = sum_j mu_j phi^c(y_j) - F*(-phi),

phi^c the exact c-transform of the interpolant of phi (``legendre.c_transform``), F* the
pointwise conjugate of the energy (``local_energy``). D is concave; its gradient is
a(phi) - P(phi), the masses a(phi) = h^d (u*)'(-phi - W) that the energy wants minus the masses
P(phi) that mu^k pushed by the argmins of the c-transform delivers. The ascent preconditions
that gradient with a screened Poisson operator tau rho_bar L + kappa_bar (the H^1 metric of
Jacobs, Lee and Leger, ESAIM: COCV 27, 2021, made uniform in tau) and keeps D increasing by a
backtracking step size; it steps along a(phi) minus an exponential average of the P(phi) met, where
that is an ascent direction (the average damps the jumps of P(phi) at kinks), else along the
gradient. A cold step on a fine grid also starts from the step solved on the grid of half the
cells (multilevel). P(phi) is always a feasible new measure of exactly mu^k's mass, and so
is an average of such measures; the objective of the best of them minus the best D met is the
duality gap, which bounds how far the returned measure is from the optimum of the step: that
gap, relative to the objective, is the certificate that ``tol`` bounds. The ascent runs on phi
alone (the "forth" half of the back-and-forth method): the discrete problem is not symmetric in
the two potentials (mu^k sits on nodes, the new measure is delivered by interpolation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
from numba import njit

from ..display import report_iteration
from ..geometries import InfConvolution, Wasserstein
from ..measures import Grid
from .base import Method, MethodState, SolverError, StepResult, check_step_input
from .legendre import c_transform, c_transform_buffers, deposit_transposed, push_forward
from .local_energy import LocalEnergy, local_energy
from .options import count, fraction
from .plan_recovery import recover
from .poisson import ScreenedPoisson, heat

#: Sufficient increase of the dual asked of an ascent step (Armijo), relative to the
#: first-order prediction sigma <grad D, direction>.
ARMIJO = 1e-4
#: Step-size factors: after an accepted step, after a rejected one. Measured against 1.5 and 0.5
#: on the porous-medium example (benchmarks/fine_grid.py, cold step): certified in 336, 296 and
#: 328 iterations at 128^2, 256^2 and 512^2 instead of 397, 596 and 996, at a dual 1.25e-5
#: (relative, 512^2) above the one where 1.5 and 0.5 stop; on the ten multi-step runs of
#: benchmarks/ascent_cases.py (1-D and 2-D Fokker-Planck, porous media, an entropy with a porous
#: medium), 32 of 42 steps certified against 30 (each step starting from FIRST_SIGMA either way).
GROW, SHRINK = 1.2, 0.7
#: The ascent has stalled when backtracking cuts the step size this far below its start: no
#: step along the gradient increases the dual there (a kink, docs/theory.md §10).
STALL_RATIO = 1e-6
#: The local scaling of the ascent direction is capped at sqrt(1 / SCALING_FLOOR): where the
#: energy's curvature is below this fraction of its typical value (far tails, empty cells) the
#: direction is not amplified further (measured on the 2-D Fokker-Planck step, 64^2, tau = 0.1:
#: certificate 3e-5 after 200 iterations with 1e-4, 4e-4 with 1e-2, 3e-3 without scaling).
SCALING_FLOOR = 1e-4
#: Multilevel cold start: grids with at least 2 * COARSE_CELLS cells on every axis (an even
#: number) also start from the step solved on the grid of half the cells, to COARSE_ITERATIONS
#: (measured on the porous-medium example, cold step, certificate after 400 iterations: 8.2e-4
#: with it against 7.4e-3 without at 512^2, 2.5e-4 against 2.7e-4 at 256^2; at 128^2 from 64^2
#: it did not help; measured with the previous step-size rule, GROW 1.5 and SHRINK 0.5).
COARSE_CELLS, COARSE_ITERATIONS = 128, 150
#: Weight of the past in the averaged delivered masses that steer the ascent (``_Momentum``);
#: measured on the porous-medium example (benchmarks/fine_grid.py, 128^2, 400 iterations): the
#: cold step's certificate 8.3e-3 with no average, 2.9e-3 at 0.5, 2.0e-4 at 0.9, 1.0e-4 at 0.95
#: (with the previous step-size rule, GROW 1.5 and SHRINK 0.5).
MOMENTUM = 0.95
#: First window of the ergodic primal average (iterations); it doubles at each restart.
AVERAGE_WINDOW = 8
#: The ascent has reached its plateau when the certificate fell by less than PLATEAU_GAIN over
#: the last PLATEAU_WINDOW iterations (judged from 2 windows on): the dual has converged and no
#: delivered measure gets closer (docs/theory.md §10), so the rest of max_iter would be spent for
#: nothing (porous-medium example, 64^2, tol 1e-7: 3.874e-4 at 900 iterations, 3.863e-4 from
#: 1100 to 1500; at 512^2 a plateau of 1.2e-4 from about 1000 of the default 2000; with the
#: previous step-size rule, GROW 1.5 and SHRINK 0.5).
PLATEAU_WINDOW, PLATEAU_GAIN = 200, 0.01
#: The certificate is also offered the plan that splits tied nodes between their near-argmins
#: (``plan_recovery``, 1-D and 2-D grids), built from the best dual point met, once the dual has
#: nearly converged: every RECOVERY_EVERY iterates (and at the end of a step above tol) when the
#: rise still to come, extrapolated from the last two rises over RECOVERY_EVERY iterates (a
#: geometric series), is at most RECOVERY_REMAINING of the dual. Before that the split fits a
#: dual far from its optimum and is worse than the averages. Measured on the porous-medium
#: example (benchmarks/fine_grid.py, cold step): the split certifies (<= 1e-4) once the dual is
#: within about 5e-7 of its final value: from iteration 400 at 128^2 (relative rises 6.7e-5 and
#: 4.3e-6 over the two windows of 100 before), 500-600 at 256^2 (1.5e-5, 3.3e-6, 4.5e-7) and
#: 1000 at 512^2 (1.0e-6, 3.4e-7); at iteration 300 it gives 6e-4 (128^2), at 400 4.4e-3 (256^2)
#: (with the previous step-size rule, GROW 1.5 and SHRINK 0.5).
RECOVERY_EVERY, RECOVERY_REMAINING = 100, 5e-7
#: The ascent's first step size, in every step: a warm start keeps the previous step's potential,
#: not its last step size. Where that step ended at a kink, backtracking had cut the step size to
#: 1e-10 - 1e-14, and the next step, started there, stalled within 0-4 iterations with its
#: certificate at 1e-2 - 6e-2 (1-D Fokker-Planck, 512 cells, tau = 0.025: five of six steps); where
#: it ended larger (3.1 on the Fokker-Planck step of tests/test_back_and_forth.py, 32^2), the next
#: step took 41 evaluations instead of 21. 1 is the natural size of the preconditioned, Newton-like
#: direction.
FIRST_SIGMA = 1.0

_GEOMETRY_HELP = ("BackAndForthJKO takes the Wasserstein geometry only (jk.Wasserstein()), got "
                  "{name}. For WFR and IFT on a grid use "
                  "jk.Splitting(transport=jk.BackAndForthJKO()).step(F, geometry, mu, tau) (this "
                  "method's transport step, then the grid reaction step: first order in tau), or "
                  "jk.ConicJKO for the exact step on small grids; reaction geometries (Hellinger, "
                  "MMD) alone: jk.ConicJKO or jk.EntropicJKO")


@dataclass(frozen=True)
class _Point:
    """The ascent at one dual potential phi (arrays of the grid's shape)."""

    phi: np.ndarray
    dual: float
    wanted: np.ndarray       # a(phi): the masses the energy asks for
    curvature: np.ndarray    # (u*)''(-phi - W): the energy's part of the dual's Hessian per cell
    argmins: list | None = None      # the c-transform's argmins, until delivered
    # filled by ``_Ascent.deliver`` (a trial step that backtracking rejects never needs them):
    pushed: np.ndarray | None = None  # P(phi): mu^k pushed forward, a feasible new measure
    distance_sq: float = np.nan       # the step's squared transport distance of P(phi)
    energy: float = np.nan            # F(P(phi)) on the grid



@dataclass(frozen=True, eq=False)
class BackAndForthJKO(Method):
    r"""Exact :math:`W_2` JKO step of a density on a :class:`~jko_ift.Grid` (back-and-forth method).

    The step solves, on the grid of :math:`\mu^k` (1-D, 2-D or 3-D, no-flux boundary),

    .. math::

        a^{k+1} = \operatorname{argmin}_a \; F(a) + \frac{W_h^2(a, a^k)}{2\tau},

    with :math:`W_h` the grid transport of the theory page (section 10): a cell's mass may move
    to any point of the box and is split linearly between the neighbouring nodes, so it moves
    by less than a cell and the step does not lock. It is solved by gradient ascent on its dual
    potential in the :math:`H^1` metric (a DCT Poisson solve per iteration) with c-transforms
    computed as separable Legendre transforms (Jacobs, Lee and Léger).

    Parameters
    ----------
    tol : float, default 1e-4
        The accepted certificate: the duality gap relative to max(|objective|, |F|, transport).
    max_iter : int, default 2000
        Ascent iterations per step. A step that ends above ``tol`` has status
        ``"max_iterations"``, or ``"stalled"`` where the ascent stops at a kink of the dual;
        never ``"optimal"``.
    warm_start : bool, default True
        Also offer the previous step's dual potential on the same grid as a start (the run
        starts from the candidate of largest dual value; the run's ``MethodState`` keeps it).

    Notes
    -----
    Energies with a pointwise convex conjugate: ``Entropy``, ``PorousMedium``, ``KL`` to a grid
    target, ``Potential`` and their sums (positive coefficients on the first three). WFR and
    IFT go through ``jk.Splitting(transport=jk.BackAndForthJKO())``. ``info`` holds iterations,
    evaluations (c-transforms), solves (Poisson solves), gap, residual_h1 (the dual gradient's norm in the
    preconditioner's dual metric), mismatch_l1 (:math:`|a(\phi) - P(\phi)|_1` / mass),
    mass_drift, wall_time, sigma (the last ascent step), averaged (the measure is an average
    of iterates) and recovered (the measure is delivered by the plan that splits tied cells
    between their destinations, docs/theory.md §10); ``distance_sq`` is the cost of the plan
    that delivers the measure
    (:math:`\ge W_h^2`).

    References
    ----------
    M. Jacobs, W. Lee, F. Léger, "The back-and-forth method for Wasserstein gradient flows",
    ESAIM: COCV 27 (2021).

    Examples
    --------
    >>> grid = jk.Grid([-2.0, -2.0], [2.0, 2.0], (32, 32))
    >>> mu = grid.measure(lambda x: np.exp(-np.sum((x - 0.5) ** 2, axis=1)), normalize=True)
    >>> F = jk.Entropy() + jk.Potential(lambda x: 0.5 * np.sum(x**2, axis=1))
    >>> result = jk.BackAndForthJKO().step(F, jk.Wasserstein(), mu, 0.05)
    >>> result.status, abs(result.measure.mass - mu.mass) < 1e-12
    ('optimal', True)
    """

    keeps_support = True
    local_error_order = 2  # O(tau^2) per step: implicit Euler (jko_ift.control)
    tol: float = 1e-4
    max_iter: int = 2000
    warm_start: bool = True

    def __post_init__(self):
        self._settle(tol=fraction("BackAndForthJKO", "tol", self.tol),
                     max_iter=count("BackAndForthJKO", "max_iter", self.max_iter))
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"BackAndForthJKO warm_start must be True or False, got {self.warm_start!r}")

    def _step(self, F, geometry, mu, tau: float, state: MethodState, throw: bool) -> StepResult:
        start = time.perf_counter()
        tau = check_step_input(F, geometry, mu, tau)
        _check_geometry(geometry)
        grid = _check_grid(mu)
        energy = local_energy(F, mu, "BackAndForthJKO")
        ascent = _Ascent(energy, mu, tau, grid)
        warm = self.warm_start and state.warm.get("grid") == _grid_key(grid)
        phi = [state.warm["phi"].reshape(grid.shape)] if warm else [_coarse_start(F, mu, tau, self.tol)]
        phi = [p for p in phi if p is not None] + _cold_starts(grid, energy, mu, ascent.diffusivity * tau)
        run = ascent.run(phi, FIRST_SIGMA, self.tol, self.max_iter)
        # the warm start: the last dual potential, with the grid it belongs to
        state.warm.update(grid=_grid_key(grid), phi=run.dual.phi.ravel().copy())
        state.steps += 1
        result = ascent.result(run, F, self.tol, start)
        if throw and not result.ok:
            raise SolverError(result.info["message"], result.status, result)
        return result


@njit(cache=True)
def _scaled_mismatch(curvature, wanted, delivered, cell, typical, floor, unbounded_at_edge):
    """(S, S (a - b) / h^d) per cell, one pass: S = sqrt(typical / max(kappa, floor)), kappa = typical
    where it is 0 and the curvature is unbounded at the edge (``_Ascent.direction``). The square
    root is taken again only where kappa changes from the previous cell (a power m = 2 alone has
    one curvature wherever there is mass)."""
    scaling = np.empty(curvature.size)
    scaled = np.empty(curvature.size)
    last_kappa, last = np.nan, 0.0
    for i in range(curvature.size):
        kappa = curvature[i]
        if unbounded_at_edge and not kappa > 0:
            kappa = typical
        if kappa != last_kappa:
            last_kappa, last = kappa, np.sqrt(typical / max(kappa, floor))
        scaling[i] = last
        scaled[i] = last * ((wanted[i] - delivered[i]) / cell)
    return scaling, scaled


@njit(cache=True)
def _scale_and_slope(solved, scaling, wanted, pushed, cell):
    """solved *= S in place (the direction d), and its slope h^d <grad D, d>, grad D = (a - P) / h^d."""
    total = 0.0
    for i in range(solved.size):
        solved[i] *= scaling[i]
        total += ((wanted[i] - pushed[i]) / cell) * solved[i]
    return cell * total


@njit(cache=True)
def _blend(average, new, keep, weight):
    """average = keep * average + weight * new, in place."""
    for i in range(average.size):
        average[i] = keep * average[i] + weight * new[i]


def _cold_starts(grid, energy: LocalEnergy, mu, heat_time: float) -> list[np.ndarray]:
    """The cold starts of ``initial_potentials``, one of them from rho^k smoothed by the heat flow
    of the step's typical diffusivity (for the entropy, the heat equation's step: a good guess of
    rho^{k+1} where rho^k has edges)."""
    smoothed = heat(mu.weights.reshape(grid.shape) / grid.cell_volume, grid.spacing, heat_time)
    return [phi.reshape(grid.shape) for phi in energy.initial_potentials(mu, smoothed.ravel())]


def _coarse_start(F, mu, tau: float, tol: float) -> np.ndarray | None:
    """A start for a cold step on a fine grid (multilevel): the same step on the grid of half the
    cells per axis (mu^k's masses summed over blocks of 2^d cells), solved the same way (from a
    coarser start in turn) to ``COARSE_ITERATIONS`` at most, and its dual potential interpolated
    to the fine nodes. None where the grid is too small or has an odd number of cells on an axis."""
    grid = mu.grid
    shape = np.array(grid.shape)
    if shape.min() < 2 * COARSE_CELLS or np.any(shape % 2):
        return None
    coarse_grid = Grid(grid.lo, grid.hi, tuple(int(n) for n in shape // 2))
    blocks = mu.weights.reshape([k for n in coarse_grid.shape for k in (n, 2)])
    masses = blocks.sum(axis=tuple(range(1, 2 * grid.dim, 2)))
    coarse = coarse_grid.measure(masses / coarse_grid.cell_volume)
    try:
        energy = local_energy(F, coarse, "BackAndForthJKO")
    except ValueError:  # an energy tied to the fine grid (KL to a measure on it): no coarse step
        return None
    ascent = _Ascent(energy, coarse, tau, coarse_grid)
    starts = [_coarse_start(F, coarse, tau, tol)]
    starts = [p for p in starts if p is not None] + _cold_starts(coarse_grid, energy, coarse,
                                                                  ascent.diffusivity * tau)
    run = ascent.run(starts, FIRST_SIGMA, tol, COARSE_ITERATIONS)
    return _prolong(run.dual.phi, grid.shape)


def _prolong(values: np.ndarray, shape) -> np.ndarray:
    """Linear interpolation of node values on a cell-centred grid to the grid of twice the cells
    per axis on the same box (fine node i sits at coarse index i / 2 - 1/4; constant beyond the
    outer nodes)."""
    for axis, n in enumerate(shape):
        position = np.clip(np.arange(n) / 2.0 - 0.25, 0.0, values.shape[axis] - 1.0)
        low = np.minimum(np.floor(position).astype(int), values.shape[axis] - 2) if values.shape[axis] > 1 \
            else np.zeros(n, int)
        weight = (position - low).reshape([-1 if k == axis else 1 for k in range(values.ndim)])
        high = np.minimum(low + 1, values.shape[axis] - 1)
        values = (1.0 - weight) * np.take(values, low, axis=axis) + weight * np.take(values, high, axis=axis)
    return values


def _grid_key(grid) -> tuple:
    return (grid.lo, grid.hi, grid.shape)


def _check_geometry(geometry) -> None:
    if isinstance(geometry, Wasserstein):
        return
    name = type(geometry).__name__ + (" (an inf-convolution)" if isinstance(geometry, InfConvolution) else "")
    raise ValueError(_GEOMETRY_HELP.format(name=name))


def _check_grid(mu):
    if mu.grid is None:
        raise ValueError("BackAndForthJKO needs a density on a grid: a measure made by "
                         "jk.Grid(lo, hi, shape).measure(density); got a measure without a grid "
                         f"({mu.n} points in dimension {mu.dim}). For particles use jk.ParticleJKO")
    return mu.grid


class _Ascent:
    """The dual ascent of one step (module docstring)."""

    def __init__(self, energy: LocalEnergy, mu, tau: float, grid):
        self.energy, self.tau, self.grid, self.mu = energy, tau, grid, mu
        self.spacing = grid.spacing
        self.cell = grid.cell_volume
        self.source = mu.weights.reshape(grid.shape)
        # in the layout of the last (axis 0) pass of ``c_transform``, where psi is contiguous
        self.source_last = np.ascontiguousarray(self.source.swapaxes(0, -1)).ravel()
        self.mass = float(mu.mass)
        self.shape = grid.shape
        density = mu.weights / self.cell
        typical_density = float(density @ mu.weights) / self.mass
        # 1 / u''(rho^k): the energy's curvature where mu^k has mass (s only matters through rho)
        curvature = energy.curvature(np.zeros_like(density), density)
        typical_curvature = float(curvature @ mu.weights) / self.mass
        if not (np.isfinite(typical_curvature) and typical_curvature > 0):
            typical_curvature = 1.0 / max(typical_density, 1e-300)
        self.typical_curvature = typical_curvature
        self.diffusivity = typical_density / typical_curvature  # rho u''(rho) of the linearized flow
        # (u*)''(s) -> infinity as s -> 0+ for a power m > 2 alone (rho ~ s^(1/(m-1)))
        self.unbounded_at_edge = energy.entropy == 0 and max(m for _, m in energy.powers) > 2
        self.metric = ScreenedPoisson(grid.shape, self.spacing, tau * typical_density, typical_curvature)
        # c_transform's outputs, reused: a point's argmins are delivered or dropped before the next
        self.buffers = c_transform_buffers(grid.shape)
        self.solves = 0  # Poisson solves: one per direction (two where the averaged one is refused)

    def evaluate(self, phi: np.ndarray, deliver: bool = True, direction: np.ndarray | None = None,
                 sigma: float = 0.0) -> _Point:
        """D and a(phi') at phi' = ``LocalEnergy.feasible(phi + sigma direction)`` (its constant
        balanced; without entropy, lowered where no mass is wanted); with ``deliver``, also P(phi'),
        its plan's cost and F(P(phi'))."""
        phi, own, wanted, curvature = self.energy.feasible_pointwise(phi, self.mass, direction, sigma)
        psi, argmins = c_transform(phi, self.spacing, self.tau, self.buffers)
        dual = float(self.source_last @ np.ascontiguousarray(psi.swapaxes(0, -1)).ravel()) + own
        point = _Point(phi, dual, wanted.reshape(self.shape), curvature.reshape(self.shape), argmins)
        return self.deliver(point) if deliver else point

    def deliver(self, point: _Point) -> _Point:
        """The point with mu^k pushed by its argmins, the plan's cost and the energy of the result."""
        pushed, costs = push_forward(self.source, point.argmins, self.spacing, self.source_last)
        return replace(point, argmins=None, pushed=pushed, distance_sq=float(costs.sum()),
                       energy=self.energy.value(pushed.ravel()))

    def direction(self, point: _Point, delivered: np.ndarray) -> tuple[np.ndarray, float]:
        """The preconditioned ascent direction d = S M^{-1} S (a(phi) - delivered) / h^d, and its
        slope h^d <grad D, d>: M the screened Poisson operator with the typical density and
        curvature, S = sqrt(kappa_bar / kappa) the local correction where the curvature
        kappa = (u*)''(-phi - W) of the energy is smaller (the tails of a density, where both parts
        of the dual's Hessian shrink with the density). Empty cells with a power m > 2 alone are
        not amplified (it overshoots into the edge)."""
        scaling, scaled = _scaled_mismatch(point.curvature.ravel(), point.wanted.ravel(), delivered.ravel(),
                                           self.cell, self.typical_curvature,
                                           SCALING_FLOOR * self.typical_curvature, self.unbounded_at_edge)
        solved = np.ascontiguousarray(self.metric.solve(scaled.reshape(self.shape)))
        self.solves += 1
        slope = _scale_and_slope(solved.ravel(), scaling, point.wanted.ravel(), point.pushed.ravel(),
                                 self.cell)
        return solved, slope

    def certificate(self, primal: _Primal, dual: float) -> float:
        gap = primal.objective(self.tau) - dual
        scale = max(abs(primal.objective(self.tau)), abs(primal.energy),
                    primal.distance_sq / (2.0 * self.tau), 1e-300)
        return float(max(gap, 0.0) / scale) if np.isfinite(gap) else float("inf")

    def recovered(self, point: _Point) -> _Primal | None:
        """The measure near a(phi) that a plan on the near-argmins of phi's c-transform delivers
        exactly (``plan_recovery.recover``; tied nodes split), with the plan's cost; None in 3-D."""
        if len(self.shape) > 2:
            return None
        between = None
        if len(self.shape) == 2:  # mu^k after the outer pass of P(phi): seeds the intermediate fit
            _, argmins = c_transform(point.phi, self.spacing, self.tau)
            first = self.source_last.reshape(self.shape[::-1])
            between = deposit_transposed(first, argmins[0].reshape(first.shape), float(self.spacing[0]))[0]
        found = recover(point.phi, self.source, point.wanted, between, self.spacing, self.tau,
                        self.cell * self.typical_curvature)
        if found is None:
            return None
        masses, distance_sq, _ = found
        return _Primal(masses, distance_sq, self.energy.value(masses.ravel()), recovered=True)

    def run(self, starts, sigma: float, tol: float, max_iter: int) -> _Run:
        """Ascend from the start of largest dual value until the certificate of the best primal
        against the best dual is below tol, or max_iter iterations."""
        points = [self.evaluate(phi) for phi in starts]
        point = max(points, key=lambda p: p.dual)
        run = _Run(point, _Primal.of(point), sigma, evaluations=len(points), recovery=self.recovered)
        for other in points:
            run.offer(other, self.tau)
        average, momentum = _Average(self.shape), _Momentum(point)
        window_start = np.inf  # the certificate PLATEAU_WINDOW iterations ago
        for iteration in range(max_iter):
            run.iterations = iteration
            certificate = self.certificate(run.primal, run.dual.dual)
            report_iteration(iteration, certificate, "duality gap")  # the run's progress bar
            if certificate <= tol:
                return run
            if iteration % PLATEAU_WINDOW == 0:
                if iteration >= 2 * PLATEAU_WINDOW and certificate > (1 - PLATEAU_GAIN) * window_start:
                    run.stalled = run.plateau = True
                    break
                window_start = certificate
            point = self._iterate(run, point, momentum)
            if point is None:
                run.stalled = True
                break
            run.offer(point, self.tau)
            momentum.add(point, self.energy)
            run.offer_primal(momentum.primal(), self.tau, owned=False)
            average.add(point, 1.0)
            if average.count % AVERAGE_WINDOW == 0:  # ergodic average: splits the mass at kinks
                run.offer_primal(average.primal(self.energy), self.tau)
            if average.count >= average.window:
                average.restart()
        else:
            run.iterations = max_iter
        if average.count:
            run.offer_primal(average.primal(self.energy), self.tau)
        return run

    def _iterate(self, run: _Run, point: _Point, momentum: _Momentum) -> _Point | None:
        """One ascent step: along the direction of the averaged mismatch a(phi) - Pbar where it
        is an ascent direction of D (its slope <grad D, d> > 0), else (the average restarting)
        along the gradient. Either way D increases (Armijo on the true slope)."""
        direction, slope = self.direction(point, momentum.pushed)
        trial = self._ascent_step(run, point, direction, slope) if slope > 0 else None
        if trial is None and momentum.count > 1:
            momentum.restart(point)
            trial = self._ascent_step(run, point, *self.direction(point, point.pushed))
        return trial

    def _ascent_step(self, run: _Run, point: _Point, direction: np.ndarray, slope: float) -> _Point | None:
        """Backtracking (Armijo): the dual increases; None where no step along the direction
        increases it (a kink of the discrete dual, docs/theory.md §10)."""
        sigma = run.sigma
        while sigma >= STALL_RATIO * run.sigma:
            trial = self.evaluate(point.phi, deliver=False, direction=direction, sigma=sigma)
            run.evaluations += 1
            if trial.dual >= point.dual + ARMIJO * sigma * slope:
                run.sigma = sigma * GROW
                return self.deliver(trial)
            sigma *= SHRINK
        return None

    def result(self, run: _Run, F, tol: float, start: float) -> StepResult:
        run.recover(self.tau, run.converging and self.certificate(run.primal, run.dual.dual) > tol)
        primal, point = run.primal, run.dual
        measure = self.mu.with_weights(primal.pushed.ravel())
        energy = float(F.value(measure))
        objective = energy + primal.distance_sq / (2.0 * self.tau)
        certificate = self.certificate(primal, point.dual)
        residual = np.sqrt(max(self.direction(point, point.pushed)[1], 0.0))
        status = "optimal" if certificate <= tol else "stalled" if run.stalled else "max_iterations"
        info = {"iterations": run.iterations, "evaluations": run.evaluations, "solves": self.solves,
                "gap": float(objective - point.dual), "dual": point.dual, "residual_h1": float(residual),
                "mismatch_l1": float(np.abs(point.wanted - point.pushed).sum() / self.mass),
                "mass_drift": float((primal.pushed.sum() - self.mass) / self.mass),
                "sigma": run.sigma, "averaged": primal.averaged, "recovered": primal.recovered,
                "wall_time": time.perf_counter() - start}
        info["plateau"] = run.plateau
        info["message"] = _message(status, certificate, tol, run.iterations, self.tau, run.plateau)
        return StepResult.build(F, measure, self.tau, primal.distance_sq, status, certificate, info,
                                energy=energy)


@dataclass
class _Primal:
    """A deliverable new measure: masses (grid shape), the cost of the plan delivering them
    (an upper bound of W_h^2), F of the masses; averaged: an ergodic average of iterates;
    recovered: split between near-argmins by ``plan_recovery``."""

    pushed: np.ndarray
    distance_sq: float
    energy: float
    averaged: bool = False
    recovered: bool = False  # delivered by the plan that splits tied nodes (``plan_recovery``)

    @classmethod
    def of(cls, point: _Point) -> _Primal:
        return cls(point.pushed, point.distance_sq, point.energy)

    def objective(self, tau: float) -> float:
        return self.energy + self.distance_sq / (2.0 * tau)


@dataclass
class _Run:
    """The state of one step's ascent: the best dual point, the best primal, counters."""

    dual: _Point
    primal: _Primal
    sigma: float
    iterations: int = 0
    evaluations: int = 1
    stalled: bool = False
    plateau: bool = False  # stalled because the certificate stopped falling (PLATEAU_GAIN)
    recovery: object = None  # point -> _Primal | None: the plan splitting ties (``_Ascent.recovered``)
    offers: int = 0
    marked_dual: float = np.nan  # the best dual at the last check of its progress, and its rise
    marked_rise: float = np.nan
    converging: bool = False     # the rise still to come is below RECOVERY_REMAINING (extrapolated)
    recovered_from: _Point | None = None

    def offer(self, point: _Point, tau: float) -> None:
        """Keep the point if its dual is higher and its P(phi) if its objective is lower; every
        RECOVERY_EVERY offers, where the dual has nearly converged, also the recovered primal of
        the best dual point."""
        if point.dual > self.dual.dual:
            self.dual = point
        self.offer_primal(_Primal.of(point), tau)
        self.offers += 1
        if self.offers % RECOVERY_EVERY == 0:
            best = self.dual.dual
            rise = best - self.marked_dual
            ratio = rise / self.marked_rise if self.marked_rise > 0 else np.inf
            self.converging = bool(ratio < 1 and rise * ratio / (1 - ratio) <= RECOVERY_REMAINING * abs(best))
            self.marked_dual, self.marked_rise = best, rise
            self.recover(tau, self.converging)

    def recover(self, tau: float, due: bool = True) -> None:
        """Offer the recovered primal of the best dual point, if ``due``, a recovery is set and
        that point has not been recovered already."""
        if due and self.recovery is not None and self.dual is not self.recovered_from:
            self.recovered_from = self.dual
            self.offer_primal(self.recovery(self.dual), tau)

    def offer_primal(self, primal: _Primal | None, tau: float, owned: bool = True) -> None:
        """Keep the primal if its objective is lower (a copy of its masses unless ``owned``)."""
        if primal is not None and primal.objective(tau) < self.primal.objective(tau):
            self.primal = primal if owned else replace(primal, pushed=primal.pushed.copy())


class _Momentum:
    """Exponential average of the iterates' delivered masses and plan costs (weight MOMENTUM on
    the past): its mismatch with a(phi) is the ascent's direction (a heavy-ball direction that
    damps the jumps of P(phi) at kinks), and, a convex combination of deliverable measures, it is
    deliverable at the combined cost (a primal candidate)."""

    def __init__(self, point: _Point):
        self.restart(point)

    def restart(self, point: _Point) -> None:
        if not hasattr(self, "pushed"):
            self.pushed = np.empty(point.pushed.shape)  # owned, contiguous: ``add`` updates it in place
        np.copyto(self.pushed, point.pushed)
        self.cost, self.count, self.energy = point.distance_sq, 1, point.energy

    def add(self, point: _Point, energy: LocalEnergy) -> None:
        """Blend the point in, and evaluate F of the blend in the same pass."""
        self.energy = energy.blend_value(self.pushed.ravel(), point.pushed.ravel(), MOMENTUM, 1.0 - MOMENTUM)
        self.cost = MOMENTUM * self.cost + (1.0 - MOMENTUM) * point.distance_sq
        self.count += 1

    def primal(self) -> _Primal:
        """The candidate; its masses are this object's buffer (``_Run.offer_primal`` copies them
        when it keeps the candidate)."""
        return _Primal(self.pushed, self.cost, self.energy, averaged=True)


class _Average:
    """Weighted average of the iterates' delivered masses and plan costs over a window that
    doubles at each restart (the recent half of the run). A convex combination of deliverable
    measures is deliverable (the plans combine), at the combined cost, and F is convex: the
    average's objective is at most the average objective, and at a kink it splits mass that
    single iterates send wholly one way or the other."""

    def __init__(self, shape):
        self.shape, self.window = shape, AVERAGE_WINDOW
        self.count, self.weight, self.cost = 0, 0.0, 0.0
        self.pushed = np.zeros(shape)

    def restart(self) -> None:
        window = 2 * self.window
        self.__init__(self.shape)
        self.window = window

    def add(self, point: _Point, weight: float) -> None:
        self.count += 1
        self.weight += weight
        self.cost += weight * point.distance_sq
        _blend(self.pushed.ravel(), point.pushed.ravel(), 1.0, weight)

    def primal(self, energy: LocalEnergy) -> _Primal:
        pushed = self.pushed / self.weight
        return _Primal(pushed, self.cost / self.weight, energy.value(pushed.ravel()), averaged=True)


def _message(status: str, certificate: float, tol: float, iterations: int, tau: float,
             plateau: bool = False) -> str:
    if status == "optimal":
        return f"certified: duality gap {certificate:.2e} of the objective <= tol {tol:g}"
    if plateau:
        return (f"BackAndForthJKO: the duality gap stayed at {certificate:.2e} of the objective, above "
                f"tol = {tol:g}: it fell by less than {PLATEAU_GAIN:.0%} over the last {PLATEAU_WINDOW} of "
                f"{iterations} iterations, so the dual ascent has stopped improving and no measure the "
                "method delivers matches it more closely: where the density jumps, or where a step "
                "spreads a narrow density over several cells, the dual has kinks, and neither the "
                "pushforward, its averages nor the plan that splits tied cells between their "
                "destinations closes the gap (docs/theory.md §10). More iterations will not help: "
                f"loosen tol (to about {2 * certificate:.0e}), take a smaller tau (tau = {tau:g}) while "
                "the flow spreads a narrow density, or smooth the initial density")
    if status == "stalled":
        return (f"BackAndForthJKO: the dual ascent stalled after {iterations} iterations with the "
                f"duality gap at {certificate:.2e} of the objective, above tol = {tol:g}: no step along "
                "the gradient increases the discrete dual here, which has kinks where the c-transform's "
                f"argmin jumps between cells (tau = {tau:g}; docs/theory.md §10); loosen tol, take a "
                "smaller tau while the flow spreads a narrow density over several cells, or smooth the "
                "initial density (discontinuous densities make kinks)")
    return (f"BackAndForthJKO stopped at max_iter = {iterations} with the duality gap at "
            f"{certificate:.2e} of the objective, above tol = {tol:g}: raise max_iter, loosen tol, "
            f"or take a tau nearer the flow's time scale (tau = {tau:g}: very large or very small "
            "steps make the dual ill-conditioned; discontinuous densities give it kinks, where the "
            "ascent slows down, docs/theory.md §10)")
