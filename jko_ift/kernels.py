"""Radial kernels k(x, y) = phi(|x - y|^2): values, gradients in x, and blocked sums.

Every kernel is a profile phi of the squared distance s = |x - y|^2, so that
grad_x k(x, y) = 2 phi'(s) (x - y). Sums over large point sets go through row blocks,
so memory stays O(block * m), never (n, m, d).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .measures import as_points

#: Entries per temporary block (about 32 MB of float64).
BLOCK_ENTRIES = 1 << 22


def squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|x_i - y_j|^2: (n, m), clipped at 0 against round-off."""
    s = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.maximum(s, 0.0, out=s)


def row_blocks(n: int, m: int):
    """Slices of rows so that a (rows, m) temporary holds at most BLOCK_ENTRIES."""
    step = max(1, BLOCK_ENTRIES // max(m, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


class Kernel:
    """Base of the radial kernels. Subclasses define ``profile`` and ``profile_derivative``."""

    #: Positive definite (True) or only conditionally positive definite (False).
    positive_definite = True

    def profile(self, s: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def profile_derivative(self, s: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x, y) -> np.ndarray:
        """Gram matrix k(x_i, y_j): (n, m) for x: (n, d), y: (m, d)."""
        x, y = _pair(x, y)
        return self.profile(squared_distances(x, y))

    def gradient(self, x, y) -> np.ndarray:
        """grad_x k(x_i, y_j): (n, m, d). Small sets only; prefer ``grad_sum``."""
        x, y = _pair(x, y)
        dphi = self.profile_derivative(squared_distances(x, y))
        return 2.0 * dphi[:, :, None] * (x[:, None, :] - y[None, :, :])

    def apply(self, x, y, w) -> np.ndarray:
        """sum_j k(x_i, y_j) w_j: (n,), computed in row blocks."""
        x, y = _pair(x, y)
        w = np.asarray(w, dtype=float)
        out = np.empty(x.shape[0])
        for rows in row_blocks(x.shape[0], y.shape[0]):
            out[rows] = self.profile(squared_distances(x[rows], y)) @ w
        return out

    def grad_sum(self, x, y, w) -> np.ndarray:
        """sum_j w_j grad_x k(x_i, y_j) = 2 [x_i (D w)_i - D (w y)]_i with D = phi'(s): (n, d)."""
        x, y = _pair(x, y)
        w = np.asarray(w, dtype=float)
        wy = w[:, None] * y
        out = np.empty_like(x)
        for rows in row_blocks(x.shape[0], y.shape[0]):
            dphi = self.profile_derivative(squared_distances(x[rows], y))
            out[rows] = 2.0 * (x[rows] * (dphi @ w)[:, None] - dphi @ wy)
        return out


def _pair(x, y):
    x, y = as_points(x, "x"), as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kernel arguments must share the dimension d, got {x.shape} and {y.shape}")
    return x, y


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


@dataclass(frozen=True)
class Gaussian(Kernel):
    """k(x, y) = exp(-|x - y|^2 / (2 sigma^2))."""

    sigma: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "sigma", _positive("Gaussian sigma", self.sigma))

    def profile(self, s):
        return np.exp(-s / (2.0 * self.sigma**2))

    def profile_derivative(self, s):
        return -self.profile(s) / (2.0 * self.sigma**2)


@dataclass(frozen=True)
class IMQ(Kernel):
    """Inverse multiquadric k(x, y) = (c^2 + |x - y|^2)^(-1/2)."""

    c: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "c", _positive("IMQ c", self.c))

    def profile(self, s):
        return (self.c**2 + s) ** -0.5

    def profile_derivative(self, s):
        return -0.5 * (self.c**2 + s) ** -1.5


def _over_root(scale: np.ndarray, s: np.ndarray) -> np.ndarray:
    """scale / (2 sqrt(s)), with 0 at s = 0 (the symmetric subgradient of |x - y|)."""
    root = np.sqrt(s)
    return np.divide(scale, 2.0 * root, out=np.zeros_like(s), where=root > 0)


@dataclass(frozen=True)
class Laplace(Kernel):
    """k(x, y) = exp(-|x - y| / sigma). Not differentiable at x = y; the gradient there is 0."""

    sigma: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "sigma", _positive("Laplace sigma", self.sigma))

    def profile(self, s):
        return np.exp(-np.sqrt(s) / self.sigma)

    def profile_derivative(self, s):
        return -_over_root(self.profile(s) / self.sigma, s)


@dataclass(frozen=True)
class EnergyKernel(Kernel):
    """k(x, y) = -|x - y|, the kernel of the energy distance.

    It is only *conditionally* positive definite: sum_ij c_i c_j k(x_i, x_j) >= 0 holds
    for signed weights with sum(c) = 0. MMD^2(mu, nu) = (a - b)^T K (a - b) is therefore
    a squared distance only between measures of equal mass (where it is the energy
    distance); the methods accept it only where mass is conserved (``conserve_mass=True``
    for reaction geometries, probability targets for MMD2) and say so otherwise.
    """

    positive_definite = False

    def profile(self, s):
        return -np.sqrt(s)

    def profile_derivative(self, s):
        return -_over_root(np.ones_like(s), s)
