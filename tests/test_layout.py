"""The package's shape: layers that point one way, no import cycles, modules and functions of a
readable size, and a CLI whose --help loads nothing heavy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "sanet_viz"
# Front ends: nothing in the library may import them.
FRONT_ENDS = ("sanet_viz.cli", "sanet_viz.server", "sanet_viz.ui")
# Library layers, bottom to top: a module may import only from its own layer or below.
LAYERS = [
    {"sanet_viz.models", "sanet_viz.attention", "sanet_viz.weights", "sanet_viz.limits", "sanet_viz.progress"},
    {"sanet_viz.preprocessing", "sanet_viz.hooks", "sanet_viz.cam", "sanet_viz.probes", "sanet_viz.correlation",
     "sanet_viz.profiles"},
    {"sanet_viz.lab"},
    {"sanet_viz.results", "sanet_viz.analysis", "sanet_viz.charts", "sanet_viz.export", "sanet_viz.figures",
     "sanet_viz.notebook", "sanet_viz.faithfulness"},
    {"sanet_viz.reproduce"},
]
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
EXEMPT_FROM_SIZE: set[str] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def from_target(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` reads, relative imports resolved against ``package``."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path) -> set[str]:
    """Package modules imported at run time (module level or inside functions), not under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom):
            target = from_target(node, package)
            if target.startswith("sanet_viz"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sanet_viz"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    known = modules()
    return {t for t in found if t in known and t != name}


def import_targets(name: str, source: str, *, is_package: bool = False) -> set[str]:
    """Every dotted name that ``source`` (module ``name``) imports anywhere: at module level, inside
    functions and classes, under ``if TYPE_CHECKING:``; absolute (``import a.b``, ``from a import b``)
    or relative (``from . import x``, ``from .x import y``, ``from .. import z``). ``from p import n``
    gives ``p`` and ``p.n`` (``n`` may be a module)."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            target = from_target(node, package)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def every_import(name: str, path: Path) -> set[str]:
    """Package modules that ``name`` imports anywhere (see :func:`import_targets`), also those only
    type checkers or a function's first call import: a cycle through them is still a cycle."""
    found = import_targets(name, path.read_text(), is_package=path.name == "__init__.py")
    known = modules()
    return {t for t in found if t in known and t != name}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of ``graph`` (module -> modules it imports), one per back edge of a depth-first search:
    none if and only if the graph has no cycle. A package's ``__init__`` importing its own
    submodules is not a cycle of ideas, so those edges are left out."""
    graph = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def layer_of(name: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in layer):
            return i
    return None


def test_library_never_imports_a_front_end() -> None:
    offenders = []
    for name, path in modules().items():
        if name.startswith(FRONT_ENDS) or name in {"sanet_viz", "sanet_viz.__main__"}:
            continue
        bad = [t for t in imports_of(name, path) if t.startswith(FRONT_ENDS)]
        if bad:
            offenders.append(f"{name} imports {bad}")
    assert not offenders, offenders


def test_layers_point_one_way() -> None:
    offenders = []
    for name, path in modules().items():
        mine = layer_of(name)
        if mine is None:
            continue
        for target in imports_of(name, path):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                offenders.append(f"{name} (layer {mine}) imports {target} (layer {theirs})")
    assert not offenders, offenders


def test_every_library_module_has_a_layer() -> None:
    unplaced = [n for n in modules() if layer_of(n) is None and not n.startswith(FRONT_ENDS)
                and n not in {"sanet_viz", "sanet_viz.__main__"}]
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_no_import_cycles() -> None:
    graph = {name: every_import(name, path) for name, path in modules().items()}
    cycles = import_cycles(graph)
    assert not cycles, cycles


def test_the_cycle_check_sees_every_import() -> None:
    source = """
from __future__ import annotations
import sanet_viz.models
from typing import TYPE_CHECKING
from .. import charts, lab as the_lab
from . import result
from .data import Sample
from ..weights import untrained_warning
if TYPE_CHECKING:
    from .engine import ReproduceOptions
def later():
    from .outputs import write_outputs
    import sanet_viz.probes
class Thing:
    def method(self):
        from ..cam import compute_cam
"""
    found = import_targets("sanet_viz.reproduce.faithfulness", source)
    assert {"sanet_viz.models", "sanet_viz.charts", "sanet_viz.lab", "sanet_viz.reproduce.result",
            "sanet_viz.reproduce.data", "sanet_viz.weights", "sanet_viz.reproduce.engine",
            "sanet_viz.reproduce.outputs", "sanet_viz.probes", "sanet_viz.cam"} <= found
    # In a package's __init__, "." is the package itself.
    assert "sanet_viz.reproduce.engine" in import_targets("sanet_viz.reproduce", "from .engine import run",
                                                          is_package=True)
    assert "sanet_viz.reproduce.engine" in import_targets("sanet_viz.reproduce", "from . import engine",
                                                          is_package=True)


def test_the_cycle_check_finds_cycles_but_not_a_package_importing_its_modules() -> None:
    assert import_cycles({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}) == [["p.a", "p.b", "p.c", "p.a"]]
    assert import_cycles({"p.a": {"p.a"}}) == [["p.a", "p.a"]]
    assert import_cycles({"p": {"p.a", "p.b"}, "p.a": {"p", "p.b"}, "p.b": {"p"}}) == []
    assert import_cycles({"p.a": {"p.b"}, "p.b": set(), "p.c": {"p.a", "p.b"}}) == []


def test_modules_and_functions_stay_readable() -> None:
    long_modules, long_functions = [], []
    for name, path in modules().items():
        if name in EXEMPT_FROM_SIZE:
            continue
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


@pytest.mark.parametrize("argv", [["weights", "--help"], ["analyze", "--help"], ["figure", "--help"]])
def test_cli_help_loads_no_data_set_machinery(argv: list[str]) -> None:
    code = ("import sys\nfrom sanet_viz.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('sanet_viz.reproduce', 'gradio', "
            "'sanet_viz.server', 'sanet_viz.ui', 'sanet_viz.lab', 'sanet_viz.analysis')))\n"
            "print('LOADED', loaded)\n")
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
    assert "LOADED []" in out.stdout, out.stdout.splitlines()[-1]
