"""Shared test fixtures."""

import re
from pathlib import Path

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
