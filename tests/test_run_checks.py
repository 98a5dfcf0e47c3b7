"""`reglue train` on demo-prepared data: configs/demo.yaml trains every preset; every setting that
cannot work is refused before the run directory gets a file; λ_s is logged; workers persist."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from reglue import checkpoint as ckpt
from reglue.cli import main
from reglue.config import ConfigError, load_config
from reglue.demo.settings import MODEL, RANDOM_VFM
from reglue.training.inputs import vfm_record
from reglue.training.metrics import read_metrics
from reglue.training.trainer import train

FAST = ["train.max_steps=2", "log.every=1", "checkpoint.every=100"]
SEMANTIC_PRESETS = ("redi", "reglue")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def demo_config(data: Path, run_dir: Path, *overrides: str):
    return load_config("configs/demo.yaml", [f"data.dir={data}", f"run_dir={run_dir}", *overrides])


def assert_refused(data: Path, run_dir: Path, match: str, *overrides: str) -> None:
    """Loading or training the config fails with a ConfigError matching ``match``; no file was written."""
    with pytest.raises(ConfigError, match=match):
        train(demo_config(data, run_dir, *FAST, *overrides))
    assert not run_dir.exists()


def test_demo_config_uses_the_demo_model():
    model = yaml.safe_load(Path("configs/demo.yaml").read_text())["model"]
    assert {key: model[key] for key in MODEL} == MODEL


@pytest.mark.parametrize("preset", ["sit", "repa", "redi", "reg", "reglue"])
def test_demo_config_trains_every_preset_on_demo_data(demo_data, tmp_path, capsys, preset):
    run_dir = tmp_path / "run"
    code = main(["train", "--config", "configs/demo.yaml", f"data.dir={demo_data(preset)}", f"model.preset={preset}",
                 f"run_dir={run_dir}", *FAST])
    assert code == 0, capsys.readouterr().err
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    assert ("lambda/sem" in rows[-1]) == (preset in SEMANTIC_PRESETS)  # only presets with a semantic term
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["vfm"]
    made_with = replace(RANDOM_VFM, layers=(3,)) if preset == "redi" else RANDOM_VFM  # ReDi: the last block only
    assert recorded == (None if preset == "sit" else vfm_record(made_with))  # null resolved to the cache's VFM


@pytest.mark.parametrize("semantics", ["cached", "online"])
def test_token_grid_other_than_the_repa_grid_is_refused_before_any_file(demo_data, tmp_path, semantics):
    data = demo_data("reglue")
    online = [f"data.compressor={data / 'compressor' / 'compressor_best.safetensors'}", "data.vfm_precision=fp32"]
    # the demo's 128² data: 16×16 latents, an 8×8 VFM grid; patch 8 gives 2×2 tokens
    assert_refused(data, tmp_path / "run", r"model.name: SiT-S/8 .* 2×2 token grid .* 8×8 grid; use patch 2 "
                   r"\(model.name=SiT-S/2\)", "model.name=SiT-S/8", f"data.semantics={semantics}",
                   *(online if semantics == "online" else []))


def test_the_cli_refuses_the_grid_mismatch_in_one_line_without_writing(demo_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--config", "configs/demo.yaml", f"data.dir={demo_data('reglue')}", "model.name=SiT-S/8",
                 f"run_dir={run_dir}"])
    assert code == 2 and "error: model.name: SiT-S/8" in capsys.readouterr().err
    assert not run_dir.exists()


def test_lambda_sem_schedule_out_of_order_is_refused_when_loaded(demo_data, tmp_path):
    assert_refused(demo_data("reglue"), tmp_path / "run", r"loss.lambda_sem_schedule: milestone steps must increase",
                   "loss.lambda_sem_schedule=[[5, 0.5], [2, 0.25]]")
    assert_refused(demo_data("reglue"), tmp_path / "run", r"loss.lambda_sem_schedule: expected \[step, factor\]",
                   "loss.lambda_sem_schedule=[[5, 0.5, 1]]")


def test_fp16_without_a_gpu_is_refused_before_any_file(demo_data, tmp_path, monkeypatch):
    from reglue.training import inputs

    monkeypatch.setattr(inputs, "on_cpu_only", lambda: True)
    assert_refused(demo_data("reglue"), tmp_path / "run", r"train.precision: fp16 needs a GPU",
                   "train.precision=fp16")


def test_online_semantics_without_a_usable_compressor_or_pca_are_refused_before_any_file(demo_data, tmp_path):
    from safetensors.torch import save_file

    from reglue.models.compressor import PCAProjection, SemanticCompressor

    reglue, redi = demo_data("reglue"), demo_data("redi")
    online = ["data.semantics=online", "data.vfm_precision=fp32"]
    assert_refused(reglue, tmp_path / "run", r"data.compressor: invalid value None", *online)
    assert_refused(redi, tmp_path / "run", r"data.pca: invalid value None", "model.preset=redi", *online)
    assert_refused(reglue, tmp_path / "run", r"data.compressor: .*missing.safetensors not found; train one",
                   f"data.compressor={tmp_path / 'missing.safetensors'}", *online)
    assert_refused(redi, tmp_path / "run", r"data.pca: .*missing.safetensors not found; fit one",
                   "model.preset=redi", f"data.pca={tmp_path / 'missing.safetensors'}", *online)
    narrow = tmp_path / "narrow.safetensors"  # the demo VFM gives 4 blocks × 32 = 128 channels
    save_file(SemanticCompressor((64, 32, 16)).state_dict(), str(narrow))
    with pytest.raises(ValueError, match=r"narrow.safetensors maps 64 VFM channels to 16, but the VFM gives 128 "
                       r"\(4 blocks × 32\): it was made for another VFM"):
        train(demo_config(reglue, tmp_path / "run", *FAST, f"data.compressor={narrow}", *online))
    assert not (tmp_path / "run").exists()
    low_rank = tmp_path / "rank4.safetensors"
    PCAProjection(32, 4).save(low_rank)  # ReDi: the last of the demo VFM's blocks, 32 channels
    assert_refused(redi, tmp_path / "run", r"data.pca: .* maps 32 VFM channels to 4, .* redi preset models 8",
                   "model.preset=redi", f"data.pca={low_rank}", *online)
    assert_refused(reglue, tmp_path / "run", r"data.norm_stats: .*absent.safetensors not found",
                   f"data.norm_stats={tmp_path / 'absent.safetensors'}",
                   f"data.compressor={reglue / 'compressor' / 'compressor_best.safetensors'}", *online)


OTHER_VFM = ("data.vfm={name: dinov2_vitb14_reg, weights: random, layers: [0, 1], "
             "arch: {embed_dim: 32, depth: 4, num_heads: 2}}")  # the demo VFM on blocks 0, 1 instead of the last 4


@pytest.mark.parametrize("semantics", ["cached", "online"])
def test_semantics_of_another_vfm_are_refused_naming_both(demo_data, tmp_path, semantics):
    data = demo_data("reglue")
    online = [f"data.compressor={data / 'compressor' / 'compressor_best.safetensors'}", "data.vfm_precision=fp32"]
    with pytest.raises(ConfigError, match=r"data.vfm: .*\"layers\": null.*\"layers\": \[0, 1\]") as refused:
        train(demo_config(data, tmp_path / "run", *FAST, OTHER_VFM, f"data.semantics={semantics}",
                          *(online if semantics == "online" else [])))
    assert "set data.vfm to" in str(refused.value) and not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="data.vfm: invalid value"):
        demo_config(data, tmp_path / "run", "data.vfm={name: dinov2_vitb14_reg, patch: 16}")


def test_the_run_vfm_given_in_part_is_accepted_and_a_resume_on_another_cache_refused(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data("reglue"), data)
    matching = "data.vfm={weights: random, arch: {embed_dim: 32, depth: 4, num_heads: 2}}"  # VFMSpec defaults fill in
    assert train(demo_config(data, tmp_path / "run", *FAST, matching)).step == 2
    info = json.loads((data / "semantics.json").read_text())
    other = json.loads(info["vfm"]) | {"weights": "elsewhere/dinov2.pth"}
    (data / "semantics.json").write_text(json.dumps(info | {"vfm": json.dumps(other, sort_keys=True)}))
    with pytest.raises(ConfigError, match=r"data.vfm.weights: was 'random', now 'elsewhere/dinov2.pth'"):
        train(demo_config(data, tmp_path / "run", "train.max_steps=3"), resume="auto")


def test_lambda_sem_is_logged_and_follows_the_schedule(demo_data, tmp_path):
    train(demo_config(demo_data("reglue"), tmp_path / "run", "train.max_steps=4", "log.every=1",
                      "loss.lambda_sem=2.0", "loss.lambda_sem_schedule=[[2, 0.5], [3, 0.25]]"))
    # metrics step s logs the loss of step index s - 1: factor 0.5 from index 2, 0.25 from index 3
    assert [row["lambda/sem"] for row in read_metrics(tmp_path / "run")] == [2.0, 2.0, 1.0, 0.5]


def test_dataloader_workers_persist_across_epochs_and_resume_exactly(demo_data, tmp_path, monkeypatch):
    """16 images, batch 4: 10 steps walk 3 epochs through one DataLoader (one set of workers), and a
    run stopped mid-epoch resumes bit-identically."""
    from reglue.training import trainer as trainer_module

    loaders = []
    real_loader = trainer_module.training_loader

    def counting_loader(*args, **kwargs):
        loaders.append(kwargs["num_workers"])
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "training_loader", counting_loader)
    data, steps = demo_data("reglue"), ["train.max_steps=10", "data.num_workers=1", "checkpoint.every=100"]
    train(demo_config(data, tmp_path / "straight", *steps))
    assert loaders == [1]
    assert train(demo_config(data, tmp_path / "resumed", *steps), stop_after_steps=6).step == 6
    assert train(demo_config(data, tmp_path / "resumed", *steps), resume="auto").step == 10
    _, a = ckpt.latest_valid_checkpoint(tmp_path / "straight", print)
    _, b = ckpt.latest_valid_checkpoint(tmp_path / "resumed", print)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
