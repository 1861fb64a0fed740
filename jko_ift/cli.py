"""The command line ``jko-ift``: parses options, then calls the library.

    jko-ift demo [--steps N] [--particles N] [--seed S] [--out DIR] [--quiet]
    jko-ift run CONFIG [--out DIR] [--resume] [--checkpoint-every N] [-q | -v]
    jko-ift converge CONFIG --taus 0.2,0.1,0.05 [--refine-grid] [--reference fine] [--out DIR] [-q | -v]
    jko-ift compare CONFIG [--methods conic,entropic] [--geometries ift,wfr,mmd] [--out DIR] [-q | -v]
    jko-ift sweep CONFIG --param run.tau=0.1,0.05 [--param ...] [--scheduler ADDR] [--workers N] [-q | -v]

Progress bars and messages go to stderr (stdout gets only the results folder); ``-q``/``--quiet``
turns them off, ``-v``/``--verbose`` adds details from the ``jko_ift`` logger (and the traceback
of an error).

Exit codes (``EXIT_CODES``): 0 success, 1 a JKO step failed (``SolverError``), 2 bad input (the
command line, the config, an unreadable checkpoint or trajectory file, an output folder that cannot
take the results or is in use by another run), 3 an internal error (a bug: the message says where
to report it), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, e.g. by a batch scheduler).
No input ends in a Python traceback unless ``-v``.

Subcommands each get a parser (``_add_<name>``) and a runner (``_run_<name>``), so later
``run``, ``compare``, ``converge`` and ``sweep`` slot in beside ``demo``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

# Only what the parser needs is imported here: ``jko-ift --help`` must not load cvxpy, SciPy's
# statistics or matplotlib (seconds); each command imports what it runs.
from . import __version__
from .demo import (
    DEMO_IFT_WEIGHT_LR,
    DEMO_LEVELS,
    DEMO_OUT,
    DEMO_PARTICLES,
    DEMO_POSITION_LR,
    DEMO_SEED,
    DEMO_STEPS,
    DEMO_WFR_WEIGHT_LR,
    demo_schemes,
)
from .io import check_writable, folder_lock, results_folder, write_json_atomic

__all__ = ["EXIT_CODES", "build_parser", "demo_schemes", "main"]

#: The exit codes of ``jko-ift`` (also in ``jko-ift --help`` and docs/configs.md).
EXIT_OK, EXIT_STEP_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED = (
    0, 1, 2, 3, 130, 143)
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_STEP_FAILED: "a JKO step failed (the message says why and what to change)",
    EXIT_BAD_INPUT: "bad input: command line, config, an unreadable checkpoint or trajectory file, or an "
                    "output folder that cannot take the results or is in use by another run",
    EXIT_INTERNAL: "internal error: a bug in jko_ift (rerun with -v for the traceback and report it)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); the message says where it stopped and how to resume",
    EXIT_TERMINATED: "terminated (SIGTERM, e.g. a batch scheduler's kill) during a run: as Ctrl-C",
}
#: Where an internal error is to be reported.
REPORT_TO = "the jko_ift issue tracker"

#: The help, description and epilog of each command (``jko-ift COMMAND --help``).
COMMAND_TEXTS = {
    "demo": dict(
        help="IFT against the MMD flow and WFR on the IFT paper's 2-D mixture target (particles)",
        description=(
            "The 2-D experiment of Gladin et al., 'Interaction-Force Transport Gradient Flows' "
            "(NeurIPS 2024): particles from N((5, 5), I) flow towards samples of a mixture of "
            "three Gaussians under F = 1/2 MMD^2(mu, target) (Gaussian kernel, width 10). "
            "Three update loops of the authors' code share their position step lr = "
            f"{DEMO_POSITION_LR:g} (the W2 step tau = 2 lr / N, 1 for 100 particles): the MMD flow "
            "(positions only), WFR (then their KL weight step, multiplicative and projected "
            f"onto the simplex, lr_w = {DEMO_WFR_WEIGHT_LR:g}) and IFT (then their projected-"
            f"gradient MMD weight step, lr_w = {DEMO_IFT_WEIGHT_LR:g}: the paper's algorithm). "
            "Writes mmd_decay.png (MMD to the target samples against iteration), particles.png "
            "(snapshots, marker area ~ weight) and summary.json."
        ),
        epilog="Takes about 30 s with the defaults. The paper runs 6000 iterations over 50 seeds: "
               "python examples/paper_2d.py.",
    ),
    "run": dict(
        help="run a TOML config (problem, geometry, method, steps) into a results folder",
        description=(
            "Read CONFIG (a TOML file: [problem], [geometry], [method], [run]; see docs/configs.md "
            "and examples/configs/), check every field before computing anything, run it with "
            "jk.solve and write a results folder: summary.json (the config, library versions, "
            "per-step energies, timings and statuses, the stop reason), steps.csv (one row per step: "
            "time, tau, wall time, status, certificate, solver iterations), trajectory.npz (read it "
            "back with jk.load) and energy.png (energy against time)."
        ),
        epilog=(
            "Checkpoints: with --checkpoint-every N the run replaces checkpoint.npz in the output "
            "folder after every N accepted steps (fixed or adaptive) and at its end, atomically (a "
            "crash leaves the previous checkpoint intact), with the method's and the step-size "
            "controller's state. After an interruption, the same command with --resume continues "
            "from it and gives the same result, bit for bit, as an uninterrupted run with the "
            "same N. "
            "Faults: the folder is checked (writable, free space) and locked before any step; "
            "summary.json says \"status\": \"running\" until the run is complete; a damaged or "
            "altered checkpoint (SHA-256 checksum) is refused by name; Ctrl-C says where the run "
            "stopped and how to resume (SIGTERM too, with exit 143). Exit codes: see 'jko-ift --help'."
        ),
    ),
    "converge": dict(
        help="tau -> 0 convergence study of a config: error table, fitted order, log-log plot",
        description=(
            "Run the problem, geometry and method of CONFIG to the final time of its [run] (tau * "
            "steps, or t_final) once per step size of --taus, measure each run against a reference "
            "(the closed form of a named problem, or a run with a much smaller step) and fit "
            "error ~ C tau^order with a 95% confidence interval. Rows where a known regime spoils "
            "the order are flagged and left out of the fit: 'grid_locking in k/n steps' (k > 0 W2 "
            "steps moved no mass, or far less than the flow would, because tau*alpha*|grad f| is "
            "below the grid spacing), entropic_diffusion (eps / tau "
            "not small against the error), solver_tolerance (the steps' summed error bounds not well "
            "below the error). "
            "Writes summary.json, convergence.csv and convergence.png."),
    ),
    "compare": dict(
        help="one problem through several methods and geometries: table and energy-decay plot",
        description=(
            "Run the problem of CONFIG with the tau and steps of its [run] through every pair of "
            "--methods and --geometries (each pair a variant of the config, checked before any "
            "computation; a geometry takes the alpha, beta, ridge, conserve_mass and kernel of the "
            "config's [geometry] where they apply, a method the options of [method] if it is the "
            "same kind). Writes summary.json, compare.csv (final energy, MMD^2 to the target when "
            "the energy has one, steps, wall time; a failed scheme gets its error message) and "
            "energy_decay.png (the energies overlaid)."),
    ),
    "sweep": dict(
        help="run a grid of parameter values of a config, on Dask distributed or serially",
        description=(
            "Run CONFIG once for every combination of the --param values (each a dotted field of "
            "the config and comma-separated values, read as TOML values), on Dask distributed: a "
            "LocalCluster on this machine by default, or the scheduler at --scheduler. Every case "
            "is checked before any runs. Writes summary.json and sweep.csv: one row per case with "
            "its values, final energy, MMD^2 to the target (when the energy has one), steps, final "
            "time, stop reason, worst certificate, grid-locked steps and wall time."),
        epilog="Example: jko-ift sweep examples/configs/mmd_flow.toml --param run.tau=0.5,0.25 "
               "--param problem.kernel_width=1,2 --workers 4",
    ),
}


# ---------------------------------------------------------------------------- argument types

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _cells(text: str) -> int:
    value = _positive_int(text)
    if value < 4:
        raise argparse.ArgumentTypeError(f"the grid needs at least 4 cells per axis, got {value}")
    return value


# ---------------------------------------------------------------------------- parser

class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help only where it tells something: not after a help
    that already states its default, and not for None (no value) or a flag's False."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``jko-ift`` parser, one subcommand per task."""
    parser = argparse.ArgumentParser(
        prog="jko-ift",
        description="JKO (minimizing-movement) gradient flows of measures: Wasserstein, "
                    "Hellinger, MMD, WFR and Interaction-Force Transport (IFT).",
        epilog="Run 'jko-ift COMMAND --help' for the options of a command.\n\nexit codes:\n"
               + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(commands)
    _add_run(commands)
    _add_converge(commands)
    _add_compare(commands)
    _add_sweep(commands)
    return parser


def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", formatter_class=_DefaultsFormatter,
                               **COMMAND_TEXTS["demo"])
    demo.add_argument("--steps", type=_positive_int, default=DEMO_STEPS, metavar="N",
                      help="iterations of each scheme")
    demo.add_argument("--particles", type=_positive_int, default=DEMO_PARTICLES, metavar="N",
                      help="particles, and as many target samples")
    demo.add_argument("--seed", type=int, default=DEMO_SEED,
                      help="seed of the initial particles and the target samples")
    demo.add_argument("--out", type=Path, default=Path(DEMO_OUT), metavar="DIR",
                      help="output folder (created if missing; files in it are replaced)")
    demo.add_argument("--quiet", action="store_true",
                      help="no progress bars or messages; print only where the results are")
    demo.set_defaults(run=_run_demo)


def _add_run(commands) -> None:
    run = commands.add_parser("run", **COMMAND_TEXTS["run"])
    run.add_argument("config", type=Path, metavar="CONFIG",
                     help="the TOML config file to run (e.g. examples/configs/mmd_flow.toml)")
    run.add_argument("--out", type=Path, default=None, metavar="DIR",
                     help="results folder (created if missing; its files are replaced); default: "
                          "results/<config name> in the current folder")
    run.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N",
                     help="write checkpoint.npz every N steps (default: no checkpoints)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the checkpoint in the results folder (the config must be "
                          "the same; without a checkpoint the run starts from the beginning)")
    _quiet_verbose(run, "each step (time, energy, status, certificate) and checkpoint")
    run.set_defaults(run=_run_run)


def _quiet_verbose(parser, details: str) -> None:
    """--quiet and --verbose: progress bars and messages on stderr, or nothing but the results
    folder on stdout, or details from the 'jko_ift' logger."""
    volume = parser.add_mutually_exclusive_group()
    volume.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar or messages; print only where the results are")
    volume.add_argument("-v", "--verbose", action="store_true",
                        help=f"also log details from the 'jko_ift' logger: {details}")


# ---------------------------------------------------------------------------- commands

def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jko-ift``; returns the exit status (``EXIT_CODES``; 0 on success).

    Every error ends in one message on stderr and its exit code, never in a traceback (``-v``
    prints the traceback too): a failed step 1, bad input 2 (``ValueError``, which covers
    ``ConfigError`` and the results files and folders, and ``OSError``: a file that cannot be read
    or written), Ctrl-C 130 and SIGTERM during a run 143 (with where it stopped and how to resume),
    anything else 3 (a bug).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from .methods import SolverError  # after parsing: --help and bad options stay fast

    prefix = f"jko-ift {args.command}:"
    try:
        return args.run(args)
    except KeyboardInterrupt as interrupt:
        print(f"{prefix} {interrupt or 'interrupted'}", file=sys.stderr)
        return getattr(interrupt, "exit_code", EXIT_INTERRUPTED)
    except SolverError as error:
        return _fail(args, f"{prefix} a JKO step failed: {error}", EXIT_STEP_FAILED)
    except UnicodeDecodeError as error:  # a ValueError that names no file
        return _fail(args, f"{prefix} {getattr(args, 'config', 'a file')} is not UTF-8 text ({error})",
                     EXIT_BAD_INPUT)
    except ValueError as error:
        return _fail(args, f"{prefix} {error}", EXIT_BAD_INPUT)
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        return _fail(args, f"{prefix} {error.strerror or error}{where}", EXIT_BAD_INPUT)
    except Exception as error:  # noqa: BLE001 - the last resort: a message, not a traceback
        return _fail(args, f"{prefix} internal error ({type(error).__name__}: {error}); this is a bug in "
                           f"jko_ift {__version__}: please report it to {REPORT_TO} with the command, the "
                           "config and the output of the same command with -v", EXIT_INTERNAL)


def _fail(args, message: str, code: int) -> int:
    """Print ``message`` (and, with --verbose, the traceback of the error being handled)."""
    if getattr(args, "verbose", False):
        traceback.print_exc(file=sys.stderr)
    print(message, file=sys.stderr)
    return code


def _say(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _run_demo(args) -> int:
    from .demo import run_demo

    runs = run_demo(args.out, args.particles, args.steps, args.seed, say=lambda line: _say(args, line),
                    progress=not args.quiet)
    for label, run in runs.items():
        reached = ", ".join(f"MMD {level:g} at iteration {run['first_below'][str(level)]}"
                            for level in DEMO_LEVELS if run["first_below"][str(level)] is not None)
        _say(args, f"{label}: final MMD {run['final_mmd']:.3g}"
                   + (f"; {reached}" if reached else "") + f" ({run['wall_time']:.1f} s)")
    print(f"results in {Path(args.out).absolute()}")
    return 0


class _BarSafeHandler(logging.Handler):
    """Writes records to the current sys.stderr through ``tqdm.write``, so that a log line does
    not tear a progress bar apart (the bar is redrawn below it)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _configure_logging(args) -> None:
    """Messages of the ``jko_ift`` logger to stderr: warnings only with --quiet, details with
    --verbose. A handler is added only if the logger has none (a notebook may have set one)."""
    logger = logging.getLogger("jko_ift")
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logger.setLevel(level)
    if not logger.handlers:
        handler = _BarSafeHandler()
        handler.setFormatter(logging.Formatter("jko-ift: %(message)s"))
        logger.addHandler(handler)


def _run_run(args) -> int:
    from .config import load_config
    from .runner import run_config

    _configure_logging(args)
    spec = load_config(args.config)  # every field checked before any step is computed
    out = args.out if args.out is not None else Path("results") / args.config.stem
    _say(args, f"running {args.config} ({spec.name or 'explicit problem'}, "
               f"{type(spec.geometry).__name__}, method {spec.method_kind}) into {out}")
    trajectory, summary = run_config(spec, out, resume=args.resume,
                                     checkpoint_every=args.checkpoint_every,
                                     progress=not args.quiet)
    _say(args, f"stopped ({summary['stop_reason']}) after {summary['steps']} steps at "
               f"t = {summary['final_time']:.4g}: energy {summary['final_energy']:.6g} "
               f"(wall time {summary['wall_time']:.1f} s)")
    print(f"results in {Path(out).absolute()}")
    return 0


# ---------------------------------------------------------------------------- studies

def _float_list(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        values.append(_positive_float(part.strip()))
    if len(values) < 2:
        raise argparse.ArgumentTypeError(f"give at least two step sizes separated by commas, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"give names separated by commas, got {text!r}")
    return names


def _param(text: str) -> tuple[str, list]:
    from .studies import parse_value

    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=V1,V2,... (e.g. run.tau=0.1,0.05), got {text!r}")
    return name.strip(), [parse_value(v) for v in values.split(",")]


#: What --verbose adds to each study command.
STUDY_DETAILS = {"converge": "one line per run (tau, steps, error, locked steps, flags)",
                 "compare": "one line per scheme (final energy or failure)",
                 "sweep": "one line per case as it completes (values, final energy, steps)"}


def _study_parser(commands, name: str) -> argparse.ArgumentParser:
    """The parser of the study command ``name`` (its texts from ``COMMAND_TEXTS``), with its CONFIG
    argument."""
    parser = commands.add_parser(name, formatter_class=_DefaultsFormatter,
                                 **COMMAND_TEXTS[name])
    parser.add_argument("config", type=Path, metavar="CONFIG", help="the TOML config (docs/configs.md)")
    return parser


def _study_options(parser, what: str, command) -> None:
    """The options every study command ends with (--out, -q, -v), and its runner ``command``,
    which holds the lock of the results folder while it runs."""
    _common_out(parser, what)
    parser.set_defaults(run=_locked(command))


def _common_out(parser, what: str) -> None:
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help=f"results folder (created if missing; its files are replaced); default: "
                             f"results/<config name>-{what} in the current folder")
    _quiet_verbose(parser, STUDY_DETAILS[what])


def _add_converge(commands) -> None:
    converge = _study_parser(commands, "converge")
    converge.add_argument("--taus", type=_float_list, required=True, metavar="T1,T2,...",
                          help="step sizes, comma-separated (each must divide the final time)")
    converge.add_argument("--refine-grid", action="store_true",
                          help="refine the grid with tau (cells per axis times tau_max / tau, so h ~ tau); "
                               "default: the config's grid for every tau")
    converge.add_argument("--reference", choices=("auto", "closed_form", "fine"), default="auto",
                          help="what errors are measured against: the closed form of a named problem "
                               "(auto uses it when there is one) or a fine run")
    converge.add_argument("--reference-tau", type=_positive_float, default=None, metavar="T",
                          help="step of the fine reference run (default: smallest tau / 8)")
    converge.add_argument("--distance", choices=("mmd", "w2"), default="mmd",
                          help="distance to the fine reference run's final measure")
    _study_options(converge, "converge", _run_converge)


def _add_compare(commands) -> None:
    compare = _study_parser(commands, "compare")
    compare.add_argument("--methods", type=_name_list, default=None, metavar="M1,M2",
                         help="method kinds, comma-separated (conic, entropic, ...; default: the config's)")
    compare.add_argument("--geometries", type=_name_list, default=None, metavar="G1,G2",
                         help="geometry kinds, comma-separated (wasserstein, hellinger, mmd, wfr, ift; "
                              "default: the config's)")
    _study_options(compare, "compare", _run_compare)


def _add_sweep(commands) -> None:
    sweep = _study_parser(commands, "sweep")
    sweep.add_argument("--param", type=_param, action="append", required=True, metavar="FIELD=V1,V2",
                       help="a dotted config field and its values (repeat for a grid), e.g. run.tau=0.1,0.05")
    where = sweep.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="address of a running Dask scheduler (e.g. tcp://host:8786); default: start "
                            "a LocalCluster")
    where.add_argument("--serial", action="store_true", help="run the cases here, one after the other, "
                                                             "without Dask")
    sweep.add_argument("--workers", type=_positive_int, default=2, metavar="N",
                       help="workers of the LocalCluster (one process and thread each)")
    _study_options(sweep, "sweep", _run_sweep)


def _default_out(args, what: str) -> Path:
    """The study's results folder, checked for writability before any compute."""
    out = args.out if args.out is not None else Path("results") / f"{args.config.stem}-{what}"
    return check_writable(out, create=False)


def _locked(command):
    """Run the study ``command(args)`` holding the lock of its results folder (``folder_lock``):
    two studies into one folder cannot interleave their files."""
    what = command.__name__.removeprefix("_run_")

    def locked(args) -> int:
        out = _default_out(args, what)
        existed = out.exists()
        try:
            with folder_lock(out, {"command": what, "config_file": str(args.config)}):
                return command(args)
        except BaseException:
            if not existed:  # the lock made it: a study that failed leaves no empty folder
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise

    locked.__name__ = command.__name__
    return locked


def _run_converge(args) -> int:
    import warnings

    from .config import read_config
    from .plotting import plot_convergence
    from .studies import COLUMNS, config_convergence_study, write_table

    _configure_logging(args)
    out = _default_out(args, "converge")
    _say(args, f"convergence study of {args.config} over tau = {', '.join(f'{t:g}' for t in args.taus)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flags report grid locking and blur per row
        study = config_convergence_study(args.config, args.taus, refine_grid=args.refine_grid,
                                         reference=args.reference, reference_tau=args.reference_tau,
                                         distance=args.distance, progress=not args.quiet)
    with results_folder(out) as folder:
        write_table(folder / "convergence.csv", study.rows, COLUMNS)
        plot_convergence(study, folder / "convergence.png", title=f"{args.config.stem}: convergence in tau")
        write_json_atomic(folder / "summary.json", {
            "command": "converge", "version": __version__, "config_file": str(args.config),
            "config": read_config(args.config)[0], "taus": args.taus, "refine_grid": args.refine_grid,
            **study.summary()})
    _say(args, f"reference: {study.reference}")
    for row in study.rows:
        _say(args, f"  tau {row['tau']:<8g} h {'-' if row['h'] is None else format(row['h'], '.3g'):<8} "
                   f"error {row['error']:.4g}  {', '.join(row['flags'])}")
    if study.order is not None:
        lo, hi = study.order.interval()
        _say(args, f"order {study.order.order:.3f} (95% interval {lo:.3f} to {hi:.3f}) "
                   "over the unflagged rows")
    else:
        _say(args, "no order fitted: fewer than two unflagged rows (see the flags)")
    print(f"results in {out.absolute()}")
    return 0


def _run_compare(args) -> int:
    import warnings

    from .config import ConfigError, load_config, read_config
    from .plotting import plot_energy_decay
    from .studies import COMPARE_COLUMNS, compare_schemes, scheme_configs, write_table

    _configure_logging(args)
    out = _default_out(args, "compare")
    raw = read_config(args.config)[0]
    specs = {label: load_config(config) for label, config in
             scheme_configs(raw, args.methods, args.geometries).items()}  # all checked first
    first = next(iter(specs.values()))
    if first.adaptive:
        raise ConfigError("run.adaptive", "compare runs fixed steps; give [run] tau with steps or t_final")
    _say(args, f"comparing {len(specs)} schemes on {args.config}: {', '.join(specs)}")
    schemes = {label: (spec.make_method, spec.geometry) for label, spec in specs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows, trajectories = compare_schemes(first.energy, first.initial, schemes,
                                             tau=first.run.tau, steps=first.run.steps,
                                             progress=not args.quiet)
    failed = {row["label"]: row["error"] for row in rows if row["error"] is not None}
    with results_folder(out) as folder:
        write_table(folder / "compare.csv", rows, COMPARE_COLUMNS)
        if trajectories or failed:
            plot_energy_decay(trajectories, folder / "energy_decay.png", failed=failed,
                              title=f"{args.config.stem}: tau = {first.run.tau:g}")
        write_json_atomic(folder / "summary.json", {
            "command": "compare", "version": __version__, "config_file": str(args.config), "config": raw,
            "schemes": {label: spec.config for label, spec in specs.items()}, "rows": rows,
            "energies": {label: {"times": tr.times, "energies": tr.energies}
                         for label, tr in trajectories.items()},
            "stats": {label: tr.stats for label, tr in trajectories.items()}})
    for row in rows:  # a failure's whole message: it says why and what to change
        result = (f"final energy {row['final_energy']:.6g}" if row["error"] is None
                  else f"failed: {row['error']}")
        _say(args, f"  {row['label']:<24} {result}  ({row['wall_time']:.2f} s)")
    print(f"results in {out.absolute()}")
    return 0


def _run_sweep(args) -> int:
    from .config import read_config
    from .studies import sweep, write_table

    _configure_logging(args)
    if args.quiet:  # Dask's own messages too: only the results folder is printed
        logging.getLogger("distributed").setLevel(logging.ERROR)
    out = _default_out(args, "sweep")
    params = dict(args.param)
    where = ("serially" if args.serial else f"on the scheduler {args.scheduler}" if args.scheduler
             else f"on a local Dask cluster of {args.workers} workers")
    _say(args, f"sweep of {args.config} over {', '.join(params)} {where}")
    start = time.perf_counter()
    rows = sweep(args.config, params, serial=args.serial, scheduler=args.scheduler, workers=args.workers,
                 progress=not args.quiet)
    with results_folder(out) as folder:
        write_table(folder / "sweep.csv", rows)
        write_json_atomic(folder / "summary.json", {
            "command": "sweep", "version": __version__, "config_file": str(args.config),
            "config": read_config(args.config)[0], "params": params, "where": where, "rows": rows,
            "wall_time": time.perf_counter() - start})
    _say(args, f"{len(rows)} cases in {time.perf_counter() - start:.1f} s")
    print(f"results in {out.absolute()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
