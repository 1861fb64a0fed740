"""The driver: trajectories, step counts, stats, failures."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import assert_same_run, stop_after

import jko_ift as jk
from jko_ift.methods.base import MethodState
from jko_ift.solve import RunState

GRID = jk.Grid([-3], [3], [40])
MU = GRID.measure(lambda x: np.exp(-((x[:, 0] - 1) ** 2)), normalize=True)
TARGET = GRID.measure(lambda x: np.exp(-(x[:, 0] ** 2)), normalize=True)
F = jk.KL(TARGET)


def test_trajectory_records_every_step():
    tr = jk.solve(F, jk.Hellinger(), MU, tau=0.25, t_final=1.0, progress=False)
    assert len(tr) == 5
    np.testing.assert_allclose(tr.times, [0, 0.25, 0.5, 0.75, 1.0])
    assert tr.final is tr.measures[-1]
    assert np.all(np.diff(tr.energies) < 0)
    for k, stats in enumerate(tr.stats):
        assert stats["step"] == k + 1
        assert stats["status"] == "optimal"
        assert stats["wall_time"] > 0
        assert stats["certificate"] < 1e-6
        assert stats["dissipation_slack"] >= -1e-9
        assert tr.energies[k + 1] + stats["distance_sq"] / 0.5 <= tr.energies[k] + 1e-9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({}, "exactly one of steps"), ({"steps": 2, "t_final": 1.0}, "exactly one of steps"),
     ({"steps": 0}, "positive integer"), ({"steps": 1.5}, "positive integer"),
     ({"t_final": -1.0}, "positive time")],
)
def test_step_count_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jk.solve(F, jk.Hellinger(), MU, tau=0.1, progress=False, **kwargs)


def test_failed_step_ends_the_run_with_its_status_when_not_throwing():
    method = jk.ConicJKO(solver="SCS", solver_options={"max_iters": 2})
    tr = jk.solve(F, jk.Hellinger(), MU, tau=0.1, steps=3, method=method, progress=False, throw=False)
    assert len(tr) == 1 and len(tr.stats) == 1
    assert tr.stats[0]["status"] != "optimal"
    with pytest.raises(jk.SolverError):
        jk.solve(F, jk.Hellinger(), MU, tau=0.1, steps=3, method=method, progress=False)


def test_method_must_have_a_step():
    with pytest.raises(ValueError, match="method must be"):
        jk.jko_step(F, jk.Hellinger(), MU, 0.1, method="conic")


# ---------------------------------------------------------------------------- callback and resume
PARTICLE_KERNEL = jk.Gaussian(1.0)
PARTICLE_TARGET = jk.Measure(np.random.default_rng(1).normal(size=(12, 2)), np.full(12, 1 / 12))
PARTICLE_MU = jk.Measure(np.random.default_rng(2).normal(size=(12, 2)) + 1.0, np.full(12, 1 / 12))
PARTICLE_F = jk.MMD2(PARTICLE_TARGET, PARTICLE_KERNEL)


def test_callback_is_called_once_per_accepted_step():
    reports = []
    tr = jk.solve(F, jk.Hellinger(), MU, tau=0.25, steps=4, progress=False, callback=reports.append)
    assert [r.step for r in reports] == [1, 2, 3, 4] and [r.steps for r in reports] == [4] * 4
    np.testing.assert_array_equal([r.t for r in reports], tr.times[1:])
    np.testing.assert_array_equal([r.energy for r in reports], tr.energies[1:])
    assert [r.record for r in reports] == tr.stats and reports[-1].measure is tr.final
    snapshot = reports[1].trajectory()
    assert snapshot.stop_reason == "running" and len(snapshot) == 3 and snapshot.state.t == 0.5
    with pytest.raises(ValueError, match="callback must be a callable"):
        jk.solve(F, jk.Hellinger(), MU, tau=0.25, steps=4, progress=False, callback=3)


def test_a_callback_can_stop_the_run_where_it_stands():
    callback, reports = stop_after(2)
    tr = jk.solve(F, jk.Hellinger(), MU, tau=0.25, steps=6, progress=False, callback=callback,
                  save_at=[1.5])
    assert tr.stop_reason == "callback" and len(reports) == 2
    np.testing.assert_allclose(tr.times, [0.0, 0.5])  # the last state is kept, off the save times
    assert tr.final is reports[-1].measure and tr.state.extra_save


@pytest.mark.parametrize("save_at", [None, [0.75, 1.5]])
@pytest.mark.parametrize("how", ["callback", "snapshot", "shorter run"])
def test_a_fixed_run_resumed_is_the_run_in_one(how, save_at):
    geometry = jk.Hellinger()  # one problem: the method's state holds its compiled program

    def run(**kwargs):
        kwargs.setdefault("save_at", save_at)
        return jk.solve(F, geometry, MU, tau=0.25, progress=False, **kwargs)

    whole = run(steps=6)
    if how == "callback":
        first = run(steps=6, callback=stop_after(3)[0])
    elif how == "snapshot":
        callback, reports = stop_after(10)
        run(steps=6, callback=callback)
        first = reports[2].trajectory()
    else:
        first = run(steps=3, save_at=None if save_at is None else [0.75])
    assert_same_run(run(steps=6, resume=first), whole)


def test_explicit_noise_resumes_bit_for_bit():
    """The random generator and the step counter (noise_steps) are the run's state."""
    def run(**kwargs):
        return jk.solve(PARTICLE_F, jk.Wasserstein(), PARTICLE_MU, tau=0.1, steps=8,
                        method=jk.ExplicitEuler(noise=0.3, noise_steps=6, seed=4), progress=False,
                        **kwargs)

    whole = run()
    first = run(callback=stop_after(5)[0])
    assert_same_run(run(resume=first), whole)
    again = run(resume=first)  # resuming twice from one trajectory: its state was not consumed
    assert_same_run(again, whole)


def test_a_trajectory_without_state_resumes_from_its_last_measure():
    whole = jk.solve(F, jk.Hellinger(), MU, tau=0.25, steps=4, progress=False)
    first = jk.solve(F, jk.Hellinger(), MU, tau=0.25, steps=2, progress=False)
    resumed = jk.solve(F, jk.Hellinger(), MU, tau=0.25, steps=4, progress=False,
                       resume=dataclasses.replace(first, state=None))
    np.testing.assert_allclose(resumed.times, whole.times)
    # fresh method state (a program compiled anew): equal to the solver's accuracy, not bit for bit
    np.testing.assert_allclose(resumed.energies, whole.energies, rtol=1e-4)
    assert [s["step"] for s in resumed.stats] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="resume must be a jk.Trajectory"):
        jk.solve(F, jk.Hellinger(), MU, tau=0.25, steps=4, progress=False, resume=[MU])


def test_a_finished_run_keeps_no_cache_and_still_resumes_bit_for_bit():
    """A finished trajectory keeps what resuming needs (counters, generator, the warm starts that
    decide the steps: the conic program's radius and variable scale), not the compiled programs
    (megabytes on a fine grid)."""
    geometry = jk.Hellinger()  # one problem (the warm starts are kept per energy and geometry)

    def run(**kwargs):
        return jk.solve(F, geometry, MU, tau=0.25, steps=6, progress=False, **kwargs)

    whole = run()
    first = run(callback=stop_after(3)[0])
    for finished in (whole, first):
        assert finished.state.method.cache == {} and finished.state.method.warm["scales"]
    assert_same_run(run(resume=first), whole)
    nested = MethodState(2, None, {"inner": MethodState(cache={"programs": 1})}, {"gibbs": 1})
    light = nested.without_cache()
    assert light.cache == {} and light.warm["inner"].cache == {} and light.steps == 2
    assert nested.cache and nested.warm["inner"].cache  # the state itself is left as it was


def test_a_run_state_written_to_a_file_resumes_bit_for_bit():
    """RunState.to_record is JSON and arrays; the generator continues where it stood."""
    def run(**kwargs):
        return jk.solve(PARTICLE_F, jk.Wasserstein(), PARTICLE_MU, tau=0.1, steps=8,
                        method=jk.ExplicitEuler(noise=0.3, seed=4), progress=False, **kwargs)

    whole = run()
    first = run(callback=stop_after(5)[0])
    meta, arrays = first.state.to_record()
    state = RunState.from_record(json.loads(json.dumps(meta)), dict(arrays), first.final)
    assert state.method.steps == 5 and state.controller.accepted == 5
    assert_same_run(run(resume=dataclasses.replace(first, state=state)), whole)
