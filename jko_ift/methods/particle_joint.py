"""The joint (IFT) particle step of F = 1/2 MMD^2 without dense N x N matrices.

For F = 1/2 MMD_k^2(., sum_l p_l delta_{t_l}) and the MMD reaction of a kernel k_R (metric
G = K_R + ridge I on the points y), the weight step at fixed positions is the QP

    min_b  1/2 b^T H b - g^T b  over b >= 0 (sum b = M spherical),
    H = K + G / eta,   g = K_yt p + G a / eta,

whose minimizers are typically sparse (a few dozen of N weights in the paper's experiments; when
they are not, the working set below grows by half its size per round, and its matrices with it).
``MMDJointTerms`` solves it on a working set S: the QP restricted to S (``qp.solve_weight_qp`` on
|S| x |S| matrices), then the optimality test on all N points from r = H b - g = K_{:,S} b_S -
K_yt p + (G_{:,S} b_S - G a) / eta, the Frank-Wolfe gap (``qp.frank_wolfe_gap``: the certificate
of the dense solve), and the most violating points added to S until the gap is certified. Only two
sums over all pairs are needed per position (K_R a with its gradient sum, and K_yt p); every other
sum runs over the support S (O(N |S|)). The same sums give everything the position objective
needs: F(y, b), b_i grad f(y_i) (zero off the support), R^2(a, b on y) = c^T G c and its force c_i
(grad K_R c)_i, c = b - a.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..energies import MMD2
from ..geometries import MMD
from . import qp
from .particle_sums import Evaluation
from .weights import ReactionResult

#: Points of the first working set (the largest entries of g, where weight pays most) and the
#: least number added per round (the most violating points).
INITIAL_WORKING_SET = 32
MIN_ADDED = 16

#: A warm start whose support is at most this fraction of the points starts the working set.
WARM_SUPPORT_FRACTION = 0.25


def applies(F, geometry) -> bool:
    """Whether ``MMDJointTerms`` takes this step: F = 1/2 MMD^2 (an MMD2 energy) with a
    positive definite kernel, under an MMD reaction with a positive definite kernel."""
    reaction = geometry.reaction
    return (type(F) is MMD2 and F.kernel.positive_definite and type(reaction) is MMD
            and reaction.kernel.positive_definite)


@dataclass(frozen=True)
class JointPoint:
    """What the position objective needs at positions y: weights b (n,), the weight step's
    ``ReactionResult``, F's ``Evaluation`` (gradient b-weighted rows only: zero where b = 0),
    R^2(a, b on y) and 1/2 grad_y R^2 (n, d)."""

    weights: np.ndarray
    reaction: ReactionResult
    energy: Evaluation
    distance_sq: float
    force: np.ndarray


class MMDJointTerms:
    """The exact weight step and the terms of the joint objective at positions y (module
    docstring). a: old weights (n,); eta = tau beta; atol: absolute accuracy of the weight
    objective (rtol times ``scale``)."""

    def __init__(self, F: MMD2, reaction: MMD, a: np.ndarray, eta: float, conserve_mass: bool,
                 atol: float, scale: float):
        self.F, self.reaction, self.a, self.eta = F, reaction, a, eta
        self.mass = float(a.sum()) if conserve_mass else None
        self.atol, self.scale = atol, scale
        self.same_kernel = F.kernel == reaction.kernel

    def at(self, y: np.ndarray, start: np.ndarray) -> JointPoint:
        """The terms at positions y: (n, d), the weight step warm started at ``start``."""
        F, reaction, a = self.F, self.reaction, self.a
        target = F.target
        metric_a, gradient_a = reaction.kernel.apply_and_grad_sum(y, y, a)
        metric_a = metric_a + reaction.ridge * a  # G a
        cross = F.kernel.apply(y, target.points, target.weights)  # K_yt p
        g = cross + metric_a / self.eta
        b, support, result = self._solve(y, g, cross, metric_a, start)
        points, weights = y[support], b[support]
        own = self._sums(y, points, weights)
        value = float(max(0.5 * (b @ own[0] - 2 * (b @ cross) + F._target_self_term), 0.0))
        gradient = np.zeros_like(y)
        gradient[support] = (F.kernel.grad_sum(points, points, weights)
                             - F.kernel.grad_sum(points, target.points, target.weights))
        change = b - a
        metric_change = own[1] + reaction.ridge * b - metric_a
        force = change[:, None] * (reaction.kernel.grad_sum(y, points, weights) - gradient_a)
        distance_sq = float(change @ metric_change)
        return JointPoint(b, result, Evaluation(value, None, gradient), distance_sq, force)

    def _sums(self, y, points, weights):
        """(K_{:,S} b_S, K_R{:,S} b_S): (n,) each."""
        own = self.F.kernel.apply(y, points, weights)
        other = own if self.same_kernel else self.reaction.kernel.apply(y, points, weights)
        return own, other

    def _solve(self, y, g, cross, metric_a, start):
        """The working-set QP: (b (n,), its support, ``ReactionResult``)."""
        n = y.shape[0]
        mass_bound = float(np.abs(start).sum())
        support = np.flatnonzero(start > 0)
        warm = support.size <= max(WARM_SUPPORT_FRACTION * n, INITIAL_WORKING_SET)
        working = support if warm else np.argsort(-g)[:INITIAL_WORKING_SET]
        iterations = 0
        while True:
            working = np.sort(working)
            b, solved = self._restricted(y, g, working, start if warm else None, mass_bound)
            iterations += solved.iterations
            support = np.flatnonzero(b > 0)
            own, other = self._sums(y, y[support], b[support])
            r = own - cross + (other + self.reaction.ridge * b - metric_a) / self.eta
            gap = qp.frank_wolfe_gap(r, b, self.mass, mass_bound)
            floor = self._roundoff(r + g, g, b, mass_bound)
            added = self._violators(r, b, working, gap, max(self.atol, floor))
            if added.size == 0:
                break
            working, warm, start = np.union1d(working, added), True, b
        status = "optimal" if gap <= max(self.atol, floor) else "max_iterations"
        info = {"weight_solver": "working_set", "weight_iterations": iterations,
                "weight_support": int(support.size), "weight_working_set": int(working.size),
                "weight_gap": gap, "weight_roundoff": floor / self.scale}
        return b, support, ReactionResult(b, gap / self.scale, status, info)

    def _restricted(self, y, g, working, start, mass_bound):
        """The QP on the points of ``working`` (the others at weight 0): (b (n,), QPSolution)."""
        points = y[working]
        gram = self.F.kernel(points, points)
        metric = gram if self.same_kernel else self.reaction.kernel(points, points)
        metric = metric + self.reaction.ridge * np.eye(working.size)
        H = gram + metric / self.eta
        warm = None if start is None or np.any(np.delete(start, working) > 0) else start[working]
        solved = qp.solve_weight_qp(H, g[working], self.mass, start=warm, atol=self.atol, rtol=0.0,
                                    mass_bound=mass_bound)
        b = np.zeros(y.shape[0])
        b[working] = solved.weights
        return b, solved

    def _roundoff(self, hessian_b, g, b, mass_bound) -> float:
        """``qp.roundoff_floor`` from H b: (n,) (no H)."""
        size = float(np.abs(hessian_b).max() + np.abs(g).max())
        weight = self.mass if self.mass is not None else max(float(b.sum()), mass_bound)
        return qp.ROUNDOFF_FACTOR * np.finfo(float).eps * weight * size

    def _violators(self, r, b, working, gap, tolerance) -> np.ndarray:
        """Points off the working set whose weight would lower the objective (r_i below the
        multiplier: the support's mean of r on the simplex, 0 on the orthant), most violating
        first; none once the gap is certified or every point is in the set."""
        if gap <= tolerance or working.size == r.size:
            return np.zeros(0, dtype=int)
        level = float(r @ b) / self.mass if self.mass is not None else 0.0
        outside = np.setdiff1d(np.arange(r.size), working)
        below = outside[r[outside] < level]
        if below.size == 0:  # the gap is the restricted QP's own: nothing to add
            return below
        count = max(MIN_ADDED, working.size // 2)
        return below[np.argsort(r[below])[:count]]
