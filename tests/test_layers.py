"""The package's layers, read from its source: which sd35trt module imports which (module level and inside
functions alike), so a runtime that reaches into the build stack fails here and in ``make lint``.

core ← producers, runtime ← checks ← cli. The runtime never imports a producer; ``doctor`` and ``compare``
(the checks a deploy host runs) import only the core and the runtime. No circle anywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sd35trt"
# What each layer may import, besides itself.
ALLOWED = {
    "core": set(),
    "producers": {"core"},
    "runtime": {"core"},
    "checks": {"core", "runtime", "producers"},
    "cli": {"core", "runtime", "producers", "checks"},
    "": {"core", "runtime", "producers", "checks", "cli"},  # sd35trt/__main__.py, __init__.py
}
# Checks that run on a deploy host: no producer, at module level or inside a function.
DEPLOY_CHECKS = ("sd35trt.checks.doctor", "sd35trt.checks.compare")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every sd35trt module ``path`` imports anywhere in its body (``from sd35trt.x import y`` counts as
    ``sd35trt.x.y`` when that is a module, else ``sd35trt.x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sd35trt")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sd35trt") and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
    return {m for m in found if m in MODULES}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else ""


def test_layers_import_only_what_is_below_them():
    wrong = [f"{src} imports {dst}" for src, dsts in GRAPH.items() for dst in sorted(dsts)
             if layer(dst) != layer(src) and layer(dst) not in ALLOWED[layer(src)] and dst != "sd35trt"]
    assert not wrong, "\n".join(wrong)


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("module", DEPLOY_CHECKS)
def test_deploy_checks_never_reach_a_producer(module):
    producers = sorted(m for m in reachable(module) if layer(m) == "producers")
    assert not producers, f"{module} reaches {producers}"


def test_no_import_circle():
    circles = sorted({" -> ".join(sorted(c)) for m in GRAPH for c in [reachable(m)] if m in c})
    assert not circles, circles


def test_cli_is_the_only_place_that_imports_typer():
    users = [name for name, path in MODULES.items() if "typer" in {
        a.name.split(".")[0] for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names}
        | {n.module.split(".")[0] for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.module}]
    assert users and all(layer(u) == "cli" for u in users), users


BLOCKER = """
import importlib.abc, sys
BLOCKED = ("modelopt", "onnx", "onnxruntime", "polygraphy", "onnx_graphsurgeon", "sd35trt.producers")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(BLOCKED):
            raise ImportError(f"{name} is not installed on this deploy host")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("module", [m for m in MODULES if layer(m) == "runtime"] + ["sd35trt.checks.doctor"])
def test_runtime_imports_on_a_host_without_the_build_stack(module):
    """A deploy host has torch, diffusers' scheduler/tokenizers and TensorRT: no ModelOpt, ONNX, onnxruntime or
    polygraphy. Every runtime module (and doctor) imports there, and so does everything it imports."""
    code = BLOCKER + f"import {module}\nprint(sorted(m for m in sys.modules if m.startswith('sd35trt')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "producers" not in done.stdout
