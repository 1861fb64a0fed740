"""Sphinx configuration of the jko_ift docs: ``sphinx-build -W -b html docs docs/_build/html``.

The Markdown pages are read by MyST; the API reference comes from the docstrings (autodoc,
napoleon, autosummary), grouped by ``docs/_ext/jko_docs.py``, which also writes the pages of
the example scripts (``docs/scripts/``, not run) and of the notebooks (``docs/notebooks/``), and
points MathJax at a local copy (no network needed to read the math). The gallery
(``docs/gallery/``) is sphinx-gallery's: the scripts ``examples/gallery/plot_*.py`` are run at
each build, at sizes that keep the build within a minute or two.
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # the package itself, also when it is not installed

import jko_ift  # noqa: E402

project = "jko_ift"
author = "the jko_ift authors"
copyright = "the jko_ift authors"
release = version = jko_ift.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
    "jko_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "gallery/*.ipynb", "gallery/*.py",
                    "gallery/*.zip", "gallery/*.codeobj.json"]
templates_path = []


# MyST: $...$ and $$...$$ math as in docs/theory.md, \begin{aligned} blocks, anchors for
# links to headings (page.md#section).
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# API reference
autosummary_generate = False  # the pages are docs/api/*.rst; jko_docs inserts the entries
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = True
add_module_names = False

# The public names of jko_ift.__all__ by page; a name goes to the first group that lists it,
# else (exceptions and warnings aside, which go to "errors") to the first group listing a
# prefix of its module. See docs/_ext/jko_docs.py.
jko_api_package = "jko_ift"
jko_api_groups = {
    "measures": ["jko_ift.measures"],
    "kernels": ["jko_ift.kernels"],
    "energies": ["jko_ift.energies"],
    "geometries": ["jko_ift.geometries"],
    "methods": ["jko_ift.methods"],
    "solve": ["StepResult", "jko_ift.solve", "jko_ift.control"],
    "diagnostics": ["jko_ift.diagnostics"],
    "io": ["jko_ift.io"],
    "errors": [],
}

# Gallery: the figures of each example in docs/figures/, as glob patterns (default:
# <stem>.png and <stem>_*.png).
jko_gallery_examples = "../examples"
jko_gallery_figures = {
    "adaptive_steps": ["adaptive_*.png"],
    "weight_step_exact_vs_pg": ["weight_step_*.png"],
}

# Gallery: each examples/gallery/plot_*.py is run at build time and its figures captured.
sphinx_gallery_conf = {
    "examples_dirs": "../examples/gallery",
    "gallery_dirs": "gallery",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "show_memory": False,
    "show_signature": False,
    "min_reported_time": 1,
    "write_computation_times": False,  # its pages load a table script from the network
}

html_theme = "alabaster"
html_title = f"jko_ift {release}"
html_theme_options = {
    "description": "Gradient flows of measures: JKO steps in W2, Hellinger, MMD, WFR and IFT",
    "fixed_sidebar": True,
    "page_width": "min(1400px, 96vw)",
    "sidebar_width": "240px",
}
html_static_path = ["_static"]
html_css_files = ["jko_ift.css"]
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
smartquotes = False  # keep --options and "quotes" of the command line as written
