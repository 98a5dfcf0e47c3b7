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

    monkeypatch.setattr(cli.models, "run", fail)
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
    bug = subprocess.run([sys.executable, "-c", "import sys; from reglue import cli; cli.models.run = "
                          "lambda args: {}['no such key']; sys.exit(cli.main(['models']))"],
                         capture_output=True, text=True)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'no such key'" in bug.stderr


@pytest.mark.parametrize("argv", [
    ["train", "--config", "configs/demo.yaml", "data.dir=x", "--resume", "auto", "--bogus"],
    ["train", "--config", "configs/demo.yaml", "--resolution", "64", "data.dir=x", "-x"],
    ["verify", "x", "key=value"],  # a command without settings takes no KEY=VALUE
])
def test_unknown_arguments_are_a_usage_error(argv, capsys):
    """KEY=VALUE overrides may follow a command's options; anything else unknown is refused."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


# old spelling -> what the refusal names (docs/configuration.md lists every rename)
RENAMED_FLAGS = [
    (["prepare", "src", "dst", "--vae-dtype", "bf16"], "--vae-dtype was renamed --precision."),
    (["prepare", "src", "dst", "--batch-size", "4"], "--batch-size was renamed --micro-batch."),
    (["norm-stats", "d", "--autocast", "none"], "--autocast was renamed --precision (none is now fp32)."),
    (["norm-stats", "d", "--batch-size", "4"], "--batch-size was renamed --micro-batch."),
    (["fit-pca", "d", "--autocast", "bf16"], "--autocast was renamed --precision"),
    (["fit-pca", "d", "--batch-size", "4"], "--batch-size was renamed --micro-batch."),
    (["cache-semantics", "d", "--autocast", "none"], "--autocast was renamed --precision"),
    (["cache-semantics", "d", "--batch-size", "4"], "--batch-size was renamed --micro-batch."),
    (["train-compressor", "d", "--autocast", "none"], "--autocast was renamed --precision"),
    (["train-vfm", "d", "--out", "o", "--batch-size", "8"], "--batch-size was renamed --global-batch."),
    (["train-vfm", "d", "--out", "o", "--no-resume"], "--no-resume was renamed --restart."),
    (["train-vfm", "d", "--out", "o", "--resume"], "--resume is gone: rerunning train-vfm resumes by default"),
    (["train-vfm", "d", "--out", "o", "--held-out-fraction", "0.1"], "was replaced by --max-held-out-fraction"),
    (["evaluate", "--ref", "r", "--samples", "s", "--batch-size", "4"], "--batch-size was renamed --micro-batch."),
]


@pytest.mark.parametrize("argv, named", RENAMED_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in RENAMED_FLAGS])
def test_an_old_flag_is_refused_naming_the_new_one(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_a_renamed_config_key_is_refused_naming_the_new_one_and_old_runs_still_resume():
    from reglue.config import ConfigError, load_config, upgrade_recorded

    with pytest.raises(ConfigError, match=r"train.mixed_precision was renamed train.precision \(no is now fp32\)"):
        load_config(None, ["data.dir=x", "train.mixed_precision=bf16"])
    with pytest.raises(ConfigError, match=r"data.vfm_autocast was renamed data.vfm_precision"):
        load_config(None, ["data.dir=x", "data.vfm_autocast=no"])
    recorded = {"train": {"mixed_precision": "no", "seed": 1}, "data": {"vfm_autocast": "bf16", "dir": "x"}}
    assert upgrade_recorded(recorded) == {"train": {"precision": "fp32", "seed": 1},
                                          "data": {"vfm_precision": "bf16", "dir": "x"}}
    assert recorded["train"] == {"mixed_precision": "no", "seed": 1}  # the record itself is left alone


def test_commands_with_settings_take_a_config_file_and_key_values(tmp_path):
    """sample, prepare, train-compressor and demo resolve their settings dataclass like train does:
    defaults, --config, the flag shortcuts, then KEY=VALUE."""
    from reglue.cli import parse_args
    from reglue.cli.options import load_command_settings
    from reglue.data.prepare import PrepareSettings
    from reglue.demo import DemoSettings
    from reglue.generate import PAPER, SampleSettings
    from reglue.training.compressor import CompressorSettings

    config = tmp_path / "sample.yaml"
    config.write_text("num_steps: 100\nguidance: {scale: 1.5}\nseed: 3\n")
    args = parse_args(["sample", "--ckpt", "c", "--out", "o", "--config", str(config), "--seed", "4", "labels=balanced"])
    settings = load_command_settings(SampleSettings, args, {"seed": args.seed, "labels": args.labels})
    assert (settings.num_steps, settings.guidance.scale, settings.seed, settings.labels) == (100, 1.5, 4, "balanced")
    args = parse_args(["sample", "--ckpt", "c", "--out", "o", "--paper", "num_steps=50"])
    settings = load_command_settings(SampleSettings, args, {}, base=PAPER)
    assert settings.num_steps == 50 and settings.guidance == PAPER.guidance
    config = tmp_path / "compressor.yaml"
    config.write_text("epochs: 40\nlr: 5.0e-4\n")
    args = parse_args(["train-compressor", "d", "--config", str(config), "--global-batch", "64", "seed=2"])
    settings = load_command_settings(CompressorSettings, args, {"global_batch": args.global_batch})
    assert settings == CompressorSettings(epochs=40, lr=5e-4, global_batch=64, seed=2)
    args = parse_args(["prepare", "src", str(tmp_path / "dst"), "--precision", "bf16", "shard_size=7"])
    settings = load_command_settings(PrepareSettings, args, {"source": "src", "vae_dtype": args.precision})
    assert (settings.vae_dtype, settings.shard_size) == ("bf16", 7)
    args = parse_args(["demo", "--steps", "9", "teacher_epochs=2"])
    assert load_command_settings(DemoSettings, args, {"steps": args.steps}) == DemoSettings(steps=9, teacher_epochs=2)


def test_the_feature_commands_and_evaluate_take_settings_too(tmp_path):
    """norm-stats, fit-pca, cache-semantics, evaluate and grid: --config, flag shortcuts and KEY=VALUE; the VFM
    flags are the keys vfm.name / vfm.weights / vfm.layers / vfm.arch."""
    from reglue.cli import parse_args
    from reglue.cli.options import load_command_settings, vfm_values
    from reglue.encoders.semantics import VFMSpec
    from reglue.metrics.evaluate import EvaluateSettings
    from reglue.pipeline import CacheSettings, NormStatsSettings, PCASettings

    config = tmp_path / "features.yaml"
    config.write_text("num_images: 500\nvfm: {name: dinov2_vits14_reg, weights: random}\n")
    args = parse_args(["norm-stats", "d", "--config", str(config), "--vfm-arch", "embed_dim=32,depth=2,num_heads=2",
                       "--vfm-layers", "0,1", "micro_batch=8"])
    settings = load_command_settings(NormStatsSettings, args, {"num_images": args.num_images, **vfm_values(args)})
    assert (settings.num_images, settings.micro_batch, settings.precision) == (500, 8, "auto")
    assert settings.spec(required=True) == VFMSpec("dinov2_vits14_reg", "random", (0, 1),
                                                   {"embed_dim": 32, "depth": 2, "num_heads": 2})
    args = parse_args(["fit-pca", "d", "--rank", "4", "precision=fp32"])
    settings = load_command_settings(PCASettings, args, {"rank": args.rank, **vfm_values(args)})
    assert (settings.rank, settings.precision, settings.spec(required=False)) == (4, "fp32", None)
    args = parse_args(["cache-semantics", "d", "--repa-targets"])
    assert load_command_settings(CacheSettings, args, {"repa_targets": args.repa_targets}).repa_targets
    args = parse_args(["evaluate", "--ref", "r", "--samples", "s", "--metrics", "fid,fd_dinov2", "micro_batch=10"])
    settings = load_command_settings(EvaluateSettings, args, {"metrics": args.metrics.split(","), **vfm_values(args)})
    assert settings.metrics == ["fid", "fd_dinov2"] and settings.micro_batch == 10
    assert settings.spec().name == "dinov2_vitl14"  # FD_DINOv2's network unless another is named
    with pytest.raises(InputError, match="a VFM is given by the keys"):
        NormStatsSettings(vfm={"nmae": "x"}).spec(required=True)
    with pytest.raises(InputError, match="rank must be >= 1"):
        PCASettings(rank=0)


def test_the_demo_help_states_the_demo_settings_resolution():
    """reglue.cli.demo names the default side without importing the demo (start-up time); they stay equal."""
    from reglue.cli.demo import DEMO_RESOLUTION
    from reglue.demo import DemoSettings

    assert DEMO_RESOLUTION == DemoSettings().resolution
