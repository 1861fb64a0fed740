"""Methods: each turns (F, geometry, mu, tau) into a StepResult."""

from .back_and_forth import BackAndForthJKO
from .base import (
    MassMismatchWarning,
    Method,
    MethodState,
    SolverError,
    Status,
    StepResult,
    WeightClippingWarning,
)
from .conic import ConicJKO, GridLockingWarning
from .entropic import EntropicBlurWarning, EntropicJKO
from .explicit import ExplicitEuler
from .particle import ParticleJKO
from .splitting import Splitting

__all__ = ["BackAndForthJKO", "ConicJKO", "EntropicBlurWarning", "EntropicJKO", "ExplicitEuler",
           "GridLockingWarning",
           "MassMismatchWarning", "Method", "MethodState", "ParticleJKO", "SolverError", "Splitting",
           "Status", "StepResult", "WeightClippingWarning"]
