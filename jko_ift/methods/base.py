"""What every method returns (``StepResult``) and raises (``SolverError``), and input checks."""

from __future__ import annotations

import copy
import enum
import hashlib
import os
import sys
import threading
import warnings
import weakref
from dataclasses import FrozenInstanceError, dataclass, field, replace
from typing import ClassVar

import numpy as np

from ..display import html_summary, text_summary
from ..energies import Energy
from ..geometries import Geometry
from ..measures import Measure, _is_frozen_here, with_array_type


class Status(str, enum.Enum):
    """How a step ended. A ``str`` (``Status.OPTIMAL == "optimal"``, JSON writes the string);
    ``advice`` says what it means and what to change; ``ok``: the measure can be trusted."""

    def __new__(cls, value: str, advice: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.advice = advice
        return member

    OPTIMAL = "optimal", "the step problem was solved to the method's tolerance"
    EXPLICIT = "explicit", (
        "an explicit (forward) step: no minimization problem was solved, so there is nothing to "
        "certify (certificate 0); its error is a time-stepping error: compare a run at tau / 2, "
        "and see info['stability_ratio'] (tau times the curvature of F along the step, < 2)")
    OPTIMAL_INACCURATE = "optimal_inaccurate", (
        "the solver stopped before its tolerance (or the step rose above not moving): tighten "
        "the solver's options, take a smaller tau or try another solver")
    MAX_ITERATIONS = "max_iterations", (
        "the iteration limit was reached before the tolerance: raise max_iter, loosen tol, or "
        "take a smaller tau (for entropic steps: a larger eps)")
    STALLED = "stalled", (
        "an ascent stopped making progress above its tolerance (BackAndForthJKO: at a kink of "
        "its dual): take a smaller tau, or loosen tol")
    DIVERGED = "diverged", (
        "the step produced non-finite positions, weights or energy: tau is beyond the stability "
        "limit of the scheme; take a smaller tau or an implicit method (jk.ParticleJKO())")
    UNSTABLE = "unstable", (
        "an explicit step past its stability limit (F rose along it, info['stability_ratio'] "
        "> 2): take a smaller tau or an implicit method")
    OVERFLOW = "overflow", (
        "the scalings left the float range: use domain='log' or 'auto', or a larger eps")
    INFEASIBLE = "infeasible", (
        "the step problem has no feasible point: check that the support carries the mass the "
        "geometry keeps, and that the energy is finite somewhere on it")
    INFEASIBLE_INACCURATE = "infeasible_inaccurate", (
        "the solver found the step problem (probably) infeasible: see 'infeasible'")
    UNBOUNDED = "unbounded", "the energy is unbounded below on this support"
    UNBOUNDED_INACCURATE = "unbounded_inaccurate", (
        "the solver found the energy (probably) unbounded below on this support")
    USER_LIMIT = "user_limit", (
        "the solver stopped at a limit set in its options (time, iterations): raise it")
    SOLVER_ERROR = "solver_error", (
        "the solver failed (numerical trouble): try another solver, other solver_options or a "
        "smaller tau")
    FAILED = "failed", "the step produced no measure: see the error message and info"
    TAU_MIN = "tau_min", (
        "an adaptive step size fell below the controller's tau_min: loosen rtol/atol or lower "
        "tau_min")

    @classmethod
    def _missing_(cls, value):
        # one meaning, one name: the Sinkhorn loops' old "not_converged" is MAX_ITERATIONS
        if value == "not_converged":
            return cls.MAX_ITERATIONS
        return None

    @classmethod
    def of_solver(cls, name) -> Status:
        """The status of a solver's own status name (CVXPY's: "optimal", "infeasible", ...);
        names without a member are SOLVER_ERROR (the name itself goes to info)."""
        try:
            return cls(str(name).replace(" ", "_").lower())
        except ValueError:
            return cls.SOLVER_ERROR

    @property
    def ok(self) -> bool:
        return self in OK_STATUSES

    # a Status is its string everywhere: in dicts (hash), messages (repr, str, format), JSON
    __hash__ = str.__hash__

    def __repr__(self) -> str:
        return repr(self.value)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


#: Statuses of a step whose measure can be trusted: solved to tolerance, or explicit (nothing
#: to solve). Others: see ``Status`` and each member's ``advice``.
OK_STATUSES = (Status.OPTIMAL, Status.EXPLICIT)

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
        self.status = Status(status)
        self.result = result

    @property
    def advice(self) -> str:
        return self.status.advice


#: The entries of ``StepResult.info`` its summary shows (when the method reports them).
SHOWN_INFO = ("kind", "solver", "iterations", "eps", "eps_reached", "wall_time", "solve_time",
              "stability_ratio", "error_bound")


@dataclass(frozen=True)
class StepResult:
    """One step mu^k -> mu^{k+1}; build it with ``StepResult.build`` (or ``.failed``).

    measure: the new measure (None when the solve produced no solution).
    objective: F(mu^{k+1}) + D^2 / (2 tau), for every method: the value of the JKO problem at
    the returned measure (for an explicit step: where it lands, not what it minimizes). A
    method's own regularization (the entropic term) is not in it but in ``info``
    (``entropic_term``, ``regularized_objective``).
    energy: F(mu^{k+1}); distance_sq: the D^2 of the step as the method measured it (for
    inf-convolutions at the intermediate measure it found: an upper bound of the infimum; for
    particles, that of the particle coupling).
    status: a ``Status`` (strings are converted; ``Status(...).advice`` says what to change).
    certificate: a relative optimality measure (duality gap, KKT or exclusion residual; 0 for
    explicit steps, which solve nothing).
    info: method-specific statistics (solver, iterations, times, radius, ...); complete at
    construction, never changed afterwards (build a new result with ``dataclasses.replace``).
    """

    measure: Measure | None
    objective: float
    energy: float
    distance_sq: float
    status: Status
    certificate: float
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "status", Status(self.status))  # ValueError on an unknown name

    @property
    def ok(self) -> bool:
        return self.status.ok

    def _summary(self) -> tuple[str, list, list]:
        """(title, fields, notes) of the step's summary (``display``)."""
        measure = self.measure
        fields = [("status", self.status.value), ("objective", self.objective),
                  ("energy", self.energy), ("distance_sq", self.distance_sq),
                  ("certificate", self.certificate),
                  ("measure", "none" if measure is None else
                   f"{measure.n} points in {measure.dim}-D, mass {float(measure.mass):.4g}")]
        fields += [(key, self.info[key]) for key in SHOWN_INFO if self.info.get(key) is not None]
        notes = [] if self.ok else [f"{self.status.value}: {self.status.advice}"]
        return f"StepResult ({self.status.value})", fields, notes

    def __repr__(self) -> str:
        return text_summary(*self._summary())

    def _repr_html_(self) -> str:
        """The step's summary for a notebook: status (with advice when it failed), objective,
        energy, certificate, the measure's size and the solver's statistics."""
        return html_summary(*self._summary())

    @classmethod
    def build(cls, F: Energy, measure: Measure, tau: float, distance_sq: float, status,
              certificate: float, info: dict, energy: float | None = None) -> StepResult:
        """The result of a step that produced ``measure``: energy F(measure) (pass ``energy``
        when it is already known) and objective energy + distance_sq / (2 tau)."""
        energy = float(F.value(measure)) if energy is None else float(energy)
        distance_sq = float(distance_sq)
        return cls(measure, energy + distance_sq / (2 * float(tau)), energy, distance_sq, status,
                   float(certificate), info)

    @classmethod
    def failed(cls, status, info: dict, certificate: float = np.inf) -> StepResult:
        """The result of a step that produced no measure."""
        return cls(None, np.nan, np.nan, np.nan, status, float(certificate), info)


class Same:
    """A dict key that stands for an object by identity and holds it, so that its ``id``
    cannot be recycled while the key lives (keys of bare ``id(F)`` can match a new energy)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other) -> bool:
        return isinstance(other, Same) and other.obj is self.obj


@dataclass
class MethodState:
    """What a method carries from one step of a run to the next, owned by the driver.

    steps: steps taken with this state; rng: the method's random generator (None: none);
    warm: what changes the next step's result (warm starts, radii, reused energies): copied
    by ``fork``, so that a state handed out stays as it was; cache: pure caches (compiled
    programs, Gibbs operators), shared between forks since they never change a result."""

    steps: int = 0
    rng: np.random.Generator | None = None
    warm: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    def fork(self) -> MethodState:
        return MethodState(self.steps, _copy_generator(self.rng),
                           {key: copy.copy(value) for key, value in self.warm.items()}, self.cache)

    def without_cache(self) -> MethodState:
        """This state less its caches (also those of the method states in its warm starts, such
        as a nested method's): what a finished run keeps (compiled programs and Gibbs operators
        can take megabytes; a run resumed from it builds them anew)."""
        warm = {key: value.without_cache() if isinstance(value, MethodState) else value
                for key, value in self.warm.items()}
        return MethodState(self.steps, self.rng, warm, {})

    def forget(self) -> None:
        """Drop the warm starts and caches in place, but for the nested method states (which
        forget theirs): the state becomes what a run resumed from a file starts with
        (``from_dict(to_dict())``), so that a run that writes a checkpoint here and its copy
        resumed from that checkpoint take the same steps, bit for bit."""
        nested = self._nested()
        for state in nested.values():
            state.forget()
        self.warm.clear()
        self.warm.update(nested)
        self.cache.clear()

    def _nested(self) -> dict:
        """The warm starts that are method states (a wrapped or fallback method's)."""
        return {key: value for key, value in self.warm.items() if isinstance(value, MethodState)}

    def to_dict(self) -> dict:
        """What a file keeps (JSON-ready): the step counter and the generator's state, and those
        of the nested method states (``nested``). Warm starts and caches are not kept: a run
        resumed from a file starts them anew (grid methods then agree with the uninterrupted
        run to their solver's tolerance; particle methods and ExplicitEuler, whose noise is the
        generator's, bit for bit)."""
        data = {"steps": self.steps, "rng": None if self.rng is None else self.rng.bit_generator.state}
        nested = {key: state.to_dict() for key, state in self._nested().items()}
        return data | ({"nested": nested} if nested else {})

    @classmethod
    def from_dict(cls, data: dict) -> MethodState:
        """The state back from ``to_dict`` (its generator continues where it stood)."""
        rng = None
        if data.get("rng") is not None:
            bit_generator = getattr(np.random, data["rng"]["bit_generator"])()
            bit_generator.state = data["rng"]
            rng = np.random.Generator(bit_generator)
        nested = {key: cls.from_dict(value) for key, value in (data.get("nested") or {}).items()}
        return cls(steps=int(data["steps"]), rng=rng, warm=nested)


def _copy_generator(rng: np.random.Generator | None) -> np.random.Generator | None:
    """An independent generator in the same state (the same draws follow). A bit generator
    seeded by 0 and then given the state: a deep copy (pickling) costs several times more, once
    per step of a run."""
    if rng is None:
        return None
    bits = rng.bit_generator
    try:
        clone = type(bits)(0)
        clone.state = bits.state
    except (TypeError, ValueError):  # a bit generator that cannot be made so: copy it whole
        return copy.deepcopy(rng)
    return np.random.Generator(clone)


class Method:
    """The protocol of a JKO-step method: frozen settings, declared capabilities, explicit state.

    keeps_support: every step keeps the points of mu^k and changes the weights only (grid
    methods; the error norm of an adaptive run then compares weights). local_error_order: the
    order q of the local error O(tau^q) (2: implicit and explicit Euler, Lie splitting).

    ``advance(F, geometry, mu, tau, state)`` -> (StepResult, new state) leaves ``state``
    unchanged (the driver keeps it for a retry or a resumed run); ``step`` runs with the
    method's own default state (the warm starts and caches of ``jk.jko_step`` calls), which
    ``reset`` forgets. Subclasses implement ``_step(F, geometry, mu, tau, state, throw)``,
    which may update ``state`` in place.
    """

    keeps_support: ClassVar[bool] = False
    local_error_order: ClassVar[float] = 2

    def init_state(self, F: Energy | None = None, geometry: Geometry | None = None,
                   mu0: Measure | None = None) -> MethodState:
        """The state of a new run (the problem is given for methods that prepare for it)."""
        return MethodState()

    def advance(self, F: Energy, geometry: Geometry, mu: Measure, tau: float, state: MethodState,
                throw: bool = True) -> tuple[StepResult, MethodState]:
        if not isinstance(state, MethodState):
            raise ValueError(f"state must be a MethodState (from method.init_state()), got "
                             f"{type(state).__name__}")
        state = state.fork()
        return self._step(F, geometry, mu, tau, state, throw), state

    def step(self, F: Energy, geometry: Geometry, mu: Measure, tau: float,
             throw: bool = True) -> StepResult:
        """One step with the method's default state (its warm starts and caches); from a
        measure of tensors, on their device and back in their type (``on_input_device``)."""
        F, geometry = on_input_device(F, geometry, mu)
        state = self.__dict__.get("_default_state")
        if state is None:
            state = self.__dict__["_default_state"] = self.init_state(F, geometry, mu)
        return in_input_type(self._step(F, geometry, mu, tau, state, throw), mu)

    def reset(self) -> None:
        """Forget the default state of ``step`` (counters, random generators, warm starts)."""
        self.__dict__.pop("_default_state", None)

    def _step(self, F, geometry, mu, tau, state: MethodState, throw: bool) -> StepResult:
        raise NotImplementedError

    def __setattr__(self, name: str, value) -> None:
        if self.__dict__.get("_frozen", False):  # classes with an __init__ freeze at its end
            raise FrozenInstanceError(f"cannot assign to {name!r}: the settings of "
                                      f"{type(self).__name__} are frozen; make a new method")
        object.__setattr__(self, name, value)

    def _freeze(self) -> None:
        self.__dict__["_frozen"] = True

    def _settle(self, **values) -> None:
        """Set normalized settings in validation (``__post_init__`` of frozen settings)."""
        for name, value in values.items():
            object.__setattr__(self, name, value)


def on_input_device(F: Energy, geometry: Geometry, mu: Measure) -> tuple[Energy, Geometry]:
    """F and geometry with their kernels summed on the device of ``mu``'s tensors (a measure
    made from tensors chooses the backend: ``backends.kernels_on``), as given otherwise."""
    if getattr(mu, "array_type", None) is None:  # NumPy, or not a measure (refused by the step)
        return F, geometry
    from ..backends import kernels_on  # PyTorch only for steps from tensors

    return kernels_on((F, geometry), mu.array_type)


def in_input_type(result: StepResult, mu: Measure) -> StepResult:
    """``result`` with its measure handed ``mu``'s array type (``Measure.arrays()``)."""
    array_type = getattr(mu, "array_type", None)
    if array_type is None or result.measure is None or result.measure.array_type == array_type:
        return result
    return replace(result, measure=with_array_type(result.measure, array_type))


def positive_finite(value, name: str, expected: str) -> float:
    """``value`` as a finite positive float, else a ValueError: "{name} must be {expected}".

    Bools and strings are refused: float(True) = 1.0 and float("0.1") would pass silently."""
    number = None
    if not isinstance(value, (bool, str)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if number is None or not (np.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


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
    tau = positive_finite(tau, "tau", "a positive finite step size")
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


def relatively_close(value: float, reference: float, rtol: float) -> bool:
    """|value - reference| <= rtol |reference| (``np.isclose`` with atol 0, without its array
    machinery: this runs every step)."""
    return value == reference or abs(value - reference) <= rtol * abs(reference)


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
        if not relatively_close(target.mass, mass, MASS_RTOL):
            warn_user(f"the target of {name} has mass {target.mass:.6g} but mu has mass {mass:.6g}, "
                      f"and {type(geometry).__name__} conserves mass: the flow cannot reach the "
                      "target and F cannot reach 0 (it converges to a measure of mass "
                      f"{mass:.6g}). Give both the same mass (e.g. normalize both: "
                      "grid.measure(..., normalize=True), or divide the weights by their sum), "
                      "or use a reaction geometry on positive measures (conserve_mass=False)",
                      MassMismatchWarning)
            return
    if geometry.reaction is not None and not relatively_close(mass, 1.0, MASS_RTOL):
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


#: ``support_key`` of the frozen points of measures (the measures of a grid run share one array):
#: id -> (weak reference, key), the SUPPORT_KEY_SLOTS most recent.
_SUPPORT_KEYS: dict[int, tuple[weakref.ref, str]] = {}
_SUPPORT_KEYS_LOCK = threading.Lock()
SUPPORT_KEY_SLOTS = 64


def support_key(mu: Measure) -> str:
    """A hash of the points of mu: methods cache their per-support work under it (hashed once
    per frozen points array: 0.7 ms at 256^2 cells, two or three times a step)."""
    points = mu.points
    frozen = _is_frozen_here(points)
    kept = _SUPPORT_KEYS.get(id(points)) if frozen else None
    if kept is not None and kept[0]() is points:
        return kept[1]
    key = hashlib.sha1(np.ascontiguousarray(points).tobytes()).hexdigest()
    if frozen:
        with _SUPPORT_KEYS_LOCK:
            _SUPPORT_KEYS[id(points)] = (weakref.ref(points), key)
            while len(_SUPPORT_KEYS) > SUPPORT_KEY_SLOTS:
                del _SUPPORT_KEYS[next(iter(_SUPPORT_KEYS))]
    return key


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
