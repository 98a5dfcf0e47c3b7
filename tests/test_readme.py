"""The README's quick-start commands stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO


def quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_ci_runs_exactly_the_readme_test_command():
    main_job, test_command = quick_start_commands()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    assert "pytest" in test_command and "scripts/setup.sh" in main_job and "reglue demo" in main_job


def test_readme_scripts_exist():
    assert (REPO / "scripts" / "setup.sh").is_file()


def test_the_readme_states_the_size_of_the_suite(request):
    """Every "about N tests" in the README is within 10 % of what pytest collects (checked when the whole suite
    is collected, as CI does)."""
    collected = len(request.session.items)
    files = {Path(item.path) for item in request.session.items}
    if files != set((REPO / "tests").glob("test_*.py")):
        pytest.skip(f"only part of the suite was collected ({collected} tests from {len(files)} files)")
    stated = [int(n.replace(",", "")) for n in re.findall(r"(?:about|≈) ([\d,]+) tests", (REPO / "README.md").read_text())]
    assert len(stated) >= 2 and all(abs(n - collected) <= 0.1 * collected for n in stated), (stated, collected)
