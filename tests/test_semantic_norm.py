"""``loss.semantic_norm``: standardised semantic / CLS targets, statistics measured once and kept with the
model (checkpoint, EMA, export); off, the authors' targets and weights unchanged (tiny cached data, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_processes
from reglue import checkpoint as ckpt
from reglue.config import ConfigError, load_config
from reglue.models import SiT
from reglue.models.loading import load_sampling_model
from reglue.training import trainer as trainer_module
from reglue.training.target_stats import TargetStats
from reglue.training.trainer import train
from reglue.transport import JointLoss
from test_train import TINY_MODEL, cached_data, config_for, weights  # noqa: F401 (cached_data is a fixture)

NORM = ("semantic_norm.semantic_mean", "semantic_norm.semantic_std", "semantic_norm.cls_mean",
        "semantic_norm.cls_std")
ALL_ROWS = "train.global_batch=6"  # the 6 training images in one step


@pytest.fixture(scope="module")
def root(cached_data):  # noqa: F811 (test_train's fixture, imported above)
    """6 images with cached compressor semantics (16 channels), CLS and REPA targets, and their compressor."""
    return cached_data


def seen_targets(monkeypatch) -> list:
    """Record the (x0, cls_target) of every loss call."""
    real, seen = JointLoss.__call__, []

    def recording(self, model, x0, y, cls_target, *args, **kwargs):
        seen.append((x0.clone(), cls_target.clone()))
        return real(self, model, x0, y, cls_target, *args, **kwargs)

    monkeypatch.setattr(JointLoss, "__call__", recording)
    return seen


def channel_stats(x0: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-channel mean and std of the semantic channels (over images × positions) and of the CLS dims."""
    semantics = x0[:, 4:].double()
    return (semantics.mean((0, 2, 3)), semantics.std((0, 2, 3), unbiased=False), cls.double().mean(0),
            cls.double().std(0, unbiased=False))


def standardised(stats: tuple[torch.Tensor, ...]) -> bool:
    """Every channel's mean within 1e-4 of 0 (the float32 means of the random VFM's CLS dims, 500 times their
    spread, leave 1e-5) and std within 1e-5 of 1."""
    mean_s, std_s, mean_c, std_c = stats
    return all(bool((m.abs() < 1e-4).all() and ((s - 1).abs() < 1e-5).all())
               for m, s in ((mean_s, std_s), (mean_c, std_c)))


def test_the_targets_the_model_sees_are_standardised_per_channel(root, monkeypatch, caplog):
    caplog.set_level("INFO", logger="reglue.training.trainer")
    seen = seen_targets(monkeypatch)
    train(config_for(root, "norm-on", "loss.semantic_norm=true", "train.max_steps=1", ALL_ROWS))
    train(config_for(root, "norm-off", "train.max_steps=1", ALL_ROWS))
    (normalised, normalised_cls), (raw, raw_cls) = seen
    assert standardised(channel_stats(normalised, normalised_cls))
    assert not standardised(channel_stats(raw, raw_cls))  # the tolerances would catch un-normalised targets
    assert torch.equal(normalised[:, :4], raw[:, :4])  # the latent channels are untouched
    assert "loss.semantic_norm: statistics of 6 training images: semantic channels mean" in caplog.text


def test_online_semantics_give_the_statistics_of_the_cache(root):
    online = ["data.semantics=online", "data.vfm_precision=fp32",
              f"data.compressor={root / 'compressor.safetensors'}"]
    on = ("loss.semantic_norm=true", "train.max_steps=1")
    a = weights(train(config_for(root, "norm-cached", *on)).run_dir)
    b = weights(train(config_for(root, "norm-online", *on, *online)).run_dir)
    for key in NORM:  # the cache holds float16
        assert torch.allclose(a["model"][key], b["model"][key], rtol=2e-2, atol=2e-3), key


def test_a_resumed_run_keeps_its_statistics_without_measuring_again(root, monkeypatch):
    config = config_for(root, "norm-resume", "loss.semantic_norm=true", "train.max_steps=4")
    assert train(config, stop_after_steps=2).step == 2
    first = weights(root / "norm-resume")

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run measured the statistics again")

    monkeypatch.setattr(trainer_module, "measure_target_stats", refuse)
    assert train(config, resume="auto").step == 4
    last = weights(root / "norm-resume")
    assert last["step"] == 4
    for part in ("model", "ema"):
        for key in NORM:
            assert torch.equal(last[part][key], first["model"][key]), (part, key)


def test_a_resume_that_changes_the_knob_is_refused_and_older_runs_resume_without_it(root):
    run = train(config_for(root, "norm-later", "train.max_steps=2")).run_dir
    with pytest.raises(ConfigError, match="loss.semantic_norm: was False, now True"):
        train(config_for(root, "norm-later", "train.max_steps=3", "loss.semantic_norm=true"), resume="auto")
    (step, path), = ckpt.list_checkpoints(run)
    payload = ckpt.load_checkpoint(path)
    del payload["config"]["loss"]["semantic_norm"]  # what a checkpoint written before the key existed holds
    written = ("format", "version", "step", "complete")  # what save_checkpoint adds
    ckpt.save_checkpoint(run, step, {k: v for k, v in payload.items() if k not in written})
    with pytest.raises(ConfigError, match="loss.semantic_norm: was False, now True"):
        train(config_for(root, "norm-later", "train.max_steps=3", "loss.semantic_norm=true"), resume="auto")
    assert train(config_for(root, "norm-later", "train.max_steps=3"), resume="auto").step == 3


def test_the_exported_model_records_the_setting_and_the_statistics(root):
    run = train(config_for(root, "norm-export", "loss.semantic_norm=true", "train.max_steps=1")).run_dir
    ema = weights(run)["ema"]
    assert json.loads((run / "ema" / "config.json").read_text())["semantic_norm"] is True
    exported = load_file(run / "ema" / "model.safetensors")
    loaded = load_sampling_model(run / "ema")
    state = loaded.state_dict()
    for key in NORM:
        assert torch.equal(exported[key], ema[key]) and torch.equal(state[key], ema[key]), key
    semantic_std = ema["semantic_norm.semantic_std"]
    assert semantic_std.shape == (16,) and not torch.equal(semantic_std, torch.ones(16))  # measured
    assert loaded.config.semantic_norm and loaded.semantic_norm is not None


def test_off_the_model_and_its_state_are_the_authors(root, monkeypatch, official_vectors, official_config):
    """No new keys; a run with the knob on whose statistics are the identity trains as one without it."""
    assert SiT(**official_config).semantic_norm is None
    SiT(**official_config).load_state_dict(official_vectors["state_dict"], strict=True)
    off = weights(train(config_for(root, "norm-none", "train.max_steps=3")).run_dir)
    assert not any("semantic_norm" in key for part in ("model", "ema") for key in off[part])

    def identity(builder, dataset, rows, *, widths, **kwargs):
        S, D = widths
        return TargetStats(torch.zeros(S), torch.ones(S), torch.zeros(D), torch.ones(D), images=len(rows))

    monkeypatch.setattr(trainer_module, "measure_target_stats", identity)
    on = weights(train(config_for(root, "norm-identity", "loss.semantic_norm=true",
                                  "train.max_steps=3")).run_dir)
    for part in ("model", "ema"):
        assert set(on[part]) - set(off[part]) == set(NORM)
        for key in off[part]:
            assert torch.equal(on[part][key], off[part][key]), (part, key)


def test_presets_without_semantics_or_cls_accept_the_knob(root, caplog):
    caplog.set_level("INFO", logger="reglue.training.trainer")
    run = train(config_for(root, "norm-sit", "model.preset=sit", "loss.semantic_norm=true",
                           "train.max_steps=1")).run_dir
    assert "the sit preset models no semantic channels and no CLS; nothing to normalise" in caplog.text
    assert all(weights(run)["model"][key].numel() == 0 for key in NORM)
    assert load_sampling_model(run / "ema").semantic_norm.widths == (0, 0)


def test_the_authors_checkpoint_cannot_start_a_normalised_run(root):
    with pytest.raises(ConfigError, match=r"loss.semantic_norm=true with model.init_from: .* set "
                                          r"loss.semantic_norm=false .* or drop model.init_from"):
        config_for(root, "never", "loss.semantic_norm=true", f"model.init_from={root / 'their.pt'}")


def test_two_processes_measure_the_statistics_of_one(root):
    """Each process measures a strided share; the sums over processes give the single process's statistics."""
    args = ["--config", "configs/demo.yaml", f"data.dir={root / 'data'}", *TINY_MODEL,
            "train.global_batch=2", "train.max_steps=1", "loss.semantic_norm=true"]
    run_processes(["train", *args, f"run_dir={root / 'norm-ddp'}"], processes=2)
    train(load_config("configs/demo.yaml", args[2:] + [f"run_dir={root / 'norm-single'}"]))
    a, b = weights(root / "norm-ddp"), weights(root / "norm-single")
    for part in ("model", "ema"):
        for key in NORM:
            assert torch.allclose(a[part][key], b[part][key], rtol=1e-6, atol=1e-7), (part, key)
