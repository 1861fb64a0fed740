"""Error-controlled step sizes: a step-doubling error estimate and a PI controller.

One step of size tau is compared with two of size tau/2, in a distance d that fits the
geometry; the normalized error is

    err = d(mu_tau, mu_tau/2,tau/2) / (atol + rtol * size(mu)),

with size(mu) the distance of mu from "nothing" in the same metric (||mu||_H for MMD, the
spread sqrt(trace Cov mu) for W2). The step is accepted when err <= 1, the two half steps
are kept (the finer solution), and the next step is

    tau_next = tau * clip(safety * err^(-k_I) * err_prev^(k_P), shrink, growth)

(Gustafsson's PI controller with the exponents of Hairer and Wanner for an estimate of
local order p + 1 = 2; no growth right after a rejection).
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


@dataclass(frozen=True)
class StepController:
    """Adaptive tau for ``jk.solve(..., t_final=T, controller=StepController(...))``.

    rtol, atol: tolerances of the local error estimate (step doubling).
    distance: "mmd", "w2" or a callable d(mu, nu) -> float; None picks W2 for
    ``Wasserstein()`` and MMD otherwise (with the geometry's kernel, or a Gaussian kernel
    as wide as the spread of mu0 for Hellinger and WFR). kernel: the MMD kernel to use.
    tau0: first step (None: t_final / 100). tau_min, tau_max: bounds; falling below
    tau_min is an error. safety, shrink, growth: the controller's factor and its limits.
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

    def first_tau(self, t_final: float, tau: float | None) -> float:
        tau = tau if tau is not None else self.tau0 if self.tau0 is not None else t_final / 100
        return float(np.clip(tau, self.tau_min, self.tau_max))

    def norm(self, geometry: Geometry, mu0: Measure) -> ErrorNorm:
        """The error norm of this controller for a run of ``geometry`` from mu0."""
        distance = self.distance
        if distance is None:
            distance = "w2" if isinstance(geometry, Wasserstein) else "mmd"
        if callable(distance):
            return ErrorNorm(distance, lambda mu: 0.0, self.rtol, self.atol)
        if distance == "w2":
            return ErrorNorm(w2, _spread, self.rtol, self.atol)
        kernel = self.kernel or getattr(geometry.reaction, "kernel", None)
        kernel = kernel or Gaussian(max(_spread(mu0), 1e-12))
        empty = Measure(mu0.points[:1], [0.0])
        return ErrorNorm(lambda mu, nu: mmd(mu, nu, kernel), lambda mu: mmd(mu, empty, kernel),
                         self.rtol, self.atol)

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
    """err = distance(coarse, fine) / (atol + rtol * size(fine))."""

    distance: Callable[[Measure, Measure], float]
    size: Callable[[Measure], float]
    rtol: float
    atol: float

    def __call__(self, coarse: Measure, fine: Measure) -> tuple[float, float]:
        """(normalized error, raw distance)."""
        raw = float(self.distance(coarse, fine))
        return raw / (self.atol + self.rtol * float(self.size(fine))), raw


def _spread(mu: Measure) -> float:
    """sqrt(trace Cov mu): the W2 distance from mu to a point mass at its mean."""
    return float(np.sqrt(max(np.trace(mu.covariance()), 0.0)))
