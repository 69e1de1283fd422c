"""Every module imports on its own, and no module imports itself back through others.

(a) Each module of ``infinitetalk/`` is imported alone in a fresh interpreter (one subprocess per
module, run concurrently): a module that only works after some other module was imported first,
or that reaches a half-initialised module through a cycle, fails here.

(b) The static import graph of ``infinitetalk/`` and ``scripts/`` (absolute and relative imports,
also those inside functions, which run later but still form a cycle) has no cycle; a failure
names the cycle, e.g. ``infinitetalk.pipeline -> infinitetalk.parallel -> infinitetalk.pipeline``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "infinitetalk"
SCRIPTS = ROOT / "scripts"


def _module_name(path: Path) -> str:
    """``infinitetalk/models/__init__.py`` -> ``infinitetalk.models``; ``scripts/x.py`` -> ``x``
    (scripts import each other by bare name: their folder is on ``sys.path``)."""
    if path.parent == SCRIPTS:
        return path.stem
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _all_modules() -> dict[str, Path]:
    return {**_package_modules(), **{_module_name(p): p for p in sorted(SCRIPTS.glob("*.py"))}}


def _import_alone(module: str) -> tuple[str, int, str]:
    if module == "infinitetalk.__main__":  # importing it runs the CLI: run it with --help instead
        cmd = [sys.executable, "-m", "infinitetalk", "--help"]
    else:
        cmd = [sys.executable, "-c", f"import {module}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return module, res.returncode, res.stderr[-2000:]


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    modules = sorted(_package_modules())
    assert {"infinitetalk.pipeline", "infinitetalk.settings", "infinitetalk.models"} <= set(modules)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(_import_alone, modules))
    failed = {module: err for module, rc, err in results if rc != 0}
    assert not failed, "modules that do not import alone:\n" + "\n".join(f"{m}:\n{e}" for m, e in failed.items())


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (``from ..x import y`` inside ``module``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The known modules ``path`` imports anywhere in its body (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one, else a name of ``pkg``.
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # ``import a.b.c`` runs a.b.c (and its parents); the deepest known module is the edge.
            parts = target.split(".")
            for n in range(len(parts), 0, -1):
                if ".".join(parts[:n]) in known:
                    found.add(".".join(parts[:n]))
                    break
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _all_modules()
    known = set(modules)
    return {module: _imports(module, path, known) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_find_cycle_reports_the_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_import_graph_is_seen():
    graph = import_graph()
    # Relative, absolute, function-level and script-to-script imports are all edges.
    assert "infinitetalk.distributed" in graph["infinitetalk.pipeline"]
    assert {"infinitetalk.pipeline", "infinitetalk.distributed"} <= graph["infinitetalk.parallel"]
    assert "infinitetalk.build" in graph["infinitetalk.service"]  # inside load_pipeline()
    assert "infinitetalk.models.transformer_infinitetalk" in graph["infinitetalk.models"]
    assert {"bench_chunk", "bench_common"} <= graph["benchmark"]
    assert "parity_common" in graph["check_parity"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
