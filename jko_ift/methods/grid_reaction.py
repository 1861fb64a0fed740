"""Reaction steps of a density on a grid that never form a Gram matrix (``Splitting`` with a grid
transport piece).

On a ``Grid`` of n cells the weights a (masses of the cells, C order) change on fixed nodes:

* Hellinger: argmin_b F(b) + (2 / eta) sum_i (sqrt b_i - sqrt a_i)^2. For a local energy
  (``local_energy``: F(b) = h^d sum_i [u(b_i / h^d) + W_i b_i / h^d + C_i]) the problem is one
  convex equation per cell, u'(b_i / h^d) + W_i + (2 / eta)(1 - sqrt(a_i / b_i)) = nu, solved by
  a bracketed Newton iteration in log b_i, with the multiplier nu of sum(b) = sum(a) under
  ``conserve_mass`` (nu = 0 otherwise) found by a bracketed Newton iteration of its own.
* MMD with a Gaussian kernel: argmin_b F(b) + (b - a)^T (K + r I)(b - a) / (2 eta) over b >= 0
  (sum(b) = sum(a) under ``conserve_mass``). A Gaussian factors along the axes, so on the grid
  K = K_1 (x) ... (x) K_d with d small dense 1-D matrices (``SeparableGaussian``): K v costs
  O(n (n_1 + ... + n_d)) and (c K + s I)^{-1} v the same through the axes' eigenvectors. An
  energy quadratic in the weights (``Potential``, ``MMD2`` with a Gaussian kernel, their sums)
  gives the QP min 1/2 b^T H b - g^T b with H = sum_j c_j K_j + (K + r I) / eta, solved by
  conjugate gradients preconditioned with the exact inverse of the geometry's part (one
  iteration when the energy's kernels are the geometry's); where that minimizer leaves the
  orthant, or the energy has an internal part (``Entropy``, ``PorousMedium``, ``KL``), by the
  spectral projected gradient of ``qp`` on the true objective, matrix-free. Certificate: the
  Frank-Wolfe gap (an upper bound of objective - optimum) relative to the energy's scale.

Nonlocal energies in the transport piece: ``linearized_transport_energy`` replaces each ``MMD2``
term by the potential of its first variation at the step's start (the transport piece of a
grid method needs a pointwise conjugate), a first-order approximation, like the splitting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..energies import KL, MMD2, Entropy, Interaction, PorousMedium, Potential, Scaled, Sum
from ..kernels import Gaussian
from ..measures import Measure
from . import qp
from .local_energy import UnsupportedEnergyError, local_energy
from .weights import ReactionResult

#: Relative residual of the conjugate gradients (unconstrained QP), far below any certificate.
CG_RTOL = 1e-13
#: Newton's start lifts empty cells to this fraction of the largest mass (the entropy keeps b > 0).
NEWTON_LIFT = 1e-12
#: Relative residual of the inner conjugate gradients of a Newton step (inexact Newton).
NEWTON_CG_RTOL = 1e-8
#: The loosest inner accuracy (the first Newton steps, far from the minimum).
NEWTON_FORCING = 1e-2
#: Densities below this are taken at it in u'(rho) (the entropy's slope is -inf at 0).
SLOPE_FLOOR = 1e-300
#: Newton iterations per cell of the Hellinger step (quadratic convergence: a dozen suffice).
HELLINGER_NEWTON = 60


def _axes(grid) -> list[np.ndarray]:
    spacing = grid.spacing
    return [grid.lo[k] + (np.arange(grid.shape[k]) + 0.5) * spacing[k] for k in range(grid.dim)]


class SeparableGaussian:
    """The Gram matrix of k(x, y) = exp(-|x - y|^2 / (2 sigma^2)) on a grid's nodes as the
    Kronecker product of its 1-D factors (n_k, n_k), applied and inverted axis by axis."""

    def __init__(self, kernel, grid):
        if not isinstance(kernel, Gaussian):
            raise UnsupportedEnergyError(
                f"the grid reaction step needs a Gaussian kernel (it factors along the axes, so its "
                f"Gram matrix is never formed); got {type(kernel).__name__}. Use jk.ConicJKO or "
                "jk.ParticleJKO (dense Gram matrices) for other kernels")
        self.sigma, self.shape = float(kernel.sigma), grid.shape
        self.factors = [np.exp(-0.5 * ((x[:, None] - x[None, :]) / self.sigma) ** 2) for x in _axes(grid)]
        self._eigen = None

    def _along_axes(self, matrices, v: np.ndarray) -> np.ndarray:
        if len(self.shape) == 1:
            return matrices[0] @ v
        if len(self.shape) == 2:  # two BLAS products on contiguous arrays
            return (matrices[0] @ v.reshape(self.shape) @ matrices[1].T).ravel()
        out = v.reshape(self.shape)
        for k, matrix in enumerate(matrices):
            out = np.moveaxis(np.tensordot(matrix, out, axes=(1, k)), 0, k)
        return out.ravel()

    def apply(self, v: np.ndarray) -> np.ndarray:
        """K v for v (n,) in the grid's C order."""
        return self._along_axes(self.factors, v)

    def eigenvalues(self) -> np.ndarray:
        """The eigenvalues of K (n,), in the order of ``to_eigen``."""
        self._decompose()
        values = self._eigen[0][0]
        for vals, _ in self._eigen[1:]:
            values = np.multiply.outer(values, vals)
        return values.ravel()

    def to_eigen(self, v: np.ndarray) -> np.ndarray:
        self._decompose()
        return self._along_axes([vectors.T for _, vectors in self._eigen], v)

    def from_eigen(self, v: np.ndarray) -> np.ndarray:
        self._decompose()
        return self._along_axes([vectors for _, vectors in self._eigen], v)

    def _decompose(self) -> None:
        if self._eigen is None:
            self._eigen = [np.linalg.eigh(matrix) for matrix in self.factors]


@dataclass
class GridEnergy:
    """F on one grid split into what the reaction needs: F(b) = L(b) + lin^T b
    + 1/2 sum_j c_j b^T K_j b + constant, L a ``LocalEnergy`` with an internal part (or None),
    K_j separable Gaussians (the ``MMD2`` terms, c_j > 0)."""

    local: object
    linear: np.ndarray
    quadratic: list
    constant: float

    def value(self, b: np.ndarray) -> float:
        out = self.constant + float(self.linear @ b)
        for c, gram in self.quadratic:
            out += 0.5 * c * float(b @ gram.apply(b))
        return out + (self.local.value(b) if self.local is not None else 0.0)

    def gradient(self, b: np.ndarray) -> np.ndarray:
        out = self.linear.copy()
        for c, gram in self.quadratic:
            out += c * gram.apply(b)
        if self.local is not None:
            local = self.local
            # u'(0) = -inf with an entropy part: the floor keeps projected-gradient steps finite
            out += local.slope(np.maximum(b / local.cell_volume, SLOPE_FLOOR)) + local.potential
        return out


def grid_energy(F, mu: Measure, grams: dict | None = None) -> GridEnergy:
    """F on the grid of mu as a ``GridEnergy``; ``grams`` caches the separable Gaussians by sigma.
    UnsupportedEnergyError for ``Interaction`` (no separable form) and non-Gaussian ``MMD2``."""
    grams = {} if grams is None else grams
    local_terms, quadratic = [], []
    linear, constant = np.zeros(mu.n), 0.0
    for factor, term in _terms(F, 1.0):
        if isinstance(term, MMD2):
            gram = _gram(term.kernel, mu.grid, grams)
            cross, self_term = _target_terms(term, mu, gram)
            quadratic.append((factor, gram))
            linear = linear - factor * cross
            constant += 0.5 * factor * self_term
        elif isinstance(term, Interaction):
            raise UnsupportedEnergyError(
                "the grid reaction step takes Entropy, PorousMedium, KL, Potential and MMD2 with a "
                "Gaussian kernel; Interaction has no separable form on the grid. Use jk.ConicJKO "
                "(small grids) or jk.ParticleJKO")
        else:
            local_terms.append(factor * term if factor != 1.0 else term)
    local = None
    if local_terms:
        local_part = local_terms[0] if len(local_terms) == 1 else Sum(tuple(local_terms))
        if _has_internal(local_part):
            local = local_energy(local_part, mu, "Splitting")
        else:  # potentials only: linear in the weights
            linear = linear + local_part.first_variation(mu)
    return GridEnergy(local, linear, quadratic, constant)


def _terms(F, factor: float):
    if isinstance(F, Sum):
        for term in F.terms:
            yield from _terms(term, factor)
    elif isinstance(F, Scaled):
        yield from _terms(F.energy, factor * F.factor)
    else:
        yield factor, F


def _has_internal(F) -> bool:
    return any(isinstance(term, (Entropy, PorousMedium, KL)) for _, term in _terms(F, 1.0))


def _gram(kernel, grid, grams: dict) -> SeparableGaussian:
    key = (getattr(kernel, "sigma", None), type(kernel).__name__, grid.lo, grid.hi, grid.shape)
    if key not in grams:
        grams[key] = SeparableGaussian(kernel, grid)
    return grams[key]


def _target_terms(term: MMD2, mu: Measure, gram: SeparableGaussian) -> tuple[np.ndarray, float]:
    """(K_{x,t} p (n,), p^T K_tt p) of an MMD2 term: separable when the target sits on mu's grid,
    else one kernel sum over the target's points."""
    target = term.target
    if target.grid is not None and target.grid == mu.grid:
        cross = gram.apply(target.weights)
        return cross, float(target.weights @ cross)
    return term.kernel.apply(mu.points, target.points, target.weights), term._target_self_term


def witness(energy: GridEnergy, b: np.ndarray) -> np.ndarray:
    """The first variation of the quadratic (MMD2) part at b: sum_j c_j (K_j b - K_{x,t_j} p_j)."""
    out = np.zeros_like(b)
    for c, gram in energy.quadratic:
        out += c * gram.apply(b)
    return out


def linearized_transport_energy(F, mu: Measure, grams: dict | None = None):
    """(energy for the grid transport piece, names of the linearized terms): F with every MMD2
    term replaced by the potential of its first variation at mu (exact where there is none)."""
    terms = list(_terms(F, 1.0))
    nonlocal_terms = [(c, t) for c, t in terms if isinstance(t, MMD2)]
    if not nonlocal_terms:
        return F, ()
    energy = grid_energy(Sum(tuple(c * t for c, t in nonlocal_terms)) if len(nonlocal_terms) > 1
                         else nonlocal_terms[0][0] * nonlocal_terms[0][1], mu, grams)
    values = energy.linear + witness(energy, mu.weights)
    kept = [c * t if c != 1.0 else t for c, t in terms if not isinstance(t, MMD2)]
    potential = Potential(_OnGrid(values, mu.points))
    parts = (*kept, potential)
    return (parts[0] if len(parts) == 1 else Sum(parts)), tuple(type(t).__name__ for _, t in nonlocal_terms)


class _OnGrid:
    """V given by its values on the grid's nodes (a linearized first variation)."""

    def __init__(self, values: np.ndarray, points: np.ndarray):
        self.values, self.points = values, points

    def __call__(self, z: np.ndarray) -> np.ndarray:
        if z is not self.points and not (z.shape == self.points.shape and np.array_equal(z, self.points)):
            raise ValueError("a linearized first variation is known on its grid's nodes only")
        return self.values


# ------------------------------------------------------------------------------ the MMD step
def grid_mmd_step(F, reaction, mu: Measure, eta: float, conserve_mass: bool, rtol: float,
                  scale: float, grams: dict | None = None) -> ReactionResult:
    """The exact MMD reaction step on mu's grid (module docstring), matrix-free."""
    grams = {} if grams is None else grams
    metric = _gram(reaction.kernel, mu.grid, grams) if isinstance(reaction.kernel, Gaussian) else \
        SeparableGaussian(reaction.kernel, mu.grid)
    energy = grid_energy(F, mu, grams)
    a, ridge = mu.weights, float(reaction.ridge)
    mass = float(a.sum()) if conserve_mass else None

    def value(b):
        diff = b - a
        return energy.value(b) + float(diff @ (metric.apply(diff) + ridge * diff)) / (2 * eta)

    def gradient(b):
        diff = b - a
        return energy.gradient(b) + (metric.apply(diff) + ridge * diff) / eta

    atol = rtol * max(scale, 1e-300)
    info = {"weight_solver": "projected_gradient"}
    start = a
    if energy.local is None:
        b, iterations = _quadratic_minimum(energy, metric, ridge, eta, a, mass)
        info.update(weight_solver="conjugate_gradients", weight_iterations=iterations)
        if np.all(b >= 0):
            gap = qp.frank_wolfe_gap(gradient(b), b, mass, float(a.sum()))
            floor = _roundoff(gradient(b), b, mass)
            info["weight_gap"] = gap
            status = "optimal" if gap <= max(atol, floor) else "max_iterations"
            return ReactionResult(b, gap / max(scale, 1e-300), status, info)
        solution = _active_set(energy, metric, ridge, eta, a, mass, atol)
        if solution is not None:
            info.update(weight_solver="active_set", weight_iterations=iterations + solution.iterations,
                        weight_gap=solution.gap, weight_support=solution.info["support"])
            return ReactionResult(solution.weights, solution.gap / max(scale, 1e-300), solution.status, info)
        start = qp.project_feasible(b, mass)
    elif energy.local.entropy > 0:  # b > 0 at the minimum: Newton's method inside the orthant
        b, decrement_sq, iterations, inner = _interior_newton(energy, value, gradient, metric, ridge, eta,
                                                              a, mass, atol)
        gap = 0.5 * decrement_sq
        info.update(weight_solver="newton_cg", weight_iterations=iterations, weight_cg_iterations=inner,
                    weight_gap=gap)
        status = "optimal" if gap <= atol else "max_iterations"
        return ReactionResult(b, gap / max(scale, 1e-300), status, info)
    solution = qp.spectral_projected_gradient(value, gradient, a.size, mass, start, atol=atol,
                                              rtol=0.0, max_iter=20_000, mass_bound=float(a.sum()))
    info.update(weight_iterations=info.get("weight_iterations", 0) + solution.iterations,
                weight_gap=solution.gap)
    return ReactionResult(solution.weights, solution.gap / max(scale, 1e-300), solution.status, info)


def _interior_newton(energy, value, gradient, metric, ridge, eta, a, mass, atol, max_iter: int = 100):
    """Damped Newton from b = a (empty cells lifted) for an energy with an entropy part, which keeps
    the minimizer inside the orthant: (D + H) d = -grad J by conjugate gradients preconditioned by
    the diagonal (D = the local part's Hessian, diagonal; H the separable quadratic part; measured:
    fewer products than the exact inverse of H + median(D) I in the kernel's eigenbasis) to the
    Eisenstat-Walker accuracy, with the
    multiplier of sum(d) = 0 under a mass constraint, a fraction-to-the-boundary rule and an
    Armijo search. Returns (b, the Newton decrement^2, iterations, inner CG iterations)."""
    local, h = energy.local, energy.local.cell_volume
    b = np.maximum(a, NEWTON_LIFT * float(a.max()))
    if mass is not None:
        b *= mass / b.sum()
    parts = [(c, gram) for c, gram in energy.quadratic] + [(1.0 / eta, metric)]
    diagonal_H = sum(c for c, _ in parts) + ridge / eta

    def H(v):
        out = (ridge / eta) * v
        for c, gram in parts:
            out = out + c * gram.apply(v)
        return out

    decrement_sq, inner, iterations, first = np.inf, 0, 0, 1.0
    f0 = value(b)
    for iterations in range(1, max_iter + 1):  # noqa: B007 - reported below
        rho = b / h
        D = 1.0 / (local.curvature(np.zeros_like(rho), rho) * h)

        def system(v, D=D):
            return D * v + H(v)

        r = gradient(b)
        norm = float(np.linalg.norm(r - r.mean() if mass is not None else r))
        first = norm if iterations == 1 else first
        # inexact Newton (Eisenstat-Walker): the inner accuracy follows the outer progress
        forcing = min(NEWTON_FORCING, max(NEWTON_CG_RTOL, norm / max(first, 1e-300)))
        precondition = _jacobi(D + diagonal_H, mass is not None)
        d, used = _pcg(system, precondition, -r, rtol=forcing, projected=mass is not None)
        inner += used
        if mass is not None:  # the rounding of long runs drifts off sum(d) = 0: project back
            d -= d.sum() / (D + diagonal_H) / float(np.sum(1.0 / (D + diagonal_H)))
        decrement_sq = float(-r @ d)
        if 0.5 * decrement_sq <= 0.1 * atol or not decrement_sq > 0:
            break
        negative = d < 0
        step = min(1.0, 0.99 * float(np.min(-b[negative] / d[negative]))) if np.any(negative) else 1.0
        while step > 1e-16:
            trial = b + step * d
            f_trial = value(trial)
            if np.all(trial > 0) and f_trial <= f0 - 1e-4 * step * decrement_sq:
                break
            step *= 0.5
        b, f0 = trial, f_trial
        if mass is not None:
            b *= mass / b.sum()
            f0 = value(b)
    return b, max(decrement_sq, 0.0), iterations, inner


def _jacobi(diagonal: np.ndarray, zero_sum: bool):
    """v -> M^{-1} v with M the diagonal; with ``zero_sum`` projected onto sum(x) = 0 in the M metric,
    so that conjugate gradients stay on the mass constraint (the constraint preconditioner)."""
    inverse = 1.0 / diagonal
    if not zero_sum:
        return lambda v: inverse * v
    total = float(inverse.sum())
    return lambda v: inverse * (v - float(inverse @ v) / total)


def _roundoff(r: np.ndarray, b: np.ndarray, mass) -> float:
    weight = mass if mass is not None else float(b.sum())
    return qp.ROUNDOFF_FACTOR * np.finfo(float).eps * weight * float(np.abs(r).max() + 1e-300)


def _quadratic_minimum(energy: GridEnergy, metric: SeparableGaussian, ridge: float, eta: float,
                       a: np.ndarray, mass) -> tuple[np.ndarray, int]:
    """The minimizer of 1/2 b^T H b - g^T b (with sum(b) = mass if given), H = sum_j c_j K_j +
    (K + r I) / eta, g = -lin + (K + r I) a / eta, by preconditioned conjugate gradients: the
    preconditioner is the exact inverse of the part of H diagonal in the metric's eigenbasis."""
    same = sum(c for c, gram in energy.quadratic if gram.sigma == metric.sigma and gram.shape == metric.shape)
    diagonal = (same + 1.0 / eta) * metric.eigenvalues() + ridge / eta

    def H(v):
        out = (metric.apply(v) + ridge * v) / eta
        for c, gram in energy.quadratic:
            out += c * gram.apply(v)
        return out

    def precondition(v):
        return metric.from_eigen(metric.to_eigen(v) / diagonal)

    g = -energy.linear + (metric.apply(a) + ridge * a) / eta
    b, iterations = _pcg(H, precondition, g)
    if mass is None:
        return b, iterations
    ones, more = _pcg(H, precondition, np.ones_like(a))
    return b + (mass - b.sum()) / ones.sum() * ones, iterations + more


class _LazyHessian:
    """H = sum_j c_j K_j + (K + r I) / eta of separable Gaussians, its entries computed on demand
    (the blocks and rows that the active-set method of ``qp`` reads: O(n |S|), never n^2)."""

    def __init__(self, energy: GridEnergy, metric: SeparableGaussian, ridge: float, eta: float):
        self.parts = [(c, gram) for c, gram in energy.quadratic] + [(1.0 / eta, metric)]
        self.shift, self.shape_grid = ridge / eta, metric.shape
        self.n = int(np.prod(metric.shape))
        self.shape = (self.n, self.n)

    def _block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        rows, cols = np.asarray(rows).ravel(), np.asarray(cols).ravel()
        r_idx, c_idx = np.unravel_index(rows, self.shape_grid), np.unravel_index(cols, self.shape_grid)
        out = np.zeros((rows.size, cols.size))
        for c, gram in self.parts:
            block = np.ones((rows.size, cols.size))
            for k, factor in enumerate(gram.factors):
                block *= factor[np.ix_(r_idx[k], c_idx[k])]
            out += c * block
        out += self.shift * (rows[:, None] == cols[None, :])
        return out

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self._block(key[0], key[1])
        return self._block(np.atleast_1d(key), np.arange(self.n))

    def diagonal(self) -> np.ndarray:
        return np.full(self.n, sum(c for c, _ in self.parts) + self.shift)

    def __matmul__(self, v: np.ndarray) -> np.ndarray:
        out = self.shift * v
        for c, gram in self.parts:
            out = out + c * gram.apply(v)
        return out


#: The active-set method is used while its face has at most this many cells (a Cholesky factor
#: of that size); denser minimizers go to the projected gradient.
MAX_FACE = 3000


def _active_set(energy, metric, ridge, eta, a, mass, atol) -> qp.QPSolution | None:
    """The exact QP minimum by the active-set method of ``qp`` on the lazy Hessian (sparse
    minimizers: a kernel step that empties cells), or None when its face grows past MAX_FACE."""
    H = _LazyHessian(energy, metric, ridge, eta)
    g = -energy.linear + (metric.apply(a) + ridge * a) / eta
    solver = qp._ActiveSet(H, g, mass, 0.0, atol, float(a.sum()))
    face_append = solver.face.append

    def guarded_append(indices):
        if solver.face.support.size + np.size(indices) > MAX_FACE:
            raise _FaceTooLarge
        face_append(indices)

    solver.face.append = guarded_append
    try:
        b, iterations = solver.run(None, 20 * MAX_FACE)
    except (_FaceTooLarge, np.linalg.LinAlgError):
        return None
    r = H @ b - g
    gap = qp.frank_wolfe_gap(r, b, mass, float(a.sum()))
    tolerance = max(atol, _roundoff(r, b, mass))
    status = "optimal" if gap <= tolerance else "max_iterations"
    return qp.QPSolution(b, float(0.5 * b @ (r - g)), gap, iterations, status, "active_set",
                         {"support": int(np.count_nonzero(b))})


class _FaceTooLarge(Exception):
    pass


def _pcg(H, precondition, rhs: np.ndarray, max_iter: int = 500, rtol: float | None = None,
         projected: bool = False) -> tuple[np.ndarray, int]:
    rtol = CG_RTOL if rtol is None else rtol
    x = precondition(rhs)
    r = rhs - H(x)
    z = precondition(r)
    p = z.copy()
    rz = float(r @ z)
    size = float(np.linalg.norm(rhs)) or 1.0
    start = np.sqrt(max(float(rhs @ precondition(rhs)), 1e-300))
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - reported below
        # projected: the residual keeps a multiple of the constraint's normal; its preconditioned
        # (projected) part is what goes to zero
        if (np.sqrt(max(rz, 0.0)) <= rtol * start) if projected else (np.linalg.norm(r) <= rtol * size):
            break
        Hp = H(p)
        step = rz / float(p @ Hp)
        x += step * p
        r -= step * Hp
        z = precondition(r)
        rz, previous = float(r @ z), rz
        p = z + (rz / previous) * p
    return x, iterations


# ------------------------------------------------------------------------------ Hellinger
def grid_hellinger_step(F, mu: Measure, eta: float, conserve_mass: bool, rtol: float,
                        scale: float) -> ReactionResult:
    """The exact Hellinger reaction step of a local energy on mu's grid (module docstring):
    per cell b_i(nu) solves u'(b_i / h^d) + W_i + (2 / eta)(1 - sqrt(a_i / b_i)) = nu."""
    energy = local_energy(F, mu, "Splitting")
    a = mu.weights
    root_a = np.sqrt(a)
    live = np.isfinite(energy.potential)

    def cells(nu: float) -> tuple[np.ndarray, np.ndarray]:
        return _hellinger_cells(energy, root_a, eta, nu, live)

    nu = 0.0
    if conserve_mass:
        mass = float(a.sum())

        def excess(shift):  # decreasing in -nu: written for ``_decreasing_root`` in nu' = -nu
            b, db = cells(-shift)
            return float(b.sum()) - mass, float(db.sum())

        from .local_energy import _decreasing_root
        nu = -_decreasing_root(excess, 0.0, 1.0, mass)
    b, _ = cells(nu)
    # certificate: the largest violation of the cells' optimality condition, as an objective gap
    residual = _hellinger_residual(energy, root_a, eta, nu, b, live)
    gap = float(np.sum(np.abs(residual) * b))
    status = "optimal" if gap <= rtol * max(scale, 1e-300) else "max_iterations"
    info = {"weight_solver": "pointwise_newton", "weight_gap": gap, "multiplier": nu}
    return ReactionResult(b, gap / max(scale, 1e-300), status, info)


def _hellinger_residual(energy, root_a, eta, nu, b, live):
    rho = b / energy.cell_volume
    with np.errstate(divide="ignore", invalid="ignore"):
        value = energy.slope(rho) + energy.potential + (2 / eta) * (1 - root_a / np.sqrt(b)) - nu
    return np.where(live & (b > 0), value, 0.0)


def _hellinger_cells(energy, root_a, eta, nu, live) -> tuple[np.ndarray, np.ndarray]:
    """(b(nu), db/dnu) per cell by Newton in s = log b, kept in a bracket (the cell's equation is
    increasing in s); cells the energy excludes (W = +inf) get 0."""
    h = energy.cell_volume
    W = np.where(live, energy.potential, 0.0)

    def equation(s):
        b = np.exp(s)
        rho = b / h
        root_b = np.exp(0.5 * s)
        value = energy.slope(rho) + W + (2 / eta) * (1 - root_a / root_b) - nu
        curvature = energy.curvature(np.zeros_like(rho), rho)  # 1 / u''(rho)
        with np.errstate(divide="ignore"):
            slope = rho / curvature + root_a / (eta * root_b)  # d value / d s
        return value, slope

    low, high = np.full(root_a.shape, -800.0), np.full(root_a.shape, 800.0)
    s = np.log(np.maximum(root_a**2, 1e-300))
    for _ in range(HELLINGER_NEWTON):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            value, slope = equation(s)
        low = np.where(value < 0, s, low)
        high = np.where(value >= 0, s, high)
        with np.errstate(invalid="ignore", divide="ignore"):
            step = s - value / slope
        inside = np.isfinite(step) & (step >= low) & (step <= high)  # a converged cell sits on a bracket end
        s_new = np.where(inside, step, 0.5 * (low + high))
        if np.all(np.abs(s_new - s) <= 1e-14 * np.maximum(1.0, np.abs(s))):
            s = s_new
            break
        s = s_new
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        _, slope = equation(s)
    b = np.where(live, np.exp(s), 0.0)
    db = np.where(live & np.isfinite(slope) & (slope > 0), b / slope, 0.0)
    return b, db
