"""Error-controlled step sizes: a local error estimate, an error norm and a PI controller.

The state y of a run is what its steps evolve (docs/adaptive.md §State): for a method on a
fixed support (grids) the weights a in R^n; for particles the positions x in R^{n x d} when
the geometry transports and the weights when it has a reaction part (both for WFR and IFT).
Two estimates of the local error vector e of a step y_k -> y_{k+1} of size tau, for a
method whose local error is O(tau^q) (``local_error_order`` q of the method: 2 for implicit
and explicit Euler and Lie splitting, 3 for Strang splitting):

* ``estimate="extrapolation"`` (one solve per attempt; q = 2 only): with the previous
  accepted step of size sigma, the linear extrapolation y_p = y_k + (tau/sigma)(y_k - y_{k-1})
  is off by tau (tau + sigma) y''/2 and backward Euler by tau^2 y''/2, so

      e ~ tau / (2 tau + sigma) * (y_{k+1} - y_p)

  (the first step, without a history, uses step doubling);
* ``estimate="doubling"`` (three solves per attempt; any q): one step of tau against two of
  tau/2; the local error of the two half steps is (y_{tau/2,tau/2} - y_tau) / (2^{q-1} - 1).

The error norm is diffrax's (``distance="rms"``, default): the root mean square over the
components of e / (atol + rtol * max(|y_k|, |y_{k+1}|)). ``distance="mmd"``, ``"w2"`` or a
callable measure the error as one distance instead, over atol + rtol * max(size(mu^k),
size(mu^{k+1})) (||mu||_H for MMD, the spread sqrt(trace Cov mu) for W2, 0 for a callable). A step is accepted
when the normalized error err <= 1, and the next step is

    tau_next = tau * clip(safety * err^(-(icoeff + pcoeff)/q) * err_prev^(pcoeff/q), shrink, growth)

(a PI controller with diffrax's scaling of the gains by the error order q; pcoeff = 0.4,
icoeff = 0.3 are Hairer and Wanner's; no growth right after a rejection). Controlling the
error per step, the global error of a method of order q - 1 scales like rtol^((q-1)/q).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .diagnostics import mmd, w2
from .geometries import Geometry
from .kernels import Gaussian, Kernel
from .measures import Measure
from .methods.options import is_real

DISTANCES = ("rms", "mmd", "w2")
ESTIMATES = ("extrapolation", "doubling")

#: The local error order of a method that does not declare ``local_error_order``: that of
#: backward Euler, which every JKO step is.
DEFAULT_LOCAL_ERROR_ORDER = 2

#: Floor of normalized errors in the controller's powers: an estimate of exactly 0 (a step
#: that changed nothing) must not give an infinite factor (the growth limit applies anyway).
ERROR_FLOOR = 1e-10


def local_error_order(method) -> float:
    """The order q of the local error O(tau^q) that ``method`` declares (``Method`` declares
    ``local_error_order``; a duck-typed method without it gets 2)."""
    return float(getattr(method, "local_error_order", DEFAULT_LOCAL_ERROR_ORDER))


@dataclass(frozen=True)
class ControllerState:
    """What the step-size control carries from one step of a run to the next (kept with the
    run's ``Trajectory.state``, so that a resumed run continues as the one run would).

    proposed: the tau proposed for the next attempt; previous_error: the normalized error of
    the last accepted step (the PI controller's memory; None before the first); history:
    (the measure before the last accepted step, that step's tau), the extrapolation's
    reference; attempt: attempts so far (the ``step`` numbers of the stats); failures:
    uncertified solves in a row; accepted: accepted steps so far."""

    proposed: float
    previous_error: float | None = None
    history: tuple[Measure, float] | None = None
    attempt: int = 0
    failures: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class ConstantStepSize:
    """Fixed steps as a controller that accepts every step (diffrax's ``ConstantStepSize``):
    ``steps`` steps of size ``tau``; ``jk.solve(tau=..., steps=...)`` builds it."""

    tau: float
    steps: int

    def __post_init__(self):
        if not (is_real(self.tau) and np.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a positive finite step size, got {self.tau!r}")
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")

    @property
    def t_final(self) -> float:
        return self.steps * self.tau

    def init_state(self, accepted: int = 0) -> ControllerState:
        return ControllerState(self.tau, attempt=accepted, accepted=accepted)

    def finished(self, state: ControllerState, t: float) -> bool:
        return state.accepted >= self.steps

    def accept(self, state: ControllerState, tau: float, error: float, order: float,
               before: Measure) -> tuple[bool, ControllerState]:
        """Every step is accepted, and the next one has the same tau."""
        return True, replace(state, accepted=state.accepted + 1)


#: The StepController fields that are numbers (None allowed where the default is None).
NUMERIC_FIELDS = ("rtol", "atol", "tau0", "tau_min", "tau_max", "safety", "shrink", "growth",
                  "pcoeff", "icoeff", "error_order")


@dataclass(frozen=True)
class StepController:
    """Adaptive tau for ``jk.solve(..., t_final=T, controller=StepController(...))``.

    rtol, atol: tolerances of the local error, per component of the state (positions in
    units of length, weights in units of mass; docs/adaptive.md). distance: "rms" (None, the
    default: diffrax's componentwise norm), "mmd", "w2" or, with step doubling, a callable
    d(mu, nu) -> float (then atol and rtol apply to that one distance). kernel: the MMD kernel
    (None: the geometry's, or a Gaussian as wide as the spread of mu0). estimate:
    "extrapolation" (one solve per attempt, methods of local error order 2 only),
    "doubling" (three; any order) or None (extrapolation for order 2, doubling otherwise).
    tau0: first step (None: t_final / 100). tau_min, tau_max: bounds; falling below tau_min
    is an error. safety, shrink, growth: the controller's factor and its limits.
    pcoeff, icoeff: the PI gains, divided by the local error order q of the method
    (``error_order`` overrides the order the method declares).
    """

    rtol: float = 1e-3
    atol: float = 1e-6
    distance: str | Callable[[Measure, Measure], float] | None = None
    kernel: Kernel | None = None
    tau0: float | None = None
    tau_min: float = 1e-10
    tau_max: float = np.inf
    safety: float = 0.9
    shrink: float = 0.2
    growth: float = 5.0
    estimate: str | None = None
    #: PI gains (Hairer-Wanner): exponents -(icoeff + pcoeff)/q on err, pcoeff/q on err_prev.
    pcoeff: float = 0.4
    icoeff: float = 0.3
    error_order: float | None = None

    def __post_init__(self):
        for name in NUMERIC_FIELDS:  # a string or True would fail later, deep in a run
            value = getattr(self, name)
            if value is not None and (not is_real(value) or np.isnan(value)):
                raise ValueError(f"StepController {name} must be a number, got {value!r}")
        if self.tau0 is not None and not (np.isfinite(self.tau0) and self.tau0 > 0):
            raise ValueError(f"StepController tau0 must be a positive finite step (or None: "
                             f"t_final / 100), got {self.tau0!r}")
        if not (np.isfinite(self.tau_min) and np.isfinite(self.growth)):
            raise ValueError(f"StepController needs a finite tau_min and growth, got tau_min="
                             f"{self.tau_min!r}, growth={self.growth!r}")
        for name in ("rtol", "atol", "pcoeff", "icoeff"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"StepController {name} must be a finite number >= 0, got {value!r}")
        if self.rtol == 0 and self.atol == 0:
            raise ValueError("StepController needs rtol > 0 or atol > 0")
        if self.icoeff + self.pcoeff == 0:
            raise ValueError("StepController needs icoeff + pcoeff > 0 (else tau never changes)")
        if self.error_order is not None and not (np.isfinite(self.error_order) and self.error_order > 1):
            raise ValueError(f"StepController error_order must be a local error order > 1 (2 for "
                             f"first-order methods), got {self.error_order!r}")
        if not (0 < self.tau_min < self.tau_max):
            raise ValueError(f"StepController needs 0 < tau_min < tau_max, got tau_min="
                             f"{self.tau_min!r}, tau_max={self.tau_max!r}")
        if not (0 < self.shrink < 1 < self.growth and 0 < self.safety <= 1):
            raise ValueError("StepController needs 0 < shrink < 1 < growth and 0 < safety <= 1")
        if not (self.distance is None or callable(self.distance) or self.distance in DISTANCES):
            raise ValueError(f"unknown distance {self.distance!r}; use one of {DISTANCES} or a "
                             "callable d(mu, nu)")
        if self.estimate is not None and self.estimate not in ESTIMATES:
            raise ValueError(f"unknown estimate {self.estimate!r}; use one of {ESTIMATES} or None")
        if callable(self.distance) and self.estimate != "doubling":
            raise ValueError("a callable distance compares two measures, but the extrapolation "
                             "estimate measures a signed difference; pass estimate='doubling' "
                             "or distance='rms'/'mmd'/'w2'")

    def first_tau(self, t_final: float, tau: float | None) -> float:
        tau = tau if tau is not None else self.tau0 if self.tau0 is not None else t_final / 100
        return float(np.clip(tau, self.tau_min, self.tau_max))

    def init_state(self, t_final: float, tau: float | None = None) -> ControllerState:
        return ControllerState(self.first_tau(t_final, tau))

    def accept(self, state: ControllerState, tau: float, error: float, order: float,
               before: Measure) -> tuple[bool, ControllerState]:
        """Whether a step of size tau from ``before`` with normalized error ``error`` is
        accepted, and the state after it: the next proposed tau (PI controller), and for an
        accepted step its error and (before, tau) as the history of the next estimate."""
        accepted = error <= 1.0
        proposed = min(state.proposed * self.factor(error, state.previous_error, accepted, order),
                       self.tau_max)
        if not accepted:
            return False, replace(state, proposed=proposed, failures=0)
        return True, replace(state, proposed=proposed, failures=0, previous_error=error,
                             history=(before, tau), accepted=state.accepted + 1)

    def failed(self, state: ControllerState, tau: float) -> ControllerState:
        """The state after an attempt whose solve was not certified: retry at tau * shrink."""
        return replace(state, proposed=tau * self.shrink, failures=state.failures + 1)

    def order_of(self, method) -> float:
        """The local error order q used for ``method``: ``error_order``, else the one the
        method declares (``Method.local_error_order``)."""
        return float(self.error_order) if self.error_order is not None else local_error_order(method)

    def norm(self, geometry: Geometry, mu0: Measure, fixed_support: bool,
             order: float = DEFAULT_LOCAL_ERROR_ORDER) -> ErrorNorm:
        """The error norm of this controller for a run of ``geometry`` from mu0 by a method
        whose support is fixed (grid methods) or moves (particle methods), of local error
        order ``order``."""
        estimate = self.estimate or ("extrapolation" if order == 2 else "doubling")
        extrapolate = estimate == "extrapolation"
        if extrapolate and order != 2:
            raise ValueError(f"estimate='extrapolation' measures the O(tau^2) local error of a "
                             f"first-order step, but this method's local error is O(tau^{order:g}) "
                             "(e.g. Strang splitting): use estimate='doubling' (or None)")
        distance = "rms" if self.distance is None else self.distance
        if distance == "w2" and extrapolate and fixed_support:
            raise ValueError("distance='w2' with estimate='extrapolation' needs particles that "
                             "move: on a fixed support the extrapolated measure has signed "
                             "weights; use distance='rms' or 'mmd', or estimate='doubling'")
        if distance == "rms":
            positions = not fixed_support and geometry.has_transport
            weights = fixed_support or geometry.reaction is not None
            kernel = getattr(geometry.reaction, "kernel", None)  # MMD and IFT: the embedding
            return ErrorNorm(self, order, estimate, state=_State(positions, weights, kernel))
        if callable(distance):
            return ErrorNorm(self, order, estimate, metric=_Distance(distance, None, lambda mu: 0.0))
        if distance == "w2":
            return ErrorNorm(self, order, estimate, metric=_Distance(w2, _lagrangian_residual, _spread))
        kernel = self.kernel or getattr(geometry.reaction, "kernel", None)
        kernel = kernel or Gaussian(max(_spread(mu0), 1e-12))
        empty = Measure(mu0.points[:1], [0.0])
        return ErrorNorm(self, order, estimate, metric=_Distance(
            lambda mu, nu: mmd(mu, nu, kernel),
            lambda new, predicted: _signed_mmd(new, predicted, kernel),
            lambda mu: mmd(mu, empty, kernel)))

    def factor(self, error: float, previous_error: float | None, accepted: bool,
               order: float = DEFAULT_LOCAL_ERROR_ORDER) -> float:
        """The next tau over this tau, for a method of local error order ``order``."""
        factor = self.safety * max(error, ERROR_FLOOR) ** (-(self.icoeff + self.pcoeff) / order)
        if previous_error is not None:
            factor *= max(previous_error, ERROR_FLOOR) ** (self.pcoeff / order)
        factor = float(np.clip(factor, self.shrink, self.growth))
        return factor if accepted else min(factor, 1.0)


@dataclass(frozen=True)
class _State:
    """The state y of a measure for the componentwise norm: its positions (points (n, d),
    flattened) if they move, then its weights (n,) if they change, or with ``kernel`` (an MMD
    reaction) the kernel mean embedding (K a)_i = sum_j k(x_i, x_j) a_j at the points, which
    the step determines even where the weights a are not (a numerically singular Gram)."""

    positions: bool
    weights: bool
    kernel: Kernel | None = None

    def vector(self, points: np.ndarray, weights: np.ndarray) -> np.ndarray:
        points, weights = np.asarray(points, float), np.asarray(weights, float)
        if self.weights and self.kernel is not None:
            weights = np.asarray(self.kernel.apply(points, points, weights), float)
        parts = ([points.ravel()] if self.positions else []) + ([weights] if self.weights else [])
        return np.concatenate(parts) if parts else np.zeros(0)

    def of(self, mu: Measure) -> np.ndarray:
        return self.vector(mu.points, mu.weights)


@dataclass(frozen=True)
class _Distance:
    """An error measured as one distance: ``distance`` compares two measures (step doubling),
    ``residual`` measures new - predicted (extrapolation; None: doubling only), ``size`` is the
    distance of a measure from nothing."""

    distance: Callable[[Measure, Measure], float]
    residual: Callable | None
    size: Callable[[Measure], float]


@dataclass(frozen=True)
class ErrorNorm:
    """Normalized local errors of one run: ``estimate`` says how they are estimated, ``order``
    is the method's local error order q, and either ``state`` (the componentwise RMS norm) or
    ``metric`` (one distance) measures them. Each estimate returns (normalized error, local
    error), the local error being the RMS of the error vector or the distance."""

    controller: StepController
    order: float
    estimate: str
    metric: _Distance | None = None
    state: _State | None = None

    def doubling(self, start: Measure, coarse: Measure, fine: Measure) -> tuple[float, float]:
        """The error of ``fine`` (two steps of tau/2 from ``start``) from ``coarse`` (one step
        of tau): their difference over 2^{q-1} - 1 (Richardson)."""
        richardson = 2.0 ** (self.order - 1) - 1
        if self.state is not None:
            if not (start.n == coarse.n == fine.n):
                raise ValueError(f"the componentwise error norm compares particles one by one, but "
                                 f"the step changed their number ({start.n} -> {coarse.n}, "
                                 f"{fine.n}); use StepController(distance='mmd')")
            error = (self.state.of(fine) - self.state.of(coarse)) / richardson
            return self._componentwise(error, start, fine)
        local = float(self.metric.distance(coarse, fine)) / richardson
        return self._scalar(local, start, fine)

    def extrapolation(self, new: Measure, current: Measure, previous: Measure, tau: float,
                      sigma: float) -> tuple[float, float] | None:
        """The error of the step current -> new of size tau, from the previous accepted step
        previous -> current of size sigma; None when the supports do not line up (particles
        added or removed: use doubling for this step)."""
        if not (new.n == current.n == previous.n):
            return None
        ratio = tau / sigma
        predicted = (current.points + ratio * (current.points - previous.points),
                     current.weights + ratio * (current.weights - previous.weights))
        scale = tau / (2 * tau + sigma)
        if self.state is not None:
            error = scale * (self.state.of(new) - self.state.vector(*predicted))
            return self._componentwise(error, current, new)
        if self.metric.residual is None:
            return None
        return self._scalar(scale * float(self.metric.residual(new, predicted)), current, new)

    def hint(self) -> str:
        """What to change when the steps fall below tau_min, beyond rtol and atol."""
        if self.state is None or self.controller.atol > 0:
            return ""
        return ("; with atol = 0 a component at 0 (a cell without mass, a coordinate near 0) has "
                "no tolerance under the componentwise norm: give atol > 0 (a mass per point for "
                "weights, a length for positions; docs/adaptive.md)")

    def _componentwise(self, error: np.ndarray, start: Measure, end: Measure) -> tuple[float, float]:
        """diffrax's norm: RMS_i of e_i / (atol + rtol max(|y_k,i|, |y_k+1,i|)); a component
        with no tolerance (atol = 0 and y = 0) counts only when its error is not 0."""
        if error.size == 0:
            return 0.0, 0.0
        c = self.controller
        size = np.maximum(np.abs(self.state.of(start)), np.abs(self.state.of(end)))
        tolerance = c.atol + c.rtol * size
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(error == 0, 0.0, np.abs(error) / tolerance)
        return float(np.sqrt(np.mean(ratio**2))), float(np.sqrt(np.mean(error**2)))

    def _scalar(self, local: float, start: Measure, end: Measure) -> tuple[float, float]:
        c = self.controller
        size = max(float(self.metric.size(start)), float(self.metric.size(end)))
        return local / (c.atol + c.rtol * size), local


def _signed_mmd(new: Measure, predicted: tuple[np.ndarray, np.ndarray], kernel: Kernel) -> float:
    """||new - predicted||_H, predicted = (points, signed weights); on a shared support the
    weights are subtracted first, so that a small difference is not lost to cancellation."""
    points, weights = predicted
    if np.array_equal(points, new.points):
        x, w = points, new.weights - weights
    else:
        x, w = np.vstack([new.points, points]), np.concatenate([new.weights, -weights])
    return float(np.sqrt(max(float(w @ kernel.apply(x, x, w)), 0.0)))


def _lagrangian_residual(new: Measure, predicted: tuple[np.ndarray, np.ndarray]) -> float:
    """sqrt(sum_i b_i |x_i - x_p,i|^2): the positions' distance, particle by particle (an
    upper bound of W2 when the weights agree)."""
    points, _ = predicted
    return float(np.sqrt(new.weights @ ((new.points - points) ** 2).sum(axis=1)))


def _spread(mu: Measure) -> float:
    """sqrt(trace Cov mu): the W2 distance from mu to a point mass at its mean."""
    return float(np.sqrt(max(np.trace(mu.covariance()), 0.0)))
