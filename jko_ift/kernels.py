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

#: BLAS work M*N*K under which OpenBLAS runs a matrix product on one thread. The blocked
#: sums keep their skinny products (inner dimension d + 2, or d + 1 columns) under it: on two
#: cores shared with another process, OpenBLAS's spinning threads made these products 5-40x
#: slower than one thread (benchmarks/witness.py), and small blocks also stay in cache.
SINGLE_THREAD_WORK = 1 << 18

#: Up to this many weight columns ([w, w y] has d + 1), the blocked gradient sum reduces each
#: block by one matrix-vector product per column: OpenBLAS's GEMM with 3 columns and a long
#: inner dimension ran 3x slower than three GEMVs (benchmarks/witness.py, d = 2).
GEMV_COLUMNS_MAX = 8

#: Rows per block never fall below this; with large d the products are then big enough for
#: BLAS threads to pay off, and the Python overhead per block stays small.
MIN_BLOCK_ROWS = 4


def squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|x_i - y_j|^2: (n, m), clipped at 0 against round-off."""
    s = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.maximum(s, 0.0, out=s)


def row_blocks(n: int, m: int):
    """Slices of rows so that a (rows, m) temporary holds at most BLOCK_ENTRIES."""
    step = max(1, BLOCK_ENTRIES // max(m, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _sum_blocks(n: int, m: int, d: int):
    """Row blocks for the kernel sums: at most BLOCK_ENTRIES entries, and products small
    enough for one BLAS thread (SINGLE_THREAD_WORK) unless that means under MIN_BLOCK_ROWS."""
    m = max(m, 1)
    rows = SINGLE_THREAD_WORK // (m * (d + 2))
    step = max(1, min(BLOCK_ENTRIES // m, max(rows, MIN_BLOCK_ROWS)))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _lifted(x: np.ndarray, y: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Rows X_i = [x_i, |x_i|^2, 1] and columns Y_j = scale [-2 y_j, 1, |y_j|^2] with
    X Y = scale |x_i - y_j|^2: one matrix product gives a block of (scaled) squared distances."""
    n, d = x.shape
    lifted_x = np.empty((n, d + 2))
    lifted_x[:, :d] = x
    lifted_x[:, d] = (x * x).sum(1)
    lifted_x[:, d + 1] = 1.0
    lifted_y = np.empty((d + 2, y.shape[0]))
    lifted_y[:d] = -2.0 * y.T
    lifted_y[d] = 1.0
    lifted_y[d + 1] = (y * y).sum(1)
    if scale != 1.0:
        lifted_y *= scale
    return lifted_x, lifted_y


class Kernel:
    """Base of the radial kernels. Subclasses define ``profile`` and ``profile_derivative``."""

    #: Positive definite (True) or only conditionally positive definite (False).
    positive_definite = True

    def profile(self, s: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def profile_derivative(self, s: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    #: The blocked sums hand ``_profile_inplace`` and ``_derivative_inplace`` the squared
    #: distances times this factor (folded into the matrix product, which saves a pass).
    _distance_scale = 1.0

    def _profile_inplace(self, s: np.ndarray) -> None:
        """Overwrite scaled squared distances s (possibly a hair below 0) by phi(s)."""
        np.maximum(s, 0.0, out=s)
        s[...] = self.profile(s)

    def _derivative_inplace(self, s: np.ndarray) -> float:
        """Overwrite s by phi'(s) / c and return the constant c (saves a pass over s)."""
        np.maximum(s, 0.0, out=s)
        s[...] = self.profile_derivative(s)
        return 1.0

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
        """sum_j k(x_i, y_j) w_j: (n,), computed in row blocks (memory O(block))."""
        x, y = _pair(x, y)
        w = _sum_weights(w, y.shape[0])
        lifted_x, lifted_y = _lifted(x, y, self._distance_scale)
        out = np.empty(x.shape[0])
        buffer = None
        for rows in _sum_blocks(x.shape[0], y.shape[0], x.shape[1]):
            buffer = _block_buffer(buffer, rows, y.shape[0])
            block = buffer[: rows.stop - rows.start]
            np.matmul(lifted_x[rows], lifted_y, out=block)  # squared distances, then in place
            self._profile_inplace(block)
            np.matmul(block, w, out=out[rows])
        return out

    def grad_sum(self, x, y, w) -> np.ndarray:
        """sum_j w_j grad_x k(x_i, y_j) = 2 [x_i (D w)_i - D (w y)]_i with D = phi'(s): (n, d).

        Computed in row blocks: one matrix product per block gives the squared distances (the
        kernel's scale folded in), the profile derivative is applied in place, and d + 1
        matrix-vector products give [D w, D (w y)]: no (n, m, d) array, memory O(block).
        """
        x, y = _pair(x, y)
        w = _sum_weights(w, y.shape[0])
        d = x.shape[1]
        lifted_x, lifted_y = _lifted(x, y, self._distance_scale)
        columns = np.empty((d + 1, y.shape[0]))  # [w, w y]^T, one contiguous row per column
        columns[0] = w
        columns[1:] = (w[:, None] * y).T
        sums = np.empty((d + 1, x.shape[0]))
        by_column = d + 1 <= GEMV_COLUMNS_MAX
        factor = 1.0
        buffer = None
        for rows in _sum_blocks(x.shape[0], y.shape[0], d):
            buffer = _block_buffer(buffer, rows, y.shape[0])
            block = buffer[: rows.stop - rows.start]
            np.matmul(lifted_x[rows], lifted_y, out=block)
            factor = self._derivative_inplace(block)
            if by_column:
                for k in range(d + 1):
                    np.matmul(block, columns[k], out=sums[k, rows])
            else:
                sums[:, rows] = columns @ block.T
        return (2.0 * factor) * (x * sums[0][:, None] - sums[1:].T)


def _block_buffer(buffer, rows: slice, m: int) -> np.ndarray:
    """One block buffer reused across the blocks of a sum (no allocation per block)."""
    if buffer is None or buffer.shape[0] < rows.stop - rows.start:
        return np.empty((rows.stop - rows.start, m))
    return buffer


def _sum_weights(w, m: int) -> np.ndarray:
    w = np.asarray(w, dtype=float)
    if w.shape != (m,):
        raise ValueError(f"kernel sums need one weight per point of y: shape ({m},), got {w.shape}")
    return w


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

    @property
    def _distance_scale(self) -> float:
        return -1.0 / (2.0 * self.sigma**2)  # the blocks arrive as exponents

    def _profile_inplace(self, s):
        np.exp(s, out=s)

    def _derivative_inplace(self, s):
        np.exp(s, out=s)
        return -1.0 / (2.0 * self.sigma**2)


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

    def _profile_inplace(self, s):
        np.maximum(s, 0.0, out=s)
        s += self.c**2
        np.sqrt(s, out=s)
        np.reciprocal(s, out=s)

    def _derivative_inplace(self, s):
        self._profile_inplace(s)
        np.power(s, 3, out=s)
        return -0.5


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
