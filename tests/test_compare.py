"""`reglue compare` on a tiny prepared dataset: end to end, after a kill, under two processes, refusals,
and the data copies that keep DATA untouched."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_processes
from reglue.cli import main
from reglue.compare import CompareSettings, run_compare
from reglue.compare.settings import ComparePaths
from reglue.compare.stages import STATE_FILE, _link
from reglue.data import store
from reglue.data.prepare import PrepareSettings, run_prepare
from reglue.data.synthetic import write_synthetic_dataset
from reglue.demo.settings import RANDOM_VFM
from reglue.encoders.pixel import PIXEL_AUTOENCODER
from reglue.training.inputs import vfm_record

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread

RUN = {"model": {"name": "SiT-S/2", "depth": 2, "hidden_size": 64, "num_heads": 4, "encoder_depth": 1,
                 "projector_dim": 64},
       "data": {"num_workers": 0}, "optim": {"lr": 1e-3},
       "train": {"global_batch": 8, "max_steps": 6, "precision": "fp32", "ema_decay": 0.9},
       "checkpoint": {"every": 2, "keep_last": 1}, "log": {"tensorboard": False, "sample_every": 0}}
TINY = {"presets": ("sit", "reglue"), "seeds": 2, "vfm": vfm_record(RANDOM_VFM), "run": RUN,
        "eval": {"num_samples": 4, "batch": 4, "micro_batch": 4, "sampler": {"steps": 2}, "every": 3},
        "compressor": {"epochs": 1, "global_batch": 16, "widths": [32, 16]}, "vfm_precision": "fp32",
        "grid_rows": 1, "grid_steps": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 classes × 6 images of the colours set at 64², prepared with the pixel autoencoder."""
    root = tmp_path_factory.mktemp("compare-data")
    write_synthetic_dataset(root / "images", 6, 64, seed=0, num_classes=4)
    run_prepare(PrepareSettings(source=str(root / "images"), resolution=64, vae=PIXEL_AUTOENCODER, shard_size=16),
                root / "data", show_progress=False)
    return root / "data"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` (and itself) with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in [folder, *folder.rglob("*")]}


def finals(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {preset: {seed: run["final"] for seed, run in entry["runs"].items()}
            for preset, entry in results["presets"].items()}


@pytest.fixture(scope="module")
def compared(data, tmp_path_factory):
    """Two presets × two seeds, straight through; returns (out, DATA's snapshot before)."""
    before = snapshot(data)
    out = tmp_path_factory.mktemp("compare")
    run_compare(data, out, CompareSettings(**TINY), progress=False)
    return out, before


def test_two_presets_by_two_seeds_are_trained_evaluated_and_reported(compared):
    out, _ = compared
    results = json.loads((out / "results.json").read_text())
    assert list(results["presets"]) == ["sit", "reglue"]
    fd = results["fd_key"]
    assert fd == "eval/fd_dinov2_vitb14_reg" and set(results["metrics"]) == {fd, "eval/class_accuracy"}
    for entry in results["presets"].values():
        assert list(entry["runs"]) == ["0", "1"]
        for run in entry["runs"].values():
            assert list(run["series"][fd]) == ["3", "6"]  # eval.every 3 and the last step
        assert len(entry["final"]["loss/latent"]["values"]) == 2
    report = (out / "report.md").read_text()
    for preset in ("sit", "reglue"):
        assert re.search(rf"^\| {preset} \| [0-9.e+-]+ ± [0-9.e+-]+ \| ", report, re.MULTILINE), preset
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert not [link for link in links if not (out / link).exists()]
    config = yaml.safe_load((out / "runs" / "reglue" / "seed-1" / "config.yaml").read_text())
    assert config["train"]["seed"] == 1 and config["eval"]["seed"] == 0 and config["model"]["depth"] == 2
    assert config["data"]["dir"] == str(ComparePaths(out).copy("compressor"))
    assert config["eval"]["vfm"]["weights"] == "random" and config["log"]["every"] == 1  # ≤ steps / 150


def test_nothing_is_written_into_the_data_and_the_copies_link_its_arrays(compared, data):
    out, before = compared
    assert snapshot(data) == before
    paths = ComparePaths(out)
    for kind in ("compressor",):  # sit shares the compressor's copy: one copy for both presets
        copy = paths.copy(kind)
        assert os.path.samefile(copy / "shards" / "shard-00000" / "images.npy",
                                data / "shards" / "shard-00000" / "images.npy")
        assert (copy / "shards" / "shard-00000" / "semantics.npy").is_file()
    assert sorted(p.name for p in (out / "datasets").iterdir()) == ["compressor"]


def test_a_comparison_killed_mid_training_resumes_to_the_same_results(compared, data, tmp_path):
    """SIGKILL while reglue's first seed trains (a checkpoint exists), then the same command again: the
    killed run resumes from its checkpoint and every final value equals the uninterrupted comparison's."""
    straight, _ = compared
    out = tmp_path / "killed"
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({**TINY, "presets": list(TINY["presets"]), "run": {
        **RUN, "train": {**RUN["train"], "max_steps": 6}}}))
    command = [sys.executable, "-m", "reglue.cli", "compare", str(data), "--out", str(out), "--config", str(config),
               "--quiet"]
    checkpoint = out / "runs" / "reglue" / "seed-0" / "checkpoints"
    process = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any(checkpoint.glob("step-*.pt")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    stages = [stage for stage, _ in json.loads((out / STATE_FILE).read_text())["stages"]]
    assert "train sit seed 1" in stages and "train reglue seed 0" not in stages, stages  # killed in that run
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train sit seed 0: finished in an earlier run, skipped" in result.stderr
    assert "resumed from" in result.stderr
    assert finals(out) == finals(straight)


def test_a_rerun_with_other_settings_or_into_a_foreign_folder_is_refused(compared, data, tmp_path, capsys):
    out, _ = compared
    with pytest.raises(ValueError, match="seeds: was 2, now 3"):
        run_compare(data, out, CompareSettings(**{**TINY, "seeds": 3}), progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["compare", str(data), "--out", str(tmp_path), "--quiet", "--vfm-weights", "random"]) == 2
    assert "not a comparison folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_settings_that_cannot_work_are_refused_before_any_file(data, tmp_path):
    with pytest.raises(ValueError, match=r"run.model.preset is set by the comparison itself"):
        CompareSettings(**{**TINY, "run": {**RUN, "model": {**RUN["model"], "preset": "sit"}}})
    with pytest.raises(ValueError, match=r"presets reglue read the VFM: give its weights"):
        CompareSettings(**{**TINY, "vfm": None})
    with pytest.raises(ValueError, match="unknown config key"):
        run_compare(data, tmp_path / "a", CompareSettings(**{**TINY, "run": {**RUN, "optim": {"rate": 1}}}),
                    progress=False)
    with pytest.raises(ValueError, match="compressor.widths must end in 16"):
        run_compare(data, tmp_path / "b", CompareSettings(**{**TINY, "compressor": {"widths": [32, 8]}}),
                    progress=False)
    weights = {**TINY, "vfm": {"name": "dinov2_vitb14_reg", "weights": str(tmp_path / "dinov2.pth")}}
    with pytest.raises(ValueError, match=r"vfm.weights: .*dinov2.pth not found; give the VFM dinov2_vitb14_reg's"):
        run_compare(data, tmp_path / "d", CompareSettings(**weights), progress=False)
    scored = {**TINY, "eval": {**TINY["eval"], "vfm": {"name": "dinov2_vitl14", "weights": None}}}
    with pytest.raises(ValueError, match=r"eval.vfm.weights: not set; give the evaluation space dinov2_vitl14"):
        run_compare(data, tmp_path / "e", CompareSettings(**scored), progress=False)
    with pytest.raises(ValueError, match="a comparison needs class labels"):
        run_compare(data, tmp_path / "f", CompareSettings(**{**TINY, "run": {**RUN, "data": {"unconditional": True}}}),
                    progress=False)
    with pytest.raises(FileNotFoundError, match="not a finished reglue dataset"):
        run_compare(tmp_path / "nothing", tmp_path / "c", CompareSettings(**TINY), progress=False)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"]


def test_the_cli_maps_its_flags_onto_the_settings(data, tmp_path, monkeypatch):
    import reglue.compare

    given = []
    monkeypatch.setattr(reglue.compare, "run_compare", lambda data, out, settings, progress: given.append(
        (data, out, settings)) or (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        main(["compare", str(data), "--out", str(tmp_path / "o"), "--presets", "sit,repa", "--seeds", "2", "--steps",
              "500", "--model", "SiT-B/2", "--global-batch", "64", "--lr", "2e-4", "--eval-every", "100",
              "--eval-samples", "1000", "--vfm-weights", "random", "--vfm-arch", "embed_dim=32,depth=4,num_heads=2",
              "run.loss.semantic_norm=true", "eval.metrics=[fd]"])
    _, out, settings = given[0]
    assert out == str(tmp_path / "o")
    assert settings.presets == ("sit", "repa") and settings.seeds == 2
    assert settings.run == {"train": {"max_steps": 500, "global_batch": 64}, "model": {"name": "SiT-B/2"},
                            "optim": {"lr": 2e-4}, "loss": {"semantic_norm": True}}
    assert settings.eval == {"every": 100, "num_samples": 1000, "metrics": ["fd"]}
    assert settings.vfm == {"weights": "random", "arch": {"embed_dim": 32, "depth": 4, "num_heads": 2}}


def test_link_prepared_keeps_only_what_prepare_wrote_and_verifies(data, tmp_path):
    from reglue.data.integrity import verify_dataset
    from reglue.data.records import open_records

    cached = tmp_path / "cached"
    store.link_prepared(data, cached)
    info = store.read_shard_info(cached, 0)
    info[store.FILES]["cls.npy"] = {"bytes": 1, "blake2b": "0" * 32}  # as if a cache had been recorded there
    store.write_shard_info(store.shard_dir(cached, 0), info)
    copy = tmp_path / "copy"
    assert store.link_prepared(cached, copy) == 3 * len(store.read_manifest(data)["shards"])
    assert set(store.read_shard_info(copy, 0)[store.FILES]) == {"images.npy", "moments.npy", "labels.npy"}
    assert not verify_dataset(open_records(copy)).damaged
    np.testing.assert_array_equal(store.open_array(copy, 1, "labels"), store.open_array(data, 1, "labels"))
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    with pytest.raises(ValueError, match="copy exists; link a prepared dataset into a new folder"):
        store.link_prepared(data, copy)
    # the compare stage redoes a copy its ledger does not record (interrupted): the leftovers go first
    (copy / "half-written").write_text("")
    (tmp_path / ".copy.tmp-123" / "shards").mkdir(parents=True)
    _link(data, copy)
    assert not (copy / "half-written").exists() and not (tmp_path / ".copy.tmp-123").exists()
    assert not verify_dataset(open_records(copy)).damaged


def test_two_processes_run_every_stage_and_agree(data, tmp_path):
    """torchrun with two processes: caches, training and evaluation on both, the ledger and report once."""
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({**TINY, "presets": ["sit", "reglue"], "seeds": 1}))
    run_processes(["compare", str(data), "--out", str(tmp_path / "out"), "--config", str(config), "--quiet"],
                  processes=2)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["presets"]) == ["sit", "reglue"]
    stages = [stage for stage, _ in json.loads((tmp_path / "out" / STATE_FILE).read_text())["stages"]]
    assert stages[-1] == "report" and stages.count("train reglue seed 0") == 1


def test_the_shipped_imagenet_subset_config_resolves_and_asks_for_its_weights(data, tmp_path, capsys):
    from reglue.compare import check_settings
    from reglue.config import load_settings

    path = Path(__file__).resolve().parents[1] / "configs" / "compare" / "imagenet_subset_b2.yaml"
    weights = {name: tmp_path / name for name in ("dinov2_vitb14_reg4_pretrain.pth", "dinov2_vitl14_pretrain.pth")}
    for file in weights.values():
        file.write_bytes(b"")
    settings = load_settings(CompareSettings, path, [f"vfm.weights={weights['dinov2_vitb14_reg4_pretrain.pth']}",
                                                      f"eval.vfm.weights={weights['dinov2_vitl14_pretrain.pth']}"])
    config = check_settings(ComparePaths(tmp_path / "out"), settings)[("sit", 0)]
    assert settings.presets == ("sit", "repa", "redi", "reg", "reglue") and settings.seeds == 2
    assert (config.model.name, config.train.global_batch, config.optim.lr) == ("SiT-B/2", 256, 1e-4)
    assert config.eval.vfm["name"] == "dinov2_vitl14" and config.eval.every == 10_000
    assert main(["compare", str(data), "--out", str(tmp_path / "o"), "--config", str(path)]) == 2
    assert "vfm.weights: not set" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_every_experiment_arm_is_the_demo_comparison_with_its_one_change(tmp_path, monkeypatch):
    """scripts/toy_science.py (docs/science.md): each arm resolves to valid compare settings that differ from
    the demo's comparison only in the arm's presets, its one run-config change and (data arms) the data size."""
    import importlib.util
    from dataclasses import asdict

    from reglue.compare import check_settings
    from reglue.demo.settings import DemoPaths, DemoSettings
    from reglue.demo.stages import compare_settings

    spec = importlib.util.spec_from_file_location("toy_science", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "toy_science.py")
    science = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_science", science)  # its dataclasses look their module up there
    spec.loader.exec_module(science)
    demo = tmp_path / "demo"
    (demo / "teacher").mkdir(parents=True)
    (demo / "teacher" / "teacher.pth").write_bytes(b"")
    (demo / "teacher" / "teacher.json").write_text(json.dumps(
        {"vfm": "dinov2_vitb14_reg", "arch": {"embed_dim": 96, "depth": 4, "num_heads": 3}, "weights": "teacher.pth"}))
    (demo / "demo.json").write_text(json.dumps({**DemoSettings(presets=("sit", "reglue")).to_json(), "stages": []}))
    reference = asdict(compare_settings(DemoPaths(demo), DemoSettings(presets=("sit", "reglue"))))
    for experiment in science.EXPERIMENTS:
        assert set(experiment.presets) <= {p for arm in experiment.arms for p in science.ARMS[arm].presets}
        for pair in experiment.contrasts:  # each side is a preset its arm trains
            assert all(arm in experiment.arms and preset in science.ARMS[arm].presets for preset, arm in pair), pair
    for name, arm in science.ARMS.items():
        settings = science.arm_settings(arm, demo)
        check_settings(ComparePaths(tmp_path / name), settings)
        changed = {key for key, value in asdict(settings).items() if value != reference[key]}
        expected = {"presets", "run"} | ({"eval", "compressor", "norm_stats_images", "pca_images"} if arm.large_data
                                         else set())
        assert changed <= expected, name
        assert science.merged(reference["run"], arm.run) == settings.run, name
        if arm.large_data:
            assert settings.eval["reference_images"] == 8 * science.LARGE_IMAGES_PER_CLASS
