"""What went wrong or was flagged during a run, once per cause with its count.

A method warns inside its step (``warnings.warn``); the driver records the warnings of each
step into a ``WarningLog`` instead of letting them through, so that a condition met in every
step of a long run reaches the user once, with how often and where it happened, and is kept
on the ``Trajectory`` (``Trajectory.warnings``) and in the results folder (``summary.json``).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import asdict, dataclass

__all__ = ["RunWarning", "WarningLog"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

#: Numbers in a message (steps, sizes, ratios) do not make it another cause.
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class RunWarning:
    """One cause of warnings in a run: its category (the warning class's name), the message
    of its first occurrence, how many steps raised it and the first and last of those steps."""

    category: str
    message: str
    count: int
    first_step: int
    last_step: int

    def __str__(self) -> str:
        where = (f"step {self.first_step}" if self.count == 1
                 else f"{self.count} steps, {self.first_step} to {self.last_step}")
        return f"{self.category}: {self.message} [{where}]"

    def to_dict(self) -> dict:
        return asdict(self)


class WarningLog:
    """Collects the warnings of a run's steps, grouped by category and message shape."""

    def __init__(self):
        self._entries: dict = {}  # key -> [RunWarning fields..., category class, location]

    def record(self, step: int, caught) -> None:
        """Add the ``warnings.WarningMessage`` list ``caught`` raised while solving ``step``.
        A cause raised several times within one step counts once for that step."""
        for message in caught:
            text = str(message.message)
            # keyed by the category's name, as the causes of a saved run are (``extend``)
            key = (_name(message.category), _NUMBER.sub("#", text))
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = {"category": message.category, "message": text, "count": 1,
                                      "first_step": step, "last_step": step,
                                      "where": (message.filename, message.lineno)}
                continue
            if isinstance(entry["category"], str):  # a saved run's cause met again: warnable
                entry.update(category=message.category, where=(message.filename, message.lineno))
            if entry["last_step"] != step:
                entry["count"] += 1
                entry["last_step"] = step

    def extend(self, warnings_of_run, step_offset: int = 0) -> None:
        """Merge the ``RunWarning``s of another run whose steps start after ``step_offset``
        (a resumed or chunked run)."""
        for w in warnings_of_run:
            key = (w.category, _NUMBER.sub("#", w.message))
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = {"category": w.category, "message": w.message,
                                      "count": w.count, "first_step": w.first_step + step_offset,
                                      "last_step": w.last_step + step_offset, "where": None}
            else:
                entry["count"] += w.count
                entry["last_step"] = max(entry["last_step"], w.last_step + step_offset)

    def __len__(self) -> int:
        return len(self._entries)

    def warnings(self) -> tuple[RunWarning, ...]:
        return tuple(RunWarning(_name(e["category"]), e["message"], e["count"], e["first_step"],
                                e["last_step"]) for e in self._entries.values())

    def emit(self) -> None:
        """Warn once per cause, with its count, from where it was first raised (so that
        warning filters by module still apply)."""
        for entry, run_warning in zip(self._entries.values(), self.warnings(), strict=True):
            category = entry["category"]
            if isinstance(category, str):  # merged from a saved run: nothing to re-raise
                continue
            filename, lineno = entry["where"]
            warnings.warn_explicit(str(run_warning).split(": ", 1)[1], category, filename, lineno,
                                   module=_module_name(filename))


def from_dicts(items) -> tuple[RunWarning, ...]:
    """``RunWarning``s back from their ``to_dict`` form (summary.json, trajectory files)."""
    return tuple(RunWarning(**item) for item in items or ())


def _name(category) -> str:
    return category if isinstance(category, str) else category.__name__


def _module_name(filename: str) -> str:
    """The dotted module name of a file of this package (``jko_ift.methods.conic``), else the
    file name without its extension, as ``warnings.warn_explicit`` would take it."""
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR + os.sep):
        relative = os.path.splitext(os.path.relpath(path, os.path.dirname(_PACKAGE_DIR)))[0]
        return relative.replace(os.sep, ".")
    return os.path.splitext(filename)[0]
