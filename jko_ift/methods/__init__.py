"""Methods: each turns (F, geometry, mu, tau) into a StepResult."""

from .base import SolverError, StepResult
from .conic import ConicJKO, GridLockingWarning
from .entropic import EntropicBlurWarning, EntropicJKO

__all__ = ["ConicJKO", "EntropicBlurWarning", "EntropicJKO", "GridLockingWarning", "SolverError",
           "StepResult"]
