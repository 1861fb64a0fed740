"""Energies F(mu) on weighted supports, and their algebra (F1 + F2, c * F).

Each energy gives ``value``, ``first_variation`` f = dF/dmu at the points (n,) and
``grad_first_variation`` grad f at the points (n, d). Energies that are convex in the
weights on a fixed support also give a CVXPY expression (``conic``) used by the exact
JKO step; the others raise ``NotConvexError``.
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
        raise NotImplementedError

    def first_variation(self, mu: Measure) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def grad_first_variation(self, mu: Measure) -> np.ndarray:
        """grad f at the points: (n, d); by central differences on a grid by default."""
        return grid_gradient(mu, _finite_part(self.first_variation(mu)))

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

    def conic(self, y, support):
        if self.factor < 0 and not isinstance(self.energy, Potential):
            return Energy.conic(self, y, support)
        return self.factor * self.energy.conic(y, support)


def _call_points(function, points: np.ndarray, shape: tuple, what: str) -> np.ndarray:
    out = np.asarray(function(points), dtype=float)
    if out.shape != shape:
        raise ValueError(f"{what} must return shape {shape} for points of shape "
                         f"{points.shape}, got {out.shape}")
    return out


@dataclass(frozen=True)
class Potential(Energy):
    """F(mu) = sum_i a_i V(x_i); f = V. V: (n, d) -> (n,), grad_V: (n, d) -> (n, d)."""

    V: Callable[[np.ndarray], np.ndarray]
    grad_V: Callable[[np.ndarray], np.ndarray] | None = None

    def value(self, mu):
        return float(mu.weights @ self.first_variation(mu))

    def first_variation(self, mu):
        return _call_points(self.V, mu.points, (mu.n,), "Potential V")

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
            values = np.asarray(function(diff), dtype=float).reshape(rows.stop - rows.start, m, -1)
            out[rows] = np.einsum("imk,m->ik", values, weights)
        return out if width > 1 else out[:, 0]

    def matrix(self, points) -> np.ndarray:
        """[W(x_i - x_j)]: (n, n)."""
        x = as_points(points)
        n, d = x.shape
        return np.asarray(self.W((x[:, None, :] - x[None, :, :]).reshape(-1, d)), float).reshape(n, n)

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


@dataclass(frozen=True)
class Entropy(Energy):
    """F(mu) = int rho log rho dx = sum_i a_i log(a_i / h^d) on a grid; f = log rho + 1."""

    def value(self, mu):
        h = require_cell_volume(mu, "Entropy")
        a = mu.weights
        return float(np.sum(a * np.log(np.where(a > 0, a / h, 1.0))))

    def first_variation(self, mu):
        with np.errstate(divide="ignore"):
            return np.log(mu.density()) + 1.0

    def conic(self, y, support):
        # sum s y log(s y / h) = s (-sum entr(y) + log(s / h) sum y)
        s, h = support.scale, require_cell_volume(support.measure, "Entropy")
        return s * (-cp.sum(cp.entr(y)) + np.log(s / h) * cp.sum(y))


@dataclass(frozen=True)
class PorousMedium(Energy):
    """F(mu) = int rho^m / (m - 1) dx on a grid, m > 1; f = m rho^(m-1) / (m - 1).

    Its W2 gradient flow is the porous medium equation rho_t = Laplace(rho^m).
    """

    m: float = 2.0

    def __post_init__(self):
        if not (np.isfinite(self.m) and self.m > 1):
            raise ValueError(f"PorousMedium needs an exponent m > 1, got {self.m}")

    def value(self, mu):
        h = require_cell_volume(mu, "PorousMedium")
        return float(h * np.sum(mu.density() ** self.m) / (self.m - 1))

    def first_variation(self, mu):
        return self.m / (self.m - 1) * mu.density() ** (self.m - 1)

    def conic(self, y, support):
        s, h = support.scale, require_cell_volume(support.measure, "PorousMedium")
        return s**self.m * h ** (1 - self.m) / (self.m - 1) * cp.sum(cp.power(y, self.m))


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
        return np.exp(_call_points(self.target, mu.points, (mu.n,), "KL log-density")) * h

    def value(self, mu):
        a, b = mu.weights, self.reference_weights(mu)
        if np.any((a > 0) & (b <= 0)):
            return float("inf")
        ratio = np.where(a > 0, a / np.where(b > 0, b, 1.0), 1.0)
        return float(np.sum(a * np.log(ratio) - a + b))

    def first_variation(self, mu):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(mu.weights) - np.log(self.reference_weights(mu))

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
