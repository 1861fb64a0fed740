"""The energy terms of a particle step from as few kernel passes as possible.

An evaluation of the position objective of ``ParticleJKO`` needs F(mu), the gradient of the
first variation grad f(x_i) and, with an MMD reaction, R^2(a, b on y) and its force. For
F = 1/2 MMD^2 = 1/2 (a^T K a - 2 a^T K_xt p + p^T K_t p) the value and the gradient are sums
over the same two pairs of point sets, (x, x) with weights a and (x, t) with weights p;
``Kernel.apply_and_grad_sum`` gives K w and sum_j w_j grad k(x_i, y_j) from one pass over the
pairs for the Gaussian kernel (phi' = c phi), so an evaluation costs one witness gradient
instead of two (value and gradient separately). The same holds for the MMD reaction, whose
R^2 = c^T (K + ridge I) c and force c_i sum_j c_j grad k(y_i, y_j), c = b - a, share one pass.
Other energies and reactions go through their own methods (same numbers, separate passes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..energies import MMD2, Energy, Scaled, Sum
from ..geometries import MMD
from ..measures import Measure


@dataclass(frozen=True)
class Evaluation:
    """F(mu): float; its first variation f at the particles: (n,) (None unless asked for);
    grad f at the particles: (n, d) (None unless asked for)."""

    value: float
    variation: np.ndarray | None
    gradient: np.ndarray | None


def evaluate(F: Energy, mu: Measure, variation: bool = False, gradient: bool = True) -> Evaluation:
    """F(mu), and f and grad f at the particles when asked for: the values of ``F.value``,
    ``F.first_variation`` and ``F.grad_first_variation``, with each kernel pair of an MMD2 term
    summed once for all three."""
    if isinstance(F, MMD2):
        return _mmd2(F, mu)
    if isinstance(F, Sum):
        parts = [evaluate(term, mu, variation, gradient) for term in F.terms]
        return Evaluation(float(sum(part.value for part in parts)),
                          sum(part.variation for part in parts) if variation else None,
                          sum(part.gradient for part in parts) if gradient else None)
    if isinstance(F, Scaled):
        part = evaluate(F.energy, mu, variation, gradient)
        return Evaluation(F.factor * part.value,
                          F.factor * part.variation if variation else None,
                          F.factor * part.gradient if gradient else None)
    return Evaluation(F.value(mu), F.first_variation(mu) if variation else None,
                      F.grad_first_variation(mu) if gradient else None)


def _mmd2(F: MMD2, mu: Measure) -> Evaluation:
    """1/2 MMD^2 as ``MMD2.value`` computes it, with f = K a - K_xt p and its gradient."""
    F._check(mu)
    t, kernel = F.target, F.kernel
    own, own_gradient = kernel.apply_and_grad_sum(mu.points, mu.points, mu.weights)
    cross, cross_gradient = kernel.apply_and_grad_sum(mu.points, t.points, t.weights)
    value = float(max(0.5 * (mu.weights @ own - 2 * (mu.weights @ cross) + F._target_self_term), 0.0))
    return Evaluation(value, own - cross, own_gradient - cross_gradient)


def reaction_terms(reaction, y: np.ndarray, a: np.ndarray, b: np.ndarray
                   ) -> tuple[float, np.ndarray | None]:
    """(R^2(a, b on y), 1/2 grad_y R^2: (n, d) or None): ``weight_distance_sq`` and
    ``position_force`` of the reaction, from one kernel pass for MMD."""
    if type(reaction) is not MMD:
        return reaction.weight_distance_sq(y, a, b), reaction.position_force(y, a, b)
    change = b - a
    values, gradient = reaction.kernel.apply_and_grad_sum(y, y, change)
    distance_sq = float(change @ values + reaction.ridge * change @ change)
    return distance_sq, change[:, None] * gradient
