"""jko_ift: JKO steps and particle schemes for gradient flows of measures.

Energies (what decreases) and geometries (how mass may move) are independent pieces;
a method turns them into steps. See ``docs/theory.md`` for the conventions.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

# The public names are loaded on first use (PEP 562): ``import jko_ift`` and ``jko-ift --help`` do
# not pay for cvxpy, SciPy's statistics or numba until a name that needs them is used. The imports
# below are what the names are (static tools and tests/test_layout.py read them).
if TYPE_CHECKING:
    from .control import StepController
    from .diagnostics import convergence_order, mmd, w2
    from .energies import KL, MMD2, Energy, Entropy, Interaction, PorousMedium, Potential
    from .geometries import IFT, MMD, WFR, Hellinger, InfConvolution, Wasserstein
    from .io import load
    from .kernels import IMQ, EnergyKernel, Gaussian, Laplace
    from .measures import Grid, Measure
    from .methods import (
        BackAndForthJKO,
        ConicJKO,
        EntropicBlurWarning,
        EntropicJKO,
        ExplicitEuler,
        GridLockingWarning,
        MassMismatchWarning,
        ParticleJKO,
        SolverError,
        Splitting,
        StepResult,
        WeightClippingWarning,
    )
    from .solve import DissipationWarning, Trajectory, jko_step, solve

__version__ = "0.1.0"

__all__ = [
    "IFT", "IMQ", "KL", "MMD", "MMD2", "WFR", "BackAndForthJKO", "ConicJKO", "DissipationWarning", "Energy",
    "EntropicBlurWarning", "EntropicJKO", "ExplicitEuler", "ParticleJKO", "Splitting",
    "EnergyKernel", "Entropy", "Gaussian", "Grid", "GridLockingWarning", "Hellinger",
    "InfConvolution", "Interaction", "Laplace", "MassMismatchWarning", "Measure", "PorousMedium",
    "Potential", "SolverError", "StepController", "StepResult", "Trajectory", "Wasserstein",
    "WeightClippingWarning", "convergence_order",
    "jko_step", "load", "mmd", "solve", "w2",
]


#: public name -> the module of the package that defines it (the imports above).
_SOURCES = {
    "StepController": "control",
    **dict.fromkeys(("convergence_order", "mmd", "w2"), "diagnostics"),
    **dict.fromkeys(("KL", "MMD2", "Energy", "Entropy", "Interaction", "PorousMedium", "Potential"),
                    "energies"),
    **dict.fromkeys(("IFT", "MMD", "WFR", "Hellinger", "InfConvolution", "Wasserstein"), "geometries"),
    "load": "io",
    **dict.fromkeys(("IMQ", "EnergyKernel", "Gaussian", "Laplace"), "kernels"),
    **dict.fromkeys(("Grid", "Measure"), "measures"),
    **dict.fromkeys(("BackAndForthJKO", "ConicJKO", "EntropicBlurWarning", "EntropicJKO", "ExplicitEuler",
                     "GridLockingWarning", "MassMismatchWarning", "ParticleJKO", "SolverError", "Splitting",
                     "StepResult", "WeightClippingWarning"), "methods"),
    **dict.fromkeys(("DissipationWarning", "Trajectory", "jko_step", "solve"), "solve"),
}


def __getattr__(name: str):
    """A public name, imported from its module on first use; else a submodule (``jk.problems``)."""
    if name in _SOURCES:
        value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's module type: loading a submodule that shares a public name (``jko_ift.solve``
    the module, ``jk.solve`` the function) binds the module onto the package; the public name wins,
    as it did when this file imported every name eagerly."""

    def __setattr__(self, name: str, value) -> None:
        if name in _SOURCES and isinstance(value, types.ModuleType):
            return  # the name stays the public function or class, loaded by __getattr__
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
