"""Every supported resolution R (a multiple of 64 from 64 to 512) through the whole CLI chain
(prepare → norm-stats → train-compressor → cache-semantics → train → sample → grid) with tiny
models, checking each shape on the way; and every way a wrong resolution is refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reglue.cli import main
from reglue.config import ConfigError, load_config
from reglue.data.dataset import PreparedDataset
from reglue.data.synthetic import write_synthetic_dataset
from reglue.encoders.norm_stats import NormStats
from reglue.io import read_safetensors_metadata
from reglue.models.loading import load_sampling_model
from reglue.resolution import RESOLUTIONS, check_resolution, latent_size, token_grid
from reglue.training.metrics import read_metrics
from reglue.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread

TINY_VFM = ["--vfm-weights", "random", "--vfm-arch", "embed_dim=32,depth=4,num_heads=2", "--vfm-layers", "2,3"]
VFM_DIM, VFM_CHANNELS = 32, 64  # embed_dim; 2 layers × 32
TINY_MODEL = ["model.name=SiT-S/2", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
              "model.encoder_depth=1", "model.projector_dim=32"]
FAST_TRAIN = ["train.global_batch=2", "train.max_steps=2", "log.every=1", "checkpoint.every=100"]
PREVIEW_AND_EVAL = [  # an EMA preview grid and FD in a tiny random DINOv2's space at step 2
    "log.sample_every=2", "log.sample_count=2", "log.sample_steps=2",
    "eval.every=2", "eval.num_samples=2", "eval.batch=2", "eval.micro_batch=2", "eval.sampler.steps=2",
    "eval.metrics=[fd]", "eval.vfm={name: dinov2_vits14, weights: random, arch: {embed_dim: 32, depth: 2, num_heads: 2}}",
]
COMPRESSOR_FILE = Path("compressor") / "compressor_best.safetensors"
GRID_HEADER = 16  # rows of class labels above `reglue grid`'s images (reglue.generate.class_grid)
SUPPORTED_MESSAGE = "multiple of 64 from 64 to 512"


def make_data(root: Path, resolution: int, *, norm_stats: bool = True) -> Path:
    """4 synthetic images drawn at ``resolution`` (2 classes × 2), prepared with the pixel autoencoder,
    with the tiny random VFM's norm stats; returns the prepared folder."""
    src = write_synthetic_dataset(root / "src", images_per_class=2, size=resolution, seed=0, num_classes=2)
    data = root / "data"
    assert main(["prepare", str(src), str(data), "--resolution", str(resolution), "--vae", "pixel", "--quiet"]) == 0
    if norm_stats:
        assert main(["norm-stats", str(data), "--quiet", "--micro-batch", "4", "--num-images", "4", *TINY_VFM]) == 0
    return data


def train_compressor(data: Path, extra: list[str] = ()) -> Path:
    assert main(["train-compressor", str(data), "--epochs", "1", "--global-batch", "2", "--val-fraction", "0.25",
                 "--quiet", *extra]) == 0
    return data / COMPRESSOR_FILE


# ----------------------------------------------------------------------------- the whole chain
@pytest.mark.parametrize("resolution", [64, 128, 256, 512])
def test_whole_chain_through_the_cli_at_every_resolution(tmp_path, capsys, resolution):
    R, latent, grid = resolution, resolution // 8, resolution // 16
    data = make_data(tmp_path, R, norm_stats=False)

    # prepare: the manifest records R; rows hold R² images and R/8 latent moments
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["resolution"] == R and manifest["num_images"] == 4
    rows = PreparedDataset(data, fields=("images", "moments"), resolution=R)
    assert len(rows) == 4
    for i in range(len(rows)):
        row = rows[i]
        assert row["images"].dtype == torch.uint8 and row["images"].shape == (3, R, R)
        assert row["moments"].dtype == torch.float32 and row["moments"].shape == (8, latent, latent)

    # norm-stats: 2 layers × 32 channels, made at R. Every later command also takes --resolution R
    # as a check (a script looping over resolutions passes it everywhere); here each is given it.
    check = ["--resolution", str(R)]
    assert main(["norm-stats", str(data), "--quiet", "--micro-batch", "4", "--num-images", "4", *TINY_VFM, *check]) == 0
    stats = NormStats.load(data / "norm_stats.safetensors")
    assert stats.channels == VFM_CHANNELS
    assert stats.metadata["resolution"] == str(R) and stats.metadata["num_images"] == "4"

    # train-compressor: one epoch; its weights record R
    compressor = train_compressor(data, check)
    assert compressor.is_file()
    assert int(read_safetensors_metadata(compressor)["resolution"]) == R

    # cache-semantics: semantics at the VFM grid R/16, CLS (D,), REPA (1 + (R/16)², D)
    assert main(["cache-semantics", str(data), "--compressor", str(compressor), "--repa-targets", "--quiet",
                 *check]) == 0
    cached = PreparedDataset(data, fields=("semantics", "cls", "repa"), resolution=R)
    channels = json.loads(read_safetensors_metadata(compressor)["channels"])
    for i in range(len(cached)):
        row = cached[i]
        assert row["semantics"].shape == (channels[-1], grid, grid)
        assert row["cls"].shape == (VFM_DIM,)
        assert row["repa"].shape == (1 + grid * grid, VFM_DIM)
    assert json.loads((data / "semantics.json").read_text())["resolution"] == R

    # train: a tiny SiT on the R/8 latents, R/16 tokens
    run = tmp_path / "run"
    code = main(["train", "--config", "configs/demo.yaml", f"data.dir={data}", f"run_dir={run}", "model.preset=reglue",
                 *TINY_MODEL, *FAST_TRAIN, *PREVIEW_AND_EVAL, *check])
    assert code == 0, capsys.readouterr().err
    # the EMA preview (2 samples side by side) and the in-training evaluation ran at R
    with Image.open(run / "samples" / "step-000000002.png") as preview:
        assert preview.size == (2 * R, R), preview.size
    evaluations = [row for row in read_metrics(run) if "eval/fd_dinov2_vits14" in row]
    assert [row["step"] for row in evaluations] == [2] and math.isfinite(evaluations[0]["eval/fd_dinov2_vits14"])
    model = load_sampling_model(run / "ema")
    assert model.config.input_size == latent
    assert model.config.input_size // model.config.patch_size == grid and model.config.num_patches == grid * grid
    assert model.config.in_channels == 4 + channels[-1]

    # sample and grid decode R² images with the pixel autoencoder
    samples = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(run / "ema"), "--out", str(samples), "--num-samples", "2", "--steps", "2",
                 "--mode", "ode", "--vae", "pixel", "--quiet", *check]) == 0
    with np.load(samples / "samples.npz") as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (2, R, R, 3)

    # evaluate: FD in a tiny random DINOv2's space, which resizes R² to its 224² input
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=np.stack([rows[i]["images"].permute(1, 2, 0).numpy() for i in range(len(rows))]))
    assert main(["evaluate", "--ref", str(reference), "--samples", str(samples / "samples.npz"), "--metrics",
                 "fd_dinov2", "--vfm-weights", "random", "--vfm-arch", "embed_dim=32,depth=2,num_heads=2",
                 "--micro-batch", "4", "--quiet", *check]) == 0
    assert math.isfinite(json.loads((samples / "samples.metrics.json").read_text())["fd_dinov2"])
    assert main(["grid", "--ckpt", str(run / "ema"), "--classes", "0,1", "--per-class", "1", "--steps", "2",
                 "--vae", "pixel", "--out", str(tmp_path / "grid.png"), *check]) == 0
    with Image.open(tmp_path / "grid.png") as image:
        image.load()
        width, height = image.size
    # one R-wide column per class; per_class rows of R² images under the 16-pixel class-label header
    assert width == 2 * R and (height - GRID_HEADER) == R, (width, height)


# ----------------------------------------------------------------------------- the supported sides
def test_check_resolution_accepts_exactly_the_multiples_of_64_from_64_to_512():
    assert RESOLUTIONS == (64, 128, 192, 256, 320, 384, 448, 512)
    for R in range(1100):
        if R in RESOLUTIONS:
            assert check_resolution(R) == R
            assert latent_size(R) == R // 8 and token_grid(R) == R // 16
        else:
            with pytest.raises(ValueError, match=SUPPORTED_MESSAGE):
                check_resolution(R)


@pytest.mark.parametrize("value", [0, 63, 576, -64, 1024])
def test_check_resolution_refuses_unsupported_integers(value):
    with pytest.raises(ValueError, match=SUPPORTED_MESSAGE):
        check_resolution(value)
    with pytest.raises(ValueError, match=SUPPORTED_MESSAGE):
        latent_size(value)
    with pytest.raises(ValueError, match=SUPPORTED_MESSAGE):
        token_grid(value)


@pytest.mark.parametrize("value", [256.0, True, False, "256", None])
def test_check_resolution_refuses_non_integers(value):
    with pytest.raises(ValueError, match="must be an integer"):
        check_resolution(value)


@pytest.mark.parametrize("value,needle", [
    ("96", SUPPORTED_MESSAGE), ("1024", SUPPORTED_MESSAGE), ("32", SUPPORTED_MESSAGE), ("0", SUPPORTED_MESSAGE),
    ("abc", "must be an integer"), ("256.0", "must be an integer"),
])
def test_prepare_refuses_an_unsupported_resolution_as_a_usage_error(tmp_path, capsys, value, needle):
    src = write_synthetic_dataset(tmp_path / "src", images_per_class=1, size=64, seed=0, num_classes=1)
    dst = tmp_path / "data"
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(src), str(dst), "--resolution", value, "--vae", "pixel", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--resolution" in err and needle in err
    assert not dst.exists()


@pytest.mark.parametrize("value", ["100", "1024", "abc"])
def test_demo_refuses_an_unsupported_resolution_as_a_usage_error(tmp_path, capsys, value):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out), "--resolution", value, "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--resolution" in err and (SUPPORTED_MESSAGE in err or "must be an integer" in err)
    assert not out.exists()


# ----------------------------------------------------------------------------- files made at another R
@pytest.fixture(scope="module")
def two_sides(tmp_path_factory):
    """A 64² and a 128² dataset, each with its own norm stats; the 64² one with a trained compressor."""
    root = tmp_path_factory.mktemp("sides")
    small = make_data(root / "64", 64)
    large = make_data(root / "128", 128)
    train_compressor(small)
    return small, large


def cache_outputs(data: Path) -> list[Path]:
    """What cache-semantics or train-compressor would have written into ``data``."""
    return [p for p in data.rglob("*") if p.name.startswith(("semantics", "cls", "repa")) or p.name == "compressor"]


def test_norm_stats_of_another_resolution_are_refused_by_cache_semantics(two_sides, capsys):
    small, large = two_sides
    code = main(["cache-semantics", str(large), "--norm-stats", str(small / "norm_stats.safetensors"),
                 "--compressor", str(small / COMPRESSOR_FILE), "--repa-targets", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "64²" in err and "128²" in err and "reglue norm-stats" in err and len(err.strip().splitlines()) == 1
    assert not (large / "semantics.json").exists() and cache_outputs(large) == []


def test_norm_stats_of_another_resolution_are_refused_by_train_compressor(two_sides, capsys):
    small, large = two_sides
    code = main(["train-compressor", str(large), "--norm-stats", str(small / "norm_stats.safetensors"),
                 "--epochs", "1", "--global-batch", "2", "--val-fraction", "0.25", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "64²" in err and "128²" in err and "reglue norm-stats" in err and len(err.strip().splitlines()) == 1
    assert not (large / "compressor").exists() and cache_outputs(large) == []


def test_norm_stats_of_another_resolution_are_refused_by_fit_pca(two_sides, tmp_path, capsys):
    small, large = two_sides
    out = tmp_path / "pca.safetensors"
    code = main(["fit-pca", str(large), "--norm-stats", str(small / "norm_stats.safetensors"), "--rank", "4",
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "64²" in err and "128²" in err and "reglue norm-stats" in err
    assert not out.exists()


def test_compressor_of_another_resolution_is_refused_by_cache_semantics(two_sides, capsys):
    small, large = two_sides
    assert NormStats.load(large / "norm_stats.safetensors").metadata["resolution"] == "128"
    code = main(["cache-semantics", str(large), "--compressor", str(small / COMPRESSOR_FILE), "--repa-targets",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "64²" in err and "128²" in err and "train-compressor" in err and len(err.strip().splitlines()) == 1
    assert str(small / COMPRESSOR_FILE) in err
    assert not (large / "semantics.json").exists() and cache_outputs(large) == []


def test_the_same_files_at_their_own_resolution_are_accepted(two_sides, tmp_path):
    """The refusals above are about the resolution, not the files: on the 64² data itself they work."""
    small, _ = two_sides
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    assert main(["cache-semantics", str(copy), "--compressor", str(small / COMPRESSOR_FILE), "--quiet"]) == 0
    assert PreparedDataset(copy, fields=("semantics",))[0]["semantics"].shape[-2:] == (4, 4)


def test_prepare_into_existing_data_at_another_resolution_is_refused(two_sides, capsys):
    small, _ = two_sides
    before = {p: p.read_bytes() for p in small.iterdir() if p.is_file()}
    shards_before = sorted(p.relative_to(small) for p in (small / "shards").rglob("*"))
    code = main(["prepare", str(small.parent / "src"), str(small), "--resolution", "128", "--vae", "pixel",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "resolution" in err
    assert (small / "manifest.json").read_bytes() == before[small / "manifest.json"]
    assert {p: p.read_bytes() for p in small.iterdir() if p.is_file()} == before
    assert sorted(p.relative_to(small) for p in (small / "shards").rglob("*")) == shards_before
    assert json.loads((small / "manifest.json").read_text())["resolution"] == 64


def refuse_online_training(data: Path, run_dir: Path, preset: str, *files: str, match: str,
                           error: type[Exception] = ValueError) -> None:
    """Online training of ``preset`` on ``data`` with the semantic ``files`` (KEY=PATH overrides) is
    refused with ``match``, before the run directory exists."""
    config = load_config("configs/demo.yaml", [
        f"data.dir={data}", f"run_dir={run_dir}", f"model.preset={preset}", "data.semantics=online",
        "data.vfm_precision=fp32", *files, *TINY_MODEL, *FAST_TRAIN])
    with pytest.raises(error, match=match):
        train(config)
    assert not run_dir.exists()


def test_online_training_with_norm_stats_of_another_resolution_is_refused_before_the_run_dir(two_sides, tmp_path):
    small, large = two_sides
    refuse_online_training(large, tmp_path / "run", "reglue", f"data.norm_stats={small / 'norm_stats.safetensors'}",
                           f"data.compressor={small / COMPRESSOR_FILE}", error=ConfigError,
                           match=r"data.norm_stats: .*64².*128².*reglue norm-stats")


def test_online_training_with_a_compressor_of_another_resolution_is_refused_before_the_run_dir(two_sides, tmp_path):
    small, large = two_sides
    refuse_online_training(large, tmp_path / "run", "reglue", f"data.compressor={small / COMPRESSOR_FILE}",
                           match=r"64².*128².*train-compressor")


# ----------------------------------------------------------------------------- --resolution as a check
@pytest.fixture(scope="module")
def small_model(two_sides, tmp_path_factory):
    """A tiny SiT trained 2 steps on the 64² data, its samples, and a 64² reference batch."""
    small, _ = two_sides
    root = tmp_path_factory.mktemp("model")
    assert main(["train", "--config", "configs/demo.yaml", f"data.dir={small}", f"run_dir={root / 'run'}",
                 "model.preset=sit", *TINY_MODEL, *FAST_TRAIN]) == 0
    images = np.stack([row["images"].permute(1, 2, 0).numpy() for row in PreparedDataset(small, fields=("images",))])
    np.savez(root / "samples.npz", arr_0=images)
    np.savez(root / "reference.npz", arr_0=images)
    return root


def data_command(name: str, small: Path, out: Path) -> list[str]:
    return {
        "norm-stats": ["norm-stats", str(small), "--out", str(out), "--num-images", "4", *TINY_VFM],
        "fit-pca": ["fit-pca", str(small), "--rank", "4", "--out", str(out)],
        "train-compressor": ["train-compressor", str(small), "--out", str(out), "--epochs", "1", "--global-batch", "2"],
        "cache-semantics": ["cache-semantics", str(small), "--compressor", str(small / COMPRESSOR_FILE)],
        "verify": ["verify", str(small)],
    }[name]


@pytest.mark.parametrize("command", ["norm-stats", "fit-pca", "train-compressor", "cache-semantics", "verify"])
def test_data_commands_refuse_a_resolution_that_is_not_the_prepared_datas(two_sides, tmp_path, capsys, command):
    small, _ = two_sides
    before = sorted(p.relative_to(small) for p in small.rglob("*"))
    out = tmp_path / "out"
    code = main([*data_command(command, small, out), "--resolution", "128", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    assert "resolution 128 was asked for" in err and "at 64²" in err and "manifest.json" in err
    assert "--resolution 128" in err and "reglue prepare" in err  # the fix: prepare at 128² into a new folder
    assert not out.exists() and sorted(p.relative_to(small) for p in small.rglob("*")) == before


def test_train_refuses_a_resolution_that_is_not_the_prepared_datas_before_the_run_dir(two_sides, tmp_path, capsys):
    small, _ = two_sides
    run_dir = tmp_path / "run"
    args = ["train", "--config", "configs/demo.yaml", f"data.dir={small}", f"run_dir={run_dir}", "model.preset=sit",
            *TINY_MODEL, *FAST_TRAIN]
    assert main([*args, "--resolution", "128"]) == 2
    err = capsys.readouterr().err
    assert "data.resolution: resolution 128 was asked for" in err and "at 64²" in err
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match=r"data.resolution: .*128 was asked for.*64²"):
        train(load_config("configs/demo.yaml", [*args[3:], "data.resolution=128"]))
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="data.resolution.*multiple of 64"):
        load_config("configs/demo.yaml", [*args[3:], "data.resolution=96"])
    # its own resolution trains, with the option between KEY=VALUE overrides
    assert main([*args[:4], "--resolution", "64", *args[4:]]) == 0
    assert (run_dir / "ema").is_dir()


@pytest.mark.parametrize("command", ["sample", "grid", "evaluate"])
def test_model_and_sample_commands_refuse_another_resolution(small_model, tmp_path, capsys, command):
    out = tmp_path / "out"
    ckpt = str(small_model / "run" / "ema")
    args = {
        "sample": ["sample", "--ckpt", ckpt, "--out", str(out), "--num-samples", "2", "--steps", "2", "--vae", "pixel"],
        "grid": ["grid", "--ckpt", ckpt, "--classes", "0,1", "--steps", "2", "--vae", "pixel", "--out", str(out)],
        "evaluate": ["evaluate", "--ref", str(small_model / "reference.npz"), "--samples",
                     str(small_model / "samples.npz"), "--metrics", "fd_dinov2", "--vfm-weights", "random",
                     "--vfm-arch", "embed_dim=32,depth=2,num_heads=2", "--out", str(out)],
    }[command]
    assert main([*args, "--resolution", "128"]) == 2
    err = capsys.readouterr().err
    assert "resolution 128 was asked for" in err and "at 64²" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main([*args, "--resolution", "64"]) == 0  # its own resolution is accepted
    assert out.exists()


# ----------------------------------------------------------------------------- PCA, resume and init at another R
def test_a_pca_of_another_resolution_is_refused_by_cache_semantics_and_online_training(two_sides, tmp_path, capsys):
    small, large = two_sides
    pca = tmp_path / "pca64.safetensors"
    assert main(["fit-pca", str(small), "--rank", "4", "--out", str(pca), "--quiet"]) == 0
    assert read_safetensors_metadata(pca)["resolution"] == "64"
    code = main(["cache-semantics", str(large), "--pca", str(pca), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "64²" in err and "128²" in err and "reglue fit-pca" in err and str(pca) in err
    assert not (large / "semantics.json").exists() and cache_outputs(large) == []
    refuse_online_training(large, tmp_path / "run", "redi", f"data.pca={pca}", match=r"64².*128².*reglue fit-pca")


def test_resuming_on_data_now_at_another_resolution_is_refused(two_sides, tmp_path):
    small, large = two_sides
    data, run_dir = tmp_path / "data", tmp_path / "run"
    shutil.copytree(small, data)
    args = [f"data.dir={data}", f"run_dir={run_dir}", "model.preset=sit", *TINY_MODEL, *FAST_TRAIN]
    assert train(load_config("configs/demo.yaml", args)).step == 2
    shutil.rmtree(data)
    shutil.copytree(large, data)  # the same path now holds 128² data
    more = load_config("configs/demo.yaml", [*args, "train.max_steps=3"])
    with pytest.raises(ConfigError, match=r"the checkpoint's model was trained on 64² images, but data.dir holds 128²"):
        train(more, resume="auto")
    shutil.rmtree(data)
    shutil.copytree(small, data)
    assert train(more, resume="auto").step == 3  # back on its own data it resumes


def test_weights_of_another_resolution_are_refused_as_a_starting_point(small_model, two_sides, tmp_path, capsys):
    import argparse

    from reglue import checkpoint as ckpt
    from reglue.training.trainer import trained_image_size

    _, large = two_sides
    _, payload = ckpt.latest_valid_checkpoint(small_model / "run", print)
    assert trained_image_size(payload["model"]) == 64
    authors = tmp_path / "authors64.pt"
    torch.save({"model": {"module." + k: v for k, v in payload["model"].items()}, "ema": payload["ema"], "opt": {},
                "steps": 2, "args": argparse.Namespace(resolution=64)}, authors)
    run_dir = tmp_path / "run"
    args = ["--config", "configs/demo.yaml", f"data.dir={large}", f"run_dir={run_dir}", "model.preset=sit",
            *TINY_MODEL, *FAST_TRAIN]
    # model.init_from: the weights' position table says 64²
    assert main(["train", *args, f"model.init_from={authors}"]) == 2
    err = capsys.readouterr().err
    assert f"model.init_from {authors} was trained on 64² images, but data.dir holds 128²" in err
    # --from-authors: the same refusal, with the same fix (not "leave the resolution out": none was given)
    assert main(["train", "--from-authors", str(authors), *args]) == 2
    assert f"model.init_from {authors} was trained on 64² images, but data.dir holds 128²" in capsys.readouterr().err
    # with --resolution 128 the user's check passes (the data are 128²) and the weights are still refused
    assert main(["train", "--resolution", "128", "--from-authors", str(authors), *args]) == 2
    assert "was trained on 64² images, but data.dir holds 128²" in capsys.readouterr().err
    # a data.resolution among the overrides wins over --resolution, like every override
    assert main(["train", "--resolution", "128", "--from-authors", str(authors), *args, "data.resolution=256"]) == 2
    assert "resolution 256 was asked for" in capsys.readouterr().err
    assert not run_dir.exists()
