"""Radial kernels k(x, y) = phi(|x - y|^2): values, gradients in x, and blocked sums.

Every kernel is a profile phi of the squared distance s = |x - y|^2, so that
grad_x k(x, y) = 2 phi'(s) (x - y). Sums over large point sets go through row blocks,
so memory stays O(block * m), never (n, m, d).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .measures import _is_frozen_here, as_points

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

#: Pairs of point sets with at most this many pairs keep their kernel matrices for reuse
#: (``_SmallPair``): an explicit particle step sums over the same few sets many times (the
#: witness, its gradient, the energy before and after), and at small N each blocked sum's
#: set-up (centring, near-pair search, lifted product) costs more than the sum itself.
SMALL_PAIR_ENTRIES = 1 << 16

#: How many pairs of small sets are kept (least recently used dropped): at most three
#: matrices of SMALL_PAIR_ENTRIES each (1.5 MB) per pair.
SMALL_PAIR_SLOTS = 8

#: Rows per block never fall below this for wide points (d + 1 > GEMV_COLUMNS_MAX): at d = 100,
#: N = 3000 blocks of 4 rows made the witness gradient 9.4x the plain blocked product x y^T, blocks
#: of 256 rows 3.7x (one thread, benchmarks/witness.py): the per-block work, not the product,
#: dominated.
WIDE_BLOCK_ROWS = 256

EPS = float(np.finfo(float).eps)
SMALLEST_NORMAL = float(np.finfo(float).tiny)

#: Up to this dimension the near pairs are found by a k-d tree (O(n log n + pairs)); above it a
#: tree prunes poorly and one comparison pass over each block is cheaper.
TREE_DIM_MAX = 8

#: Under this many pairs one comparison pass over the block costs less than building the trees
#: (100 points against 100: about 10 microseconds against 0.8 ms).
TREE_PAIRS_MIN = 1 << 16

#: Most near pairs listed at once (40 bytes each: 40 MB, like one block); past it (particles
#: collapsed into clusters) the comparison pass over each block takes over.
NEAR_PAIRS_MAX = BLOCK_ENTRIES // 4

#: Largest relative error a kernel value may take from the lifted product (an absolute error in
#: the exponent of a Gaussian or Laplace value). Pairs where the lifted product's round-off
#: (``lifted_roundoff``) would exceed it are recomputed from their differences (``NearPairs``):
#: for unit-spread data in 2-D, |x - y| < ~0.05 for IMQ and EnergyKernel (well under 1 % of
#: random pairs), none for a Gaussian with sigma >= ~R / 70.
MAX_ROUNDOFF = 1e-12

#: Pairs under twice the lifted round-off bound are always recomputed: every entry left alone
#: is then > 0, so no clipping pass is needed and no profile exceeds its value at 0.
POSITIVITY_MARGIN = 2.0

#: exp(-NEGLIGIBLE_EXPONENT) = 8.5e-17 is under half an ulp of k(x, x) = 1: pairs beyond it
#: need not be refined for the exponent's sake.
NEGLIGIBLE_EXPONENT = 37.0


def squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|x_i - y_j|^2: (n, m), by the lifted product on centred points, near pairs exact.

    Translation invariant to the precision of the inputs: the points are centred first
    (``centred_pair``), and pairs whose lifted value has relative round-off above MAX_ROUNDOFF
    are recomputed from differences, so the result is >= 0 and exact at x_i = y_j.
    """
    x, y = as_points(x, "x"), as_points(y, "y")
    x, y = centred_pair(x, y)
    lifted_x, lifted_y = _lifted(x, y)
    s = lifted_x @ lifted_y
    below = relative_refine_below(lifted_roundoff(x, y))
    _refine_near(s, x, y, 1.0, below, NearPairs.find(x, y, below), slice(0, x.shape[0]))
    return s


def relative_refine_below(roundoff: float) -> float:
    """Squared distance under which the lifted product's relative error (roundoff / s) exceeds
    MAX_ROUNDOFF: pairs closer than that are recomputed from their differences."""
    return max(POSITIVITY_MARGIN, 1.0 / MAX_ROUNDOFF) * roundoff


def centred_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x - c, y - c with c the centre of the bounding box of both sets (O((n + m) d)).

    |x_i - y_j| is unchanged, and the cancellation error of the lifted product
    |x|^2 + |y|^2 - 2 x.y becomes relative to the data's spread, not to its distance from the
    origin (uncentred, a shift by 1e8 of unit-spread data left no correct digit at all).
    """
    if x.size == 0 or y.size == 0:
        return x, y
    lo = np.minimum(x.min(0), y.min(0))
    hi = np.maximum(x.max(0), y.max(0))
    centre = lo + 0.5 * (hi - lo)
    if y is x:
        x = x - centre
        return x, x  # the identity tells the near-pair search that one tree serves both
    return x - centre, y - centre


def lifted_roundoff(x: np.ndarray, y: np.ndarray) -> float:
    """Bound on |fl([x, |x|^2, 1] . [-2 y, 1, |y|^2]) - |x - y|^2| over all pairs.

    The d + 2 products sum to at most (|x| + |y|)^2 in absolute value and |x|^2, |y|^2 carry
    d roundings each: (d + 3) eps (max|x| + max|y|)^2 (Higham, Accuracy and Stability, 3.1).
    """
    if x.size == 0 or y.size == 0:
        return 0.0
    radius = np.sqrt((x * x).sum(1).max()) + np.sqrt((y * y).sum(1).max())
    return float((x.shape[1] + 3) * EPS * radius**2)


@dataclass(frozen=True)
class NearPairs:
    """The pairs (i, j) with |x_i - y_j|^2 < ``below``, sorted by row, with their squared
    distances computed from the differences (exact to the inputs' precision).

    Found by a k-d tree in O((n + m) log(n + m) + pairs) for d <= TREE_DIM_MAX, else by one
    comparison pass over the lifted blocks (``scan``).
    """

    rows: np.ndarray
    cols: np.ndarray
    squared: np.ndarray
    #: offsets[i]: the first pair of row i (n + 1 entries), so a block finds its pairs in O(1)
    offsets: np.ndarray

    @classmethod
    def find(cls, x: np.ndarray, y: np.ndarray, below: float) -> NearPairs | None:
        """The near pairs by a k-d tree, or None where a comparison pass is cheaper: large d, few
        pairs (TREE_PAIRS_MIN), or more than NEAR_PAIRS_MAX pairs (clusters of coincident
        particles), whose list would outgrow the blocks' memory."""
        if x.shape[1] > TREE_DIM_MAX:
            return None
        if below <= 0 or x.size == 0 or y.size == 0:
            return cls(np.empty(0, np.intp), np.empty(0, np.intp), np.empty(0),
                       np.zeros(x.shape[0] + 1, np.intp))
        if x.shape[0] * y.shape[0] < TREE_PAIRS_MIN:
            return None
        tree_x = cKDTree(x)
        tree_y = tree_x if y is x else cKDTree(y)
        if tree_x.count_neighbors(tree_y, np.sqrt(below)) > NEAR_PAIRS_MAX:
            return None
        found = tree_x.sparse_distance_matrix(tree_y, np.sqrt(below), output_type="ndarray")
        order = np.argsort(found["i"], kind="stable")
        rows, cols = found["i"][order].astype(np.intp), found["j"][order].astype(np.intp)
        difference = x[rows] - y[cols]
        offsets = np.searchsorted(rows, np.arange(x.shape[0] + 1))
        return cls(rows, cols, np.einsum("kd,kd->k", difference, difference), offsets)

    def overwrite(self, block: np.ndarray, rows: slice, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """block[i - rows.start, j] = scale |x_i - y_j|^2 for the near pairs of these rows;
        returns their (i - rows.start, j)."""
        lo, hi = self.offsets[rows.start], self.offsets[rows.stop]
        local, cols = self.rows[lo:hi] - rows.start, self.cols[lo:hi]
        if hi > lo:
            block[local, cols] = scale * self.squared[lo:hi]
        return local, cols

    @staticmethod
    def scan(block: np.ndarray, x: np.ndarray, y: np.ndarray, scale: float,
             below: float) -> tuple[np.ndarray, np.ndarray]:
        """The comparison-pass variant: overwrite the entries of ``block`` (scale times lifted
        squared distances of rows x, columns y) under ``below`` from the differences; returns
        their (row in the block, column)."""
        limit = scale * below
        near = np.greater(block, limit) if scale < 0 else np.less(block, limit)
        rows, cols = np.nonzero(near)
        if rows.size:
            difference = x[rows] - y[cols]
            block[rows, cols] = scale * np.einsum("kd,kd->k", difference, difference)
        return rows, cols


def _refine_near(block: np.ndarray, x: np.ndarray, y: np.ndarray, scale: float, below: float,
                 near: NearPairs | None, rows: slice) -> tuple[np.ndarray, np.ndarray]:
    """Overwrite the near pairs of a block of scale * lifted squared distances (rows ``rows`` of
    x against all of y) by their exact values.

    Every entry left alone then has a true squared distance >= below > round-off bound,
    so its lifted value is > 0 (no clipping pass is needed), and the near pairs, where the
    lifted product has no correct digit, are exact to the inputs' precision.
    """
    if near is None:
        return NearPairs.scan(block, x[rows], y, scale, below)
    return near.overwrite(block, rows, scale)


def row_blocks(n: int, m: int):
    """Slices of rows so that a (rows, m) temporary holds at most BLOCK_ENTRIES."""
    step = max(1, BLOCK_ENTRIES // max(m, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _sum_blocks(n: int, m: int, d: int):
    """Row blocks for the kernel sums: at most BLOCK_ENTRIES entries, and products small
    enough for one BLAS thread (SINGLE_THREAD_WORK) unless that means under MIN_BLOCK_ROWS
    (WIDE_BLOCK_ROWS for points wider than GEMV_COLUMNS_MAX, whose blocks are reduced by one
    matrix product)."""
    m = max(m, 1)
    rows = SINGLE_THREAD_WORK // (m * (d + 2))
    least = MIN_BLOCK_ROWS if d + 1 <= GEMV_COLUMNS_MAX else WIDE_BLOCK_ROWS
    step = max(1, min(BLOCK_ENTRIES // m, max(rows, least)))
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
    r"""Base class of the radial kernels :math:`k(x, y) = \varphi(|x - y|^2)`.

    A subclass defines the profile :math:`\varphi` (``profile``) and its derivative
    (``profile_derivative``), both as functions of the squared distance :math:`s`; the base
    class gives the Gram matrix (``kernel(x, y)``), gradients and the blocked sums
    :math:`\sum_j k(x_i, y_j) w_j` (``apply``) and :math:`\sum_j w_j\nabla_x k(x_i, y_j)`
    (``grad_sum``), which compute the distances centred (translation invariant) and in row
    blocks (memory independent of the number of columns).

    Attributes
    ----------
    positive_definite : bool
        True for a positive definite kernel; False for one that is only conditionally positive
        definite (:class:`~jko_ift.EnergyKernel`), whose MMD is a distance only between
        measures of equal mass.

    Examples
    --------
    >>> k = jk.Gaussian(1.0)
    >>> x = np.array([[0.0], [1.0]])
    >>> k(x, x).round(4)
    array([[1.    , 0.6065],
           [0.6065, 1.    ]])
    >>> k.apply(x, x, np.array([1.0, -1.0])).round(4)
    array([ 0.3935, -0.3935])
    """

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

    def _refine_below(self, roundoff: float) -> float:
        """Squared distance under which a pair is recomputed from its difference, given the
        lifted product's round-off bound: by default where the squared distance's relative
        error would exceed MAX_ROUNDOFF (for EnergyKernel, -|x - y| then errs by <= MAX_ROUNDOFF / 2
        relative)."""
        return relative_refine_below(roundoff)

    def _distance_blocks(self, x: np.ndarray, y: np.ndarray):
        """(rows, block, near rows, near columns) for each row block of the sum over centred
        x, y (``centred_pair``): ``block`` holds ``_distance_scale`` |x_i - y_j|^2 (lifted
        product, the near pairs -- block rows and columns given -- from their differences), to
        be overwritten in place. One buffer is reused across the blocks."""
        scale = self._distance_scale
        below = self._refine_below(lifted_roundoff(x, y))
        near = NearPairs.find(x, y, below)
        lifted_x, lifted_y = _lifted(x, y, scale)
        buffer = None
        for rows in _sum_blocks(x.shape[0], y.shape[0], x.shape[1]):
            buffer = _block_buffer(buffer, rows, y.shape[0])
            block = buffer[: rows.stop - rows.start]
            np.matmul(lifted_x[rows], lifted_y, out=block)
            near_rows, near_cols = _refine_near(block, x, y, scale, below, near, rows)
            yield rows, block, near_rows, near_cols

    #: c with phi'(s) = c phi(s) for this kernel (the Gaussian), or None: a small pair's
    #: derivative matrix is then a copy of its values, not a second pass of the profile.
    def _derivative_factor(self) -> float | None:
        return None

    def __call__(self, x, y) -> np.ndarray:
        """Gram matrix k(x_i, y_j): (n, m) for x: (n, d), y: (m, d).

        The same values as ``apply`` sums (same blocks, same near pairs), so that a solve with
        the Gram and a sum with ``apply`` agree to the summation order: the Gram of a smooth
        kernel is numerically singular and amplifies any other difference (1e8 at ridge 1e-8).
        """
        if type(x) is not np.ndarray and _tensor_input(x, y):
            return _backends().generic_matrix(self, x, y)
        x, y = _pair(x, y)
        pair = _small_pair(self, x, y)
        if pair is not None:
            return pair.values().copy()
        gram = np.empty((x.shape[0], y.shape[0]))
        for rows, block, _, _ in self._distance_blocks(*centred_pair(x, y)):
            self._profile_inplace(block)
            gram[rows] = block
        return gram

    def gradient(self, x, y) -> np.ndarray:
        """grad_x k(x_i, y_j): (n, m, d). Small sets only; prefer ``grad_sum``."""
        x, y = _pair(x, y)
        dphi = self.profile_derivative(squared_distances(x, y))
        return 2.0 * dphi[:, :, None] * (x[:, None, :] - y[None, :, :])

    def apply(self, x, y, w) -> np.ndarray:
        """sum_j k(x_i, y_j) w_j: (n,), computed in row blocks (memory O(block))."""
        if type(x) is not np.ndarray and _tensor_input(x, y):
            return _backends().generic_apply(self, x, y, w)
        pair = _kept_pair(self, x, y)
        if pair is not None:
            return pair.values() @ _sum_weights(w, y.shape[0])
        x, y = _pair(x, y)
        w = _sum_weights(w, y.shape[0])
        pair = _small_pair(self, x, y)
        if pair is not None:
            return pair.values() @ w
        out = np.empty(x.shape[0])
        for rows, block, _, _ in self._distance_blocks(*centred_pair(x, y)):
            self._profile_inplace(block)
            np.matmul(block, w, out=out[rows])
        return out

    def grad_sum(self, x, y, w) -> np.ndarray:
        """sum_j w_j grad_x k(x_i, y_j) = 2 [x_i (D w)_i - D (w y)]_i with D = phi'(s): (n, d).

        Computed in row blocks: one matrix product per block gives the squared distances (the
        kernel's scale folded in), the profile derivative is applied in place, and d + 1
        matrix-vector products give [D w, D (w y)]: no (n, m, d) array, memory O(block). x and
        y are centred by a common point first (the difference x_i (D w)_i - (D w y)_i cancels
        like |x|, not like |x - y|), and the near pairs, where it would cancel to round-off
        (every non-negligible pair for a bandwidth tiny against the spread), are summed from their
        differences w_j phi'(s_ij) (x_i - y_j) instead.
        """
        if type(x) is not np.ndarray and _tensor_input(x, y):
            return _backends().generic_grad_sum(self, x, y, w)
        pair = _kept_pair(self, x, y)
        if pair is not None:
            return pair.grad_sum(_sum_weights(w, y.shape[0]))
        x, y = _pair(x, y)
        w = _sum_weights(w, y.shape[0])
        pair = _small_pair(self, x, y)
        if pair is not None:
            return pair.grad_sum(w)
        x, y = centred_pair(x, y)
        reducer = _GradientReducer(x, y, w)
        factor = 1.0
        for rows, block, near_rows, near_cols in self._distance_blocks(x, y):
            factor = self._derivative_inplace(block)
            reducer.add(block, rows, near_rows, near_cols)
        return reducer.result(factor)

    def apply_and_grad_sum(self, x, y, w) -> tuple[np.ndarray, np.ndarray]:
        """(``apply``, ``grad_sum``) of the same weights w: (n,) and (n, d).

        For a kernel with phi' = c phi (the Gaussian, ``_derivative_factor``) one pass over the
        blocks gives both (one profile evaluation per pair instead of two), with the values and
        the near-pair treatment of the two separate sums; otherwise the two sums.
        """
        factor = self._derivative_factor()
        x, y = _pair(x, y)
        w = _sum_weights(w, y.shape[0])
        if factor is None or _small_pair(self, x, y) is not None:
            return self.apply(x, y, w), self.grad_sum(x, y, w)
        x, y = centred_pair(x, y)
        reducer = _GradientReducer(x, y, w)
        values = np.empty(x.shape[0])
        for rows, block, near_rows, near_cols in self._distance_blocks(x, y):
            self._profile_inplace(block)
            np.matmul(block, w, out=values[rows])
            reducer.add(block, rows, near_rows, near_cols)
        return values, reducer.result(factor)


class _GradientReducer:
    """The reduction of ``Kernel.grad_sum`` over its blocks of phi'(s) / c: [D w, D (w y)] by
    matrix-vector products, the near pairs summed from their differences (the block's near
    entries are zeroed after use). ``result(c)`` is sum_j w_j grad_x k(x_i, y_j): (n, d)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, w: np.ndarray):
        d = x.shape[1]
        self.x, self.y, self.w = x, y, w
        self.columns = np.empty((d + 1, y.shape[0]))  # [w, w y]^T, one contiguous row per column
        self.columns[0] = w
        self.columns[1:] = (w[:, None] * y).T
        self.sums = np.empty((d + 1, x.shape[0]))
        self.by_column = d + 1 <= GEMV_COLUMNS_MAX
        self.near_sum = np.zeros((x.shape[0], d))

    def add(self, block: np.ndarray, rows: slice, near_rows: np.ndarray, near_cols: np.ndarray):
        x, y, w = self.x, self.y, self.w
        if near_rows.size:
            at = near_rows + rows.start
            terms = (block[near_rows, near_cols] * w[near_cols])[:, None] * (x[at] - y[near_cols])
            np.add.at(self.near_sum, at, terms)
            block[near_rows, near_cols] = 0.0
        if self.by_column:
            for k in range(self.columns.shape[0]):
                np.matmul(block, self.columns[k], out=self.sums[k, rows])
        else:
            self.sums[:, rows] = self.columns @ block.T

    def result(self, factor: float) -> np.ndarray:
        sums = self.sums
        return (2.0 * factor) * (self.x * sums[0][:, None] - sums[1:].T + self.near_sum)


class _SmallPair:
    """The matrices of a kernel on x against y, two small point sets owned by measures (arrays
    that ``measures`` froze: never changed), from the blocked sums' own blocks and near pairs,
    so that every sum over the pair agrees with the blocked path. Kept by ``_small_pair``; it
    holds x and y, so that their ids stay theirs while it is kept."""

    def __init__(self, kernel: Kernel, x: np.ndarray, y: np.ndarray):
        self.kernel, self.x, self.y = kernel, x, y
        # one block: the product and the comparison pass of ``_distance_blocks``
        self.centred = xc, yc = centred_pair(x, y)
        scale = kernel._distance_scale
        below = kernel._refine_below(lifted_roundoff(xc, yc))
        lifted_x, lifted_y = _lifted(xc, yc, scale)
        self.scaled = lifted_x @ lifted_y  # _distance_scale |x_i - y_j|^2, near pairs exact
        self.near = NearPairs.scan(self.scaled, xc, yc, scale, below)
        self._values: np.ndarray | None = None
        self._gradient: tuple | None = None

    def values(self) -> np.ndarray:
        """k(x_i, y_j): (n, m), read-only."""
        if self._values is None:
            values = self.scaled.copy()
            self.kernel._profile_inplace(values)
            values.setflags(write=False)
            self._values = values
        return self._values

    def grad_sum(self, w: np.ndarray) -> np.ndarray:
        """sum_j w_j grad_x k(x_i, y_j): (n, d), as ``Kernel.grad_sum`` computes it (the near
        pairs from their differences) with the matrix phi'(s) / c kept."""
        if self._gradient is None:
            self._gradient = self._gradient_parts()
        derivative, factor, near_values, near_differences = self._gradient
        x, y = self.centred
        columns = np.empty((y.shape[0], y.shape[1] + 1))  # [w, w y]
        columns[:, 0] = w
        np.multiply(w[:, None], y, out=columns[:, 1:])
        sums = derivative @ columns
        out = x * sums[:, :1] - sums[:, 1:]
        if near_differences is not None:
            rows, cols = self.near
            np.add.at(out, rows, (near_values * w[cols])[:, None] * near_differences)
        out *= 2.0 * factor
        return out

    def _gradient_parts(self):
        """(phi'(s) / c with the near pairs zeroed, c, phi'(s) / c at the near pairs, their
        differences x_i - y_j, None when all are 0: coincident points, such as x_i against
        itself)."""
        factor = self.kernel._derivative_factor()
        if factor is not None:
            derivative = self.values().copy()
        else:
            derivative = self.scaled.copy()
            factor = self.kernel._derivative_inplace(derivative)
        rows, cols = self.near
        x, y = self.centred
        near_values = derivative[rows, cols]
        derivative[rows, cols] = 0.0
        derivative.setflags(write=False)
        differences = x[rows] - y[cols]
        return derivative, factor, near_values, differences if np.any(differences) else None


_SMALL_PAIRS: dict = {}
_SMALL_PAIRS_LOCK = threading.Lock()


def _kept_pair(kernel: Kernel, x, y) -> _SmallPair | None:
    """The kept pair of ``kernel`` on exactly these x and y, if any (no checks: only points of
    measures, checked when made, are kept)."""
    pair = _SMALL_PAIRS.get((id(kernel), id(x), id(y)))
    if pair is not None and pair.kernel is kernel and pair.x is x and pair.y is y:
        return pair
    return None


def _small_pair(kernel: Kernel, x: np.ndarray, y: np.ndarray) -> _SmallPair | None:
    """The kept matrices of ``kernel`` on (x, y) when both are point arrays of measures with
    at most SMALL_PAIR_ENTRIES pairs (made on first use; the oldest of SMALL_PAIR_SLOTS is
    dropped); None otherwise (the blocked sums). Keyed by identity: the pair holds its kernel
    and points, so their ids are not reused while it is kept."""
    if x.shape[0] * y.shape[0] > SMALL_PAIR_ENTRIES or not (_is_frozen_here(x) and _is_frozen_here(y)):
        return None
    settings = getattr(type(kernel), "__dataclass_params__", None)
    if settings is None or not settings.frozen:  # a kernel whose parameters may change: no reuse
        return None
    key = (id(kernel), id(x), id(y))
    pair = _kept_pair(kernel, x, y)
    if pair is not None:
        return pair
    pair = _SmallPair(kernel, x, y)
    with _SMALL_PAIRS_LOCK:
        _SMALL_PAIRS[key] = pair
        while len(_SMALL_PAIRS) > SMALL_PAIR_SLOTS:
            del _SMALL_PAIRS[next(iter(_SMALL_PAIRS))]
    return pair


def centred(matrix: np.ndarray) -> np.ndarray:
    """P M P with P = I - 1 1^T / n (rows and columns of mean zero): (n, n).

    The Gram matrix of a conditionally positive definite kernel (``EnergyKernel``) is positive
    semidefinite only on zero-sum vectors; on measures of one fixed mass b^T M b and
    b^T (P M P) b differ by a term linear in b, and P M P is positive semidefinite.
    """
    out = matrix - matrix.mean(0, keepdims=True)
    return out - out.mean(1, keepdims=True)


class GramCache:
    """Gram matrices K(y, y) on one support y: (n, d), computed once per kernel."""

    def __init__(self, points: np.ndarray):
        self.points = points
        self._grams: list[tuple[Kernel, np.ndarray]] = []

    def gram(self, kernel: Kernel) -> np.ndarray:
        for known, matrix in self._grams:
            if known is kernel or known == kernel:
                return matrix
        matrix = kernel(self.points, self.points)
        self._grams.append((kernel, matrix))
        return matrix


def _tensor_input(x, y) -> bool:
    """Whether a sum gets PyTorch tensors: they go to the array-API path of ``backends`` (the
    NumPy refinements here -- k-d tree near pairs, kept small pairs -- stay NumPy's)."""
    return not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)) and (
        type(x).__module__.startswith("torch") or type(y).__module__.startswith("torch"))


def _backends():
    from . import backends  # imported on first use: backends builds on this module

    return backends


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
    if _is_frozen_here(x) and _is_frozen_here(y) and x.shape[1] == y.shape[1]:
        return x, y  # points of measures: checked when the measure was made, never changed
    x, y = as_points(x, "x"), as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kernel arguments must share the dimension d, got {x.shape} and {y.shape}")
    return x, y


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


class _ScaledKernel(Kernel):
    """A kernel with one scale parameter (named by ``_scale_name``), positive and finite."""

    _scale_name = "sigma"

    def __post_init__(self):
        name = self._scale_name
        object.__setattr__(self, name, _positive(f"{type(self).__name__} {name}", getattr(self, name)))


@dataclass(frozen=True)
class Gaussian(_ScaledKernel):
    r"""The Gaussian kernel :math:`k(x, y) = \exp\big(-|x - y|^2 / (2\sigma^2)\big)`.

    Parameters
    ----------
    sigma : float, default 1.0
        The bandwidth :math:`\sigma`, positive and finite.

    Raises
    ------
    ValueError
        If ``sigma`` is not a positive finite number.

    Notes
    -----
    Positive definite, :math:`k(x, x) = 1`, :math:`\mathrm{Lip}(\nabla k) = 1/\sigma^2`. The
    "bandwidth 10" of Gladin et al. (2024) is ``Gaussian(10.0)``.

    Examples
    --------
    >>> bool(np.isclose(jk.Gaussian(2.0)(np.zeros((1, 1)), np.full((1, 1), 2.0))[0, 0], np.exp(-0.5)))
    True
    """

    sigma: float = 1.0

    def profile(self, s):
        with np.errstate(over="ignore"):  # s / sigma = inf: the value is 0
            return np.exp(-0.5 * (s / self.sigma) / self.sigma)  # no sigma^2: underflows < 1e-154

    def profile_derivative(self, s):
        if _underflows(self.sigma):
            return _tiny_bandwidth_derivative(self.profile(s), s)
        return -self.profile(s) / (2.0 * self.sigma**2)

    @property
    def _distance_scale(self) -> float:
        if _underflows(self.sigma):
            return 1.0  # -1 / (2 sigma^2) is -inf: the generic in-place path, on distances
        return -1.0 / (2.0 * self.sigma**2)  # the blocks arrive as exponents

    def _profile_inplace(self, s):
        if _underflows(self.sigma):
            return super()._profile_inplace(s)
        np.exp(s, out=s)  # exponents <= 0: ``_refine_near`` left no lifted value above 0

    def _derivative_inplace(self, s):
        if _underflows(self.sigma):
            return super()._derivative_inplace(s)
        np.exp(s, out=s)
        return -1.0 / (2.0 * self.sigma**2)

    def _derivative_factor(self):
        return None if _underflows(self.sigma) else -1.0 / (2.0 * self.sigma**2)

    def _refine_below(self, roundoff):
        """The exponent errs by roundoff / (2 sigma^2) for every pair: past MAX_ROUNDOFF, every
        pair whose value is not negligible is recomputed."""
        below = POSITIVITY_MARGIN * roundoff
        if _underflows(self.sigma) or roundoff / (2.0 * self.sigma**2) > MAX_ROUNDOFF:
            below = max(below, 2.0 * self.sigma**2 * NEGLIGIBLE_EXPONENT)
        return below


@dataclass(frozen=True)
class IMQ(_ScaledKernel):
    r"""The inverse multiquadric kernel :math:`k(x, y) = (c^2 + |x - y|^2)^{-1/2}`.

    Parameters
    ----------
    c : float, default 1.0
        The scale :math:`c`, positive and finite; :math:`k(x, x) = 1/c`.

    Raises
    ------
    ValueError
        If ``c`` is not a positive finite number.

    Notes
    -----
    Positive definite, with heavy tails: the MMD of an IMQ kernel metrizes weak convergence
    (Gorham and Mackey, 2017), so distant mass still feels the target.

    Examples
    --------
    >>> jk.IMQ(1.0)(np.zeros((1, 2)), np.array([[3.0, 4.0]])).round(6)
    array([[0.196116]])
    """

    c: float = 1.0
    _scale_name = "c"

    def profile(self, s):
        if _underflows(self.c):
            return 1.0 / np.hypot(self.c, np.sqrt(s))  # c^2 underflows: k(x, x) = 1 / c
        return (self.c**2 + s) ** -0.5

    def profile_derivative(self, s):
        if _underflows(self.c):
            with np.errstate(over="ignore"):  # 1 / c^3 at s = 0, where the gradient is 0
                return _tiny_bandwidth_derivative(-0.5 * self.profile(s) ** 3, s)
        return -0.5 * (self.c**2 + s) ** -1.5

    def _profile_inplace(self, s):
        if _underflows(self.c):
            s[...] = self.profile(s)
            return
        np.maximum(s, 0.0, out=s)
        s += self.c**2
        np.sqrt(s, out=s)
        np.reciprocal(s, out=s)

    def _derivative_inplace(self, s):
        if _underflows(self.c):
            return super()._derivative_inplace(s)
        self._profile_inplace(s)
        np.power(s, 3, out=s)
        return -0.5

    def _refine_below(self, roundoff):
        """(c^2 + s)^(-1/2) errs by roundoff / (2 (c^2 + s)) relative: recompute where that
        exceeds MAX_ROUNDOFF."""
        return max(POSITIVITY_MARGIN * roundoff, roundoff / (2.0 * MAX_ROUNDOFF) - self.c**2)


def _underflows(bandwidth: float) -> bool:
    """bandwidth^2 below the smallest normal float (bandwidth < ~1.5e-154): 1 / bandwidth^2
    overflows, and the profiles are evaluated without forming it."""
    return bandwidth * bandwidth < SMALLEST_NORMAL


def _tiny_bandwidth_derivative(derivative: np.ndarray, s: np.ndarray) -> np.ndarray:
    """phi'(s) for a bandwidth whose square underflows: phi'(0) ~ -1 / bandwidth^2 (or its cube)
    is not a float, but the gradient 2 phi'(0) (x - y) it multiplies is 0 at s = 0; elsewhere
    phi'(s) is 0 or finite. Set to 0 at s = 0 (the symmetric subgradient, as for Laplace)."""
    derivative = np.asarray(derivative, dtype=float)
    return np.where(np.asarray(s) > 0, np.nan_to_num(derivative, neginf=0.0, posinf=0.0), 0.0)


def _over_root(scale: np.ndarray, s: np.ndarray) -> np.ndarray:
    """scale / (2 sqrt(s)), with 0 at s = 0 (the symmetric subgradient of |x - y|)."""
    root = np.sqrt(s)
    return np.divide(scale, 2.0 * root, out=np.zeros_like(s), where=root > 0)


@dataclass(frozen=True)
class Laplace(_ScaledKernel):
    r"""The Laplace kernel :math:`k(x, y) = \exp(-|x - y| / \sigma)`.

    Parameters
    ----------
    sigma : float, default 1.0
        The length scale :math:`\sigma`, positive and finite (else a ``ValueError``).

    Notes
    -----
    Positive definite but not differentiable at :math:`x = y`; the gradient there is taken as
    0 (the symmetric subgradient).

    Examples
    --------
    >>> bool(np.isclose(jk.Laplace(2.0)(np.zeros((1, 1)), np.ones((1, 1)))[0, 0], np.exp(-0.5)))
    True
    """

    sigma: float = 1.0

    def profile(self, s):
        return np.exp(-np.sqrt(s) / self.sigma)

    def profile_derivative(self, s):
        return -_over_root(self.profile(s) / self.sigma, s)

    def _refine_below(self, roundoff):
        """The exponent |x - y| / sigma errs by ~roundoff / (2 |x - y| sigma): pairs closer than
        where that reaches MAX_ROUNDOFF (and the value is not negligible) are recomputed."""
        radius = min(roundoff / (2.0 * self.sigma * MAX_ROUNDOFF), NEGLIGIBLE_EXPONENT * self.sigma)
        return max(POSITIVITY_MARGIN * roundoff, radius**2)


@dataclass(frozen=True)
class EnergyKernel(Kernel):
    r"""The kernel of the energy distance, :math:`k(x, y) = -|x - y|`.

    Notes
    -----
    It is only *conditionally* positive definite: :math:`\sum_{ij} c_i c_j k(x_i, x_j) \ge 0`
    holds for signed weights with :math:`\sum_i c_i = 0`. So
    :math:`\mathrm{MMD}^2(\mu, \nu) = (a - b)^\top K (a - b)` is a squared distance only
    between measures of equal mass (where it is the energy distance of Székely and Rizzo); the
    methods accept it only where mass is conserved (``conserve_mass=True`` for reaction
    geometries, probability targets for :class:`~jko_ift.MMD2`) and say so otherwise.

    Examples
    --------
    >>> jk.EnergyKernel()(np.zeros((1, 2)), np.array([[3.0, 4.0]]))
    array([[-5.]])
    >>> jk.EnergyKernel().positive_definite
    False
    """

    positive_definite = False

    def profile(self, s):
        return -np.sqrt(s)

    def profile_derivative(self, s):
        return -_over_root(np.ones_like(s), s)
