"""The layout of DESIGN.md section 4: data flows one way, and no module imports one above it.

Every module of the package is parsed with ``ast`` (nothing is imported): each ``import`` and
``from ... import``, at the top of the module or inside a function, is an edge from the module to
the module it names (``from .methods import grid_motion`` names ``jko_ift.methods.grid_motion``;
``from .io import load`` names ``jko_ift.io``). The table ``LAYERS`` orders the rooms from the bottom
up; a module may import modules of its own layer or of layers below it, and the edges must have no
cycle.
"""

import ast
from pathlib import Path

PACKAGE = "jko_ift"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: The rooms from the bottom up (DESIGN.md section 4), one tuple per layer; a name stands for the
#: module ``jko_ift.<name>`` and every module below it (``methods`` is the whole subpackage), and
#: ``""`` for the package's ``__init__``. Where a room sits is decided by what it needs:
LAYERS = (
    # how results show themselves (text and HTML summaries, tables): imports nothing of the package,
    # so that StepResult (methods) and Trajectory (solve) can use it
    ("display",),
    ("measures",),  # points and weights: imports nothing of the package
    ("kernels",),  # kernel values and Gram blocks on points
    # the kernel sums on PyTorch tensors (array API), by KeOps where installed, kernels on a device
    ("keops", "backends"),
    ("energies", "geometries"),  # what decreases and how mass may move: measures and kernels only
    # One module per family, with their shared pieces (methods/base.py: StepResult and the checks
    # of a step's input; methods/options.py: the checks of a method's options, which control.py
    # uses too; methods/grid_motion.py, gibbs.py, ...): they turn (F, geometry, mu, tau) into a
    # StepResult and know nothing of the driver.
    ("methods",),
    # Distances and checks between measures. Above the methods: the Hellinger-Kantorovich distance
    # is computed by the entropic method's scaling engine; below control and solve, which use the
    # distances (step-size control) and the dissipation check.
    ("diagnostics",),
    # Named problems: energies, geometries, closed forms, and the methods of the paper's schemes
    # (paper_scheme); below solve, so that a problem never runs a flow (running over seeds is a
    # study: studies.run_over_seeds).
    ("problems",),
    ("control",),  # step-size controllers: read the geometry and the diagnostics' distances
    ("run_warnings",),  # the record of a run's warnings, kept by solve and written by io
    ("solve",),  # jko_step, solve, Trajectory: the driver
    # Reading a config into the objects above (a named problem, a method, a controller) and its
    # RunSpec.solve.
    ("config",),
    ("io",),  # files: JSON, atomic writes, trajectory files (load builds a Trajectory), folders
    ("plotting",),  # the figures, written through io's atomic files
    ("studies",),  # many runs: convergence in tau, comparisons, sweeps (configs), seeds; tables by io
    # The curated public names: everything above up to io (jk.load). runner, demo and cli read its
    # __version__, so it sits below them.
    ("",),
    ("runner",),  # one config into a results folder: config, solve, io, plotting
    ("demo",),  # the demo of the command line: problems, solve, io, plotting
    ("cli",),  # the command line: parses, then calls the above
)


#: The only imports against the flow, each (importer, imported) -> why it is safe. Each must be made
#: inside a function (checked below), so it runs after both modules are loaded and adds no cycle at
#: import time; the checks of the flow and of cycles leave these edges out.
LAZY_UPWARD = {
    # Trajectory.plot() draws with plotting.draw_energy, which reads the trajectory by its attributes
    # (plotting does not import solve): the import happens when a user draws, not when solve loads.
    ("jko_ift.solve", "jko_ift.plotting"): "Trajectory.plot() imports plotting lazily",
    # Kernel.apply / grad_sum / __call__ hand PyTorch tensors to the array-API sums, which build on
    # kernels' constants and kernel classes: imported on the first tensor, never by NumPy sums.
    ("jko_ift.kernels", "jko_ift.backends"): "kernels imports backends lazily, for tensors only",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The index in ``LAYERS`` of ``module`` (its longest listed prefix), or None if unlisted."""
    relative = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    best, index = -1, None
    for k, names in enumerate(LAYERS):
        for name in names:
            inside = relative == name or (name != "" and relative.startswith(name + "."))
            if inside and len(name) > best:
                best, index = len(name), k
    return index


def imported_modules(module: str, path: Path) -> dict[str, int]:
    """The package's modules that ``module`` imports (anywhere in it) -> the line of the first."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # a name that is a module of the package is that module; any other name is an
            # attribute of the module it comes from
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                while target not in MODULES:  # import jko_ift.methods.conic.x: the module part
                    target = target.rsplit(".", 1)[0]
                if target != module:
                    found.setdefault(target, node.lineno)
    return found


ALL_IMPORTS = {module: imported_modules(module, path) for module, path in MODULES.items()}
#: The edges that the flow and the cycle checks judge: all but the declared lazy ones.
IMPORTS = {module: {target: line for target, line in targets.items()
                    if (module, target) not in LAZY_UPWARD}
           for module, targets in ALL_IMPORTS.items()}


def test_the_lazy_exceptions_are_lazy_and_still_needed():
    """Each declared exception exists and is an import inside a function, never at module level."""
    for (module, target), why in LAZY_UPWARD.items():
        assert target in ALL_IMPORTS[module], f"stale LAZY_UPWARD entry {module} -> {target} ({why})"
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        top_level = {node.lineno for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
        line = ALL_IMPORTS[module][target]
        assert line not in top_level, f"{module}:{line} imports {target} at module level; {why} only"


def test_the_table_places_every_module_of_the_package():
    unplaced = sorted(module for module in MODULES if layer_of(module) is None)
    assert not unplaced, (f"modules missing from LAYERS in tests/test_layout.py: {unplaced}; add each to "
                          "the layer of what it holds (DESIGN.md section 4)")
    listed = {name for names in LAYERS for name in names}
    stale = sorted(name for name in listed
                   if not any(m == f"{PACKAGE}.{name}".rstrip(".") or m.startswith(f"{PACKAGE}.{name}.")
                              for m in MODULES))
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_no_module_imports_one_above_it():
    upward = [f"{module}:{line} imports {target} (layer {layer_of(target)} > {layer_of(module)})"
              for module, targets in IMPORTS.items() for target, line in targets.items()
              if layer_of(target) > layer_of(module)]
    assert not upward, "imports against the flow of DESIGN.md section 4:\n" + "\n".join(sorted(upward))


def test_the_imports_have_no_cycle():
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in IMPORTS[module]:
            if state.get(target) == "open":
                return path + [module, target]
            if target not in state:
                cycle = visit(target, path + [module])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(IMPORTS):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, "an import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_the_rules_catch_the_old_violations():
    """The checks see what they are meant to see: io importing plotting (the old cycle), problems
    importing solve, a function-level import, a relative import of a submodule."""
    fake = ROOT / "io.py"
    source = "def f():\n    from .plotting import plot_energy\n    from . import problems\n"
    tree_targets = _targets_of_source("jko_ift.io", fake, source)
    assert tree_targets == {"jko_ift.plotting", "jko_ift.problems"}
    assert layer_of("jko_ift.plotting") > layer_of("jko_ift.io")
    assert layer_of("jko_ift.solve") > layer_of("jko_ift.problems")
    assert layer_of("jko_ift.methods.entropic") == layer_of("jko_ift.methods")
    assert layer_of(PACKAGE) > layer_of("jko_ift.io")


def _targets_of_source(module: str, path: Path, source: str) -> set:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        copy.write_text(source)
        return set(imported_modules(module, copy))


def test_the_lazy_public_names_are_the_imports_of_the_package():
    """``jko_ift/__init__.py`` loads its public names on first use (PEP 562): its table of where each
    name lives agrees with its TYPE_CHECKING imports (which this test's layering reads), with
    ``__all__``, and every name resolves to what its module defines."""
    import importlib

    import jko_ift

    declared = {}
    for node in ast.walk(ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            declared.update({alias.name: node.module for alias in node.names})
    assert declared == jko_ift._SOURCES
    assert set(jko_ift.__all__) == set(declared)
    for name, module in declared.items():
        assert getattr(jko_ift, name) is getattr(importlib.import_module(f"{PACKAGE}.{module}"), name)
    assert callable(jko_ift.solve) and jko_ift.io.load is jko_ift.load  # submodules stay reachable
