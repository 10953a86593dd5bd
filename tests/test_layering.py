"""The package's import graph keeps the layering of DESIGN.md §2 and CONTRIBUTING.md: each
module imports only from layers below its own (or from its own folder), no two modules import
each other however indirectly, and an import inside a function counts like one at the top (a
function-local import is how an upward import or a cycle hides from a reader).

The walk reads the source with `ast`, so it sees every `import` statement, wherever it is."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fmsd_jax"

# Lowest first. A module may import a module of a lower layer, or one in its own folder.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("fmsd_jax", "errors"),  # fmsd_jax: the package's __init__
    ("pathnames", "platforms"),
    ("atomic",),
    ("parallel",),
    ("data",),
    ("model",),
    ("method", "tpu"),
    ("config_base",),
    ("run",),
    ("evaluators",),
    ("serve",),
    ("modes",),
    ("demo",),
    ("main",),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    """The layer a module lives in: its folder under fmsd_jax, or its own name at the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def rank(module: str) -> int:
    name = room(module)
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layering.py: add its folder")


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of one of ours."""
    tree = ast.parse(path.read_text())
    local_lines = {n.lineno for f in ast.walk(tree)
                   if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from fmsd_jax.run import checkpoints` imports the module fmsd_jax.run.checkpoints
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                       else node.module for a in node.names]
        else:
            continue
        for t in dict.fromkeys(targets):
            if t in known:
                found.append((t, node.lineno, node.lineno in local_lines))
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = modules()
    return {m: imports(p, known) for m, p in known.items()}


def upward_imports(g: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    bad = []
    for m, edges in g.items():
        for t, line, local in edges:
            if t == m or m.startswith(t + "."):  # a package's own __init__
                continue
            same_room = room(m) == room(t) and room(m) != "fmsd_jax"
            if not same_room and rank(t) >= rank(m):
                bad.append(f"{module_path(m)}:{line} imports {t}"
                           + (" (inside a function)" if local else ""))
    return bad


def cycles(g: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """Every elementary cycle's members, found by Tarjan's strongly connected components."""
    adj = {m: sorted({t for t, _, _ in edges if t != m and not m.startswith(t + ".")})
           for m, edges in g.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in adj[v]:
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

    for v in sorted(adj):
        if v not in index:
            visit(v)
    return out


def module_path(m: str) -> str:
    p = modules()[m]
    return str(p.relative_to(PACKAGE.parent))


def test_no_module_imports_upward():
    assert upward_imports(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_every_module_is_in_a_layer():
    for m in modules():
        rank(m)


def test_the_root_stays_small_and_no_module_is_long():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 8, root
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


# The checks above must be able to fail: each of these graphs breaks one rule.
@pytest.mark.parametrize("edges, rule", [
    ({"fmsd_jax.data.x": [("fmsd_jax.model.vit", 3, False)], "fmsd_jax.model.vit": []},
     "upward"),
    ({"fmsd_jax.model.vit": [("fmsd_jax.run.factory", 9, True)], "fmsd_jax.run.factory": []},
     "upward"),
    ({"fmsd_jax.run.a": [("fmsd_jax.run.b", 1, False)],
      "fmsd_jax.run.b": [("fmsd_jax.run.a", 40, True)]}, "cycle"),
])
def test_the_walk_catches_a_broken_rule(edges, rule, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "module_path", lambda m: m)
    if rule == "upward":
        found = upward_imports(edges)
        assert len(found) == 1 and "imports" in found[0]
        assert found[0].endswith("(inside a function)") == any(e[2] for v in edges.values()
                                                               for e in v)
    else:
        assert cycles(edges) == [["fmsd_jax.run.a", "fmsd_jax.run.b"]]


def test_a_function_local_import_is_seen(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from fmsd_jax.modes import train\n")
    known = {"fmsd_jax.modes.train": Path("x")}
    assert imports(f, known) == [("fmsd_jax.modes.train", 4, True)]
