"""The driver: trajectories, step counts, stats, failures."""

import numpy as np
import pytest

import jko_ift as jk

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
