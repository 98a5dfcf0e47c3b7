"""The ``reglue`` console command."""

from __future__ import annotations

import subprocess
import sys

import pytest

import reglue
from reglue.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"reglue {reglue.__version__}"


def test_help_lists_commands(capsys):
    assert main([]) == 0
    assert "models" in capsys.readouterr().out


def test_models_lists_sizes_presets_and_counts(capsys):
    assert main(["models", "--count", "SiT-B/2"]) == 0
    out = capsys.readouterr().out
    assert "SiT-XL/2" in out and "reglue (paper FID 12.9)" in out
    assert "SiT-B/2" in out and "131.6M" in out


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "reglue", "--help"], capture_output=True, text=True, check=True)
    assert "usage: reglue" in result.stdout
