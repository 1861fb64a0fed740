"""Methods: each turns (F, geometry, mu, tau) into a StepResult."""

from .base import SolverError, StepResult
from .conic import ConicJKO, GridLockingWarning

__all__ = ["ConicJKO", "GridLockingWarning", "SolverError", "StepResult"]
