"""jko_ift: JKO steps and particle schemes for gradient flows of measures.

Energies (what decreases) and geometries (how mass may move) are independent pieces;
a method turns them into steps. See ``docs/theory.md`` for the conventions.
"""

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
