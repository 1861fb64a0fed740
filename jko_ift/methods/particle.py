"""Lagrangian (particle) JKO steps: points move and weights change.

A particle measure mu = sum_i a_i delta_{x_i} moves to sum_i b_i delta_{y_i}. Transporting
each weight a_i along x_i -> y_i is a coupling of mu^k and nu = sum_i a_i delta_{y_i}, so

    D^2 <= sum_i a_i |y_i - x_i|^2 / alpha + R^2(nu, sum_i b_i delta_{y_i}) / beta,

with R the reaction distance on the support y (MMD^2 = (b - a)^T (K_y + ridge I)(b - a), or
He^2 = 4 sum (sqrt a_i - sqrt b_i)^2). ``ParticleJKO`` minimizes

    J(y, b) = F(sum_i b_i delta_{y_i}) + [that upper bound of D^2] / (2 tau)

(the JKO step restricted to particle maps, docs/particles.md §4): positions by L-BFGS-B (SciPy)
with analytic gradients (1-D particles under Potential, Entropy and PorousMedium terms: Newton's
method with a tridiagonal Hessian, ``newton_transport_1d``, docs/particles.md §8), weights by
the exact reaction step of ``weights`` (for 1/2 MMD^2 under IFT on a working set,
``particle_joint``), minimizing the reduced objective min_b J(y, b) over y until the positions
are stationary after the last weight step. Each evaluation sums every kernel pair once
(``particle_sums``). It reports that residual (and the
weight step's certified gap) as its certificate. For a geometry without reaction it is the
proximal (backward Euler) step of the particle ODE x_i' = -alpha grad f(x_i); without transport
it is the exact reaction step. Interaction energies that are not convex in the weights work
here (the position step only needs gradients).

Shared with ``explicit`` and ``splitting``: the input checks, first variations at arbitrary
points, the transport sub-steps and the distance of a particle step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgError, solveh_banded
from scipy.optimize import minimize

from ..display import report_iteration
from ..energies import (
    Energy,
    ParticleOrderError,
    line_terms,
    position_derivatives,
)
from ..geometries import Geometry, InfConvolution, ReactionGeometry, Wasserstein
from ..measures import Measure
from . import particle_joint
from .base import Method, SolverError, Status, StepResult, check_step_input, clipping_report
from .options import count, flag, positive
from .particle_sums import Evaluation, evaluate, reaction_terms
from .weights import (
    DEFAULT_WEIGHT_RTOL,
    GramCache,
    hellinger_step,
    mmd_metric,
    mmd_step,
)

#: Default relative certificate of the particle JKO step: the predicted remaining decrease of
#: the step objective (a Newton step in the transport metric) over its scale, and the weight
#: step's certified gap over the same scale. 1e-9 pins positions to about
#: sqrt(2e-9 tau alpha / a_i) relative to the energy scale.
DEFAULT_PARTICLE_TOL = 1e-9

#: Round-off floor of the position residual: each entry of grad_u J is a sum of terms that
#: cancel at the solution, known to ROUNDOFF_FACTOR * eps times their size (weights.py).
ROUNDOFF_FACTOR = 1e3

#: L-BFGS-B memory; restarts of L-BFGS-B when it stops (line search or ftol) above the tolerance.
LBFGS_MEMORY = 20
LBFGS_RESTARTS = 3

#: Gradient-only iterations after L-BFGS-B stalls on round-off (``_gradient_polish``).
POLISH_ITERATIONS = 50

#: Alternations of (positions, weights) in the joint step before giving up.
DEFAULT_ALTERNATIONS = 50

#: The weight steps of the joint step (and its first position step at b = a) are solved to this
#: fraction of its tolerance, so that the position residual after a weight update measures the
#: coupling, not the inner accuracy. The reduced problem itself stops at the tolerance: its
#: residual is the step's.
INNER_TOL_FRACTION = 0.1


# -------------------------------------------------------------------------------------------------
# Checks and shared pieces
# -------------------------------------------------------------------------------------------------

def checked_evaluation(F: Energy, geometry: Geometry, mu: Measure, tau) -> tuple[float, Evaluation]:
    """The common checks of the particle methods, on F(mu), f and grad f (for a geometry with
    transport) from one evaluation (``particle_sums.evaluate``): (tau, that evaluation), to be
    reused by the step. Raises ValueError naming what was expected, what was received and how
    to fix it."""
    tau = check_step_input(F, geometry, mu, tau)
    _check_particle_geometry(F, geometry, mu)
    held = []

    def variation():
        held.append(evaluate(F, mu, variation=True, gradient=geometry.has_transport))
        return held[0].variation

    _checked("first variation", variation, mu)
    if geometry.has_transport:
        _checked("gradient of the first variation", lambda: held[0].gradient, mu)
    return tau, held[0]


def _check_particle_geometry(F: Energy, geometry: Geometry, mu: Measure) -> None:
    if not isinstance(geometry, (Wasserstein, ReactionGeometry, InfConvolution)):
        raise ValueError(f"particle methods take jk.Wasserstein(), jk.Hellinger(), jk.MMD(k), "
                         f"jk.WFR or jk.IFT (or another reaction geometry); got {geometry!r}")
    F.check_measure(mu, geometry.reaction is None or geometry.conserve_mass)
    reaction = geometry.reaction
    if reaction is not None and reaction.quadratic and not reaction.metric_definite \
            and not geometry.conserve_mass:
        raise ValueError(f"{reaction!r} is only conditionally positive definite: its distance "
                         "is one only between equal masses; pass conserve_mass=True to the "
                         "geometry")


def _checked(what: str, compute, mu: Measure) -> np.ndarray:
    try:
        values = np.asarray(compute(), dtype=float)
    except ValueError as error:
        raise ValueError(f"the energy's {what} cannot be evaluated on these {mu.n} particles "
                         f"in dimension {mu.dim}: {error}") from error
    if not np.all(np.isfinite(values)):
        raise ValueError(f"the energy's {what} is not finite (NaN or inf) at some particles; "
                         "check the callables (V, grad_V, W, grad_W) and the particle positions")
    return values


def variation_at(F: Energy, mu: Measure, z: np.ndarray, gradient: bool = False) -> np.ndarray:
    """The first variation f = dF/dmu[mu] (or its gradient) at other points z: (m, d), as the
    energy states it (``Energy.first_variation_at``). Needed for noise injection (Arbel et al.)
    and for particles of zero mass."""
    return F.first_variation_at(mu, z, gradient)


def reaction_distance_sq(reaction, points: np.ndarray, a: np.ndarray, b: np.ndarray,
                         conserve_mass: bool, grams: GramCache | None = None) -> float:
    """R^2 between weights a and b on the same points: He^2 or MMD^2 (with the ridge); with
    ``grams``, a quadratic reaction's metric from the cached Gram matrices."""
    if grams is not None and reaction.quadratic:
        diff = b - a
        return float(diff @ mmd_metric(reaction, grams, conserve_mass) @ diff)
    return reaction.weight_distance_sq(points, a, b)


def particle_distance_sq(geometry: Geometry, x: np.ndarray, a: np.ndarray, y: np.ndarray,
                         b: np.ndarray) -> float:
    """sum_i a_i |y_i - x_i|^2 / alpha + R^2(a, b on y) / beta: an upper bound of D^2 (the
    geometry's ``step_distance`` through nu = sum_i a_i delta_{y_i})."""
    cost = float(a @ np.sum((y - x) ** 2, axis=1)) if geometry.has_transport else 0.0
    return geometry.step_distance(cost, y, a, b)


def positivity_preserving(geometry: Geometry) -> bool:
    """Whether the geometry's reaction steps keep positive weights positive (Hellinger)."""
    return geometry.reaction is not None and geometry.reaction.positivity_preserving


def energy_scale(F: Energy, mu: Measure) -> float:
    """The scale certificates are relative to: |F(mu^k)| (floored)."""
    return max(abs(F.value(mu)), 1e-300)


@dataclass(frozen=True)
class ForwardStep:
    """What ``finish`` needs to judge an explicit (forward) step mu -> mu + d: F(mu) and the
    decrease the step predicts to first order, P = -<grad F(mu), d> (> 0 for a descent step;
    in particle coordinates grad F = (a_i grad f(x_i), f(x_i)))."""

    energy_before: float
    descent: float


def stability_ratio(energy_before: float, energy_after: float, descent: float) -> float:
    """tau kappa, the step size times the curvature of F along a forward step d = -tau M^{-1} g.

    In the metric M of the step |d|_M^2 = tau P, so F along d is, to second order,
    F(mu + d) = F(mu) - P + kappa |d|_M^2 / 2 = F(mu) - P (1 - tau kappa / 2), hence
    tau kappa = 2 (1 + (F(mu + d) - F(mu)) / P): a secant estimate, exact for quadratic F.
    Forward Euler is stable along d (F decreases) iff tau kappa < 2, and it satisfies the JKO
    dissipation inequality F(mu + d) + |d|_M^2 / (2 tau) <= F(mu) iff tau kappa <= 1.
    """
    return 2.0 * (1.0 + (energy_after - energy_before) / descent)


def value_magnitude(F: Energy, mu: Measure) -> float:
    """The size of the terms that add up to F(mu) (their sum's round-off is eps times this), as
    the energy states it (``Energy.value_magnitude``; |F(mu)| by default)."""
    return F.value_magnitude(mu)


def forward_stability(F: Energy, mu: Measure, new: Measure, energy_after: float,
                      forward: ForwardStep, tau: float, info: dict, method: str,
                      piece: str = "explicit step", fraction: float = 1.0) -> str:
    """"optimal", or "unstable" when the energy rose along an explicit step by more than its
    round-off (``stability_ratio`` above 2); records ``info["stability_ratio"]`` (the largest
    over the explicit pieces of a step). ``piece``, ``fraction``: what is judged and its step
    as a fraction of tau (the pieces of a splitting)."""
    if not (forward.descent > 0 and np.isfinite(forward.energy_before)):
        return "optimal"  # not a descent direction (noise injection): nothing to judge
    ratio = stability_ratio(forward.energy_before, energy_after, forward.descent)
    info["stability_ratio"] = max(ratio, info.get("stability_ratio", -np.inf))
    rise = energy_after - forward.energy_before
    if rise <= 0:
        return "optimal"
    floor = ROUNDOFF_FACTOR * np.finfo(float).eps * (value_magnitude(F, mu) + value_magnitude(F, new))
    if rise <= floor:  # F at round-off (a converged run): its changes are noise
        return "optimal"
    size = f"tau = {tau:.4g}" if fraction == 1 else f"{fraction:g} tau = {fraction * tau:.4g}"
    info["failure"] = (
        f"{method}: the {piece} of {size} is past its stability limit: F rose "
        f"from {forward.energy_before:.6g} to {energy_after:.6g}, so its step times the curvature "
        f"of F along it is about {ratio:.3g}, above the limit 2 of forward Euler (for the W2 "
        "flow of a potential V: tau alpha Lip(grad V) < 2; for an MMD reaction: tau beta times "
        "the largest eigenvalue of (K + ridge I)^{-1} times the Hessian of F in the weights < 2). "
        f"Take tau below about {2 * tau / ratio:.3g}, or an implicit method: jk.ParticleJKO() or "
        "jk.Splitting(transport='implicit', reaction='exact')")
    return "unstable"


def finish(F: Energy, geometry: Geometry, mu: Measure, y: np.ndarray, b: np.ndarray, tau: float,
           status: str, certificate: float, info: dict, throw: bool, method: str,
           forward: ForwardStep | None = None, energy: float | None = None) -> StepResult:
    """Build the StepResult of a particle step (and raise on failure when asked).

    Weights set to zero are reported (``clipping_report``); ``forward`` (explicit steps) makes
    a step whose energy rose "unstable" (``forward_stability``). ``energy``: F(sum_i b_i
    delta_{y_i}) when the solver already has it (not evaluated again)."""
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(b))):
        result = StepResult.failed("diverged", info)
        if throw:
            raise SolverError(f"{method}: the step produced non-finite positions or weights "
                              f"(tau = {tau:.3g} is beyond the stability limit of this scheme); "
                              "take a smaller tau or an implicit method (jk.ParticleJKO); pass "
                              "throw=False to get the StepResult instead", "diverged", result)
        return result
    clipping_report(mu.weights, b, info, method)
    new = Measure(y, np.maximum(b, 0.0))
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            if energy is None or np.any(b < 0):
                energy = F.value(new)
        except ParticleOrderError:  # an energy of 1-D particles whose order the step broke
            i = int(np.flatnonzero(np.diff(y[:, 0]) <= 0)[0])
            energy = np.nan
            info["failure"] = (f"the step moved 1-D particles past each other (x[{i}] >= "
                               f"x[{i + 1}] after it), where their Lagrangian density is undefined")
        distance_sq = particle_distance_sq(geometry, mu.points, mu.weights, y, new.weights)
    if not (np.isfinite(energy) and np.isfinite(distance_sq)):
        status, certificate = "diverged", np.inf
    elif Status(status).ok and forward is not None \
            and forward_stability(F, mu, new, energy, forward, tau, info, method) == "unstable":
        status = "unstable"
    result = StepResult.build(F, new, tau, distance_sq, status, certificate, info, energy)
    if throw and not result.ok:
        why = f" ({info['failure']})" if "failure" in info else ""
        if status == "diverged":
            what = info.get("failure", f"the step overflowed (energy {energy:.3g}, D^2 "
                                       f"{distance_sq:.3g})")
            raise SolverError(f"{method}: {what}; tau = {tau:.3g} is beyond the stability limit "
                              "of this scheme: take a smaller tau or an implicit method "
                              "(jk.ParticleJKO)", status, result)
        if status == "unstable":
            raise SolverError(f"{info['failure']}; pass throw=False to get the StepResult "
                              "(status 'unstable') instead", status, result)
        raise SolverError(f"{method}: step not solved to its tolerance: status {status!r}, "
                          f"certificate {certificate:.3g}{why}. Try a smaller tau, more "
                          "iterations or a looser tol; pass throw=False to get the StepResult "
                          "instead", status, result)
    return result


# -------------------------------------------------------------------------------------------------
# Transport sub-steps
# -------------------------------------------------------------------------------------------------

VELOCITIES = ("wasserstein", "euclidean")


def explicit_transport(F: Energy, mu: Measure, eta: float, velocity: str = "wasserstein",
                       gradient: np.ndarray | None = None) -> np.ndarray:
    """Forward Euler of the transport: y_i = x_i - eta v_i with v_i = grad f(x_i).

    velocity "euclidean" uses v_i = (n a_i / M) grad f(x_i), the Euclidean gradient of F in
    the positions scaled so that uniform weights give the same step: what the code of
    Gladin et al. does (X += lr * (-grad_X MMD^2)). It moves heavy particles faster, which the
    Wasserstein flow does not.
    """
    if velocity not in VELOCITIES:
        raise ValueError(f"unknown velocity {velocity!r}; choose one of {VELOCITIES}")
    grad = F.grad_first_variation(mu) if gradient is None else gradient
    if velocity == "euclidean":
        grad = grad * (mu.n * mu.weights / mu.mass)[:, None]
    return mu.points - eta * grad


def forward_transport(F: Energy, mu: Measure, eta: float, velocity: str = "wasserstein",
                      gradient: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The explicit transport piece: y = ``explicit_transport`` (points (n, d)) and the first
    order change of F along it, sum_i a_i grad f(x_i) . (y_i - x_i) (minus the decrease that
    ``forward_stability`` compares the actual change with)."""
    gradient = F.grad_first_variation(mu) if gradient is None else gradient
    y = explicit_transport(F, mu, eta, velocity, gradient)
    return y, float(mu.weights @ np.sum(gradient * (y - mu.points), axis=1))


def backward_transport(F: Energy, mu: Measure, eta: float, tol: float, scale: float,
                       max_iter: int, predictor: bool = True,
                       gradient: np.ndarray | None = None) -> TransportResult:
    """The implicit transport piece: the proximal position step of ``implicit_transport`` at
    b = a, started from the explicit step (``predictor``; ``gradient``: grad f at the points
    when known) or from the points."""
    guess = explicit_transport(F, mu, eta, gradient=gradient) if predictor else mu.points
    return implicit_transport(F, mu.points, mu.weights, eta, start=guess, tol=tol, scale=scale,
                              max_iter=max_iter)


@dataclass(frozen=True)
class TransportResult:
    """New positions (n, d), the certificate, status and info of a position step; ``weights``:
    the weights (n,) the certificate was computed with (those of the reduced problem's last
    weight solve); ``energy``: F at these points and weights when the solver evaluated it
    there (None otherwise)."""

    points: np.ndarray
    certificate: float
    status: str
    info: dict
    weights: np.ndarray | None = None
    energy: float | None = None


def implicit_transport(F: Energy, x: np.ndarray, a: np.ndarray, eta: float,
                       b: np.ndarray | None = None, coupling: tuple | None = None,
                       start: np.ndarray | None = None, tol: float = DEFAULT_PARTICLE_TOL,
                       scale: float | None = None, max_iter: int = 5000,
                       weights_at=None, terms=None) -> TransportResult:
    """Proximal (backward Euler) position step, by L-BFGS-B with analytic gradients:

        y = argmin_y  F(sum_i b_i delta_{y_i}) + sum_i a_i |y_i - x_i|^2 / (2 eta) [+ C(y)],

    b = a for a pure transport step. Without coupling, 1-D particles of positive weights under
    Potential, Entropy and PorousMedium terms go to ``newton_transport_1d`` instead (Newton with
    a tridiagonal Hessian; L-BFGS-B stalls on the log barrier of the spacings).
    ``coupling`` = (reaction, beta tau, conserve_mass) adds
    the reaction distance R^2(a, b on y) / (2 beta tau) of the joint step: for MMD,
    (b - a)^T (K_y + ridge I)(b - a) depends on y (a force); He^2 does not.
    Variables u_i = (y_i - x_i) sqrt(w_i / (eta scale)), w_i = max(a_i, b_i), make the scaled
    transport term |u|^2 / 2 (values, gradients and variables of order one whatever the
    weights and the size of the energy).
    Particles with a_i = b_i = 0 do not enter J; they take the backward Euler step of the
    particle ODE in the final field, y_i = argmin f(y) + |y - x_i|^2 / (2 eta).
    Certificate: |grad_u J|^2 / 2 over ``scale``: the decrease a Newton step would still make.
    ``weights_at``: y -> b*(y) makes this the reduced problem min_y min_b J(y, b) of the joint
    step (b re-solved at every evaluation; the variable scaling stays that of the initial b).
    ``terms``: y -> (b*(y), F's ``particle_sums.Evaluation`` there, (R^2, its force)) gives
    the reduced problem's pieces at once (``particle_joint``; with ``weights_at`` = its b).
    """
    b = a if b is None else b
    if coupling is None and weights_at is None:
        terms = newton_terms(F, x, a)
        if terms is not None:
            return newton_transport_1d(terms, x, a, b, eta, start, scale if scale is not None else 1.0,
                                       min(max_iter, NEWTON_MAX_ITERATIONS))
    scale = max(abs(scale) if scale is not None else 1.0, 1e-300)
    objective = _PositionObjective(F, x, a, b, eta, coupling, scale, weights_at, start, terms)
    start_time = time.perf_counter()
    y_full, b, status, certificate, iterations, floor = _lbfgs_positions(
        objective, tol, max_iter)
    if status == "optimal" and objective.live.size < x.shape[0]:
        y_full = _move_massless(F, x, b, y_full, objective.live, eta)
    info = {"position_iterations": iterations, "position_evaluations": objective.evaluations,
            "position_time": time.perf_counter() - start_time, "position_roundoff": floor}
    known = objective.at(y_full)
    energy = known.energy.value if known is not None and np.array_equal(known.b, b) else None
    return TransportResult(y_full, certificate, status, info, b, energy)


class _PositionObjective:
    """J of ``implicit_transport`` in the scaled variables u of the live particles:
    y = x + root * u on them, root_i = sqrt(eta scale / w_i); calls return (J / scale,
    grad_u J / scale), and (inf, 0) outside the domain of F."""

    def __init__(self, F, x, a, b, eta, coupling, scale, weights_at, start, terms=None):
        self.F, self.x, self.a, self.weights, self.eta = F, x, a, b, eta
        self.coupling, self.scale, self.weights_at = coupling, scale, weights_at
        self.terms = self._terms if terms is None else terms
        # w_i = a_i (b_i for a particle born in the step, a_i = 0): u_i = (y_i - x_i)
        # sqrt(w_i / (eta scale)) makes the scaled transport term |u|^2 / 2, so values, gradients
        # and variables are all of order one. Not max(a_i, b_i): a particle that gained weight
        # (b_i >> a_i, the support of an MMD weight step) would get a Hessian of about
        # a_i / b_i in u and stall L-BFGS-B.
        weight = np.where(a > 0, a, b)
        self.live = np.flatnonzero(weight > 0)
        self.root = np.sqrt(eta * scale / weight[self.live])[:, None]
        self.y_full = x.copy() if start is None else np.array(start, dtype=float)
        self.evaluations = 0
        self.last: _Evaluated | None = None

    def positions(self, u_flat: np.ndarray) -> np.ndarray:
        y = self.y_full.copy()
        y[self.live] = self.x[self.live] + self.root * u_flat.reshape(-1, self.x.shape[1])
        return y

    def __call__(self, u_flat):
        """(J / scale, grad_u J / scale) at u; the last evaluation is kept (``last``), so that
        asking again at the same u (L-BFGS-B's final point, the residual) costs nothing."""
        last = self.last
        if last is not None and np.array_equal(last.u, u_flat):
            return last.value, last.gradient
        self.evaluations += 1
        x, a, eta, live, coupling = self.x, self.a, self.eta, self.live, self.coupling
        y = self.positions(u_flat)
        if not np.all(np.isfinite(y)):
            return np.inf, np.zeros_like(u_flat)
        try:
            b, energy, (distance_sq, force) = self.terms(y)
        except ParticleOrderError:  # 1-D particles past each other: outside the domain of F
            return np.inf, np.zeros_like(u_flat)
        value = energy.value + float(a[live] @ np.sum((y[live] - x[live]) ** 2, axis=1)) / (2 * eta)
        grad_y = b[live, None] * energy.gradient[live] + a[live, None] * (y[live] - x[live]) / eta
        if coupling is not None:
            value += distance_sq / (2 * coupling[1])
            if force is not None:
                grad_y += force[live] / coupling[1]
        grad_u = (grad_y * self.root).ravel() / self.scale
        weight = np.maximum(a, b)[live]  # the residual's weights (``position_residual``)
        counted = weight > 0
        certificate = 0.5 * float(np.sum(grad_y[counted] ** 2 * (eta / weight[counted])[:, None]))
        certificate /= self.scale
        self.last = _Evaluated(np.array(u_flat, dtype=float), value / self.scale, grad_u, y, b,
                               energy, force, certificate)
        return value / self.scale, grad_u

    def _terms(self, y: np.ndarray):
        """(b, F's ``Evaluation`` at (y, b), (R^2(a, b on y), its force or None)): the weights
        given or b*(y) (``weights_at``); (0, None) without coupling. R^2 on the moving support
        pulls on y for MMD; He^2 does not depend on y, but b*(y) does in the reduced problem."""
        b = self.weights if self.weights_at is None else self.weights_at(y.copy())
        energy = evaluate(self.F, Measure(y, b))
        if self.coupling is None:
            return b, energy, (0.0, None)
        return b, energy, reaction_terms(self.coupling[0], y, self.a, b)

    def stop_at(self, tol: float):
        """An L-BFGS-B callback that ends the iterations once the iterate's certificate (from
        its kept evaluation) is at most tol: the test of the step, where L-BFGS-B's own
        (max_i |grad_u_i| <= gtol) is up to n times stricter."""

        done = [0]

        def stop(intermediate_result):
            done[0] += 1
            last = self.last
            if last is not None and np.array_equal(last.u, intermediate_result.x):
                report_iteration(done[0], last.certificate, "positions")  # the run's bar
                if last.certificate <= tol:
                    raise StopIteration

        return stop

    def at(self, y: np.ndarray) -> _Evaluated | None:
        """The kept evaluation if it was at the positions y, else None."""
        last = self.last
        return last if last is not None and np.array_equal(last.y, y) else None


@dataclass(frozen=True)
class _Evaluated:
    """One evaluation of ``_PositionObjective``: the variables u, J / scale, grad_u J / scale,
    the positions y (n, d) and weights b it was at, F's ``Evaluation`` there and the reaction's
    force (None without one); ``certificate``: the position residual there (that of
    ``position_residual``, whose scaling uses max(a_i, b_i))."""

    u: np.ndarray
    value: float
    gradient: np.ndarray
    y: np.ndarray
    b: np.ndarray
    energy: Evaluation
    force: np.ndarray | None
    certificate: float


def _lbfgs_positions(objective: _PositionObjective, tol: float, max_iter: int):
    """L-BFGS-B on the live particles (with LBFGS_RESTARTS restarts and a gradient polish when
    it stalls on value noise) until the position residual is at most tol or its floor.
    Returns (positions, weights, status, certificate, iterations, floor)."""
    x, a, live = objective.x, objective.a, objective.live
    y_full, b = objective.y_full, objective.weights
    u = ((y_full[live] - x[live]) / objective.root).ravel()
    gtol = np.sqrt(2.0 * tol / max(u.size, 1))
    status, certificate, iterations, floor = "optimal", 0.0, 0, 0.0
    if not live.size:
        return y_full, b, status, certificate, iterations, floor
    for _ in range(LBFGS_RESTARTS + 1):
        result = minimize(objective, u, jac=True, method="L-BFGS-B", callback=objective.stop_at(tol),
                          options={"maxcor": LBFGS_MEMORY, "gtol": gtol, "ftol": 1e-3 * tol,
                                   "maxiter": max_iter, "maxfun": 2 * max_iter})
        iterations += int(result.nit)
        u = result.x
        value, grad = objective(u)
        if not np.isfinite(value):
            status = "diverged"
            break
        if objective.last.certificate > tol:  # stalled on value noise: use gradients only
            u = _gradient_polish(objective, u, grad, tol)
        y_full = y_full.copy()  # (a Measure built on it below makes it read-only)
        y_full[live] = x[live] + objective.root * u.reshape(-1, x.shape[1])
        if objective.weights_at is not None:
            b = objective.weights_at(y_full.copy())
        certificate, floor = position_residual(objective.F, x, a, y_full, b, objective.eta,
                                               objective.coupling, objective.scale,
                                               objective.at(y_full))
        if certificate <= max(tol, floor):
            break
    else:
        status = "optimal_inaccurate"
    return y_full, b, status, certificate, iterations, floor


# -------------------------------------------------------------------------------------------------
# The Newton position step of 1-D particles
# -------------------------------------------------------------------------------------------------

#: The Newton position step stops when |grad J| <= NEWTON_GRADIENT_RTOL |terms of grad J| (the
#: forces and the pull that cancel at the solution), or at the round-off floor of that ratio.
NEWTON_GRADIENT_RTOL = 1e-12

#: The round-off floor of the relative gradient: NEWTON_ROUNDOFF_FACTOR eps times the size of
#: the terms of grad J plus the change of grad J under a perturbation of y by eps |y| (the
#: spacings of nearby particles are known to eps |y| absolutely). A line search that stalls
#: below NEWTON_STALL_FACTOR times this floor has reached round-off and is accepted.
NEWTON_ROUNDOFF_FACTOR = 1.0
NEWTON_STALL_FACTOR = 100.0

#: Newton iterations before giving up (the Fokker-Planck step takes 1-7, docs/particles.md §8).
NEWTON_MAX_ITERATIONS = 200

#: Sufficient decrease of the line search, and the fraction of the step at which two particles
#: would meet that the line search may take at most (the spacing energies are barriers). After
#: MAX_BACKTRACKS halvings (a step of 1e-12 of the Newton step) the direction is not one of
#: descent: the gradient does not belong to the value (or round-off is reached).
ARMIJO_FRACTION = 1e-4
BOUNDARY_FRACTION = 0.99
MAX_BACKTRACKS = 40

#: Objective values differing by less than this many eps times the size of their terms are equal
#: (then the line search accepts a step that lowers |grad J| instead).
VALUE_ROUNDOFF_FACTOR = 1e2


def newton_terms(F: Energy, x: np.ndarray, a: np.ndarray) -> list | None:
    """The terms of F for the Newton position step (``energies.line_terms``), or None when the
    step cannot take this case: points not 1-D, a particle of zero mass, or another energy."""
    if x.shape[1] != 1 or not np.all(a > 0):
        return None
    return line_terms(F)


def newton_transport_1d(terms, x: np.ndarray, a: np.ndarray, b: np.ndarray, eta: float,
                        start: np.ndarray | None = None, scale: float = 1.0,
                        max_iter: int = NEWTON_MAX_ITERATIONS) -> TransportResult:
    """Proximal position step of 1-D particles, points x (n, 1), by Newton's method:

        y = argmin_y  J(y) = F(sum_i b_i delta_{y_i}) + sum_i a_i (y_i - x_i)^2 / (2 eta)

    for F = sum_k c_k G_k with Potential and InternalEnergy terms (``energies.line_terms``). The
    Hessian of J is tridiagonal (the spacings couple neighbours only): the exact terms of the
    Lagrangian entropy or porous medium, a_i V''(x_i) from a central difference of grad_V, and
    a_i / eta; each direction costs one banded Cholesky solve (scipy.linalg.solveh_banded; a
    Hessian that is not positive definite, from a concave potential, gets a multiple of the
    a_i / eta diagonal added). The line search keeps the particles ordered (at most
    BOUNDARY_FRACTION of the step at which two would meet) and asks for an Armijo decrease of J
    (or, once that decrease is below the round-off of J, a smaller gradient).

    Stops when the relative gradient |grad J| / |terms of grad J| is below NEWTON_GRADIENT_RTOL or
    its round-off floor (``info["relative_gradient"]``, ``info["relative_gradient_floor"]``).
    The certificate is that of ``implicit_transport``, |grad_u J|^2 / 2 over ``scale``. A stalled
    line search or too many iterations give status "optimal_inaccurate" and ``info["failure"]``
    saying why; particles that are not ordered at the start give "diverged".
    """
    start_time = time.perf_counter()
    problem = _LineProblem(terms, x[:, 0], a, b, eta)
    info: dict = {"position_solver": "newton_banded"}
    if not problem.ordered(problem.x):
        i = int(np.flatnonzero(np.diff(problem.x) <= 0)[0])
        info.update(position_iterations=0, position_evaluations=0,
                    failure=f"the particles are not strictly increasing at the start of the "
                            f"position step (x[{i}] >= x[{i + 1}]; an explicit piece moved them "
                            "past each other): take a smaller tau")
        return TransportResult(x.copy(), np.inf, "diverged", info)
    point = problem.start(start)
    status, iterations, failure = "optimal_inaccurate", 0, None
    while True:
        test = problem.stopping_test(point)
        if test.relative <= max(NEWTON_GRADIENT_RTOL, test.floor):
            status = "optimal"
            break
        if iterations >= max_iter:
            failure = (f"the Newton position step did not reach the relative gradient "
                       f"{NEWTON_GRADIENT_RTOL:.0e} in {max_iter} iterations (at {test.relative:.2g}); "
                       "Newton converges in a few iterations when grad_V is the gradient of V "
                       "and V is convex: check grad_V, or take a smaller tau")
            break
        iterations += 1
        trial = problem.line_search(point, test)
        if trial is None:
            if test.relative <= NEWTON_STALL_FACTOR * test.floor:  # no representable y does better
                status = "optimal"
                info["stalled_at_roundoff"] = True
                break
            failure = (f"the Newton position step stalled at the relative gradient "
                       f"{test.relative:.2g} (target {NEWTON_GRADIENT_RTOL:.0e}, round-off floor "
                       f"{test.floor:.2g}) after {iterations} iterations: no step along the "
                       "Newton direction lowers the objective; check that grad_V is the gradient "
                       "of V, or take a smaller tau")
            break
        point = trial
    root = np.sqrt(eta / np.maximum(a, b))
    certificate = 0.5 * float(np.sum((point.gradient * root) ** 2)) / max(abs(scale), 1e-300)
    roundoff = 0.5 * float(np.sum((test.noise * root) ** 2)) / max(abs(scale), 1e-300)
    info.update(position_iterations=iterations, position_evaluations=problem.evaluations,
                position_time=time.perf_counter() - start_time, position_roundoff=roundoff,
                relative_gradient=test.relative, relative_gradient_floor=test.floor)
    if failure is not None:
        info["failure"] = failure
    return TransportResult(point.y[:, None], certificate, status, info)


@dataclass(frozen=True)
class _LinePoint:
    """An iterate of the 1-D Newton step: positions y (n,), J(y), grad J (n,), the terms."""

    y: np.ndarray
    value: float
    gradient: np.ndarray
    derivatives: object  # energies.position_derivatives: value, gradient, tridiagonal Hessian


@dataclass(frozen=True)
class _StoppingTest:
    """|grad J| over the size of its terms, its round-off floor, the Hessian's diagonal."""

    relative: float
    floor: float
    residual: float
    noise: np.ndarray
    hessian_diagonal: np.ndarray


class _LineProblem:
    """J(y) = F(sum_i b_i delta_{y_i}) + sum_i a_i (y_i - x_i)^2 / (2 eta) on the line
    (``newton_transport_1d``): evaluations, the stopping test and the safeguarded line search."""

    def __init__(self, terms, x: np.ndarray, a: np.ndarray, b: np.ndarray, eta: float):
        self.terms, self.x, self.b = terms, x, b
        self.pull = a / eta
        self.spacings = any(term.couples_neighbours for _, term in terms)
        self.evaluations = 0

    def evaluate(self, y: np.ndarray) -> _LinePoint:
        self.evaluations += 1
        derivatives = position_derivatives(self.terms, y, self.b)
        shift = y - self.x
        value = derivatives.value + 0.5 * float(self.pull @ shift**2)
        gradient = derivatives.gradient + self.pull * shift
        return _LinePoint(y, value, gradient, derivatives)

    def ordered(self, y: np.ndarray) -> bool:
        return not self.spacings or bool(np.all(np.diff(y) > 0))

    def start(self, start: np.ndarray | None) -> _LinePoint:
        """x, or the guess ``start`` (n, 1) when it keeps the order and lowers J."""
        point = self.evaluate(self.x.copy())
        if start is not None:
            guess = np.asarray(start, dtype=float)[:, 0]
            if np.all(np.isfinite(guess)) and self.ordered(guess):
                guessed = self.evaluate(guess)
                if guessed.value < point.value:
                    return guessed
        return point

    def stopping_test(self, point: _LinePoint) -> _StoppingTest:
        """The relative gradient and its floor: the round-off of the terms of grad J, and of
        H times a perturbation of y by eps |y|."""
        y, derivatives, pull = point.y, point.derivatives, self.pull
        hessian_diagonal = derivatives.diagonal + pull
        size = derivatives.magnitude + pull * np.abs(y - self.x)
        size_norm = max(float(np.linalg.norm(size)), 1e-300)
        residual = float(np.linalg.norm(point.gradient))
        spread = np.abs(hessian_diagonal) * np.abs(y)
        spread[:-1] += np.abs(derivatives.upper) * np.abs(y[1:])
        spread[1:] += np.abs(derivatives.upper) * np.abs(y[:-1])
        noise = NEWTON_ROUNDOFF_FACTOR * np.finfo(float).eps * (size + spread)
        floor = float(np.linalg.norm(noise)) / size_norm
        return _StoppingTest(residual / size_norm, floor, residual, noise, hessian_diagonal)

    def line_search(self, point: _LinePoint, test: _StoppingTest) -> _LinePoint | None:
        """The accepted trial along the Newton direction, or None after MAX_BACKTRACKS."""
        y, value, gradient = point.y, point.value, point.gradient
        direction = _banded_newton_direction(test.hessian_diagonal, point.derivatives.upper,
                                             gradient, self.pull)
        slope = float(gradient @ direction)
        step = 1.0
        if self.spacings:
            closing = np.diff(direction)
            meeting = closing < 0
            if meeting.any():
                step = min(1.0, BOUNDARY_FRACTION * float(np.min(-np.diff(y)[meeting] / closing[meeting])))
        value_noise = (VALUE_ROUNDOFF_FACTOR * np.finfo(float).eps
                       * (point.derivatives.value_magnitude + abs(value)))
        for _ in range(MAX_BACKTRACKS):
            trial = y + step * direction
            if self.ordered(trial):
                candidate = self.evaluate(trial)
                if np.isfinite(candidate.value) and (
                        candidate.value <= value + ARMIJO_FRACTION * step * slope
                        or (-step * slope <= value_noise and candidate.value <= value + value_noise
                            and np.linalg.norm(candidate.gradient) < test.residual)):
                    return candidate
            step *= 0.5
        return None


def _banded_newton_direction(diagonal, upper, gradient, pull) -> np.ndarray:
    """-H^{-1} g for the symmetric tridiagonal H (diagonal (n,), upper (n - 1,)); when H is not
    positive definite (a concave potential), H + lambda diag(pull) for growing lambda."""
    bands = np.zeros((2, diagonal.size))
    bands[0, 1:] = upper
    coupled = bool(np.any(upper))  # only potentials: a diagonal Hessian
    for shift in (0.0, 1.0, 1e1, 1e2, 1e4, 1e8):
        bands[1] = diagonal + shift * pull
        if not coupled:
            if np.all(bands[1] > 0):
                return -gradient / bands[1]
            continue
        try:
            return solveh_banded(bands, -gradient, check_finite=False)
        except LinAlgError:
            continue
    raise SolverError("the Newton position step met a Hessian that no shift makes positive "
                      "definite; the energy is not convex enough for this tau: take a smaller tau")


def _gradient_polish(objective, u, grad, tol, iterations: int = POLISH_ITERATIONS):
    """Barzilai-Borwein steps on grad_u J = 0, accepted when |grad| decreases.

    L-BFGS-B's line search compares objective values; once the decrease left is below their
    round-off (sums of kernel terms that cancel) it stops although the gradient, computed to
    far better relative accuracy, is not yet small. In u the Hessian is the identity plus the
    energy's part, so gradient steps converge there; they only need gradients."""
    length = 1.0
    norm = float(grad @ grad)
    for _ in range(iterations):
        if 0.5 * norm <= tol:
            break
        for _ in range(30):
            trial = u - length * grad
            trial_value, trial_grad = objective(trial)
            trial_norm = float(trial_grad @ trial_grad)
            if np.isfinite(trial_value) and trial_norm < norm:
                break
            length *= 0.5
        else:
            break
        s, y = trial - u, trial_grad - grad
        u, grad, norm = trial, trial_grad, trial_norm
        curvature = float(s @ y)
        length = float(s @ s) / curvature if curvature > 0 else 1.0
    return u


def _move_massless(F, x, b, y, live, eta):
    """Backward Euler for particles of zero mass in the final field (they do not act on it)."""
    dead = np.setdiff1d(np.arange(x.shape[0]), live)
    mu_y = Measure(y, b)
    d = x.shape[1]
    try:
        variation_at(F, mu_y, x[dead[:1]])
    except ValueError:
        return y  # the energy cannot be evaluated away from the particles: they stay put

    def objective(flat):
        z = flat.reshape(-1, d)
        value = float(np.sum(variation_at(F, mu_y, z)) + np.sum((z - x[dead]) ** 2) / (2 * eta))
        grad = variation_at(F, mu_y, z, gradient=True) + (z - x[dead]) / eta
        return value, grad.ravel()

    result = minimize(objective, x[dead].ravel(), jac=True, method="L-BFGS-B",
                      options={"maxcor": LBFGS_MEMORY})
    if np.all(np.isfinite(result.x)):
        y = y.copy()
        y[dead] = result.x.reshape(-1, d)
    return y


def reaction_exact(F: Energy, geometry: Geometry, points: np.ndarray, a: np.ndarray, eta: float,
                   start=None, rtol: float = DEFAULT_WEIGHT_RTOL, scale: float | None = None,
                   grams: GramCache | None = None):
    """The exact reaction step of the geometry's reaction part on fixed points."""
    reaction = geometry.reaction
    if reaction.quadratic:  # its metric G: the weight QP
        return mmd_step(F, reaction, points, a, eta, geometry.conserve_mass, start=start,
                        rtol=rtol, grams=grams, energy_scale=scale)
    return hellinger_step(F, points, a, eta, geometry.conserve_mass, rtol=rtol, grams=grams,
                          energy_scale=scale)


def position_residual(F: Energy, x: np.ndarray, a: np.ndarray, y: np.ndarray, b: np.ndarray,
                      eta: float, coupling, scale: float, known=None) -> tuple[float, float]:
    """(|grad_u J|^2 / 2 / scale, its round-off floor) at (y, b), as in ``implicit_transport``;
    ``known``: terms already computed at some (y, b) (``_Evaluated``, ``_Known``: y, b, F's
    ``Evaluation``, the reaction force), reused when at these."""
    weight = np.maximum(a, b)
    live = weight > 0
    if known is not None and not (np.array_equal(known.y, y) and np.array_equal(known.b, b)):
        known = None
    gradient = F.grad_first_variation(Measure(y, b)) if known is None else known.energy.gradient
    force = b[:, None] * gradient
    pull = a[:, None] * (y - x) / eta
    grad = force + pull
    size = np.abs(force) + np.abs(pull)
    if coupling is None:
        force = None
    else:
        force = coupling[0].position_force(y, a, b) if known is None else known.force
    if force is not None:
        coupled = force / coupling[1]
        grad += coupled
        size += np.abs(coupled)
    root = np.sqrt(eta / weight[live])[:, None]
    residual = 0.5 * float(np.sum((grad[live] * root) ** 2)) / scale
    floor = 0.5 * float(np.sum((ROUNDOFF_FACTOR * np.finfo(float).eps * size[live] * root) ** 2))
    return residual, floor / scale


@dataclass(frozen=True)
class _Known:
    """F's ``Evaluation`` and the reaction force (n, d) at positions y and weights b."""

    y: np.ndarray
    b: np.ndarray
    energy: Evaluation
    force: np.ndarray | None


class _WeightsAt:
    """y -> b*(y), the exact weight step of the joint step at positions y: (n, d), warm started
    from the last solve and kept for the last y (asking again costs nothing). For F = 1/2 MMD^2
    under an MMD reaction (``particle_joint.applies``) the working-set solve of
    ``particle_joint.MMDJointTerms``, whose sums also give the position objective's terms
    (``terms``); otherwise ``reaction_exact`` (dense)."""

    def __init__(self, F, geometry, a, reaction_eta, scale, rtol):
        self.F, self.geometry, self.a, self.eta, self.scale, self.rtol = (
            F, geometry, a, reaction_eta, scale, rtol)
        self.engine = None
        if particle_joint.applies(F, geometry):
            self.engine = particle_joint.MMDJointTerms(F, geometry.reaction, a, reaction_eta,
                                                       geometry.conserve_mass, rtol * scale, scale)
        self.b, self.y, self.reaction, self.point = a, None, None, None
        self.iterations = self.solves = 0

    def __call__(self, y: np.ndarray) -> np.ndarray:
        self._solve(y)
        return self.b

    def terms(self, y: np.ndarray):
        """(b*(y), F's Evaluation there, (R^2, its force)): ``_PositionObjective``'s terms."""
        self._solve(y)
        point = self.point
        return point.weights, point.energy, (point.distance_sq, point.force)

    def known(self) -> _Known | None:
        """The terms at the last positions, for ``position_residual`` (None without them)."""
        if self.point is None:
            return None
        return _Known(self.y, self.b, self.point.energy, self.point.force)

    def _solve(self, y: np.ndarray) -> None:
        if self.y is not None and np.array_equal(self.y, y):
            return  # solved there last: the same weights
        if self.engine is None:
            reaction = reaction_exact(self.F, self.geometry, y, self.a, self.eta, start=self.b,
                                      scale=self.scale, rtol=self.rtol)
        else:
            self.point = self.engine.at(y, self.b)
            reaction = self.point.reaction
        self.b, self.reaction, self.y = reaction.weights, reaction, y.copy()
        self.iterations += int(reaction.info.get("weight_iterations", 0))
        self.solves += 1


# -------------------------------------------------------------------------------------------------
# The method
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ParticleJKO(Method):
    r"""Lagrangian JKO step: the particles move and, with a reaction, their weights change.

    Parameters
    ----------
    tol : float, default ``DEFAULT_PARTICLE_TOL``
        The accepted relative certificate: stationarity of the positions and gap of the
        weights, over :math:`|F(\mu^k)|`.
    max_alternations : int, default ``DEFAULT_ALTERNATIONS``
        Position / weight alternations of the joint step (WFR, IFT).
    max_iter : int, default 5000
        Iterations of the position solver.
    predictor : bool, default True
        Start the positions at the explicit step :math:`x - \tau\alpha\nabla f` (closer to the
        solution than :math:`x` for small steps; the 1-D Newton step takes it only when it
        keeps the order and lowers the objective).

    Raises
    ------
    SolverError
        From ``step`` when the step does not reach ``tol`` (with ``throw=True``).

    Notes
    -----
    From :math:`\mu^k = \sum_i a_i\delta_{x_i}` the step minimizes over positions :math:`y`
    and weights :math:`b`

    .. math::

        F\Big(\sum_i b_i\delta_{y_i}\Big) + \frac{1}{2\tau}\Big[\frac{1}{\alpha}\sum_i
        a_i|y_i - x_i|^2 + \frac{1}{\beta} R^2(a, b \text{ on } y)\Big],

    where :math:`R` is the reaction of the geometry (none for :math:`W_2`: then
    :math:`b = a`). The transport term is the cost of the plan that keeps each particle's
    identity, an upper bound of :math:`W_2^2` that equals it for small steps. 1-D particles
    under :class:`~jko_ift.Potential`, :class:`~jko_ift.Entropy` and
    :class:`~jko_ift.PorousMedium` terms (the Lagrangian density of
    ``energies.InternalEnergy``) take a banded Newton position step: ``info`` then has
    ``position_solver="newton_banded"``, ``relative_gradient`` (:math:`|\nabla J|` over the
    size of its terms, at most 1e-12 or its round-off floor ``relative_gradient_floor``) and
    the iterations.

    Examples
    --------
    >>> mu = jk.Measure([[1.0], [2.0]], [0.5, 0.5])
    >>> F = jk.Potential(lambda x: 0.5 * x[:, 0] ** 2, lambda x: x)
    >>> r = jk.ParticleJKO().step(F, jk.Wasserstein(), mu, tau=1.0)
    >>> r.measure.points.ravel().round(6).tolist()  # x / (1 + tau): implicit Euler
    [0.5, 1.0]
    """

    keeps_support = False  # the particles move
    local_error_order = 2  # O(tau^2) per step: implicit Euler (jko_ift.control)
    tol: float = DEFAULT_PARTICLE_TOL
    max_alternations: int = DEFAULT_ALTERNATIONS
    max_iter: int = 5000
    predictor: bool = True

    def __post_init__(self):
        self._settle(tol=positive("ParticleJKO", "tol", self.tol),
                     max_alternations=count("ParticleJKO", "max_alternations", self.max_alternations),
                     max_iter=count("ParticleJKO", "max_iter", self.max_iter),
                     predictor=flag("ParticleJKO", "predictor", self.predictor))

    def _step(self, F: Energy, geometry: Geometry, mu: Measure, tau: float, state,
              throw: bool = True) -> StepResult:
        start = time.perf_counter()
        tau, initial = checked_evaluation(F, geometry, mu, tau)
        x, a = mu.points, mu.weights
        scale = max(abs(initial.value), 1e-300)  # energy_scale(F, mu)
        info: dict = {"method": "particle_jko",
                      "positivity_preserving": positivity_preserving(geometry)}
        if not geometry.has_transport:  # pure reaction: the exact weight step
            reaction = reaction_exact(F, geometry, x, a, tau * geometry.beta, scale=scale,
                                      rtol=self.tol)
            info.update(reaction.info, wall_time=time.perf_counter() - start)
            return finish(F, geometry, mu, x, reaction.weights, tau, reaction.status,
                          reaction.certificate, info, throw, "ParticleJKO")
        eta = tau * geometry.alpha
        if geometry.reaction is None:  # pure transport: one proximal position step
            moved = backward_transport(F, mu, eta, self.tol, scale, self.max_iter, self.predictor,
                                       initial.gradient)
            info.update(moved.info, wall_time=time.perf_counter() - start)
            return finish(F, geometry, mu, moved.points, a, tau, moved.status, moved.certificate,
                          info, throw, "ParticleJKO", energy=moved.energy)
        return self._joint(F, geometry, mu, tau, eta, scale, info, throw, start, initial)

    def _joint(self, F, geometry, mu, tau, eta, scale, info, throw, start, initial):
        """Minimize the reduced objective phi(y) = min_b J(y, b) by L-BFGS-B: every evaluation
        solves the weight step exactly (warm started) and, the minimizer b*(y) being unique
        (strictly convex reaction), grad phi(y) = d_y J(y, b*(y)) (Danskin). Plain alternation
        contracts slowly when positions and weights are strongly coupled (weights moving between
        particles that move). It starts from the explicit step for 1/2 MMD^2 under an MMD
        reaction (``particle_joint``), otherwise after one alternation (positions at b = a,
        then the exact weights)."""
        x, a = mu.points, mu.weights
        reaction_eta = tau * geometry.beta
        coupling = (geometry.reaction, reaction_eta, geometry.conserve_mass)
        inner = INNER_TOL_FRACTION * self.tol
        weights_at = _WeightsAt(F, geometry, a, reaction_eta, scale, inner)
        terms = None if weights_at.engine is None else weights_at.terms
        if terms is not None:
            y = explicit_transport(F, mu, eta, gradient=initial.gradient) if self.predictor else x
            iterations = 0
        else:
            moved = backward_transport(F, mu, eta, inner, scale, self.max_iter, self.predictor,
                                       initial.gradient)
            if moved.status == "diverged":
                return finish(F, geometry, mu, moved.points, a, tau, "diverged", np.inf, info,
                              throw, "ParticleJKO")
            y, iterations = moved.points, moved.info["position_iterations"]
        b = weights_at(y)
        status, certificate, residual, floor = "optimal_inaccurate", np.inf, np.inf, 0.0
        known, energy = None, None
        for _ in range(self.max_alternations):
            residual, floor = known or position_residual(F, x, a, y, b, eta, coupling, scale,
                                                         weights_at.known())
            reaction = weights_at.reaction
            certificate = max(residual, reaction.certificate)
            floor = max(floor, reaction.info.get("weight_roundoff", 0.0))
            if certificate <= max(self.tol, floor) and reaction.ok:
                status = "optimal"
                break
            reduced = implicit_transport(F, x, a, eta, b=b, coupling=coupling, start=y, tol=self.tol,
                                         scale=scale, max_iter=self.max_iter,
                                         weights_at=weights_at, terms=terms)
            iterations += reduced.info["position_iterations"]
            if reduced.status == "diverged":
                status = "diverged"
                break
            y, b = reduced.points, weights_at(reduced.points)
            # the solver's last residual and energy were at (y, b) unless it moved massless points
            same = reduced.weights is not None and np.array_equal(reduced.weights, b)
            known = (reduced.certificate, reduced.info["position_roundoff"]) if same else None
            energy = reduced.energy if same else None
        info.update(position_iterations=iterations, weight_iterations=weights_at.iterations,
                    weight_solves=weights_at.solves, position_residual=residual,
                    weight_certificate=weights_at.reaction.certificate,
                    weight_solver=weights_at.reaction.info.get("weight_solver"),
                    wall_time=time.perf_counter() - start)
        return finish(F, geometry, mu, y, b, tau, status, certificate, info, throw, "ParticleJKO",
                      energy=energy)
