"""Methods: each turns (F, geometry, mu, tau) into a StepResult.

``ConicJKO`` (CVXPY) and ``BackAndForthJKO`` (numba) load on first use (PEP 562): their libraries
take a second or more to import, and a run of the particle methods needs neither.
"""

import importlib

from .base import (
    MassMismatchWarning,
    Method,
    MethodState,
    SolverError,
    Status,
    StepResult,
    WeightClippingWarning,
)
from .entropic import EntropicBlurWarning, EntropicJKO
from .explicit import ExplicitEuler
from .grid_motion import GridLockingWarning
from .particle import ParticleJKO
from .splitting import Splitting

__all__ = ["BackAndForthJKO", "ConicJKO", "EntropicBlurWarning", "EntropicJKO", "ExplicitEuler",
           "GridLockingWarning",
           "MassMismatchWarning", "Method", "MethodState", "ParticleJKO", "SolverError", "Splitting",
           "Status", "StepResult", "WeightClippingWarning"]

#: Public names whose modules are imported on first use.
_LAZY = {"ConicJKO": ".conic", "BackAndForthJKO": ".back_and_forth"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
