"""No import circles in the package (issue 20): the layers import downwards only.

Two graphs over ``grace_lightning``'s modules, read from the source with ``ast``:
- every import, at module level or inside a function (a lazy import is still a dependency);
  ``from pkg import name`` points at the submodule ``pkg.name`` when there is one;
- module-level imports only, plus the packages Python runs first (importing ``a.b.c`` executes
  ``a/__init__`` and ``a/b/__init__``): what actually runs at import time.
Neither may have a cycle. The test fails with the cycle's modules in order.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "grace_lightning"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, mods: dict[str, Path], top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    is_pkg = path.name == "__init__.py"
    deps: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
            deps.update(subs)
            if len(subs) < len(node.names):
                deps.add(mod)
    return {d for d in deps if d in mods and d != name}


def _with_parents(deps: set[str]) -> set[str]:
    out = set(deps)
    for d in deps:
        parts = d.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        color[v] = GREY
        stack.append(v)
        for w in sorted(graph[v]):
            if color[w] == GREY:
                return stack[stack.index(w) :] + [w]
            if color[w] == WHITE and (found := visit(w)):
                return found
        stack.pop()
        color[v] = BLACK
        return None

    for v in sorted(graph):
        if color[v] == WHITE and (found := visit(v)):
            return found
    return None


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = _imports(name, path, mods, top_level_only)
        if top_level_only:
            deps = _with_parents(deps) - {name} - set(_with_parents({name}))
        graph[name] = deps
    return graph


def test_no_import_cycle_counting_lazy_imports():
    cycle = _find_cycle(_graph(top_level_only=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_at_import_time():
    cycle = _find_cycle(_graph(top_level_only=True))
    assert cycle is None, "import cycle at import time: " + " -> ".join(cycle)


def test_the_check_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    # the graph sees lazy imports (the old circles were mostly inside functions)
    graph = _graph(top_level_only=False)
    assert "grace_lightning.models.lora" in graph["grace_lightning.utils.fsdp"]
