"""The library's folders are the pipeline's stages: every module imports, no import cycle, each stage documented."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[2] / "AACScoreLib"
STAGES = ("io", "segmentation", "geometry", "scoring", "qc", "phantoms", "evaluation", "slicer", "worker")


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(LIBRARY.rglob("*.py")) if "__pycache__" not in path.parts}


def import_graph() -> dict[str, set[str]]:
    """Module -> library modules it imports anywhere in its text (function-level imports count too)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target in modules and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for after in sorted(graph[node]):
            if state.get(after) == 1:
                return stack[stack.index(after):] + [after]
            if after not in state and (cycle := visit(after)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_and_its_absence():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_library_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_lower_stages_import_no_higher_one():
    graph = import_graph()
    io_imports = {target for name, targets in graph.items() if name.startswith("AACScoreLib.io") for target in targets}
    assert all(t.startswith("AACScoreLib.io") or t in ("AACScoreLib.errors", "AACScoreLib.kauppila")
               for t in io_imports), sorted(io_imports)
    touching_slicer = {name for name, path in _modules().items()
                       if any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                              any(a.name.split(".")[0] in ("slicer", "vtk", "qt", "ctk") for a in n.names)
                              if isinstance(n, ast.Import) else
                              isinstance(n, ast.ImportFrom) and not n.level and (n.module or "").split(".")[0]
                              in ("slicer", "vtk", "qt", "ctk")
                              for n in ast.walk(ast.parse(path.read_text())))}
    assert touching_slicer and all(name.startswith("AACScoreLib.slicer") for name in touching_slicer), touching_slicer


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_is_a_documented_package(stage):
    module = importlib.import_module(f"AACScoreLib.{stage}")
    assert module.__doc__ and len(module.__doc__.split()) >= 20, f"{stage}/__init__.py needs a docstring"


def test_every_module_imports():
    for name in _modules():
        importlib.import_module(name)
