"""The package's dependencies point one way: no import cycles, and the layers keep to themselves.

Read statically from the source (every import, at module level or inside a function), so a
lazy import cannot hide a cycle.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "infinite"


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    # `from pkg import module` depends on the module, not on everything pkg re-exports
                    graph[m].add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names)
        graph[m] = {t for t in graph[m] if t in mods and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_point_one_way():
    """The engine knows nothing of the cluster or the server; cluster and server know nothing of
    each other; only the launch layer (infinite.launch, infinite.cli) composes them."""
    forbidden = {
        "infinite.runtime": ("infinite.cluster", "infinite.server", "infinite.launch", "infinite.cli"),
        "infinite.model": ("infinite.runtime", "infinite.cluster", "infinite.server"),
        "infinite.kv": ("infinite.runtime", "infinite.cluster", "infinite.server"),
        "infinite.attention": ("infinite.runtime", "infinite.cluster", "infinite.server"),
        "infinite.cluster": ("infinite.server", "infinite.launch", "infinite.cli"),
        "infinite.server": ("infinite.cluster", "infinite.launch", "infinite.cli"),
    }
    bad = []
    for mod, deps in import_graph().items():
        if mod.endswith(".__main__"):
            continue  # `python -m infinite.X` entry points are launchers themselves
        for layer, banned in forbidden.items():
            if mod == layer or mod.startswith(layer + "."):
                bad += [(mod, d) for d in deps if any(d == b or d.startswith(b + ".") for b in banned)]
    assert bad == []
