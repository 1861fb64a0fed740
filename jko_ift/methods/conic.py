"""The exact JKO step on a fixed support, as one convex program (CVXPY).

On the points x_1..x_n of mu^k = sum_i a_i delta_{x_i} the step solves

    min_{P >= 0, nu, b >= 0}  F(b) + [ <C, P> / alpha + R^2(nu, b) / beta ] / (2 tau)
    s.t.  P 1 = a,  P^T 1 = nu          (transport part; without it nu = a)
          b = nu                        (without a reaction part)
          sum(b) = sum(a)               (reaction part with conserve_mass)

with C_ij = |x_i - x_j|^2, R^2 = He^2 (second-order cones) or a quadratic reaction such as
MMD^2 (a PSD quadratic form of the geometry's metric). The same program serves all five
geometries. F enters through its normal form in the weights (``Energy.form``), translated here
to CVXPY atoms (``form_expression``): the log part by entropy cones, powers by power cones, the
quadratic part as one PSD block. Variables are scaled by s = mass / n so that
they are of order one, and the problem is compiled once per support with a / s and 2 tau
as parameters (DPP): later steps only re-solve.

The plan only has entries for pairs closer than a radius R. From the duals (u, v) of
the marginal constraints, the restricted solution is optimal for the dense problem when
every excluded pair has a nonnegative reduced cost c_ij - u_i - v_j; otherwise R is
doubled and the step re-solved (docs/conic.md).
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import reduce

import cvxpy as cp
import numpy as np
from cvxpy.reductions.solvers.conic_solvers.clarabel_conif import CLARABEL as _Clarabel
from cvxpy.reductions.solvers.conic_solvers.scs_conif import SCS as _SCS
from cvxpy.reductions.utilities import ReducedMat
from scipy import sparse
from scipy.spatial import cKDTree

from ..energies import ZERO_SUM_PSD, Energy, NotConvexError, WeightForm, psd_factor
from ..geometries import Geometry, Wasserstein
from ..kernels import centred, row_blocks, squared_distances
from ..measures import Measure
from .base import (
    Method,
    Same,
    SolverError,
    Status,
    StepResult,
    check_step_input,
    clipping_report,
    support_key,
    without_excluded,
)
from .grid_motion import GridLockingWarning, barycentric_motion, check_step  # noqa: F401 (re-exported)
from .options import check_solver_options, count, fraction, positive

SOLVERS = ("CLARABEL", "SCS")

#: Relative duality gap (and exclusion residual) above which a solve is not "optimal".
#: Clarabel's own default stopping tolerance is 1e-8; SCS is first order and looser.
DEFAULT_GAP_TOL = {"CLARABEL": 1e-6, "SCS": 1e-4}


class _SparseRestructuring:
    """CVXPY's cone formatting of the parametrized program, in memory linear in its size.

    CVXPY orders each cone's rows for the solver (``ConicSolver.format_constraints``) by
    reshaping the parameter tensor A, of shape (rows (x + 1), params + 1), to rows x
    (x + 1)(params + 1) and multiplying it by a spacing matrix: scipy's sparse product then
    allocates an index array of one entry per column, (x + 1)(params + 1), which with the
    weights as an n-vector parameter is n times the plan size (1.8 GiB at 1600 grid points,
    41.7 GiB at 6400, for a few hundred thousand nonzeros). The reordering is a signed
    permutation of the rows within each variable's block: learnt here from a one-column
    probe (through CVXPY's own code, so that every cone keeps its convention) and applied to
    A's nonzeros directly.
    """

    @classmethod
    def format_constraints(cls, problem, exp_cone_order):
        rows = problem.A.shape[0] // (problem.x.size + 1)  # the constraints' rows
        probe = copy.copy(problem)  # rows 0..rows-1 of the first block, values 1..rows
        probe.A = sparse.coo_array((np.arange(1.0, rows + 1), (np.arange(rows), np.zeros(rows, int))),
                                   shape=(rows * (problem.x.size + 1), 1))
        formatted = super().format_constraints(probe, exp_cone_order)
        moved = sparse.coo_array(formatted.A)
        old_row = np.abs(moved.data).astype(np.int64) - 1
        new_rows = formatted.A.shape[0] // (problem.x.size + 1)
        if not (moved.nnz == rows and np.array_equal(np.sort(old_row), np.arange(rows))
                and np.all(np.abs(moved.data) == old_row + 1)):  # pragma: no cover - not a permutation
            return super().format_constraints(problem, exp_cone_order)
        target, sign = np.empty(rows, np.int64), np.empty(rows)
        target[old_row], sign[old_row] = moved.coords[0], np.sign(moved.data)
        tensor = sparse.coo_array(problem.A)
        block, row = np.divmod(tensor.coords[0].astype(np.int64), rows)
        formatted.A = sparse.coo_array(
            (tensor.data * sign[row], (target[row] + new_rows * block, tensor.coords[1].astype(np.int64))),
            shape=(new_rows * (problem.x.size + 1), problem.A.shape[1]))
        formatted.reduced_A = ReducedMat(formatted.A, formatted.x.size)
        return formatted


class _ClarabelWithStats(_SparseRestructuring, _Clarabel):
    """Clarabel through CVXPY, keeping the raw solution (primal and dual objectives)."""

    def name(self):
        return "CLARABEL_JKO"

    def invert(self, solution, inverse_data):
        out = super().invert(solution, inverse_data)
        out.attr[cp.settings.EXTRA_STATS] = solution
        return out


class _ScsSparse(_SparseRestructuring, _SCS):
    """SCS through CVXPY, with the memory-linear cone formatting."""

    def name(self):
        return "SCS_JKO"


#: One instance each: CVXPY keys its compiled-problem cache on the solver object.
_CLARABEL = _ClarabelWithStats()
_SCS_SOLVER = _ScsSparse()

#: Solver settings used unless the caller sets them. Clarabel's QDLDL factorization is 4-6x
#: faster than its default choice (faer) on these KKT systems (benchmarks/conic_step.py).
#: warm_start=False: CVXPY would otherwise update the previous Clarabel solver in place,
#: keeping the equilibration of the first step's data, and later steps can then stall
#: (seen in adaptive runs); a fresh setup costs milliseconds, the DPP compile stays cached.
DEFAULT_OPTIONS = {"CLARABEL": {"direct_solve_method": "qdldl", "warm_start": False},
                   "SCS": {"warm_start": False}}

#: Retried once (with Clarabel's own tolerances and iteration limit) when Clarabel stalls
#: (InsufficientProgress) short of ``gap_tol``: shorter interior-point steps let the dense 2-D
#: plans converge.
CLARABEL_RETRY = {"max_step_fraction": 0.95}

#: Clarabel's gap and feasibility tolerances (tol_gap_abs, tol_gap_rel, tol_feas) at
#: tau >= TOLERANCE_FULL_TAU: its own default. A step whose objective is certified to an
#: absolute gap g is within about sqrt(2 tau g) of the exact step (docs/conic.md §8), so the
#: solver error per step scales like sqrt(tolerance), while the step's local error scales like
#: tau^2: the tolerance shrinks like tau^4 below TOLERANCE_FULL_TAU. Calibrated on the
#: Hellinger flow of KL (50 points, docs/conic.md §8): at tau = 0.05 and tolerance 1e-8 the
#: solver error per step (1.7e-5 in He) is 5 % of the local error (global error / tau * tau^2
#: = 3.4e-4); the rule keeps that ratio down to TOLERANCE_FLOOR.
TOLERANCE_AT_FULL_TAU = 1e-8
TOLERANCE_FULL_TAU = 0.05
#: The tightest tolerance asked for (reached at tau = 0.005 by the rule): Clarabel reaches
#: 1e-12 on the Hellinger, MMD and W2 steps measured; at 1e-14 it stalls (InsufficientProgress)
#: on W2 and WFR grid steps, spending up to twice the iterations for nothing.
TOLERANCE_FLOOR = 1e-12


#: Iteration limit while the tolerances are tighter than Clarabel's own. At 1e-12, 1-D W2,
#: Hellinger, MMD, WFR and IFT steps take 12-47 iterations (Clarabel's 1e-8: 5-25), but on 2-D
#: grids whose tails sit at the entropy cones' boundary Clarabel crawls below a gap of 1e-9
#: without declaring a stall: 67 iterations for 2.4e-12 and 200 (its limit, 6x the time) for
#: 3.9e-11 on 16 x 16 (benchmarks/conic_step.py). At the limit it reports AlmostSolved, whose
#: certificate our status policy still judges (and the error bound reports); if even that
#: fails, the retry runs with Clarabel's own defaults.
TIGHT_MAX_ITER = 50


def _tolerance_options(solver: str, tau: float) -> dict:
    if solver != "CLARABEL":
        return {}
    tolerances = clarabel_tolerances(tau)
    if tolerances["tol_gap_rel"] < TOLERANCE_AT_FULL_TAU:
        tolerances["max_iter"] = TIGHT_MAX_ITER
    return tolerances


def clarabel_tolerances(tau: float) -> dict:
    """Clarabel's stopping tolerances for a step of size tau: 1e-8 (its default) down to
    TOLERANCE_FLOOR, shrinking like tau^4 below TOLERANCE_FULL_TAU (see TOLERANCE_AT_FULL_TAU)."""
    tol = TOLERANCE_AT_FULL_TAU * min(1.0, tau / TOLERANCE_FULL_TAU) ** 4
    tol = max(tol, TOLERANCE_FLOOR)
    return {"tol_gap_abs": tol, "tol_gap_rel": tol, "tol_feas": tol}


#: The absolute part of the descent check (``ConicProgram._check_descent``), in the program's
#: scaled units: Clarabel's default absolute gap tolerance (1e-8), the accuracy an interior-point
#: solve certifies for the objective of a step that does not move (mu^k at equilibrium).
DESCENT_FLOOR = 1e-8


#: psd_factor's default rtol (energies.py): the Gram eigenvalues the program keeps.
PSD_RTOL = 1e-10


#: An MMD reaction step whose new weight is below this fraction of the weight it started from
#: (nu_i after the transport) ended on the constraint b_i >= 0: the exact step of a smooth
#: reaction does not shrink a weight a million-fold, and Clarabel's active bounds sit at
#: 1e-10 to 1e-8 of nu_i (tests/test_regimes.py).
ACTIVE_BOUND_RTOL = 1e-6


#: Peak memory of a step's solve, in bytes, for m plan entries (``estimated_memory``): Clarabel's
#: sparse LDL factorization of the KKT system dominates, its fill growing like m^1.5. Measured on
#: W2 steps of Entropy + |x|^2 / 2: restricted plans on grids (radius 2.5 h) 0.77 GB at m = 73k
#: (60 x 60) and 2.0 GB at m = 131k (80 x 80), 39 and 42 m^1.5; a dense plan (20 x 20,
#: m = 160k) 0.51 GB, 8 m^1.5. The estimate takes 20 m^1.5: refusing a problem that would have
#: fit is worse than the MemoryError it prevents.
SOLVE_BYTES = 20.0
#: ... plus, for a quadratic form (MMD^2, an MMD or IFT reaction), its dense n x n block in the
#: compiled program and in the factorization.
QUADRATIC_BYTES = 200.0


def estimated_memory(n: int, entries: int, quadratic: bool) -> float:
    """Estimated peak memory (bytes) of a conic step on n points with ``entries`` plan entries."""
    return SOLVE_BYTES * float(entries) ** 1.5 + (QUADRATIC_BYTES * float(n) ** 2 if quadratic else 0.0)


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return np.inf


def _check_size(n: int, entries: int, quadratic: bool) -> None:
    """Refuse, before building it, a program whose solve would not fit in this machine's memory."""
    need, have = estimated_memory(n, entries, quadratic), _physical_memory()
    if need <= have:
        return
    raise ValueError(
        f"ConicJKO: this step is too large for memory: {n} points and {entries} transport plan entries "
        f"need about {need / 2**30:.3g} GiB for the interior-point solve (about {SOLVE_BYTES:g} "
        f"entries^1.5 bytes{', plus the dense n x n quadratic form' if quadratic else ''}), "
        f"and this machine has {have / 2**30:.3g} GiB. Use jk.EntropicJKO (Sinkhorn, memory linear "
        "in the plan), a coarser grid, or a smaller plan radius (ConicJKO(radius=...))")


def _solver_instance(name: str):
    return _CLARABEL if name == "CLARABEL" else _SCS_SOLVER


# -------------------------------------------------------------------------------------------------
# The energy as a CVXPY expression, from its normal form in the weights
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConicSupport:
    """What the CVXPY expression of an energy needs on a fixed support.

    The weights variable is y with b = scale * y (scale makes y of order one).
    ``mass`` is sum(b) when the step conserves mass (fixed over a run), else None.
    Expressions may differ from F by a constant on the feasible set.
    """

    measure: Measure
    scale: float
    mass: float | None


def conic_expression(F: Energy, y: cp.Expression, support: ConicSupport) -> cp.Expression:
    """F(b) at b = scale * y as a convex CVXPY expression (up to a constant), from F's form.

    Raises ``NotConvexError`` (a ValueError) for an energy that is not convex in the weights
    on this support, and ``NoWeightFormError`` for one that states no form."""
    return form_expression(F, F.form(support.measure), y, support)


def form_expression(F: Energy, form: WeightForm, y: cp.Expression,
                    support: ConicSupport) -> cp.Expression:
    """The ``WeightForm`` of F as CVXPY atoms, b = s y:

        L sum (b log(b / r) - b)      -> L s sum kl_div(y, r / s) + const, or, for a constant
                                         r (a cell volume), L s (-sum entr(y) + (log(s / r) - 1) sum y),
        o^T b                         -> s o^T y  (o = +inf: b = 0 by constraint, term dropped),
        c / (p + 1) sum b^(p + 1)     -> c s^(p + 1) / (p + 1) sum power(y, p + 1),
        1/2 b^T Q b                   -> one PSD block (``quadratic_expression``).

    The relative entropy keeps its reference inside the exponential cone: written as
    -entr(y) plus a linear term, a KL to a target with weights near zero is resolved only to
    about 1e-4 relative instead of 1e-5 (tests/test_kl_zeros.py).
    """
    if not form.convex:
        raise F._not_convex()
    s = support.scale
    parts = []
    if form.log_coef:
        r = form.reference
        if np.all(r == r[0]) and r[0] > 0:
            log_part = -cp.sum(cp.entr(y)) + (np.log(s / r[0]) - 1.0) * cp.sum(y)
        else:
            log_part = cp.sum(cp.kl_div(y, r / s))
        parts.append(form.log_coef * s * log_part)
    for c, p in form.powers:
        parts.append(c * s ** (p + 1) / (p + 1) * cp.sum(cp.power(y, p + 1)))
    if form.quadratic is not None:
        parts.append(0.5 * quadratic_expression(F, form, y, s, support.mass))
    if np.any(form.offset != 0):
        parts.append(s * (np.where(np.isfinite(form.offset), form.offset, 0.0) @ y))
    return reduce(lambda left, right: left + right, parts, cp.Constant(0.0))


def quadratic_expression(F: Energy, form: WeightForm, y, scale: float, mass) -> cp.Expression:
    """(s y)^T Q (s y) as a convex expression, up to a constant on the feasible set.

    A positive semidefinite Q uses its factor directly. One that is PSD only on zero-sum
    vectors (a conditionally positive definite kernel) with P the centring projector and
    sum(b) = mass fixed: b^T Q b = |L_P b|^2 + 2 (mass / n) (P Q 1)^T b + const.
    """
    gram = form.quadratic
    factor = psd_factor(gram)
    if factor is not None:
        return scale**2 * psd_quadratic(y, factor)
    factor = psd_factor(centred(gram)) if mass is not None else None
    if factor is None:
        if form.quadratic_psd == ZERO_SUM_PSD:
            raise NotConvexError(
                "this kernel is only conditionally positive definite: its MMD^2 is convex only "
                "where mass is conserved; use conserve_mass=True, a Wasserstein geometry, or a "
                "positive definite kernel (jk.Gaussian, jk.IMQ, jk.Laplace)")
        raise F._not_convex()
    n = gram.shape[0]
    row_sums = gram.sum(1)
    linear = (2.0 * scale / n) * (row_sums - row_sums.mean()) @ y
    return scale**2 * psd_quadratic(y, factor) + mass * linear


def psd_quadratic(y, factor: np.ndarray) -> cp.Expression:
    """|factor @ y|^2 as one PSD quadratic form: the solver gets an n x n block, not dense
    second-order cone rows (faster for the interior point, benchmarks/conic_step.py)."""
    return cp.quad_form(y, cp.psd_wrap(factor.T @ factor))


@dataclass(frozen=True, eq=False)
class ConicJKO(Method):
    r"""Exact JKO step on a fixed support, as a convex conic program.

    The points of :math:`\mu^k` stay; the weights change (and, with a transport part, mass is
    moved between the points by a transport plan).

    Parameters
    ----------
    solver : {"CLARABEL", "SCS"}, default "CLARABEL"
        Interior point (Clarabel) or first order (SCS, for large problems).
    radius : float or None, default None
        Initial radius :math:`R` of the sparse transport plan (pairs farther apart than
        :math:`R` carry no mass; the radius grows while the plan touches it). None picks it
        from :math:`\tau|\nabla f|` and the grid spacing; ``np.inf`` uses the dense
        :math:`n \times n` plan.
    gap_tol : float or None, default None
        The accepted relative certificate (duality gap); None: the solver's default.
    solver_options : dict, optional
        Passed to the solver (e.g. ``{"eps_abs": 1e-9}`` for SCS); they override the Clarabel
        tolerances, which shrink like :math:`\tau^4` below :math:`\tau = 0.05`
        (``clarabel_tolerances``) so that the solver's error stays well below the step's
        :math:`O(\tau^2)` local error.
    cache_size : int, default 4
        Compiled programs kept (one per support and geometry).

    Raises
    ------
    SolverError
        From ``step`` when the solver fails (with ``throw=True``); the message says what to
        change.

    Notes
    -----
    On the support :math:`x_1, \dots, x_n` of :math:`\mu^k = \sum_i a_i\delta_{x_i}` the step
    solves, over new weights :math:`b \ge 0`,

    .. math::

        \min_{b \ge 0}\; F\Big(\sum_i b_i\delta_{x_i}\Big) + \frac{1}{2\tau} D^2(a, b),

    with :math:`D^2` the geometry's squared distance: a linear program in a transport plan
    :math:`P` for :math:`W_2` (:math:`\sum_{ij} P_{ij}|x_i - x_j|^2`, marginals :math:`a` and
    :math:`b`), a second-order cone for Hellinger, a quadratic form for MMD, and their
    inf-convolution through an intermediate measure :math:`\nu` for WFR and IFT.
    Each step reports ``info["error_bound"]``: a bound on the distance, in the step's own
    geometry, from the returned measure to the exact minimizer, from the solver's gap and the
    KKT residual through the strong convexity of :math:`D^2/(2\tau)` (Hellinger and MMD; None
    with a transport part, where the gap bounds the objective only).

    References
    ----------
    * R. Jordan, D. Kinderlehrer, F. Otto, SIAM J. Math. Anal. 29 (1998), the JKO step;
      the programs are solved by Clarabel (Goulart and Chen, 2024) or SCS.

    Examples
    --------
    >>> mu = jk.Measure([[0.0], [1.0]], [0.5, 0.5])
    >>> F = jk.KL(mu.with_weights([0.2, 0.8]))
    >>> r = jk.ConicJKO().step(F, jk.Hellinger(), mu, tau=1.0)
    >>> r.status, bool(r.energy < F.value(mu))
    ('optimal', True)
    """

    keeps_support = True  # the points of mu^k, new weights
    local_error_order = 2  # O(tau^2) per step: implicit Euler (jko_ift.control)
    solver: str = "CLARABEL"
    radius: float | None = None
    gap_tol: float | None = None
    solver_options: dict = field(default_factory=dict)
    cache_size: int = 4

    def __post_init__(self):
        name = self.solver.upper() if isinstance(self.solver, str) else self.solver
        if name not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; ConicJKO supports {SOLVERS}")
        if name not in cp.installed_solvers():
            raise ValueError(f"solver {name} is not installed; pip install {name.lower()}")
        self._settle(solver=name)
        # a gap_tol <= 0 could never be met (the radius would double forever), NaN never either
        self._settle(gap_tol=fraction("ConicJKO", "gap_tol", DEFAULT_GAP_TOL[name]
                                      if self.gap_tol is None else self.gap_tol))
        if self.radius is not None:
            self._settle(radius=positive("ConicJKO", "radius (np.inf: a dense plan)", self.radius,
                                         allow_inf=True))
        self._settle(cache_size=count("ConicJKO", "cache_size", self.cache_size),
                     solver_options=check_solver_options(name, self.solver_options))

    def _step(self, F: Energy, geometry: Geometry, mu: Measure, tau: float, state,
              throw: bool = True) -> StepResult:
        tau = check_step_input(F, geometry, mu, tau)
        key = (Same(F), Same(geometry), support_key(mu))
        radii = state.warm.setdefault("radii", {})  # the radius that sufficed, per problem
        # the variables' scale of the problem's first program: a program compiled anew (after
        # its cache was dropped or evicted) then takes the same steps, bit for bit
        scale = state.warm.setdefault("scales", {}).setdefault(key, mu.mass / mu.n)
        programs = state.cache.setdefault("programs", OrderedDict())
        radius = radii.get(key) or self._initial_radius(F, geometry, mu, tau)
        while True:
            program, compiled = self._program(programs, key, F, geometry, mu, radius, scale)
            result = program.solve(mu, tau, self.solver, self.solver_options, self.gap_tol)
            violation = result.info.get("exclusion_violation", 0.0)
            if result.measure is not None and violation > self.gap_tol:
                radius *= 2.0  # an excluded pair would carry mass: enlarge and re-solve
                continue
            break
        radii[key] = radius
        info = {**result.info, "compiled": compiled}
        if program.has_transport and result.measure is not None:
            _check_grid_locking(F, geometry, mu, tau, result, program, info)
        result = replace(result, info=info)
        if throw and not result.ok:
            raise SolverError(_failure_message(result, self.solver), result.status, result)
        return result

    def _initial_radius(self, F, geometry, mu, tau) -> float:
        if self.radius is not None or not geometry.has_transport:
            return np.inf if self.radius is None else float(self.radius)
        spacing = _spacing(mu)
        try:
            speed = np.abs(F.grad_first_variation(mu))
            speed = np.sqrt((speed**2).sum(1))
            mask = (mu.weights > 0) & np.isfinite(speed)
            typical = np.sqrt(np.average(speed[mask] ** 2, weights=mu.weights[mask]))
        except (ValueError, ZeroDivisionError):
            typical = 0.0
        # mass moves about tau alpha |grad f|; the certificate catches a radius too small
        return max(2.5 * spacing, 2.0 * tau * geometry.alpha * typical)

    def _program(self, programs: OrderedDict, key, F, geometry, mu, radius, scale: float):
        full_key = key + (radius,)
        program = programs.get(full_key)
        # a conserved mass enters the program as a constant (ConicSupport): same mass, same program
        if program is not None and (not geometry.conserve_mass
                                    or abs(program.mass - mu.mass) <= 1e-9 * mu.mass):
            programs.move_to_end(full_key)
            return program, False
        program = ConicProgram(F, geometry, mu, radius, scale)
        programs[full_key] = program
        while len(programs) > self.cache_size:
            programs.popitem(last=False)
        return program, True


def _spacing(mu: Measure) -> float:
    """Grid spacing, or the median nearest-neighbour distance of a point cloud."""
    if mu.grid is not None:
        return float(np.max(mu.grid.spacing))
    if mu.n < 2:
        return 1.0
    distances, _ = cKDTree(mu.points).query(mu.points, k=2)
    return float(np.median(distances[:, 1]))


class ConicProgram:
    """The compiled step problem on one support and one plan radius."""

    def __init__(self, F: Energy, geometry: Geometry, mu: Measure, radius: float,
                 scale: float | None = None):
        self.F, self.geometry, self.support = F, geometry, mu
        self.has_transport = geometry.has_transport
        self.reaction = geometry.reaction
        self._spectrum = None  # eigendecomposition of K + ridge I, for the residual bound
        self._metric = None  # (M, ridge) of a quadratic reaction
        n = mu.n
        self.mass = mu.mass
        self.scale = mu.mass / n if scale is None else scale  # b = scale * y, y of order one
        self.a = cp.Parameter(n, nonneg=True, name="a_over_scale")
        self.two_tau = cp.Parameter(nonneg=True, name="two_tau")
        constraints = []
        self.dense = True
        if self.has_transport:
            self.rows, self.cols, self.dense = _plan_pairs(mu.points, radius)
            self.cost = np.sum((mu.points[self.rows] - mu.points[self.cols]) ** 2, axis=1)
            m = self.rows.size
            row_sum = sparse.csr_matrix((np.ones(m), (self.rows, np.arange(m))), shape=(n, m))
            col_sum = sparse.csr_matrix((np.ones(m), (self.cols, np.arange(m))), shape=(n, m))
            self.plan = cp.Variable(m, nonneg=True, name="plan")
            self.nu = cp.Variable(n, name="nu")
            self.row_constraint = row_sum @ self.plan == self.a
            self.col_constraint = col_sum @ self.plan == self.nu
            constraints += [self.row_constraint, self.col_constraint]
            transport = self.cost @ self.plan / geometry.alpha
        else:
            self.nu = self.a
            transport = 0
        if self.reaction is not None:
            self.y = cp.Variable(n, nonneg=True, name="y")
            reaction, cones = self._reaction_term(self.nu, self.y)
            reaction = reaction / geometry.beta
            constraints += cones
            if geometry.conserve_mass:
                constraints.append(cp.sum(self.y) == cp.sum(self.nu))
        else:
            self.y = self.nu
            reaction = 0
        mass = mu.mass if geometry.conserve_mass else None
        # where F is +inf unless the weight vanishes (KL to a target with zeros), the weight is
        # 0 by constraint: the exponential cone alone leaves ~1e-10 there, and F = inf after
        form = F.form(mu)
        excluded = F.excluded(mu)
        infinite = ~np.isfinite(form.total_offset)  # f = +inf: b = 0 (a KL target's zeros)
        excluded = infinite if excluded is None else excluded | infinite
        if excluded.any():
            constraints.append(self.y[np.flatnonzero(excluded)] == 0)
        quadratic = form.quadratic is not None or (self.reaction is not None and self.reaction.quadratic)
        _check_size(n, self.rows.size if self.has_transport else n, quadratic)
        energy = form_expression(F, form, self.y, ConicSupport(mu, self.scale, mass))
        # 2 tau (F + D^2 / (2 tau)) / s: tau multiplies the parameter-free F (DPP), and the
        # s-scaled terms are of order n
        objective = self.two_tau * (energy / self.scale) + transport + reaction
        self.problem = cp.Problem(cp.Minimize(objective), constraints)
        if not self.problem.is_dcp(dpp=True):  # pragma: no cover - guarded by the atoms
            raise NotConvexError("the step problem is not convex (DCP) in the weights")

    def _reaction_term(self, nu, y):
        """R^2(nu, y) in scaled units (He^2 / s or MMD^2 / s) and its cone constraints."""
        if not self.reaction.quadratic:  # Hellinger
            # 4 sum (nu + y - 2 t) with t_i^2 <= nu_i y_i: a rotated second-order cone
            t = cp.Variable(y.shape[0], name="hellinger_mean")
            cone = cp.SOC(nu + y, cp.vstack([2 * t, nu - y]), axis=0)
            return 4 * cp.sum(nu + y - 2 * t), [cone]
        try:  # G = M + ridge I, M centred for a conditionally p.d. kernel (the geometry's metric)
            matrix, ridge = self._metric_parts()
        except ValueError as error:
            raise NotConvexError(str(error)) from None
        factor = psd_factor(matrix, PSD_RTOL)
        if factor is None:
            raise NotConvexError(f"the metric of {self.reaction!r} is not positive semidefinite "
                                 "on this support")
        # d = y - nu as a variable keeps the form parameter-free when nu = a (DPP), and the
        # quadratic form goes to the solver as one PSD block instead of dense cone rows
        diff = cp.Variable(y.shape[0], name="reaction_difference")
        form = cp.quad_form(diff, cp.psd_wrap(factor.T @ factor))
        return self.scale * (form + ridge * cp.sum_squares(diff)), [diff == y - nu]

    def solve(self, mu, tau, solver, options, gap_tol) -> StepResult:
        self.a.value = mu.weights / self.scale
        self.two_tau.value = 2.0 * tau
        start = time.perf_counter()
        run = DEFAULT_OPTIONS[solver] | _tolerance_options(solver, tau) | options
        solver_status = self._run_solver(solver, run)
        retried = (solver == "CLARABEL" and not self._certified(solver_status, gap_tol)
                   and not CLARABEL_RETRY.keys() & options.keys())
        if retried:  # Clarabel's own tolerances and iteration limit, shorter steps
            run = DEFAULT_OPTIONS[solver] | options | CLARABEL_RETRY
            solver_status = self._run_solver(solver, run)
        info = {"solver": solver, "solver_status": solver_status, "n": mu.n, "retried": retried,
                "wall_time": time.perf_counter() - start}
        if solver == "CLARABEL":
            info["tolerance"] = run.get("tol_gap_rel", TOLERANCE_AT_FULL_TAU)
        stats = self.problem.solver_stats
        if stats is not None:
            info.update(solve_time=stats.solve_time, iterations=stats.num_iters)
        if not _has_solution(solver_status) or self.y.value is None:
            return StepResult.failed(_status_name(solver_status), info)
        weights = np.maximum(self.scale * np.asarray(self.y.value), 0.0)
        weights = without_excluded(self.F, mu, weights)  # the constraint holds to feasibility only
        if self.geometry.conserve_mass:  # remove the solver's ~1e-9 drift so runs conserve exactly
            weights *= mu.mass / weights.sum()
        new = mu.with_weights(weights)
        nu = (np.maximum(self.scale * np.asarray(self.nu.value), 0.0) if self.has_transport
              else mu.weights)
        if self.reaction is not None and not self.reaction.positivity_preserving:  # not He
            # the interior point leaves an active b_i >= 0 at ~1e-10 of nu_i, not at 0
            clipping_report(nu, np.where(weights <= ACTIVE_BOUND_RTOL * nu, 0.0, weights), info,
                            "ConicJKO")
        distance_sq = self._distance_sq(mu, nu, new)
        energy = self.F.value(new)
        gap, residual, solver_objective, absolute_gap = _solver_certificate(stats)
        info.update(relative_gap=gap, residual=residual, intermediate=nu)
        excluded_gain = 0.0
        if self.has_transport:
            info.update(radius=self.radius_used, plan_entries=int(self.rows.size),
                        moved_fraction=self._moved_fraction())
            if not self.dense:
                excluded_gain = self._excluded_gain()
                info["exclusion_violation"] = _relative(excluded_gain, solver_objective)
        certificate = max(gap, residual, info.get("exclusion_violation", 0.0))
        objective = energy + distance_sq / (2 * tau)
        descends = self._check_descent(mu, objective, tau, gap_tol, info)
        start_energy = float(self.F.value(mu))
        if descends and _staying_is_better(start_energy, objective, gap_tol, info):
            new, distance_sq, energy = mu, 0.0, start_energy
        info["error_bound"] = self._error_bound(mu, new, tau, absolute_gap + excluded_gain)
        if not descends and certificate <= gap_tol:
            info["inaccurate_cause"] += (", although the solver's certificate, relative to its "
                                         "scaled objective 2 tau G / s, passed")
        # Our status: "optimal" when the certificate is within gap_tol, whether the solver
        # stopped at its own (tighter) tolerances or just short of them, and the step is no
        # worse than not moving (descends).
        status = "optimal" if certificate <= gap_tol and descends else "optimal_inaccurate"
        return StepResult.build(self.F, new, tau, distance_sq, status, certificate, info, energy)

    def _check_descent(self, mu: Measure, objective: float, tau: float, gap_tol: float,
                       info: dict) -> bool:
        """Whether the step's objective G(mu^{k+1}) = F + D^2 / (2 tau) is at most F(mu^k) (the
        objective of not moving, which the exact step never exceeds) up to gap_tol relative to
        F, plus DESCENT_FLOOR in the program's scaled units (s / (2 tau) in F's units).

        The solver's certificate is relative to the program's objective 2 tau G / s, so it
        bounds G only to gap_tol * max(1, |p|) * s / (2 tau): at small tau that lets a step
        stand whose objective lies well above F(mu^k) (SCS: 2.35e-3 above, certificate 2.6e-5).
        Records ``descent_excess`` (G - F(mu^k)) and ``descent_tolerance`` in ``info``."""
        start_energy = float(self.F.value(mu))
        if not (np.isfinite(start_energy) and np.isfinite(objective)):
            return True  # an infinite start (KL with zeros) bounds nothing; NaN is caught elsewhere
        excess = objective - start_energy
        tolerance = (gap_tol * max(abs(start_energy), abs(objective))
                     + DESCENT_FLOOR * self.scale / (2.0 * tau))
        info.update(descent_excess=excess, descent_tolerance=tolerance)
        if excess <= tolerance:
            return True
        info["inaccurate_cause"] = (
            f"the step's objective F + D^2/(2 tau) = {objective:.6g} exceeds F(mu^k) = "
            f"{start_energy:.6g} by {excess:.3g} (tolerance {tolerance:.3g}): the step is worse than "
            "not moving")
        return False

    def _certified(self, solver_status: str, gap_tol: float) -> bool:
        """Whether the solver's answer passes our status policy without a retry: solved, or
        stopped short of its tolerances (AlmostSolved, a stall) with gap and residuals within
        gap_tol. A retry then would only cost time; the error bound reports the accuracy."""
        if solver_status == "optimal":
            return True
        if not _has_solution(solver_status) or self.y.value is None:
            return False
        gap, residual, _, _ = _solver_certificate(self.problem.solver_stats)
        return max(gap, residual) <= gap_tol

    def _error_bound(self, mu: Measure, new: Measure, tau: float,
                     absolute_gap: float) -> float | None:
        """Bound on D(new, exact step): the smaller of the gap bound and the residual bound
        (docs/conic.md §8); None where neither holds (geometries with transport), so that run
        statistics, which keep scalars only, leave it out."""
        if self.has_transport:
            return None
        bounds = [self._gap_bound(mu, new, absolute_gap), self._residual_bound(mu, new, tau)]
        finite = [b for b in bounds if np.isfinite(b)]
        return float(min(finite)) if finite else np.inf

    def _gap_bound(self, mu: Measure, new: Measure, absolute_gap: float) -> float:
        """D(b, b*) from the solver's absolute gap, for reaction geometries.

        The step objective G = F + D^2(., mu^k) / (2 tau) is convex in the weights b, so its
        gap over the exact minimizer b* is at least the Bregman divergence of its proximal
        part: G(b) - G(b*) >= c D^2(b, b*) / (2 tau). The program's objective is 2 tau G / s,
        so an absolute gap g_s gives D^2(b, b*) <= s g_s / c. MMD: a quadratic form, c = 1.
        Hellinger: c = min_i sqrt(a_i / b*_i), taken at the returned b (where a_i = 0 the term
        is linear in b_i: the mass put there, 4 sum b_i, is added to D^2). With transport
        (W2, WFR, IFT) W2^2(mu^k, .) is piecewise linear in the weights on a fixed support (a
        linear program's value): c = 0, and the gap bounds the objective only.
        """
        if not np.isfinite(absolute_gap):
            return np.inf
        bound_sq = self.scale * max(absolute_gap, 0.0)
        if self.reaction.quadratic:
            return float(np.sqrt(bound_sq)) + self._truncation_slack(new)
        old, weights = mu.weights, new.weights
        held = old > 0
        both = held & (weights > 0)
        modulus = float(np.sqrt(old[both] / weights[both]).min()) if both.any() else 1.0
        return float(np.sqrt(bound_sq / modulus + 4.0 * weights[~held].sum()))

    def _residual_bound(self, mu: Measure, new: Measure, tau: float) -> float:
        """D(b, b*) from the gradient g of the step objective at the returned b (KKT residual).

        Strong monotonicity of the proximal gradient and <grad G(b*), b - b*> >= 0 give
        (c / tau) D^2(b, b*) <= <g, b - b*> <= |g|_* D(b, b*), so D(b, b*) <= tau |g|_* / c,
        with the dual norm of D: (K + ridge I)^{-1} for MMD (c = 1), sum_i g_i^2 b_i
        sqrt(b_i / a_i) for Hellinger (c = min sqrt(a / b)). Linear in the residual, where the
        gap bound is its square root, so far sharper near the solution. g may be shifted by
        the multiplier of sum(b) = sum(a) (b and b* both conserve the mass). Only where every
        weight is positive (no active b >= 0); nan otherwise, and the gap bound stands.
        """
        old, weights = mu.weights, new.weights
        if np.any(old <= 0) or np.any(weights <= 0):
            return np.nan
        try:
            first_variation = np.asarray(self.F.first_variation(new), dtype=float)
        except (ValueError, NotImplementedError):
            return np.nan
        if not self.reaction.quadratic:  # Hellinger
            gradient = first_variation + (2.0 / tau) * (1.0 - np.sqrt(old / weights))
            dual_weights = weights * np.sqrt(weights / old)
            if self.geometry.conserve_mass:
                gradient = gradient - np.average(gradient, weights=dual_weights)
            modulus = float(np.sqrt(old / weights).min())
            bound_sq = tau**2 * float(dual_weights @ gradient**2) / modulus
        else:
            values, vectors = self._reaction_spectrum()  # in the eigenbasis of K + ridge I
            if not (values.min() > 0 and self.reaction.metric_definite):  # no dual norm
                return np.nan
            gradient = vectors.T @ first_variation + values * (vectors.T @ (weights - old)) / tau
            if self.geometry.conserve_mass:
                ones = vectors.T @ np.ones_like(weights)
                gradient = gradient - (ones @ (gradient / values)) / (ones @ (ones / values)) * ones
            bound_sq = tau**2 * float(gradient @ (gradient / values))
        return float(np.sqrt(bound_sq)) if np.isfinite(bound_sq) else np.nan

    def _truncation_slack(self, new: Measure) -> float:
        """What the Gram truncation of the program (§2) can hide from the gap, in MMD.

        The program's form drops eigenvalues below PSD_RTOL * max(e); unless the ridge covers
        them, the solver is free along those directions, and an error d there costs up to
        sqrt(PSD_RTOL max(e)) |d|_2 in MMD, with |d|_2 <= |b|_2 + |b*|_2 ~ 2 |b|_2.
        """
        values, _ = self._reaction_spectrum()
        truncated = PSD_RTOL * float(values.max())
        if self._ridge >= truncated:
            return 0.0
        return float(np.sqrt(truncated) * 2.0 * np.linalg.norm(new.weights))

    @property
    def _ridge(self) -> float:
        return self._metric_parts()[1]

    def _metric_parts(self) -> tuple[np.ndarray, float]:
        """The quadratic reaction's (M, ridge) on the support (``metric_parts``), once."""
        if self._metric is None:
            self._metric = self.reaction.metric_parts(self.support.points)
        return self._metric

    def _reaction_spectrum(self):
        """Eigenvalues and vectors of the metric M + ridge I on the support (a quadratic
        reaction: K + ridge I for MMD, K centred for a conditionally p.d. kernel), once."""
        if self._spectrum is None:
            matrix, ridge = self._metric_parts()
            values, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
            values = values + ridge
            self._spectrum = (values, vectors)
        return self._spectrum

    def _run_solver(self, solver, options) -> str:
        try:
            with warnings.catch_warnings():  # the status says it, with our advice
                warnings.filterwarnings("ignore", message="Solution may be inaccurate")
                self.problem.solve(solver=_solver_instance(solver), **options)
            return self.problem.status
        except cp.error.SolverError as error:
            return f"solver_error: {error}"

    @property
    def radius_used(self) -> float:
        return np.sqrt(self.cost.max()) if self.cost.size else 0.0

    def _distance_sq(self, mu, nu, new) -> float:
        """D^2(mu, new), each part evaluated exactly at the best of a few intermediates.

        D^2 is an infimum over nu, so any nu gives an upper bound: the solver's, and for an
        inf-convolution also mu^k itself (no transport) and the new measure (no reaction),
        which are better when alpha or beta is tiny and 1/alpha amplifies the solver's
        feasibility errors in nu. W2^2 comes from the network simplex rather than <C, P>:
        an interior-point plan spreads tiny masses over all pairs, biasing <C, P> upwards.
        """
        if not self.has_transport:
            return self._distance_through(mu, mu.weights, new)
        candidates = [nu]
        if self.reaction is not None:
            candidates.append(mu.weights)
            if np.isclose(new.mass, mu.mass, rtol=1e-9, atol=0):
                candidates.append(new.weights)
        return min(self._distance_through(mu, candidate, new) for candidate in candidates)

    def _distance_through(self, mu, nu, new) -> float:
        """W2^2(mu, nu) / alpha + R^2(nu, new) / beta, with nu rescaled to the mass of mu."""
        intermediate = mu.with_weights(nu * (mu.mass / nu.sum()))
        cost = Wasserstein().squared_distance(mu, intermediate) if self.has_transport else 0.0
        return self.geometry.step_distance(cost, mu.points, intermediate.weights, new.weights)

    def plan_times(self, w: np.ndarray) -> np.ndarray:
        """P w for the plan of the last solve: (n,) -> (n,)."""
        plan = np.maximum(self.plan.value, 0)
        return np.bincount(self.rows, plan * w[self.cols], minlength=self.support.n)

    def _moved_fraction(self) -> float:
        plan = np.maximum(self.plan.value, 0)
        off_diagonal = plan[self.rows != self.cols].sum()
        return float(off_diagonal / max(plan.sum(), 1e-300))

    def _excluded_gain(self) -> float:
        """Bound on what the excluded pairs could still gain, in the program's units.

        With CVXPY's duals (L = f + u^T (P 1 - a) + v^T (P^T 1 - nu)) a plan entry has
        reduced cost r_ij = C_ij / alpha + u_i + v_j, zero where mass moves. Row i carries
        mass a_i, so excluded pairs could lower the objective by at most
        sum_i a_i max_j (-r_ij)_+ (docs/conic.md); zero certifies the restricted plan.
        """
        u = np.asarray(self.row_constraint.dual_value)
        v = np.asarray(self.col_constraint.dual_value)
        points, mass = self.support.points, np.asarray(self.a.value)
        radius_sq = self.cost.max()
        gain = 0.0
        for rows in row_blocks(points.shape[0], points.shape[0]):
            cost = squared_distances(points[rows], points)
            reduced = cost / self.geometry.alpha + u[rows, None] + v[None, :]
            reduced[cost <= radius_sq] = np.inf
            gain += float(mass[rows] @ np.maximum(-reduced.min(axis=1), 0.0))
        return gain


def _relative(gain: float, solver_objective: float) -> float:
    """The excluded pairs' gain relative to the solver's own objective: CVXPY's re-evaluation is
    inf when a weight ends at -1e-10 inside an entropy, which would certify anything."""
    if not np.isfinite(solver_objective):
        return np.inf
    return gain / max(1.0, abs(solver_objective))


def _staying_is_better(start_energy: float, objective: float, gap_tol: float, info: dict) -> bool:
    """Whether mu^k itself is the better answer: the step's objective G exceeds F(mu^k) by more
    than gap_tol relative, and passed the descent check only by its absolute floor, which
    grows like s / (2 tau) (at tiny tau, D^2 / (2 tau) amplifies round-off in D^2 beyond F:
    tau = 1e-300 gave G = 1.7e284 for F = 0.17). Not moving is feasible and G(mu^k) = F(mu^k)
    lies between the exact step's G and this one's, so mu^k is certified at least as well;
    recorded as ``info["kept_start"]``."""
    excess = objective - start_energy
    if not excess > gap_tol * max(1.0, abs(start_energy), abs(objective)):
        return False
    info["kept_start"] = (f"the step's objective exceeded F(mu^k) by {excess:.3g}, within the "
                          "solver's certified accuracy at this tau: mu^k is returned (not moving)")
    return True


def _has_solution(solver_status: str) -> bool:
    return solver_status in ("optimal", "optimal_inaccurate")


def _plan_pairs(points: np.ndarray, radius: float):
    """Index pairs (i, j) with |x_i - x_j| <= radius (all pairs when that is all of them)."""
    n = points.shape[0]
    if np.isfinite(radius):
        pairs = cKDTree(points).query_pairs(radius, output_type="ndarray")
        if pairs.shape[0] < n * (n - 1) // 2:
            diagonal = np.arange(n)
            rows = np.concatenate([diagonal, pairs[:, 0], pairs[:, 1]])
            cols = np.concatenate([diagonal, pairs[:, 1], pairs[:, 0]])
            return rows, cols, False
    _check_size(n, n * n, False)  # before allocating the n^2 pairs
    rows, cols = np.divmod(np.arange(n * n), n)
    return rows, cols, True


def _solver_certificate(stats) -> tuple[float, float, float, float]:
    """(|p - d| / max(1, |p|), max primal/dual residual, p, |p - d|) from the solver's report,
    in the program's (scaled) units."""
    extra = getattr(stats, "extra_stats", None)
    if extra is not None and hasattr(extra, "obj_val_dual"):  # Clarabel
        primal, dual = extra.obj_val, extra.obj_val_dual
        residual = max(extra.r_prim, extra.r_dual)
    elif isinstance(extra, dict) and "info" in extra:  # SCS
        info = extra["info"]
        primal, dual = info["pobj"], info["dobj"]
        residual = max(info["res_pri"], info["res_dual"]) / max(1.0, abs(primal))
    else:  # pragma: no cover - both supported solvers report these
        return np.inf, np.inf, np.nan, np.inf
    if not (np.isfinite(primal) and np.isfinite(dual)):
        return np.inf, float(residual), float(primal), np.inf
    absolute = float(abs(primal - dual))
    return absolute / max(1.0, abs(primal)), float(residual), float(primal), absolute


def _status_name(status: str) -> Status:
    return Status.of_solver(status)


#: The settings that tighten each solver, named by the failure message.
TIGHTER = {"CLARABEL": "tol_gap_abs, tol_gap_rel, tol_feas", "SCS": "eps_abs=1e-9, eps_rel=1e-9"}


def _failure_message(result: StepResult, solver: str) -> str:
    advice = result.info.get("inaccurate_cause") or {
        "optimal_inaccurate": "the solver stopped before its tolerances",
        "infeasible": "the step problem has no feasible point",
        "unbounded": "the energy is unbounded below on this support",
    }.get(result.status, "the solver failed")
    other = "SCS" if solver == "CLARABEL" else "CLARABEL"
    return (
        f"conic JKO step not solved: status {result.status!r} ({advice}), certificate "
        f"{result.certificate:.3g}. Try solver={other!r}, tighter solver_options "
        f"({TIGHTER[solver]}), a smaller tau, or a support on which the target and initial "
        "measure have positive weight; pass throw=False to get the StepResult instead"
    )


def _check_grid_locking(F, geometry, mu, tau, result, program, info: dict) -> None:
    """Measure a W2 step on a grid against the flow (``grid_motion``): record it in ``info``
    (``grid_locked``, ``grid_rounding``, ``expected_moved_fraction``, ...) and warn
    ``GridLockingWarning`` in every step that is locked or in the h / tau rounding regime (the
    driver reports a run's warnings once per cause, with their count)."""
    if mu.grid is None or not result.ok:
        return
    _, displacement = barycentric_motion(mu, program.plan_times)
    check_step(F, geometry, mu, result.measure, tau, info["moved_fraction"], displacement, info)
