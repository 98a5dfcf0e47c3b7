"""The package's layers point one way (pyproject.toml's import-linter contracts, docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

SRC = REPO / "src" / "reglue"


def test_import_contracts_are_kept():
    """Fails naming the import chain when a module imports from a layer above its own.

    In a subprocess: import-linter's logging set-up would disable the loggers of this process."""
    run = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
                          "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                         capture_output=True, text=True, cwd=REPO, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_function_local_imports_of_reglue_are_kept_to_the_command_line():
    """Imports inside functions hide the layering; only the CLI defers them (start-up time)."""
    hidden = []
    for path in sorted(SRC.rglob("*.py")):
        if path.parent.name == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("reglue"):
                        hidden.append(f"{path.relative_to(SRC)}:{sub.lineno} from {sub.module}")
                    elif isinstance(sub, ast.Import) and any(a.name.startswith("reglue") for a in sub.names):
                        hidden.append(f"{path.relative_to(SRC)}:{sub.lineno} import reglue")
    assert hidden == [], "move these imports to the top of their module:\n" + "\n".join(hidden)
