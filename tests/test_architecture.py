"""The README's architecture claims that import-linter (``make lint``) does not check itself: function length and
what the ``xlt`` command loads before it knows which sub-command runs."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

LONG, TOO_LONG, MAX_LONG = 60, 100, 5


def function_lengths() -> list[tuple[int, str]]:
    """(lines, "path:name") of every function and method under xlt/, decorators excluded, docstring included."""
    rows = []
    for path in sorted((REPO / "xlt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(REPO)}:{node.name}"))
    return rows


def test_functions_are_short():
    """At most 5 functions over 60 lines and none over 100 (README "Architecture")."""
    rows = function_lengths()
    assert len(rows) > 500  # the walk found the package
    long = sorted((n, where) for n, where in rows if n > LONG)
    assert not [r for r in long if r[0] > TOO_LONG], long
    assert len(long) <= MAX_LONG, long


def test_the_command_line_loads_no_model_library_before_a_sub_command_runs():
    code = ("import sys, xlt.cli, xlt.check, xlt.stages; "
            "print(sorted(m for m in ('torch', 'transformers', 'datatrove', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
