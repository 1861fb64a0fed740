"""The notebooks of examples/ run: their code cells are executed in order, in one namespace,
with plain ``exec`` (no Jupyter kernel needed), at the notebooks' own small sizes.

``python tests/test_notebooks.py`` also stores the outputs (printed text, figures as PNG) back
into the notebooks, for the docs page that shows them.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import sys
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def _source(cell: dict) -> str:
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def _figure_outputs() -> list[dict]:
    outputs = []
    for number in plt.get_fignums():
        buffer = io.BytesIO()
        plt.figure(number).savefig(buffer, format="png", dpi=80)
        outputs.append({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
                                 "text/plain": "<Figure>"}})
    plt.close("all")
    return outputs


def execute(path: Path) -> dict:
    """Run the code cells of the notebook at ``path``; return it with the cells' outputs."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    namespace: dict = {"__name__": "__main__"}
    count = 0
    show = plt.show
    plt.show = lambda *args, **kwargs: None  # figures are collected after each cell
    try:
        for cell in notebook["cells"]:
            if cell["cell_type"] != "code":
                continue
            count += 1
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                exec(compile(_source(cell), f"{path.name}[cell {count}]", "exec"), namespace)
            outputs = [{"output_type": "stream", "name": "stdout", "text": stdout.getvalue()}] \
                if stdout.getvalue() else []
            cell["outputs"] = outputs + _figure_outputs()
            cell["execution_count"] = count
    finally:
        plt.show = show
        plt.close("all")
    return notebook


def test_there_is_a_notebook():
    assert any(p.name == "compare_schemes.ipynb" for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    notebook = execute(path)
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["execution_count"] for cell in code)
    images = sum("image/png" in out.get("data", {}) for cell in code for out in cell["outputs"])
    assert images >= 1, "the notebook draws no figure"


if __name__ == "__main__":
    for path in NOTEBOOKS if len(sys.argv) < 2 else [Path(p) for p in sys.argv[1:]]:
        executed = execute(path)
        path.write_text(json.dumps(executed, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote the outputs of {path}")
