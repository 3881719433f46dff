"""Functions short enough to read (#34), read from the source like tests/test_layers.py: no function of the package
is over 60 lines (``def`` to its last line) unless ``LONG`` names it with the reason it may be. ``make lint`` runs it.

Two kinds of reason only: a numbered-step orchestrator that reads top to bottom (diffusers' ``__call__`` style), or
a typer command whose length is its option declarations. Anything else over the limit is split into named steps.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sd35trt"
LIMIT = 60
ORCHESTRATOR = "numbered-step orchestrator: reads top to bottom, one numbered step after another"
OPTIONS = "typer command: most of its lines are its option declarations"
LONG = {
    "producers/calibrate.py:_calibrate": ORCHESTRATOR,
    "runtime/pipeline.py:Sd35Loop.__call__": ORCHESTRATOR,
    "cli/commands.py:generate": OPTIONS,
    "cli/commands.py:bench": OPTIONS,
    "cli/build_commands.py:preflight": OPTIONS,
    "cli/main.py:export": OPTIONS,
}


def function_lengths() -> dict[str, int]:
    """``module.py:Class.function`` → lines from ``def`` to its last line, for every function of the package."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[f"{prefix}{child.name}"] = child.end_lineno - child.lineno + 1
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    for path in sorted(PACKAGE.rglob("*.py")):
        visit(ast.parse(path.read_text(encoding="utf-8")), f"{path.relative_to(PACKAGE).as_posix()}:")
    return found


@pytest.mark.fast
def test_no_function_is_over_the_limit_unless_listed_with_its_reason():
    lengths = function_lengths()
    too_long = {name: n for name, n in lengths.items() if n > LIMIT and name not in LONG}
    assert not too_long, f"functions over {LIMIT} lines: split them into named steps, or list them in LONG with " \
                         f"the reason: {too_long}"


@pytest.mark.fast
def test_the_allow_list_only_names_functions_that_still_need_it():
    lengths = function_lengths()
    stale = {name: lengths.get(name) for name in LONG if lengths.get(name, 0) <= LIMIT}
    assert not stale, f"no longer over {LIMIT} lines (or gone): drop them from LONG: {stale}"
