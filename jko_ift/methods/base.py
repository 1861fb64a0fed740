"""What every method returns (``StepResult``) and raises (``SolverError``), and input checks."""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..energies import Energy
from ..geometries import Geometry
from ..measures import Measure

#: Statuses of a step whose measure can be trusted.
OK_STATUSES = ("optimal",)


class SolverError(RuntimeError):
    """A step failed or was inaccurate; ``status`` and ``result`` say how."""

    def __init__(self, message: str, status: str = "failed", result: StepResult | None = None):
        super().__init__(message)
        self.status = status
        self.result = result


@dataclass(frozen=True)
class StepResult:
    """One step mu^k -> mu^{k+1}.

    measure: the new measure (None when the solve produced no solution).
    objective: F(mu^{k+1}) + D^2(mu^{k+1}, mu^k) / (2 tau), evaluated in NumPy.
    energy: F(mu^{k+1}); distance_sq: the D^2 of the step (at the intermediate measure the
    solver found, for inf-convolutions an upper bound of the infimum).
    certificate: a relative optimality measure (duality gap, KKT or exclusion residual).
    info: method-specific statistics (solver, iterations, times, radius, ...).
    """

    measure: Measure | None
    objective: float
    energy: float
    distance_sq: float
    status: str
    certificate: float
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


def check_step_input(F, geometry, mu, tau) -> float:
    """Validate the arguments every method shares; return tau as a float."""
    if not isinstance(F, Energy):
        raise ValueError(f"F must be a jko_ift energy (e.g. jk.MMD2(target, kernel)), got {F!r}")
    if not isinstance(geometry, Geometry):
        raise ValueError(f"geometry must be one of jk.Wasserstein(), jk.Hellinger(), jk.MMD(k), "
                         f"jk.WFR(alpha, beta), jk.IFT(k, alpha, beta); got {geometry!r}")
    if not isinstance(mu, Measure):
        raise ValueError(f"mu must be a jk.Measure, got {type(mu).__name__}")
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a positive number, got {tau!r}") from None
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive finite step size, got {tau!r}")
    if mu.mass <= 0:
        raise ValueError("mu has zero total mass; a JKO step needs a measure with positive mass")
    return tau


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def warn_user(message: str, category: type[Warning]) -> None:
    """Warn, attributing the warning to the first caller outside jko_ift."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def support_key(mu: Measure) -> str:
    """A hash of the points of mu: methods cache their per-support work under it."""
    return hashlib.sha1(np.ascontiguousarray(mu.points).tobytes()).hexdigest()


def check_choice(name: str, value, allowed) -> None:
    """ValueError unless ``value`` is one of ``allowed``, naming both."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(allowed)}")
