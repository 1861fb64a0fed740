"""The Examples sections of the API docstrings run (doctest), and the documented public names
carry the numpydoc sections the API pages show."""

from __future__ import annotations

import doctest
import importlib
import warnings

import numpy as np
import pytest

import jko_ift as jk

MODULES = ["jko_ift.measures", "jko_ift.kernels", "jko_ift.energies", "jko_ift.geometries",
           "jko_ift.methods.conic", "jko_ift.methods.entropic", "jko_ift.methods.particle",
           "jko_ift.methods.splitting", "jko_ift.methods.explicit", "jko_ift.methods.back_and_forth",
           "jko_ift.solve"]

#: Public names whose docstrings follow numpydoc with an Examples section.
DOCUMENTED = ["Measure", "Grid", "Gaussian", "IMQ", "Laplace", "EnergyKernel", "Energy", "Potential",
              "Interaction", "Entropy", "PorousMedium", "KL", "MMD2", "Wasserstein", "Hellinger",
              "MMD", "InfConvolution", "WFR", "IFT", "ConicJKO", "EntropicJKO", "ParticleJKO",
              "Splitting", "ExplicitEuler", "BackAndForthJKO", "jko_step", "solve"]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    # numpydoc's convention: the examples assume ``import numpy as np`` (and here ``jko_ift as jk``)
    tests = [t for t in finder.find(module, extraglobs={"np": np, "jk": jk}) if t.examples]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example must not warn
        for test in tests:
            runner.run(test, out=lambda text: None)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) of {name} failed; run " \
        f"pytest --doctest-modules {name.replace('.', '/')}.py to see them"


@pytest.mark.parametrize("name", DOCUMENTED)
def test_numpydoc_sections(name):
    doc = getattr(jk, name).__doc__
    assert "Examples\n    --------" in doc, f"{name} has no Examples section"
    assert "Notes\n    -----" in doc or "Parameters\n    ----------" in doc, name
    assert "mu^{k+1} = argmin" not in doc  # the math is in LaTeX, not ASCII


def test_index_snippet_runs():
    """The code on the docs' front page defines what it uses and runs (2 of its 10 steps)."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "index.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    assert "steps=10)" in code
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jk.GridLockingWarning)  # the coarse grid of the snippet
        exec(code.replace("steps=10)", "steps=2, progress=False)"), namespace)
    trajectory = namespace["tr"]
    assert trajectory.stop_reason == "steps" and trajectory.energies[-1] < trajectory.energies[0]
