"""Validation of method options at construction: numbers, counts, flags and solver settings.

Every method checks its options in its constructor with these helpers, so that a bad value
(a negative tolerance, a NaN, a string, ``True`` for a count) is a ValueError naming the option,
what was expected and what was received, before any step is computed, and never a hang, a
traceback from deep inside a solver or a silently changed run.

``check_solver_options`` is the allow-list of the conic solvers' settings: numerical settings
only, with their types and ranges (Clarabel's ``DefaultSettings`` and SCS's settings, version
0.11 and 3.3). Settings that write files (SCS's ``write_data_filename``, ``log_csv_filename``)
are refused: a config must never be able to write outside its results folder.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping

__all__ = ["check_solver_options", "count", "flag", "fraction", "is_real", "nonnegative", "positive"]


def is_real(value) -> bool:
    """A real number: int, float or numpy scalar, but not a bool (True is not a size)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive(owner: str, name: str, value, allow_inf: bool = False) -> float:
    """A finite positive number (or +inf with ``allow_inf``) as a float."""
    if not is_real(value) or math.isnan(value) or not value > 0 or (
            math.isinf(value) and not allow_inf):
        kind = "a positive number" + (" (or inf)" if allow_inf else " (finite)")
        raise ValueError(f"{owner} {name} must be {kind}, got {value!r}")
    return float(value)


def nonnegative(owner: str, name: str, value) -> float:
    """A finite number >= 0 as a float."""
    if not is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner} {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def fraction(owner: str, name: str, value, low: float = 0.0, high: float = 1.0,
             closed_high: bool = True) -> float:
    """A number in (low, high] (or (low, high) with closed_high=False) as a float."""
    inside = is_real(value) and math.isfinite(value) and low < value and (
        value <= high if closed_high else value < high)
    if not inside:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{owner} {name} must be a number in ({low:g}, {high:g}{bracket}, got {value!r}")
    return float(value)


def count(owner: str, name: str, value, minimum: int = 1) -> int:
    """A whole number >= minimum (an int or an integral numpy integer; not a bool, not 2.5)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        raise ValueError(f"{owner} {name} must be {what}, got {value!r}")
    return int(value)


def flag(owner: str, name: str, value) -> bool:
    """True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner} {name} must be True or False, got {value!r}")
    return value


# ------------------------------------------------------------------------------ solver settings

#: Kinds of setting: (description, check). Each check returns the value or raises ValueError.
_KINDS = {
    "positive": ("number > 0", lambda owner, key, v: positive(owner, key, v)),
    "positive_or_inf": ("number > 0 or inf", lambda owner, key, v: positive(owner, key, v, True)),
    "nonnegative": ("number >= 0", nonnegative),
    "fraction": ("number in (0, 1]", lambda owner, key, v: fraction(owner, key, v)),
    "relaxation": ("number in (0, 2)", lambda owner, key, v: fraction(owner, key, v, 0.0, 2.0, False)),
    "count": ("whole number >= 1", lambda owner, key, v: count(owner, key, v)),
    "count0": ("whole number >= 0", lambda owner, key, v: count(owner, key, v, minimum=0)),
    "integer": ("whole number", lambda owner, key, v: count(owner, key, v, minimum=-(2**31))),
    "flag": ("true or false", flag),
}

#: Clarabel's numerical settings (clarabel.DefaultSettings, 0.11) and CVXPY's warm_start and
#: verbose (printed to the terminal). Left out: chordal decomposition and Pardiso internals,
#: presolve switches that change the problem's form, and anything that is not a number or flag.
CLARABEL_SETTINGS = {
    "max_iter": "count", "time_limit": "positive_or_inf", "max_step_fraction": "fraction",
    "tol_gap_abs": "positive", "tol_gap_rel": "positive", "tol_feas": "positive",
    "tol_infeas_abs": "positive", "tol_infeas_rel": "positive", "tol_ktratio": "positive",
    "reduced_tol_gap_abs": "positive", "reduced_tol_gap_rel": "positive",
    "reduced_tol_feas": "positive", "reduced_tol_infeas_abs": "positive",
    "reduced_tol_infeas_rel": "positive", "reduced_tol_ktratio": "positive",
    "equilibrate_enable": "flag", "equilibrate_max_iter": "count0",
    "equilibrate_min_scaling": "positive", "equilibrate_max_scaling": "positive",
    "linesearch_backtrack_step": "fraction", "min_switch_step_length": "fraction",
    "min_terminate_step_length": "fraction", "max_threads": "count0",
    "direct_solve_method": ("auto", "qdldl", "faer"),
    "static_regularization_enable": "flag", "static_regularization_constant": "nonnegative",
    "static_regularization_proportional": "nonnegative",
    "dynamic_regularization_enable": "flag", "dynamic_regularization_eps": "nonnegative",
    "dynamic_regularization_delta": "nonnegative",
    "iterative_refinement_enable": "flag", "iterative_refinement_reltol": "nonnegative",
    "iterative_refinement_abstol": "nonnegative", "iterative_refinement_max_iter": "count0",
    "iterative_refinement_stop_ratio": "positive", "presolve_enable": "flag",
    "warm_start": "flag", "verbose": "flag",
}

#: SCS's numerical settings (SCS 3.x: ScsSettings) and CVXPY's verbose. Its file outputs
#: (write_data_filename, log_csv_filename) are refused (FILE_SETTINGS).
SCS_SETTINGS = {
    "max_iters": "count", "eps_abs": "positive", "eps_rel": "positive", "eps_infeas": "positive",
    "alpha": "relaxation", "rho_x": "positive", "scale": "positive", "normalize": "flag",
    "adaptive_scale": "flag", "acceleration_lookback": "integer",
    "acceleration_interval": "count", "time_limit_secs": "nonnegative", "warm_start": "flag",
    "verbose": "flag",
}

SOLVER_SETTINGS = {"CLARABEL": CLARABEL_SETTINGS, "SCS": SCS_SETTINGS}

#: Settings that make a solver write a file, refused with their own message.
FILE_SETTINGS = ("write_data_filename", "log_csv_filename")


#: Words of a setting's name (split at "_") that mark a file or folder output.
FILE_WORDS = {"file", "filename", "path", "dir", "directory", "folder", "csv", "dump", "output"}


def _writes_files(key: str) -> bool:
    return key in FILE_SETTINGS or bool(FILE_WORDS & set(key.lower().split("_")))


def _describe(settings: Mapping) -> str:
    parts = []
    for key, kind in settings.items():
        what = "one of " + "/".join(kind) if isinstance(kind, tuple) else _KINDS[kind][0]
        parts.append(f"{key} ({what})")
    return ", ".join(parts)


def check_solver_options(solver: str, options, owner: str = "ConicJKO") -> dict:
    """Check ``options`` against the allow-list of ``solver`` ("CLARABEL" or "SCS"); return a
    plain dict of checked values. ValueError naming the key, the closest allowed key and the
    allowed keys with their types; settings that write files are refused."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{owner} solver_options must be a dict of solver settings, got {options!r}")
    settings = SOLVER_SETTINGS[solver]
    checked = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise ValueError(f"{owner} solver_options keys must be setting names, got {key!r}")
        if _writes_files(key):
            raise ValueError(f"{owner} solver_options: {key!r} makes {solver} write a file, which "
                             "jko_ift does not allow (a run writes only into its results folder); "
                             "remove it. Pass verbose=True to see the solver's log in the terminal")
        if key not in settings:
            close = difflib.get_close_matches(key, list(settings), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            other = [name for name, table in SOLVER_SETTINGS.items() if name != solver and key in table]
            elsewhere = f"; {key!r} is a setting of {other[0]}, pass solver={other[0]!r}" if other else ""
            raise ValueError(f"{owner} solver_options: unknown {solver} setting {key!r}{hint}{elsewhere}. "
                             f"The allowed settings are: {_describe(settings)}")
        kind = settings[key]
        if isinstance(kind, tuple):
            if not (isinstance(value, str) and value in kind):
                raise ValueError(f"{owner} solver_options {key} must be one of {kind}, got {value!r}")
            checked[key] = value
        else:
            checked[key] = _KINDS[kind][1](f"{owner} solver_options", key, value)
    return checked
