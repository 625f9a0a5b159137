"""The package's import graph: no module imports another that (through any chain) imports it back,
and no layer imports a higher one (config, text, model < weights < engine < serve < commands).

Every import counts, those inside functions too: a lazy import still makes the lower module know
the higher one, and a circle that only closes at call time still forbids moving either module
alone. Read from the source with ast, so nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

import llama_demo

PACKAGE = Path(llama_demo.__file__).parent
# Lower layers first; one layer may import its own and lower ones only. The top-level
# llama_demo/*.py entry shims sit above commands (they only hand over to it).
LAYERS = {"config": 0, "text": 1, "model": 1, "weights": 2, "engine": 3, "serve": 4, "commands": 5}
SHIM_LAYER = 6


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("llama_demo", *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The llama_demo modules `name` imports, anywhere in its body; `from pkg import mod` counts
    as importing the module mod, `from mod import x` as importing mod."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names)
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return -1  # the package itself
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    return SHIM_LAYER


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    g = graph()
    # a known edge, so that an import reader that sees nothing cannot pass the two tests below
    assert "llama_demo.engine.sampler" in g["llama_demo.engine.scheduler"]
    assert len(g) > 40


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_upward_imports():
    upward = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a))
    assert upward == []
