"""The compiler's modules import one another one way: no cycles, the passes in their order,
the plan as plain data near the bottom; and the package's lazy exports match its
type-checking imports."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "compiler"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))
PASSES = ["ir", "partition", "place", "route", "cost", "planner", "api"]


def _imports(name: str) -> set[str]:
    """Modules of the package that `name` imports anywhere (functions and
    `if TYPE_CHECKING:` blocks included); the package itself is `__init__`."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "compiler":
                    out.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"compiler/{name}.py: use absolute imports")
            parts = (node.module or "").split(".")
            if parts[0] != "compiler":
                continue
            if len(parts) > 1:
                out.add(parts[1])
            else:  # from compiler import x: a module, or a name of the package
                out |= {a.name if a.name in MODULES else "__init__" for a in node.names}
    out.discard(name)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def test_the_graph_sees_every_kind_of_import():
    # Spot checks against the sources, so the parser cannot pass by seeing nothing.
    assert "place" in GRAPH["route"] and "route" in GRAPH["cost"]
    assert "cost" in GRAPH["planner"] and "planner" in GRAPH["api"]
    assert "frontend" in GRAPH["api"]  # from compiler import frontend, ...
    assert "summary" in GRAPH["cli"]  # inside a function
    assert set(PASSES) <= set(MODULES) and "__init__" in MODULES


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("module", PASSES)
def test_passes_import_only_earlier_passes(module):
    later = set(PASSES[PASSES.index(module) + 1:])
    assert not GRAPH[module] & later, f"{module} imports {sorted(GRAPH[module] & later)}"


def test_bottom_modules():
    assert GRAPH["target"] == set()
    assert GRAPH["ir"] == set()
    assert GRAPH["frontend"] <= {"ir"}
    assert GRAPH["plan"] <= {"ir", "place", "target"}  # plain data: no pass above place


def test_exports_match_the_type_checking_imports():
    import compiler

    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    eager = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                for a in imp.names:
                    eager[a.asname or a.name] = (imp.module.split(".")[1], a.name)
    assert eager == compiler._EXPORTS
    for name, (module, attr) in compiler._EXPORTS.items():
        assert name not in MODULES, f"{name} is also a module: compiler.{name} is ambiguous"
        assert getattr(compiler, name) is getattr(importlib.import_module(f"compiler.{module}"),
                                                  attr)


def test_docstring_names_every_pass_in_order():
    import compiler

    doc = compiler.__doc__
    at = [doc.index(f"  {p}") for p in ["frontend", "partition", "place", "route", "cost",
                                        "planner", "api"]]
    assert at == sorted(at)
    for m in ("plan", "check", "cores", "execute", "summary", "report", "serialize"):
        assert f"  {m}" in doc or f"({m}." in doc, m
