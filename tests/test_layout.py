"""The package's shape: no module imports one that imports it back (counting imports inside functions too), and
every error meant for the user is a KotuneError, which the CLI prints without a traceback."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "kotune"


def _imports() -> dict[str, set[str]]:
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` names submodules; the package itself is what is being imported from
                for t in ([] if node.module is None else [name]) + [f"{name}.{a.name}" for a in node.names]:
                    if t in mods and t != m:
                        graph[m].add(t)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods and a.name != m)
    return graph


def test_no_import_cycles():
    graph = _imports()
    cycles = []
    for start in graph:  # a path back to `start`, depth first
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" → ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, cycles[:5]


def test_every_kotune_error_class_is_one_family():
    from kotune import errors

    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 9 and all(issubclass(c, errors.KotuneError) for c in classes)
    from kotune.config import ConfigError
    from kotune.data import DataError
    from kotune.runfolder import OutputError

    assert ConfigError is errors.ConfigError and DataError is errors.DataError and OutputError is errors.OutputError
    assert issubclass(DataError, ValueError)  # callers catching the builtin still work


def test_generic_stages_never_import_the_civil_law_recipe():
    """`kotune.legal` plugs in through `kotune/grounding.py` (by name, at run time); only the command line, the top
    layer, imports it to register the recipe's commands."""
    graph = _imports()
    leaks = sorted(
        f"{m} → {t}"
        for m, targets in graph.items()
        if not m.startswith("kotune.legal") and m != "kotune.cli"
        for t in targets
        if t.startswith("kotune.legal")
    )
    assert not leaks, leaks
