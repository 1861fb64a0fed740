"""How results show themselves: short text and HTML summaries, and tables as plain data.

A result (``Trajectory``, ``StepResult``, a study) describes itself as a title, a few
``(name, value)`` fields, notes (warnings, flags) and at most one table; ``text_summary`` and
``html_summary`` render that description as a plain ``repr`` and as a notebook's
``_repr_html_``. Every piece of text is escaped (a message or a label may hold ``<`` or ``&``)
and long text is cut with an ellipsis, so a summary stays short whatever the run produced.

``Table`` is a list of dict rows (plain data, JSON- and CSV-ready) that converts to a pandas
DataFrame with ``to_frame()`` when pandas is installed; pandas is not a dependency.

``progress_bar`` is the one progress bar of runs and studies: tqdm on a terminal or in a notebook,
and periodic log lines (one line per update, every ``LOG_INTERVAL`` seconds) when stderr is a file
or a pipe, so that a batch job's log holds readable lines rather than one line of carriage returns.
Inside a long step the solver's loop calls ``report_iteration`` (nothing happens unless a bar
shows the run: ``showing_iterations``), so the bar says where the step stands, its iteration
and residual, while the step runs.
"""

from __future__ import annotations

import html
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

__all__ = ["Table", "format_value", "html_summary", "progress_bar", "report_iteration", "shorten",
           "showing_iterations", "text_summary"]

#: Longest text of one value in a summary; longer text is cut with an ellipsis.
MAX_TEXT = 160
#: Rows of a table shown in a summary (the first ones; a note says how many are left out).
MAX_ROWS = 30
#: Seconds between the log lines of a progress bar whose output is not a terminal.
LOG_INTERVAL = 30.0
#: Width of a log line (a file has no terminal width; the step's inner progress must fit).
LOG_COLUMNS = 160
#: Fewest seconds between two redraws of a bar by a step's inner iterations (on a terminal).
INNER_INTERVAL = 0.5
#: What starts the step's inner progress, after the bar's own postfix.
INNER_MARK = "in step: "

#: Where a running step's inner loop reports its iterations (None: nobody is listening).
_INNER_PROGRESS: ContextVar[Callable | None] = ContextVar("jko_ift_inner_progress", default=None)


class _LogLines:
    """A text stream for tqdm that turns each redraw (``"\\r" + status``) into its own line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip("\n")
        if line.strip():
            self.stream.write(line + "\n")

    def flush(self) -> None:
        getattr(self.stream, "flush", lambda: None)()


def progress_bar(*, disable: bool = False, file=None, **options):
    """A tqdm progress bar that degrades to periodic log lines when its output is no terminal.

    In a notebook: tqdm's widget (``tqdm.auto``). On a terminal: tqdm's bar, redrawn in place. In a
    file or a pipe (a batch job's log): a line per update, at most every ``LOG_INTERVAL`` seconds
    (and the final state), never a line of carriage returns.

    Parameters
    ----------
    disable : bool
        No bar at all.
    file : text stream, optional
        Where to write (default: ``sys.stderr`` at the time of the call).
    **options
        tqdm's options (``total``, ``desc``, ``unit``, ``initial``, ``bar_format``, ...).

    Returns
    -------
    tqdm.tqdm
    """
    from tqdm.auto import tqdm as auto_tqdm  # imports autonotebook, its notebook warning silenced
    from tqdm.std import tqdm as std_tqdm

    stream = sys.stderr if file is None else file
    notebook = sys.modules["tqdm.autonotebook"].tqdm is not std_tqdm
    if disable or notebook:  # disabled, or a notebook's widget
        return auto_tqdm(disable=disable, file=file, **options)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return std_tqdm(file=stream, dynamic_ncols=True, **options)
    options.pop("dynamic_ncols", None)
    return std_tqdm(file=_LogLines(stream), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL,
                    ncols=LOG_COLUMNS, ascii=True, **options)


def report_iteration(iteration: int, residual: float | None = None, stage: str = "") -> None:
    """Say where a long step's inner loop stands: its ``iteration``, its ``residual`` (what it
    drives below its tolerance) and its ``stage`` (e.g. ``"eps 1e-3"``). A solver calls it once per
    iteration; it costs a context-variable lookup unless a bar shows the run
    (``showing_iterations``), which then redraws at most every ``INNER_INTERVAL`` seconds."""
    show = _INNER_PROGRESS.get()
    if show is not None:
        show(iteration, residual, stage)


@contextmanager
def showing_iterations(bar) -> Iterator[None]:
    """While the block runs, the inner iterations reported by ``report_iteration`` appear at the
    end of ``bar``'s postfix (after ``INNER_MARK``; the bar's owner sets its own postfix at each
    step, which clears them). A disabled bar shows nothing; a bar that writes log lines redraws
    no more often than its own interval."""
    if getattr(bar, "disable", True):
        yield
        return
    interval = max(INNER_INTERVAL, float(getattr(bar, "mininterval", 0.0)))
    last = [time.monotonic()]

    def show(iteration: int, residual: float | None, stage: str) -> None:
        now = time.monotonic()
        if now - last[0] < interval:
            return
        last[0] = now
        text = f"iteration {int(iteration)}"
        if residual is not None:
            text += f", residual {float(residual):.2g}"
        if stage:
            text += f" ({stage})"
        own = str(bar.postfix or "").partition(INNER_MARK)[0].rstrip(" |")
        bar.set_postfix_str(f"{own} | {INNER_MARK}{text}" if own else INNER_MARK + text, refresh=False)
        bar.refresh()

    token = _INNER_PROGRESS.set(show)
    try:
        yield
    finally:
        _INNER_PROGRESS.reset(token)


def shorten(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def format_value(value) -> str:
    """A value as a summary shows it: floats to 4 significant digits, None as "-", sequences
    joined by ", ", long text shortened."""
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return shorten(", ".join(format_value(v) for v in value)) if value else "-"
    return shorten(str(value))


def text_summary(title: str, fields: Sequence[tuple[str, object]], notes: Iterable[str] = (),
                 table: Table | None = None, columns: Sequence[str] | None = None) -> str:
    """A plain-text summary: ``title``, then one ``name: value`` line per field, the notes, and
    the table (its ``columns``) as aligned text.

    Parameters
    ----------
    title : str
        The first line (e.g. ``"Trajectory: ConicJKO in IFT(...)"``).
    fields : sequence of (str, object)
        Names and values, formatted by ``format_value``.
    notes : iterable of str
        Warnings or flags, one line each.
    table : Table, optional
        Rows shown below the fields (at most ``MAX_ROWS``).
    columns : sequence of str, optional
        The table's columns to show (default: all).

    Returns
    -------
    str
    """
    width = max((len(name) for name, _ in fields), default=0)
    lines = [title] + [f"  {name:<{width}} : {format_value(value)}" for name, value in fields]
    lines += [f"  ! {shorten(note)}" for note in notes]
    if table:
        lines.append(table.to_text(columns))
    return "\n".join(lines)


def html_summary(title: str, fields: Sequence[tuple[str, object]], notes: Iterable[str] = (),
                 table: Table | None = None, columns: Sequence[str] | None = None) -> str:
    """The HTML of ``text_summary`` for a notebook: the title in bold, the fields as a two-column
    table, the notes as a list and the table below (all text escaped).

    Parameters
    ----------
    title, fields, notes, table, columns
        As in ``text_summary``.

    Returns
    -------
    str
        An HTML fragment (a ``<div>``).
    """
    body = "".join(f"<tr><th style='text-align:left'>{html.escape(name)}</th>"
                   f"<td style='text-align:left'>{html.escape(format_value(value))}</td></tr>"
                   for name, value in fields)
    parts = [f"<div><strong>{html.escape(title)}</strong>", f"<table>{body}</table>"]
    notes = [html.escape(shorten(note)) for note in notes]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{note}</li>" for note in notes) + "</ul>")
    if table:
        parts.append(table._repr_html_(columns))
    parts.append("</div>")
    return "".join(parts)


class Table(list):
    """Rows of a study (a list of dicts, one per run, scheme or case), as plain data.

    It is a ``list``: index it, iterate it, write it as CSV or JSON. ``to_frame()`` gives a
    pandas DataFrame when pandas is installed; in a notebook the table shows itself as HTML.

    Parameters
    ----------
    rows : iterable of mapping
        The rows; each maps a column name to its value.
    columns : sequence of str, optional
        The order of the columns (default: the keys of the rows, in first-seen order).
    """

    def __init__(self, rows: Iterable[Mapping] = (), columns: Sequence[str] | None = None):
        super().__init__(dict(row) for row in rows)
        self.columns = list(columns) if columns is not None else self._keys()

    def _keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self:
            seen.update(dict.fromkeys(row))
        return list(seen)

    def to_frame(self):
        """The rows as a ``pandas.DataFrame`` (one column per key, lists of flags kept as lists).

        Returns
        -------
        pandas.DataFrame

        Raises
        ------
        ImportError
            When pandas is not installed (it is not a dependency of jko_ift).
        """
        try:
            import pandas
        except ImportError:
            raise ImportError("Table.to_frame() needs pandas, which jko_ift does not install: "
                              "pip install pandas (the rows are plain dicts without it)") from None
        return pandas.DataFrame(list(self), columns=self.columns or None)

    def _shown(self, columns):
        columns = [c for c in (columns or self.columns) if any(c in row for row in self)]
        return columns, list(self)[:MAX_ROWS], max(0, len(self) - MAX_ROWS)

    def to_text(self, columns: Sequence[str] | None = None) -> str:
        """The rows as aligned text (at most ``MAX_ROWS``), ``columns`` (default: all) only.

        Returns
        -------
        str
        """
        columns, rows, left_out = self._shown(columns)
        cells = [columns] + [[format_value(row.get(c)) for c in columns] for row in rows]
        widths = [min(40, max(len(line[k]) for line in cells)) for k in range(len(columns))]
        text = ["  " + "  ".join(shorten(cell, 40).ljust(w) for cell, w in zip(line, widths, strict=True))
                for line in cells]
        if left_out:
            text.append(f"  ... {left_out} more rows")
        return "\n".join(line.rstrip() for line in text)

    def __repr__(self) -> str:
        return f"Table of {len(self)} rows\n{self.to_text()}" if self else "Table of 0 rows"

    def _repr_html_(self, columns: Sequence[str] | None = None) -> str:
        columns, rows, left_out = self._shown(columns)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(row.get(c)))}</td>"
                                        for c in columns) + "</tr>" for row in rows)
        more = f"<p>... {left_out} more rows</p>" if left_out else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"
