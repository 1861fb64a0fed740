"""Energies F(mu) on weighted supports, and their algebra (F1 + F2, c * F).

Each energy gives ``value``, ``first_variation`` f = dF/dmu at the points (n,) and
``grad_first_variation`` grad f at the points (n, d). Energies that are convex in the
weights on a fixed support also give a CVXPY expression (``conic``) used by the exact
JKO step; the others raise ``NotConvexError``.

``Entropy`` and ``PorousMedium`` need a density: on a grid rho_i = a_i / h^d; on 1-D particles
(points (n, 1), no grid) the Lagrangian density between neighbouring particles
(``InternalEnergy``, docs/theory.md §9). ``position_derivatives`` gives such 1-D particle
energies with their gradient and tridiagonal Hessian in the positions (the Newton position step
of ParticleJKO and the particle ODE reference of problems.py use it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import cvxpy as cp
import numpy as np

from .kernels import Kernel, row_blocks
from .measures import Measure, as_points, grid_gradient, require_cell_volume


class NotConvexError(ValueError):
    """The energy is not convex in the weights on this support."""


@dataclass(frozen=True)
class ConicSupport:
    """What an energy needs to write its CVXPY expression on a fixed support.

    The weights variable is y with b = scale * y (scale makes y of order one).
    ``mass`` is sum(b) when the step conserves mass (fixed over a run), else None.
    Expressions may differ from F by a constant on the feasible set.
    """

    measure: Measure
    scale: float
    mass: float | None


class Energy:
    """Base class: the algebra and the defaults."""

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

    def conic(self, y: cp.Expression, support: ConicSupport) -> cp.Expression:
        raise NotConvexError(
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

    def conic(self, y, support):
        return cp.sum([term.conic(y, support) for term in self.terms])


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

    def conic(self, y, support):
        if self.factor < 0 and not isinstance(self.energy, Potential):
            return Energy.conic(self, y, support)
        return self.factor * self.energy.conic(y, support)


def _call_points(function, points: np.ndarray, shape: tuple, what: str,
                 allowed_inf: float | None = None) -> np.ndarray:
    """``function(points)`` checked: shape ``shape``, no NaN, and no infinity except of the sign
    of ``allowed_inf`` (+inf: a potential's hard wall; -inf: a log-density's zero)."""
    out = np.asarray(function(points), dtype=float)
    if out.shape != shape:
        raise ValueError(f"{what} must return shape {shape} for points of shape "
                         f"{points.shape}, got {out.shape}")
    return check_finite_output(out, points, what, allowed_inf)


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
    """F(mu) = sum_i a_i V(x_i); f = V. V: (n, d) -> (n,), grad_V: (n, d) -> (n, d)."""

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

    def conic(self, y, support):
        return support.scale * (self.first_variation(support.measure) @ y)


@dataclass(frozen=True)
class Interaction(Energy):
    """F(mu) = 1/2 sum_ij a_i a_j W(x_i - x_j) for a symmetric W; f(x) = sum_j a_j W(x - x_j).

    W: differences (n, d) -> (n,); grad_W: (n, d) -> (n, d). Convex in the weights only
    when the matrix [W(x_i - x_j)] is positive semidefinite (not for attraction).
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
        """[W(x_i - x_j)]: (n, n)."""
        x = as_points(points)
        n, d = x.shape
        diff = (x[:, None, :] - x[None, :, :]).reshape(-1, d)
        values = check_finite_output(np.asarray(self.W(diff), float), diff, "Interaction W (at x_i - x_j)")
        return values.reshape(n, n)

    def value(self, mu):
        return 0.5 * float(mu.weights @ self.first_variation(mu))

    def first_variation(self, mu):
        return self._pairwise(self.W, mu.points, mu.points, mu.weights, 1)

    def grad_first_variation(self, mu):
        if self.grad_W is None:
            raise ValueError("Interaction.grad_first_variation needs grad_W; pass "
                             "jk.Interaction(W, grad_W)")
        return self._pairwise(self.grad_W, mu.points, mu.points, mu.weights, mu.dim)

    def conic(self, y, support):
        factor = psd_factor(self.matrix(support.measure.points))
        if factor is None:
            return super().conic(y, support)
        return 0.5 * support.scale**2 * psd_quadratic(y, factor)


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


def spacing_gradient(d_width: np.ndarray) -> np.ndarray:
    """dF/dx (n,) of F = sum_i e(x_{i+1} - x_i) from de/dd (n - 1,): e'(d_{i-1}) - e'(d_i)."""
    gradient = np.zeros(d_width.size + 1)
    gradient[1:] += d_width
    gradient[:-1] -= d_width
    return gradient


@dataclass(frozen=True)
class Entropy(InternalEnergy):
    """F(mu) = int rho log rho dx; f = log rho + 1.

    On a grid: sum_i a_i log(a_i / h^d). On 1-D particles (points (n, 1), no grid; see
    ``InternalEnergy``): F_n = sum_i m_{i+1/2} log(m_{i+1/2} / (x_{i+1} - x_i)) over the n - 1
    cells between neighbours, m_{i+1/2} = (a_i + a_{i+1}) / 2; the pressure is P(rho) = rho, so
    (1/a_i) dF_n/dx_i = (rho_{i+1/2} - rho_{i-1/2}) / a_i, a discrete (log rho)'.
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

    def conic(self, y, support):
        # sum s y log(s y / h) = s (-sum entr(y) + log(s / h) sum y)
        s, h = support.scale, require_cell_volume(support.measure, "Entropy")
        return s * (-cp.sum(cp.entr(y)) + np.log(s / h) * cp.sum(y))


@dataclass(frozen=True)
class PorousMedium(InternalEnergy):
    """F(mu) = int rho^m / (m - 1) dx, m > 1; f = m rho^(m-1) / (m - 1).

    Its W2 gradient flow is the porous medium equation rho_t = Laplace(rho^m). On a grid:
    h^d sum_i rho_i^m / (m - 1). On 1-D particles (points (n, 1), no grid; see
    ``InternalEnergy``): F_n = sum_i d_i rho_{i+1/2}^m / (m - 1) with d_i = x_{i+1} - x_i and
    rho_{i+1/2} = (a_i + a_{i+1}) / (2 d_i); the pressure is P(rho) = rho^m.
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

    def conic(self, y, support):
        s, h = support.scale, require_cell_volume(support.measure, "PorousMedium")
        return s**self.m * h ** (1 - self.m) / (self.m - 1) * cp.sum(cp.power(y, self.m))


#: Relative step of the central difference of grad_V that gives V'' for the Newton position step
#: (near eps^(1/3), the best accuracy of a central difference): the minimizer does not depend on
#: this Hessian, only the rate of the iteration.
POTENTIAL_HESSIAN_STEP = 1e-5


def line_terms(F: Energy, factor: float = 1.0) -> list[tuple[float, Energy]] | None:
    """F as sum_k c_k G_k with each G_k a Potential (any c_k) or an InternalEnergy (c_k >= 0):
    the energies whose Hessian in the positions of 1-D particles is tridiagonal and that keep
    the particles ordered. None for any other energy (Interaction, MMD2, KL, ...)."""
    if isinstance(F, Sum):
        terms = [line_terms(term, factor) for term in F.terms]
        return None if any(t is None for t in terms) else [pair for t in terms for pair in t]
    if isinstance(F, Scaled):
        return line_terms(F.energy, factor * F.factor)
    if isinstance(F, Potential) or (isinstance(F, InternalEnergy) and factor >= 0):
        return [(factor, F)]
    return None


@dataclass(frozen=True)
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
    (``line_terms``) at 1-D particles points (n,) with weights (n,).

    InternalEnergy: F_n = sum_i e(d_i, m_{i+1/2}) gives dF/dx_i = e'(d_{i-1}) - e'(d_i) and the
    Hessian sum_i e''(d_i) (u_{i+1} - u_i)(u_{i+1} - u_i)^T (exact). Potential: dF/dx_i =
    a_i V'(x_i) and the diagonal a_i V''(x_i), V'' by a central difference of grad_V.
    Raises ParticleOrderError when the points are not strictly increasing.
    """
    n = points.size
    value, value_magnitude = 0.0, 0.0
    gradient, magnitude = np.zeros(n), np.zeros(n)
    diagonal = np.zeros(n) if hessian else None
    upper = np.zeros(n - 1) if hessian else None
    cells = None
    column = points[:, None]
    for factor, term in terms:
        if isinstance(term, Potential):
            if term.grad_V is None:
                raise ValueError("Potential needs grad_V for particle methods: jk.Potential(V, grad_V)")
            potential = _call_points(term.V, column, (n,), "Potential V")
            force = factor * weights * _call_points(term.grad_V, column, (n, 1), "Potential grad_V")[:, 0]
            value += factor * float(weights @ potential)
            value_magnitude += abs(factor) * float(weights @ np.abs(potential))
            gradient += force
            magnitude += np.abs(force)
            if hessian:
                step = POTENTIAL_HESSIAN_STEP * (1.0 + np.abs(points))
                both = np.concatenate([points + step, points - step])[:, None]
                slopes = _call_points(term.grad_V, both, (2 * n, 1), "Potential grad_V")[:, 0]
                diagonal += factor * weights * (slopes[:n] - slopes[n:]) / (2 * step)
            continue
        if cells is None:
            cells = particle_cells(points, weights, type(term).__name__)
        energy, d_width, d2_width, _ = term.cell_terms(*cells)
        value += factor * float(np.sum(energy))
        value_magnitude += factor * float(np.sum(np.abs(energy)))
        gradient += factor * spacing_gradient(d_width)
        magnitude[1:] += factor * np.abs(d_width)
        magnitude[:-1] += factor * np.abs(d_width)
        if hessian:
            diagonal[1:] += factor * d2_width
            diagonal[:-1] += factor * d2_width
            upper -= factor * d2_width
    return PositionDerivatives(value, gradient, magnitude, value_magnitude, diagonal, upper)


@dataclass(frozen=True)
class KL(Energy):
    """Generalized KL(mu | pi) = sum_i a_i log(a_i / b_i) - a_i + b_i; f = log(a / b).

    target: a ``Measure`` on the same support (weights b), or a callable log-density
    log pi: (n, d) -> (n,), for which b_i = pi(x_i) h^d on a grid.
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

    def conic(self, y, support):
        # sum kl_div(s y, b) = s sum kl_div(y, b / s)
        b = self.reference_weights(support.measure)
        return support.scale * cp.sum(cp.kl_div(y, b / support.scale))


@dataclass(frozen=True)
class MMD2(Energy):
    """F(mu) = 1/2 MMD^2(mu, target) = 1/2 ||mu - target||_H^2; f = K(mu - target).

    The target may sit on other points than mu (e.g. samples). For a conditionally
    positive definite kernel (EnergyKernel) F is convex only on measures of fixed mass.
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

    def conic(self, y, support):
        x, s = support.measure.points, support.scale
        self._check(support.measure)
        t = self.target
        linear = s * self.kernel.apply(x, t.points, t.weights) @ y
        return 0.5 * kernel_quadratic(self.kernel(x, x), y, s, support.mass) - linear


def psd_factor(matrix: np.ndarray, rtol: float = 1e-10) -> np.ndarray | None:
    """L with L^T L = matrix, dropping eigenvalues below rtol * max; None if not PSD."""
    matrix = 0.5 * (matrix + matrix.T)
    values, vectors = np.linalg.eigh(matrix)
    top = max(np.abs(values).max(), 1e-300)
    if values.min() < -1e3 * rtol * top:
        return None
    keep = values > rtol * top
    return np.sqrt(values[keep])[:, None] * vectors[:, keep].T


def psd_quadratic(y, factor: np.ndarray) -> cp.Expression:
    """|factor @ y|^2 as one PSD quadratic form: the solver gets an n x n block, not dense
    second-order cone rows (faster for the interior point, benchmarks/conic_step.py)."""
    return cp.quad_form(y, cp.psd_wrap(factor.T @ factor))


def kernel_quadratic(gram: np.ndarray, y, scale: float, mass) -> cp.Expression:
    """(s y)^T K (s y) as a convex expression, up to a constant on the feasible set.

    A positive definite Gram uses its factor directly. A conditionally positive
    definite one is PSD only on zero-sum vectors: with P the centring projector and
    sum(b) = mass fixed, b^T K b = |L_P b|^2 + 2 (mass / n) (P K 1)^T b + const.
    """
    factor = psd_factor(gram)
    if factor is not None:
        return scale**2 * psd_quadratic(y, factor)
    n = gram.shape[0]
    centred = gram - gram.mean(0, keepdims=True)
    centred -= centred.mean(1, keepdims=True)
    factor = psd_factor(centred)
    if factor is None or mass is None:
        raise NotConvexError(
            "this kernel is only conditionally positive definite: its MMD^2 is convex only "
            "where mass is conserved; use conserve_mass=True, a Wasserstein geometry, or a "
            "positive definite kernel (jk.Gaussian, jk.IMQ, jk.Laplace)"
        )
    row_sums = gram.sum(1)
    linear = (2.0 * scale / n) * (row_sums - row_sums.mean()) @ y
    return scale**2 * psd_quadratic(y, factor) + mass * linear
