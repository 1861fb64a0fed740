"""Reaction (weight) steps on a fixed support, and the exact solver of their quadratic programs.

Points y_1..y_n stay fixed; weights a (old) become b (new). With eta = tau * beta:

* quadratic reaction (exact): min_b  F(b) + (b - a)^T G (b - a) / (2 eta), G the geometry's
  metric (``ReactionGeometry.metric``: K + ridge I for MMD),
* Hellinger (exact):     min_b  F(b) + (2 / eta) sum_i (sqrt b_i - sqrt a_i)^2,

over b >= 0, and sum(b) = sum(a) in the spherical variants (``conserve_mass``). On particles
every energy of the library (``Potential``, ``Interaction``, ``MMD2``, their sums and multiples)
is quadratic in the weights, F(b) = 1/2 b^T A b - c^T b + const (``weight_quadratic``, read off
the energy's own form, ``Energy.form``), so the
MMD step is the convex quadratic program

    min_b  1/2 b^T H b - g^T b   over  C = {b >= 0}  or  {b >= 0, sum(b) = M},
    H = A + G / eta,   g = c + G a / eta,

which ``solve_weight_qp`` solves exactly (docs/particles.md §3): a primal active-set method
grown from a vertex (Lawson-Hanson for the orthant, its simplex analogue), with each face
minimum from a Cholesky factorization of H on the face. Kernel Gram matrices with a small
ridge are numerically singular and the minimizers are sparse (a few dozen of a thousand
weights), which is exactly what this method exploits, while interior-point, projected
Newton and primal-dual active-set iterations struggle with the conditioning. The result is
certified by the Frank-Wolfe gap r^T b - M min_i r_i, r = H b - g, an upper bound of
objective - optimum on the simplex (on the orthant the same bound with the mass of b).

Also here: the explicit (forward) reaction updates, and the paper's single projected-gradient
step b = P_C(a - eta f) (Gladin et al., ift_flow code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import linalg
from scipy.linalg.blas import dtrsm, dtrsv

from ..energies import PSD, Energy, NoWeightFormError
from ..kernels import GramCache, centred
from ..measures import Measure

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

WEIGHT_MODES = ("exact", "explicit", "projected_gradient")
HELLINGER_UPDATES = ("multiplicative", "linear")


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
    start: a feasible warm start (its face is tried first). mass_bound: on the orthant, the
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
    if not (np.all(np.isfinite(H)) and np.all(np.isfinite(g))):
        raise ValueError("the weight QP has non-finite data (H or g contains NaN or inf)")
    if mass is not None and not (np.isfinite(mass) and mass > 0):
        raise ValueError(f"the simplex mass must be positive and finite, got {mass!r}")
    max_iter = 20 * n + 100 if max_iter is None else int(max_iter)
    if mass_bound is None:
        mass_bound = 0.0 if start is None else float(np.abs(np.asarray(start, float)).sum())
    solver = _ActiveSet(H, g, mass, rtol, atol, mass_bound)
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


def roundoff_floor(H, g, b, mass, mass_bound=0.0) -> float:
    """The accuracy to which the gap of ``frank_wolfe_gap`` can be computed (ROUNDOFF_FACTOR)."""
    size = float(np.abs(H @ b).max() + np.abs(g).max())
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


# -------------------------------------------------------------------------------------------------
# Energies as quadratics in the weights
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightQuadratic:
    """F(sum_i b_i delta_{y_i}) = 1/2 b^T A b - c^T b + const on fixed points y.

    hessian A: (n, n), or None when F is linear in the weights; linear c: (n,). known_psd: A is
    positive semidefinite by construction (else it may be so only on zero-sum vectors).
    """

    hessian: np.ndarray | None
    linear: np.ndarray
    known_psd: bool = True

    def value(self, b: np.ndarray) -> float:
        quadratic = 0.0 if self.hessian is None else 0.5 * b @ (self.hessian @ b)
        return float(quadratic - self.linear @ b)

    def gradient(self, b: np.ndarray) -> np.ndarray:
        return -self.linear if self.hessian is None else self.hessian @ b - self.linear

    def __add__(self, other: WeightQuadratic) -> WeightQuadratic:
        if self.hessian is None:
            hessian = other.hessian
        elif other.hessian is None:
            hessian = self.hessian
        else:
            hessian = self.hessian + other.hessian
        return WeightQuadratic(hessian, self.linear + other.linear,
                               self.known_psd and other.known_psd)

    def scaled(self, factor: float) -> WeightQuadratic:
        hessian = None if self.hessian is None else factor * self.hessian
        return WeightQuadratic(hessian, factor * self.linear, self.known_psd and factor >= 0)


def weight_quadratic(F: Energy, points: np.ndarray, grams: GramCache | None = None
                     ) -> WeightQuadratic | None:
    """The quadratic form of F in the weights on ``points``: (n, d), read off F's normal form
    (``Energy.form``); None if F is not quadratic in the weights there (a log or power part, or
    no form: Entropy on particles)."""
    grams = GramCache(points) if grams is None else grams
    try:
        form = F.form(Measure(points, np.zeros(len(points))), grams)
    except NoWeightFormError:
        return None
    if not form.is_quadratic:
        return None
    return WeightQuadratic(form.quadratic, -form.total_offset, form.quadratic_psd == PSD)


# -------------------------------------------------------------------------------------------------
# Reaction steps
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReactionResult:
    """New weights b on a fixed support, with the certificate of the step (relative)."""

    weights: np.ndarray
    certificate: float
    status: str
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "optimal"


def mmd_metric(reaction, grams: GramCache, conserve_mass: bool) -> np.ndarray:
    """G = M + ridge I of a quadratic reaction (``ReactionGeometry.metric``: K + ridge I for
    MMD, P K P + ridge I for a conditionally positive definite kernel). conserve_mass is the
    reaction's own (kept for the callers)."""
    return reaction.metric(grams.points, grams)


def mmd_step(F: Energy, reaction, points: np.ndarray, a: np.ndarray, eta: float,
             conserve_mass: bool, start=None, rtol: float = DEFAULT_WEIGHT_RTOL,
             grams: GramCache | None = None, linearize_at: np.ndarray | None = None,
             energy_scale: float | None = None) -> ReactionResult:
    """Exact MMD reaction step: argmin_b F(b) + (b - a)^T G (b - a) / (2 eta) over C.

    With ``linearize_at`` = the first variation f (n,), F is replaced by its linearization
    f^T b: the explicit (forward) step, which equals a - eta G^{-1} (f - l) while that stays
    nonnegative and is its G-metric projection onto C otherwise.
    ``energy_scale``: the size of the step objective, for the relative certificate.
    """
    grams = GramCache(points) if grams is None else grams
    metric = mmd_metric(reaction, grams, conserve_mass)
    mass = float(a.sum()) if conserve_mass else None
    if linearize_at is not None:
        model = WeightQuadratic(None, -np.asarray(linearize_at, dtype=float))
    else:
        model = weight_quadratic(F, points, grams)
    scale = max(abs(energy_scale) if energy_scale is not None else 0.0, 1e-300)
    if model is None:  # a non-quadratic energy: first-order method on the true objective
        return _generic_mmd_step(F, points, a, metric, eta, mass, start, rtol, scale)
    n = len(a)
    H = metric / eta
    g = model.linear + metric @ a / eta
    needs_shift = conserve_mass and not reaction.metric_definite
    if model.hessian is not None:
        hessian = model.hessian
        if conserve_mass and not model.known_psd:
            # on the simplex 1/2 b^T A b = 1/2 b^T (P A P) b + (M / n) (P A 1)^T b + const
            row_sums = hessian.sum(1)
            g = g - mass / n * (row_sums - row_sums.mean())
            hessian = centred(hessian)
            needs_shift = True
        H = H + hessian
    if needs_shift:  # + s/(2n) (1^T b - M)^2 is zero on the simplex and makes H definite along 1
        shift = float(np.mean(np.diag(H)))
        H = H + shift / n
        g = g + shift * mass / n
    solution = solve_weight_qp(H, g, mass, start=a if start is None else start,
                               atol=rtol * scale, rtol=0.0)
    info = {"weight_solver": solution.method, "weight_iterations": solution.iterations,
            "weight_support": solution.info.get("support"), "weight_gap": solution.gap,
            "weight_roundoff": solution.info.get("roundoff", 0.0) / scale}
    return ReactionResult(solution.weights, solution.gap / scale, solution.status, info)


def _known_psd(F: Energy, points: np.ndarray, grams: GramCache | None = None) -> bool:
    """Whether the Hessian of F in the weights is positive semidefinite by construction (F's
    form says so: ``WeightForm.quadratic_psd``)."""
    grams = GramCache(points) if grams is None else grams
    return F.form(Measure(points, np.zeros(len(points))), grams).quadratic_psd == PSD


def _generic_mmd_step(F, points, a, metric, eta, mass, start, rtol, scale) -> ReactionResult:
    def value(b):
        diff = b - a
        return F.value(Measure(points, b)) + float(diff @ metric @ diff) / (2 * eta)

    def gradient(b):
        return F.first_variation(Measure(points, b)) + metric @ (b - a) / eta

    solution = spectral_projected_gradient(value, gradient, len(a), mass, a if start is None
                                           else start, atol=rtol * scale, rtol=rtol)
    info = {"weight_solver": solution.method, "weight_iterations": solution.iterations,
            "weight_gap": solution.gap, "weight_roundoff": solution.info.get("roundoff", 0.0) / scale}
    return ReactionResult(solution.weights, solution.gap / scale, solution.status, info)


def hellinger_step(F: Energy, points: np.ndarray, a: np.ndarray, eta: float, conserve_mass: bool,
                   rtol: float = DEFAULT_WEIGHT_RTOL, grams: GramCache | None = None,
                   energy_scale: float | None = None, max_iter: int = 200) -> ReactionResult:
    """Exact Hellinger reaction step: argmin_b F(b) + (2 / eta) sum_i (sqrt b_i - sqrt a_i)^2.

    F must be quadratic in the weights (every particle energy is). On the support of a the
    minimizer is interior (the derivative of -sqrt(a_i b_i) is -infinite at b_i = 0), so a
    damped Newton method with a fraction-to-the-boundary rule solves the KKT system, with the
    multiplier of sum(b) = sum(a) for ``conserve_mass``. Particles of zero weight keep it (the
    Hellinger flow never creates mass there); the certificate includes the KKT violation of
    that choice, so a step that should have created mass there is reported, not hidden.
    Certificate: the Newton decrement^2 / 2 (the predicted remaining decrease), relative.
    """
    grams = GramCache(points) if grams is None else grams
    model = weight_quadratic(F, points, grams)
    if model is None:
        raise ValueError(f"the exact Hellinger step on particles needs an energy quadratic in the "
                         f"weights (Potential, Interaction, MMD2 and their sums); got "
                         f"{type(F).__name__}. Use jk.ConicJKO on a fixed support instead")
    scale = max(abs(energy_scale) if energy_scale is not None else 0.0, 1e-300)
    live = np.flatnonzero(a > 0)
    mass = float(a.sum())
    root_a = np.sqrt(a[live])
    A = None if model.hessian is None else model.hessian[np.ix_(live, live)]
    c = model.linear[live]

    def value(b):
        quadratic = 0.0 if A is None else 0.5 * b @ (A @ b)
        return float(quadratic - c @ b + (2 / eta) * np.sum(b - 2 * root_a * np.sqrt(b)))

    b = a[live].copy()
    decrement_sq = np.inf
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - reported below
        root_b = np.sqrt(b)
        gradient = (0.0 if A is None else A @ b) - c + (2 / eta) * (1 - root_a / root_b)
        curvature = root_a / (eta * b * root_b)  # d^2/db^2 of the Hellinger term
        direction = _newton_direction(A, curvature, gradient, conserve_mass)
        decrement_sq = float(-gradient @ direction)
        if 0.5 * decrement_sq <= 0.1 * rtol * scale or not decrement_sq > 0:
            break  # (quadratic convergence: asking 10x more than needed is cheap)
        negative = direction < 0
        step = min(1.0, 0.99 * float(np.min(-b[negative] / direction[negative]))) \
            if np.any(negative) else 1.0
        f0 = value(b)
        while True:
            trial = b + step * direction
            if np.all(trial > 0) and value(trial) <= f0 - 1e-4 * step * decrement_sq:
                break
            step *= 0.5
            if step < 1e-16:
                break
        b = trial
        if conserve_mass:
            b *= mass / b.sum()
    weights = np.zeros_like(a)
    weights[live] = b
    # KKT at the particles of zero weight: d/db_i at b_i = 0 is r_i - nu + 2 / eta >= 0
    violation = 0.0
    dead = np.flatnonzero(a == 0)
    if dead.size:
        r = model.gradient(weights)
        nu = 0.0
        if conserve_mass:
            nu = float(np.average(r[live] + (2 / eta) * (1 - root_a / np.sqrt(b)), weights=b))
        violation = float(np.maximum(nu - r[dead] - 2 / eta, 0).max() * mass)
    gap = 0.5 * max(decrement_sq, 0.0) + violation
    root_b = np.sqrt(b)
    size = float(np.abs(0.0 if A is None else A @ b).max(initial=0.0) + np.abs(c).max()
                 + (2 / eta) * np.max(1 + root_a / root_b))
    floor = ROUNDOFF_FACTOR * np.finfo(float).eps * mass * size
    status = "optimal" if gap <= max(rtol * scale, floor) else "max_iterations"
    info = {"weight_solver": "newton", "weight_iterations": iterations, "weight_gap": gap,
            "weight_roundoff": floor / scale}
    return ReactionResult(weights, gap / scale, status, info)


def _newton_direction(A, curvature, gradient, conserve_mass):
    """Solve (A + diag(curvature)) d = -gradient (with sum(d) = 0 when conserving mass);
    a Levenberg shift makes the matrix positive definite for non-convex energies."""
    if A is None:
        inverse = 1.0 / curvature
        d = -gradient * inverse
        if conserve_mass:
            d += inverse * (-d.sum() / inverse.sum())
        return d
    matrix = A + np.diag(curvature)
    shift = 0.0
    while True:
        try:
            factor = linalg.cho_factor(matrix + shift * np.eye(len(curvature)), lower=True,
                                       check_finite=False)
            break
        except np.linalg.LinAlgError:
            shift = max(2 * shift, 1e-10 * float(np.abs(np.diag(matrix)).max()))
    d = linalg.cho_solve(factor, -gradient, check_finite=False)
    if conserve_mass:
        ones = linalg.cho_solve(factor, np.ones(len(curvature)), check_finite=False)
        d -= d.sum() / ones.sum() * ones
    return d


def explicit_hellinger(a: np.ndarray, f: np.ndarray, eta: float, conserve_mass: bool,
                       update: str = "multiplicative") -> tuple[np.ndarray, dict]:
    """Forward Hellinger step of d_t a = -a (f - l).

    "multiplicative": b = a exp(-eta f), renormalized to sum(a) when conserving mass (the
    exact multiplier l for this update); it keeps b >= 0 and is exact when f does not depend
    on the weights (potential energies). "linear": b = a (1 - eta (f - l)) with
    l = sum(a f) / sum(a) (exact mass), clipped at 0 where eta (f - l) > 1 (reported).
    """
    if update == "multiplicative":
        shift = float(np.min(f[a > 0])) if np.any(a > 0) else 0.0  # exp stays <= 1: no overflow
        b = a * np.exp(-eta * (f - shift))
        b = b * (a.sum() / b.sum()) if conserve_mass else b * np.exp(-eta * shift)
        return b, {"clipped_mass": 0.0}
    if update == "linear":
        level = float(a @ f / a.sum()) if conserve_mass else 0.0
        b = a * (1 - eta * (f - level))
        clipped = float(-b[b < 0].sum())
        b = np.maximum(b, 0.0)
        if conserve_mass and clipped > 0:
            b *= a.sum() / b.sum()
        return b, {"clipped_mass": clipped}
    raise ValueError(f"unknown Hellinger update {update!r}; choose one of {HELLINGER_UPDATES}")


def adjoint_hellinger(a: np.ndarray, f: np.ndarray, eta: float, conserve_mass: bool
                      ) -> tuple[np.ndarray, dict]:
    """The adjoint of the exact Hellinger step: b = a (1 - eta (f - l) / 2)^2.

    The exact step satisfies a = b (1 + eta (f(b) - l) / 2)^2; exchanging the roles of a and b
    and the sign of eta gives this explicit update, so that composing it with the exact step
    over half steps is a symmetric (second-order) method. l makes the mass exact.
    """
    u = 1 - eta * f / 2
    if conserve_mass:  # sum a (u + s)^2 = sum a, s = eta l / 2: the root near 0
        mass, au, au2 = a.sum(), a @ u, a @ (u * u)
        s = (-au + np.sqrt(max(au * au - mass * (au2 - mass), 0.0))) / mass
        u = u + s
    negative = float(a[u < 0].sum())
    return a * u * u, {"reversed_mass": negative}


def projected_gradient_weights(a: np.ndarray, f: np.ndarray, eta: float, conserve_mass: bool
                               ) -> np.ndarray:
    """The paper code's weight step: b = P_C(a - eta f), Euclidean projection onto the simplex
    (or the orthant). It is one projected-gradient step on the MMD step's QP started at b = a,
    and the forward Euler step of the Euclidean flow d_t a = -f, not of the MMD flow
    d_t a = -K^{-1} f. The code of Gladin et al. writes w += lr (-2 f) (it differentiates
    MMD^2, not 1/2 MMD^2): its weight step lr is eta / 2 here."""
    return project_feasible(a - eta * f, float(a.sum()) if conserve_mass else None)


def projected_multiplicative_weights(a: np.ndarray, f: np.ndarray, eta: float, conserve_mass: bool
                                     ) -> np.ndarray:
    """The paper code's KL weight step: b = P_C(a exp(-eta f)), the multiplicative (Hellinger,
    mirror-descent) update followed by the *Euclidean* projection onto the simplex of mass
    sum(a) (``conserve_mass``; the orthant otherwise, where it changes nothing).

    a, f: (n,). The projection subtracts one level from all weights and clips at zero, so this
    is not the renormalized multiplicative step a exp(-eta f) sum(a) / sum(a exp(-eta f)) of
    ``explicit_hellinger``: it zeroes every weight below the level. The code of Gladin et al.
    writes w *= exp(lr (K_xy 1/n - K w)) = exp(-lr f): its lr is eta here (no factor 2). The
    product is taken unshifted, as theirs: scaling it by a constant would change the projection.
    """
    return project_feasible(a * np.exp(-eta * f), float(a.sum()) if conserve_mass else None)


def check_weight_mode(mode: str) -> str:
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown reaction step {mode!r}; choose one of {WEIGHT_MODES}")
    return mode


def reaction_kind(reaction) -> str:
    """"mmd" for a quadratic reaction (a metric G), "hellinger" otherwise."""
    if getattr(reaction, "quadratic", None) is None:
        raise ValueError(f"unsupported reaction geometry {reaction!r}")
    return "mmd" if reaction.quadratic else "hellinger"
