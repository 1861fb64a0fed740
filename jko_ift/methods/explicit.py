"""Forward Euler of the gradient flow, on particles.

For mu = sum_i a_i delta_{x_i} and f = dF/dmu[mu^k], one step of size tau is

    transport (alpha):  x_i <- x_i - tau alpha grad f(x_i)                          (W2 part)
    reaction  (beta):   Hellinger  a <- a exp(-tau beta (f - l))   ("multiplicative")
                                   a <- a (1 - tau beta (f - l))   ("linear")
                        MMD        a <- a - tau beta (K + ridge I)^{-1} (f - l 1)

with both parts evaluated at mu^k (a simultaneous step; the sequential variants are
``Splitting(order=1, transport="explicit", reaction=...)``). l = 0 on M+; for
``conserve_mass`` it is the multiplier that keeps sum(a) (the projection of the spherical flow:
renormalization for the multiplicative update, l = sum(a f)/sum(a) for the linear one,
l = 1^T G^{-1} f / 1^T G^{-1} 1 for MMD). The MMD update is computed as the JKO step of the
linearized energy, min_b f^T b + (b - a)^T G (b - a) / (2 tau beta) over b >= 0: it equals the
formula above while that is nonnegative, and is its G-metric projection onto the feasible set
otherwise (reported as ``info["projected"]``).

Baselines of the IFT paper: the MMD particle flow of Arbel et al. (NeurIPS 2019) is
``ExplicitEuler()`` with ``jk.Wasserstein()`` and F = jk.MMD2(target, kernel); with
``noise=beta_n`` the witness gradient is evaluated at noisy points x_i + beta_n u_i,
u_i ~ N(0, I), for the first ``noise_steps`` steps (reproducible with ``seed``). Weighted WFR
particles are ``ExplicitEuler()`` with ``jk.WFR``.

The step counter (for the noise schedule) and the random generator are the run's state: every
``jk.solve`` starts them from ``seed``; ``jk.jko_step`` calls share the method's default state
until ``reset()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..energies import Energy
from ..geometries import Geometry
from ..measures import Measure
from .base import Method, MethodState, StepResult, check_choice
from .options import count, flag, nonnegative
from .particle import (
    VELOCITIES,
    ForwardStep,
    checked_evaluation,
    finish,
    forward_transport,
    positivity_preserving,
)
from .weights import (
    HELLINGER_UPDATES,
    explicit_hellinger,
    mmd_step,
    projected_gradient_weights,
)

REACTION_UPDATES = ("explicit", "projected_gradient")


@dataclass(frozen=True, eq=False)
class ExplicitEuler(Method):
    r"""Forward Euler step on particles: the flow's velocity and reaction rate at
    :math:`\mu^k`, taken for a time :math:`\tau`.

    Parameters
    ----------
    hellinger_update : {"multiplicative", "linear"}, default "multiplicative"
        :math:`b = a\,e^{-\tau\beta f}` (positivity preserving) or :math:`b = a(1 - \tau\beta f)`.
    reaction : {"explicit", "projected_gradient"}, default "explicit"
        The forward step of the reaction flow, or the IFT paper code's weight update
        :math:`b = P_C(a - \tau\beta f)` (Euclidean projection onto the simplex).
    velocity : {"wasserstein", "euclidean"}, default "wasserstein"
        :math:`\dot x_i = -\alpha\nabla f(x_i)`, or the paper code's
        :math:`-\alpha (n a_i / M)\nabla f(x_i)`.
    noise : float, default 0.0
        Noise level :math:`\beta_n` of Arbel et al. (2019): the standard deviation of the
        perturbation of the points at which the witness gradient is evaluated.
    noise_steps : int or None, default None
        Number of steps with noise (None: all).
    seed : int or None, default None
        Seed of the method's random generator.
    perturb_measure : bool, default False
        Also move the particles inside the witness (:math:`f` of the perturbed measure, as in
        the IFT authors' code); the default follows Arbel et al. (2019) (:math:`f` of
        :math:`\mu^k` at perturbed points).

    Notes
    -----
    In :math:`W_2` the step is :math:`x_i^{k+1} = x_i^k - \tau\alpha\nabla f(x_i^k)`,
    :math:`f = \frac{\delta F}{\delta\mu}[\mu^k]`; a reaction updates the weights with the
    rate :math:`-\beta f` (Hellinger) or :math:`-\beta (K + \lambda I)^{-1} f` (MMD). Unlike a
    JKO step it satisfies the dissipation inequality

    .. math::

        F(\mu^{k+1}) + \frac{1}{2\tau} D^2(\mu^{k+1}, \mu^k) \le F(\mu^k)

    only while :math:`\tau` times the curvature of :math:`F` along the step is at most 1;
    past its stability limit a step returns status ``"unstable"``. The status of a
    stable step is ``"explicit"`` (nothing is solved, the certificate is 0); its objective is
    that of the JKO problem where the step lands. The step counter (for ``noise_steps``) and
    the random generator are the run's state (``init_state``: a generator seeded by ``seed``,
    none without noise);
    ``step`` keeps its own until ``reset()``.

    References
    ----------
    * M. Arbel, A. Korba, A. Salim, A. Gretton, "Maximum Mean Discrepancy gradient
      flow", NeurIPS 2019.

    Examples
    --------
    >>> mu = jk.Measure([[1.0], [2.0]], [0.5, 0.5])
    >>> F = jk.Potential(lambda x: 0.5 * x[:, 0] ** 2, lambda x: x)
    >>> r = jk.ExplicitEuler().step(F, jk.Wasserstein(), mu, tau=0.5)
    >>> r.status, r.measure.points.ravel().tolist()  # x (1 - tau)
    ('explicit', [0.5, 1.0])
    """

    keeps_support = False  # the particles move
    local_error_order = 2  # O(tau^2) per step: forward Euler (jko_ift.control)
    hellinger_update: str = "multiplicative"
    reaction: str = "explicit"
    velocity: str = "wasserstein"
    noise: float = 0.0
    noise_steps: int | None = None
    seed: int | None = None
    perturb_measure: bool = False

    def __post_init__(self):
        check_choice("hellinger_update", self.hellinger_update, HELLINGER_UPDATES)
        check_choice("reaction update", self.reaction, REACTION_UPDATES)
        check_choice("velocity", self.velocity, VELOCITIES)
        self._settle(noise=nonnegative("ExplicitEuler", "noise", self.noise))
        if self.noise_steps is not None:
            self._settle(noise_steps=count("ExplicitEuler", "noise_steps (or None: every step)",
                                           self.noise_steps, minimum=0))
        if self.seed is not None and not isinstance(self.seed, (np.random.SeedSequence,
                                                                np.random.BitGenerator)):
            self._settle(seed=count("ExplicitEuler", "seed (or None)", self.seed, minimum=0))
        self._settle(perturb_measure=flag("ExplicitEuler", "perturb_measure", self.perturb_measure))

    def init_state(self, F=None, geometry=None, mu0=None) -> MethodState:
        """A run's state: step counter 0, a generator seeded by ``seed`` (none without noise)."""
        # without noise nothing is drawn: no generator to copy at every step
        return MethodState(rng=None if self.noise == 0 else np.random.default_rng(self.seed))

    @property
    def steps_taken(self) -> int:
        """Steps taken by ``step`` since the last ``reset()``."""
        state = self.__dict__.get("_default_state")
        return 0 if state is None else state.steps

    def noise_level(self, step_index: int) -> float:
        """The noise level of step ``step_index`` (0-based)."""
        if self.noise == 0 or (self.noise_steps is not None and step_index >= self.noise_steps):
            return 0.0
        return float(self.noise)

    def _step(self, F: Energy, geometry: Geometry, mu: Measure, tau: float, state: MethodState,
              throw: bool = True) -> StepResult:
        """mu^{k+1} from one forward Euler step of size tau (all parts at mu^k).

        Without noise the step is checked for stability: an energy that rises along it (beyond
        round-off) means tau times the curvature of F along the step exceeds 2, the limit of
        forward Euler; the status is then "unstable" (a ``SolverError`` with throw=True) and
        ``info["stability_ratio"]`` holds that estimate (``particle.stability_ratio``)."""
        tau, begin = checked_evaluation(F, geometry, mu, tau)  # F, f, grad f at mu: checked, reused
        start = time.perf_counter()
        x, a = mu.points, mu.weights
        level = self.noise_level(state.steps)
        state.steps += 1
        info: dict = {"method": "explicit_euler", "noise": level, "positivity_preserving": (
            positivity_preserving(geometry) and self.reaction == "explicit"
            and self.hellinger_update == "multiplicative")}
        energy_before = begin.value
        y, b, descent = x, a, 0.0
        with np.errstate(over="ignore", invalid="ignore"):
            if geometry.has_transport:
                if level > 0:
                    noisy = x + level * state.rng.standard_normal(x.shape)
                    if self.perturb_measure:  # its own (frozen) copy: kernel sums over it are kept
                        witness_of = Measure(noisy, a)
                        noisy = witness_of.points
                    else:
                        witness_of = mu
                    gradient = F.first_variation_at(witness_of, noisy, gradient=True)
                else:
                    gradient = begin.gradient
                y, change = forward_transport(F, mu, tau * geometry.alpha, self.velocity, gradient)
                info["max_displacement"] = float(np.sqrt(np.max(np.sum((y - x) ** 2, axis=1))))
                descent -= change
            if geometry.reaction is not None:
                f = begin.variation
                b = self._reaction(F, geometry, mu, tau * geometry.beta, info, f, energy_before)
                descent -= float(f @ (b - a))
        info["wall_time"] = time.perf_counter() - start
        # with noise the transport is not a descent step of F: no stability to judge
        forward = ForwardStep(energy_before, descent) if level == 0 else None
        return finish(F, geometry, mu, y, b, tau, "explicit", 0.0, info, throw, "ExplicitEuler",
                      forward)

    def _reaction(self, F, geometry, mu, eta, info, f, energy_before) -> np.ndarray:
        a = mu.weights
        conserve = geometry.conserve_mass
        if self.reaction == "projected_gradient":
            return projected_gradient_weights(a, f, eta, conserve)
        if geometry.reaction.quadratic:  # a metric G: the G-projection of the forward step
            forward = mmd_step(F, geometry.reaction, mu.points, a, eta, conserve,
                               linearize_at=f, energy_scale=abs(energy_before))
            info["projected"] = bool(np.any(forward.weights[a > 0] == 0))
            info["weight_iterations"] = forward.info.get("weight_iterations", 0)
            return forward.weights
        b, extra = explicit_hellinger(a, f, eta, conserve, self.hellinger_update)
        info.update(extra)
        return b
