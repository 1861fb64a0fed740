"""The demo of ``jko-ift demo``: the 2-D experiment of the IFT paper, computed and written.

The 2-D experiment of the IFT paper on its three-component mixture target (100 particles from
N((5, 5), I), 100 target samples, Gaussian kernel of width 10), by the three update loops of the
authors' code with their position step lr = 50 (``problems.paper_scheme``: the W2 step
tau = 2 lr / n, 1 for 100 particles): the MMD flow (positions only), WFR (then their KL weight
step, multiplicative and projected onto the simplex, lr_w = 1) and IFT (then their
projected-gradient MMD weight step, lr_w = 0.1). ``cli`` parses the options and prints;
everything else is here.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .io import check_writable, folder_lock, results_folder, write_json_atomic

# The command line reads the DEMO_* settings to build its parser: the solver, the problems and the
# figures (cvxpy, matplotlib: seconds) are imported when the demo runs, not for ``--help``.
if TYPE_CHECKING:
    from .problems import ParticleExperiment
    from .solve import Trajectory

__all__ = ["DEMO_LEVELS", "demo_schemes", "run_demo"]

DEMO_TARGET = "mixture"
DEMO_PARTICLES = 100
DEMO_STEPS = 2000
DEMO_SEED = 0
DEMO_POSITION_LR = 50.0   # the paper's position step (their lr)
DEMO_IFT_WEIGHT_LR = 0.1  # the paper's weight step (their lr_ of the MMD branch)
DEMO_WFR_WEIGHT_LR = 1.0  # their lr_ of the KL branch (the 100-D experiment)
DEMO_OUT = "jko-ift-demo"
#: MMD levels whose first crossing the demo reports for each scheme.
DEMO_LEVELS = (1e-2, 1e-3)


def demo_schemes(kernel, particles: int = DEMO_PARTICLES) -> dict:
    """label -> (method, geometry, tau) of the demo: the authors' loops with lr = 50 for
    ``particles`` equal-weight particles of mass 1 (``problems.paper_scheme``)."""
    from .problems import paper_scheme

    schemes = {
        "MMD flow": paper_scheme(kernel, DEMO_POSITION_LR, particles),
        "WFR": paper_scheme(kernel, DEMO_POSITION_LR, particles, DEMO_WFR_WEIGHT_LR, weight_update="kl"),
        "IFT": paper_scheme(kernel, DEMO_POSITION_LR, particles, DEMO_IFT_WEIGHT_LR),
    }
    return {label: tuple(scheme) for label, scheme in schemes.items()}


def run_demo(out, particles: int = DEMO_PARTICLES, steps: int = DEMO_STEPS, seed: int = DEMO_SEED,
             say: Callable[[str], None] = lambda message: None, progress: bool = True) -> dict:
    """Run the demo into the results folder ``out``; return label -> the record of its run.

    The folder is checked (writable, free space) before any step and locked for the run
    (``io.folder_lock``). Writes mmd_decay.png (MMD to the target samples against iteration, the
    MMD being sqrt(2 F)), particles.png (snapshots at steps 0, 10, 100 and the last, marker area
    ~ weight) and summary.json, all at once (``io.results_folder``). ``say`` gets a line before
    each scheme runs; ``progress`` shows ``jk.solve``'s bars.
    """
    from .problems import paper_2d

    out = check_writable(out, create=False)  # fail before the computation, not after
    with folder_lock(out, {"command": "demo"}):
        start = time.perf_counter()
        experiment = paper_2d(DEMO_TARGET, particles, particles, seed=seed)
        schemes = demo_schemes(experiment.kernel, particles)
        snapshot_steps = sorted({0, min(10, steps), min(100, steps), steps})
        curves, runs, snapshots = {}, {}, {}
        for label, scheme in schemes.items():
            say(f"{label}: {steps} iterations, {particles} particles")
            trajectory, runs[label] = _run_scheme(experiment, scheme, steps, progress)
            curves[label] = runs[label]["mmd"]
            snapshots[label] = {k: trajectory.measures[k] for k in snapshot_steps}
        parameters = {
            "target": DEMO_TARGET, "particles": particles, "samples": particles, "seed": seed,
            "steps": steps, "kernel": repr(experiment.kernel),
            "energy": "MMD2: 1/2 MMD^2(mu, target samples)", "position_lr": DEMO_POSITION_LR,
            "ift_weight_lr": DEMO_IFT_WEIGHT_LR, "wfr_weight_lr": DEMO_WFR_WEIGHT_LR,
        }
        title = (f"IFT paper, 2-D mixture target: {particles} particles, seed {seed}, "
                 f"lr {DEMO_POSITION_LR:g} (tau = {schemes['IFT'][2]:.3g})")
        _write_demo(out, title, experiment, curves, snapshots,
                    {"parameters": parameters, "runs": runs, "start": start})
    return runs


def _run_scheme(experiment: ParticleExperiment, scheme: tuple, steps: int, progress: bool) -> tuple:
    """(trajectory, record) of one scheme (method, geometry, tau) of the demo."""
    from .methods import WeightClippingWarning
    from .solve import DissipationWarning, solve

    method, geometry, tau = scheme
    start = time.perf_counter()
    # Explicit position steps do not promise F + D^2/(2 tau) <= F(mu^k), and the paper's
    # weight step projects onto the simplex, zeroing the weights of far particles by design:
    # count, not show (the run keeps every cause with its count, in summary.json too).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DissipationWarning)
        warnings.simplefilter("ignore", WeightClippingWarning)
        trajectory = solve(experiment.energy, geometry, experiment.initial, tau=tau,
                           steps=steps, method=method, progress=progress)
    curve = np.sqrt(2.0 * np.maximum(trajectory.energies, 0.0))
    broken = sum(w.count for w in trajectory.warnings if w.category == DissipationWarning.__name__)
    record = _run_record(trajectory, curve, time.perf_counter() - start, broken)
    record["geometry"], record["method"], record["tau"] = repr(geometry), repr(method), tau
    return trajectory, record


def _run_record(trajectory: Trajectory, mmd_curve: np.ndarray, wall_time: float,
                dissipation_warnings: int) -> dict:
    """The JSON-ready record of one demo run (numpy values are converted by write_json_atomic)."""
    below = {str(level): (int(np.argmax(mmd_curve <= level)) if np.any(mmd_curve <= level) else None)
             for level in DEMO_LEVELS}
    weights = np.sort(trajectory.measures[-1].weights)[::-1]
    return {
        "energies": trajectory.energies,
        "mmd": mmd_curve,
        "final_mmd": mmd_curve[-1],
        "first_below": below,
        "final_mass": weights.sum(),
        # how many particles carry 99% of the mass: the weight steps concentrate it
        "particles_with_99_percent_mass": int(np.searchsorted(np.cumsum(weights), 0.99 * weights.sum()) + 1),
        "statuses": sorted({s["status"] for s in trajectory.stats}),
        "dissipation_warnings": dissipation_warnings,
        "warnings": [w.to_dict() for w in trajectory.warnings],
        "wall_time": wall_time,
    }


def _write_demo(out: Path, title: str, experiment: ParticleExperiment, curves: dict, snapshots: dict,
                record: dict) -> None:
    """mmd_decay.png, particles.png and summary.json, moved into ``out`` together."""
    from . import __version__
    from .plotting import plot_particle_snapshots, plot_seed_curves

    with results_folder(out) as folder:
        plot_seed_curves({title: curves}, folder / "mmd_decay.png", log_x=True,
                         ylabel="MMD$(\\mu^k, \\pi)$ (target samples)")
        plot_particle_snapshots(snapshots, experiment.target, folder / "particles.png",
                                title="particles (marker area ~ weight) and target samples (grey)")
        write_json_atomic(folder / "summary.json", {
            "command": "demo", "version": __version__, "parameters": record["parameters"],
            "runs": record["runs"], "wall_time": time.perf_counter() - record["start"]})
