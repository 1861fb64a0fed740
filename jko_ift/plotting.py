"""The figures: functions that take trajectories (or arrays) and a path, and write a PNG.

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot:
nothing opens a window, nothing touches pyplot's global figure list (so there is no figure
to close and none leaks), and the backend a notebook has chosen is left alone. Each file
is written atomically (``io.atomic_path``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .io import atomic_path
from .measures import Measure
from .solve import Trajectory

__all__ = ["density_image", "plot_energy", "plot_energy_decay", "plot_particle_snapshots",
           "plot_seed_curves", "plot_snapshots", "plot_step_sizes", "plot_work_precision",
           "snapshot_indices"]

#: Resolution of the PNGs.
DPI = 120


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


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, the title, a grid at every (log) tick and the legend of a one-axes figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def plot_snapshots(trajectories: Mapping[str, Trajectory], target: Measure, path,
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


def plot_energy_decay(trajectories: Mapping[str, Trajectory], path,
                      bounds: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                      title: str | None = None, ylabel: str = "energy $F(\\mu_t)$") -> Path:
    """Energy against time on a log scale, one curve per trajectory, with reference bounds.

    trajectories: label -> Trajectory; bounds: label -> (times, values), drawn dashed (a
    bound given at as many times as a trajectory has steps gets markers too). Non-positive
    values cannot be drawn on a log scale and are left out. Writes a PNG and returns it.
    """
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    markers = iter("osD^v<>")
    for label, trajectory in trajectories.items():
        times, energies = np.asarray(trajectory.times), np.asarray(trajectory.energies)
        keep = energies > 0
        ax.semilogy(times[keep], energies[keep], marker=next(markers, "o"), label=label)
    # bounds on top (zorder): a trajectory may sit on its bound (MMD flow: equality)
    styles = iter([("k", "--"), ("k", ":"), ("tab:red", "-."), ("tab:purple", "--")])
    for label, (times, values) in (bounds or {}).items():
        times, values = np.asarray(times, float), np.asarray(values, float)
        keep = values > 0
        color, line = next(styles, ("k", "--"))
        few = times.size <= 50
        ax.semilogy(times[keep], values[keep], color=color, linestyle=line, linewidth=1.2,
                    marker="x" if few else None, markersize=7, label=label, zorder=3)
    ax.set_xlabel("time $t$")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_work_precision(curves: Sequence, path, title: str = "") -> Path:
    """Error against work (step solves), log-log, one line per ``studies.WorkPrecision``."""
    fig = Figure(figsize=(6.4, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for curve, marker in zip(curves, "os^vD", strict=False):
        ax.loglog(curve.solves, curve.errors, marker=marker, label=curve.label)
        for parameter, solves, error in zip(curve.parameter, curve.solves, curve.errors, strict=True):
            text = f"{parameter:.0e}" if parameter < 1 else f"{parameter:.0f}"
            ax.annotate(text, (solves, error), textcoords="offset points", xytext=(4, 4), fontsize=7)
    _label(ax, "work: step solves", "error (largest over the saved times)", title)
    return _save(fig, path)


def plot_step_sizes(trajectories: Mapping[str, Trajectory], path, title: str = "") -> Path:
    """Accepted step sizes against time, and the rejected attempts, for adaptive runs."""
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, trajectory in trajectories.items():
        accepted = [s for s in trajectory.stats if s.get("accepted", True)]
        rejected = [s for s in trajectory.stats if not s.get("accepted", True)]
        line, = ax.semilogy([s["t"] + s["tau"] for s in accepted], [s["tau"] for s in accepted],
                            marker=".", label=label)
        if rejected:
            ax.semilogy([s["t"] for s in rejected], [s["tau"] for s in rejected], "x",
                        color=line.get_color())
    _label(ax, "time t", "step size tau (x: rejected)", title)
    return _save(fig, path)


def plot_energy(trajectory: Trajectory, path, title: str | None = None,
                ylabel: str = "energy $F(\\mu_t)$") -> Path:
    """Energy against time of one run, with markers at the saved states.

    A log scale when every energy is positive (decay rates read as slopes), a linear one
    otherwise (entropies and KL-type energies can be negative). Writes a PNG, returns it.
    """
    times, energies = np.asarray(trajectory.times, float), np.asarray(trajectory.energies, float)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(times, energies, marker="o" if times.size <= 60 else None, markersize=4)
    if energies.size and np.all(energies > 0):
        ax.set_yscale("log")
    ax.set_xlabel("time $t$")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_seed_curves(panels: Mapping[str, Mapping[str, np.ndarray]], path,
                     ylabel: str | Mapping[str, str] = "MMD",
                     xlabel: str = "iteration", title: str | None = None, log_x: bool = False,
                     columns: int | None = None) -> Path:
    """Curves over seeds on a log scale: one panel per entry of ``panels`` (panel title ->
    label -> array (seeds, points) or (points,)), the mean as a line and mean +- one standard
    deviation as a band (its lower edge clipped at the smallest value over the seeds, a log
    scale cannot show negative numbers). Non-finite and non-positive values (a diverged run)
    are left out. ``ylabel``: one label, or panel title -> label. ``columns``: panels per
    row (default: all in one row). Writes a PNG and returns it."""
    if not panels:
        raise ValueError("plot_seed_curves needs at least one panel")
    columns = len(panels) if columns is None else max(1, min(int(columns), len(panels)))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(5.2 * columns + 0.4, 3.9 * rows + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    for ax, (panel, curves) in zip(axes, panels.items(), strict=False):
        for label, values in curves.items():
            values = np.atleast_2d(np.asarray(values, float))
            values = np.where(np.isfinite(values) & (values > 0), values, np.nan)
            steps = np.arange(values.shape[1])
            with np.errstate(all="ignore"):
                usable = np.any(np.isfinite(values), axis=0)
                mean = np.full(values.shape[1], np.nan)
                mean[usable] = np.nanmean(values[:, usable], axis=0)
                line, = ax.plot(steps, mean, label=label, linewidth=1.4)
                if values.shape[0] > 1:
                    sd = np.full(values.shape[1], np.nan)
                    sd[usable] = np.nanstd(values[:, usable], axis=0, ddof=1)
                    low = np.full(values.shape[1], np.nan)
                    low[usable] = np.maximum(mean[usable] - sd[usable],
                                             np.nanmin(values[:, usable], axis=0))
                    ax.fill_between(steps, low, mean + sd, color=line.get_color(), alpha=0.2,
                                    linewidth=0)
        ax.set_yscale("log")
        if log_x:
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=0.0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel if isinstance(ylabel, str) else ylabel.get(panel, ""))
        ax.set_title(panel, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_particle_snapshots(rows: Mapping[str, Mapping[int, Measure]], target: Measure, path,
                            title: str | None = None, size: float = 25.0) -> Path:
    """Weighted particles at a few steps: one row per scheme (label -> {step: measure}), the
    target samples in grey behind them. Marker area is ``size`` times n a_i / sum(a) (uniform
    weights: ``size``; a particle without mass vanishes). 2-D measures only (the first two
    coordinates otherwise). Writes a PNG and returns it."""
    if not rows:
        raise ValueError("plot_particle_snapshots needs at least one row")
    columns = max(len(snaps) for snaps in rows.values())
    everything = np.vstack([target.points[:, :2]] + [m.points[:, :2] for snaps in rows.values()
                                                      for m in snaps.values()])
    finite = everything[np.all(np.isfinite(everything), axis=1)]
    lo, hi = finite.min(axis=0), finite.max(axis=0)
    pad = 0.05 * np.maximum(hi - lo, 1e-9)
    fig = Figure(figsize=(2.3 * columns + 0.6, 2.2 * len(rows) + (0.5 if title else 0.2)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, (label, snaps) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r, c]
            if c >= len(snaps):
                ax.set_axis_off()
                continue
            step, mu = sorted(snaps.items())[c]
            ax.scatter(target.points[:, 0], target.points[:, 1], s=6, color="0.6", marker=".",
                       linewidths=0, label="target samples")
            weights = mu.weights * mu.n / max(mu.mass, np.finfo(float).tiny)
            ax.scatter(mu.points[:, 0], mu.points[:, 1], s=size * weights, color="tab:red",
                       alpha=0.6, linewidths=0, label="particles")
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            ax.set_title(f"step {step}", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[r, 0].set_ylabel(label, fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="upper left", markerscale=1.0)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_convergence(study, path, title: str | None = None) -> Path:
    """Error against tau, log-log, for a ``studies.ConvergenceStudy``: clean rows as dots,
    flagged rows as red crosses labelled with their flags, the fitted C tau^order over the
    clean rows and a slope-1 guide. Writes a PNG and returns it."""
    rows = [r for r in study.rows if r["error"] is not None and r["error"] > 0]
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    clean = [r for r in rows if not r["flags"]]
    flagged = [r for r in rows if r["flags"]]
    if clean:
        ax.loglog([r["tau"] for r in clean], [r["error"] for r in clean], "o", color="tab:blue",
                  label="runs")
    if flagged:
        ax.loglog([r["tau"] for r in flagged], [r["error"] for r in flagged], "x", color="tab:red",
                  markersize=9, mew=2, label="flagged (order spoiled)")
        for r in flagged:
            ax.annotate(", ".join(r["flags"]), (r["tau"], r["error"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=7, color="tab:red")
    taus = np.array(sorted(r["tau"] for r in rows)) if rows else np.array([])
    if study.order is not None and taus.size:
        lo, hi = study.order.interval()
        ax.loglog(taus, study.order.constant * taus ** study.order.order, "-", color="tab:blue",
                  label=f"fit: order {study.order.order:.2f} (95%: {lo:.2f} to {hi:.2f})")
    if clean and taus.size:
        anchor = clean[-1]
        ax.loglog(taus, anchor["error"] * taus / anchor["tau"], "k:", linewidth=1, label="slope 1")
    ax.set_xlabel("step size $\\tau$")
    ax.set_ylabel(f"error ({study.distance})")
    ax.grid(True, which="both", alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)

__all__ += ["plot_convergence"]
