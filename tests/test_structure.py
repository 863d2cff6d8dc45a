"""The rules that keep the structure clean (docs/architecture.md), checked on the source.

- No class longer than 600 lines, no function or method longer than 150 lines in `monitor/`.
- No import cycle between `monitor` modules, type-only imports included.
- Only `monitor/hypervisor/` imports libvirt, and its `__init__` does not.
- No test module imports another test module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "monitor"
MAX_CLASS_LINES = 600
MAX_FUNCTION_LINES = 150


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, tuple[Path, ast.Module]]:
    return {
        module_name(path): (path, ast.parse(path.read_text(), str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def imported_modules(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The `monitor` modules a module imports, anywhere in it (type-only imports too)."""
    package = name if name in known and _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if module in known and module != name}


def _is_package(name: str) -> bool:
    return (ROOT / name.replace(".", "/") / "__init__.py").exists()


def test_no_class_or_function_is_too_long():
    too_long = []
    for name, (_, tree) in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = MAX_FUNCTION_LINES
            else:
                continue
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                too_long.append(f"{name}.{node.name}: {lines} lines (at most {limit})")
    assert too_long == []


def test_no_import_cycle():
    modules = sources()
    known = set(modules)
    graph = {name: imported_modules(name, tree, known) for name, (_, tree) in modules.items()}
    # A package's __init__ is imported with each of its modules; an edge from a module to its
    # own package's __init__ is that, not a dependency on it.
    for name, imports in graph.items():
        imports.difference_update(p for p in list(imports) if name.startswith(p + "."))
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for imported in sorted(graph[name]):
            if state.get(imported) == 1:
                cycles.append(" -> ".join(path[path.index(imported) :] + [imported]))
            elif imported not in state:
                visit(imported, path + [imported])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_only_the_hypervisor_package_imports_libvirt():
    importers = []
    for name, (_, tree) in sources().items():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n == "libvirt" or n.startswith("libvirt.") for n in names):
                importers.append(name)
    allowed = {n for n in importers if n.startswith("monitor.hypervisor.")}
    assert importers, "the hypervisor adapter imports libvirt somewhere"
    assert sorted(set(importers) - allowed) == []


def test_no_test_module_imports_another():
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for imported in names:
                leaf = imported.rpartition(".")[2]
                if imported.startswith("tests.") and (
                    leaf.startswith("test_") or leaf == "conftest"
                ):
                    offenders.append(f"{path.name} imports {imported}")
    assert offenders == []


def test_the_checks_see_what_they_check():
    """The rules above read every module (an empty scan would pass them all)."""
    modules = sources()
    assert {"monitor.loop", "monitor.policy", "monitor.takes"} <= set(modules)
    graph_of_loop = imported_modules("monitor.loop", modules["monitor.loop"][1], set(modules))
    assert {"monitor.policy", "monitor.takes", "monitor.workers"} <= graph_of_loop
