"""The package's structure (issue 7): imports walked statically, lazy imports included.

- no import cycle between wattprint modules;
- library code (``wattprint.profiler``, ``wattprint.exporters``, ``wattprint.kernels``) never imports
  the commands or the CLI;
- vLLM is imported only under ``wattprint/profiler/vllm/``;
- modules stay small: no module over 400 lines, no class over 300.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "wattprint"
LIBRARY = ("wattprint.profiler", "wattprint.exporters", "wattprint.kernels")
COMMANDS = ("wattprint.commands", "wattprint.cli")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str) -> list[tuple[str, int]]:
    """Every module ``name`` imports (at any depth: lazy imports inside functions included)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in MODULES else mod, node.lineno))
    return out


def internal_graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        deps = set()
        for mod, _ in imports_of(name):
            while mod and mod not in MODULES:  # "wattprint.x.y.Name" -> its module
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not name.startswith(mod + ".") and mod != "wattprint":
                deps.add(mod)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_walker_sees_lazy_imports_and_finds_cycles():
    assert ("wattprint.profiler.attribution.offline", 0) not in imports_of("wattprint.commands.attribute")
    assert any(m == "wattprint.profiler.attribution.offline" for m, _ in imports_of("wattprint.commands.attribute"))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(internal_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_code_never_imports_commands_or_the_cli():
    bad = [f"{n}:{line} imports {m}" for n in MODULES if n.startswith(LIBRARY)
           for m, line in imports_of(n) if m.startswith(COMMANDS)]
    assert not bad, "\n".join(bad)


def test_vllm_is_imported_only_under_profiler_vllm():
    bad = [f"{n}:{line} imports {m}" for n in MODULES if not n.startswith("wattprint.profiler.vllm")
           for m, line in imports_of(n) if m == "vllm" or m.startswith("vllm.")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_classes_stay_small(name):
    path = MODULES[name]
    text = path.read_text()
    assert text.count("\n") <= 400, f"{path} has {text.count(chr(10))} lines (at most 400)"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            n = node.end_lineno - node.lineno + 1
            assert n <= 300, f"{path}:{node.lineno} class {node.name} has {n} lines (at most 300)"
