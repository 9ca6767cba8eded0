"""The package's import graph flows one way: diagnostics -> grammar -> ir -> compiler -> runtime ->
commands (cli, api, demo). Read from the source with ``ast`` (no module is imported), function-level
imports included, so a lazy import cannot hide an upward dependency.

1. A module imports only from its own layer or below. The few function-level upward imports that
   are needed are listed in ``UPWARD_EXCEPTIONS`` with the reason; a top-level one never is.
2. No cycle among modules through their top-level imports (importing ``a.b.c`` also runs the
   ``a`` and ``a.b`` package ``__init__`` files, so those count as imported too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "scaler_wizard"

# Bottom first. A module belongs to the layer of the longest entry that is it or a package above it.
LAYERS: list[tuple[str, ...]] = [
    ("scaler_wizard", "scaler_wizard.diagnostics"),  # the package root (version only) and diagnostics
    ("scaler_wizard.grammar",),
    ("scaler_wizard.ir",),
    ("scaler_wizard.compiler",),
    ("scaler_wizard.runtime",),
    ("scaler_wizard.commands", "scaler_wizard.cli", "scaler_wizard.api", "scaler_wizard.demo",
     "scaler_wizard.__main__", "scaler_wizard.sweep"),
]

# (importer, imported) -> why the importer needs it from inside a function. Keep this short.
UPWARD_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("scaler_wizard.compiler.conform", "scaler_wizard.runtime.naming"):
        "check dry-runs the writer's on-disk naming (SW373): transformers' reverse conversion as the writer "
        "follows it lives with the writer; moving it down would pull the reader's fact cache into the compiler",
}


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / PKG).rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def imports(mods: dict[str, Path]) -> list[tuple[str, str, bool, int]]:
    """(importer, imported module, at top level?, line) for every import of the package."""
    edges = []
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

        def walk(node, top: bool):
            for ch in ast.iter_child_nodes(node):
                inner = top and not isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(ch, ast.Import):
                    edges.extend((name, a.name, inner, ch.lineno) for a in ch.names
                                 if a.name == PKG or a.name.startswith(PKG + "."))
                elif isinstance(ch, ast.ImportFrom):
                    base = ch.module or ""
                    if ch.level:
                        up = package[: len(package) - ch.level + 1]
                        base = ".".join(up + ([base] if base else []))
                    if base == PKG or base.startswith(PKG + "."):
                        for a in ch.names:
                            sub = f"{base}.{a.name}"
                            edges.append((name, sub if sub in mods else base, inner, ch.lineno))
                walk(ch, inner)

        walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), True)
    return edges


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or (n != PKG and module.startswith(n + "."))) and len(n) > best_len:
                best, best_len = i, len(n)
    return best


def upward(edges) -> list[str]:
    bad = []
    for a, b, top, line in edges:
        if layer_of(b) > layer_of(a) and (top or (a, b) not in UPWARD_EXCEPTIONS):
            where = "top-level" if top else "function-level"
            bad.append(f"{a}:{line} imports {b} ({where}): layer {layer_of(a)} -> {layer_of(b)}")
    return bad


def ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def cycles(edges) -> list[list[str]]:
    """The strongly connected components (more than one module) of the top-level import graph."""
    graph: dict[str, set[str]] = {}
    for a, b, top, _ in edges:
        if not top or a == b:
            continue
        for t in [b, *ancestors(b)]:
            if t != a and t not in ancestors(a):  # a package's own __init__ is already running
                graph.setdefault(a, set()).add(t)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is ~80 modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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


MODS = modules()
EDGES = imports(MODS)


def test_every_module_has_a_layer():
    assert len(MODS) > 50 and len(EDGES) > 100  # the scan saw the package
    assert [m for m in MODS if layer_of(m) is None] == []


def test_no_upward_import():
    assert upward(EDGES) == []


def test_upward_exceptions_are_few_and_still_used():
    assert len(UPWARD_EXCEPTIONS) <= 3
    used = {(a, b) for a, b, top, _ in EDGES if not top}
    assert [k for k in UPWARD_EXCEPTIONS if k not in used] == []


def test_diagnostics_imports_nothing_of_the_project():
    assert [b for a, b, _, _ in EDGES if a == "scaler_wizard.diagnostics"] == []


def test_no_import_cycle_at_module_level():
    assert cycles(EDGES) == []


def test_the_checks_catch_what_they_are_for():
    # an upward import, top-level or function-level but unlisted
    fake = [("scaler_wizard.ir.config", "scaler_wizard.compiler.typecheck", True, 1),
            ("scaler_wizard.grammar.parser", "scaler_wizard.runtime.recipe", False, 2)]
    assert len(upward(fake)) == 2
    # a listed exception made top-level is still refused
    UPWARD_EXCEPTIONS[("scaler_wizard.compiler.typecheck", "scaler_wizard.runtime.recipe")] = "test"
    try:
        assert upward([("scaler_wizard.compiler.typecheck", "scaler_wizard.runtime.recipe", True, 3)])
        assert not upward([("scaler_wizard.compiler.typecheck", "scaler_wizard.runtime.recipe", False, 3)])
    finally:
        del UPWARD_EXCEPTIONS[("scaler_wizard.compiler.typecheck", "scaler_wizard.runtime.recipe")]
    # a cycle, also one closed through a package __init__
    loop = [("scaler_wizard.compiler.solver", "scaler_wizard.compiler.typecheck", True, 1),
            ("scaler_wizard.compiler.typecheck", "scaler_wizard.compiler.solver", True, 1)]
    assert cycles(loop) == [["scaler_wizard.compiler.solver", "scaler_wizard.compiler.typecheck"]]
    via_init = [("scaler_wizard.grammar", "scaler_wizard.compiler.frontend", True, 1),
                ("scaler_wizard.compiler.frontend", "scaler_wizard.grammar.ast", True, 1)]
    assert cycles(via_init) == [["scaler_wizard.compiler.frontend", "scaler_wizard.grammar"]]
    # the function-level imports the cycle check ignores are still scanned
    assert ("scaler_wizard.compiler.typecheck.settings", "scaler_wizard.compiler.recipe") in {
        (a, b) for a, b, top, _ in EDGES if not top}
