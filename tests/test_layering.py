"""The import rules of moe_offload, checked on the source with ``ast`` (no import runs).

- No ``_``-prefixed name (a private module or a private attribute) is imported from
  another top-level package (``tensor``, ``ops``, ``offload``, ``bench``, ...): what a
  package shares is public.
- No import circle between modules (function-level imports count: a lazy import is
  still a dependency).
- ``offload/`` (the engine) imports nothing from ``ops/`` or ``tensor/``: layers call
  the engine's marks, never the other way round.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moe_offload"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


MODULES = _modules()


def _resolve(importer: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path) -> Iterator[Tuple[str, str, int]]:
    """``(target module, imported name or '', line)`` for every import in the file."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, is_pkg, node)
            for a in node.names:
                sub = f"{mod}.{a.name}"
                # ``from pkg import module`` is an import of that module
                yield (sub, "", node.lineno) if sub in MODULES else (mod, a.name, node.lineno)


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _edges() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def test_no_private_name_imported_across_packages():
    bad = []
    for name, path in MODULES.items():
        for target, attr, line in _imports(name, path):
            if not target.startswith("moe_offload.") or _package(target) == _package(name):
                continue
            private_mod = any(p.startswith("_") and not p.startswith("__") for p in target.split("."))
            if private_mod or (attr.startswith("_") and not attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {target} {attr}".strip())
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


def test_no_import_circle():
    graph = _edges()
    state: Dict[str, int] = {}
    stack = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        # a package's __init__ re-exports its modules: not a dependency of theirs
        if m not in state:
            visit(m)
    cycles = [c for c in cycles if not _through_init(c)]
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _through_init(cycle) -> bool:
    """A circle closed only by a package ``__init__`` importing its own submodules (an
    ``__init__`` re-exporting names) is how Python packages work, not a circle."""
    for a, b in zip(cycle, cycle[1:]):
        if MODULES[a].name == "__init__.py" and b.startswith(a + "."):
            return True
    return False


def test_offload_imports_no_layers_or_formats():
    bad = []
    for name, path in MODULES.items():
        if _package(name) != "moe_offload.offload":
            continue
        for target, attr, line in _imports(name, path):
            if _package(target) in ("moe_offload.ops", "moe_offload.tensor"):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {target}")
    assert not bad, "offload/ imports layers or formats:\n" + "\n".join(bad)


def test_scripts_import_existing_public_names():
    """``scripts/`` use public names only, and every name they import exists (an
    ``ImportError`` in a GPU-only script path would otherwise surface on the GPU box)."""
    import importlib

    bad = []
    for path in sorted((ROOT.parent / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("moe_offload"):
                continue
            where = f"{path.name}:{node.lineno}"
            if any(p.startswith("_") for p in node.module.split(".")):
                bad.append(f"{where}: private module {node.module}")
                continue
            for a in node.names:
                if a.name.startswith("_"):
                    bad.append(f"{where}: private name {a.name}")
                elif f"{node.module}.{a.name}" in MODULES:
                    continue
                else:
                    try:
                        mod = importlib.import_module(node.module)
                    except ImportError as exc:     # e.g. a Triton kernel module on CPU
                        if "triton" in str(exc):
                            continue
                        raise
                    if not hasattr(mod, a.name):
                        bad.append(f"{where}: {node.module} has no {a.name}")
    assert not bad, "\n".join(bad)
