"""Shared test fixtures."""

import logging
import re
from pathlib import Path

import numpy as np
import pytest

EXAMPLE_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"

#: The pure MMD flow on 10 cells: deterministic conic steps of a few milliseconds (the runner's
#: and the CLI's tests).
SMALL_CONFIG = """
[problem]
name = "mmd_flow"
cells = 10

[method]
kind = "conic"

[run]
tau = 0.3
steps = 5
"""


@pytest.fixture(autouse=True)
def _restore_log_level():
    """The CLI sets the level of the 'jko_ift' logger (--quiet, --verbose); put it back."""
    logger = logging.getLogger("jko_ift")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.fixture
def config(tmp_path):
    """A small config file: SMALL_CONFIG (the runner's, the CLI's and the studies' tests)."""
    path = tmp_path / "small.toml"
    path.write_text(SMALL_CONFIG)
    return path


@pytest.fixture
def small_ift_particles():
    """The shipped IFT particle config (examples/configs/ift_particles.toml), shrunk:
    small_ift_particles(particles, samples, seed) -> TOML text of a 4-step run."""
    text = (EXAMPLE_CONFIGS / "ift_particles.toml").read_text()

    def shrink(particles: int, samples: int, seed: int) -> str:
        small = re.sub(r"(?m)^n = 100\b", f"n = {particles}", text)
        small = re.sub(r"(?m)^seed = 0\b", f"seed = {seed}", small)
        small = small.replace('kind = "paper_mixture", n = 100', f'kind = "paper_mixture", n = {samples}')
        small = re.sub(r"(?m)^steps = 200$", "steps = 4", small)
        small = re.sub(r"(?m)^save_at = .*\n", "", small)
        assert small.count(f"n = {particles}") and "steps = 4" in small and "save_at" not in small
        return small

    return shrink


# ------------------------------------------------------- runs compared across callback and resume
def assert_same_run(one, other):
    """Bit for bit: times, energies, measures, and the stats but their costs (wall times, and
    whether a program was compiled: a finished run keeps no compiled program, so a run resumed
    from it compiles its program anew and takes the same steps)."""
    np.testing.assert_array_equal(one.times, other.times)
    np.testing.assert_array_equal(one.energies, other.energies)
    assert len(one.measures) == len(other.measures)
    for mu, nu in zip(one.measures, other.measures, strict=True):
        np.testing.assert_array_equal(mu.points, nu.points)
        np.testing.assert_array_equal(mu.weights, nu.weights)
    strip = [{k: v for k, v in s.items() if "time" not in k and k != "compiled"} for s in one.stats]
    assert strip == [{k: v for k, v in s.items() if "time" not in k and k != "compiled"}
                     for s in other.stats]
    assert one.stop_reason == other.stop_reason


def stop_after(count):
    """A callback that records its reports and stops the run after ``count`` accepted steps."""
    reports = []

    def callback(report):
        reports.append(report)
        return report.step >= count

    return callback, reports
