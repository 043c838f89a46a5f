"""Package structure: imports, the layering and no import cycle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import lazy_monitor

PACKAGE = Path(lazy_monitor.__file__).parent
#: Layers, lowest first: a module may import its own layer and those below, never above.
LAYERS = ("core", "tracking", "callbacks", "integrations", "cli")


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The ``lazy_monitor`` modules ``path`` imports anywhere (module level, inside functions,
    under ``TYPE_CHECKING``): every edge counts, a lazy import only hides a cycle."""
    tree = ast.parse(path.read_text())
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lazy_monitor"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if not base.startswith("lazy_monitor"):
                continue
            for alias in node.names:
                # `from pkg import module` is an edge to the module only; `from pkg import name`
                # one to pkg (resolved against the module list in _graph)
                found.add(f"{base}.{alias.name}|{base}")
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for m in _imports(path):
            target, _, base = m.partition("|")
            target = target if target in modules else (base or target)
            if target in modules and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_package_imports():
    assert lazy_monitor.__doc__
    assert lazy_monitor.KernelConfig is lazy_monitor.tracking.KernelConfig


def test_no_import_cycle_between_the_package_modules():
    graph = _graph()
    assert graph["lazy_monitor.tracking.tracker"]  # the graph is read (not trivially empty)
    assert "lazy_monitor.tracking.sharded" not in graph["lazy_monitor.tracking.tracker"]
    assert "lazy_monitor.tracking.tracker" not in graph["lazy_monitor.tracking.sharded"]
    assert _cycles(graph) == []


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_do_not_import_higher_ones():
    graph = _graph()
    rank = {layer: i for i, layer in enumerate(LAYERS)}

    def layer(module: str) -> int:
        parts = module.split(".")
        return rank.get(parts[1], -1) if len(parts) > 1 else -1

    upward = [
        (m, d) for m, deps in graph.items() for d in deps if layer(m) >= 0 and layer(d) > layer(m)
    ]
    assert upward == []
