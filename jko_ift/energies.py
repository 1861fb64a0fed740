"""Energies F(mu) on weighted supports, and their algebra (F1 + F2, c * F).

Each energy gives ``value``, ``first_variation`` f = dF/dmu at the points (n,) and
``grad_first_variation`` grad f at the points (n, d), and states once the mathematics the
methods read, so that no method dispatches on energy classes:

* ``form(mu)``: the normal form on a fixed support (``WeightForm``: log, linear, power and
  quadratic parts in the weights), composing through + and *. The conic translation (CVXPY,
  methods/conic.py), the KL-proximal maps (methods/entropic_prox.py) and the weight QPs
  (methods/weights.py) are built from it. Energies without one raise ``NoWeightFormError``.
* ``first_variation_at(mu, z)``: f (or grad f) at points z other than the support (noise
  injection, particles of zero mass).
* ``position_terms`` / ``add_position_derivatives``: the 1-D position terms of the Newton
  position step (``line_terms``, ``position_derivatives``).
* ``value_magnitude``, ``targets``, ``check_measure``: round-off scale, target measures and
  the checks of a measure against the energy.

A new energy is one class: its value, first variation and form.

``Entropy`` and ``PorousMedium`` need a density: on a grid rho_i = a_i / h^d; on 1-D particles
(points (n, 1), no grid) the Lagrangian density between neighbouring particles
(``InternalEnergy``, docs/theory.md §9). ``position_derivatives`` gives such 1-D particle
energies with their gradient and tridiagonal Hessian in the positions (the Newton position step
of ParticleJKO and the particle ODE reference of problems.py use it).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .kernels import GramCache, Kernel, row_blocks
from .measures import Measure, _is_frozen_here, as_points, grid_gradient, require_cell_volume


class NoWeightFormError(ValueError):
    """The energy states no normal form in the weights on this support (``Energy.form``)."""


class NotConvexError(NoWeightFormError):
    """The energy is not convex in the weights on this support."""


#: How the quadratic part Q of a ``WeightForm`` is known to be positive semidefinite, from the
#: surest to the least: by construction (positive definite kernels); only on zero-sum vectors
#: (conditionally positive definite kernels: convex on measures of one fixed mass); unknown
#: (checked numerically by the methods that need it, e.g. an Interaction's matrix).
PSD, ZERO_SUM_PSD, UNKNOWN_PSD = "psd", "zero_sum_psd", "unknown"
_PSD_ORDER = (PSD, ZERO_SUM_PSD, UNKNOWN_PSD)


@dataclass(frozen=True)
class WeightForm:
    """An energy on a fixed support of n points as a function of the weights b (n,):

        f(b) = dF/db = log_coef log(b / reference) + offset + sum_k c_k b^p_k + quadratic @ b,
        F(b) = log_coef sum_i (b_i log(b_i / r_i) - b_i) + offset^T b
               + sum_k c_k / (p_k + 1) sum_i b_i^(p_k + 1) + 1/2 b^T quadratic b + const.

    log_coef >= 0 for a convex form, with reference r: (n,) >= 0 (r_i = 0: b_i must vanish;
    None without a log part; the log part is a relative entropy, which the conic program
    writes as one, with its reference inside the cone); offset: (n,), the linear rest, +inf
    where b must vanish; powers: ((c_k, p_k), ...) with p_k > 0 (c_k > 0 for a convex form);
    quadratic: (n, n), symmetric up to round-off, or None. quadratic_psd: how Q is known to be
    positive semidefinite (PSD, ZERO_SUM_PSD or UNKNOWN_PSD). convex: False for a negative
    multiple of a form that is not linear. Forms add and scale like their energies
    (two log parts add to one whose reference is the weighted geometric mean).
    """

    n: int
    log_coef: float = 0.0
    offset: np.ndarray | None = None
    powers: tuple = ()
    quadratic: np.ndarray | None = None
    quadratic_psd: str = PSD
    convex: bool = True
    reference: np.ndarray | None = None

    def __post_init__(self):
        if self.offset is None:
            object.__setattr__(self, "offset", np.zeros(self.n))
        if self.log_coef == 0:
            object.__setattr__(self, "reference", None)
        elif self.reference is None:
            object.__setattr__(self, "reference", np.ones(self.n))
        object.__setattr__(self, "powers", tuple(self.powers))

    @property
    def total_offset(self) -> np.ndarray:
        """o = offset - log_coef log(reference), so that f(b) = log_coef log b + o + ...: (n,),
        +inf where the reference vanishes."""
        if self.reference is None:
            return self.offset
        with np.errstate(divide="ignore"):
            return self.offset - self.log_coef * np.log(self.reference)

    @property
    def is_linear(self) -> bool:
        """F linear in b (f = offset): no log, power or quadratic part."""
        return self.is_quadratic and self.quadratic is None

    @property
    def is_quadratic(self) -> bool:
        """f affine in b: no log term and no power."""
        return self.log_coef == 0 and not self.powers

    def __add__(self, other: WeightForm) -> WeightForm:
        quadratic = self.quadratic
        if other.quadratic is not None:
            quadratic = other.quadratic if quadratic is None else quadratic + other.quadratic
        known = max(self.quadratic_psd, other.quadratic_psd, key=_PSD_ORDER.index)
        return WeightForm(self.n, self.log_coef + other.log_coef, self.offset + other.offset,
                          self.powers + other.powers, quadratic, known,
                          self.convex and other.convex, _mean_reference(self, other))

    def scaled(self, factor: float) -> WeightForm:
        """The form of factor * F: a negative multiple is convex only when F is linear."""
        negative = factor < 0
        quadratic = None if self.quadratic is None else factor * self.quadratic
        return WeightForm(self.n, factor * self.log_coef, factor * self.offset,
                          tuple((factor * c, p) for c, p in self.powers), quadratic,
                          UNKNOWN_PSD if negative and quadratic is not None else self.quadratic_psd,
                          self.convex and not (negative and not self.is_linear), self.reference)

    def first_variation(self, b: np.ndarray) -> np.ndarray:
        """f(b): (n,)."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            f = self.total_offset + (self.log_coef * np.log(b) if self.log_coef else 0.0)
            for c, p in self.powers:
                f = f + c * b**p
        if self.quadratic is not None:
            f = f + self.quadratic @ b
        return f


def _mean_reference(first: WeightForm, second: WeightForm) -> np.ndarray | None:
    """The reference of L1 log(b / r1) + L2 log(b / r2) = (L1 + L2) log(b / r): r = r1^w r2^(1-w)."""
    if first.reference is None or second.reference is None:
        return second.reference if first.reference is None else first.reference
    weight = first.log_coef / (first.log_coef + second.log_coef)
    with np.errstate(divide="ignore"):
        log_mean = weight * np.log(first.reference) + (1 - weight) * np.log(second.reference)
    return np.exp(log_mean)


class Energy:
    r"""Base class of the energies :math:`F`: what decreases along a flow.

    A subclass gives the value :math:`F(\mu)` (``value``) and the first variation
    :math:`f = \frac{\delta F}{\delta\mu}[\mu]` at the points of :math:`\mu`
    (``first_variation``, shape ``(n,)``); the base class gives :math:`\nabla f` (``grad_first_variation``,
    ``(n, d)``, by central differences on a grid unless overridden) and the algebra: energies
    add (``F1 + F2``) and scale by nonnegative numbers (``2.0 * F``). ``form`` states the energy
    in the weights on a fixed support (a ``WeightForm``), from which the exact methods build
    their convex programs.

    Notes
    -----
    The first variation is the function :math:`f` with

    .. math::

        \frac{d}{d\varepsilon} F(\mu + \varepsilon\chi)\Big|_{\varepsilon = 0} = \int f\, d\chi

    for every admissible perturbation :math:`\chi`; the flows of the geometries are written
    with it (:math:`\partial_t\mu = \operatorname{div}(\mu\nabla f)` in :math:`W_2`,
    :math:`-\mu f` in Hellinger).

    Examples
    --------
    >>> V = jk.Potential(lambda x: (x**2).sum(1), lambda x: 2 * x)
    >>> F = V + 0.5 * V
    >>> mu = jk.Measure([[1.0], [2.0]], [0.5, 0.5])
    >>> F.value(mu), F.first_variation(mu).tolist()
    (3.75, [1.5, 6.0])
    """

    def value(self, mu: Measure) -> float:  # pragma: no cover - abstract
        """F(mu), a float."""
        raise NotImplementedError

    def first_variation(self, mu: Measure) -> np.ndarray:  # pragma: no cover - abstract
        """f = dF/dmu[mu] at the points of mu: (n,)."""
        raise NotImplementedError

    def grad_first_variation(self, mu: Measure) -> np.ndarray:
        """grad f at the points: (n, d); by central differences on a grid by default."""
        return grid_gradient(mu, _finite_part(self.first_variation(mu)))

    def excluded(self, mu: Measure) -> np.ndarray | None:
        """The points of mu where F is +inf unless their weight is zero (a boolean (n,) mask),
        or None: a JKO step must put exactly zero mass there."""
        return None

    def form(self, mu: Measure, grams: GramCache | None = None) -> WeightForm:
        """The normal form of F in the weights on the support of mu (``WeightForm``); grams: a
        cache of kernel Gram matrices on these points, shared with the geometry."""
        raise NoWeightFormError(
            f"{type(self).__name__} states no form in the weights on a fixed support "
            "(Energy.form), so the fixed-support steps (jk.ConicJKO, jk.EntropicJKO) cannot take "
            "it; use a particle method (jk.ParticleJKO, jk.Splitting or jk.ExplicitEuler) instead")

    def first_variation_at(self, mu: Measure, z: np.ndarray, gradient: bool = False) -> np.ndarray:
        """f = dF/dmu[mu] at other points z: (m, d) -> (m,), or grad f there, (m, d)."""
        raise ValueError(f"{type(self).__name__} cannot be evaluated away from the particles; "
                         "noise injection needs Potential, Interaction or MMD2 energies")

    def position_terms(self, factor: float = 1.0) -> list[tuple[float, Energy]] | None:
        """F as [(c_k, G_k)] of 1-D position terms (``line_terms``), or None."""
        return None

    #: Whether the energy's position terms couple neighbouring 1-D particles (their spacings).
    couples_neighbours = False

    def value_magnitude(self, mu: Measure) -> float:
        """The size of the terms that add up to F(mu) (their sum's round-off is eps times it)."""
        return abs(self.value(mu))

    def targets(self):
        """(name, target measure) of each term with a target measure (MMD2, KL to a Measure)."""
        return iter(())

    def check_measure(self, mu: Measure, mass_conserved: bool) -> None:
        """ValueError when F is not defined for mu (dimension) or is an energy only on
        measures of fixed mass while the geometry changes the mass."""

    def _not_convex(self) -> NotConvexError:
        return NotConvexError(
            f"{type(self).__name__} is not convex in the weights on a fixed support, so the "
            "exact conic JKO step cannot take it; use a particle method "
            "(jk.ParticleJKO, jk.Splitting or jk.ExplicitEuler) instead"
        )

    def __add__(self, other):
        if not isinstance(other, Energy):
            return NotImplemented
        return Sum((self, other))

    def __radd__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # lets sum([F1, F2]) work
            return self
        return NotImplemented

    def __mul__(self, factor):
        if not isinstance(factor, (int, float, np.floating)):
            return NotImplemented
        return Scaled(float(factor), self)

    __rmul__ = __mul__


def _finite_part(values: np.ndarray) -> np.ndarray:
    """Replace -inf (log of zero mass) by the smallest finite value, for gradients."""
    finite = np.isfinite(values)
    if finite.all() or not finite.any():
        return values
    return np.where(finite, values, values[finite].min())


@dataclass(frozen=True)
class Sum(Energy):
    terms: tuple[Energy, ...]

    def __post_init__(self):
        flat = []
        for term in self.terms:
            flat.extend(term.terms if isinstance(term, Sum) else (term,))
        object.__setattr__(self, "terms", tuple(flat))

    def value(self, mu):
        return float(sum(term.value(mu) for term in self.terms))

    def first_variation(self, mu):
        return sum(term.first_variation(mu) for term in self.terms)

    def grad_first_variation(self, mu):
        return sum(term.grad_first_variation(mu) for term in self.terms)

    def excluded(self, mu):
        masks = [m for m in (term.excluded(mu) for term in self.terms) if m is not None]
        return np.logical_or.reduce(masks) if masks else None

    def form(self, mu, grams=None):
        form = WeightForm(mu.n)
        for term in self.terms:
            form = form + term.form(mu, grams)
        return form

    def first_variation_at(self, mu, z, gradient=False):
        return sum(term.first_variation_at(mu, z, gradient) for term in self.terms)

    def position_terms(self, factor=1.0):
        terms = [term.position_terms(factor) for term in self.terms]
        return None if any(t is None for t in terms) else [pair for t in terms for pair in t]

    def value_magnitude(self, mu):
        return sum(term.value_magnitude(mu) for term in self.terms)

    def targets(self):
        for term in self.terms:
            yield from term.targets()

    def check_measure(self, mu, mass_conserved):
        for term in self.terms:
            term.check_measure(mu, mass_conserved)


@dataclass(frozen=True)
class Scaled(Energy):
    factor: float
    energy: Energy

    def __post_init__(self):
        if not np.isfinite(self.factor):
            raise ValueError(f"an energy can only be scaled by a finite number, got {self.factor}")

    def value(self, mu):
        return self.factor * self.energy.value(mu)

    def first_variation(self, mu):
        return self.factor * self.energy.first_variation(mu)

    def grad_first_variation(self, mu):
        return self.factor * self.energy.grad_first_variation(mu)

    def excluded(self, mu):
        return self.energy.excluded(mu) if self.factor > 0 else None

    def form(self, mu, grams=None):
        return self.energy.form(mu, grams).scaled(self.factor)

    def first_variation_at(self, mu, z, gradient=False):
        return self.factor * self.energy.first_variation_at(mu, z, gradient)

    def position_terms(self, factor=1.0):
        return self.energy.position_terms(factor * self.factor)

    def value_magnitude(self, mu):
        return abs(self.factor) * self.energy.value_magnitude(mu)

    def targets(self):
        return self.energy.targets()

    def check_measure(self, mu, mass_conserved):
        self.energy.check_measure(mu, mass_conserved)


#: Checked values of the user's callables at the points of measures, kept per (callable, points)
#: for points that measures.py froze (never changed): a grid's support is the same array at every
#: step, and a step evaluates its potential several times (the step, its energy, the driver's
#: checks), so the callable runs once per support. Read-only; the points are held weakly.
POINT_VALUE_SLOTS = 8
_POINT_VALUES: OrderedDict = OrderedDict()
_POINT_VALUES_LOCK = threading.Lock()


def _call_points(function, points: np.ndarray, shape: tuple, what: str,
                 allowed_inf: float | None = None) -> np.ndarray:
    """``function(points)`` checked: shape ``shape``, no NaN, and no infinity except of the sign
    of ``allowed_inf`` (+inf: a potential's hard wall; -inf: a log-density's zero). Kept for the
    frozen points of measures (``_POINT_VALUES``): energies' callables are fixed functions."""
    frozen = _is_frozen_here(points)
    key = (id(function), id(points), shape, allowed_inf)
    if frozen:
        kept = _POINT_VALUES.get(key)
        if kept is not None and kept[0]() is points and kept[1] is function:
            return kept[2]
    out = np.asarray(function(points), dtype=float)
    if out.shape != shape:
        raise ValueError(f"{what} must return shape {shape} for points of shape "
                         f"{points.shape}, got {out.shape}")
    out = check_finite_output(out, points, what, allowed_inf)
    if frozen:
        out = out.copy()  # the callable's own array (a view, a kept table) stays writable
        out.setflags(write=False)
        with _POINT_VALUES_LOCK:
            _POINT_VALUES[key] = (weakref.ref(points), function, out)
            while len(_POINT_VALUES) > POINT_VALUE_SLOTS:
                _POINT_VALUES.popitem(last=False)
    return out


def check_finite_output(values: np.ndarray, points: np.ndarray, what: str,
                        allowed_inf: float | None = None) -> np.ndarray:
    """ValueError naming the user's callable (``what``) and the first point where it returned
    NaN (or an infinity other than ``allowed_inf``): caught at its first evaluation, instead of
    a solver's "data contains NaN", a LinAlgError or an iteration limit many steps later."""
    bad = np.isnan(values) | (np.isinf(values) & (values != allowed_inf))
    if np.any(bad):
        flat = np.flatnonzero(bad.reshape(values.shape[0], -1).any(axis=1))
        i = int(flat[0])
        raise ValueError(f"{what} returned {values.reshape(values.shape[0], -1)[i].tolist()} at the "
                         f"point {points[i].tolist()} (row {i}; {flat.size} of {values.shape[0]} rows "
                         f"are not finite); it must return finite numbers on the support: check it "
                         "there (e.g. a log or division at these points)")
    return values


@dataclass(frozen=True)
class Potential(Energy):
    r"""The potential energy :math:`F(\mu) = \int V\,d\mu = \sum_i a_i V(x_i)`.

    Parameters
    ----------
    V : callable
        The potential, points ``(n, d)`` -> values ``(n,)``.
    grad_V : callable, optional
        Its gradient, ``(n, d)`` -> ``(n, d)``; needed for moving particles (without it the
        gradient is taken by finite differences on a grid).

    Notes
    -----
    Linear in :math:`\mu`, with first variation :math:`f = V`. Its :math:`W_2` flow is
    :math:`\partial_t\mu = \operatorname{div}(\mu\nabla V)`: particles follow
    :math:`\dot x = -\nabla V(x)`.

    ``V`` and ``grad_V`` must be fixed functions: their checked values at the points of a
    measure are kept and reused (read-only) while the support is the same array, as a grid's
    is at every step, so a step calls them once per support.

    Examples
    --------
    >>> F = jk.Potential(lambda x: 0.5 * (x**2).sum(1), lambda x: x)
    >>> mu = jk.Measure([[1.0, 1.0], [3.0, 0.0]], [0.5, 0.5])
    >>> F.value(mu)
    2.75
    >>> F.grad_first_variation(mu).tolist()
    [[1.0, 1.0], [3.0, 0.0]]
    """

    V: Callable[[np.ndarray], np.ndarray]
    grad_V: Callable[[np.ndarray], np.ndarray] | None = None

    def value(self, mu):
        return float(mu.weights @ self.first_variation(mu))

    def first_variation(self, mu):
        return _call_points(self.V, mu.points, (mu.n,), "Potential V", allowed_inf=np.inf)

    def grad_first_variation(self, mu):
        if self.grad_V is None:
            return super().grad_first_variation(mu)
        return _call_points(self.grad_V, mu.points, mu.points.shape, "Potential grad_V")

    def form(self, mu, grams=None):
        return WeightForm(mu.n, offset=self.first_variation(mu))

    def first_variation_at(self, mu, z, gradient=False):
        if gradient:
            return np.asarray(self._grad_V_for_particles()(z), dtype=float)
        return np.asarray(self.V(z), dtype=float)

    def _grad_V_for_particles(self):
        if self.grad_V is None:
            raise ValueError("Potential needs grad_V for particle methods: jk.Potential(V, grad_V)")
        return self.grad_V

    def position_terms(self, factor=1.0):
        return [(factor, self)]

    def add_position_derivatives(self, factor: float, points: np.ndarray, weights: np.ndarray,
                                 sums: PositionDerivatives) -> None:
        """Add factor * (F, dF/dx_i, the diagonal a_i V''(x_i)) at 1-D points (n,) to ``sums``."""
        n = points.size
        column = points[:, None]
        grad_V = self._grad_V_for_particles()
        potential = _call_points(self.V, column, (n,), "Potential V")
        force = factor * weights * _call_points(grad_V, column, (n, 1), "Potential grad_V")[:, 0]
        sums.value += factor * float(weights @ potential)
        sums.value_magnitude += abs(factor) * float(weights @ np.abs(potential))
        sums.gradient += force
        sums.magnitude += np.abs(force)
        if sums.diagonal is not None:
            step = POTENTIAL_HESSIAN_STEP * (1.0 + np.abs(points))
            both = np.concatenate([points + step, points - step])[:, None]
            slopes = _call_points(grad_V, both, (2 * n, 1), "Potential grad_V")[:, 0]
            sums.diagonal += factor * weights * (slopes[:n] - slopes[n:]) / (2 * step)

    def value_magnitude(self, mu):
        return float(mu.weights @ np.abs(np.asarray(self.V(mu.points), dtype=float)))


@dataclass(frozen=True)
class Interaction(Energy):
    r"""The interaction energy :math:`F(\mu) = \frac12\sum_{ij} a_i a_j W(x_i - x_j)`.

    Parameters
    ----------
    W : callable
        A symmetric interaction potential, differences ``(n, d)`` -> values ``(n,)``.
    grad_W : callable, optional
        Its gradient, ``(n, d)`` -> ``(n, d)``; needed for moving particles.

    Notes
    -----
    The first variation is :math:`f(x) = \sum_j a_j W(x - x_j)`. :math:`F` is convex in the
    weights only when the matrix :math:`[W(x_i - x_j)]_{ij}` is positive semidefinite (not
    for an attraction); the exact methods refuse it otherwise.

    Examples
    --------
    >>> F = jk.Interaction(lambda z: (z**2).sum(1), lambda z: 2 * z)
    >>> mu = jk.Measure([[0.0], [2.0]], [0.5, 0.5])
    >>> F.value(mu)  # 1/2 (2 * 0.25 * 4)
    1.0
    """

    W: Callable[[np.ndarray], np.ndarray]
    grad_W: Callable[[np.ndarray], np.ndarray] | None = None

    def _pairwise(self, function, x, y, weights, width: int) -> np.ndarray:
        """sum_j weights_j function(x_i - y_j) in row blocks: (n,) or (n, width)."""
        n, m, d = x.shape[0], y.shape[0], x.shape[1]
        out = np.zeros((n, width))
        for rows in row_blocks(n, m * d):
            diff = (x[rows, None, :] - y[None, :, :]).reshape(-1, d)
            values = np.asarray(function(diff), dtype=float)
            check_finite_output(values.reshape(diff.shape[0], -1), diff,
                                f"Interaction {'W' if function is self.W else 'grad_W'} (at x_i - x_j)")
            values = values.reshape(rows.stop - rows.start, m, -1)
            out[rows] = np.einsum("imk,m->ik", values, weights)
        return out if width > 1 else out[:, 0]

    def matrix(self, points) -> np.ndarray:
        """[W(x_i - x_j)], symmetrized: (n, n), in row blocks (never an (n, n, d) array)."""
        x = as_points(points)
        n, d = x.shape
        out = np.empty((n, n))
        for rows in row_blocks(n, n * d):
            diff = (x[rows, None, :] - x[None, :, :]).reshape(-1, d)
            values = check_finite_output(np.asarray(self.W(diff), dtype=float), diff,
                                         "Interaction W (at x_i - x_j)")
            out[rows] = values.reshape(rows.stop - rows.start, n)
        return 0.5 * (out + out.T)

    def value(self, mu):
        return 0.5 * float(mu.weights @ self.first_variation(mu))

    def first_variation(self, mu):
        return self._pairwise(self.W, mu.points, mu.points, mu.weights, 1)

    def grad_first_variation(self, mu):
        if self.grad_W is None:
            raise ValueError("Interaction.grad_first_variation needs grad_W; pass "
                             "jk.Interaction(W, grad_W)")
        return self._pairwise(self.grad_W, mu.points, mu.points, mu.weights, mu.dim)

    def form(self, mu, grams=None):
        return WeightForm(mu.n, quadratic=self.matrix(mu.points), quadratic_psd=UNKNOWN_PSD)

    def first_variation_at(self, mu, z, gradient=False):
        if gradient:
            if self.grad_W is None:
                raise ValueError("Interaction needs grad_W for particle methods: "
                                 "jk.Interaction(W, grad_W)")
            return self._pairwise(self.grad_W, z, mu.points, mu.weights, mu.dim)
        return self._pairwise(self.W, z, mu.points, mu.weights, 1)

    def value_magnitude(self, mu):
        absolute = self._pairwise(lambda z: np.abs(self.W(z)), mu.points, mu.points, mu.weights, 1)
        return 0.5 * float(mu.weights @ absolute)


class ParticleOrderError(ValueError):
    """1-D particles that are not strictly increasing: their Lagrangian density is undefined."""


def particle_cells(points: np.ndarray, weights: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The cells of the Lagrangian density of 1-D particles x_0 < x_1 < ... < x_{n-1}.

    points: (n,) positions, weights: (n,). Returns (masses, widths), both (n - 1,): the cell
    (x_i, x_{i+1}) has width d_i = x_{i+1} - x_i and carries m_{i+1/2} = (a_i + a_{i+1}) / 2.
    Raises ParticleOrderError (a ValueError) when the points are not strictly increasing.
    """
    widths = np.diff(points)
    if not np.all(widths > 0):
        i = int(np.flatnonzero(~(widths > 0))[0])
        raise ParticleOrderError(
            f"{what} on 1-D particles needs strictly increasing points x_0 < x_1 < ... (its "
            f"density lives between neighbours), got x[{i}] = {points[i]:.17g} >= "
            f"x[{i + 1}] = {points[i + 1]:.17g}; sort the particles by position "
            "(np.argsort(points[:, 0])) and merge coincident ones"
        )
    return 0.5 * (weights[:-1] + weights[1:]), widths


def _line_of_particles(mu: Measure, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Cells (masses, widths) of a measure without cell volume, which must be 1-D particles."""
    if mu.dim != 1:
        raise ValueError(
            f"{what} needs a cell volume, but this measure has no grid and its points are in "
            f"dimension {mu.dim}; build it with jk.Grid(lo, hi, shape).measure(density), or use "
            "1-D particles (points of shape (n, 1)), whose density is taken between neighbours"
        )
    if mu.n < 2:
        raise ValueError(f"{what} on 1-D particles needs at least 2 particles (one cell between "
                         f"neighbours), got {mu.n}")
    return particle_cells(mu.points[:, 0], mu.weights, what)


class InternalEnergy(Energy):
    """F(mu) = int U(rho) dx, on a grid (rho_i = a_i / h^d) or on 1-D particles.

    On 1-D particles x_0 < x_1 < ... < x_{n-1} (points (n, 1), no grid; weights a (n,)) the
    density is the Lagrangian one, piecewise constant between neighbours: the cell
    (x_i, x_{i+1}) of width d_i = x_{i+1} - x_i carries m_{i+1/2} = (a_i + a_{i+1}) / 2, so
    rho_{i+1/2} = m_{i+1/2} / d_i and, over the n - 1 cells,

        F_n(x, a) = sum_i d_i U(rho_{i+1/2}).

    first_variation: dF_n/da_i = (U'(rho_{i-1/2}) + U'(rho_{i+1/2})) / 2, shape (n,) (one term
    at the two ends). grad_first_variation: (1/a_i) dF_n/dx_i = (P(rho_{i+1/2}) -
    P(rho_{i-1/2})) / a_i, shape (n, 1), with the pressure P(rho) = rho U'(rho) - U(rho) and
    P = 0 outside the particles: the particle methods move particle i by this gradient (they
    multiply it by a_i in the step objective), so their force is exactly -dF_n/dx_i / a_i.
    It needs positive weights. Points in d > 1 without a grid raise a ValueError.
    """

    def cell_terms(self, masses: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per cell (arrays (n - 1,)): e = d U(m / d), de/dd = -P(rho), d^2e/dd^2 = rho P'(rho) / d
        and de/dm = U'(rho), for masses m and widths d."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _particle_value(self, mu: Measure) -> float:
        masses, widths = _line_of_particles(mu, type(self).__name__)
        return float(np.sum(self.cell_terms(masses, widths)[0]))

    def _particle_first_variation(self, mu: Measure) -> np.ndarray:
        masses, widths = _line_of_particles(mu, type(self).__name__)
        per_cell = 0.5 * self.cell_terms(masses, widths)[3]
        variation = np.zeros(mu.n)
        variation[:-1] += per_cell
        variation[1:] += per_cell
        return variation

    def _particle_gradient(self, mu: Measure) -> np.ndarray:
        masses, widths = _line_of_particles(mu, type(self).__name__)
        if np.any(mu.weights <= 0):
            raise ValueError(
                f"{type(self).__name__} on 1-D particles moves particle i by (1/a_i) dF/dx_i, "
                f"which needs positive weights; got {int(np.sum(mu.weights <= 0))} zero weights "
                "(drop the particles of zero mass)"
            )
        return (spacing_gradient(self.cell_terms(masses, widths)[1]) / mu.weights)[:, None]

    def grad_first_variation(self, mu):
        if mu.cell_volume is not None:
            return super().grad_first_variation(mu)  # central differences on the grid
        return self._particle_gradient(mu)

    couples_neighbours = True

    def _cell_volume_for_form(self, mu: Measure) -> float:
        """h^d of a grid; without one (particles) the energy depends on the positions, not on
        the weights alone: no form on a fixed support."""
        if mu.cell_volume is None:
            raise NoWeightFormError(
                f"{type(self).__name__} needs a cell volume to be a function of the weights on a "
                "fixed support (on particles its density depends on the positions); build the "
                "measure with jk.Grid(lo, hi, shape).measure(density), or use a particle method")
        return mu.cell_volume

    def position_terms(self, factor=1.0):
        return [(factor, self)] if factor >= 0 else None

    def add_position_derivatives(self, factor: float, points: np.ndarray, weights: np.ndarray,
                                 sums: PositionDerivatives) -> None:
        """Add factor * (F_n, dF_n/dx, the tridiagonal Hessian) at 1-D points (n,) to ``sums``:
        dF/dx_i = e'(d_{i-1}) - e'(d_i), Hessian sum_i e''(d_i) (u_{i+1} - u_i)(u_{i+1} - u_i)^T."""
        cells = particle_cells(points, weights, type(self).__name__)
        energy, d_width, d2_width, _ = self.cell_terms(*cells)
        sums.value += factor * float(np.sum(energy))
        sums.value_magnitude += factor * float(np.sum(np.abs(energy)))
        sums.gradient += factor * spacing_gradient(d_width)
        sums.magnitude[1:] += factor * np.abs(d_width)
        sums.magnitude[:-1] += factor * np.abs(d_width)
        if sums.diagonal is not None:
            sums.diagonal[1:] += factor * d2_width
            sums.diagonal[:-1] += factor * d2_width
            sums.upper -= factor * d2_width


def spacing_gradient(d_width: np.ndarray) -> np.ndarray:
    """dF/dx (n,) of F = sum_i e(x_{i+1} - x_i) from de/dd (n - 1,): e'(d_{i-1}) - e'(d_i)."""
    gradient = np.zeros(d_width.size + 1)
    gradient[1:] += d_width
    gradient[:-1] -= d_width
    return gradient


@dataclass(frozen=True)
class Entropy(InternalEnergy):
    r"""The entropy :math:`F(\mu) = \int \rho\log\rho\,dx` of the density :math:`\rho` of
    :math:`\mu`.

    Notes
    -----
    The first variation is :math:`f = \log\rho + 1`; the :math:`W_2` flow is the heat
    equation :math:`\partial_t\rho = \Delta\rho`. On a grid of cell volume :math:`h^d`,
    :math:`F = \sum_i a_i\log(a_i / h^d)`. On 1-D particles (points ``(n, 1)``, no grid; see
    ``InternalEnergy``) the Lagrangian discretization over the :math:`n - 1` cells between
    neighbours is

    .. math::

        F_n = \sum_i m_{i+1/2}\log\frac{m_{i+1/2}}{x_{i+1} - x_i},
        \qquad m_{i+1/2} = \tfrac12 (a_i + a_{i+1}),

    with pressure :math:`P(\rho) = \rho`, so that :math:`a_i^{-1}\partial F_n/\partial x_i`
    is a discrete :math:`(\log\rho)'`.

    Examples
    --------
    >>> mu = jk.Grid(0.0, 2.0, 4).measure(np.full(4, 0.5))  # the uniform density 1/2
    >>> bool(np.isclose(jk.Entropy().value(mu), np.log(0.5)))
    True
    """

    def cell_terms(self, masses, widths):
        density = masses / widths
        with np.errstate(divide="ignore"):
            log_density = np.log(density)
        energy = masses * np.where(masses > 0, log_density, 0.0)
        return energy, -density, density / widths, log_density + 1.0

    def value(self, mu):
        if mu.cell_volume is None:
            return self._particle_value(mu)
        h = require_cell_volume(mu, "Entropy")
        a = mu.weights
        return float(np.sum(a * np.log(np.where(a > 0, a / h, 1.0))))

    def first_variation(self, mu):
        if mu.cell_volume is None:
            return self._particle_first_variation(mu)
        with np.errstate(divide="ignore"):
            return np.log(mu.density()) + 1.0

    def form(self, mu, grams=None):
        # sum b log(b / h) = sum (b log(b / h) - b) + sum b: f = log(b / h) + 1
        h = self._cell_volume_for_form(mu)
        return WeightForm(mu.n, log_coef=1.0, offset=np.ones(mu.n), reference=np.full(mu.n, h))


@dataclass(frozen=True)
class PorousMedium(InternalEnergy):
    r"""The porous-medium energy :math:`F(\mu) = \frac{1}{m-1}\int \rho^m\,dx`, :math:`m > 1`.

    Parameters
    ----------
    m : float, default 2.0
        The exponent, :math:`m > 1`.

    Raises
    ------
    ValueError
        If ``m`` is not a finite number above 1.

    Notes
    -----
    The first variation is :math:`f = \frac{m}{m-1}\rho^{m-1}`; the :math:`W_2` flow is the
    porous medium equation :math:`\partial_t\rho = \Delta\rho^m`, whose Barenblatt solutions
    the tests check against. On a grid :math:`F = h^d\sum_i\rho_i^m/(m-1)`. On 1-D particles
    (no grid; see ``InternalEnergy``)
    :math:`F_n = \sum_i d_i\,\rho_{i+1/2}^m/(m-1)` with :math:`d_i = x_{i+1} - x_i` and
    :math:`\rho_{i+1/2} = (a_i + a_{i+1})/(2 d_i)`; the pressure is :math:`P(\rho) = \rho^m`.

    Examples
    --------
    >>> mu = jk.Grid(0.0, 2.0, 4).measure(np.full(4, 0.5))
    >>> round(jk.PorousMedium(2.0).value(mu), 12)  # int_0^2 (1/2)^2 dx
    0.5
    """

    m: float = 2.0

    def __post_init__(self):
        if not (np.isfinite(self.m) and self.m > 1):
            raise ValueError(f"PorousMedium needs an exponent m > 1, got {self.m}")

    def cell_terms(self, masses, widths):
        density = masses / widths
        pressure = density**self.m
        return (widths * pressure / (self.m - 1), -pressure, self.m * pressure / widths,
                self.m / (self.m - 1) * density ** (self.m - 1))

    def value(self, mu):
        if mu.cell_volume is None:
            return self._particle_value(mu)
        h = require_cell_volume(mu, "PorousMedium")
        return float(h * np.sum(mu.density() ** self.m) / (self.m - 1))

    def first_variation(self, mu):
        if mu.cell_volume is None:
            return self._particle_first_variation(mu)
        return self.m / (self.m - 1) * mu.density() ** (self.m - 1)

    def form(self, mu, grams=None):
        # h sum (b / h)^m / (m - 1): f = c b^(m - 1) with c = m h^(1 - m) / (m - 1)
        h, m = self._cell_volume_for_form(mu), self.m
        return WeightForm(mu.n, powers=((m / (m - 1) * h ** (1 - m), m - 1),))


#: Relative step of the central difference of grad_V that gives V'' for the Newton position step
#: (near eps^(1/3), the best accuracy of a central difference): the minimizer does not depend on
#: this Hessian, only the rate of the iteration.
POTENTIAL_HESSIAN_STEP = 1e-5


def line_terms(F: Energy, factor: float = 1.0) -> list[tuple[float, Energy]] | None:
    """F as sum_k c_k G_k with each G_k a Potential (any c_k) or an InternalEnergy (c_k >= 0):
    the energies whose Hessian in the positions of 1-D particles is tridiagonal and that keep
    the particles ordered (each states it: ``Energy.position_terms``). None for any other
    energy (Interaction, MMD2, KL, ...)."""
    return F.position_terms(factor)


@dataclass
class PositionDerivatives:
    """F and its derivatives in the positions x (n,) of 1-D particles, weights fixed.

    value: F; gradient: dF/dx_i, (n,); diagonal (n,) and upper (n - 1,): the bands of the
    symmetric tridiagonal Hessian (upper[i] = d^2F / dx_i dx_{i+1}), None unless asked for;
    magnitude (n,): the sum of the absolute values of the terms that add up to each gradient
    entry and value_magnitude the same for the value (their round-off scale).
    """

    value: float
    gradient: np.ndarray
    magnitude: np.ndarray
    value_magnitude: float
    diagonal: np.ndarray | None = None
    upper: np.ndarray | None = None


def position_derivatives(terms: list[tuple[float, Energy]], points: np.ndarray,
                         weights: np.ndarray, hessian: bool = True) -> PositionDerivatives:
    """Value, gradient and tridiagonal Hessian in the positions of F = sum_k c_k G_k
    (``line_terms``) at 1-D particles points (n,) with weights (n,), each term adding its own
    (``add_position_derivatives``).

    InternalEnergy: F_n = sum_i e(d_i, m_{i+1/2}) gives dF/dx_i = e'(d_{i-1}) - e'(d_i) and the
    Hessian sum_i e''(d_i) (u_{i+1} - u_i)(u_{i+1} - u_i)^T (exact). Potential: dF/dx_i =
    a_i V'(x_i) and the diagonal a_i V''(x_i), V'' by a central difference of grad_V.
    Raises ParticleOrderError when the points are not strictly increasing.
    """
    n = points.size
    sums = PositionDerivatives(0.0, np.zeros(n), np.zeros(n), 0.0,
                               np.zeros(n) if hessian else None, np.zeros(n - 1) if hessian else None)
    for factor, term in terms:
        term.add_position_derivatives(factor, points, weights, sums)
    return sums


@dataclass(frozen=True)
class KL(Energy):
    r"""The generalized Kullback-Leibler divergence to a reference measure :math:`\pi`.

    Parameters
    ----------
    target : Measure or callable
        The reference: a :class:`~jko_ift.Measure` on the same support as the flowing measure
        (weights :math:`b`), or a log-density :math:`\log\pi`, points ``(n, d)`` -> ``(n,)``,
        for which :math:`b_i = \pi(x_i)\,h^d` on a grid (a fixed function: its values are kept
        per support, as a :class:`~jko_ift.Potential`'s are).

    Notes
    -----
    .. math::

        \mathrm{KL}(\mu\,|\,\pi) = \sum_i a_i\log\frac{a_i}{b_i} - a_i + b_i,
        \qquad f = \log\frac{a}{b},

    finite only where :math:`a_i = 0` whenever :math:`b_i = 0`. Its Hellinger flow is
    :math:`\partial_t\mu = -\mu\log(\mu/\pi)`, solved in closed form by
    :math:`\log(a/b)(t) = e^{-t}\log(a/b)(0)` (theory, section 3).

    Examples
    --------
    >>> pi = jk.Measure([[0.0], [1.0]], [0.5, 0.5])
    >>> F = jk.KL(pi)
    >>> F.value(pi)
    0.0
    >>> round(F.value(pi.with_weights([1.0, 0.0])), 6)  # log 2 - 1 + 1
    0.693147
    """

    target: Measure | Callable[[np.ndarray], np.ndarray]

    def reference_weights(self, mu: Measure) -> np.ndarray:
        if isinstance(self.target, Measure):
            if not self.target.same_support(mu):
                raise ValueError("KL(target) needs the target on the same support as mu; "
                                 f"got {self.target.n} target points for {mu.n} points")
            return self.target.weights
        h = require_cell_volume(mu, "KL to a log-density")
        return np.exp(_call_points(self.target, mu.points, (mu.n,), "KL log-density",
                                   allowed_inf=-np.inf)) * h

    def value(self, mu):
        a, b = mu.weights, self.reference_weights(mu)
        if np.any((a > 0) & (b <= 0)):
            return float("inf")
        ratio = np.where(a > 0, a / np.where(b > 0, b, 1.0), 1.0)
        return float(np.sum(a * np.log(ratio) - a + b))

    def first_variation(self, mu):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(mu.weights) - np.log(self.reference_weights(mu))

    def excluded(self, mu):
        zero = self.reference_weights(mu) == 0
        return zero if zero.any() else None

    def form(self, mu, grams=None):
        # sum b log(b / r) - b + r: f = log(b / r)
        return WeightForm(mu.n, log_coef=1.0, reference=self.reference_weights(mu))

    def targets(self):
        if isinstance(self.target, Measure):
            yield "KL", self.target


@dataclass(frozen=True)
class MMD2(Energy):
    r"""Half the squared MMD to a target, :math:`F(\mu) = \frac12\mathrm{MMD}_k^2(\mu, \nu)`.

    Parameters
    ----------
    target : Measure
        The target :math:`\nu`; it may sit on other points than the flowing measure (e.g.
        samples).
    kernel : Kernel
        The kernel :math:`k`, e.g. :class:`~jko_ift.Gaussian`.

    Raises
    ------
    ValueError
        If ``target`` is not a :class:`~jko_ift.Measure` or ``kernel`` not a kernel.

    Notes
    -----
    .. math::

        F(\mu) = \frac12\|\mu - \nu\|_{\mathcal H}^2
        = \frac12\sum_{ij}(a_i a_j k(x_i, x_j) - 2 a_i b_j k(x_i, y_j) + b_i b_j k(y_i, y_j)),

    with first variation :math:`f(x) = \int k(x, y)\,d(\mu - \nu)(y)`. For a conditionally
    positive definite kernel (:class:`~jko_ift.EnergyKernel`) :math:`F` is convex only on
    measures of fixed mass. Its :math:`W_2` flow is the MMD flow of Arbel et al. (2019).

    Examples
    --------
    >>> nu = jk.Measure([[0.0]], [1.0])
    >>> F = jk.MMD2(nu, jk.Gaussian(1.0))
    >>> F.value(nu)
    0.0
    >>> mu = jk.Measure([[1.0]], [1.0])
    >>> bool(np.isclose(F.value(mu), 1.0 - np.exp(-0.5)))
    True
    """

    target: Measure
    kernel: Kernel

    def __post_init__(self):
        if not isinstance(self.target, Measure):
            raise ValueError(f"MMD2 needs a jk.Measure target, got {type(self.target).__name__}")
        if not isinstance(self.kernel, Kernel):
            raise ValueError(f"MMD2 needs a kernel such as jk.Gaussian(1.0), got {self.kernel!r}")

    @cached_property
    def _target_self_term(self) -> float:
        t = self.target
        return float(t.weights @ self.kernel.apply(t.points, t.points, t.weights))

    def _check(self, mu):
        if mu.dim != self.target.dim:
            raise ValueError(f"MMD2: mu lives in dimension {mu.dim} but the target in "
                             f"{self.target.dim}; give both points of the same d")

    def witness(self, mu) -> np.ndarray:
        """f = K a - K_xy p at the points of mu: (n,)."""
        self._check(mu)
        t = self.target
        return (self.kernel.apply(mu.points, mu.points, mu.weights)
                - self.kernel.apply(mu.points, t.points, t.weights))

    def value(self, mu):
        self._check(mu)
        t = self.target
        own = mu.weights @ self.kernel.apply(mu.points, mu.points, mu.weights)
        cross = mu.weights @ self.kernel.apply(mu.points, t.points, t.weights)
        return float(max(0.5 * (own - 2 * cross + self._target_self_term), 0.0))

    first_variation = witness

    def grad_first_variation(self, mu):
        self._check(mu)
        t = self.target
        return (self.kernel.grad_sum(mu.points, mu.points, mu.weights)
                - self.kernel.grad_sum(mu.points, t.points, t.weights))

    def form(self, mu, grams=None):
        """f = K b - K_xy p: the Gram K (n, n) on the support and the offset -K_xy p."""
        self._check(mu)
        x, t = mu.points, self.target
        gram = self.kernel(x, x) if grams is None else grams.gram(self.kernel)
        return WeightForm(mu.n, offset=-self.kernel.apply(x, t.points, t.weights), quadratic=gram,
                          quadratic_psd=PSD if self.kernel.positive_definite else ZERO_SUM_PSD)

    def first_variation_at(self, mu, z, gradient=False):
        t, k = self.target, self.kernel
        if gradient:
            return k.grad_sum(z, mu.points, mu.weights) - k.grad_sum(z, t.points, t.weights)
        return k.apply(z, mu.points, mu.weights) - k.apply(z, t.points, t.weights)

    def value_magnitude(self, mu):
        """Kernel sums bounded through |k(x, y)| <= k(x, x) (positive definite, stationary) or
        |x - y| <= the diameter (the energy kernel)."""
        t = self.target
        points = np.vstack([mu.points, t.points])
        if self.kernel.positive_definite:
            bound = abs(float(self.kernel.apply(points[:1], points[:1], np.ones(1))[0]))
        else:
            bound = float(np.linalg.norm(np.ptp(points, axis=0)))
        return 0.5 * bound * (mu.mass + t.mass) ** 2

    def targets(self):
        yield "MMD2", self.target

    def check_measure(self, mu, mass_conserved):
        if not mass_conserved and not self.kernel.positive_definite:
            raise ValueError(f"MMD2 with the conditionally positive definite "
                             f"{type(self.kernel).__name__} is an energy only between "
                             "measures of equal mass, but this reaction geometry changes "
                             "the mass; pass conserve_mass=True to the geometry")
        if self.target.dim != mu.dim:
            raise ValueError(f"the particles live in dimension {mu.dim} but the target of "
                             f"MMD2 in dimension {self.target.dim}: give both points of shape "
                             "(n, d) with the same d")


def psd_factor(matrix: np.ndarray, rtol: float = 1e-10) -> np.ndarray | None:
    """L with L^T L = matrix, dropping eigenvalues below rtol * max; None if not PSD."""
    matrix = 0.5 * (matrix + matrix.T)
    values, vectors = np.linalg.eigh(matrix)
    top = max(np.abs(values).max(), 1e-300)
    if values.min() < -1e3 * rtol * top:
        return None
    keep = values > rtol * top
    return np.sqrt(values[keep])[:, None] * vectors[:, keep].T
