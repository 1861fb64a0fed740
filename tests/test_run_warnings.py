"""Warnings raised inside steps: reported once per cause with their count, kept on the
Trajectory, in trajectory files and in the results folder."""

import dataclasses
import warnings

import numpy as np
import pytest

import jko_ift as jk
from jko_ift.io import load, save_trajectory


class _FlaggedSteps(UserWarning):
    pass


@dataclasses.dataclass
class _WarnsEveryStep:
    """ExplicitEuler that raises the same condition (with a changing number) in every step,
    and a second condition in the third step only."""

    inner: object = dataclasses.field(default_factory=jk.ExplicitEuler)
    calls: int = 0

    def step(self, F, geometry, mu, tau, throw=True):
        self.calls += 1
        warnings.warn(f"condition met, ratio {0.1 * self.calls:.2f}", _FlaggedSteps, stacklevel=2)
        warnings.warn("also met twice in one step", _FlaggedSteps, stacklevel=2)
        if self.calls == 3:
            warnings.warn("third step only", RuntimeWarning, stacklevel=2)
        return self.inner.step(F, geometry, mu, tau, throw=throw)


def _problem():
    rng = np.random.default_rng(0)
    mu0 = jk.Measure(rng.normal(size=(20, 2)), np.full(20, 1 / 20))
    F = jk.Potential(lambda x: 0.5 * (x ** 2).sum(1), lambda x: x)
    return F, jk.Wasserstein(), mu0


def test_each_cause_is_warned_once_with_its_count():
    F, g, mu0 = _problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = jk.solve(F, g, mu0, tau=0.01, steps=5, method=_WarnsEveryStep(), progress=False)
    assert len(caught) == 3  # 5 steps x 2 messages of one shape, one other shape, one RuntimeWarning
    first, twice, third = tr.warnings
    assert (first.category, first.count, first.first_step, first.last_step) == ("_FlaggedSteps", 5, 1, 5)
    assert first.message == "condition met, ratio 0.10"  # the first occurrence
    assert twice.count == 5
    assert (third.category, third.count, third.first_step) == ("RuntimeWarning", 1, 3)
    assert "5 steps, 1 to 5" in str(caught[0].message)


def test_warning_filters_still_apply():
    F, g, mu0 = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeWarning, match="third step only"):
            jk.solve(F, g, mu0, tau=0.01, steps=4, method=_WarnsEveryStep(), progress=False)


def test_a_clean_run_has_no_warnings():
    F, g, mu0 = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr = jk.solve(F, g, mu0, tau=0.01, steps=3, method=jk.ExplicitEuler(), progress=False)
    assert tr.warnings == ()


def test_warnings_round_trip_through_trajectory_files(tmp_path):
    F, g, mu0 = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = jk.solve(F, g, mu0, tau=0.01, steps=3, method=_WarnsEveryStep(), progress=False)
    path = save_trajectory(tmp_path / "run.npz", tr)
    assert load(path).warnings == tr.warnings
