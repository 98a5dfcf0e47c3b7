"""Where a run finds its inputs: absolute paths in what it records, and inputs that moved between a
checkpoint and its resume (a dataset staged to a node's local disk, a VAE or VFM copied elsewhere)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from reglue import checkpoint as ckpt
from reglue.config import ConfigError
from reglue.data import store
from reglue.training.inputs import _same_weights
from reglue.training.locations import absolute_paths, moved_inputs
from reglue.training.trainer import train
from test_prepare import tiny_vae_dir
from test_train import cached_data, config_for  # noqa: F401 (cached_data is a fixture)


def final_state(run_dir):
    _, payload = ckpt.latest_valid_checkpoint(run_dir, print)
    return payload


def test_a_resume_finds_its_dataset_at_a_new_path_when_the_content_is_the_same(cached_data, tmp_path):
    straight = train(config_for(cached_data, "place-straight", "train.max_steps=4"))
    assert straight.step == 4
    first = train(config_for(cached_data, "place-moved", "train.max_steps=4"), stop_after_steps=2)
    assert first.stopped_early
    staged = tmp_path / "node-local" / "data"  # what a job copying the data to its node's disk does
    shutil.copytree(cached_data / "data", staged)
    resumed = train(config_for(cached_data, "place-moved", "train.max_steps=4", f"data.dir={staged}"), resume="auto")
    assert resumed.step == 4
    a, b = final_state(cached_data / "place-straight"), final_state(cached_data / "place-moved")
    assert all(torch.equal(a[part][key], b[part][key]) for part in ("model", "ema") for key in a[part])
    assert b["config"]["data"]["dir"] == str(staged) and b["inputs"]["data.dir"]["path"] == str(staged)
    assert a["inputs"]["data.dir"]["fingerprint"] == b["inputs"]["data.dir"]["fingerprint"]

    other = tmp_path / "other" / "data"  # the same files but other classes: other content
    shutil.copytree(cached_data / "data", other)
    manifest = json.loads((other / store.MANIFEST).read_text())
    manifest["class_names"] = [name + "-x" for name in manifest["class_names"]]
    (other / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"data.dir: the run read {staged} .* but {other} holds other content"):
        train(config_for(cached_data, "place-moved", "train.max_steps=6", f"data.dir={other}"), resume="auto")


def test_relative_paths_are_recorded_absolute(cached_data, monkeypatch):
    config = config_for(cached_data, "x", "train.max_steps=1", "data.dir=data", "run_dir=relative-run")
    monkeypatch.chdir(cached_data)  # the relative paths are read from here
    train(config)
    recorded = yaml.safe_load((cached_data / "relative-run" / "config.yaml").read_text())
    assert recorded["data"]["dir"] == str(cached_data / "data") and recorded["run_dir"] == str(cached_data / "relative-run")
    manifest = json.loads((cached_data / "data" / store.MANIFEST).read_text())
    assert manifest["vae"] == str(cached_data / "vae") and len(manifest["vae_fingerprint"]) == 64  # prepare's record
    assert recorded["data"]["vae"] == manifest["vae"]  # previews and evaluations decode with the data's VAE


def test_data_vae_may_name_a_copy_of_the_datas_vae_but_not_another_vae(cached_data, tmp_path):
    copy = tmp_path / "vae-copy"
    shutil.copytree(cached_data / "vae", copy)
    train(config_for(cached_data, "vae-copy", "train.max_steps=1", f"data.vae={copy}", "log.sample_every=1"))
    assert (cached_data / "vae-copy" / "samples" / "step-000000001.png").is_file()  # decoded with the copy
    other = tiny_vae_dir(tmp_path / "other-vae")
    weights = other / "diffusion_pytorch_model.safetensors"
    save_file({name: tensor + 0.01 for name, tensor in load_file(weights).items()}, weights)  # other weights
    with pytest.raises(ConfigError, match=r"data.vae: .*other-vae .* is not the VAE .* was encoded with"):
        train(config_for(cached_data, "vae-other", "train.max_steps=1", f"data.vae={other}"))
    assert not (cached_data / "vae-other").exists()


def test_moved_inputs_are_free_only_with_the_recorded_content():
    recorded = {"data.dir": {"path": "/a/data", "fingerprint": "f1"}, "data.pca": {"path": "/a/pca", "fingerprint": "p"}}
    same_place = {"data.dir": {"path": "/a/data", "fingerprint": "f2"}}  # at its path: not re-read
    assert moved_inputs(recorded, same_place) == ()
    assert moved_inputs(recorded, {"data.dir": {"path": "/b/data", "fingerprint": "f1"}}) == ("data.dir",)
    with pytest.raises(ConfigError, match="data.dir: the run read /a/data .* but /b/data holds other content"):
        moved_inputs(recorded, {"data.dir": {"path": "/b/data", "fingerprint": "f3"}})
    assert moved_inputs(None, {"data.dir": {"path": "/b/data", "fingerprint": "f1"}}) == ()  # an older checkpoint


def test_absolute_paths_touch_existing_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "w.pth").write_bytes(b"w")
    raw = {"run_dir": "runs/new", "data": {"dir": "data", "vae": "stabilityai/sd-vae-ft-ema",
                                           "vfm": {"name": "dinov2_vitb14_reg", "weights": "w.pth"}},
           "eval": {"vfm": {"weights": "random"}, "inception": None}}
    done = absolute_paths(raw)
    assert done["data"]["dir"] == str(tmp_path / "data") and done["data"]["vfm"]["weights"] == str(tmp_path / "w.pth")
    assert done["run_dir"] == str(tmp_path / "runs" / "new")  # the output: absolute before it exists
    assert done["data"]["vae"] == "stabilityai/sd-vae-ft-ema"  # a hub id: not a path
    assert done["eval"]["vfm"]["weights"] == "random" and done["eval"]["inception"] is None
    assert raw["data"]["dir"] == "data"  # the input is not changed


def test_vfm_weights_at_a_new_path_must_hold_the_same_bytes(tmp_path):
    old, new, other = tmp_path / "old.pth", tmp_path / "new.pth", tmp_path / "other.pth"
    old.write_bytes(b"weights")
    new.write_bytes(b"weights")
    other.write_bytes(b"else")
    stats = tmp_path / "data" / "norm_stats.safetensors"
    _same_weights(str(new), str(old), stats, None)
    with pytest.raises(ConfigError, match="other.pth holds other weights than .*old.pth"):
        _same_weights(str(other), str(old), stats, None)
    old.unlink()  # the original is gone: only the run's record can vouch for the copy
    with pytest.raises(ConfigError, match="cannot be compared with .*old.pth, which is gone"):
        _same_weights(str(new), str(old), stats, None)
    from reglue.io import file_sha256

    record = {"data.vfm.weights": {"path": str(old), "fingerprint": file_sha256(new)}}
    _same_weights(str(new), str(old), stats, record)
    with pytest.raises(ConfigError, match="holds other weights than the run read from"):
        _same_weights(str(other), str(old), stats, record)
