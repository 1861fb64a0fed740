"""Operator splitting of transport and reaction, on particles.

With T_h the transport step (positions, weights carried) and R_h the reaction step (weights,
positions fixed) of size h:

* ``Splitting(order=1)`` (Lie):   mu^{k+1} = R_tau(T_tau(mu^k)).
* ``Splitting(order=2)`` (Strang, symmetric): with T*, R* the adjoints of the implicit pieces
  (T* = forward Euler of the transport, exactly the adjoint of its proximal step; R* the
  explicit update whose composition with the exact reaction step is symmetric),

      mu^{k+1} = R_{tau/2} T_{tau/2} T*_{tau/2} R*_{tau/2} (mu^k),

  the symmetric composition Psi_{tau/2} o Psi*_{tau/2} of the Lie step Psi = R o T with its
  adjoint: a symmetric one-step method, hence of even order, second order for smooth flows.
  (T_{tau/2} T*_{tau/2} is the trapezoidal rule of the transport.) It is second order while
  the weights stay positive and the pieces are smooth: a reaction step that hits the
  constraint b >= 0 or an explicit half step beyond its stability limit loses the order.
  ``symmetric=False`` gives the classical arrangement T_{tau/2} R_tau T_{tau/2} with the
  implicit pieces: stable for large steps but only first order (backward Euler pieces).

Pieces (``transport``, ``reaction``):

* transport "implicit": the proximal step
  argmin_y F(sum a_i delta_{y_i}) + sum a_i |y_i - x_i|^2 / (2 h alpha) (L-BFGS-B);
  "explicit": x_i - h alpha grad f(x_i) (velocity "euclidean" as in the paper code).
* reaction "exact": the exact JKO step of the reaction (MMD: the QP of ``weights``, solved
  exactly; Hellinger: Newton); "explicit": the forward update; "projected_gradient": the paper
  code's single projected-gradient step b = P_C(a - h beta f); "projected_multiplicative": the
  paper code's KL weight step b = P_C(a exp(-h beta f)) (P_C the Euclidean projection onto the
  simplex, or the orthant without ``conserve_mass``).
* densities on a grid: transport ``jk.BackAndForthJKO(...)`` (or ``"back_and_forth"``), the exact
  W2 step of the grid density, with reaction "exact": the pointwise Hellinger step or the MMD step
  through the Gaussian kernel's separable products (``grid_reaction``; docs/theory.md §10.7),
  order 1, or order 2 with symmetric=False.

The IFT particle algorithm of Gladin et al. is ``Splitting(order=1, transport="explicit",
reaction="exact")`` (their code: ``reaction="projected_gradient"``, ``velocity="euclidean"``),
see ``ift_particle_method``; ``jko_ift.problems.paper_scheme`` maps their step sizes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..energies import KL, MMD2, Energy, Entropy, Interaction, PorousMedium
from ..geometries import Geometry, InfConvolution, ReactionGeometry, Wasserstein
from ..measures import Measure
from .base import Method, MethodState, SolverError, StepResult, check_choice, check_step_input
from .grid_reaction import _gram as _separable_gram
from .grid_reaction import _terms as _grid_terms
from .grid_reaction import grid_energy, grid_hellinger_step, grid_mmd_step, linearized_transport_energy
from .options import count, flag, positive
from .particle import (
    DEFAULT_PARTICLE_TOL,
    VELOCITIES,
    ForwardStep,
    backward_transport,
    checked_evaluation,
    finish,
    forward_stability,
    forward_transport,
    positivity_preserving,
    reaction_exact,
)
from .particle_sums import Evaluation
from .weights import (
    HELLINGER_UPDATES,
    adjoint_hellinger,
    explicit_hellinger,
    mmd_step,
    projected_gradient_weights,
    projected_multiplicative_weights,
)

if TYPE_CHECKING:
    from .back_and_forth import BackAndForthJKO

TRANSPORT_PIECES = ("implicit", "explicit")
#: The grid transport piece by name (configs): ``BackAndForthJKO()`` with its defaults.
GRID_TRANSPORT = "back_and_forth"
REACTION_PIECES = ("exact", "explicit", "projected_gradient", "projected_multiplicative")

#: Reaction pieces that are forward steps, checked for stability like ``ExplicitEuler``.
FORWARD_REACTIONS = ("explicit", "projected_gradient")


class _KeepsSupport:
    """``Splitting.keeps_support``: False on the class (the particle pieces move the points),
    and on an instance True with a grid transport piece (a grid step and a pointwise or separable
    reaction keep the grid's nodes and change the weights only)."""

    def __get__(self, instance, owner) -> bool:
        return instance is not None and instance.grid_transport is not None


@dataclass(frozen=True, eq=False)
class Splitting(Method):
    r"""Operator splitting of a step into a transport step and a reaction step.

    Parameters
    ----------
    order : {1, 2}, default 1
        Lie splitting (first order: transport, then reaction) or Strang splitting.
    transport : {"implicit", "explicit", "back_and_forth"} or BackAndForthJKO, default "implicit"
        The transport piece: the Lagrangian :math:`W_2` JKO step of
        :class:`~jko_ift.ParticleJKO`, the forward Euler step, or, for a density on a grid,
        the exact grid step of :class:`~jko_ift.BackAndForthJKO` (``"back_and_forth"`` or a
        configured ``jk.BackAndForthJKO(...)``; Lie splitting, ``reaction="exact"``).
    reaction : {"exact", "explicit", "projected_gradient", "projected_multiplicative"}, default "exact"
        The reaction piece: the exact JKO step of the reaction geometry on the new positions,
        its forward Euler step, or the projected updates of the IFT paper's code.
    symmetric : bool, default True
        For ``order=2``: compose the implicit pieces with their adjoints (second order), or
        use :math:`T_{\tau/2} R_\tau T_{\tau/2}` (first order, unconditionally stable pieces).
    velocity : {"wasserstein", "euclidean"}, default "wasserstein"
        The explicit transport velocity (see :class:`~jko_ift.ExplicitEuler`).
    hellinger_update : {"multiplicative", "linear"}, default "multiplicative"
        The explicit Hellinger update.
    tol : float, default ``DEFAULT_PARTICLE_TOL``
        Relative certificate of the implicit pieces (see :class:`~jko_ift.ParticleJKO`).
    max_iter : int, default 5000
        Iterations of the implicit pieces.

    Notes
    -----
    For a geometry :math:`D^2 = \inf_\nu W_2^2/\alpha + R^2/\beta` the Lie step is

    .. math::

        \nu \in \mathop{\mathrm{argmin}}_\nu\; F(\nu) + \frac{1}{2\tau\alpha} W_2^2(\nu, \mu^k),
        \qquad
        \mu^{k+1} \in \mathop{\mathrm{argmin}}_{\mu \text{ on } \operatorname{supp}\nu}\;
        F(\mu) + \frac{1}{2\tau\beta} R^2(\mu, \nu),

    each piece a JKO step of its own geometry. With the implicit pieces every step decreases
    :math:`F`, at any :math:`\tau`. With ``transport="explicit"`` and
    ``reaction="projected_gradient"`` it is the particle algorithm of Gladin
    et al. (2024).

    References
    ----------
    * E. Gladin, P. Dvurechensky, A. Mielke, J.-J. Zhu, "Interaction-Force Transport
      gradient flows", NeurIPS 2024.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> mu = jk.Measure(rng.standard_normal((8, 2)) + 3.0, np.full(8, 1 / 8))
    >>> target = jk.Measure(rng.standard_normal((8, 2)), np.full(8, 1 / 8))
    >>> F = jk.MMD2(target, jk.Gaussian(2.0))
    >>> g = jk.WFR(alpha=1.0, beta=0.5, conserve_mass=True)
    >>> r = jk.Splitting(order=1).step(F, g, mu, tau=1.0)
    >>> bool(r.energy < F.value(mu)), round(r.measure.mass, 9)
    (True, 1.0)
    """

    keeps_support = _KeepsSupport()  # the particles move, or a grid transport keeps the grid
    order: int = 1
    transport: str = "implicit"
    reaction: str = "exact"
    symmetric: bool = True
    velocity: str = "wasserstein"
    hellinger_update: str = "multiplicative"
    tol: float = DEFAULT_PARTICLE_TOL
    max_iter: int = 5000

    def __post_init__(self):
        if isinstance(self.order, bool) or self.order not in (1, 2):
            raise ValueError(f"Splitting order must be 1 (Lie) or 2 (Strang), got {self.order!r}")
        if self.grid_transport is None:
            check_choice("transport piece", self.transport, TRANSPORT_PIECES)
        else:
            self._check_grid_pieces()
        check_choice("reaction piece", self.reaction, REACTION_PIECES)
        check_choice("velocity", self.velocity, VELOCITIES)
        check_choice("hellinger_update", self.hellinger_update, HELLINGER_UPDATES)
        if (self.order == 2 and self.symmetric
                and (self.transport, self.reaction) != ("implicit", "exact")):
            raise ValueError("Splitting(order=2) composes the implicit pieces with their "
                             "adjoints; it needs transport='implicit' and reaction='exact' "
                             "(or pass symmetric=False for T(tau/2) R(tau) T(tau/2))")
        self._settle(symmetric=flag("Splitting", "symmetric", self.symmetric),
                     tol=positive("Splitting", "tol", self.tol),
                     max_iter=count("Splitting", "max_iter", self.max_iter))

    @property
    def grid_transport(self) -> BackAndForthJKO | None:
        """The grid transport method (``transport`` given as one, or by name), else None."""
        from .back_and_forth import BackAndForthJKO  # numba: imported when a grid needs it

        if isinstance(self.transport, BackAndForthJKO):
            return self.transport
        named = isinstance(self.transport, str) and self.transport == GRID_TRANSPORT
        return BackAndForthJKO() if named else None

    def _check_grid_pieces(self) -> None:
        if self.reaction != "exact":
            raise ValueError(f"Splitting with a grid transport piece ({self.grid_transport!r}) takes "
                             f"reaction='exact' (the pointwise Hellinger or separable MMD step on the "
                             f"grid); got reaction={self.reaction!r}")
        if self.order == 2 and self.symmetric:
            raise ValueError("Splitting(order=2) with a grid transport piece is T(tau/2) R(tau) "
                             "T(tau/2): pass symmetric=False (the symmetric composition needs the "
                             "particles' explicit adjoint pieces)")

    @property
    def local_error_order(self) -> int:
        """3 for the symmetric Strang composition (second order), 2 otherwise (Lie, or
        T(tau/2) R(tau) T(tau/2) of first-order pieces): jko_ift.control."""
        return 3 if self.order == 2 and self.symmetric else 2

    def _step(self, F: Energy, geometry: Geometry, mu: Measure, tau: float, state,
              throw: bool = True) -> StepResult:
        if self.grid_transport is not None:
            return self._grid_step(F, geometry, mu, tau, state, throw)
        tau, begin = checked_evaluation(F, geometry, mu, tau)  # F, f, grad f at mu: checked, reused
        start = time.perf_counter()
        run = _Run.starting_at(mu, begin, {"method": f"splitting_{self.order}"}, tau)
        # Hellinger pieces other than the linear and projected-gradient updates never clip
        run.info["positivity_preserving"] = positivity_preserving(geometry) and not (
            self.reaction == "projected_gradient"
            or (self.reaction == "explicit" and self.hellinger_update == "linear"))
        if self.order == 1:
            plan = [("T", self.transport, 1.0), ("R", self.reaction, 1.0)]
        elif self.symmetric:
            plan = [("R", "adjoint", 0.5), ("T", "explicit", 0.5), ("T", "implicit", 0.5),
                    ("R", "exact", 0.5)]
        else:
            plan = [("T", self.transport, 0.5), ("R", self.reaction, 1.0),
                    ("T", self.transport, 0.5)]
        current = mu
        with np.errstate(over="ignore", invalid="ignore"):
            for part, kind, fraction in plan:
                h = fraction * tau
                if part == "T" and geometry.has_transport:
                    current = self._transport(F, geometry, current, h, kind, run)
                elif part == "R" and geometry.reaction is not None:
                    current = self._reaction(F, geometry, current, h, kind, run)
                if current is None or run.status != "optimal":
                    break
        run.info["wall_time"] = time.perf_counter() - start
        if current is None:
            return finish(F, geometry, mu, np.full_like(mu.points, np.nan), mu.weights, tau,
                          "diverged", np.inf, run.info, throw, "Splitting")
        return finish(F, geometry, mu, current.points, current.weights, tau, run.status,
                      run.certificate, run.info, throw, "Splitting", energy=run.known(current))

    # ------------------------------------------------------------------ densities on a grid
    def _grid_step(self, F, geometry, mu, tau, state, throw) -> StepResult:
        """T_tau then R_tau (order 1), or T_{tau/2} R_tau T_{tau/2} (order 2, symmetric=False), with
        the grid transport method as T (an ``MMD2`` term linearized at its start, see
        ``grid_reaction``) and the grid reaction steps as R; mu stays on its grid."""
        start = time.perf_counter()
        tau = check_step_input(F, geometry, mu, tau)
        if mu.grid is None:
            raise ValueError("Splitting with a grid transport piece needs a density on a grid (a "
                             "measure made by jk.Grid(lo, hi, shape).measure(density)); got one without "
                             f"a grid ({mu.n} points). For particles use transport='implicit' or 'explicit'")
        if not isinstance(geometry, (Wasserstein, ReactionGeometry, InfConvolution)):
            raise ValueError(f"Splitting takes jk.Wasserstein(), jk.Hellinger(), jk.MMD(k), jk.WFR or "
                             f"jk.IFT; got {geometry!r}")
        grams = state.cache.setdefault("separable_grams", {})
        run = _Run(max(abs(_grid_energy_value(F, mu, grams)), 1e-300),
                   {"method": f"splitting_{self.order}", "transport_piece": "back_and_forth"}, tau)
        plan = [("T", 1.0), ("R", 1.0)] if self.order == 1 else [("T", 0.5), ("R", 1.0), ("T", 0.5)]
        current, cost, reaction_sq = mu, 0.0, 0.0
        for part, fraction in plan:
            h = fraction * tau
            if part == "T" and geometry.has_transport:
                current, moved_sq = self._grid_transport_piece(F, geometry, current, h, state, grams, run)
                cost += moved_sq / geometry.alpha
            elif part == "R" and geometry.reaction is not None:
                before = current
                current = self._grid_reaction_piece(F, geometry, current, h, grams, run)
                reaction_sq += _grid_reaction_sq(geometry.reaction, before, current, grams) / geometry.beta
        run.info["wall_time"] = time.perf_counter() - start
        status = run.status if np.all(np.isfinite(current.weights)) else "diverged"
        result = StepResult.build(F, current, tau, cost + reaction_sq, status, run.certificate, run.info,
                                  energy=_grid_energy_value(F, current, grams))
        if throw and not result.ok:
            why = run.info.get("message", "")
            raise SolverError(f"Splitting (grid): a piece was not solved to its tolerance: status "
                              f"{status!r}, certificate {run.certificate:.3g} ({why}); pass "
                              "throw=False to get the StepResult", status, result)
        return result

    def _grid_transport_piece(self, F, geometry, mu, h, state, grams, run) -> tuple[Measure, float]:
        energy, linearized = linearized_transport_energy(F, mu, grams)
        if linearized:
            run.info["transport_linearized"] = linearized
        nested = state.warm.get("transport")
        nested = nested.fork() if isinstance(nested, MethodState) else MethodState()
        piece = self.grid_transport._step(energy, Wasserstein(), mu, h * geometry.alpha, nested, False)
        state.warm["transport"] = nested
        run.merge(piece.status, piece.certificate, {"transport_iterations": piece.info["iterations"]})
        if not piece.ok:
            run.info["message"] = piece.info.get("message", "")
        return piece.measure, piece.distance_sq

    def _grid_reaction_piece(self, F, geometry, mu, h, grams, run) -> Measure:
        eta, reaction = h * geometry.beta, geometry.reaction
        tol = self.grid_transport.tol  # both pieces to the transport method's relative certificate
        if reaction.quadratic:
            result = grid_mmd_step(F, reaction, mu, eta, geometry.conserve_mass, tol, run.scale, grams)
        elif _local(F):
            result = grid_hellinger_step(F, mu, eta, geometry.conserve_mass, tol, run.scale)
        else:  # potentials (and small grids' quadratic energies): the particles' Newton step
            result = reaction_exact(F, geometry, mu.points, mu.weights, eta, scale=run.scale, rtol=tol)
        run.merge(result.status, result.certificate, result.info)
        run.info["weight_solver"] = result.info.get("weight_solver")
        return mu.with_weights(np.maximum(result.weights, 0.0))

    def _transport(self, F, geometry, mu, h, kind, run) -> Measure | None:
        eta = h * geometry.alpha
        known = run.at_start(mu)
        gradient = None if known is None else known.gradient
        if kind == "explicit":
            y, change = forward_transport(F, mu, eta, self.velocity, gradient)
            descent = -change
        else:
            moved = backward_transport(F, mu, eta, self.tol, run.scale, self.max_iter,
                                       gradient=gradient)
            run.merge(moved.status, moved.certificate, moved.info)
            y = moved.points
        if not np.all(np.isfinite(y)):
            return None
        moved = Measure(y, mu.weights)
        if kind == "explicit" and self.transport == "explicit":  # not Strang's adjoint half step
            run.check_forward(F, mu, moved, descent, "explicit transport piece", h)
        return moved

    def _reaction(self, F, geometry, mu, h, kind, run) -> Measure | None:
        eta = h * geometry.beta
        a, conserve = mu.weights, geometry.conserve_mass
        if kind == "exact":
            result = reaction_exact(F, geometry, mu.points, a, eta, scale=run.scale, rtol=self.tol)
            run.merge(result.status, result.certificate, result.info)
            b = result.weights
        else:
            known = run.at_start(mu)
            f = F.first_variation(mu) if known is None or known.variation is None else known.variation
            if kind == "projected_gradient":
                b = projected_gradient_weights(a, f, eta, conserve)
            elif kind == "projected_multiplicative":
                b = projected_multiplicative_weights(a, f, eta, conserve)
            elif geometry.reaction.quadratic:  # explicit and adjoint coincide
                b = mmd_step(F, geometry.reaction, mu.points, a, eta, conserve, linearize_at=f,
                             energy_scale=run.scale).weights
            elif kind == "adjoint":
                b, extra = adjoint_hellinger(a, f, eta, conserve)
                run.info.update(extra)
            else:
                b, extra = explicit_hellinger(a, f, eta, conserve, self.hellinger_update)
                run.info.update(extra)
        if not np.all(np.isfinite(b)):
            return None
        reacted = mu.with_weights(np.maximum(b, 0.0))  # zeroed weights: reported by ``finish``
        if kind in FORWARD_REACTIONS:  # f of the forward reactions: F's first variation at mu
            descent = -float(f @ (reacted.weights - a))
            run.check_forward(F, mu, reacted, descent, f"{kind} reaction piece", h)
        return reacted


def _local(F) -> bool:
    """Whether F has a pointwise conjugate on the grid (an internal term, no nonlocal one)."""
    terms = [term for _, term in _grid_terms(F, 1.0)]
    return any(isinstance(t, (Entropy, PorousMedium, KL)) for t in terms) and not any(
        isinstance(t, (MMD2, Interaction)) for t in terms)


def _grid_reaction_sq(reaction, before: Measure, after: Measure, grams: dict) -> float:
    """R^2 of the reaction piece: He^2 pointwise, MMD^2 by the separable Gram."""
    diff = after.weights - before.weights
    if not reaction.quadratic:
        return reaction.weight_distance_sq(before.points, before.weights, after.weights)
    gram = _separable_gram(reaction.kernel, before.grid, grams)
    return float(diff @ gram.apply(diff) + reaction.ridge * diff @ diff)


def _grid_energy_value(F, mu: Measure, grams: dict) -> float:
    """F(mu) with MMD2 terms through the separable Gram (never a dense kernel sum over the grid)."""
    if not any(isinstance(t, MMD2) for _, t in _grid_terms(F, 1.0)):
        return float(F.value(mu))
    return float(grid_energy(F, mu, grams).value(mu.weights))


class _Run:
    """What the sub-steps of one splitting step accumulate: status, certificate, counts, and the
    energies of its measures (the pieces judge each measure twice: as one's end, the next's start)."""

    def __init__(self, scale: float, info: dict, tau: float):
        self.scale, self.info, self.tau = scale, info, tau
        self.status, self.certificate = "optimal", 0.0
        self.energies: list[tuple[Measure, float]] = []
        self.start: tuple[Measure, Evaluation] | None = None

    @classmethod
    def starting_at(cls, mu: Measure, begin: Evaluation, info: dict, tau: float) -> _Run:
        """The run of a step from mu, whose F, f and grad f (``begin``) the first piece reuses."""
        run = cls(max(abs(begin.value), 1e-300), info, tau)  # ``energy_scale``
        run.energies.append((mu, begin.value))
        run.start = (mu, begin)
        return run

    def at_start(self, mu: Measure) -> Evaluation | None:
        """The evaluation of F at the step's start if mu is it, else None."""
        return self.start[1] if self.start is not None and self.start[0] is mu else None

    def known(self, mu: Measure) -> float | None:
        """F(mu) if a piece has computed it, else None."""
        return next((value for known, value in self.energies if known is mu), None)

    def energy(self, F, mu: Measure) -> float:
        """F(mu), computed once per measure of the step (kept by identity: measures never change)."""
        value = self.known(mu)
        if value is not None:
            return value
        value = float(F.value(mu))
        self.energies.append((mu, value))
        return value

    def check_forward(self, F, before: Measure, after: Measure, descent: float, piece: str,
                      h: float) -> None:
        """An explicit piece whose energy rose makes the step "unstable" (``forward_stability``)."""
        energy_after = self.energy(F, after)
        if not np.isfinite(energy_after):
            return  # ``finish`` reports the divergence
        forward = ForwardStep(self.energy(F, before), descent)
        if forward_stability(F, before, after, energy_after, forward, self.tau, self.info,
                             "Splitting", piece, h / self.tau) != "optimal":
            self.status = "unstable"

    def merge(self, status, certificate, info) -> None:
        self.certificate = max(self.certificate, float(certificate))
        if status != "optimal":
            self.status = status
        for key, value in info.items():
            if key.endswith("iterations") and np.isscalar(value):
                self.info[key] = self.info.get(key, 0) + value


def ift_particle_method(weight_step: str = "exact", velocity: str = "wasserstein") -> Splitting:
    """The particle algorithm of Gladin et al. (NeurIPS 2024): an explicit W2 step of the
    positions, x_i <- x_i - tau alpha v_i, then the MMD step of the weights on the new
    positions with eta = tau beta, solved exactly (``weight_step="exact"``) or by the single
    projected-gradient step b = P_C(a - eta f) of the authors' code (``"projected_gradient"``).

    The authors' step sizes are not alpha and beta: their code moves x_i by 2 lr a_i grad f
    (it differentiates MMD^2, not 1/2 MMD^2) and the weights by -2 lr_w f, so in the
    library's units tau alpha = 2 lr M / n (with ``velocity="euclidean"``, v_i = (n a_i / M)
    grad f) and tau beta = 2 lr_w: their 2-D "position step 50, weight step 0.1" with 100
    particles is tau alpha = 1, tau beta = 0.2, not alpha = 50. Use
    ``jko_ift.problems.paper_scheme(kernel, lr, n, weight_lr)``, which builds this method, the
    geometry and tau from their numbers (and their KL branch and MMD-flow baseline).
    """
    return Splitting(order=1, transport="explicit", reaction=weight_step, velocity=velocity)
