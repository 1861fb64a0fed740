"""Problems as data: a TOML config (or a dict) checked in full and turned into a ``RunSpec``.

    spec = load_config("examples/configs/mmd_flow.toml")   # or load_config({...})
    trajectory = spec.solve(progress=False)

Every field is checked before anything is computed: a typo, an unknown kind or method, a
missing field or a bad value raises ``ConfigError`` (a ``ValueError``) naming the field by its
dotted path (``geometry.kind``), what is allowed there, and the closest allowed name. The
schema is in ``docs/configs.md``; in short:

* ``[problem]``: ``name = "mmd_flow"`` (a named problem of ``jko_ift.problems``; its other
  keys override the problem's keyword arguments), or an explicit problem with
  ``[problem.support]`` (a grid: lo/hi/shape; or ``kind = "particles"``: n points drawn with
  ``seed`` from the initial Gaussian), ``[problem.initial]`` (a Gaussian),
  ``[problem.energy]`` (one table, or several ``[[problem.energy]]`` that are added; targets on
  particles are samples) and ``[problem.kernel]``;
* ``[geometry]``: kind wasserstein | hellinger | mmd | wfr | ift with alpha, beta, ridge,
  conserve_mass (optional for a named problem: it overrides the problem's geometry);
* ``[method]``: kind conic | entropic | particle | splitting | explicit | back_and_forth with that
  method's options (``METHODS``; a splitting of densities on a grid: kind splitting with
  transport = "back_and_forth");
* ``[run]``: tau with steps or t_final, or ``[run.adaptive]`` (rtol, atol, ...) with t_final;
  save_at, stop_rate, stop_energy.

New methods are added by name to ``METHODS`` (``register_method``); their options are read
from the signature of their constructor.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import problems as named_problems
from .control import DISTANCES, ESTIMATES, StepController
from .energies import KL, MMD2, Energy, Entropy, PorousMedium, Potential
from .geometries import DEFAULT_RIDGE, IFT, MMD, WFR, Geometry, Hellinger, Wasserstein
from .kernels import IMQ, EnergyKernel, Gaussian, Kernel, Laplace
from .measures import Grid, Measure
from .methods import BackAndForthJKO, ConicJKO, EntropicJKO, ExplicitEuler, ParticleJKO, Splitting
from .solve import Trajectory, solve

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["ConfigError", "METHODS", "RunSpec", "load_config", "read_config", "register_method"]

SECTIONS = ("problem", "geometry", "method", "run")
GEOMETRY_KEYS = {
    "wasserstein": (),
    "hellinger": ("conserve_mass",),
    "mmd": ("ridge", "conserve_mass", "kernel"),
    "wfr": ("alpha", "beta", "conserve_mass"),
    "ift": ("alpha", "beta", "ridge", "conserve_mass", "kernel"),
}
KERNELS = {"gaussian": (Gaussian, "sigma"), "imq": (IMQ, "c"), "laplace": (Laplace, "sigma"),
           "energy": (EnergyKernel, None)}
ENERGY_KEYS = {
    "mmd2": ("target",),
    "kl": ("target",),
    "entropy": (),
    "potential_quadratic": ("kappa", "center"),
    "porous_medium": ("m",),
}
TARGETS = {"gaussian": ("mean", "cov"), "paper_mixture": ()}
#: The fields of each support kind; the initial measure and targets take some fields on one
#: kind only (``normalize`` on a grid, ``mass`` and target samples ``n``, ``seed`` on particles).
SUPPORTS = {"grid": ("lo", "hi", "shape"), "particles": ("n", "seed")}
GRID_ONLY_INITIAL, PARTICLE_ONLY_INITIAL = ("normalize",), ("mass",)
PARTICLE_ONLY_TARGET = ("n", "seed")
#: Energies that need a density (a cell volume): on particles only in 1-D, and only where the
#: energy itself can evaluate a particle measure (checked on the initial particles).
DENSITY_ENERGIES = ("entropy", "porous_medium")
RUN_KEYS = ("tau", "steps", "t_final", "adaptive", "save_at", "stop_rate", "stop_energy")
ADAPTIVE_KEYS = ("rtol", "atol", "distance", "estimate", "tau0", "tau_min", "tau_max", "safety",
                 "shrink", "growth", "pcoeff", "icoeff", "error_order")
#: Choices of the [run.adaptive] fields that are names, not numbers.
ADAPTIVE_CHOICES = {"distance": DISTANCES, "estimate": ESTIMATES}

#: Named problems' size parameter and the dimension of their support: the support has
#: value ** dim points in dim dimensions (checked against memory before the problem is built).
NAMED_PROBLEM_SIZES = {"mmd_flow": ("cells", 1), "ornstein_uhlenbeck": ("cells", 1),
                       "porous_medium": ("cells", 1), "ornstein_uhlenbeck_particles": ("n", 1),
                       "ift_paper_mixture": ("cells", 2)}
#: Arrays of the size of the support's points and weights that a run holds at once (the measure,
#: its first variation and gradient, the solver's proposal, ...): a low estimate, so that only
#: supports that cannot fit are refused up front. The methods' own work (a conic program's plan,
#: a dense kernel) comes on top.
WORKING_COPIES = 8
#: The most steps a fixed-step run may take: at a millisecond per step 10^8 steps take a day
#: and more; t_final / tau beyond this is a typo (tau = 1e-300) rather than a plan.
MAX_STEPS = 10**8

#: Methods by config name: the class (or factory) and the options it does not take from a
#: config (objects that TOML cannot write). Options are the keyword arguments of the factory.
METHODS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "conic": (ConicJKO, ()),
    "entropic": (EntropicJKO, ("conic",)),
    "particle": (ParticleJKO, ()),
    "splitting": (Splitting, ()),
    "explicit": (ExplicitEuler, ()),
    "back_and_forth": (BackAndForthJKO, ()),
}


def keeps_support(method_kind: str) -> bool:
    """Whether the method of ``[method] kind = method_kind`` keeps the points of its measures
    (changes weights only), as its class declares (``Method.keeps_support``; False for a
    registered factory that declares nothing)."""
    factory, _ = METHODS[method_kind]
    return bool(getattr(factory, "keeps_support", False))


def register_method(name: str, factory: Callable, hidden: tuple[str, ...] = ()) -> None:
    """Make ``[method] kind = name`` build ``factory(**options)``; its keyword arguments,
    less ``hidden``, are the allowed options."""
    METHODS[name] = (factory, tuple(hidden))


class ConfigError(ValueError):
    """A config that cannot run; ``field`` is the dotted path of the offending entry."""

    def __init__(self, field: str, message: str):
        self.field = field
        # field "config" is the file as a whole: "config error in config" would say nothing
        where = "config error" if field == "config" else f"config error in {field}"
        super().__init__(f"{where}: {message}")


# ---------------------------------------------------------------------------- checking helpers

def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable; else the physical memory)."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 2**63 - 1


def _gib(size: float) -> str:
    return f"{size / 2**30:.3g} GiB"


def _check_memory(path: str, points: int, dim: int, what: str, copies: int = WORKING_COPIES) -> None:
    """ConfigError when ``points`` points in ``dim`` dimensions (with their weights, times
    ``copies`` working arrays) would not fit in the available memory."""
    needed = float(points) * (dim + 1) * 8 * copies
    limit = available_memory()
    if needed > limit:
        raise ConfigError(path, f"{what} of {points:,} points in {dim}-D needs at least {_gib(needed)} "
                          f"({copies} arrays of its points and weights), but {_gib(limit)} of memory is "
                          "available; use fewer points")


def _allowed(values) -> str:
    return ", ".join(repr(v) for v in values) if values else "(none)"


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _table(value, path: str) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a table (section), got {value!r}")
    return dict(value)


def _check_keys(table: Mapping, allowed, path: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(_join(path, key), f"unknown field {key!r}{_suggest(key, allowed)}; "
                              f"the fields of {path or 'a config'} are {_allowed(allowed)}")


def _kind(table: Mapping, choices, path: str) -> str:
    if "kind" not in table:
        raise ConfigError(_join(path, "kind"), f"missing; give one of {_allowed(choices)}")
    kind = table["kind"]
    if not isinstance(kind, str) or kind not in choices:
        raise ConfigError(_join(path, "kind"), f"unknown kind {kind!r}{_suggest(kind, choices)}; "
                          f"allowed: {_allowed(choices)}")
    return kind


def _require(table: Mapping, key: str, path: str, what: str):
    if key not in table:
        raise ConfigError(_join(path, key), f"missing; give {what}")
    return table[key]


def _number(value, path: str, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(path, f"expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(path, f"expected a positive number, got {value!r}")
    if nonnegative and value < 0:
        raise ConfigError(path, f"expected a number >= 0, got {value!r}")
    return float(value)


def _count(value, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(path, f"expected a positive whole number, got {value!r}")
    return int(value)


def _flag(value, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true or false, got {value!r}")
    return value


def _vector(value, d: int, path: str) -> np.ndarray:
    values = value if isinstance(value, list) else [value]
    if len(values) != d:
        raise ConfigError(path, f"expected {d} number(s) (one per axis), got {value!r}")
    return np.array([_number(v, path) for v in values])


def _matrix(value, d: int, path: str) -> np.ndarray:
    """A covariance: a number (times the identity), d variances, or a d x d matrix."""
    if not isinstance(value, list):
        return _number(value, path, positive=True) * np.eye(d)
    if all(not isinstance(row, list) for row in value):
        variances = _vector(value, d, path)
        if variances.min() <= 0:
            raise ConfigError(path, f"variances must be positive, got {value!r}")
        return np.diag(variances)
    if len(value) != d or any(not isinstance(row, list) or len(row) != d for row in value):
        raise ConfigError(path, f"expected a {d} x {d} matrix (a list of {d} rows), got {value!r}")
    matrix = np.array([[_number(v, path) for v in row] for row in value])
    if not np.allclose(matrix, matrix.T) or np.linalg.eigvalsh(matrix).min() <= 0:
        raise ConfigError(path, f"a covariance must be symmetric positive definite, got {value!r}")
    return matrix


def _build(path: str, factory: Callable, *args, **kwargs):
    """Call a library constructor, reporting its ValueError against the config field."""
    try:
        return factory(*args, **kwargs)
    except (ValueError, TypeError) as error:
        raise ConfigError(path, str(error)) from None


# ---------------------------------------------------------------------------- sections

def _kernel(table, path: str) -> Kernel:
    table = _table(table, path)
    kind = _kind(table, KERNELS, path)
    cls, parameter = KERNELS[kind]
    _check_keys(table, ("kind",) + ((parameter,) if parameter else ()), path)
    if parameter is None:
        return cls()
    value = _number(_require(table, parameter, path, f"the {kind} kernel's {parameter} (> 0)"),
                    _join(path, parameter), positive=True)
    return _build(path, cls, value)


@dataclass(frozen=True)
class _Support:
    """What the builders of the initial measure, targets and energies need of the support: its
    kind, dimension, the grid (kind "grid") or the particle count and the generator that draws
    the particles and then, in order, the target samples (kind "particles")."""

    kind: str
    dim: int
    grid: Grid | None = None
    count: int | None = None
    rng: np.random.Generator | None = None
    path: str = "problem.support"


def _support_kind(table: Mapping, path: str) -> str:
    kind = table.get("kind", "grid")
    if not isinstance(kind, str) or kind not in SUPPORTS:
        raise ConfigError(_join(path, "kind"), f"unknown support kind {kind!r}{_suggest(kind, SUPPORTS)}; "
                          f"allowed: {_allowed(SUPPORTS)}")
    other = "particles" if kind == "grid" else "grid"
    for key in table:
        if key in SUPPORTS[other] and key not in SUPPORTS[kind]:
            raise ConfigError(_join(path, key), f"{key!r} is a field of {other} supports (kind = "
                              f"{other!r}); a {kind} support takes {_allowed(SUPPORTS[kind])}")
    _check_keys(table, ("kind",) + SUPPORTS[kind], path)
    return kind


def _grid(table, path: str) -> Grid:
    table = _table(table, path)
    _support_kind(table, path)
    shape = _require(table, "shape", path, "the number of cells per axis, e.g. [20, 20]")
    shape = shape if isinstance(shape, list) else [shape]
    if not 1 <= len(shape) <= 3:
        raise ConfigError(_join(path, "shape"), f"expected 1 to 3 axes, got {shape!r}")
    shape = [_count(s, _join(path, "shape")) for s in shape]
    _check_memory(_join(path, "shape"), math.prod(shape), len(shape), f"a grid of shape {shape}")
    lo = _vector(_require(table, "lo", path, "the lower corner of the box"), len(shape), _join(path, "lo"))
    hi = _vector(_require(table, "hi", path, "the upper corner of the box"), len(shape), _join(path, "hi"))
    return _build(path, Grid, lo, hi, shape)


def _gaussian(table, grid: Grid, path: str, allowed=("kind", "mean", "cov", "normalize")) -> Measure:
    _check_keys(table, allowed, path)
    d = grid.dim
    mean = _vector(_require(table, "mean", path, f"the mean ({d} numbers)"), d, _join(path, "mean"))
    cov = _matrix(_require(table, "cov", path, "the covariance (a number, variances or a matrix)"),
                  d, _join(path, "cov"))
    normalize = _flag(table.get("normalize", True), _join(path, "normalize"))
    return _build(path, grid.measure, named_problems.gaussian_density(mean, cov), normalize=normalize)


def _refuse_fields(table: Mapping, fields, path: str, why: str) -> None:
    for key in fields:
        if key in table:
            raise ConfigError(_join(path, key), why)


def _initial(table, grid: Grid, path: str) -> Measure:
    table = _table(table, path)
    _kind(table, ("gaussian",), path)
    _refuse_fields(table, PARTICLE_ONLY_INITIAL, path,
                   "'mass' is a field of particle supports (equal weights summing to it); on a grid "
                   "the mass is the integral of the density (normalize = true makes it 1)")
    return _gaussian(table, grid, path)


def _particles(support_table: Mapping, initial_table, support_path: str,
               initial_path: str) -> tuple[_Support, Measure]:
    """n points drawn from the Gaussian of [problem.initial] with the support's seed, equal weights
    summing to ``mass`` (default 1). The points are mean + z L^T with z standard normal (n, d)
    and L the Cholesky factor of cov (for cov = I exactly ``problems.paper_2d``'s draw); in 1-D
    they are sorted by position."""
    _support_kind(support_table, support_path)
    count = _count(_require(support_table, "n", support_path, "the number of particles, e.g. n = 100"),
                   _join(support_path, "n"))
    seed = support_table.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(_join(support_path, "seed"), f"expected a whole number >= 0, got {seed!r}")
    table = _table(initial_table, initial_path)
    mean = table.get("mean")
    _check_memory(_join(support_path, "n"), count, len(mean) if isinstance(mean, list) else 1,
                  "a particle support")
    _kind(table, ("gaussian",), initial_path)
    _refuse_fields(table, GRID_ONLY_INITIAL, initial_path,
                   "'normalize' is a grid field (it scales the density on the grid); particles have "
                   "equal weights summing to 'mass' (default 1)")
    _check_keys(table, ("kind", "mean", "cov") + PARTICLE_ONLY_INITIAL, initial_path)
    mean = _require(table, "mean", initial_path, "the mean (one number per axis; it sets the dimension)")
    dim = len(mean) if isinstance(mean, list) else 1
    if dim < 1:
        raise ConfigError(_join(initial_path, "mean"), "expected one number per axis, got []")
    mean = _vector(mean, dim, _join(initial_path, "mean"))
    cov = _matrix(_require(table, "cov", initial_path, "the covariance (a number, variances or a matrix)"),
                  dim, _join(initial_path, "cov"))
    mass = _number(table.get("mass", 1.0), _join(initial_path, "mass"), positive=True)
    rng = np.random.default_rng(seed)
    points = mean + rng.standard_normal((count, dim)) @ np.linalg.cholesky(cov).T
    if dim == 1:  # in increasing order: the Lagrangian density of 1-D particles lives between neighbours
        points = np.sort(points, axis=0)
    initial = _build(initial_path, Measure, points, np.full(count, mass / count))
    return _Support("particles", dim, count=count, rng=rng, path=support_path), initial


def _target(table, support: _Support, path: str) -> Measure:
    table = _table(table, path)
    kind = _kind(table, TARGETS, path)
    if support.kind == "grid":
        _refuse_fields(table, PARTICLE_ONLY_TARGET, path,
                       "'n' and 'seed' draw target samples on a particle support; on a grid the target "
                       "is its density on the grid's points (remove them)")
    else:
        _check_keys(table, ("kind",) + TARGETS[kind] + PARTICLE_ONLY_TARGET, path)
    if kind == "paper_mixture" and support.dim != 2:
        raise ConfigError(_join(path, "kind"), f"the paper mixture is a 2-D target; the "
                          f"{support.kind.replace('particles', 'particle support')} is {support.dim}-D")
    if support.kind == "grid":
        grid = support.grid
        if kind == "gaussian":
            return _gaussian(table, grid, path, allowed=("kind",) + TARGETS["gaussian"])
        _check_keys(table, ("kind",), path)
        return grid.measure(named_problems.paper_mixture_density, normalize=True)
    # particles: n samples (default: as many as particles) with equal weights summing to 1, drawn
    # by the support's generator after the particles (as problems.paper_2d does), or by their own seed
    count = (_count(table["n"], _join(path, "n")) if "n" in table else support.count)
    _check_memory(_join(path, "n"), count, support.dim, "a target sample")
    if "seed" in table:
        seed = table["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(_join(path, "seed"), f"expected a whole number >= 0, got {seed!r}")
        rng = np.random.default_rng(seed)
    else:
        rng = support.rng
    if kind == "gaussian":
        mean = _vector(_require(table, "mean", path, f"the mean ({support.dim} numbers)"), support.dim,
                       _join(path, "mean"))
        cov = _matrix(_require(table, "cov", path, "the covariance (a number, variances or a matrix)"),
                      support.dim, _join(path, "cov"))
        components = ((mean, cov),)
    else:
        components = named_problems.PAPER_MIXTURE
    points = named_problems.sample_mixture(components, count, rng)
    return Measure(points, np.full(count, 1.0 / count))


def _particle_energy_check(kind: str, term: Energy, support: _Support, initial: Measure,
                           path: str) -> None:
    """Refuse energies that cannot act on a particle support, saying why and what to use."""
    where = _join(path, "kind")
    if kind == "kl":
        raise ConfigError(where, "KL(mu | target) compares weights on one support, and particles do not "
                          "share their points with target samples; on a particle support use mmd2 (with "
                          "samples of the target), or use a grid support ([problem.support] lo, hi, shape)")
    if kind not in DENSITY_ENERGIES:
        return
    name = type(term).__name__
    if support.dim > 1:
        raise ConfigError(where, f"{kind} ({name}) is not supported on particle supports in "
                          f"d = {support.dim}: it needs a density, which scattered points in d > 1 do "
                          "not have; use a grid support ([problem.support] lo, hi, shape) for it")
    try:  # 1-D particles have a density (from their spacings) where the energy implements it
        term.value(initial)
        term.grad_first_variation(initial)
    except (ValueError, NotImplementedError) as error:
        raise ConfigError(where, f"{kind} ({name}) cannot evaluate a 1-D particle measure in this version "
                          f"({error}); use a grid support ([problem.support] lo, hi, shape)") from None


def _energy_term(table, support: _Support, kernel: Kernel | None, path: str, kernel_path: str,
                 initial: Measure | None = None) -> Energy:
    table = _table(table, path)
    kind = _kind(table, ENERGY_KEYS, path)
    _check_keys(table, ("kind", "scale") + ENERGY_KEYS[kind], path)
    scale = _number(table.get("scale", 1.0), _join(path, "scale"), positive=True)
    if support.kind == "particles" and kind == "kl":
        _particle_energy_check(kind, None, support, initial, path)
    if kind in ("mmd2", "kl"):
        target_hint = ("{kind = \"gaussian\", mean = ..., cov = ...} or {kind = \"paper_mixture\"}"
                       + (" (with n samples, default: as many as particles)" if support.kind == "particles"
                          else ""))
        target = _target(_require(table, "target", path, f"a target table, e.g. {target_hint}"),
                         support, _join(path, "target"))
        if kind == "mmd2":
            if kernel is None:
                raise ConfigError(kernel_path, f"missing; the mmd2 energy needs a kernel, kind one of "
                                  f"{_allowed(KERNELS)}")
            term = _build(path, MMD2, target, kernel)
        else:
            term = KL(target)
    elif kind == "entropy":
        term = Entropy()
    elif kind == "porous_medium":
        m = _number(table.get("m", 2.0), _join(path, "m"))
        term = _build(path, PorousMedium, m)
    else:  # potential_quadratic: V = kappa / 2 |x - center|^2
        kappa = _number(table.get("kappa", 1.0), _join(path, "kappa"), positive=True)
        center = _vector(table.get("center", [0.0] * support.dim), support.dim, _join(path, "center"))
        term = Potential(lambda x: 0.5 * kappa * ((x - center) ** 2).sum(1),
                         lambda x: kappa * (x - center))
    if support.kind == "particles":
        _particle_energy_check(kind, term, support, initial, path)
    return term if scale == 1.0 else scale * term


def _explicit_problem(table: dict, path: str = "problem") -> dict:
    _check_keys(table, ("support", "initial", "energy", "kernel", "t_final"), path)
    support_path, initial_path = _join(path, "support"), _join(path, "initial")
    support_table = _table(_require(table, "support", path, "the support: [problem.support] lo, hi, shape "
                                    "(a grid) or kind = \"particles\", n, seed"), support_path)
    initial_table = _require(table, "initial", path, "[problem.initial] kind = \"gaussian\", mean, cov")
    if _support_kind(support_table, support_path) == "particles":
        support, initial = _particles(support_table, initial_table, support_path, initial_path)
    else:
        grid = _grid(support_table, support_path)
        support = _Support("grid", grid.dim, grid=grid, path=support_path)
        initial = _initial(initial_table, grid, initial_path)
    kernel = _kernel(table["kernel"], _join(path, "kernel")) if "kernel" in table else None
    terms = _require(table, "energy", path, f"[problem.energy] with kind one of {_allowed(ENERGY_KEYS)}")
    terms = terms if isinstance(terms, list) else [terms]
    if not terms:
        raise ConfigError(_join(path, "energy"), "give at least one energy term")
    energy_path = _join(path, "energy")
    energies = [_energy_term(term, support, kernel, energy_path + (f"[{i}]" if len(terms) > 1 else ""),
                             _join(path, "kernel"), initial)
                for i, term in enumerate(terms)]
    energy = energies[0]
    for term in energies[1:]:
        energy = energy + term
    t_final = (_number(table["t_final"], _join(path, "t_final"), positive=True)
               if "t_final" in table else None)
    return {"name": None, "energy": energy, "initial": initial, "kernel": kernel, "geometry": None,
            "t_final": t_final, "support": support.kind,
            "density_terms": [term.get("kind") for term in terms if isinstance(term, Mapping)
                              and term.get("kind") in DENSITY_ENERGIES]}


def _named_problem(table: dict, path: str = "problem") -> dict:
    name = table["name"]
    if not isinstance(name, str) or name not in named_problems.PROBLEMS:
        raise ConfigError(_join(path, "name"), f"unknown problem {name!r}"
                          f"{_suggest(name, named_problems.PROBLEMS)}; named problems: "
                          f"{_allowed(named_problems.PROBLEMS)}")
    factory = named_problems.PROBLEMS[name]
    parameters = inspect.signature(factory).parameters
    overrides = {key: value for key, value in table.items() if key != "name"}
    _check_keys(overrides, ("name",) + tuple(parameters), path)
    for key, value in overrides.items():
        default = parameters[key].default
        if isinstance(default, bool):
            _flag(value, _join(path, key))
        elif isinstance(default, int):
            _count(value, _join(path, key))
        elif isinstance(default, float):
            _number(value, _join(path, key), positive=key == "t_final")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(_join(path, key), f"expected a name (a string), got {value!r}")
    if name in NAMED_PROBLEM_SIZES:
        size_key, dim = NAMED_PROBLEM_SIZES[name]
        size = overrides.get(size_key, parameters[size_key].default)
        _check_memory(_join(path, size_key), size**dim, dim, f"the {name} support")
    problem = _build(path, factory, **overrides)
    kernel = getattr(problem.energy, "kernel", None) or getattr(problem.geometry, "kernel", None)
    return {"name": name, "energy": problem.energy, "initial": problem.initial, "kernel": kernel,
            "geometry": problem.geometry, "t_final": problem.t_final}


def _geometry(table, default_kernel: Kernel | None, path: str = "geometry") -> Geometry:
    table = _table(table, path)
    kind = _kind(table, GEOMETRY_KEYS, path)
    _check_keys(table, ("kind",) + GEOMETRY_KEYS[kind], path)
    options = {}
    for key in ("alpha", "beta"):
        if key in table:
            options[key] = _number(table[key], _join(path, key), positive=True)
    if "ridge" in table:
        options["ridge"] = _number(table["ridge"], _join(path, "ridge"), nonnegative=True)
    if "conserve_mass" in table:
        options["conserve_mass"] = _flag(table["conserve_mass"], _join(path, "conserve_mass"))
    if kind in ("mmd", "ift"):
        kernel = (_kernel(table["kernel"], _join(path, "kernel")) if "kernel" in table
                  else default_kernel)
        if kernel is None:
            raise ConfigError(_join(path, "kernel"), f"missing; the {kind} geometry needs a kernel "
                              f"([geometry.kernel] or [problem.kernel]) with kind one of {_allowed(KERNELS)}")
        if kind == "mmd":
            return _build(path, MMD, kernel, options.get("ridge", DEFAULT_RIDGE),
                          options.get("conserve_mass", False))
        return _build(path, IFT, kernel, **options)
    cls = {"wasserstein": Wasserstein, "hellinger": Hellinger, "wfr": WFR}[kind]
    return _build(path, cls, **options)


def _method_options(kind: str) -> tuple[Callable, tuple[str, ...]]:
    factory, hidden = METHODS[kind]
    parameters = inspect.signature(factory).parameters.values()
    names = tuple(p.name for p in parameters
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and not p.name.startswith("_") and p.name not in hidden)
    return factory, names


def _method(table, path: str = "method") -> tuple[str, dict]:
    table = _table(table, path)
    kind = _kind(table, METHODS, path)
    factory, names = _method_options(kind)
    _check_keys(table, ("kind",) + names, path)
    options = {key: value for key, value in table.items() if key != "kind"}
    try:  # check the options now, before any computation
        factory(**options)
    except (ValueError, TypeError) as error:
        raise ConfigError(_option_field(path, options, str(error)), str(error)) from None
    return kind, options


def _option_field(path: str, options: Mapping, message: str) -> str:
    """The dotted field a method's ValueError is about: the option (or solver setting) that its
    message names, the longest name first; ``path`` itself when it names none."""
    names = sorted(options, key=len, reverse=True)
    for name in names:
        nested = options[name]
        if isinstance(nested, Mapping):
            for key in sorted(map(str, nested), key=len, reverse=True):
                if repr(key) in message or f" {key} " in message:
                    return _join(_join(path, name), key)
    for name in names:
        if name in message:
            return _join(path, name)
    return path


@dataclass(frozen=True)
class RunOptions:
    """The [run] section, checked: fixed steps (tau, steps) or adaptive (controller, t_final)."""

    tau: float | None
    steps: int | None
    t_final: float | None
    controller: StepController | None
    save_at: tuple[float, ...] | None
    stop_rate: float | None
    stop_energy: float | None


def _run(table, problem_t_final: float | None, path: str = "run") -> RunOptions:
    table = _table(table, path)
    _check_keys(table, RUN_KEYS, path)
    tau = _number(table["tau"], _join(path, "tau"), positive=True) if "tau" in table else None
    steps = _count(table["steps"], _join(path, "steps")) if "steps" in table else None
    if steps is not None and steps > MAX_STEPS:
        raise ConfigError(_join(path, "steps"), f"{steps:,} steps is more than {MAX_STEPS:.0e}; take "
                          "fewer, larger steps")
    t_final = (_number(table["t_final"], _join(path, "t_final"), positive=True)
               if "t_final" in table else None)
    controller = None
    if "adaptive" in table:
        controller = _controller(table["adaptive"], _join(path, "adaptive"))
        if steps is not None:
            raise ConfigError(_join(path, "steps"), "an adaptive run ends at t_final; remove steps")
        t_final = t_final if t_final is not None else problem_t_final
        if t_final is None:
            raise ConfigError(_join(path, "t_final"), "missing; an adaptive run needs t_final")
    else:
        steps, t_final = _fixed_steps(tau, steps, t_final, problem_t_final, path)
    save_at = _save_at(table["save_at"], _join(path, "save_at"), tau, steps, t_final, controller) \
        if "save_at" in table else None
    stop_rate = (_number(table["stop_rate"], _join(path, "stop_rate"), positive=True)
                 if "stop_rate" in table else None)
    stop_energy = (_number(table["stop_energy"], _join(path, "stop_energy"))
                   if "stop_energy" in table else None)
    return RunOptions(tau, steps, t_final, controller, save_at, stop_rate, stop_energy)


def _controller(table, path: str) -> StepController:
    """The [run.adaptive] table, checked, as a ``StepController``."""
    adaptive = _table(table, path)
    _check_keys(adaptive, ADAPTIVE_KEYS, path)
    for key, value in adaptive.items():
        if key not in ADAPTIVE_CHOICES:  # a zero tolerance or gain is allowed (not both)
            may_be_zero = key in ("rtol", "atol", "pcoeff", "icoeff")
            _number(value, _join(path, key), positive=not may_be_zero, nonnegative=may_be_zero)
        elif value not in ADAPTIVE_CHOICES[key]:
            raise ConfigError(_join(path, key), f"unknown {key} {value!r}"
                              f"{_suggest(value, ADAPTIVE_CHOICES[key])}; allowed: "
                              f"{_allowed(ADAPTIVE_CHOICES[key])}")
    return _build(path, StepController, **adaptive)


def _fixed_steps(tau, steps, t_final, problem_t_final, path: str) -> tuple:
    """(steps, None) of a fixed-step run: its steps, or t_final / tau rounded up (the problem's
    t_final when the config gives neither)."""
    if tau is None:
        raise ConfigError(_join(path, "tau"), "missing; give the step size tau (or a [run.adaptive] "
                          "table with rtol, atol for error-controlled steps)")
    if steps is not None and t_final is not None:
        raise ConfigError(_join(path, "steps"), "give steps or t_final, not both")
    if steps is not None:
        return steps, t_final
    t_final = t_final if t_final is not None else problem_t_final
    if t_final is None:
        raise ConfigError(_join(path, "steps"), "missing; give steps (a number) or t_final (a time)")
    ratio = t_final / tau
    if not ratio <= MAX_STEPS:
        raise ConfigError(_join(path, "tau"), f"t_final / tau = {t_final:g} / {tau:g} = {ratio:.3g} "
                          f"steps, more than {MAX_STEPS:.0e}; take a larger tau (or an adaptive "
                          "run: [run.adaptive])")
    return max(1, math.ceil(ratio - 1e-9)), None


def _save_at(value, path: str, tau, steps, t_final, controller) -> tuple[float, ...]:
    """The save times, sorted, within the run (and multiples of tau for fixed steps)."""
    values = value if isinstance(value, list) else [value]
    save_at = tuple(sorted(_number(v, path, positive=True) for v in values))
    end = t_final if controller is not None else steps * tau
    if not save_at or save_at[-1] > end * (1 + 1e-9):
        raise ConfigError(path, f"times must lie in (0, {end:g}], got {list(save_at)}")
    if controller is None:
        off = [t for t in save_at if abs(t / tau - round(t / tau)) > 1e-6]
        if off:
            raise ConfigError(path, f"with a fixed tau = {tau:g} the save times "
                              f"must be multiples of tau; {off} are not")
    return save_at


def _check_trajectory_memory(run: RunOptions, initial: Measure, method_kind: str) -> None:
    """A fixed-step run keeps the measure of every step (or of the save_at times): refuse one whose
    kept measures cannot fit in memory (weights; positions too where the particles move)."""
    if run.steps is None:
        return
    kept = run.steps + 1 if run.save_at is None else len(run.save_at) + 1
    moving = not keeps_support(method_kind)
    per_measure = initial.n * 8 * (1 + (initial.dim if moving else 0))
    needed, limit = float(kept) * per_measure, available_memory()
    if needed > limit:
        raise ConfigError("run.steps", f"the run keeps {kept:,} measures of {initial.n:,} points "
                          f"({_gib(needed)}), more than the {_gib(limit)} of memory available; keep fewer "
                          "(run.save_at = [times]) or take fewer steps")


# ---------------------------------------------------------------------------- the spec

@dataclass(frozen=True)
class RunSpec:
    """A checked config: energy, geometry, initial measure, method (by name and options) and
    run options. ``config`` is the config as given (a plain dict, for summaries); ``digest``
    is a hash of it, used to match checkpoints."""

    config: dict
    name: str | None
    energy: Energy
    geometry: Geometry
    initial: Measure
    method_kind: str
    method_options: dict
    run: RunOptions
    source: str | None = None
    digest: str = field(default="")

    @property
    def adaptive(self) -> bool:
        return self.run.controller is not None

    def make_method(self):
        """A fresh method object (methods keep caches; a fresh one starts from a clean state)."""
        factory, _ = METHODS[self.method_kind]
        return factory(**copy.deepcopy(self.method_options))

    def solve_options(self) -> dict:
        """Keyword arguments of ``jk.solve`` for the whole run (less F, geometry, mu0)."""
        run = self.run
        options = {"save_at": None if run.save_at is None else list(run.save_at),
                   "stop_rate": run.stop_rate, "stop_energy": run.stop_energy}
        if run.controller is not None:
            options.update(controller=run.controller, t_final=run.t_final, tau=run.tau)
        else:
            options.update(tau=run.tau, steps=run.steps)
        return options

    def solve(self, progress: bool = True, **overrides) -> Trajectory:
        """Run the whole config in one ``jk.solve`` call (no checkpoints)."""
        options = self.solve_options() | overrides
        return solve(self.energy, self.geometry, self.initial, method=self.make_method(),
                     progress=progress, **options)


def read_config(source) -> tuple[dict, str | None]:
    """The raw config (a TOML file path, or a dict, copied) as a dict, unchecked, and the path it
    was read from (None for a dict). ``ConfigError`` for a missing, unreadable or invalid file;
    ``load_config`` checks the fields."""
    if isinstance(source, Mapping):
        try:
            return copy.deepcopy(dict(source)), None
        except RecursionError:
            raise ConfigError("config", "the config is nested too deeply to be a config") from None
    path = Path(source)
    if not path.is_file():
        raise ConfigError("config", f"no config file at {path}")
    try:
        with open(path, "rb") as stream:
            return tomllib.load(stream), str(path)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("config", f"{path} is not valid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError("config", f"{path} is not UTF-8 text (TOML files are UTF-8): byte "
                          f"{error.object[error.start]:#04x} at offset {error.start}; save it as "
                          "UTF-8") from None
    except RecursionError:
        raise ConfigError("config", f"{path} nests arrays or tables too deeply to be a config") from None
    except OSError as error:
        raise ConfigError("config", f"cannot read {path}: {error.strerror or error}") from None


def load_config(source) -> RunSpec:
    """Read and check a config (a TOML file path or a dict); return a ``RunSpec``.

    Everything is checked here, before any step is computed; errors are ``ConfigError``
    naming the field (``geometry.kind``), the allowed values and the closest match.
    """
    config, origin = read_config(source)
    _check_keys(config, SECTIONS, "")
    problem_table = _table(_require(config, "problem", "", "a [problem] section (name = ... or support, "
                                     "initial, energy)"), "problem")
    problem = (_named_problem(problem_table) if "name" in problem_table
               else _explicit_problem(problem_table))
    if "geometry" in config:
        geometry = _geometry(config["geometry"], problem["kernel"])
    elif problem["geometry"] is not None:
        geometry = problem["geometry"]
    else:
        raise ConfigError("geometry", f"missing; give [geometry] with kind one of {_allowed(GEOMETRY_KEYS)}")
    method_kind, method_options = _method(config.get("method", {"kind": "conic"}))
    if problem.get("support") == "particles" and keeps_support(method_kind) \
            and problem["density_terms"]:
        raise ConfigError("method.kind", f"the {method_kind} method keeps the particles where they are "
                          f"and needs a cell volume for {', '.join(problem['density_terms'])}, which a "
                          "particle support has none of; use a particle method ('particle', 'splitting', "
                          "'explicit') or a grid support")
    run = _run(_require(config, "run", "", "a [run] section with tau and steps (or t_final)"),
               problem["t_final"])
    _check_trajectory_memory(run, problem["initial"], method_kind)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return RunSpec(config, problem["name"], problem["energy"], geometry, problem["initial"],
                   method_kind, method_options, run, origin, digest)
