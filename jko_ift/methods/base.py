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

#: Statuses of a step whose measure can be trusted. Others: "diverged" (non-finite result),
#: "unstable" (an explicit step past its stability limit: the energy rose, see
#: ``particle.finish``), solver statuses such as "optimal_inaccurate" or "max_iterations".
OK_STATUSES = ("optimal",)

#: Masses that agree to this relative tolerance are the same mass. A float64 sum of n weights
#: is exact to about n * 1.1e-16; weights that passed through float32 (torch tensors) carry a
#: relative error up to 6e-8 each, hence their (positive) sum too (measured: float32 weights
#: 1/n, n = 10^4 .. 10^6, sum within 2.5e-8 of 1). 1e-6 is well above both.
MASS_RTOL = 1e-6


class MassMismatchWarning(UserWarning):
    """The masses of a step do not fit its geometry or energy: a target of another mass than mu
    under a mass-conserving geometry (the energy cannot reach its minimum 0), or a measure of
    mass != 1 under a spherical (probability) reaction geometry."""


class WeightClippingWarning(UserWarning):
    """A reaction step set weights to zero (the constraint b >= 0 was active): the run follows
    the positivity-constrained flow, not the unconstrained particle ODE."""


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


def check_step_input(F, geometry, mu, tau, warn_masses: bool = True) -> float:
    """Validate the arguments every method shares; return tau as a float.

    Every method calls this once per step. With ``warn_masses`` it also warns
    (``MassMismatchWarning``, see ``check_masses``) when the masses do not fit the problem."""
    if not isinstance(F, Energy):
        raise ValueError(f"F must be a jko_ift energy (e.g. jk.MMD2(target, kernel)), got {F!r}")
    if not isinstance(geometry, Geometry):
        raise ValueError(f"geometry must be one of jk.Wasserstein(), jk.Hellinger(), jk.MMD(k), "
                         f"jk.WFR(alpha, beta), jk.IFT(k, alpha, beta); got {geometry!r}")
    if not isinstance(mu, Measure):
        raise ValueError(f"mu must be a jk.Measure, got {type(mu).__name__}")
    if isinstance(tau, (bool, str)):  # float(True) = 1.0 and float("0.1") would pass silently
        raise ValueError(f"tau must be a positive number, got {tau!r}")
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a positive number, got {tau!r}") from None
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive finite step size, got {tau!r}")
    if mu.mass <= 0:
        raise ValueError("mu has zero total mass; a JKO step needs a measure with positive mass")
    if warn_masses:
        check_masses(F, geometry, mu)
    return tau


def energy_targets(F: Energy):
    """(name, target measure) of each term of F with a target measure: MMD2, and KL given a
    Measure (a KL to a log-density has no mass of its own: spherical flows ignore it), as
    the energy states them (``Energy.targets``)."""
    yield from F.targets()


def check_masses(F: Energy, geometry: Geometry, mu: Measure) -> None:
    """Warn (``MassMismatchWarning``) where the masses make the run another problem than the
    one it looks like; the mathematics stays defined, so these are warnings, not errors.

    * conserve_mass (W2, or a spherical reaction): a target of MMD2 or KL whose mass differs
      from mu's cannot be reached: F stays above 0 (MMD2 converges to the closest measure of
      mu's mass, in general not even the rescaled target; KL to the rescaled target).
    * a spherical reaction geometry (``conserve_mass=True`` of Hellinger, MMD, WFR, IFT) is the
      geometry of probability measures; given mass M != 1 it runs the flow of mass-M measures
      (where the first variation scales with the mass, as for MMD2 to a target of mass M or an
      interaction, transport and the Hellinger reaction run M times faster than for mass 1).
    """
    if not geometry.conserve_mass:
        return
    mass = float(mu.mass)
    for name, target in energy_targets(F):
        if not np.isclose(target.mass, mass, rtol=MASS_RTOL, atol=0.0):
            warn_user(f"the target of {name} has mass {target.mass:.6g} but mu has mass {mass:.6g}, "
                      f"and {type(geometry).__name__} conserves mass: the flow cannot reach the "
                      "target and F cannot reach 0 (it converges to a measure of mass "
                      f"{mass:.6g}). Give both the same mass (e.g. normalize both: "
                      "grid.measure(..., normalize=True), or divide the weights by their sum), "
                      "or use a reaction geometry on positive measures (conserve_mass=False)",
                      MassMismatchWarning)
            return
    if geometry.reaction is not None and not np.isclose(mass, 1.0, rtol=MASS_RTOL, atol=0.0):
        warn_user(f"{type(geometry).__name__}(conserve_mass=True) is the spherical geometry of "
                  f"probability measures, but mu has mass {mass:.6g}: the run keeps that mass and "
                  f"follows the flow of mass-{mass:.6g} measures, not of probabilities. Normalize mu "
                  "(grid.measure(density, normalize=True), or jk.Measure(points, weights / "
                  "weights.sum())), or pass conserve_mass=False for positive measures",
                  MassMismatchWarning)


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def warn_user(message: str, category: type[Warning]) -> None:
    """Warn, attributing the warning to the first caller outside jko_ift."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the caller of warn_user: frame 1
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


#: Weights set to zero in a step are reported (``WeightClippingWarning``) when the mass they
#: carried before the step, plus the negative mass the unconstrained update gave them where it
#: is known, exceeds this fraction of the mass. Below it is round-off: the QP's active set
#: drops weights within ACTIVE_SET_ROUNDOFF = 1e-13 of their scale (n <= 10^4 of them: 1e-9),
#: weights of 1e-300 or a drift of -1e-15. Measured: pure MMD flows with positive weights
#: zero nothing; the IFT flow of tests/test_regimes.py, whose weights leave the cone, zeroes
#: 4e-5 to 4e-3 of the mass in the step where a weight dies (ExplicitEuler, Splitting,
#: ParticleJKO, projected gradient; tau = 0.01 .. 0.05). A weight that reaches zero at rate r
#: carries about r tau: steps below 1e-9 / r would go unreported.
CLIPPED_MASS_RTOL = 1e-9


def clipping_report(a: np.ndarray, b: np.ndarray, info: dict, method: str) -> None:
    """Record (``info["zeroed_weights"]``, ``info["zeroed_mass"]``) and warn
    (``WeightClippingWarning``) when a step set positive weights a_i to b_i <= 0.

    The mass counted is what those weights carried before the step, plus the negative mass the
    unconstrained update gave them where the method knows it (``info["clipped_mass"]`` of the
    linear Hellinger update, negative entries of b). Below CLIPPED_MASS_RTOL of the mass it is
    round-off and is not reported. A method whose reaction keeps weights positive (Hellinger:
    the exact, multiplicative and adjoint updates) sets ``info["positivity_preserving"]``: its
    zeros are underflow (a e^{-eta f} below 5e-324), recorded as ``underflow_weights``."""
    zeroed = (a > 0) & (b <= 0)
    count = int(np.count_nonzero(zeroed))
    if count == 0:
        return
    if info.get("positivity_preserving", False):
        info["underflow_weights"] = count
        return
    carried = float(a[zeroed].sum())
    negative = float(info.get("clipped_mass", 0.0)) + float(-b[b < 0].sum())
    info.update(zeroed_weights=count, zeroed_mass=carried)
    mass = float(a.sum())
    if carried + negative <= CLIPPED_MASS_RTOL * mass:
        return
    unconstrained = (f"; the unconstrained update would have made them negative, {-negative:.3g} "
                     "in all" if negative > 0 else "")
    warn_user(f"{method}: weights reached zero in this step: {count} (carrying mass "
              f"{carried:.3g} of {mass:.3g} before it{unconstrained}); the constraint b >= 0 is "
              "active, so the run follows the positivity-constrained flow, not the unconstrained "
              "flow, whose weights go negative. A smaller tau helps only when the "
              "clipping is an overshoot of the step; when the flow itself drives weights below "
              "zero (the MMD reaction of IFT can), every scheme converges to the constrained "
              "flow whatever tau: compare a run at tau / 2 to tell which",
              WeightClippingWarning)


def without_excluded(F, mu: Measure, weights: np.ndarray) -> np.ndarray:
    """The weights with exact zeros where F is +inf unless the weight vanishes
    (``Energy.excluded``: KL to a target with zeros). Iterative solvers leave tiny masses
    there (1e-11 to 1e-215), which make every later energy infinite."""
    excluded = F.excluded(mu)
    if excluded is None:
        return weights
    removed = float(weights[excluded].sum())
    if removed > CLIPPED_MASS_RTOL * float(weights.sum()):  # more than round-off: not silently
        warn_user(f"the step left mass {removed:.3g} (of {weights.sum():.3g}) where the energy is "
                  "+inf unless the weight vanishes (KL to a target with zeros); it was set to zero, "
                  "so the step is not the solver's minimizer there: tighten the solver's tolerance",
                  WeightClippingWarning)
    return np.where(excluded, 0.0, weights)
