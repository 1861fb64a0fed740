"""The figures of jko_ift, in one style: Axes-level drawing functions and the PNGs built on them.

``draw_*`` functions draw into a matplotlib Axes (``ax=``; a new figure when it is None) and
return it: ``Trajectory.plot``, ``ConvergenceStudy.plot`` and ``SchemeComparison.plot`` call
them. They read results by their attributes (``times``, ``energies``, ``rows``, ``points``,
``weights``), so this module imports no driver. ``plot_*`` functions write a PNG: they build a
figure with matplotlib's object API on the Agg canvas, never through pyplot (nothing opens a
window, no figure leaks, a notebook's backend is left alone), and write it atomically
(``io.atomic_path``) at ``DPI``.

One style everywhere: labelled axes (with units where there are any: time t and step size tau
are in the flow's time units), a log axis where the data span ``LOG_RATIO`` or more, equal aspect
for particles, one marker and line style per curve (``CURVE_STYLES``: no curve hides another), a
legend that names each scheme, and ``DPI`` for every file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .io import atomic_path
from .measures import Measure

__all__ = ["CURVE_STYLES", "DPI", "LOG_RATIO", "density_image", "draw_convergence", "draw_energy",
           "draw_energy_decay", "draw_particles", "plot_convergence", "plot_energy",
           "plot_energy_decay", "plot_particle_snapshots", "plot_seed_curves", "plot_snapshots",
           "plot_step_sizes", "plot_work_precision", "snapshot_indices"]

#: Resolution of every PNG.
DPI = 120
#: An axis is logarithmic when its positive data span at least this ratio (about 1.5 decades).
LOG_RATIO = 30.0
#: (marker, linestyle) of the k-th curve of a figure: overlapping curves stay distinguishable.
CURVE_STYLES = (("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"),
                ("X", "-."), ("*", ":"))
#: Markers drawn along one curve at most (long runs: every k-th point).
MARKERS_PER_CURVE = 12



def density_image(mu: Measure) -> np.ndarray:
    """The density a_i / h^d of a measure on a 2-D grid as an image of shape ``grid.shape``.

    Index [i, j] is the cell at (x_i, y_j) (``Grid`` points are in C order).
    """
    if mu.grid is None or mu.grid.dim != 2:
        raise ValueError("density_image needs a measure on a 2-D jk.Grid (made by grid.measure); "
                         f"got one with grid {mu.grid!r}")
    return (mu.weights / mu.grid.cell_volume).reshape(mu.grid.shape)


def snapshot_indices(length: int, count: int) -> list[int]:
    """``count`` indices spread evenly over 0..length-1, always the first and the last."""
    if length < 1:
        raise ValueError("a trajectory with no measures has no snapshots")
    count = max(1, min(int(count), length))
    if count == 1:
        return [length - 1]
    return sorted({int(round(i)) for i in np.linspace(0, length - 1, count)})


def _show_density(ax, image: np.ndarray, grid, vmax: float):
    """imshow with x to the right and y upwards (the image is indexed [x, y])."""
    extent = (grid.lo[0], grid.hi[0], grid.lo[1], grid.hi[1])
    return ax.imshow(image.T, origin="lower", extent=extent, cmap="viridis", vmin=0.0,
                     vmax=vmax, interpolation="nearest", aspect="equal")


def _save(fig: Figure, path) -> Path:
    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=DPI, format=path.suffix.lstrip(".") or "png")
    return path


def _figure(figsize=(6.4, 4.4), layout: str | None = "constrained") -> Figure:
    """A figure on the Agg canvas (no pyplot), laid out by the constrained engine (None: by
    the caller, for grids of many panels, where the engine takes most of the drawing time)."""
    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _axes(ax, figsize=(6.4, 4.4)):
    """``ax``, or the Axes of a new pyplot figure (a notebook shows it; interactive use only:
    the ``plot_*`` functions always pass their own Axes)."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, layout="constrained")[1]


def spans_decades(*arrays) -> bool:
    """Whether the finite positive values of ``arrays`` span ``LOG_RATIO`` or more, all of them
    positive: then a log axis shows them (a non-positive value keeps the axis linear)."""
    values = np.concatenate([np.ravel(np.asarray(a, float)) for a in arrays]) if arrays else np.array([])
    values = values[np.isfinite(values)]
    if values.size == 0 or np.any(values <= 0):
        return False
    return bool(values.max() >= LOG_RATIO * values.min())


def curve_style(index: int, points: int) -> dict:
    """Marker, linestyle and marker spacing of the ``index``-th curve of ``points`` points."""
    marker, linestyle = CURVE_STYLES[index % len(CURVE_STYLES)]
    return {"marker": marker, "linestyle": linestyle, "markersize": 4,
            "markevery": max(1, points // MARKERS_PER_CURVE)}


def _finish(ax, xlabel: str, ylabel: str, title: str | None = None, legend: bool = True) -> None:
    """Axis labels, the title, a grid at every (log) tick and the legend (when anything is
    labelled)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


# ---------------------------------------------------------------------------- Axes-level drawing

def draw_energy(trajectory, ax=None, *, label: str | None = None,
                ylabel: str = "energy $F(\\mu_t)$", **style):
    """Energy against time of one run, markers at the saved states.

    A log energy axis when the energies are positive and span ``LOG_RATIO`` (decay rates read as
    slopes), a linear one otherwise (entropies and KL-type energies can be negative).

    Parameters
    ----------
    trajectory : Trajectory
        Anything with ``times`` (k+1,) and ``energies`` (k+1,); its ``scheme`` is the default
        legend entry.
    ax : matplotlib.axes.Axes, optional
        Where to draw (default: a new figure).
    label : str, optional
        The legend entry (default: ``trajectory.scheme``; none when that is empty).
    ylabel : str
        The energy axis' label.
    **style
        Passed to ``Axes.plot``.

    Returns
    -------
    matplotlib.axes.Axes
    """
    ax = _axes(ax)
    times = np.asarray(trajectory.times, float)
    energies = np.asarray(trajectory.energies, float)
    label = label if label is not None else (getattr(trajectory, "scheme", "") or None)
    index = len(ax.get_lines())
    ax.plot(times, energies, label=label, **{**curve_style(index, times.size), **style})
    if spans_decades(*[line.get_ydata() for line in ax.get_lines()]):
        ax.set_yscale("log")
    _finish(ax, "time $t$", ylabel)
    return ax


def draw_energy_decay(trajectories: Mapping, ax=None, *, failed: Mapping[str, str] | None = None,
                      bounds: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                      ylabel: str = "energy $F(\\mu_t)$", title: str | None = None):
    """Energies against time of several runs, one marker and line style each, with reference
    bounds and the schemes that failed.

    Parameters
    ----------
    trajectories : mapping of str to Trajectory
        Label (naming the scheme and its parameters) -> run.
    ax : matplotlib.axes.Axes, optional
        Where to draw (default: a new figure).
    failed : mapping of str to str, optional
        Label -> why the scheme failed: each gets a legend entry "label: failed (why)", so no
        scheme is dropped silently.
    bounds : mapping of str to (times, values), optional
        Reference curves, drawn black and dashed on top (a run may sit on its bound).
    ylabel, title : str
        The energy axis' label and the title.

    Returns
    -------
    matplotlib.axes.Axes

    Notes
    -----
    The energy axis is logarithmic when every energy is positive and they span ``LOG_RATIO``;
    then non-positive values of a bound cannot be drawn and are left out.
    """
    ax = _axes(ax)
    curves = [(label, np.asarray(t.times, float), np.asarray(t.energies, float))
              for label, t in trajectories.items()]
    references = [(label, np.asarray(times, float), np.asarray(values, float))
                  for label, (times, values) in (bounds or {}).items()]
    log = spans_decades(*[e for _, _, e in curves]) if curves else spans_decades(
        *[v for _, _, v in references])
    for index, (label, times, energies) in enumerate(curves):
        keep = energies > 0 if log else np.isfinite(energies)
        ax.plot(times[keep], energies[keep], label=label, **curve_style(index, int(keep.sum())))
    for index, (label, times, values) in enumerate(references):
        keep = values > 0 if log else np.isfinite(values)
        color, line = (("k", "--"), ("k", ":"), ("tab:red", "-."), ("tab:purple", "--"))[index % 4]
        ax.plot(times[keep], values[keep], color=color, linestyle=line, linewidth=1.2,
                marker="x" if times.size <= 50 else None, markersize=7, label=label, zorder=3)
    for label, why in (failed or {}).items():
        ax.plot([], [], linestyle="none", marker="x", color="tab:red",
                label=f"{label}: failed ({_short(why, 60)})")
    if log:
        ax.set_yscale("log")
    _finish(ax, "time $t$", ylabel, title)
    return ax


def draw_convergence(study, ax=None, *, title: str | None = None):
    """Error against tau, log-log, for a convergence study: clean rows as dots, flagged rows as
    red crosses labelled with their flags, the fitted C tau^order over the clean rows and a
    slope-1 guide through the middle of the clean rows (their geometric mean).

    Parameters
    ----------
    study : ConvergenceStudy
        Anything with ``rows`` (dicts with ``tau``, ``error``, ``flags``), ``order`` (a
        ``diagnostics.ConvergenceOrder`` or None) and ``distance``.
    ax : matplotlib.axes.Axes, optional
        Where to draw (default: a new figure).
    title : str, optional
        Drawn above the Axes.

    Returns
    -------
    matplotlib.axes.Axes
    """
    ax = _axes(ax)
    rows = [r for r in study.rows if r["error"] is not None and np.isfinite(r["error"]) and r["error"] > 0]
    clean = [r for r in rows if not r["flags"]]
    flagged = [r for r in rows if r["flags"]]
    if clean:
        ax.plot([r["tau"] for r in clean], [r["error"] for r in clean], "o", color="tab:blue",
                label="runs")
    if flagged:
        ax.plot([r["tau"] for r in flagged], [r["error"] for r in flagged], "x", color="tab:red",
                markersize=9, mew=2, label="flagged (order spoiled)")
        for r in flagged:
            ax.annotate(_short(", ".join(r["flags"]), 50), (r["tau"], r["error"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=7, color="tab:red")
    taus = np.array(sorted(r["tau"] for r in rows)) if rows else np.array([])
    if study.order is not None and taus.size:
        lo, hi = study.order.interval()
        ax.plot(taus, study.order.constant * taus ** study.order.order, "-", color="tab:blue",
                label=f"fit: order {study.order.order:.2f} (95%: {lo:.2f} to {hi:.2f})")
    if len(clean) >= 1:
        clean_taus = np.array(sorted(r["tau"] for r in clean))
        center_tau = np.exp(np.mean(np.log(clean_taus)))
        center_error = np.exp(np.mean(np.log([r["error"] for r in clean])))
        ax.plot(clean_taus, center_error * clean_taus / center_tau, "k:", linewidth=1,
                label="slope 1 (first order)")
    if rows:
        ax.set_xscale("log")
        ax.set_yscale("log")
    _finish(ax, "step size $\\tau$ (time units)", f"error ({study.distance})", title)
    return ax


def draw_particles(measure, ax=None, *, target=None, size: float = 25.0, color: str = "tab:red",
                   label: str | None = "particles", title: str | None = None):
    """Weighted particles in the plane, marker area proportional to weight, on equal axes.

    Marker area is ``size`` times n a_i / sum(a): uniform weights give ``size``, a particle
    without mass vanishes. The first two coordinates of higher-dimensional points.

    Parameters
    ----------
    measure : Measure
        Anything with ``points`` (n, d), d >= 2, and ``weights`` (n,).
    ax : matplotlib.axes.Axes, optional
        Where to draw (default: a new figure).
    target : Measure, optional
        Drawn behind, as small grey dots ("target samples").
    size : float
        Marker area (points^2) of a particle of average weight.
    color, label, title : str
        The particles' colour and legend entry (None: no entry), and the title.

    Returns
    -------
    matplotlib.axes.Axes
    """
    ax = _axes(ax, figsize=(4.8, 4.4))
    if target is not None:
        target_points = np.asarray(target.points, float)
        ax.scatter(target_points[:, 0], target_points[:, 1], s=6, color="0.6", marker=".",
                   linewidths=0, label="target samples")
    points, weights = np.asarray(measure.points, float), np.asarray(measure.weights, float)
    area = size * weights * weights.size / max(float(weights.sum()), np.finfo(float).tiny)
    ax.scatter(points[:, 0], points[:, 1], s=area, color=color, alpha=0.6, linewidths=0, label=label)
    ax.set_aspect("equal", adjustable="datalim")
    _finish(ax, "$x_1$", "$x_2$", title, legend=label is not None)
    return ax


def _short(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


# ---------------------------------------------------------------------------- PNG files

def plot_snapshots(trajectories: Mapping, target: Measure, path,
                   count: int = 4, title: str | None = None) -> Path:
    """Densities at ``count`` times of each trajectory (one row each), beside the target.

    trajectories: label -> Trajectory of measures on one 2-D grid; target: a measure on the
    same grid. All panels share one colour scale. Writes a PNG to ``path`` and returns it.
    """
    if not trajectories:
        raise ValueError("plot_snapshots needs at least one trajectory")
    target_image = density_image(target)
    rows = []
    for label, trajectory in trajectories.items():
        picks = snapshot_indices(len(trajectory), count)
        rows.append((label, trajectory, picks, [density_image(trajectory.measures[i]) for i in picks]))
    columns = max(len(picks) for _, _, picks, _ in rows) + 1
    vmax = max(float(target_image.max()), *(float(im.max()) for *_, images in rows for im in images))

    fig = Figure(figsize=(2.6 * columns + 0.8, 2.6 * len(rows) + (0.6 if title else 0.3)),
                 layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), columns, squeeze=False))
    grid = target.grid
    shown = None
    for r, (label, trajectory, picks, images) in enumerate(rows):
        for c in range(columns - 1):
            ax = axes[r, c]
            if c >= len(picks):
                ax.set_axis_off()
                continue
            shown = _show_density(ax, images[c], grid, vmax)
            ax.set_title(f"t = {trajectory.times[picks[c]]:.3g} (step {picks[c]})", fontsize=9)
        _show_density(axes[r, -1], target_image, grid, vmax)
        axes[r, -1].set_title("target $\\pi$", fontsize=9)
        axes[r, 0].set_ylabel(f"{label}\n$x_2$", fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("$x_1$")
    if shown is not None:
        fig.colorbar(shown, ax=axes, shrink=0.9, label="density $a_i / h^2$")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_energy_decay(trajectories: Mapping, path,
                      bounds: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                      title: str | None = None, ylabel: str = "energy $F(\\mu_t)$",
                      failed: Mapping[str, str] | None = None) -> Path:
    """Energy against time, one curve (marker and line style) per trajectory, with reference
    bounds and a legend entry for each scheme that failed (``draw_energy_decay``).

    Parameters
    ----------
    trajectories : mapping of str to Trajectory
        Label -> run.
    path : path-like
        The PNG to write.
    bounds : mapping of str to (times, values), optional
        Reference curves, drawn dashed.
    title, ylabel : str, optional
    failed : mapping of str to str, optional
        Label -> why that scheme failed (shown in the legend).

    Returns
    -------
    pathlib.Path
    """
    fig = _figure()
    draw_energy_decay(trajectories, fig.subplots(), failed=failed, bounds=bounds, ylabel=ylabel,
                      title=title)
    return _save(fig, path)


def plot_work_precision(curves: Sequence, path, title: str = "") -> Path:
    """Error against work (step solves), log-log, one line per ``studies.WorkPrecision``, each
    point labelled with its parameter (steps, or the controller's rtol). Writes a PNG."""
    fig = _figure((6.4, 4.6))
    ax = fig.subplots()
    for index, curve in enumerate(curves):
        ax.loglog(curve.solves, curve.errors, label=curve.label, **curve_style(index, len(curve.solves)))
        for parameter, solves, error in zip(curve.parameter, curve.solves, curve.errors, strict=True):
            text = f"{parameter:.0e}" if parameter < 1 else f"{parameter:.0f}"
            ax.annotate(text, (solves, error), textcoords="offset points", xytext=(4, 4), fontsize=7)
    _finish(ax, "work: step solves", "error (largest over the saved times)", title)
    return _save(fig, path)


def plot_step_sizes(trajectories: Mapping, path, title: str = "") -> Path:
    """Accepted step sizes against time (one style per run) and the rejected attempts (x), for
    adaptive runs. Writes a PNG."""
    fig = _figure((6.4, 4.2))
    ax = fig.subplots()
    for index, (label, trajectory) in enumerate(trajectories.items()):
        accepted = [s for s in trajectory.stats if s.get("accepted", True)]
        rejected = [s for s in trajectory.stats if not s.get("accepted", True)]
        line, = ax.plot([s["t"] + s["tau"] for s in accepted], [s["tau"] for s in accepted],
                        label=label, **curve_style(index, len(accepted)))
        if rejected:
            ax.plot([s["t"] for s in rejected], [s["tau"] for s in rejected], "x",
                    color=line.get_color())
    ax.set_yscale("log")  # step sizes of a controller: factors, read as ratios
    if any(not s.get("accepted", True) for t in trajectories.values() for s in t.stats):
        ax.plot([], [], "x", color="0.3", label="rejected attempts")
    _finish(ax, "time $t$", "step size $\\tau$ (time units)", title)
    return _save(fig, path)


def plot_energy(trajectory, path, title: str | None = None,
                ylabel: str = "energy $F(\\mu_t)$") -> Path:
    """Energy against time of one run (``draw_energy``: markers at the saved states, a log
    scale when the energies are positive and span decades). Writes a PNG and returns it."""
    fig = _figure()
    ax = draw_energy(trajectory, fig.subplots(), label="", ylabel=ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _seed_band(ax, steps: np.ndarray, values: np.ndarray, label: str, style: dict) -> None:
    """The mean over seeds as a line, mean +- one standard deviation as a band (its lower edge
    clipped at the smallest value over the seeds: a log scale shows no negative numbers)."""
    with np.errstate(all="ignore"):
        usable = np.any(np.isfinite(values), axis=0)
        mean = np.full(values.shape[1], np.nan)
        mean[usable] = np.nanmean(values[:, usable], axis=0)
        line, = ax.plot(steps, mean, label=label, linewidth=1.4, **style)
        if values.shape[0] > 1:
            sd = np.full(values.shape[1], np.nan)
            sd[usable] = np.nanstd(values[:, usable], axis=0, ddof=1)
            low = np.full(values.shape[1], np.nan)
            low[usable] = np.maximum(mean[usable] - sd[usable], np.nanmin(values[:, usable], axis=0))
            ax.fill_between(steps, low, mean + sd, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_seed_curves(panels: Mapping[str, Mapping[str, np.ndarray]], path,
                     ylabel: str | Mapping[str, str] = "MMD",
                     xlabel: str = "iteration $k$", title: str | None = None, log_x: bool = False,
                     columns: int | None = None, log_y: bool | Mapping[str, bool] | None = None) -> Path:
    """Curves over seeds, one panel per entry of ``panels``.

    Each curve is the mean over seeds (one marker and line style per label); with several seeds
    a band shows mean +- one standard deviation, and the legend says so. Non-finite values (a
    diverged run) are left out, and on a log axis the non-positive ones too.

    Parameters
    ----------
    panels : mapping of str to mapping of str to array
        Panel title -> label -> values (seeds, points) or (points,); point k is iteration k.
    path : path-like
        The PNG to write.
    ylabel : str or mapping of str to str
        One label, or panel title -> label.
    xlabel, title : str
    log_x : bool
        Iterations on a log scale (symlog: linear from 0 to 1, so iteration 0 is shown).
    columns : int, optional
        Panels per row (default: all in one row).
    log_y : bool or mapping of str to bool, optional
        A log value axis (for all panels, or panel title -> bool); default (and for a panel not
        in the mapping): where the panel's positive values span ``LOG_RATIO`` (an error or an
        energy that decays; give False for a count of particles).

    Returns
    -------
    pathlib.Path
    """
    if not panels:
        raise ValueError("plot_seed_curves needs at least one panel")
    columns = len(panels) if columns is None else max(1, min(int(columns), len(panels)))
    rows = -(-len(panels) // columns)
    fig = _figure((5.2 * columns + 0.4, 3.9 * rows + 0.3))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    for ax, (panel, curves) in zip(axes, panels.items(), strict=False):
        seeds = 1
        arrays = [np.atleast_2d(np.asarray(v, float)) for v in curves.values()]
        positive = [np.where(np.isfinite(v) & (v > 0), v, np.nan) for v in arrays]
        chosen = log_y.get(panel) if isinstance(log_y, Mapping) else log_y
        log = spans_decades(*positive) if chosen is None else bool(chosen)
        shown = positive if log else [np.where(np.isfinite(v), v, np.nan) for v in arrays]
        for index, (label, values) in enumerate(zip(curves, shown, strict=True)):
            seeds = max(seeds, values.shape[0])
            style = curve_style(index, values.shape[1])
            style["markevery"] = _log_marks(values.shape[1]) if log_x else style["markevery"]
            _seed_band(ax, np.arange(values.shape[1]), values, label, style)
        if log:
            ax.set_yscale("log")
        if log_x:
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=0.0)
        if seeds > 1:
            handles, labels = ax.get_legend_handles_labels()
            handles.append(Patch(color="0.6", alpha=0.4))
            labels.append(f"band: mean $\\pm$ 1 s.d. over {seeds} seeds")
            ax.legend(handles, labels, fontsize=8)
        _finish(ax, xlabel, ylabel if isinstance(ylabel, str) else ylabel.get(panel, ""), panel,
                legend=seeds == 1)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _log_marks(points: int) -> list[int]:
    """About ``MARKERS_PER_CURVE`` marker positions spread evenly on a log axis of iterations."""
    if points <= MARKERS_PER_CURVE:
        return list(range(points))
    return sorted({0, *np.unique(np.geomspace(1, points - 1, MARKERS_PER_CURVE).astype(int)).tolist()})


def plot_particle_snapshots(rows: Mapping[str, Mapping[int, Measure]], target: Measure, path,
                            title: str | None = None, size: float = 25.0) -> Path:
    """Weighted particles at a few steps, on equal axes shared by every panel.

    One row per scheme, one column per step, the target samples in grey behind the particles
    (``draw_particles``: marker area ``size`` times n a_i / sum(a)). 2-D measures (the first two
    coordinates otherwise).

    Parameters
    ----------
    rows : mapping of str to mapping of int to Measure
        Label (the scheme) -> {step: measure}.
    target : Measure
        The target samples.
    path : path-like
        The PNG to write.
    title : str, optional
    size : float
        Marker area of a particle of average weight.

    Returns
    -------
    pathlib.Path
    """
    if not rows:
        raise ValueError("plot_particle_snapshots needs at least one row")
    columns = max(len(snaps) for snaps in rows.values())
    everything = np.vstack([target.points[:, :2]] + [m.points[:, :2] for snaps in rows.values()
                                                      for m in snaps.values()])
    finite = everything[np.all(np.isfinite(everything), axis=1)]
    lo, hi = finite.min(axis=0), finite.max(axis=0)
    center, half = (lo + hi) / 2, 0.55 * np.max(np.maximum(hi - lo, 1e-9))  # a square window
    width, height = 2.4 * columns + 0.6, 2.4 * len(rows) + (0.5 if title else 0.2)
    fig = _figure((width, height), layout=None)  # equal square panels: a fixed grid suffices
    fig.subplots_adjust(left=0.55 / width, right=1 - 0.1 / width, bottom=0.45 / height,
                        top=1 - (0.55 if title else 0.3) / height, wspace=0.22, hspace=0.32)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, (label, snaps) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r, c]
            if c >= len(snaps):
                ax.set_axis_off()
                continue
            step, mu = sorted(snaps.items())[c]
            draw_particles(mu, ax, target=target, size=size, label="particles")
            ax.set_xlim(center[0] - half, center[0] + half)
            ax.set_ylim(center[1] - half, center[1] + half)
            ax.set_aspect("equal", adjustable="box")
            ax.set_title(f"{label}: step {step}" if c == 0 else f"step {step}", fontsize=8)
            ax.set_xlabel("$x_1$" if r == len(rows) - 1 else "", fontsize=8)
            ax.set_ylabel("$x_2$" if c == 0 else "", fontsize=8)
            ax.tick_params(labelsize=7)
            if ax.get_legend() is not None and (r, c) != (0, 0):
                ax.get_legend().remove()
    if axes[0, 0].get_legend() is not None:
        axes[0, 0].legend(fontsize=6, loc="upper left", markerscale=1.0)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_convergence(study, path, title: str | None = None) -> Path:
    """Error against tau, log-log, for a ``studies.ConvergenceStudy`` (``draw_convergence``):
    clean rows as dots, flagged rows as red crosses labelled with their flags, the fitted
    C tau^order over the clean rows and a slope-1 guide through the clean rows. Writes a PNG."""
    fig = _figure((6.4, 4.6))
    draw_convergence(study, fig.subplots(), title=title)
    return _save(fig, path)
