"""Distances between measures (MMD, W2, Hellinger-Kantorovich), the discrete dissipation inequality,
convergence orders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .energies import Energy
from .geometries import Wasserstein
from .kernels import Kernel
from .measures import Measure


def mmd(mu: Measure, nu: Measure, kernel: Kernel, squared: bool = False) -> float:
    """MMD(mu, nu) = ||mu - nu||_H for any two supports (blocked kernel sums).

    MMD is 1-homogeneous in the pair of masses: it is computed as s MMD(mu / s, nu / s) with
    s the larger mass, so that masses near the ends of the float range neither underflow nor
    overflow in the quadratic form. The kernel sums are translation invariant (centred). On a
    common support the weights are subtracted first, so that MMD is accurate relative to itself
    (the expanded form a^T K a - 2 a^T K b + b^T K b leaves ~sqrt(eps) |a| of round-off).
    """
    if mu.dim != nu.dim:
        raise ValueError(f"mmd needs measures in the same dimension, got {mu.dim} and {nu.dim}")
    scale = max(_finite_mass(mu, "mu"), _finite_mass(nu, "nu"))
    if scale == 0.0:
        return 0.0
    a, b = mu.weights / scale, nu.weights / scale
    if mu.same_support(nu):  # (a - b)^T K (a - b): accurate relative to MMD^2 itself
        difference = a - b
        value = difference @ kernel.apply(mu.points, mu.points, difference)
    else:  # three terms of size |a| |b|: MMD below ~sqrt(eps) |a| is round-off
        value = (a @ kernel.apply(mu.points, mu.points, a)
                 - 2 * a @ kernel.apply(mu.points, nu.points, b)
                 + b @ kernel.apply(nu.points, nu.points, b))
    value = max(float(value), 0.0)
    return scale**2 * value if squared else scale * float(np.sqrt(value))


def _finite_mass(mu: Measure, name: str) -> float:
    mass = mu.mass
    if not np.isfinite(mass):
        raise ValueError(f"mmd needs measures of finite mass; {name} has mass {mass!r} (the weights "
                         "overflow when summed); rescale the weights")
    return mass


def w2(mu: Measure, nu: Measure) -> float:
    """W2(mu, nu) by exact optimal transport (POT's network simplex); equal masses m > 0.

    Computed as sqrt(m W2^2(mu / m, nu / m)) (W2^2 is 1-homogeneous in the masses), so any
    positive finite mass works; zero or non-finite masses raise a ValueError.
    """
    return float(np.sqrt(max(Wasserstein().squared_distance(mu, nu), 0.0)))


def dissipation_slack(F: Energy, before: Measure, objective: float) -> float:
    """F(mu^k) - [F(mu^{k+1}) + D^2/(2 tau)]: nonnegative for an exact JKO step."""
    return float(F.value(before) - objective)


@dataclass(frozen=True)
class ConvergenceOrder:
    """error ~ C step^order, fitted by least squares on log-log data."""

    order: float
    stderr: float
    constant: float
    samples: int = 2

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Confidence interval of the order (Student t with samples - 2 degrees of freedom)."""
        from scipy import stats  # seconds to import; only studies fit orders

        dof = max(self.samples - 2, 1)
        half = stats.t.ppf(0.5 + confidence / 2, dof) * self.stderr
        return self.order - half, self.order + half


def convergence_order(step_sizes, errors) -> ConvergenceOrder:
    """Empirical order from (step size, error) pairs by regressing log error on log step."""
    h, e = np.asarray(step_sizes, float), np.asarray(errors, float)
    if h.shape != e.shape or h.size < 2:
        raise ValueError(f"need at least two (step, error) pairs of equal length, got "
                         f"{h.size} steps and {e.size} errors")
    if np.any(h <= 0) or np.any(e <= 0) or not np.all(np.isfinite(e)):
        raise ValueError("step sizes and errors must be positive and finite for a log-log fit")
    if h.size == 2:
        order = float(np.diff(np.log(e))[0] / np.diff(np.log(h))[0])
        return ConvergenceOrder(order, np.inf, float(e[0] / h[0] ** order), 2)
    from scipy import stats

    fit = stats.linregress(np.log(h), np.log(e))
    return ConvergenceOrder(float(fit.slope), float(fit.stderr), float(np.exp(fit.intercept)),
                            int(h.size))


def hellinger_kantorovich_sq(mu: Measure, nu: Measure, alpha: float = 1.0, beta: float = 1.0,
                             eps: float = 1e-3, tol: float = 1e-10,
                             max_iter: int = 20_000) -> tuple[float, dict]:
    """HK_{alpha,beta}^2(mu, nu) = (4 / beta) LET(mu, nu) of the entropic plan on a common support.

    The value is the unregularized LET functional KL(gamma_1 | a) + KL(gamma_2 | b) + <c, gamma>
    at the optimal entropic plan (an upper bound of the exact LET, tending to it as eps -> 0),
    with c = -log cos^2(min(|x - y| / ell, pi / 2)), ell = 2 sqrt(alpha / beta). Returns the
    value and diagnostics (iterations, marginal_violation, entropic_term, the plan marginals).
    """
    from .methods.entropic import EntropicJKO, _LETSinkhorn  # the scaling engine of the WFR step

    if not mu.same_support(nu):
        raise ValueError("hellinger_kantorovich_sq compares weights on a common support")
    method = EntropicJKO(eps, tol=tol, max_iter=max_iter, eps_scaling=False)
    solver = _LETSinkhorn(method, mu, float(alpha), float(beta))
    state = solver.run([method.eps], lambda eps_prime: _FixedMarginal(nu.weights, eps_prime),
                       None)
    value = (4.0 / beta) * state.let_value(nu.weights)
    info = dict(state.info, entropic_term=(4.0 / beta) * state.entropic, gamma1=state.gamma1,
                gamma2=state.gamma2)
    return float(value), info


class _FixedMarginal:
    """KL-prox of KL(. | b) / eps' (the soft second marginal of the static LET problem)."""

    def __init__(self, b: np.ndarray, eps_prime: float):
        with np.errstate(divide="ignore"):
            self.log_b = np.log(b)
        self.theta = 1.0 / (1.0 + eps_prime)

    def __call__(self, log_q):
        return self.theta * self.log_b + (1.0 - self.theta) * log_q
