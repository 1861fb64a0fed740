"""Reaction (weight) steps on a fixed support, as quadratic programs for the solver of ``qp``.

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

which ``qp.solve_weight_qp`` solves exactly (docs/particles.md §3): from the dense weights a
of a step, a primal-dual active set on one Cholesky factorization of H (minimizers on most
particles, when the target overlaps them), and a primal active-set method grown from a vertex
(Lawson-Hanson for the orthant, its simplex analogue) for sparse minimizers (a few dozen of a
thousand weights, when the target lies outside what the particles represent). The result is
certified by the Frank-Wolfe gap r^T b - M min_i r_i, r = H b - g, an upper bound of
objective - optimum on the simplex (on the orthant the same bound with the mass of b).

Also here: the explicit (forward) reaction updates, and the paper's single projected-gradient
step b = P_C(a - eta f) (Gladin et al., ift_flow code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import linalg

from ..energies import PSD, Energy, NoWeightFormError
from ..kernels import GramCache, centred
from ..measures import Measure
from . import qp
from .qp import DEFAULT_WEIGHT_RTOL

# the QP pieces that moved to ``qp`` stay importable from here
QPSolution, frank_wolfe_gap, project_simplex, solve_weight_qp = (
    qp.QPSolution, qp.frank_wolfe_gap, qp.project_simplex, qp.solve_weight_qp)

WEIGHT_MODES = ("exact", "explicit", "projected_gradient")
HELLINGER_UPDATES = ("multiplicative", "linear")


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
    solution = qp.solve_weight_qp(H, g, mass, start=a if start is None else start,
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

    solution = qp.spectral_projected_gradient(value, gradient, len(a), mass, a if start is None
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

    b, decrement_sq, iterations = _hellinger_newton(A, c, root_a, a[live].copy(), eta, conserve_mass,
                                                    mass, 0.1 * rtol * scale, max_iter)
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
    floor = qp.ROUNDOFF_FACTOR * np.finfo(float).eps * mass * size
    status = "optimal" if gap <= max(rtol * scale, floor) else "max_iterations"
    info = {"weight_solver": "newton", "weight_iterations": iterations, "weight_gap": gap,
            "weight_roundoff": floor / scale}
    return ReactionResult(weights, gap / scale, status, info)


def _hellinger_newton(A, c, root_a, b, eta, conserve_mass, mass, stop, max_iter):
    """Damped Newton on min_b 1/2 b^T A b - c^T b + (2 / eta) sum(b - 2 sqrt(a b)) from b (> 0,
    the live weights), with a fraction-to-the-boundary rule and an Armijo search, on the simplex
    sum(b) = mass with ``conserve_mass`` (else on the orthant); stops when half the Newton
    decrement^2 is at most ``stop`` (quadratic convergence: asking 10x more than needed is
    cheap). Returns (b, decrement^2, iterations)."""

    def value(b):
        quadratic = 0.0 if A is None else 0.5 * b @ (A @ b)
        return float(quadratic - c @ b + (2 / eta) * np.sum(b - 2 * root_a * np.sqrt(b)))

    decrement_sq = np.inf
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - reported below
        root_b = np.sqrt(b)
        gradient = (0.0 if A is None else A @ b) - c + (2 / eta) * (1 - root_a / root_b)
        curvature = root_a / (eta * b * root_b)  # d^2/db^2 of the Hellinger term
        direction = _newton_direction(A, curvature, gradient, conserve_mass)
        decrement_sq = float(-gradient @ direction)
        if 0.5 * decrement_sq <= stop or not decrement_sq > 0:
            break
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
    return b, decrement_sq, iterations


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
    return qp.project_feasible(a - eta * f, float(a.sum()) if conserve_mass else None)


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
    return qp.project_feasible(a * np.exp(-eta * f), float(a.sum()) if conserve_mass else None)


def check_weight_mode(mode: str) -> str:
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown reaction step {mode!r}; choose one of {WEIGHT_MODES}")
    return mode


def reaction_kind(reaction) -> str:
    """"mmd" for a quadratic reaction (a metric G), "hellinger" otherwise."""
    if getattr(reaction, "quadratic", None) is None:
        raise ValueError(f"unsupported reaction geometry {reaction!r}")
    return "mmd" if reaction.quadratic else "hellinger"
