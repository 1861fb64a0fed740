"""Gibbs kernels xi_ij = exp(-|x_i - x_j|^2 / eps) on a fixed support, as operators.

The entropic JKO step only ever applies the kernel to a vector: ``apply(v) = xi v`` in the
kernel domain, and ``log_apply(g) = log(xi exp(g))`` in the log domain (stabilized, for small
eps). The support is the same on both sides of the plan and the cost is symmetric, so
xi^T = xi.

* ``GridGibbs``: on a regular grid the kernel is the tensor product of one 1-D kernel per
  axis, so xi v is d products with m_k x m_k matrices: O(n^(1 + 1/d)) work, and the n x n
  matrix is never formed. The log domain uses the same products after a tilted shift of
  each block of outputs (``_LogAxis``), so it stays on BLAS instead of O(n^(1 + 1/d))
  exponentials.
* ``DenseGibbs``: a point cloud, through ``kernels.squared_distances`` (centred, so translation
  invariant) in row blocks, with memory O(n * block); the n x n kernel is cached only when it is
  small (``DENSE_CACHE_ENTRIES``).
"""

from __future__ import annotations

import numpy as np

from ..kernels import row_blocks, squared_distances
from ..measures import Grid

#: Largest n * n for which a point-cloud kernel (or cost matrix) is kept in memory
#: (2^24 float64 entries = 128 MiB); above it, row blocks are recomputed at every product.
DENSE_CACHE_ENTRIES = 1 << 24

#: Exponent budget of the tilted log-domain products (see ``_LogAxis``): the tilt factors lie
#: in [e^-B, e^B] and the dominant terms stay above e^-2B = 1e-261 (float64 reaches 1e-308).
TILT_BUDGET = 300.0


#: Below this many columns an axis is summed directly (m x m x columns exponentials).
DIRECT_COLUMNS = 8

#: Products with a plan kept by ``PlanProducts``: the rows P 1 and P x_k per axis (d <= 3).
PLAN_PRODUCT_SLOTS = 4


class GibbsOperator:
    """xi = exp(-C / eps) on the points of a support: (n, n), applied, never stored for grids."""

    eps: float
    n: int

    def apply(self, v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:  # pragma: no cover
        """xi v: (n,) -> (n,), written into ``out`` (n,) when given."""
        raise NotImplementedError

    def log_apply(self, g: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """log(xi exp(g)): (n,) -> (n,); entries of g may be -inf (zero mass)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Grids: separable products
# ---------------------------------------------------------------------------------------------


class _LogAxis:
    """log sum_j exp(G[j, c] - (x_i - x_j)^2 / eps) along one axis, for all columns c at once.

    For outputs i in a block I with centre x0, write y = x - x0 and
    (x_i - x_j)^2 = (x_i - x0)^2 - 2 (x_i - x0) y_j + y_j^2. With H = G - y^2 / eps and its
    column maximum M,

        out[i, c] = M[c] - (x_i - x0)^2 / eps + log sum_j exp(t_i y_j) exp(H[j, c] - M[c]),

    t_i = 2 (x_i - x0) / eps: one exponential of H per block and one matrix product with the
    fixed tilt matrix exp(t_i y_j). With T = max |t_i| and Y = max |y_j|, the dominant term
    of every sum is >= e^(-T Y) and its factor exp(H - M) >= e^(-2 T Y), so blocks are cut
    until T Y <= TILT_BUDGET: no overflow, no underflow of what matters, at every eps.
    """

    def __init__(self, x: np.ndarray, eps: float):
        self.eps = eps
        m = x.size
        length = float(x.max() - x.min()) if m > 1 else 0.0
        blocks = 1
        while True:
            edges = np.linspace(0, m, blocks + 1).round().astype(int)
            parts = []
            fits = True
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                if hi <= lo:
                    continue
                x0 = 0.5 * (x[lo] + x[hi - 1])
                y = x - x0
                t = 2.0 * (x[lo:hi] - x0) / eps
                if np.abs(t).max(initial=0.0) * np.abs(y).max() > TILT_BUDGET:
                    fits = False
                    break
                parts.append((slice(lo, hi), y * y / eps, np.exp(np.outer(t, y)),
                              (x[lo:hi] - x0) ** 2 / eps))
            if fits or blocks >= m:
                break
            blocks = min(m, max(blocks + 1, int(np.ceil(blocks * 1.5))))
        self.parts = parts if fits else []
        self.length = length
        # many blocks (small eps against the axis length): a direct log-sum-exp over the m x m
        # cost of the axis is cheaper than the per-block passes, and needs no budget
        # (and for few columns, e.g. 1-D grids, where the block overhead dominates)
        self.direct = (not fits) or 3 * len(parts) >= m
        self.log_kernel = -((x[:, None] - x[None, :]) ** 2) / eps

    @property
    def blocks(self) -> int:
        return 0 if self.direct else len(self.parts)

    def __call__(self, G: np.ndarray) -> np.ndarray:
        """G: (m, r) -> (m, r)."""
        if self.direct or G.shape[1] <= DIRECT_COLUMNS:
            return _direct_lse(G, self.log_kernel)
        out = np.empty_like(G)
        with np.errstate(divide="ignore", invalid="ignore"):
            for rows, quadratic, tilt, offset in self.parts:
                H = G - quadratic[:, None]
                top = H.max(axis=0)
                top = np.where(np.isfinite(top), top, 0.0)
                H -= top
                np.exp(H, out=H)
                block = np.log(tilt @ H)
                block += top
                block -= offset[:, None]
                out[rows] = block
        return out


def _direct_lse(G: np.ndarray, log_kernel: np.ndarray) -> np.ndarray:
    """log sum_j exp(log_kernel[i, j] + G[j, c]): (m, r), in blocks of columns c."""
    m, r = G.shape
    out = np.empty((log_kernel.shape[0], r))
    step = max(1, (1 << 22) // (m * m))
    with np.errstate(divide="ignore", invalid="ignore"):
        for lo in range(0, r, step):
            A = log_kernel[:, :, None] + G[None, :, lo:lo + step]
            top = A.max(axis=1)
            top = np.where(np.isfinite(top), top, 0.0)
            A -= top[:, None, :]
            np.exp(A, out=A)
            out[:, lo:lo + step] = np.log(A.sum(axis=1)) + top
    return out


class GridGibbs(GibbsOperator):
    """xi on a ``Grid``: the tensor product of the 1-D kernels exp(-(x_i - x_j)^2 / eps)."""

    def __init__(self, grid: Grid, eps: float):
        self.grid, self.eps, self.n = grid, float(eps), grid.size
        self.shape = grid.shape
        self.axes = [grid.lo[k] + (np.arange(grid.shape[k]) + 0.5) * grid.spacing[k]
                     for k in range(grid.dim)]
        self.kernels = []
        for x in self.axes:  # equal axes share one matrix (half the memory traffic of a product)
            same = [K for y, K in zip(self.axes, self.kernels, strict=False) if np.array_equal(x, y)]
            self.kernels.append(same[0] if same else np.exp(-((x[:, None] - x[None, :]) ** 2) / self.eps))
        self._log_axes = None
        self._work = None  # the intermediate of ``apply(v, out)`` in 2-D

    @property
    def log_axes(self) -> list[_LogAxis]:
        if self._log_axes is None:
            self._log_axes = [_LogAxis(x, self.eps) for x in self.axes]
        return self._log_axes

    def _separable(self, matrices, v):
        image = v.reshape(self.shape)
        if len(self.shape) == 1:
            return matrices[0] @ image
        if len(self.shape) == 2:
            return matrices[0] @ image @ matrices[1].T
        for k, matrix in enumerate(matrices):  # contract axis k, then put it back in place
            image = np.moveaxis(np.tensordot(matrix, image, axes=(1, k)), 0, k)
        return image

    def apply(self, v, out: np.ndarray | None = None):
        """xi v: (n,) -> (n,); with ``out`` (n,) the product is written there.

        In 2-D the intermediate product lives in an array kept by the operator, and with
        ``out`` nothing is allocated (the scaling loop passes its own arrays)."""
        if len(self.shape) != 2:
            image = self._separable(self.kernels, v).reshape(-1)
            if out is None:
                return image
            out[...] = image
            return out
        if self._work is None:
            self._work = np.empty(self.shape)
        out = np.empty(self.n) if out is None else out
        np.matmul(self.kernels[0], v.reshape(self.shape), out=self._work)
        np.matmul(self._work, self.kernels[1].T, out=out.reshape(self.shape))
        return out

    def log_apply(self, g):
        image = np.asarray(g, float).reshape(self.shape)
        for k, axis in enumerate(self.log_axes):
            moved = np.moveaxis(image, k, 0)
            flat = np.ascontiguousarray(moved).reshape(moved.shape[0], -1)
            image = np.moveaxis(axis(flat).reshape(moved.shape), 0, k)
        return np.ascontiguousarray(image).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Point clouds: dense kernels in row blocks (POT)
# ---------------------------------------------------------------------------------------------


class DenseGibbs(GibbsOperator):
    """xi on a point cloud x: (n, d), rows computed with ``ot.dist`` (squared Euclidean).

    The n x n cost is kept when n^2 <= cache_entries; otherwise each product recomputes
    its row blocks, so memory stays O(n * block).
    """

    def __init__(self, points: np.ndarray, eps: float, cache_entries: int = DENSE_CACHE_ENTRIES):
        self.points, self.eps, self.n = points, float(eps), points.shape[0]
        self.cached = self.n * self.n <= cache_entries
        self._cost = squared_distances(points, points) if self.cached else None
        self._kernel = None

    def _cost_rows(self, rows: slice) -> np.ndarray:
        if self._cost is not None:
            return self._cost[rows]
        return squared_distances(self.points[rows], self.points)

    @property
    def kernel(self) -> np.ndarray | None:
        if self._kernel is None and self.cached:
            self._kernel = np.exp(-self._cost / self.eps)
        return self._kernel

    def apply(self, v, out: np.ndarray | None = None):
        """xi v: (n,) -> (n,), written into ``out`` when given."""
        if self.kernel is not None:
            return np.matmul(self.kernel, v, out=out)
        out = np.empty(self.n) if out is None else out
        for rows in row_blocks(self.n, self.n):
            out[rows] = np.exp(-self._cost_rows(rows) / self.eps) @ v
        return out

    def log_apply(self, g):
        out = np.empty(self.n)
        finite = np.isfinite(g)
        if not finite.any():
            return np.full(self.n, -np.inf)
        g_finite = g[finite]
        with np.errstate(divide="ignore"):
            for rows in row_blocks(self.n, self.n):
                A = g_finite[None, :] - self._cost_rows(rows)[:, finite] / self.eps
                top = A.max(axis=1)
                out[rows] = np.log(np.exp(A - top[:, None]).sum(axis=1)) + top
        return out


class PlanProducts:
    """P w from a function ``times(w)``, kept for the last PLAN_PRODUCT_SLOTS arguments: the
    transport cost and the barycentric map of a plan (``grid_motion.barycentric_motion``) ask for
    the same products P x_k, with the coordinates shifted alike (two of their five products
    with the plan, each two kernel applications: 4.6 ms of a 177 ms step at 256^2, cProfile).
    The products returned are shared: callers do not write into them."""

    def __init__(self, times):
        self.times = times
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, w: np.ndarray) -> np.ndarray:
        for argument, product in self.kept:
            if argument.shape == w.shape and np.array_equal(argument, w):
                return product
        product = self.times(w)
        self.kept = [(np.array(w), product), *self.kept][:PLAN_PRODUCT_SLOTS]
        return product


def transport_cost(points: np.ndarray, rows: np.ndarray, cols: np.ndarray, plan_times) -> float:
    """<C, P> = sum_ij P_ij |x_i - x_j|^2 from products with the plan only.

    |x_i - x_j|^2 = |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>, so <C, P> needs the marginals rows = P 1,
    cols = P^T 1 and, per axis, x^T P x. ``plan_times(w)`` returns P w for w > 0 (the log
    domain applies it as exp(f + log_apply(g + log w))); coordinates are shifted to be
    positive, which leaves the cost unchanged.
    """
    total = 0.0
    for z in positive_coordinates(points):
        total += float(rows @ z**2 + cols @ z**2 - 2.0 * z @ plan_times(z))
    return max(total, 0.0)


def positive_coordinates(points: np.ndarray) -> list[np.ndarray]:
    """The coordinates of points (n, d) per axis, shifted to start at 1 (products with a plan in
    the log domain need w > 0): contiguous columns, computed alike by every caller, so that
    ``PlanProducts`` recognizes them (a column's min costs 0.06 ms at 256^2 points, the min
    over axis 0 of the (n, 2) array 2.2 ms)."""
    return [points[:, k] - points[:, k].min() + 1.0 for k in range(points.shape[1])]


def gibbs_operator(measure, eps: float, separable: bool = True,
                   cache_entries: int = DENSE_CACHE_ENTRIES) -> GibbsOperator:
    """The Gibbs kernel of ``measure``'s support: separable on a grid, dense otherwise."""
    if measure.grid is not None and separable:
        return GridGibbs(measure.grid, eps)
    return DenseGibbs(measure.points, eps, cache_entries)


# ---------------------------------------------------------------------------------------------
# The Hellinger-Kantorovich (logarithmic entropy transport) cost, on any support
# ---------------------------------------------------------------------------------------------


def hk_cost(sq_dist: np.ndarray, ell: float) -> np.ndarray:
    """ell^2 * c with c = -log cos^2(min(|x - y| / ell, pi / 2)): +inf from |x - y| >= ell pi / 2.

    In squared-length units (ell^2 c = |x - y|^2 + O(|x - y|^4 / ell^2)), so that the Gibbs
    kernel exp(-ell^2 c / eps) blurs like exp(-|x - y|^2 / eps) at the same eps.
    """
    r = np.sqrt(np.maximum(sq_dist, 0.0)) / ell
    out = np.full(r.shape, np.inf)
    near = r < 0.5 * np.pi
    out[near] = -2.0 * ell**2 * np.log(np.cos(r[near]))
    return out


class HKGibbs(DenseGibbs):
    """exp(-ell^2 c(x_i, x_j) / eps) with the HK cost ``hk_cost``; zero beyond ell pi / 2.

    Dense (point clouds, and grids through their points), row blocks as ``DenseGibbs``.
    ``log_apply`` handles rows whose finite entries all meet g = -inf (result -inf).
    """

    def __init__(self, points: np.ndarray, eps: float, ell: float,
                 cache_entries: int = DENSE_CACHE_ENTRIES):
        self.ell = float(ell)
        self.points, self.eps, self.n = points, float(eps), points.shape[0]
        self.cached = self.n * self.n <= cache_entries
        self._cost = hk_cost(squared_distances(points, points), self.ell) if self.cached else None
        self._kernel = None

    def _cost_rows(self, rows: slice) -> np.ndarray:
        if self._cost is not None:
            return self._cost[rows]
        return hk_cost(squared_distances(self.points[rows], self.points), self.ell)

    def log_apply(self, g):
        out = np.full(self.n, -np.inf)
        finite = np.isfinite(g)
        if not finite.any():
            return out
        g_finite = g[finite]
        with np.errstate(divide="ignore", invalid="ignore"):
            for rows in row_blocks(self.n, self.n):
                A = g_finite[None, :] - self._cost_rows(rows)[:, finite] / self.eps
                top = A.max(axis=1)
                safe = np.where(np.isfinite(top), top, 0.0)
                out[rows] = np.where(np.isfinite(top),
                                     np.log(np.exp(A - safe[:, None]).sum(axis=1)) + safe, -np.inf)
        return out

    def plan_cost(self, f: np.ndarray, g: np.ndarray) -> float:
        """<ell^2 c, P> for P_ij = exp(f_i + g_j - ell^2 c_ij / eps) (0 where c = inf)."""
        total = 0.0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for rows in row_blocks(self.n, self.n):
                C = self._cost_rows(rows)
                P = np.exp(f[rows, None] + g[None, :] - C / self.eps)
                total += float(np.sum(np.where(P > 0, P * C, 0.0)))
        return total
