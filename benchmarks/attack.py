"""A fixed battery of bad inputs through the API and the CLI, counted by outcome.

Each case runs in a forked child with a time limit and ends in one of:

* clear      a ValueError / jk.SolverError (API) or exit code 1 or 2 with a message
             and no Python traceback (CLI);
* correct    a result: finite, nonnegative weights and the dissipation inequality (API), or exit 0
             with the results written inside the results folder (CLI);
* silent     a result that fails those checks, or exit 0 where the input was bad;
* traceback  any other exception (API), or a traceback / exit code 3 (CLI);
* hang       past the time limit;
* data lost  a file outside the results folder changed (CLI).

Run:  PYTHONPATH=$PWD python benchmarks/attack.py [--only api|cli] [--limit 60]
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np

import jko_ift as jk
from jko_ift.diagnostics import dissipation_slack

CATEGORIES = ("clear", "correct", "silent", "traceback", "hang", "data lost")
CLEAR_ERRORS = (ValueError, jk.SolverError)  # a TypeError is Python's words, not ours


# ------------------------------------------------------------------------------------------------
# API cases
# ------------------------------------------------------------------------------------------------


def _problem():
    grid = jk.Grid([-2.0], [2.0], [12])
    x = grid.points[:, 0]
    mu = grid.measure(np.exp(-((x - 0.5) ** 2)), normalize=True)
    target = grid.measure(np.exp(-(x**2) / 0.5), normalize=True)
    return grid, mu, target


def _energy(target):
    return jk.MMD2(target, jk.Gaussian(0.7)) + 0.3 * jk.Potential(lambda x: 0.5 * (x**2).sum(1), lambda x: x)


METHODS = {
    "conic": lambda: jk.ConicJKO(),
    "entropic": lambda: jk.EntropicJKO(eps=0.05),
    "particle": lambda: jk.ParticleJKO(),
    "splitting": lambda: jk.Splitting(),
    "explicit": lambda: jk.ExplicitEuler(),
}
GEOMETRIES = {
    "W2": jk.Wasserstein,
    "He": jk.Hellinger,
    "MMD": lambda: jk.MMD(jk.Gaussian(0.7)),
    "WFR": lambda: jk.WFR(1.0, 1.0),
    "IFT": lambda: jk.IFT(jk.Gaussian(0.7), 1.0, 1.0),
}


def _check_result(F, mu, result) -> str:
    new = result.measure.weights
    if not (np.all(np.isfinite(new)) and np.all(new >= 0) and np.all(np.isfinite(result.measure.points))):
        return "silent"
    if result.status == "explicit":  # a forward step: the energy must not rise
        return "correct" if F.value(result.measure) <= F.value(mu) + 1e-9 else "silent"
    objective = result.info.get("regularized_objective", result.objective)
    slack = dissipation_slack(F, mu, objective)
    return "correct" if slack >= -1e-5 * max(1.0, abs(F.value(mu))) else "silent"


def api_cases():
    """(name, thunk) pairs; a thunk returns (F, mu, result) or raises."""
    cases = []

    def add(name, thunk):
        cases.append((name, thunk))

    def step(F=None, g=None, mu=None, tau=0.1, method=None, **kw):
        _, mu0, target = _problem()
        F = _energy(target) if F is None else F
        mu = mu0 if mu is None else mu
        return F, mu, jk.jko_step(F, g if g is not None else jk.Wasserstein(), mu, tau, method=method, **kw)

    for mname, make in METHODS.items():
        for gname in ("W2", "WFR"):
            g = GEOMETRIES[gname]
            for tau in (0.0, -1.0, np.nan, np.inf, 1e300, 1e-300, "0.1", True, None, 1j):
                add(
                    f"{mname}/{gname}/tau={tau!r}",
                    lambda make=make, g=g, tau=tau: step(g=g(), tau=tau, method=make()),
                )
        for bad_F in (None, "entropy", 3, lambda x: x):
            add(f"{mname}/F={bad_F!r}", lambda make=make, bad_F=bad_F: step(F=bad_F or "none", method=make()))
        for bad_g in ("W2", 3, jk.Gaussian(1.0)):
            add(f"{mname}/geometry={bad_g!r}", lambda make=make, bad_g=bad_g: step(g=bad_g, method=make()))
        grid2 = jk.Grid([-1.0, -1.0], [1.0, 1.0], [4, 4])
        add(
            f"{mname}/dims mismatch",
            lambda make=make, grid2=grid2: step(mu=grid2.measure(np.ones(16), normalize=True), method=make()),
        )
        add(
            f"{mname}/nan potential",
            lambda make=make: step(
                F=jk.Potential(lambda x: np.full(len(x), np.nan), lambda x: np.zeros_like(x)), method=make()
            ),
        )
        add(
            f"{mname}/potential wrong shape",
            lambda make=make: step(
                F=jk.Potential(lambda x: np.zeros((len(x), 2)), lambda x: np.zeros_like(x)), method=make()
            ),
        )
        add(
            f"{mname}/one point",
            lambda make=make: step(mu=jk.Measure(np.array([[0.3]]), np.array([1.0])), method=make()),
        )
        add(f"{mname}/solve steps=-1", lambda make=make: _solve(make(), steps=-1))
        add(f"{mname}/solve steps=2.5", lambda make=make: _solve(make(), steps=2.5))
        add(f"{mname}/solve t_final=-1", lambda make=make: _solve(make(), steps=None, t_final=-1.0))
        add(f"{mname}/solve t_final=nan", lambda make=make: _solve(make(), steps=None, t_final=np.nan))
        add(f"{mname}/solve stop_energy='x'", lambda make=make: _solve(make(), stop_energy="x"))
        add(f"{mname}/solve callback=3", lambda make=make: _solve(make(), callback=3))
    for weights in (
        [np.nan] * 12,
        [np.inf] + [1.0] * 11,
        [-1.0] + [1.0] * 11,
        [0.0] * 12,
        [1j] * 12,
        [1.0] * 11,
        [],
        [[1.0] * 12],
    ):
        add(
            f"Measure weights={str(weights)[:20]}",
            lambda w=weights: step(mu=jk.Measure(_problem()[0].points, np.array(w))),
        )
    for points in (np.full((12, 1), np.nan), np.zeros((0, 1)), np.zeros(12)):
        add(f"Measure points={points.shape}", lambda p=points: step(mu=jk.Measure(p, np.ones(12))))
    for method in ("conic", object(), jk.ConicJKO, 3):
        add(f"method={method!r}", lambda m=method: step(method=m))
    options = [
        dict(solver="FOO"),
        dict(solver=3),
        dict(solver_options={"bogus": 1}),
        dict(solver_options={"max_iter": "x"}),
        dict(gap_tol=-1.0),
        dict(gap_tol=np.nan),
        dict(gap_tol="x"),
        dict(radius=-1.0),
        dict(radius=np.nan),
        dict(cache_size=-1),
        dict(solver="SCS", solver_options={"write_data_filename": "x.bin"}),
    ]
    for kw in options:
        add(f"ConicJKO({kw})", lambda kw=kw: step(method=jk.ConicJKO(**kw)))
    for kw in (
        dict(eps=0.0),
        dict(eps=-1.0),
        dict(eps=np.nan),
        dict(eps="x"),
        dict(max_iter=-5),
        dict(eps=1e-8),
    ):
        add(f"EntropicJKO({kw})", lambda kw=kw: step(method=jk.EntropicJKO(**kw)))
    for kw in (dict(max_iter=-5), dict(noise_steps=2.5), dict(noise=-1.0)):
        add(f"Splitting({kw})", lambda kw=kw: step(method=jk.Splitting(**kw)))
        add(f"ExplicitEuler({kw})", lambda kw=kw: step(method=jk.ExplicitEuler(**kw)))
    return cases


def _solve(method, steps=3, t_final=None, **kw):
    _, mu, target = _problem()
    F = _energy(target)
    run = jk.solve(
        F, jk.Wasserstein(), mu, 0.1, steps=steps, t_final=t_final, method=method, progress=False, **kw
    )
    # the run's end, checked as a step that may not raise the energy
    return F, mu, types.SimpleNamespace(measure=run.final, status="explicit", info={})


def _run_api_case(thunk, queue):
    warnings.simplefilter("ignore")
    try:
        F, mu, result = thunk()
        queue.put(_check_result(F, mu, result))
    except np.linalg.LinAlgError as error:  # a ValueError, but numpy's words, not ours
        queue.put(f"traceback:LinAlgError: {str(error)[:120]}")
    except CLEAR_ERRORS as error:
        queue.put("clear" if str(error) else "traceback")
    except BaseException as error:  # noqa: BLE001 - counted
        queue.put(f"traceback:{type(error).__name__}: {str(error)[:120]}")


def run_api(limit: float, verbose: bool):
    counts, notes = collections.Counter(), []
    ctx = mp.get_context("fork")
    for name, thunk in api_cases():
        queue = ctx.Queue()
        child = ctx.Process(target=_run_api_case, args=(thunk, queue))
        child.start()
        child.join(limit)
        if child.is_alive():
            child.kill()
            child.join()
            outcome = "hang"
        else:
            outcome = queue.get() if not queue.empty() else "traceback:crash"
        category = outcome.split(":")[0]
        counts[category] += 1
        if category in ("silent", "traceback", "hang"):
            notes.append(f"{name}: {outcome}")
        if verbose:
            print(f"{category:10s} {name}", flush=True)
    return counts, notes


# ------------------------------------------------------------------------------------------------
# CLI cases: a small valid config, one field changed at a time
# ------------------------------------------------------------------------------------------------

BASE = {
    "problem.support": "lo = [-3.0]\nhi = [3.0]\nshape = [16]",
    "problem.initial": 'kind = "gaussian"\nmean = [1.0]\ncov = 1.0',
    "problem.energy": 'kind = "potential_quadratic"\nkappa = 1.0',
    "geometry": 'kind = "wasserstein"',
    "method": 'kind = "conic"',
    "run": "tau = 0.1\nsteps = 2",
}

CLI_CHANGES = [
    ("valid", {}),
    ("shape huge", {"problem.support": "lo = [-3.0]\nhi = [3.0]\nshape = [1000000000]"}),
    ("shape 2d huge", {"problem.support": "lo = [-3.0, -3.0]\nhi = [3.0, 3.0]\nshape = [100000, 100000]"}),
    ("shape 0", {"problem.support": "lo = [-3.0]\nhi = [3.0]\nshape = [0]"}),
    ("lo > hi", {"problem.support": "lo = [3.0]\nhi = [-3.0]\nshape = [16]"}),
    ("nan lo", {"problem.support": "lo = [nan]\nhi = [3.0]\nshape = [16]"}),
    ("mean wrong dim", {"problem.initial": 'kind = "gaussian"\nmean = [1.0, 2.0]\ncov = 1.0'}),
    ("cov negative", {"problem.initial": 'kind = "gaussian"\nmean = [1.0]\ncov = -1.0'}),
    ("unknown energy", {"problem.energy": 'kind = "nope"'}),
    ("unknown geometry", {"geometry": 'kind = "nope"'}),
    ("geometry list", {"geometry": 'kind = ["wasserstein"]'}),
    ("unknown method", {"method": 'kind = "nope"'}),
    ("solver FOO", {"method": 'kind = "conic"\nsolver = "FOO"'}),
    ("gap_tol -1", {"method": 'kind = "conic"\ngap_tol = -1.0'}),
    ("gap_tol nan", {"method": 'kind = "conic"\ngap_tol = nan'}),
    ("gap_tol str", {"method": 'kind = "conic"\ngap_tol = "x"'}),
    ("cache_size -1", {"method": 'kind = "conic"\ncache_size = -1'}),
    (
        "SCS write file",
        {
            "method": 'kind = "conic"\nsolver = "SCS"\n'
            'solver_options = {write_data_filename = "../victim.txt"}'
        },
    ),
    (
        "SCS log file",
        {"method": 'kind = "conic"\nsolver = "SCS"\nsolver_options = {log_csv_filename = "../victim.txt"}'},
    ),
    ("clarabel bogus", {"method": 'kind = "conic"\nsolver_options = {bogus = 1}'}),
    ("entropic eps 0", {"method": 'kind = "entropic"\neps = 0.0'}),
    ("entropic eps 1e-8", {"method": 'kind = "entropic"\neps = 1e-8'}),
    ("tau 0", {"run": "tau = 0.0\nsteps = 2"}),
    ("tau -1", {"run": "tau = -1.0\nsteps = 2"}),
    ("tau nan", {"run": "tau = nan\nsteps = 2"}),
    ("tau str", {"run": 'tau = "x"\nsteps = 2'}),
    ("tau bool", {"run": "tau = true\nsteps = 2"}),
    ("tau tiny t_final huge", {"run": "tau = 1e-300\nt_final = 1e10"}),
    ("steps -1", {"run": "tau = 0.1\nsteps = -1"}),
    ("steps 2.5", {"run": "tau = 0.1\nsteps = 2.5"}),
    ("steps 10**12", {"run": "tau = 0.1\nsteps = 1000000000000"}),
    ("t_final -1", {"run": "tau = 0.1\nt_final = -1.0"}),
    ("unknown run key", {"run": "tau = 0.1\nsteps = 2\nstpes = 3"}),
    ("missing run", {"run": None}),
    ("missing geometry", {"geometry": None}),
]
#: Valid configs among the cases (eps = 1e-8 is small but allowed): exit 0 is correct.
VALID_CLI_CASES = ("valid", "entropic eps 1e-8")
CLI_RAW = [
    ("not toml", "this is [ not toml"),
    ("empty file", ""),
    ("nested brackets", "a = " + "[" * 100000),
    ("non utf8", b"\xff\xfe\x00bad".decode("latin-1")),
]


def _config_text(changes: dict) -> str:
    sections = {**BASE, **changes}
    return "\n".join(f"[{name}]\n{body}\n" for name, body in sections.items() if body is not None)


def _cli_case(root: Path, name: str, text: str, limit: float, extra=()) -> str:
    case = root / name.replace(" ", "_")
    case.mkdir()
    config = case / "config.toml"
    config.write_bytes(text.encode("latin-1") if name == "non utf8" else text.encode())
    victim = root / "victim.txt"
    victim.write_text("keep me")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "out" not in p.parts}
    env = {**os.environ, "PYTHONPATH": str(Path(jk.__file__).parents[1])}
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "jko_ift.cli",
                "run",
                str(config),
                "--out",
                str(case / "out"),
                "-q",
                *extra,
            ],
            cwd=case,
            env=env,
            capture_output=True,
            text=True,
            timeout=limit,
        )
    except subprocess.TimeoutExpired:
        return "hang"
    changed = [p for p, t in before.items() if not p.exists() or p.stat().st_mtime_ns != t]
    new_outside = [p for p in root.rglob("*") if p.is_file() and "out" not in p.parts and p not in before]
    if changed or new_outside or victim.read_text() != "keep me":
        return "data lost"
    if "Traceback (most recent call last)" in proc.stderr or proc.returncode not in (0, 1, 2):
        return f"traceback:rc={proc.returncode} {proc.stderr.strip().splitlines()[-1:]}"
    if proc.returncode == 0:
        return "correct" if name in VALID_CLI_CASES else "silent"
    return "clear" if proc.stderr.strip() else "traceback:no message"


def run_cli(limit: float, verbose: bool):
    counts, notes = collections.Counter(), []
    cases = [(name, _config_text(changes)) for name, changes in CLI_CHANGES] + CLI_RAW
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in cases:
            outcome = _cli_case(Path(tmp), name, text, limit)
            category = outcome.split(":")[0]
            counts[category] += 1
            if category not in ("clear", "correct"):
                notes.append(f"{name}: {outcome}")
            if verbose:
                print(f"{category:10s} {name}", flush=True)
    return counts, notes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("api", "cli"))
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per case")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    for part, runner in (("api", run_api), ("cli", run_cli)):
        if args.only not in (None, part):
            continue
        counts, notes = runner(args.limit, args.verbose)
        total = sum(counts.values())
        print(f"{part}: {total} cases: " + ", ".join(f"{c} {counts.get(c, 0)}" for c in CATEGORIES))
        for note in notes:
            print("  ", note)


if __name__ == "__main__":
    main()
