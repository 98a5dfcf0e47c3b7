"""`reglue train`: presets, exact resume, non-finite updates, bad configs (tiny models, CPU)."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from conftest import run_processes
from reglue import checkpoint as ckpt
from reglue.cli import main
from reglue.config import ConfigError, load_config
from reglue.training.metrics import read_metrics
from reglue.training.trainer import train
from test_integrity import each_record_once, record_reads
from test_pipeline import TINY_VFM, save_compressor
from test_prepare import make_image_folder, prepare, tiny_vae_dir

TINY_MODEL = ["model.name=SiT-S/2", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
              "model.encoder_depth=1"]


@pytest.fixture(scope="module")
def cached_data(tmp_path_factory):
    """6 images with norm stats, a random compressor (4 channels) and cached semantics/CLS/REPA."""
    root = tmp_path_factory.mktemp("train")
    assert prepare(make_image_folder(root / "src"), root / "data", tiny_vae_dir(root / "vae")) == 0
    assert main(["norm-stats", str(root / "data"), "--quiet", *TINY_VFM]) == 0
    save_compressor(root / "compressor.safetensors", (64, 16, 16))
    assert main(["cache-semantics", str(root / "data"), "--compressor", str(root / "compressor.safetensors"),
                 "--repa-targets", "--quiet"]) == 0
    return root


def config_for(root, run, *overrides):
    return load_config("configs/demo.yaml", [f"data.dir={root / 'data'}", f"run_dir={root / run}", *TINY_MODEL,
                                             "train.global_batch=2", *overrides])


def weights(run_dir):
    _, payload = ckpt.latest_valid_checkpoint(run_dir, print)
    return payload


def test_resume_after_a_kill_is_bit_identical(cached_data):
    straight = train(config_for(cached_data, "straight", "train.max_steps=6", "data.num_workers=2"))
    assert straight.step == 6
    first = train(config_for(cached_data, "resumed", "train.max_steps=6", "data.num_workers=2"), stop_after_steps=3)
    assert first.stopped_early and first.step == 3
    second = train(config_for(cached_data, "resumed", "train.max_steps=6", "data.num_workers=2"), resume="auto")
    assert second.step == 6
    a, b = weights(cached_data / "straight"), weights(cached_data / "resumed")
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for s1, s2 in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_a_run_reads_its_datas_manifest_and_indexes_once(cached_data, monkeypatch):
    """The reader, the size check, data.verify, the evaluation and the run's input fingerprint share the records
    read at opening; reading rows reads no record (a damaged row's remedy is worked out only when one is found)."""
    reads = record_reads(monkeypatch, cached_data / "data")
    evaluation = ["eval.every=2", "eval.num_samples=2", "eval.batch=2", "eval.micro_batch=2", "eval.sampler.steps=2",
                  "eval.metrics=[fd]", "eval.vfm={name: dinov2_vits14, weights: random, arch: {embed_dim: 32, "
                  "depth: 2, num_heads: 2}}"]
    result = train(config_for(cached_data, "reads", "train.max_steps=2", "data.verify=true", *evaluation))
    assert result.step == 2
    assert dict(reads) == each_record_once(cached_data / "data") and "manifest.json" in reads


TERMS = {
    "sit": {"latent"}, "repa": {"latent", "repa"}, "redi": {"latent", "semantic"},
    "reg": {"latent", "cls", "repa"}, "reglue": {"latent", "semantic", "cls", "repa"},
}


@pytest.fixture(scope="module")
def pca_data(cached_data, tmp_path_factory):
    """The same images with ReDi's PCA semantics (8 channels) cached."""
    root = tmp_path_factory.mktemp("redi")
    shutil.copytree(cached_data / "data", root / "data",
                    ignore=shutil.ignore_patterns("semantics*", "cls.npy", "repa.npy"))
    assert main(["fit-pca", str(root / "data"), "--rank", "8", "--quiet"]) == 0
    assert main(["cache-semantics", str(root / "data"), "--pca", str(root / "data" / "pca.safetensors"),
                 "--quiet"]) == 0
    return root


@pytest.mark.parametrize("preset", list(TERMS))
@pytest.mark.parametrize("semantics", ["cached", "online"])
def test_every_preset_trains_and_logs_its_loss_terms(cached_data, pca_data, preset, semantics):
    root = pca_data if preset == "redi" else cached_data
    online = [f"data.compressor={cached_data / 'compressor.safetensors'}", f"data.pca={root / 'data' / 'pca.safetensors'}",
              "data.vfm_precision=fp32"] if semantics == "online" else []
    run = f"p-{preset}-{semantics}"
    result = train(config_for(root, run, f"model.preset={preset}", "train.max_steps=3", "log.every=1",
                              f"data.semantics={semantics}", *online))
    assert result.step == 3 and result.skipped_updates == 0
    rows = read_metrics(root / run)
    logged = {k.split("/", 1)[1] for k in rows[-1] if k.startswith("loss/")} - {"total"}
    assert logged == TERMS[preset]
    assert all(torch.isfinite(torch.tensor(row["loss/total"])) for row in rows)


def test_fresh_run_into_an_existing_run_dir_is_refused(cached_data):
    train(config_for(cached_data, "twice", "train.max_steps=1"))
    with pytest.raises(ValueError, match="--resume auto"):
        train(config_for(cached_data, "twice", "train.max_steps=1"))


def test_bad_config_values_are_clear(cached_data):
    with pytest.raises(ConfigError, match="unknown config key"):
        config_for(cached_data, "bad", "train.lr=1")
    with pytest.raises(ConfigError, match="train.global_batch: expected int"):
        config_for(cached_data, "bad", "train.global_batch=many")
    with pytest.raises(ConfigError, match="exceeds the 6 training images"):
        train(config_for(cached_data, "bad", "train.global_batch=8"))
    with pytest.raises(ConfigError, match=r"expected a multiple of train.grad_accum \(4\)"):
        config_for(cached_data, "bad", "train.global_batch=6", "train.grad_accum=4")
    with pytest.raises(ValueError, match="data.dir"):
        train(load_config("configs/demo.yaml", [f"data.dir={cached_data / 'missing'}", *TINY_MODEL]))


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(cached_data, monkeypatch):
    from reglue.transport import JointLoss

    real = JointLoss.__call__
    calls = []

    def poisoned(self, *args, **kwargs):
        terms = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second step's batch is bad
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(JointLoss, "__call__", poisoned)
    result = train(config_for(cached_data, "nan", "train.max_steps=4"))
    assert result.skipped_updates == 1 and result.step == 4
    monkeypatch.setattr(JointLoss, "__call__", lambda self, *a, **k: _nan_terms(real(self, *a, **k)))
    with pytest.raises(RuntimeError, match="non-finite updates in a row"):
        train(config_for(cached_data, "allnan", "train.max_steps=10", "train.max_nonfinite_in_row=3"))
    assert ckpt.list_checkpoints(cached_data / "allnan") == []


def _nan_terms(terms):
    terms.total = terms.total * float("nan")
    return terms


def test_gradient_accumulation_matches_one_big_batch(cached_data):
    """2 micro-batches of 1 give the update of one batch of 2 (same rows, same per-sample noise)."""
    one = train(config_for(cached_data, "accum1", "train.max_steps=2", "train.global_batch=2"))
    two = train(config_for(cached_data, "accum2", "train.max_steps=2", "train.global_batch=2", "train.grad_accum=2"))
    assert one.step == two.step == 2
    a, b = weights(cached_data / "accum1")["model"], weights(cached_data / "accum2")["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_two_processes_match_one_at_the_same_global_batch(cached_data):
    """DDP over gloo: 2 ranks × 1 image equal 1 process × 2 images within 1e-5, ranks in sync."""
    args = ["--config", "configs/demo.yaml", f"data.dir={cached_data / 'data'}", *TINY_MODEL,
            "train.global_batch=2", "train.max_steps=2"]
    run_processes(["train", *args, f"run_dir={cached_data / 'ddp'}"], processes=2)
    train(load_config("configs/demo.yaml", args[2:] + [f"run_dir={cached_data / 'single'}"]))
    a, b = weights(cached_data / "ddp"), weights(cached_data / "single")
    assert len(a["rng"]) == 2
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.allclose(a[part][key], b[part][key], atol=1e-5), (part, key)


def test_truncated_newest_checkpoint_is_skipped_on_resume(cached_data, caplog):
    run = "truncated"
    train(config_for(cached_data, run, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=3"))
    newest = ckpt.list_checkpoints(cached_data / run)[-1][1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    result = train(config_for(cached_data, run, "train.max_steps=5", "checkpoint.every=2", "checkpoint.keep_last=3"),
                   resume="auto")
    assert result.step == 5
    assert "skipping" in caplog.text and newest.name in caplog.text


def test_sigterm_checkpoints_and_stops(cached_data):
    """SIGTERM to the whole process group, DataLoader workers included (as torchrun and SLURM signal a
    job): the workers ignore it, the run checkpoints and stops."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = cached_data / "sigterm"
    command = [sys.executable, "-m", "reglue", "train", "--config", "configs/demo.yaml",
               f"data.dir={cached_data / 'data'}", f"run_dir={run_dir}", *TINY_MODEL, "train.global_batch=2",
               "train.max_steps=100000", "checkpoint.every=100000", "log.every=1", "data.num_workers=2"]
    process = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "stopped early" in out
    (step, path), = ckpt.list_checkpoints(run_dir)
    assert 0 < step < 100000 and (run_dir / "ema" / "model.safetensors").is_file()


def test_sample_previews_are_saved_and_logged(cached_data):
    run = cached_data / "preview"
    train(config_for(cached_data, "preview", "train.max_steps=2", "log.sample_every=2", "log.sample_count=3",
                     "log.sample_steps=2", "log.tensorboard=true"))
    from PIL import Image

    grid = Image.open(run / "samples" / "step-000000002.png")
    assert grid.size == (2 * 256, 2 * 256)  # 3 samples in a 2×2 grid
    assert any((run / "tensorboard").iterdir())


def test_the_runs_path_is_saved_with_the_model_and_previews_take_every_guidance_option(cached_data):
    import json

    run = cached_data / "cosine"
    train(config_for(cached_data, "cosine", "train.max_steps=1", "loss.path=cosine", "log.sample_every=1",
                     "log.sample_count=2", "log.sample_steps=2", "log.sample_cfg=1", "log.sample_cls_cfg=3",
                     "log.sample_guidance_interval=[0.0, 0.5]"))
    assert json.loads((run / "ema" / "config.json").read_text())["path"] == "cosine"
    assert (run / "samples" / "step-000000001.png").is_file()
    for override, message in (("log.sample_cfg=0.5", "guidance scale must be >= 1"),
                              ("log.sample_guidance_interval=[0.9, 0.1]", "0 <= LOW <= HIGH <= 1"),
                              ("log.sample_guidance_interval=[0.1]", "must be [low, high]")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_for(cached_data, "refused", override)


def test_class_balanced_subsets_and_unconditional_mode(cached_data):
    from reglue.data.dataset import PreparedDataset
    from reglue.training.inputs import training_rows

    data = PreparedDataset(cached_data / "data", fields=("moments",))
    labels = [int(data[i]["label"]) for i in range(len(data))]
    rows = training_rows(data, config_for(cached_data, "x", "data.images_per_class=1"))
    assert sorted(labels[i] for i in rows) == [0, 1, 2]
    rows = training_rows(data, config_for(cached_data, "x", "data.fraction=0.5"))
    assert len(rows) == 3
    result = train(config_for(cached_data, "uncond", "data.unconditional=true", "train.max_steps=2",
                              "data.images_per_class=1"))
    assert result.step == 2

    from reglue.presets import get_preset
    from reglue.training.inputs import InputBuilder

    cached = PreparedDataset(cached_data / "data", fields=("moments", "semantics", "cls", "repa"))
    batch = torch.utils.data.default_collate([cached[i] for i in range(3)])
    for unconditional, expected in ((True, [3, 3, 3]), (False, [int(label) for label in batch["label"]])):
        builder = InputBuilder(get_preset("reglue"), cached, 32, 3, unconditional, None)
        assert builder(batch, torch.device("cpu")).y.tolist() == expected


def test_fresh_run_initialised_from_the_authors_checkpoint_format(cached_data, caplog):
    import argparse

    first = train(config_for(cached_data, "donor", "train.max_steps=1"))
    payload = weights(first.run_dir)
    authors = cached_data / "authors.pt"
    torch.save({"model": {"module." + k: v for k, v in payload["model"].items()}, "ema": payload["ema"],
                "opt": {}, "args": argparse.Namespace(model="SiT-XL/2", proj_coeff=0.5), "steps": 1}, authors)
    train(config_for(cached_data, "heir", "train.max_steps=1", f"model.init_from={authors}",
                     "optim.lr=0.0"))  # lr 0: the model keeps the donor's weights
    heir = weights(cached_data / "heir")
    for key, value in payload["model"].items():
        assert torch.equal(heir["model"][key], value), key
    assert "authors' checkpoint has model.name='SiT-XL/2'" in caplog.text


def test_cache_of_another_width_is_refused_before_training(cached_data, pca_data):
    with pytest.raises(ConfigError, match="models 8 semantic channels but the cache"):
        train(config_for(cached_data, "wrong", "model.preset=redi", "train.max_steps=1"))


def test_online_and_cached_inputs_agree_up_to_fp16(cached_data):
    from reglue.data.dataset import PreparedDataset
    from reglue.presets import get_preset
    from reglue.training.inputs import InputBuilder, online_encoder

    config = config_for(cached_data, "x", "data.semantics=online", "data.vfm_precision=fp32",
                        f"data.compressor={cached_data / 'compressor.safetensors'}")
    data = PreparedDataset(cached_data / "data", fields=("moments", "images", "semantics", "cls", "repa"))
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    preset, eps = get_preset("reglue"), torch.randn(4, 4, 32, 32)
    cached = InputBuilder(preset, data, 32, 3, False, None)(batch, torch.device("cpu"), eps)
    online = InputBuilder(preset, data, 32, 3, False, online_encoder(config, preset, 256))(
        batch, torch.device("cpu"), eps)
    for name in ("x0", "cls_target", "repa_target"):
        a, b = getattr(cached, name), getattr(online, name)
        assert torch.allclose(a, b, rtol=2e-3, atol=2e-3), name
        assert torch.equal(a, b.half().float()) or name == "x0"


def test_resume_with_other_settings_is_refused_but_max_steps_may_grow(cached_data):
    train(config_for(cached_data, "grow", "train.max_steps=2"))
    with pytest.raises(ConfigError, match="train.seed: was 0, now 1"):
        train(config_for(cached_data, "grow", "train.max_steps=3", "train.seed=1"), resume="auto")
    assert train(config_for(cached_data, "grow", "train.max_steps=3", "log.every=1"), resume="auto").step == 3


def test_a_checkpoint_from_before_data_vfm_existed_resumes(cached_data):
    run = train(config_for(cached_data, "pre-vfm", "train.max_steps=2")).run_dir
    (step, path), = ckpt.list_checkpoints(run)
    payload = ckpt.load_checkpoint(path)
    del payload["config"]["data"]["vfm"]  # what a checkpoint written before the key existed holds
    ckpt.save_checkpoint(run, step, {k: v for k, v in payload.items() if k not in ("format", "version", "step",
                                                                                  "complete")})
    assert train(config_for(cached_data, "pre-vfm", "train.max_steps=3"), resume="auto").step == 3


def test_from_authors_adopts_their_args_and_weights(cached_data, capsys):
    import argparse

    donor = weights(train(config_for(cached_data, "donor2", "train.max_steps=1")).run_dir)
    authors = cached_data / "authors2.pt"
    torch.save({"model": donor["model"], "ema": donor["ema"], "opt": {}, "steps": 1,
                "args": argparse.Namespace(model="SiT-S/2", learning_rate=0.0, batch_size=2, seed=5)}, authors)
    code = main(["train", "--config", "configs/demo.yaml", "--from-authors", str(authors),
                 f"data.dir={cached_data / 'data'}", f"run_dir={cached_data / 'adopted'}", *TINY_MODEL[1:],
                 "train.max_steps=1"])
    assert code == 0 and "optim.lr=0.0" in capsys.readouterr().out
    adopted = weights(cached_data / "adopted")
    assert adopted["config"]["train"]["seed"] == 5 and adopted["config"]["optim"]["lr"] == 0.0
    assert all(torch.equal(adopted["model"][k], v) for k, v in donor["model"].items())


def test_speed_switches_reject_bad_values(cached_data):
    with pytest.raises(ConfigError, match=r"model.attention: invalid value 'flash'; expected one of \('sdpa', 'math'\)"):
        config_for(cached_data, "bad", "model.attention=flash")
    with pytest.raises(ConfigError, match=r"train.ema: invalid value 'fast'; expected one of \('foreach', 'loop'\)"):
        config_for(cached_data, "bad", "train.ema=fast")
    for key in ("train.fused_optimizer", "train.find_unused_parameters", "data.pin_memory"):
        with pytest.raises(ConfigError, match=f"{key}: expected bool"):
            config_for(cached_data, "bad", f"{key}=maybe")


def test_authors_kernels_and_bf16_train_like_fp32(cached_data):
    """Same seed, same batches: the authors' kernels (timm-style attention, per-parameter AdamW and
    EMA) reproduce the fp32 losses to float tolerance; bf16 autocast stays within its noise. The
    bf16 run is its own process (accelerate fixes the precision once per process)."""
    import subprocess
    import sys

    steps = ["train.max_steps=5", "log.every=1"]

    def losses(run):
        return torch.tensor([row["loss/total"] for row in read_metrics(cached_data / run)])

    train(config_for(cached_data, "fp32-fast", *steps))
    train(config_for(cached_data, "fp32-authors", *steps, "model.attention=math", "train.fused_optimizer=false",
                     "train.ema=loop", "train.find_unused_parameters=true", "data.pin_memory=false"))
    subprocess.run([sys.executable, "-m", "reglue", "train", "--config", "configs/demo.yaml",
                    f"data.dir={cached_data / 'data'}", f"run_dir={cached_data / 'bf16-fast'}", *TINY_MODEL,
                    "train.global_batch=2", *steps, "train.precision=bf16"],
                   check=True, capture_output=True, timeout=300)
    fp32, authors, bf16 = losses("fp32-fast"), losses("fp32-authors"), losses("bf16-fast")
    assert torch.allclose(authors, fp32, rtol=1e-4)
    assert (bf16 - fp32).abs().max() < 0.02 * fp32.mean()
    a, b = weights(cached_data / "fp32-fast")["ema"], weights(cached_data / "fp32-authors")["ema"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_failing_preview_is_logged_and_training_goes_on(cached_data, monkeypatch, caplog):
    from reglue.training import trainer as trainer_module

    def broken(*args, **kwargs):
        raise RuntimeError("preview exploded")

    monkeypatch.setattr(trainer_module, "preview_grid", broken)
    with caplog.at_level("ERROR"):
        result = train(config_for(cached_data, "broken-preview", "train.max_steps=2", "log.sample_every=1"))
    assert result.step == 2 and "EMA preview at step 1 failed" in caplog.text


def test_second_ctrl_c_aborts_at_once():
    import signal

    from reglue.training.run import StopFlag

    flag = StopFlag()
    flag(signal.SIGTERM, None)
    assert flag.raised
    flag(signal.SIGTERM, None)  # a repeated SIGTERM still waits for the checkpoint
    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        flag(signal.SIGINT, None)
