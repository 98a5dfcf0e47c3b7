"""The ``reglue`` console command."""

from __future__ import annotations

import subprocess
import sys

import pytest

import reglue
from reglue.cli import main
from reglue.config import ConfigError
from reglue.errors import InputError, MissingExtraError, ReglueError


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


@pytest.mark.parametrize(
    ("error", "one_line"),
    [(InputError("bad value"), True), (ConfigError("train.steps must be >= 1"), True),
     (MissingExtraError("needs wandb"), True), (FileNotFoundError("no file"), True), (ReglueError("stopped"), True),
     (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), True), (RuntimeError("a bug"), False),
     (ValueError("operands could not be broadcast"), False), (KeyError("model"), False),
     (TypeError("unsupported operand"), False), (ImportError("cannot import name"), False)],
)
def test_errors_the_user_can_act_on_print_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys, error,
                                                                                 one_line):
    """reglue's own refusals, file-system errors and running out of memory are one line (exit 2); anything
    else — a ValueError from numpy, a KeyError — is a bug whose traceback Python prints (exit 1)."""
    from reglue import cli

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_cmd_models", fail)
    monkeypatch.delenv("REGLUE_DEBUG", raising=False)
    if one_line:
        assert main(["models"]) == 2
        assert capsys.readouterr().err.strip() == f"reglue models: error: {error}"
    else:
        with pytest.raises(type(error)):
            main(["models"])
        assert capsys.readouterr().err == ""


def test_an_internal_error_exits_1_with_its_traceback_and_a_refusal_2_without(tmp_path):
    """Through the console entry point: sample --steps 0 is refused in one line (it once became 250
    steps); a bug in a command shows its traceback."""
    refused = subprocess.run([sys.executable, "-m", "reglue", "sample", "--ckpt", str(tmp_path / "none"), "--out",
                              str(tmp_path / "out"), "--steps", "0"], capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == "reglue sample: error: num_steps must be >= 1, found 0."
    bug = subprocess.run([sys.executable, "-c", "import sys; from reglue import cli; cli._cmd_models = "
                          "lambda args: {}['no such key']; sys.exit(cli.main(['models']))"],
                         capture_output=True, text=True)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'no such key'" in bug.stderr


@pytest.mark.parametrize("argv", [
    ["train", "--config", "configs/demo.yaml", "data.dir=x", "--resume", "auto", "--bogus"],
    ["train", "--config", "configs/demo.yaml", "--resolution", "64", "data.dir=x", "-x"],
    ["sample", "--ckpt", "x", "--out", "y", "key=value"],
])
def test_unknown_arguments_are_a_usage_error(argv, capsys):
    """train's KEY=VALUE overrides may follow its options; anything else unknown is refused."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
