"""Quality during training: eval/* series, resume without gaps or duplicates, process count, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import run_processes
from reglue.config import ConfigError, load_config
from reglue.data.dataset import PreparedDataset, random_subset
from reglue.encoders.autoencoder import load_vae
from reglue.generate import SampleSettings, sample_batch
from reglue.metrics.feature_space import load_feature_space
from reglue.metrics.probe import LinearProbe, fit_linear_probe
from reglue.models.loading import load_sampling_model
from reglue.training import evaluation
from reglue.training.evaluation import Evaluator, feature_spec
from reglue.training.metrics import read_metrics
from reglue.training.trainer import train
from test_evaluate import random_weights  # noqa: F401 (a fixture: random Inception-v3 weights)
from test_train import TINY_MODEL, cached_data, config_for  # noqa: F401 (cached_data is a fixture)

TINY_EVAL_VFM = "{name: dinov2_vits14, weights: random, arch: {embed_dim: 32, depth: 2, num_heads: 2}}"
EVAL = ["eval.every=2", "eval.num_samples=4", "eval.batch=2", "eval.micro_batch=2", "eval.sampler.steps=2",
        "eval.metrics=[fd, pr]", f"eval.vfm={TINY_EVAL_VFM}"]


def eval_series(run_dir) -> dict[int, dict[str, float]]:
    """{step: {eval/...: value}} without the timing, which differs between runs."""
    series = {}
    for row in read_metrics(run_dir):
        values = {k: v for k, v in row.items() if k.startswith("eval/") and k != "eval/seconds"}
        if values:
            assert row["step"] not in series, f"two evaluations logged at step {row['step']}"
            series[row["step"]] = values
    return series


def test_a_run_evaluates_every_n_steps_and_at_the_end_into_metrics(cached_data):
    result = train(config_for(cached_data, "eval", "train.max_steps=5", *EVAL))
    series = eval_series(result.run_dir)
    assert sorted(series) == [2, 4, 5]  # every 2 steps, and the last step
    key = "eval/fd_dinov2_vits14"
    for values in series.values():
        assert set(values) == {key, "eval/precision", "eval/recall"}
        assert np.isfinite(values[key]) and values[key] > 0
        assert 0.0 <= values["eval/precision"] <= 1.0
    assert len({values[key] for values in series.values()}) == 3  # the model moved between evaluations
    timed = [row for row in read_metrics(result.run_dir) if "eval/seconds" in row]
    assert len(timed) == 3 and all(row["eval/seconds"] > 0 for row in timed)
    cached = list((cached_data / "data" / "eval").glob("dinov2_vits14-*-train50000.npz"))
    assert len(cached) == 1  # the training set's features, computed once for the run


def test_killed_and_resumed_the_series_equals_an_uninterrupted_one(cached_data):
    whole = eval_series(train(config_for(cached_data, "eval-whole", "train.max_steps=5", *EVAL)).run_dir)
    parts = config_for(cached_data, "eval-parts", "train.max_steps=5", *EVAL)
    assert train(parts, stop_after_steps=2).stopped_early  # stops at an evaluation step, before evaluating it
    assert sorted(eval_series(parts.run_dir)) == []
    train(parts, resume="auto", stop_after_steps=1)  # evaluates step 2 first, then stops at 3
    assert sorted(eval_series(parts.run_dir)) == [2]
    train(parts, resume="auto")
    assert eval_series(parts.run_dir) == whole  # no gap, no duplicate, the same values


def test_two_processes_give_the_series_of_one(cached_data):
    args = ["--config", "configs/demo.yaml", f"data.dir={cached_data / 'data'}", *TINY_MODEL,
            "train.global_batch=2", "train.max_steps=2", *EVAL]
    run_processes(["train", *args, f"run_dir={cached_data / 'eval-ddp'}"], processes=2)
    one = eval_series(train(load_config("configs/demo.yaml", [*args[2:], f"run_dir={cached_data / 'eval-one'}"])).run_dir)
    two = eval_series(cached_data / "eval-ddp")
    assert sorted(one) == sorted(two) == [2]
    for key, value in one[2].items():  # DDP's weights agree with one process within 1e-5 (test_train)
        assert two[2][key] == pytest.approx(value, rel=1e-3, abs=1e-6), key


@pytest.mark.parametrize("override,message", [
    ("eval.every=9", "evaluation never fires before the end"),
    ("eval.metrics=[fd, inception]", "eval.metrics"),
    ("eval.metrics=[fid]", "eval.inception"),
    ("eval.sampler.cfg=0.5", "guidance scale must be >= 1"),
])
def test_settings_that_cannot_work_are_refused_when_loaded(cached_data, override, message):
    with pytest.raises(ConfigError, match=message):
        config_for(cached_data, "never", "train.max_steps=5", *EVAL, override)


def test_bad_references_and_networks_are_refused_before_any_file(cached_data, tmp_path):
    small = tmp_path / "ref64.npz"
    np.savez(small, arr_0=np.zeros((8, 64, 64, 3), np.uint8))
    few = tmp_path / "ref_few.npz"
    np.savez(few, arr_0=np.zeros((3, 256, 256, 3), np.uint8))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"cls_token": torch.zeros(1, 1, 7)}, str(wrong))
    text = tmp_path / "ref.npz"
    text.write_text("not an archive")
    cases = [
        (f"eval.reference={text}", "is not a readable .npz"),
        (f"eval.reference={tmp_path / 'absent.npz'}", "not found"),
        (f"eval.reference={small}", "holds images of shape (64, 64, 3)"),
        (f"eval.reference={few}", "precision/recall compares 4 samples with a reference of 3 images"),
        ("eval.num_samples=7", "reference of 6 images"),
        (f"eval.vfm={{name: dinov2_vits14, weights: {wrong}}}", "eval.vfm"),
    ]
    for override, message in cases:
        run = f"refused-{len(message)}"
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            train(config_for(cached_data, run, "train.max_steps=4", *EVAL, override))
        assert not (cached_data / run).exists()


def test_inception_fid_during_training_and_weights_that_do_not_fit(cached_data, random_weights, tmp_path):
    result = train(config_for(cached_data, "eval-fid", "train.max_steps=2", *EVAL, "eval.metrics=[fd, fid]",
                              f"eval.inception={random_weights}"))
    (values,) = eval_series(result.run_dir).values()
    assert set(values) == {"eval/fd_dinov2_vits14", "eval/fid"} and np.isfinite(values["eval/fid"])
    assert list((cached_data / "data" / "eval").glob("inception-v3-2015-12-05-*-train50000.npz"))
    other = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(ConfigError, match="eval.vfm/eval.inception: .* is not an Inception-v3 state dict"):
        train(config_for(cached_data, "eval-fid-bad", "train.max_steps=2", *EVAL, "eval.metrics=[fid]",
                         f"eval.inception={other}"))
    assert not (cached_data / "eval-fid-bad").exists()



def test_class_accuracy_is_the_reference_images_linear_probe_on_the_eval_samples_features(cached_data, monkeypatch):
    run = config_for(cached_data, "eval-acc", "train.max_steps=2", *EVAL, "eval.num_samples=6",
                     "eval.metrics=[fd, class_accuracy]")
    result = train(run)
    logged = eval_series(result.run_dir)[2]["eval/class_accuracy"]
    # the probe: fitted on the cached reference features and the reference images' labels, cached beside them
    e, data_dir = run.eval, cached_data / "data"
    space = load_feature_space(feature_spec(run))
    stem = f"{space.network}-{space.fingerprint}-train{e.reference_images}"
    reference = np.load(data_dir / "eval" / f"{stem}.npz")["features"]
    rows = random_subset(PreparedDataset(data_dir, fields=()), e.reference_images, seed=0).indices
    labels = PreparedDataset(data_dir, fields=()).read_batch(rows)["label"]
    cached = LinearProbe.load(data_dir / "eval" / f"{stem}-linear-probe.npz")
    refitted = fit_linear_probe(torch.from_numpy(reference), labels, num_classes=len(set(labels.tolist())), seed=0)
    assert torch.equal(cached.weight, refitted.weight) and torch.equal(cached.bias, refitted.bias)
    assert cached.accuracy(torch.from_numpy(reference), labels) == 1.0  # 6 images, 32-d features: separable
    # the evaluation's samples drawn again by hand, embedded in the space and given to the probe
    settings = SampleSettings(num_samples=e.num_samples, mode=e.sampler.mode, num_steps=e.sampler.steps,
                              guidance=e.sampler.guidance(), labels="random", seed=e.seed, micro_batch=e.micro_batch)
    ema = load_sampling_model(result.run_dir / "ema")
    vae = load_vae(PreparedDataset(data_dir, fields=()).manifest["vae"])
    samples, drawn = sample_batch(ema, vae, list(range(e.num_samples)), settings, torch.device("cpu"))
    assert len(set(drawn.tolist())) > 1, "the test needs samples of several classes"
    features = torch.from_numpy(space.features(samples, batch_size=e.micro_batch))
    assert logged == cached.accuracy(features, torch.from_numpy(drawn))
    # a later evaluation reads the cached probe instead of fitting it again
    monkeypatch.setattr(evaluation, "fit_linear_probe", None)
    values = Evaluator(run, device=torch.device("cpu"))(ema, step=2)
    assert values["eval/class_accuracy"] == logged


def test_class_accuracy_needs_labelled_training_images_and_no_classifier_file(cached_data, tmp_path):
    with pytest.raises(ConfigError, match="eval.classifier is no longer needed: class_accuracy is a linear probe"):
        config_for(cached_data, "never", "train.max_steps=2", *EVAL, "eval.metrics=[class_accuracy]",
                   f"eval.classifier={tmp_path / 'probe.safetensors'}")
    config_for(cached_data, "never", "train.max_steps=2", *EVAL, "eval.classifier=null")  # an older run's config
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=np.zeros((8, 256, 256, 3), np.uint8))  # the data's resolution
    with pytest.raises(ConfigError, match="class_accuracy fits its linear probe on the labelled reference images"):
        train(config_for(cached_data, "eval-acc-bad", "train.max_steps=2", *EVAL, "eval.metrics=[class_accuracy]",
                         f"eval.reference={reference}", "eval.num_samples=2"))
    assert not (cached_data / "eval-acc-bad").exists()
