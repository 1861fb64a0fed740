"""Quadratic programs over the orthant or a simplex, and the projections onto them.

    min_b  1/2 b^T H b - g^T b   over  C = {b >= 0}  or  {b >= 0, sum(b) = M}

``solve_weight_qp`` solves it exactly (docs/particles.md §3) on one of two paths. Dense warm
starts (the weights of a step on most particles) take the dense path: one Cholesky factorization
of the whole H and a primal-dual active set (Hintermueller-Ito-Kunisch) on the weights that
vanish, each face minimum in the range space of the factorization (a system of the size of the
zero set), so that the iteration count does not grow with the support; when it cycles, the
dual of the program restricted to the weights it touched finishes (from INTERIOR_MIN_SIZE points,
an interior-point method). From LOWRANK_MIN_SIZE points,
when H is numerically low rank plus a ridge (kernel Grams of low-dimensional points), the same
iteration runs without the n^3 factorization: faces are solved by conjugate gradients on H,
preconditioned with a pivoted Cholesky factor of H minus its ridge, and the exchanges are first
made on the program with that low-rank surrogate in place of H. Cold and sparse starts, and
sparse minimizers, take the sparse path: a primal active-set method grown from a vertex
(Lawson-Hanson for the orthant, its simplex analogue), with each face minimum from a Cholesky
factorization of H on the face, updated as indices enter and leave. Kernel Gram matrices with
a small ridge are numerically singular; their minimizers are sparse when the target lies
outside what the particles represent, dense when it overlaps them. The result is certified by
the Frank-Wolfe gap r^T b - M min_i r_i, r = H b - g, an upper bound of objective - optimum on
the simplex (on the orthant the same bound with the mass of b). ``spectral_projected_gradient``
(Barzilai-Borwein steps, nonmonotone Armijo search) is the first-order fallback for programs
that are not positive definite on a face, and for smooth non-quadratic objectives.

The reaction steps that build these programs live in ``weights``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy.linalg import lapack
from scipy.linalg.blas import dtrsm, dtrsv

#: Default relative accuracy of the weight step: the certified gap over the scale of the step
#: objective. Clarabel's default gap tolerance is 1e-8; the active-set method ends at round-off.
DEFAULT_WEIGHT_RTOL = 1e-10

#: Relative round-off allowance in the active-set tests (z_i > 0, lambda_i < 0): values within
#: this fraction of their scale are treated as zero, so that round-off cannot make an index
#: enter and leave the face forever.
ACTIVE_SET_ROUNDOFF = 1e-13

#: Warm starts whose support is at most this fraction of the points start the method on their
#: face. A denser warm start (the uniform weights of a first step) is tried as one dense face
#: solve only up to DENSE_FACE_MAX points (a Cholesky of that size costs about a millisecond);
#: otherwise the method starts from the best vertex. Kernel QPs with a small ridge have sparse
#: minimizers, so growing the face from a vertex is the fast path (docs/particles.md §3).
WARM_START_FRACTION = 0.25
DENSE_FACE_MAX = 400

#: A dense warm start (more than WARM_START_FRACTION of the points carry weight) first tries the
#: dense path: one Cholesky factorization of the whole H and a primal-dual active-set iteration
#: on the (few) weights that vanish, whose count does not grow with the support. It keeps one or
#: two more n x n arrays (the factor, and H^{-1} once many weights vanish), so it is tried up to
#: DENSE_PATH_MAX points (two arrays of 1.2 GB); beyond, only its low-rank variant (below) runs.
DENSE_PATH_MAX = 12_000

#: The dense path gives up (and the active set grows from a vertex) after PDAS_MAX_ITER
#: iterations, on a repeated zero set, when the minimum over the start's face is negative on more
#: than PDAS_FIRST_ZERO_FRACTION of the weights (the sign of a sparse minimizer: the face minimum
#: of an ill-conditioned kernel QP then oscillates, about half of it negative), or when more than
#: PDAS_MAX_ZERO_FRACTION of the weights vanish (the small systems grow to the size of H).
PDAS_MAX_ITER = 40
PDAS_FIRST_ZERO_FRACTION = 0.4
PDAS_MAX_ZERO_FRACTION = 0.75
#: Rounds of the dual fallback (``_reduced_dual``), each adding the weights found negative.
PDAS_DUAL_ROUNDS = 5
#: From INTERIOR_MIN_SIZE points, the dense path's fallback is an interior-point method
#: (``_interior_point``) instead of the dual: 9-14 Newton steps of one factorization of H + diag
#: each. Where the fallback ran (sigma 0.5, seeds 0-3 at n = 200-700 and 0-7 at n = 1000: 14
#: cases), it was 1.3-8x faster than the dual, whose active set is grown from a vertex on the
#: hundreds of weights touched, in 13 (n = 1000, seed 2: 108-188 factorizations for the whole
#: path, 31-47 with the interior point), and about even in one (seed 6: 28-66 against 31-33).
#: Its point is certified like every other, but
#: interior: weights that vanish at a minimizer are small, not zero (the program is degenerate
#: there: the zero set of its end point left 30-110 violations to the primal-dual iteration,
#: which cycled again). Below INTERIOR_MIN_SIZE the dual keeps exact zeros (a warm start on them
#: then takes one iteration). INTERIOR_STEP: the fraction of the step to the boundary.
INTERIOR_MIN_SIZE = 500
INTERIOR_MAX_ITER = 60
INTERIOR_STEP = 0.99

#: Columns of H^{-1} come from two triangular solves each while at most this fraction of the
#: points need one; beyond, the whole inverse is formed once (LAPACK potri, n^3 / 3 flops but
#: about 2.5 factorizations of time in OpenBLAS, against 2 n^2 flops a column).
INVERSE_COLUMN_FRACTION = 0.4
#: Rows per block of the forward solves L^{-1} X of the dense path (``_DenseInverse.forward``).
FORWARD_BLOCK = 128

#: The low-rank path (dense warm starts of at least LOWRANK_MIN_SIZE points): when a pivoted
#: Cholesky factor of H - mu I (mu its ridge, read off the factorization) of rank at most
#: min(LOWRANK_MAX_FRACTION n, n^2 / LOWRANK_RANK_SCALE) leaves a residual diagonal flat to
#: LOWRANK_FLAT of mu, faces are solved by conjugate gradients on H preconditioned with it:
#: O(n r^2) for the factor and O(n^2) a CG step, no n^3 factorization. LOWRANK_RESOLVE: the
#: relative residual diagonal at which the first pass reads the ridge off; LOWRANK_BLOCK:
#: candidate rows per panel of the pivoted factorization (LOWRANK_PANEL_RATIO: see
#: ``_panel_pivots``); LOWRANK_CG_MAX: CG steps per face
#: before the dense path takes over.
LOWRANK_MIN_SIZE = 1000
LOWRANK_MAX_FRACTION = 0.25
LOWRANK_RANK_SCALE = 16_000
LOWRANK_FLAT = 1e-2
LOWRANK_RESOLVE = 1e-6
LOWRANK_BLOCK = 16
LOWRANK_PANEL_RATIO = 1e-6
LOWRANK_CG_MAX = 60
LOWRANK_PDAS_MAX = 100
LOWRANK_EXCHANGE_TRIES = 3
#: Before the pivoted factorization, a probe: the principal block of H at PROBE_FACTOR * max_rank
#: points (at most PROBE_MAX), in PROBE_CHUNKS runs of consecutive indices spread over all of them,
#: is factored by LAPACK's pivoted Cholesky (pstrf) to the first pass's resolution. A subset of
#: the points needs no more rows than all of them, and the later passes needed 3-4 times the first
#: pass's rank (n = 1000, sigma 10: 13 and 48), so a probe rank above max_rank / PROBE_FACTOR means
#: the factor would run past its cap: the dense path then runs at once (n = 1000, sigma 1: the
#: probe costs about 0.01 of a factorization of H, the attempt it replaces 0.1-0.17).
PROBE_FACTOR = 2
PROBE_MAX = 512
PROBE_CHUNKS = 4

#: Round-off floor of a certified gap: r = H b - g is computed with errors of about
#: eps (|H b| + |g|) per entry, so r^T b - M min r is known only to ROUNDOFF_FACTOR * eps *
#: M * (max|H b| + max|g|). Kernel steps cancel terms of size a^T G a / eta down to F, so this
#: floor, not the tolerance, can bind when F is small; tolerances below it are not demanded.
ROUNDOFF_FACTOR = 1e3

#: Nonmonotone projected-gradient fallback (for non-convex or non-quadratic problems):
#: Armijo constant and memory of the Grippo-Lampariello-Lucidi line search.
SPG_ARMIJO = 1e-4
SPG_MEMORY = 10

#: An objective below -UNBOUNDED (or overflowing) means a program unbounded below (possible only
#: on the orthant with a Hessian that is not positive semidefinite).
UNBOUNDED = 1e100


# -------------------------------------------------------------------------------------------------
# Projections
# -------------------------------------------------------------------------------------------------

def project_simplex(v: np.ndarray, mass: float = 1.0) -> np.ndarray:
    """Euclidean projection of v: (n,) onto {b >= 0, sum(b) = mass} (sort based, O(n log n))."""
    v = np.asarray(v, dtype=float)
    if not mass > 0:
        raise ValueError(f"the simplex needs a positive mass, got {mass!r}")
    u = np.sort(v)[::-1]
    excess = np.cumsum(u) - mass
    count = np.arange(1, v.size + 1)
    rank = np.count_nonzero(u - excess / count > 0)
    threshold = excess[rank - 1] / rank
    return np.maximum(v - threshold, 0.0)


def project_feasible(v: np.ndarray, mass: float | None) -> np.ndarray:
    """Projection onto the orthant (mass None) or onto the simplex of the given mass."""
    return np.maximum(v, 0.0) if mass is None else project_simplex(v, mass)


# -------------------------------------------------------------------------------------------------
# The quadratic program
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QPSolution:
    """Solution of min 1/2 b^T H b - g^T b over the orthant or a simplex.

    weights: (n,) feasible; objective: 1/2 b^T H b - g^T b; gap: certified upper bound of
    objective - optimum (Frank-Wolfe gap; for non-convex problems a stationarity measure);
    status: "optimal" when gap <= the requested tolerance.
    """

    weights: np.ndarray
    objective: float
    gap: float
    iterations: int
    status: str
    method: str
    info: dict = field(default_factory=dict)


def frank_wolfe_gap(gradient: np.ndarray, b: np.ndarray, mass: float | None,
                    mass_bound: float = 0.0) -> float:
    """r^T b - M min_i r_i (simplex of mass M), or r^T b - B min(0, min_i r_i) on the orthant
    with B = max(sum(b), mass_bound).

    For a convex objective with gradient r at a feasible b this bounds objective - optimum:
    on the simplex always; on the orthant when the minimizer's mass is at most B (the callers
    pass the mass of the previous weights, of the order of the new ones).
    """
    low = float(gradient.min())
    if mass is None:
        return float(gradient @ b - max(float(b.sum()), mass_bound) * min(low, 0.0))
    return float(gradient @ b - mass * low)


def _objective(H, g, b):
    return float(0.5 * b @ (H @ b) - g @ b)


def solve_weight_qp(H, g, mass: float | None = None, start=None, atol: float | None = None,
                    rtol: float = DEFAULT_WEIGHT_RTOL, max_iter: int | None = None,
                    mass_bound: float | None = None) -> QPSolution:
    """Minimize 1/2 b^T H b - g^T b over b >= 0 (mass None) or {b >= 0, sum(b) = mass}.

    H: (n, n) symmetric positive definite (a ridge makes kernel Grams so); g: (n,);
    start: a feasible warm start (its face is tried first; a dense one, more than
    WARM_START_FRACTION of the points carrying weight, takes the dense path, see the module
    docstring). mass_bound: on the orthant, the
    mass used in the certificate (default: that of ``start``; see ``frank_wolfe_gap``).
    Stops when the certified gap is at most max(atol, rtol * max(1e-300, |objective|)).
    A matrix that is not positive definite on the faces visited (a non-convex program, e.g.
    an attractive interaction with a large step) falls back to a projected-gradient method
    that ends at a stationary point (status "optimal" then means first-order stationary).
    """
    H = np.asarray(H, dtype=float)
    g = np.asarray(g, dtype=float)
    n = g.size
    if H.shape != (n, n):
        raise ValueError(f"H must be ({n}, {n}) to match g of shape {g.shape}, got {H.shape}")
    # a sum of finite entries is finite unless it overflows (then the entries are checked one by
    # one): the row sums by BLAS gemv read H once, faster than isfinite or np.sum (measured)
    with np.errstate(over="ignore", invalid="ignore"):
        row_sums = float((H @ np.ones(n)).sum())
    if not ((np.isfinite(row_sums) or np.all(np.isfinite(H))) and np.all(np.isfinite(g))):
        raise ValueError("the weight QP has non-finite data (H or g contains NaN or inf)")
    if mass is not None and not (np.isfinite(mass) and mass > 0):
        raise ValueError(f"the simplex mass must be positive and finite, got {mass!r}")
    if start is not None and np.shape(start) != (n,):
        raise ValueError(f"the warm start must have shape ({n},) like g, got {np.shape(start)}; "
                         "pass the weights of the previous step or None")
    max_iter = 20 * n + 100 if max_iter is None else int(max_iter)
    if mass_bound is None:
        mass_bound = 0.0 if start is None else float(np.abs(np.asarray(start, float)).sum())
    solver = _ActiveSet(H, g, mass, rtol, atol, mass_bound)
    dense = _dense_path(H, g, mass, start, solver, max_iter)
    if dense is not None:
        return dense
    try:
        b, iterations = solver.run(start, max_iter)
    except np.linalg.LinAlgError:
        return projected_gradient_qp(H, g, mass, start, atol=atol, rtol=rtol, max_iter=max_iter,
                                     note="not positive definite on a face",
                                     mass_bound=mass_bound)
    objective = _objective(H, g, b)
    gap = frank_wolfe_gap(H @ b - g, b, mass, mass_bound)
    floor = roundoff_floor(H, g, b, mass, mass_bound)
    tolerance = max(solver.tolerance(objective), floor)
    status = "optimal" if gap <= tolerance else "max_iterations"
    if status != "optimal":  # round-off limited or out of iterations: polish from here
        polished = projected_gradient_qp(H, g, mass, b, atol=atol, rtol=rtol, max_iter=max_iter,
                                         note="active set ended above tolerance",
                                         mass_bound=mass_bound)
        if polished.gap < gap:
            return polished
    return QPSolution(b, objective, gap, iterations, status, "active_set",
                      {"support": int(np.count_nonzero(b)), "tolerance": tolerance,
                       "roundoff": floor})


def roundoff_floor(H, g, b, mass, mass_bound=0.0, Hb: np.ndarray | None = None) -> float:
    """The accuracy to which the gap of ``frank_wolfe_gap`` can be computed (ROUNDOFF_FACTOR);
    Hb: H @ b when the caller has it."""
    size = float(np.abs(H @ b if Hb is None else Hb).max() + np.abs(g).max())
    weight = mass if mass is not None else max(float(b.sum()), mass_bound)
    return ROUNDOFF_FACTOR * np.finfo(float).eps * weight * size


class _FaceFactor:
    """Cholesky factor of H on the current face (support order), updated as indices enter
    (one triangular solve, O(k^2)) and leave (the trailing block re-factored)."""

    def __init__(self, H: np.ndarray):
        self.H = H
        self.support = np.zeros(0, dtype=int)
        self.factor = np.zeros((0, 0))

    def reset(self, support: np.ndarray) -> None:
        self.support = np.array(support, dtype=int)
        block = self.H[np.ix_(self.support, self.support)]
        self.factor = np.linalg.cholesky(block) if self.support.size else np.zeros((0, 0))

    def append(self, indices: np.ndarray) -> None:
        """Add indices at the end: one blocked triangular solve and a small Cholesky."""
        indices = np.asarray(indices, dtype=int)
        k, m = self.support.size, indices.size
        columns = self.H[np.ix_(self.support, indices)]
        w = _triangular(self.factor, columns) if k else np.zeros((0, m))
        schur = self.H[np.ix_(indices, indices)] - w.T @ w
        factor = np.zeros((k + m, k + m))
        factor[:k, :k] = self.factor
        factor[k:, :k] = w.T
        factor[k:, k:] = np.linalg.cholesky(schur)  # LinAlgError: not positive definite
        self.factor = factor
        self.support = np.append(self.support, indices)

    def remove(self, leaving: np.ndarray) -> None:
        """Drop the positions where ``leaving`` (a mask over the support) is True."""
        first = int(np.argmax(leaving))
        keep = ~leaving
        head = self.factor[:first, :first]
        tail_rows = first + np.flatnonzero(keep[first:])
        coupling = self.factor[tail_rows, :first]
        tail = self.support[tail_rows]
        schur = self.H[np.ix_(tail, tail)] - coupling @ coupling.T
        k = first + tail.size
        factor = np.zeros((k, k))
        factor[:first, :first] = head
        factor[first:, :first] = coupling
        if tail.size:
            factor[first:, first:] = np.linalg.cholesky(schur)
        self.factor = factor
        self.support = self.support[keep]

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        return _triangular(self.factor, _triangular(self.factor, rhs), transpose=True)


def _triangular(lower: np.ndarray, rhs: np.ndarray, transpose: bool = False) -> np.ndarray:
    """Solve L x = rhs (or L^T x = rhs) with BLAS trsv / trsm directly (small systems, many
    calls). Not LAPACK's trtrs: OpenBLAS runs it on all threads whatever the size as soon as
    there are two right-hand sides, and on a busy machine each call then waited ~8 ms."""
    trans = 1 if transpose else 0
    if rhs.ndim == 1:
        return dtrsv(lower, rhs, lower=1, trans=trans)
    if rhs.shape[1] <= 2:  # trsm packs the whole factor: two trsv read it for half the time
        return np.column_stack([dtrsv(lower, column, lower=1, trans=trans) for column in rhs.T])
    return dtrsm(1.0, lower, rhs, lower=1, trans_a=trans)


class _ActiveSet:
    """Primal active-set method: feasible iterates, exact minima on faces {b_i = 0, i not in S}.

    Outer step: add the index with the most negative multiplier lambda_i = r_i - nu.
    Inner step: minimize on the face; if the minimizer z leaves the orthant, move from b
    towards z until the first weight hits zero and drop it (ratio test). Each face minimum
    strictly lowers the objective, so no face repeats and the method ends.
    """

    def __init__(self, H, g, mass, rtol, atol, mass_bound=0.0):
        self.H, self.g, self.mass = H, g, mass
        self.n = g.size
        self.rtol, self.atol = rtol, atol
        self.mass_bound = mass_bound
        self.face = _FaceFactor(H)

    def tolerance(self, objective: float) -> float:
        relative = self.rtol * max(abs(objective), 1e-300)
        return relative if self.atol is None else max(self.atol, relative)

    def face_minimum(self, support: np.ndarray) -> np.ndarray:
        """argmin on the face: H_SS z = g_S + nu 1 (sum(z) = mass); raises LinAlgError.

        ``support`` must be the factor's support (kept in step by the caller). One step of
        iterative refinement against H_SS follows (faces can be ill-conditioned)."""
        face = self.face
        g_S = self.g[support]
        H_SS = self.H[np.ix_(support, support)]
        if self.mass is None:
            z = face.solve(g_S)
            return z + face.solve(g_S - H_SS @ z)
        both = face.solve(np.column_stack([g_S, np.ones(support.size)]))
        z, ones = both[:, 0], both[:, 1]
        total = ones.sum()
        z = z + (self.mass - z.sum()) / total * ones
        residual = g_S - H_SS @ z
        correction = face.solve(residual - residual.mean())
        return z + correction - correction.sum() / total * ones

    def gradient(self, b: np.ndarray, support: np.ndarray) -> np.ndarray:
        """r = H b - g using only the rows of the support (H symmetric): O(n |S|)."""
        if support.size == 0:
            return -self.g.copy()
        # einsum's own loop, not a BLAS call: OpenBLAS threads this (k, n) product, which on a
        # shared machine was up to 10x slower than one core (see kernels.SINGLE_THREAD_WORK)
        return np.einsum("i,ij->j", b[support], self.H[support]) - self.g

    def start(self, start):
        n, mass = self.n, self.mass
        if start is not None:
            b = project_feasible(np.asarray(start, dtype=float), mass)
            support = np.flatnonzero(b > 0)
            if 0 < support.size <= max(WARM_START_FRACTION * n, 1):
                self.face.reset(support)
                return b, support
            if support.size and n <= DENSE_FACE_MAX:
                self.face.reset(support)
                z = self.face_minimum(support)  # dense warm start: its face, if feasible
                if np.all(z > 0):
                    b = np.zeros(n)
                    b[support] = z
                    return b, support
        b = np.zeros(n)
        if mass is None:
            self.face.reset(np.zeros(0, dtype=int))
            return b, np.zeros(0, dtype=int)
        vertex = int(np.argmin(0.5 * mass * mass * self.H.diagonal() - mass * self.g))
        b[vertex] = mass
        self.face.reset(np.array([vertex]))
        return b, np.array([vertex])

    def run(self, start, max_iter):
        b, support = self.start(start)
        excluded: set[int] = set()
        # a warm start's weights need not be the minimum of their face: settle them first,
        # since the outer step below only looks at indices off the face
        support, iterations, _ = self.settle(b, None, excluded, 0, max_iter)
        block = 1  # indices entering per outer step: doubles while no index has to leave
        while iterations < max_iter:
            r = self.gradient(b, support)
            objective = 0.5 * float(b @ r) - 0.5 * float(self.g @ b)  # 1/2 b^T H b - g^T b
            low = float(r.min())
            if self.mass is None:
                gap = float(r @ b) - max(float(b.sum()), self.mass_bound) * min(low, 0.0)
            else:
                gap = float(r @ b) - self.mass * low
            if gap <= self.tolerance(objective):
                break
            nu = 0.0
            if self.mass is not None and support.size:
                nu = float(b[support] @ r[support] / b[support].sum())
            multipliers = r - nu
            multipliers[support] = np.inf
            if excluded:
                multipliers[list(excluded)] = np.inf
            roundoff = ACTIVE_SET_ROUNDOFF * max(float(np.abs(r).max()), abs(nu), 1e-300)
            candidates = np.flatnonzero(multipliers < -roundoff)
            if candidates.size == 0:
                break  # optimal up to round-off
            if candidates.size > block:
                candidates = candidates[np.argpartition(multipliers[candidates], block - 1)[:block]]
            entering = int(candidates[np.argmin(multipliers[candidates])])
            self.face.append(candidates)
            support, iterations, removed = self.settle(b, entering, excluded, iterations, max_iter)
            block = 1 if removed else 2 * block
        return b, iterations

    def settle(self, b, entering, excluded, iterations, max_iter):
        """Inner loop: move b (in place) to the minimum of its face inside the orthant,
        dropping the weights that hit zero on the way. Returns (support, iterations,
        whether an index left)."""
        support = self.face.support
        removed = False
        while support.size and iterations < max_iter:
            iterations += 1
            z = self.face_minimum(support)
            current = b[support]
            small = ACTIVE_SET_ROUNDOFF * max(float(current.max(initial=0.0)), 1e-300)
            if np.all(z > -small):
                b[support] = np.maximum(z, 0.0)
                excluded.clear()
                break
            blocking = z <= -small
            ratios = current[blocking] / (current[blocking] - z[blocking])
            step = float(ratios.min())
            moved = current + step * (z - current)
            leaving = np.zeros(support.size, dtype=bool)
            leaving[np.flatnonzero(blocking)[ratios <= step * (1 + 1e-12)]] = True
            leaving |= moved <= 0
            removed = True
            if step == 0.0 and entering in support[leaving]:
                excluded.add(entering)  # degenerate: the new index cannot enter here
            b[support] = np.where(leaving, 0.0, moved)
            self.face.remove(leaving)
            support = self.face.support
        if self.mass is not None and support.size:  # exact mass (round-off only)
            b[support] *= self.mass / b[support].sum()
        return support, iterations, removed


# -------------------------------------------------------------------------------------------------
# The dense path: a primal-dual active set in the range space of one factorization of H
# -------------------------------------------------------------------------------------------------

class _DenseInverse:
    """H^{-1} through one Cholesky factorization of the whole H (LAPACK potrf): its action on
    vectors, and its columns on demand (two triangular solves each), or the whole inverse
    (LAPACK potri, formed once) when more than INVERSE_COLUMN_FRACTION of them are needed.
    A positive semidefinite H that is singular to working precision is factored with a shift of
    its round-off size (ROUNDOFF_FACTOR eps max H_ii): the certificate, computed with H itself,
    says whether the point found is still the minimum."""

    def __init__(self, H: np.ndarray):
        # H is symmetric, so H.T is the Fortran-ordered copy LAPACK wants without a transpose
        factor, info = lapack.dpotrf(H.T, lower=1, clean=0)  # only the lower triangle is read
        if info != 0:  # singular to working precision (duplicate points, no ridge): shift it
            shift = ROUNDOFF_FACTOR * np.finfo(float).eps * float(np.abs(H.diagonal()).max())
            factor, info = lapack.dpotrf(H.T + shift * np.eye(H.shape[0]), lower=1, clean=0)
        if info != 0:
            raise np.linalg.LinAlgError(f"H is not positive definite (potrf info {info})")
        self.factor = factor
        self.n = H.shape[0]
        self.lower_inverse: np.ndarray | None = None  # lower triangle of H^{-1}
        self.cache: dict[int, np.ndarray] = {}
        # rows (L^{-1} e_i)^T of the indices met so far (slot[i] >= 0), and their Gram matrix
        self.slot = np.full(self.n, -1)
        self.count = 0
        self.unit_rows = np.zeros((0, self.n))
        self.unit_gram = np.zeros((0, 0))
        self.products_of: np.ndarray | None = None  # the forward of ``unit_products``
        self.products = np.zeros((0, 0))

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """H^{-1} rhs for rhs: (n, k)."""
        return _triangular(self.factor, _triangular(self.factor, rhs), transpose=True)

    def forward(self, rhs: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
        """L^{-1} rhs (H = L L^T) for rhs: (n,) or (n, k), by blocks of FORWARD_BLOCK rows: a
        triangular solve on the diagonal block and one product with the rows below, so that the
        factor is read once for all k columns (trsv reads it once a column, trsm packs it whole).
        starts: (k,) ascending, column j of rhs vanishing above row starts[j] (a unit vector
        e_i: starts = i), whose solution vanishes there too: it enters at its block."""
        if rhs.ndim == 1 or self.n <= FORWARD_BLOCK or (starts is None and rhs.shape[1] <= 2):
            return _triangular(self.factor, rhs)  # one or two trsv: as fast (measured)
        x = np.array(rhs, dtype=float, order="F")
        k = x.shape[1]
        first = 0 if starts is None else int(starts[0]) // FORWARD_BLOCK * FORWARD_BLOCK
        for begin in range(first, self.n, FORWARD_BLOCK):
            end = min(begin + FORWARD_BLOCK, self.n)
            m = k if starts is None else int(np.searchsorted(starts, end))  # columns begun
            block = self.factor[begin:end, begin:end]
            x[begin:end, :m] = dtrsm(1.0, block, x[begin:end, :m], lower=1)
            if end < self.n:
                x[end:, :m] -= self.factor[end:, begin:end] @ x[begin:end, :m]
        return x

    def backward(self, rhs: np.ndarray) -> np.ndarray:
        """L^{-T} rhs."""
        return _triangular(self.factor, rhs, transpose=True)

    def unit_slots(self, indices: np.ndarray) -> np.ndarray:
        """Rows of ``unit_rows`` (and of ``unit_gram``, (H^{-1})_ij = (L^{-1} e_i)^T L^{-1} e_j)
        holding the indices; the new ones in one forward solve."""
        new = np.unique(indices[self.slot[indices] < 0])
        if new.size:
            old = self.count
            self._reserve(old + new.size)
            self.count += new.size
            unit = np.zeros((self.n, new.size))
            unit[new, np.arange(new.size)] = 1.0
            self.unit_rows[old:self.count] = self.forward(unit, starts=new).T
            self.slot[new] = np.arange(old, self.count)
            new_rows = self.unit_rows[old:self.count]
            self.unit_gram[:self.count, old:self.count] = self.unit_rows[:self.count] @ new_rows.T
            self.unit_gram[old:self.count, :old] = self.unit_gram[:old, old:self.count].T
        return self.slot[indices]

    def unit_products(self, forward: np.ndarray) -> np.ndarray:
        """(count, k) = W forward for all the rows kept (W = ``unit_rows``), computed for the
        rows added since the last call with the same ``forward``."""
        if self.products_of is not forward:
            self.products_of, self.products = forward, np.zeros((0, forward.shape[1]))
        done = self.products.shape[0]
        if done < self.count:
            self.products = np.vstack([self.products, self.unit_rows[done:self.count] @ forward])
        return self.products

    def _reserve(self, size: int) -> None:
        """Room for ``size`` rows in ``unit_rows`` and ``unit_gram`` (doubling)."""
        if size <= self.unit_rows.shape[0]:
            return
        capacity = min(self.n, max(size, 2 * self.unit_rows.shape[0], 16))
        rows, gram = np.zeros((capacity, self.n)), np.zeros((capacity, capacity))
        rows[:self.count] = self.unit_rows[:self.count]
        gram[:self.count, :self.count] = self.unit_gram[:self.count, :self.count]
        self.unit_rows, self.unit_gram = rows, gram

    def columns(self, indices: np.ndarray) -> np.ndarray:
        """H^{-1}[:, indices]: (n, k). Columns are kept: the zero sets of consecutive
        iterations share most of their indices."""
        missing = np.array([i for i in indices.tolist() if i not in self.cache], dtype=int)
        if missing.size and self.lower_inverse is None and \
                len(self.cache) + missing.size > INVERSE_COLUMN_FRACTION * self.n:
            inverse, info = lapack.dpotri(self.factor, lower=1)
            if info != 0:
                raise np.linalg.LinAlgError(f"singular Cholesky factor (potri info {info})")
            self.lower_inverse = inverse
        if missing.size and self.lower_inverse is not None:
            # column i: rows j >= i from column i of the lower triangle, rows j < i from its row i
            below = np.arange(self.n)[:, None] >= missing[None, :]
            found = np.where(below, self.lower_inverse[:, missing], self.lower_inverse[missing].T)
        elif missing.size:
            unit = np.zeros((self.n, missing.size))
            unit[missing, np.arange(missing.size)] = 1.0
            found = self.solve(unit)
        for column, index in zip(found.T if missing.size else (), missing.tolist(), strict=True):
            self.cache[index] = column
        if not indices.size:
            return np.zeros((self.n, 0))
        return np.array([self.cache[i] for i in indices.tolist()]).T


def _range_space_face(inverse: _DenseInverse, forward: np.ndarray, zero: np.ndarray, mass):
    """Minimum z of 1/2 b^T H b - g^T b on the face {b_zero = 0} (and sum(b) = mass).

    With the constraints C^T b = d, C = [E_zero, 1], d = (0, mass), the minimizer is
    z = H^{-1} (g + C lam) where C^T H^{-1} C lam = d - C^T H^{-1} g: a system of the size of the
    zero set. With H = L L^T and W = L^{-1} E_zero (``unit_slots``) its blocks are W^T W,
    W^T L^{-1} [g, 1] and 1^T H^{-1} [g, 1], and z = L^{-T} L^{-1} (g + C lam) is one backward
    solve. forward: (n, 1 or 2) = L^{-1} [g, 1]. Returns z and lam_zero, the multipliers of
    b_zero >= 0 (r_i - nu for r = H z - g; all >= 0 at the minimum over the feasible set).
    """
    slots = inverse.unit_slots(zero)
    system = inverse.unit_gram[np.ix_(slots, slots)]
    products = inverse.unit_products(forward)[slots]  # (H^{-1} g)_zero and (H^{-1} 1)_zero
    rhs = -products[:, 0]
    if mass is not None:
        ones = forward[:, 1]
        system = np.block([[system, products[:, 1:]], [products[:, 1][None], ones @ ones]])
        rhs = np.append(rhs, mass - float(ones @ forward[:, 0]))
    lam = np.linalg.solve(system, rhs) if rhs.size else rhs
    coefficients = np.zeros(inverse.count)
    coefficients[slots] = lam[:zero.size]
    y = forward[:, 0] + coefficients @ inverse.unit_rows[:inverse.count]  # + W lam_zero
    if mass is not None:
        y += lam[-1] * forward[:, 1]
    z = inverse.backward(y)
    z[zero] = 0.0
    return z, lam[:zero.size]


def _dense_active_set(H: np.ndarray, g: np.ndarray, mass, start: np.ndarray, max_iter: int,
                      solver: _ActiveSet | None = None):
    """The primal-dual active set (Hintermueller-Ito-Kunisch) on the zero set of the weights,
    each face minimum from one factorization of the whole H (``_range_space_face``).

    From the zeros of ``start``, each iteration exchanges every infeasible index at once: a zero
    whose multiplier is negative is released, a weight that the face minimum makes negative is
    set to zero. The count therefore does not grow with the support (a handful of iterations on
    kernel steps whose minimizer is dense). It ends when nothing is infeasible (z >= 0 and the
    multipliers >= 0: the KKT point). Returns (inverse, forward, found): the factorization,
    L^{-1} [g, 1] (H = L L^T), and found = (b, iterations), (b, iterations, "interior_point")
    from ``_interior_point``, or None when it gives up on a sparse minimizer
    (PDAS_FIRST_ZERO_FRACTION, PDAS_MAX_ZERO_FRACTION: the active set grown from a vertex is
    the fast path there). A repeated zero set or PDAS_MAX_ITER iterations (the iteration can
    cycle on ill-conditioned programs) hand over to ``_reduced_dual``, or from INTERIOR_MIN_SIZE
    points (with ``solver``, for its tolerance) to ``_interior_point``. Raises LinAlgError when
    H is not positive definite.
    """
    n = g.size
    inverse = _DenseInverse(H)
    forward = inverse.forward(g[:, None] if mass is None else np.column_stack([g, np.ones(n)]))
    finish_inside = solver is not None and n >= INTERIOR_MIN_SIZE
    found = _primal_dual_iteration(inverse, forward, mass, start, max_iter, dual=not finish_inside)
    if found is not None and found[0] is None:  # not converged: the interior point finishes
        interior = _interior_point(H, g, mass, solver)
        found = None if interior is None else (interior[0], found[1] + interior[1],
                                                 "interior_point")
    return inverse, forward, found


def _primal_dual_iteration(inverse: _DenseInverse, forward: np.ndarray, mass, start, max_iter,
                           dual: bool = True):
    """The iteration of ``_dense_active_set``: (b, iterations) or None; when it does not
    converge and ``dual`` is False, (None, iterations) instead of ``_reduced_dual``."""
    n = forward.shape[0]
    zero = np.flatnonzero(start <= 0)
    seen: set[bytes] = set()
    touched = np.zeros(n, dtype=bool)
    iteration = 0
    for iteration in range(1, min(max_iter, PDAS_MAX_ITER) + 1):  # noqa: B007 - reported below
        z, lam = _range_space_face(inverse, forward, zero, mass)
        infeasible = z < -ACTIVE_SET_ROUNDOFF * max(float(np.abs(z).max()), 1e-300)
        if iteration == 1 and np.count_nonzero(infeasible) > PDAS_FIRST_ZERO_FRACTION * n:
            return None
        infeasible[zero] = lam < -ACTIVE_SET_ROUNDOFF * max(float(np.abs(lam).max(initial=0.0)),
                                                              1e-300)
        if not infeasible.any():
            return _feasible(z, mass), iteration
        in_zero = np.zeros(n, dtype=bool)
        in_zero[zero] = True
        zero = np.flatnonzero(in_zero ^ infeasible)
        touched[zero] = True
        if zero.size > PDAS_MAX_ZERO_FRACTION * n:
            return None
        if zero.tobytes() in seen:
            break
        seen.add(zero.tobytes())
    if not dual:
        return None, iteration
    found = _reduced_dual(inverse, inverse.backward(forward), mass, touched)
    return None if found is None else (found[0], iteration + found[1])


def _interior_point(H, g, mass, solver):
    """Mehrotra's predictor-corrector interior-point method on the QP: (b, steps) with b > 0 and
    its certified gap (``frank_wolfe_gap``) within the tolerance of ``solver``, or None
    (INTERIOR_MAX_ITER steps, or H + diag not positive definite).

    Newton steps on H b - g - nu 1 - s = 0, 1^T b = M (the simplex; no nu on the orthant),
    b_i s_i = t, b, s > 0: with r_d = s + nu 1 - (H b - g), one Cholesky factorization of
    H + diag(s / b) a step solves (H + diag(s / b)) db - dnu 1 = r_d + c / b, 1^T db = M - 1^T b,
    ds = (c - s db) / b for the predictor (c = -b s) and the corrector
    (c = sigma mu - b s - db_aff ds_aff, sigma = (mu_aff / mu)^3, mu = b^T s / n). It starts
    from the uniform weights of mass M (on the orthant, that of ``solver.mass_bound``, or 1),
    s = r - min r + delta (the simplex: dual feasible) or max(r, 0) + delta (the orthant),
    delta = 1e-3 max|r|, and ends when the certificate of the current point is met."""
    n = g.size
    total = mass if mass is not None else (solver.mass_bound or 1.0)
    b = np.full(n, total / n)
    r = H @ b - g
    delta = max(1e-3 * float(np.abs(r).max()), 1e-300)
    nu = 0.0 if mass is None else float(r.min()) - delta
    s = np.maximum(r, 0.0) + delta if mass is None else r - nu
    matrix = np.empty((n, n), order="F")
    for step in range(INTERIOR_MAX_ITER + 1):
        Hb = H @ b
        r = Hb - g
        objective = 0.5 * float(b @ r) - 0.5 * float(g @ b)
        tolerance = max(solver.tolerance(objective),
                        roundoff_floor(H, g, b, mass, solver.mass_bound, Hb))
        if frank_wolfe_gap(r, b, mass, solver.mass_bound) <= tolerance:
            return _feasible(b, mass), step  # the exact mass (round-off only)
        if step == INTERIOR_MAX_ITER:
            return None
        matrix[:] = H.T  # H symmetric: its Fortran-ordered copy
        matrix[np.diag_indices(n)] += s / b
        factor, info = lapack.dpotrf(matrix, lower=1, clean=0, overwrite_a=1)
        if info != 0:
            return None
        residual = s + nu - r
        primal = None if mass is None else mass - float(b.sum())
        mu = float(b @ s) / n
        db, dnu, ds = _newton_direction(factor, b, s, residual, -b * s, primal)
        affine = float((b + _to_boundary(b, db) * db) @ (s + _to_boundary(s, ds) * ds)) / n
        centred = (affine / mu) ** 3 * mu - b * s - db * ds
        db, dnu, ds = _newton_direction(factor, b, s, residual, centred, primal)
        b = b + INTERIOR_STEP * _to_boundary(b, db) * db
        dual_step = INTERIOR_STEP * _to_boundary(s, ds)
        nu, s = nu + dual_step * dnu, s + dual_step * ds
    return None


def _newton_direction(factor, b, s, residual, complementarity, primal):
    """(db, dnu, ds) of ``_interior_point`` from the Cholesky factor of H + diag(s / b);
    primal: M - 1^T b on the simplex, None on the orthant (no nu)."""
    rhs = residual + complementarity / b
    if primal is None:
        db, dnu = lapack.dpotrs(factor, rhs, lower=1)[0], 0.0
    else:
        both = lapack.dpotrs(factor, np.column_stack([rhs, np.ones(b.size)]), lower=1)[0]
        dnu = (primal - float(both[:, 0].sum())) / float(both[:, 1].sum())
        db = both[:, 0] + dnu * both[:, 1]
    return db, dnu, (complementarity - s * db) / b


def _to_boundary(x: np.ndarray, dx: np.ndarray) -> float:
    """The largest step in [0, 1] with x + step dx >= 0 (x > 0)."""
    shrinking = dx < 0
    return min(1.0, float((-x[shrinking] / dx[shrinking]).min())) if shrinking.any() else 1.0


def _feasible(z: np.ndarray, mass) -> np.ndarray:
    """max(z, 0), rescaled to the mass on the simplex (z has a positive entry there)."""
    b = np.maximum(z, 0.0)
    return b if mass is None else b * (mass / b.sum())


def _reduced_dual(inverse: _DenseInverse, base: np.ndarray, mass, uncertain: np.ndarray):
    """The QP when only the weights of ``uncertain`` (a mask) can vanish, by its dual, solved
    with the active set of ``_ActiveSet`` (monotone, finite: the fallback when the primal-dual
    iteration cycles).

    With b_U >= 0 the only bounds (U = uncertain) and multipliers mu >= 0 for them,
    b = H^{-1} (g + nu 1 + E_U mu); eliminating nu with sum(b) = mass leaves the linear
    complementarity problem b_U = q + M mu >= 0, mu >= 0, mu^T b_U = 0 with M the Schur
    complement (H^{-1})_UU - c c^T / s (c = (H^{-1} 1)_U, s = 1^T H^{-1} 1) positive definite:
    the orthant QP min 1/2 mu^T M mu + q^T mu. A weight outside U that comes out negative joins
    U and the dual is solved again. Returns (b, iterations of the dual), or None.
    """
    iterations = 0
    for _ in range(PDAS_DUAL_ROUNDS):
        U = np.flatnonzero(uncertain)
        V = inverse.columns(U)
        M, q = V[U], base[U, 0].copy()
        shift = 0.0
        if mass is not None:
            total, c = float(base[:, 1].sum()), base[U, 1]
            M = M - np.outer(c, c) / total
            shift = (mass - float(base[:, 0].sum())) / total
            q += shift * c
        # no mass bound on mu: the method runs to round-off (its own gap is not the certificate)
        dual = _ActiveSet(0.5 * (M + M.T), -q, None, 0.0, 0.0, mass_bound=UNBOUNDED)
        mu, count = dual.run(None, 20 * U.size + 100)
        iterations += count
        b = base[:, 0] + V @ mu
        if mass is not None:
            b += (shift - float(c @ mu) / total) * base[:, 1]
        b[U[mu > 0]] = 0.0
        negative = b < -ACTIVE_SET_ROUNDOFF * max(float(np.abs(b).max()), 1e-300)
        if not negative.any():
            return _feasible(b, mass), iterations
        uncertain = uncertain | negative
    return None


# -------------------------------------------------------------------------------------------------
# The low-rank path: the dense path's iteration with faces solved by conjugate gradients on H,
# preconditioned by a pivoted Cholesky (Nystrom) factor of H minus its ridge
# -------------------------------------------------------------------------------------------------

def _pivoted_cholesky(H: np.ndarray, shift: float, done, max_rank: int,
                      pivots: np.ndarray | None = None, target: float | None = None):
    """Greedy pivoted Cholesky of A = H - shift I: rows F (k, n) with A ~ F^T F, the residual
    (Schur complement) diagonal d and the pivots. ``pivots`` are taken first (their rows in one
    blocked solve); then the largest residual diagonal is pivoted (from panels of the rows of
    the LOWRANK_BLOCK largest, see ``_panel_pivots``) until done(d off the
    pivots) is true. None when max_rank rows do not get there (H is not numerically low rank
    plus a ridge) or the residual is not positive definite; with a ``target`` for max d, also
    once a quarter of max_rank rows are taken and a geometric decay of max d at the rate seen so
    far (faster than a Gaussian Gram's) would need more than max_rank rows to get to it."""
    n = H.shape[0]
    d = H.diagonal() - shift
    rows = np.empty((max_rank, n))
    taken = np.zeros(n, dtype=bool)
    k = 0
    if pivots is not None and pivots.size:
        block = H[pivots]
        block[np.arange(pivots.size), pivots] -= shift
        factor, info = lapack.dpotrf(block[:, pivots], lower=0)  # A_PP = U^T U
        if info != 0:
            return None
        k = pivots.size
        rows[:k] = dtrsm(1.0, factor, block, lower=0, trans_a=1)  # U^{-T} A_P.
        d = d - np.einsum("ij,ij->j", rows[:k], rows[:k])
        taken[pivots] = True
    initial = float(d.max())
    while not done(d[~taken]):
        largest = float(d[~taken].max())
        if target is not None and 4 * k >= max_rank and largest < initial and \
                k * np.log(target / initial) / np.log(largest / initial) > max_rank:
            return None
        size = min(LOWRANK_BLOCK, max_rank - k, n - k)
        if size <= 0:
            return None
        candidates = np.argpartition(np.where(taken, np.inf, -d), size - 1)[:size]
        panel = H[candidates] - rows[:k, candidates].T @ rows[:k]  # residual rows (size, n)
        panel[np.arange(size), candidates] -= shift
        d[candidates] = panel[np.arange(size), candidates]  # the updated d drifts: resynchronized
        outside = np.where(taken, -np.inf, d)
        outside[candidates] = -np.inf
        order = _panel_pivots(panel[:, candidates], 0.5 * float(outside.max(initial=0.0)))
        if order is None:
            return None
        factor, info = lapack.dpotrf(panel[np.ix_(order, candidates[order])], lower=1)
        if info != 0:
            return None
        new = dtrsm(1.0, factor, panel[order], lower=1)  # the rows of the pivots taken in order
        rows[k:k + order.size] = new
        k += order.size
        taken[candidates[order]] = True
        d -= np.einsum("ij,ij->j", new, new)
    return rows[:k].copy(), d, np.flatnonzero(taken)  # a copy: the max_rank buffer is freed


def _panel_pivots(block: np.ndarray, floor: float) -> np.ndarray | None:
    """Pivot order within a panel: greedy pivoted Cholesky of its (size, size) residual block
    while the pivot stays above ``floor`` (half the largest residual diagonal outside the panel,
    so that the pivots are those of the greedy order to a factor 2) and above LOWRANK_PANEL_RATIO
    of the panel's first pivot (the factor of the pivots' block stays well conditioned); None
    when the largest diagonal is not positive."""
    block = block.copy()
    if not block.diagonal().max() > 0:  # the residual is not positive definite
        return None
    order: list[int] = []
    first = 0.0
    for _ in range(block.shape[0]):
        diagonal = block.diagonal().copy()
        diagonal[order] = -np.inf
        best = int(np.argmax(diagonal))
        if order and diagonal[best] < max(floor, LOWRANK_PANEL_RATIO * first):
            break  # no longer among the largest, or too small against the panel to factor well
        first = diagonal[best] if not order else first
        order.append(best)
        block -= np.outer(block[:, best], block[best]) / diagonal[best]
    return np.array(order, dtype=int)


class _LowRankFaces:
    """Solves of H on faces {b_Z = 0} by preconditioned conjugate gradients (H times a vector per
    iteration, all rows, so the multipliers on Z come with it), preconditioned by
    P = F^T F + mu I (``_pivoted_cholesky`` of H - mu I, mu the ridge found on its diagonal), so
    that P^{-1} H has eigenvalues near 1 (H - P is the residual of the factorization). On a face,
    P_SS^{-1} v = (v - F_S^T C^{-1} F_S v) / mu with C = mu I + F_S F_S^T (Woodbury, k x k)."""

    def __init__(self, H: np.ndarray, rows: np.ndarray, shift: float):
        self.H, self.rows, self.shift = H, rows, shift
        self.gram = rows @ rows.T
        self.diagonal = H.diagonal().copy()
        self.exact = True  # products with H (else with P)
        self.capacitance: np.ndarray | None = None
        self.matvecs = 0

    def set_face(self, zero: np.ndarray) -> None:
        zero_rows = self.rows[:, zero]
        C = self.gram - zero_rows @ zero_rows.T
        C[np.diag_indices_from(C)] += self.shift
        factor, info = lapack.dpotrf(C, lower=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"capacitance matrix not positive definite (info {info})")
        self.capacitance = factor
        self.free = np.ones(self.H.shape[0], dtype=bool)
        self.free[zero] = False

    def precondition(self, R: np.ndarray) -> np.ndarray:
        coefficients = lapack.dpotrs(self.capacitance, self.rows @ R, lower=1)[0]
        out = (R - self.rows.T @ coefficients) / self.shift
        out[~self.free] = 0.0
        return out

    def product(self, X: np.ndarray) -> np.ndarray:
        """H X (``exact``), else P X = F^T (F X) + mu X (O(n k): the surrogate program)."""
        if not self.exact:
            return self.rows.T @ (self.rows @ X) + self.shift * X
        self.matvecs += 1
        return self.H @ X


def _conjugate_gradients(faces: _LowRankFaces, rhs: np.ndarray, X: np.ndarray, g: np.ndarray, mass,
                         accuracy):
    """Minimum of 1/2 b^T H b - g^T b on the face of ``faces`` (and sum(b) = mass) by block PCG
    on H_SS [x, y] = [g_S, 1_S] (y only on the simplex), z = x + nu y with sum(z) = mass.

    rhs: (n, 1 or 2) = [g, 1]; X: (n, 1 or 2) start, zero off the face. Stops when the face's
    KKT residual rho = (H z - g - nu)_S is at most accuracy(z, r) (the certificate is then met:
    see ``_lowrank_active_set``). Returns (z, r = H z - g, nu, X) or None after LOWRANK_CG_MAX
    iterations. The residuals are updated by the recurrence; the certificate recomputes them."""
    free = faces.free
    if not X.any():  # a cold start: the preconditioner's own solution
        X = faces.precondition(np.where(free[:, None], rhs, 0.0))
    HX = faces.product(X)
    R = np.where(free[:, None], rhs - HX, 0.0)
    direction, previous = None, None
    for _ in range(LOWRANK_CG_MAX + 1):
        nu = 0.0 if mass is None else (mass - X[:, 0].sum()) / X[:, 1].sum()
        rho = R[:, 0] if mass is None else R[:, 0] + nu * R[:, 1]
        z = X[:, 0] if mass is None else X[:, 0] + nu * X[:, 1]
        r = HX[:, 0] - g if mass is None else HX[:, 0] + nu * HX[:, 1] - g
        if float(np.abs(rho).max()) <= accuracy(z, r):
            return z, r, nu, X
        Z = faces.precondition(R)
        current = np.einsum("ij,ij->j", R, Z)
        direction = Z if direction is None else Z + (current / previous) * direction
        previous = current
        Q = faces.product(direction)
        curvature = np.einsum("ij,ij->j", direction, Q)
        alpha = np.divide(current, curvature, out=np.zeros_like(current), where=curvature > 0)
        X = X + alpha * direction
        HX += alpha * Q
        R -= alpha * np.where(free[:, None], Q, 0.0)
    return None


def _lowrank_preconditioner(H: np.ndarray) -> _LowRankFaces | None:
    """``_LowRankFaces`` for H when it is numerically low rank plus a ridge, else None.

    Three passes of ``_pivoted_cholesky``. The first, on H, until the residual diagonal is below
    LOWRANK_RESOLVE of the largest diagonal: the smallest residual diagonal left, m, is then
    about the ridge (at most twice it). The second, on H - m / 2 I (definite) from the same
    pivots, until the residual diagonal is flat (max d - min d <= LOWRANK_FLAT (m / 2 + min d)):
    what is left is the ridge mu = m / 2 + min d, to LOWRANK_FLAT of it. Its pivots near the end
    are mostly ridge (a pivot of a shifted matrix carries what is left of the shift), so the
    third pass, from the first pivots again, factors H - (1 - LOWRANK_FLAT) mu I, whose residual
    is the low-rank part alone, until it is flat to LOWRANK_FLAT mu: P = F^T F + mu I then
    differs from H by little against its ridge (the second pass's rows if the third fails)."""
    n = H.shape[0]
    max_rank = int(min(LOWRANK_MAX_FRACTION * n, n * n / LOWRANK_RANK_SCALE))
    resolved = LOWRANK_RESOLVE * float(H.diagonal().max())
    if _probe_rank(H, max_rank, resolved) * PROBE_FACTOR > max_rank:
        return None
    first = _pivoted_cholesky(H, 0.0, lambda d: d.size == 0 or d.max() <= resolved, max_rank,
                              target=resolved)
    if first is None or first[2].size == n:
        return None
    _, d, pivots = first
    shift = 0.5 * float(np.delete(d, pivots).min())
    if not shift > 0:
        return None
    second = _pivoted_cholesky(
        H, shift, lambda d: d.size == 0 or d.max() - d.min() <= LOWRANK_FLAT * (shift + d.min()),
        max_rank, pivots)
    if second is None or second[2].size == n:
        return None
    ridge = shift + float(np.delete(second[1], second[2]).min())
    third = _pivoted_cholesky(  # again from the first pivots, the shift now just under the ridge
        H, (1.0 - LOWRANK_FLAT) * ridge,
        lambda d: d.size == 0 or d.max() - d.min() <= LOWRANK_FLAT * ridge, max_rank, pivots)
    rows, d, pivots = second if third is None or third[2].size == n else third
    return _LowRankFaces(H, rows, ridge)


def _probe_rank(H: np.ndarray, max_rank: int, resolved: float) -> int:
    """Rank of LAPACK's pivoted Cholesky (pstrf) of H at PROBE_FACTOR * max_rank indices in
    PROBE_CHUNKS runs spread evenly over 0..n-1, stopped at pivots below ``resolved``
    (PROBE_FACTOR); 0 (no probe) when that block would be larger than PROBE_MAX or than H."""
    n = H.shape[0]
    size = PROBE_FACTOR * max_rank
    if size > min(PROBE_MAX, n):
        return 0
    # PROBE_CHUNKS runs of consecutive indices: a few cache lines a row, not one an entry
    length = -(-size // PROBE_CHUNKS)
    starts = np.linspace(0, n - length, PROBE_CHUNKS).round().astype(int)
    spread = np.unique((starts[:, None] + np.arange(length)).ravel())
    block = H[spread][:, spread]  # rows, then columns: half the time of H[np.ix_(spread, spread)]
    _, _, rank, info = lapack.dpstrf(block, tol=resolved, lower=1)
    return int(rank) if info >= 0 else 0


def _lowrank_active_set(faces: _LowRankFaces, g: np.ndarray, mass, start: np.ndarray, solver):
    """The primal-dual active set of ``_primal_dual_iteration`` with each face minimum from
    ``_conjugate_gradients`` (warm-started from the last face): one face on H from the zeros of
    the start; if it is not the minimum, the exchanges on the program with P = F^T F + mu I in
    place of H (its products cost O(n k), and P^{-1} is exact for it), then on H from the zero
    set found, so that most exchanges cost no product with H. Returns
    (b, iterations), "sparse" when the first face minimum is negative on more than
    PDAS_FIRST_ZERO_FRACTION of the weights, or None (cycling, too many zeros, CG not converged:
    the dense path takes over).

    CG stops when the face residual rho is at most tolerance / (8 B), B the mass (the orthant:
    max(sum(z), mass_bound)): at a KKT point z >= 0, r_Z - nu >= 0, the certified gap is then at
    most 2 B max|rho| (``frank_wolfe_gap``), a quarter of the tolerance."""
    n = g.size
    rhs = g[:, None] if mass is None else np.column_stack([g, np.ones(n)])

    def accuracy(z, r):
        weight = mass if mass is not None else max(float(np.maximum(z, 0).sum()), solver.mass_bound)
        objective = 0.5 * float(z @ r) - 0.5 * float(g @ z)
        floor = ROUNDOFF_FACTOR * np.finfo(float).eps * weight * float(np.abs(r + g).max()
                                                                        + np.abs(g).max())
        return max(solver.tolerance(objective), floor) / (8.0 * weight)

    faces.exact = True  # the first face on H: often the minimum already (sigma 10)
    found = _face_exchanges(faces, rhs, np.zeros_like(rhs), np.flatnonzero(start <= 0), g, mass,
                            accuracy, most=1)
    if found is None or found == "sparse" or found[0] is not None:
        return found if found is None or found == "sparse" else (found[0], 1)
    _, zero, X, _ = found
    faces.exact = False
    surrogate = None
    for begin in (np.flatnonzero(start <= 0), zero):  # from the start, or the first exchange
        surrogate = _face_exchanges(faces, rhs, X.copy(), begin, g, mass, accuracy)
        if surrogate is not None:
            _, zero, X, _ = surrogate
            break
    faces.exact = True
    found = _face_exchanges(faces, rhs, X, zero, g, mass, accuracy)
    if found is None:
        return None
    return found[0], 1 + found[3] + (0 if surrogate is None else surrogate[3])


def _face_exchanges(faces: _LowRankFaces, rhs, X, zero, g, mass, accuracy,
                    most: int = LOWRANK_PDAS_MAX):
    """The iteration of ``_lowrank_active_set`` from the zero set ``zero`` (X: the warm start of
    CG): (b, zero set, X, iterations); with most = 1, (None, next zero set, X, 1) when the first
    face is not the minimum, or "sparse" (PDAS_FIRST_ZERO_FRACTION); None when it gives up."""
    n = g.size
    seen: set[bytes] = set()
    exchange = _Exchange(n)
    for iteration in range(1, most + 1):
        faces.set_face(zero)
        X[zero] = 0.0
        found = _conjugate_gradients(faces, rhs, X, g, mass, accuracy)
        if found is None:
            return None
        z, r, nu, X = found
        # violations in units of the gradient; those below the accuracy of the face minimum
        # change the certified gap by less than it and are noise of the inexact solve
        violation = -z * faces.diagonal
        violation[zero] = -(r[zero] - nu)
        violation[violation <= accuracy(z, r)] = 0.0
        if most == 1 and np.count_nonzero(violation) > PDAS_FIRST_ZERO_FRACTION * n:
            return "sparse"
        if not violation.any():
            z[zero] = 0.0
            return _feasible(z, mass), zero, X, iteration
        zero = exchange.next(zero, violation)
        if zero is None or zero.size > PDAS_MAX_ZERO_FRACTION * n or zero.tobytes() in seen:
            return None
        seen.add(zero.tobytes())
    return (None, zero, X, 1) if most == 1 else None


class _Exchange:
    """The next zero set of the low-rank primal-dual iteration, by block principal pivoting
    (after Judice and Pires): every infeasible index is exchanged while their number falls, or
    has not fallen for at most LOWRANK_EXCHANGE_TRIES iterations; then the iteration goes back
    to the zero set with the fewest and exchanges only the most violated half of them (a
    quarter at the next failure, and so on), since the full exchange can cycle on
    ill-conditioned programs. None when a single exchange from the best set fails too."""

    def __init__(self, n: int):
        self.best, self.tries, self.limit = n + 1, LOWRANK_EXCHANGE_TRIES, None
        self.best_zero = self.best_violation = None

    def next(self, zero: np.ndarray, violation: np.ndarray) -> np.ndarray | None:
        count = int(np.count_nonzero(violation))
        if count < self.best:
            self.best, self.tries, self.limit = count, LOWRANK_EXCHANGE_TRIES, None
            self.best_zero, self.best_violation = zero, violation
        elif self.tries > 0:
            self.tries -= 1
        elif self.limit == 1:
            return None
        else:  # back to the best zero set, fewer exchanged
            self.limit = max(1, (self.limit or self.best) // 2)
            self.tries = LOWRANK_EXCHANGE_TRIES
            zero, violation = self.best_zero, self.best_violation
            keep = np.argpartition(-violation, self.limit - 1)[:self.limit]
            violation = np.zeros_like(violation)
            violation[keep] = 1.0
        flip = np.zeros(violation.size, dtype=bool)
        flip[zero] = True
        return np.flatnonzero(flip ^ (violation > 0))


def _dense_path(H, g, mass, start, solver, max_iter) -> QPSolution | None:
    """The dense path of ``solve_weight_qp`` when ``start`` is dense, on its low-rank variant
    first (LOWRANK_MIN_SIZE points or more, any size) and with one factorization of H (up to
    DENSE_PATH_MAX points): the certified solution, or None when neither applies (the active
    set from a vertex then runs)."""
    n = g.size
    if start is None or n <= 1:
        return None
    start = np.asarray(start, dtype=float)  # only its zeros matter (a projection would fill them)
    if np.count_nonzero(start > 0) <= WARM_START_FRACTION * n:
        return None
    if n >= LOWRANK_MIN_SIZE:
        lowrank = _lowrank_path(H, g, mass, start, solver)
        if lowrank is not None:
            return None if lowrank == "sparse" else lowrank
    if n > DENSE_PATH_MAX:
        return None
    try:
        inverse, forward, found = _dense_active_set(H, g, mass, start, max_iter, solver)
        if found is None:
            return None
        b, iterations = found[:2]
        solution = _certified(H, g, mass, b, iterations, solver)
        if solution.status != "optimal":  # an ill-conditioned face: one step of refinement
            solution = _certified(H, g, mass, _refine(H, g, mass, b, inverse, forward), iterations,
                                  solver)
    except np.linalg.LinAlgError:
        return None
    if solution.status != "optimal":
        return None
    return solution if len(found) == 2 else replace(solution, method=found[2])


def _lowrank_path(H, g, mass, start, solver):
    """The low-rank path of ``_dense_path``: its certified solution (method "low_rank_active_set"),
    "sparse" when the minimizer looks sparse (the active set from a vertex then runs), or None
    when H is not low rank plus a ridge or the iteration gives up (the dense path then runs)."""
    try:
        faces = _lowrank_preconditioner(H)
        found = None if faces is None else _lowrank_active_set(faces, g, mass, start, solver)
    except np.linalg.LinAlgError:
        return None
    if found is None or found == "sparse":
        return found
    b, iterations = found
    solution = _certified(H, g, mass, b, iterations, solver)
    if solution.status != "optimal":
        return None
    solution.info.update(rank=faces.rows.shape[0], products=faces.matvecs)
    return QPSolution(solution.weights, solution.objective, solution.gap, iterations,
                      solution.status, "low_rank_active_set", solution.info)


def _certified(H, g, mass, b, iterations, solver) -> QPSolution:
    """b with its objective and certificate (``frank_wolfe_gap``, ``roundoff_floor``)."""
    Hb = H @ b
    r = Hb - g
    objective = 0.5 * float(b @ r) - 0.5 * float(g @ b)
    gap = frank_wolfe_gap(r, b, mass, solver.mass_bound)
    floor = roundoff_floor(H, g, b, mass, solver.mass_bound, Hb)
    tolerance = max(solver.tolerance(objective), floor)
    status = "optimal" if gap <= tolerance else "max_iterations"
    return QPSolution(b, objective, gap, iterations, status, "dense_active_set",
                      {"support": int(np.count_nonzero(b)), "tolerance": tolerance,
                       "roundoff": floor})


def _refine(H, g, mass, b, inverse: _DenseInverse, forward: np.ndarray) -> np.ndarray:
    """One step of iterative refinement on the face of b: the correction d minimizes
    1/2 d^T H d + r^T d (r = H b - g, computed with H) on {d_i = 0 where b_i = 0, sum(d) = 0}.
    forward: L^{-1} [g, 1] (``_dense_active_set``)."""
    r = H @ b - g
    correction = inverse.forward(-r[:, None])
    if mass is not None:
        correction = np.column_stack([correction, forward[:, 1]])
    d, _ = _range_space_face(inverse, correction, np.flatnonzero(b <= 0),
                             None if mass is None else 0.0)
    return _feasible(b + d, mass)


def projected_gradient_qp(H, g, mass, start=None, atol=None, rtol=DEFAULT_WEIGHT_RTOL,
                          max_iter: int = 10_000, note: str = "", mass_bound: float = 0.0
                          ) -> QPSolution:
    """Spectral projected gradient (Birgin-Martinez-Raydan) on the QP: the fallback."""
    solution = spectral_projected_gradient(
        lambda b: _objective(H, g, b), lambda b: H @ b - g, g.size, mass, start,
        atol=atol, rtol=rtol, max_iter=max_iter, mass_bound=mass_bound)
    solution.info["note"] = note
    return solution


def spectral_projected_gradient(value, gradient, n: int, mass, start=None, atol=None,
                                rtol=DEFAULT_WEIGHT_RTOL, max_iter: int = 10_000,
                                mass_bound: float = 0.0) -> QPSolution:
    """Minimize a smooth function over the orthant or a simplex by projected gradient steps with
    Barzilai-Borwein lengths and a nonmonotone Armijo search; stops on the Frank-Wolfe gap.

    Converges to a stationary point for any smooth objective (first order: use for non-convex
    or non-quadratic problems, where the active-set method does not apply).
    """
    if start is None:
        b = np.full(n, (mass if mass is not None else 1.0) / n)
    else:
        b = project_feasible(np.asarray(start, dtype=float), mass)
    f, r = value(b), gradient(b)
    history = [f]
    length = 1.0 / max(float(np.abs(r).max()), 1e-300)
    gap = frank_wolfe_gap(r, b, mass, mass_bound)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - reported below
        tolerance = rtol * max(abs(f), 1e-300) if atol is None else max(atol, rtol * abs(f))
        if gap <= tolerance:
            break
        direction = project_feasible(b - length * r, mass) - b
        slope = float(r @ direction)
        if slope >= 0:
            break
        reference = max(history[-SPG_MEMORY:])
        step = 1.0
        with np.errstate(over="ignore", invalid="ignore"):
            while True:
                trial = b + step * direction
                f_trial = value(trial)
                if f_trial <= reference + SPG_ARMIJO * step * slope or step < 1e-20:
                    break
                step *= 0.5
            r_trial = gradient(trial)
        if not (np.isfinite(f_trial) and np.all(np.isfinite(r_trial))) or f_trial < -UNBOUNDED:
            return QPSolution(trial, -np.inf, np.inf, iterations, "unbounded",
                              "projected_gradient", {"support": int(np.count_nonzero(trial))})
        s, y = trial - b, r_trial - r
        curvature = float(s @ y)
        length = float(s @ s) / curvature if curvature > 0 else 1e3 * length
        length = min(max(length, 1e-30), 1e30)
        b, f, r = trial, f_trial, r_trial
        history.append(f)
        gap = frank_wolfe_gap(r, b, mass, mass_bound)
    tolerance = rtol * max(abs(f), 1e-300) if atol is None else max(atol, rtol * abs(f))
    weight = mass if mass is not None else max(float(b.sum()), mass_bound)
    floor = ROUNDOFF_FACTOR * np.finfo(float).eps * weight * float(np.abs(r).max() + 1e-300)
    tolerance = max(tolerance, floor)
    status = "optimal" if gap <= tolerance else "max_iterations"
    return QPSolution(b, float(f), float(gap), iterations, status, "projected_gradient",
                      {"support": int(np.count_nonzero(b)), "tolerance": tolerance,
                       "roundoff": floor})
