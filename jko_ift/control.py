"""Error-controlled step sizes: a local error estimate and a PI controller.

Two estimates of the local error of a first-order step mu^k -> mu^{k+1} of size tau, in a
distance d that fits the geometry:

* ``estimate="extrapolation"`` (default, one solve per attempt): with the previous accepted
  step of size sigma, the linear extrapolation mu_p = mu^k + (tau/sigma)(mu^k - mu^{k-1}) (of
  the weights on a fixed support, of the positions and weights of particles) is off by
  tau (tau + sigma) mu''/2 and backward Euler by tau^2 mu''/2, so

      local error ~ tau / (2 tau + sigma) * d(mu^{k+1}, mu_p)

  (the first step, without a history, uses step doubling);
* ``estimate="doubling"`` (three solves per attempt): one step of tau against two of tau/2,
  local error of the two half steps ~ d(mu_tau, mu_tau/2,tau/2); works with any distance.

The normalized error is err = local error / (atol + rtol * size(mu)), with size(mu) the
distance of mu from "nothing" in the same metric (||mu||_H for MMD, the spread
sqrt(trace Cov mu) for W2). The step is accepted when err <= 1 and the next step is

    tau_next = tau * clip(safety * err^(-k_I) * err_prev^(k_P), shrink, growth)

(Gustafsson's PI controller with the exponents of Hairer and Wanner for an estimate of local
order 2, k_I = 0.7/2 and k_P = 0.4/2; no growth right after a rejection). Controlling the
error per step, the global error of a first-order method scales like sqrt(rtol). (Error per
unit step, local error / tau, would make it scale like rtol, but it divides the solvers'
own error by tau: with MMD steps accurate to about 1e-5 in MMD, small steps then look
inaccurate and the controller shrinks tau without end.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .diagnostics import mmd, w2
from .geometries import Geometry, Wasserstein
from .kernels import Gaussian, Kernel
from .measures import Measure

DISTANCES = ("mmd", "w2")
ESTIMATES = ("extrapolation", "doubling")


@dataclass(frozen=True)
class StepController:
    """Adaptive tau for ``jk.solve(..., t_final=T, controller=StepController(...))``.

    rtol, atol: tolerances of the local error estimate. estimate: "extrapolation" (one
    solve per attempt) or "doubling" (three; any distance).
    distance: "mmd", "w2" or, with step doubling, a callable d(mu, nu) -> float. None picks
    W2 for ``Wasserstein()`` and MMD otherwise (with the geometry's kernel, or a Gaussian
    kernel as wide as the spread of mu0 for Hellinger and WFR); W2 needs moving particles
    for the extrapolation estimate (on a fixed support the difference of measures is signed),
    so a W2 flow on a fixed grid defaults to MMD there. kernel: the MMD kernel to use.
    tau0: first step (None: t_final / 100). tau_min, tau_max: bounds; falling below
    tau_min is an error. safety, shrink, growth: the controller's factor and its limits.
    integral_exponent, proportional_exponent: the PI exponents.
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
    estimate: str = "extrapolation"
    #: PI exponents for an error estimate of local order 2 (Hairer-Wanner: 0.7/2, 0.4/2).
    integral_exponent: float = 0.35
    proportional_exponent: float = 0.2

    def __post_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"StepController {name} must be a finite number >= 0, got {value!r}")
        if self.rtol == 0 and self.atol == 0:
            raise ValueError("StepController needs rtol > 0 or atol > 0")
        if not (0 < self.tau_min < self.tau_max):
            raise ValueError(f"StepController needs 0 < tau_min < tau_max, got tau_min="
                             f"{self.tau_min!r}, tau_max={self.tau_max!r}")
        if not (0 < self.shrink < 1 < self.growth and 0 < self.safety <= 1):
            raise ValueError("StepController needs 0 < shrink < 1 < growth and 0 < safety <= 1")
        if not (self.distance is None or callable(self.distance) or self.distance in DISTANCES):
            raise ValueError(f"unknown distance {self.distance!r}; use one of {DISTANCES} or a "
                             "callable d(mu, nu)")
        if self.estimate not in ESTIMATES:
            raise ValueError(f"unknown estimate {self.estimate!r}; use one of {ESTIMATES}")
        if callable(self.distance) and self.estimate != "doubling":
            raise ValueError("a callable distance compares two measures, but the extrapolation "
                             "estimate measures a signed difference; pass estimate='doubling' "
                             "or distance='mmd'/'w2'")

    def first_tau(self, t_final: float, tau: float | None) -> float:
        tau = tau if tau is not None else self.tau0 if self.tau0 is not None else t_final / 100
        return float(np.clip(tau, self.tau_min, self.tau_max))

    def norm(self, geometry: Geometry, mu0: Measure, fixed_support: bool) -> ErrorNorm:
        """The error norm of this controller for a run of ``geometry`` from mu0 by a method
        whose support is fixed (grid methods) or moves (particle methods)."""
        extrapolate = self.estimate == "extrapolation"
        distance = self.distance
        if distance is None:
            transport = isinstance(geometry, Wasserstein)
            distance = "w2" if transport and not (extrapolate and fixed_support) else "mmd"
        if distance == "w2" and extrapolate and fixed_support:
            raise ValueError("distance='w2' with estimate='extrapolation' needs particles that "
                             "move: on a fixed support the extrapolated measure has signed "
                             "weights; use distance='mmd' or estimate='doubling'")
        if callable(distance):
            return ErrorNorm(self, distance, None, lambda mu: 0.0)
        if distance == "w2":
            return ErrorNorm(self, w2, _lagrangian_residual, _spread)
        kernel = self.kernel or getattr(geometry.reaction, "kernel", None)
        kernel = kernel or Gaussian(max(_spread(mu0), 1e-12))
        empty = Measure(mu0.points[:1], [0.0])
        return ErrorNorm(self, lambda mu, nu: mmd(mu, nu, kernel),
                         lambda new, predicted: _signed_mmd(new, predicted, kernel),
                         lambda mu: mmd(mu, empty, kernel))

    def factor(self, error: float, previous_error: float | None, accepted: bool) -> float:
        """The next tau over this tau."""
        error = max(error, 1e-10)
        factor = self.safety * error ** (-self.integral_exponent)
        if previous_error is not None:
            factor *= max(previous_error, 1e-10) ** self.proportional_exponent
        factor = float(np.clip(factor, self.shrink, self.growth))
        return factor if accepted else min(factor, 1.0)


@dataclass(frozen=True)
class ErrorNorm:
    """Normalized local errors: local error / (atol + rtol * size(mu)). ``distance``
    compares two measures (step doubling); ``residual`` measures new - predicted for the
    extrapolation estimate (None: doubling only)."""

    controller: StepController
    distance: Callable[[Measure, Measure], float]
    residual: Callable | None
    size: Callable[[Measure], float]

    def doubling(self, coarse: Measure, fine: Measure) -> tuple[float, float]:
        """(normalized error, local error) of the two half steps ``fine``."""
        return self._normalized(float(self.distance(coarse, fine)), fine)

    def extrapolation(self, new: Measure, current: Measure, previous: Measure, tau: float,
                      sigma: float) -> tuple[float, float] | None:
        """(normalized error, local error) of the step current -> new of size tau, from the
        previous accepted step previous -> current of size sigma; None when the supports do
        not line up (particles added or removed: use doubling for this step)."""
        if self.residual is None or not (new.n == current.n == previous.n):
            return None
        ratio = tau / sigma
        predicted = (current.points + ratio * (current.points - previous.points),
                     current.weights + ratio * (current.weights - previous.weights))
        local = tau / (2 * tau + sigma) * float(self.residual(new, predicted))
        return self._normalized(local, new)

    def _normalized(self, local: float, mu: Measure) -> tuple[float, float]:
        c = self.controller
        return local / (c.atol + c.rtol * float(self.size(mu))), local


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
