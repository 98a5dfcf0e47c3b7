"""Semantic compressor training (SPEC §5): outputs, schedule, best/final weights, exact resume."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal

import numpy as np
import pytest
import safetensors.torch
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from reglue import checkpoint
from reglue.checkpoint import CheckpointError, load_checkpoint, save_state_file
from reglue.data import store
from reglue.data.dataset import PreparedDataset
from reglue.encoders.norm_stats import NormStatsAccumulator
from reglue.encoders.vfm import build_dinov2
from reglue.io import write_json
from reglue.models.compressor import SemanticCompressor
from reglue.training import compressor as training
from reglue.training import run as run_module
from reglue.training.compressor import train_compressor
from reglue.training.order import per_process_batch, process_batches
from reglue.training.run import RunStopped

RESOLUTION = 256
CHANNELS = (64, 16, 4)  # 2 layers × 32 wide tiny DINOv2


def write_prepared_dataset(root, shard_sizes=(7, 5), seed=0) -> None:
    """A finished ``reglue prepare`` directory of random blocky images and random moments."""
    rng = np.random.default_rng(seed)
    shards = []
    for index, count in enumerate(shard_sizes):
        coarse = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)  # blocky: learnable features
        arrays = {
            "images": coarse.repeat(RESOLUTION // 8, axis=1).repeat(RESOLUTION // 8, axis=2),
            "moments": rng.standard_normal((count, 8, RESOLUTION // 8, RESOLUTION // 8), dtype=np.float32),
            "labels": rng.integers(0, 3, count).astype(np.int64),
        }
        store.write_shard(root, index, arrays, {"sources": [f"img{index}_{i}.png" for i in range(count)],
                                                "skipped": []})
        shards.append({"name": store.shard_name(index), "count": count})
    write_json(root / store.MANIFEST, {
        "format": store.FORMAT_NAME, "format_version": store.FORMAT_VERSION, "source": "random",
        "resolution": RESOLUTION, "vae": "none", "num_images": sum(shard_sizes), "num_classes": 3,
        "class_names": ["a", "b", "c"], "shards": shards,
    }, sort_keys=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    write_prepared_dataset(root)
    return root


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return build_dinov2(embed_dim=32, depth=4, num_heads=2, weights=None, layers=(2, 3))


@pytest.fixture(scope="module")
def norm_stats(extractor, data_dir):
    images = torch.stack([item["images"] for item in PreparedDataset(data_dir, fields=("images",))])
    accumulator = NormStatsAccumulator()
    accumulator.update(extractor(images).local)
    return accumulator.result()


@pytest.fixture
def train(data_dir, extractor, norm_stats):
    """train_compressor on the tiny dataset: 8 training images, 4 held out, batches of 4."""

    def run(out_dir, **overrides):
        kwargs = {"channels": CHANNELS, "epochs": 2, "global_batch": 4, "lr": 3e-3, "val_fraction": 1 / 3,
                  "progress": False, "log": lambda message: None}
        kwargs.update(overrides)
        return train_compressor(data_dir, out_dir, extractor, norm_stats, **kwargs)

    return run


def load_weights(path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


class Interrupted(Exception):
    """Stands for the process being killed."""


def interrupt_after_checkpoints(monkeypatch, count: int) -> None:
    """Let ``count`` training-state checkpoints land, then 'kill' the run."""
    save = run_module.save_state_file
    saved = []

    def save_then_maybe_die(path, step, state):
        save(path, step, state)
        saved.append((state["progress"]["epoch"], state["progress"]["step_in_epoch"]))
        if len(saved) == count:
            raise Interrupted(saved[-1])

    monkeypatch.setattr(run_module, "save_state_file", save_then_maybe_die)


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


def test_one_epoch_writes_every_output(train, tmp_path, data_dir, extractor, norm_stats):
    run = train(tmp_path / "run", epochs=1)
    for path in (run.final_path, run.best_path, run.history_path, run.curve_path, run.state_path):
        assert path.is_file(), path
    assert run.curve_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads(run.history_path.read_text())
    assert history["finished"] and history["epochs_done"] == 1 and history["best_epoch"] == 1
    assert history["config"]["channels"] == list(CHANNELS)
    assert history["config"]["train_images"] == 8 and history["config"]["val_images"] == 4
    (record,) = run.history
    assert record["epoch"] == 1 and record["lr"] == 3e-3
    assert math.isfinite(record["train_mse"]) and math.isfinite(record["val_mse"])
    state = torch.load(run.state_path, weights_only=True)
    assert state["progress"]["epoch"] == 1 and state["progress"]["global_step"] == 2


def test_saved_files_load_and_val_mse_is_their_error_on_held_out_images(train, tmp_path, data_dir, extractor,
                                                                       norm_stats):
    run = train(tmp_path / "run", epochs=1)
    for path in (run.final_path, run.best_path):
        model = SemanticCompressor.from_state_dict(load_weights(path))
        assert model.channels == CHANNELS
    with safetensors.safe_open(str(run.final_path), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["channels"]) == list(CHANNELS)
    assert json.loads(metadata["vfm_layers"]) == [2, 3] and json.loads(metadata["epoch"]) == 1

    dataset = PreparedDataset(data_dir, fields=("images",))
    _, val = training.split_for_validation(dataset, 1 / 3, seed=0)
    images = torch.stack([item["images"] for item in val])
    target = norm_stats.normalize(extractor(images).local)
    with torch.no_grad():
        mse = torch.mean((model.eval()(target) - target) ** 2).item()
    assert run.history[0]["val_mse"] == pytest.approx(mse, rel=1e-5)


def test_validation_split_is_seeded_and_disjoint(data_dir):
    dataset = PreparedDataset(data_dir, fields=("images",))
    train_a, val_a = training.split_for_validation(dataset, 0.25, seed=3)
    train_b, val_b = training.split_for_validation(dataset, 0.25, seed=3)
    _, val_c = training.split_for_validation(dataset, 0.25, seed=4)
    assert val_a.indices == val_b.indices and train_a.indices == train_b.indices
    assert len(val_a) == 3 and sorted(train_a.indices + val_a.indices) == list(range(12))
    assert val_c.indices != val_a.indices


def test_batches_are_index_addressed_and_sharded_by_rank():
    whole = process_batches(10, 4, seed=0, epoch=1, rank=0, num_processes=1)
    assert len(whole) == 2 and all(len(b) == 4 for b in whole)  # the partial batch is dropped
    ranks = [process_batches(10, 4, seed=0, epoch=1, rank=r, num_processes=2) for r in range(2)]
    assert [ranks[0][s] + ranks[1][s] for s in range(2)] == whole
    assert process_batches(10, 4, seed=0, epoch=1, rank=0, num_processes=1, start_step=1) == whole[1:]
    assert process_batches(10, 4, seed=0, epoch=2, rank=0, num_processes=1) != whole


# --------------------------------------------------------------------------------------
# Optimisation: loss, schedule, best weights
# --------------------------------------------------------------------------------------


def test_loss_decreases_over_a_few_epochs(train, tmp_path):
    run = train(tmp_path / "run", epochs=5)
    train_mse = [h["train_mse"] for h in run.history]
    val_mse = [h["val_mse"] for h in run.history]
    assert all(later < earlier for earlier, later in itertools.pairwise(train_mse)), train_mse
    assert train_mse[-1] < 0.8 * train_mse[0], train_mse
    assert val_mse[-1] < 0.9 * val_mse[0], val_mse


def test_train_mse_is_the_loss_of_the_seeded_model_on_normalised_features(
    train, tmp_path, data_dir, extractor, norm_stats
):
    run = train(tmp_path / "run", epochs=1, global_batch=8, seed=5)  # one step: all 8 training images
    train_set, _ = training.split_for_validation(PreparedDataset(data_dir, fields=("images",)), 1 / 3, seed=5)
    target = norm_stats.normalize(extractor(torch.stack([item["images"] for item in train_set])).local)
    torch.manual_seed(5)
    initial = SemanticCompressor(CHANNELS)  # train mode: BatchNorm on batch statistics
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(initial(target), target).item()
    assert run.history[0]["train_mse"] == pytest.approx(expected, rel=1e-5)


def test_learning_rate_follows_cosine_annealing_per_epoch(train, tmp_path):
    run = train(tmp_path / "run", epochs=4, cosine_t_max=3, cosine_eta_min=1e-3)
    reference = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=3, eta_min=1e-3)
    expected = []
    for _ in range(4):
        expected.append(schedule.get_last_lr()[0])
        reference.step()
        schedule.step()
    assert [h["lr"] for h in run.history] == expected
    assert expected[3] == pytest.approx(1e-3)  # bottom of the cosine after T_max epochs


def test_default_schedule_is_the_official_one(train, tmp_path):
    run = train(tmp_path / "run", epochs=2)
    lr_epoch_2 = 1e-4 + (3e-3 - 1e-4) * (1 + math.cos(math.pi / 100)) / 2
    assert run.history[1]["lr"] == pytest.approx(lr_epoch_2, rel=1e-9)


def test_best_file_holds_the_weights_of_the_lowest_validation_epoch(train, tmp_path, monkeypatch):
    scripted_val_mse = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(training._CompressorTrainer, "validate", lambda self: next(scripted_val_mse))
    run = train(tmp_path / "run", epochs=3)
    assert [h["val_mse"] for h in run.history] == [3.0, 1.0, 2.0] and run.best_epoch == 2
    monkeypatch.undo()
    after_two_epochs = train(tmp_path / "two", epochs=2)
    assert_same_weights(load_weights(run.best_path), load_weights(after_two_epochs.final_path))
    with pytest.raises(AssertionError):
        assert_same_weights(load_weights(run.best_path), load_weights(run.final_path))


def test_without_held_out_images_best_is_lowest_training_mse(train, tmp_path):
    run = train(tmp_path / "run", epochs=2, val_fraction=0.0)
    assert run.history[0]["val_mse"] is None
    train_mse = [h["train_mse"] for h in run.history]
    assert run.best_epoch == 1 + train_mse.index(min(train_mse))
    assert run.curve_path.is_file()


def test_separate_validation_dataset(train, tmp_path, data_dir):
    val_dir = tmp_path / "val"
    write_prepared_dataset(val_dir, shard_sizes=(3,), seed=1)
    run = train(tmp_path / "run", epochs=1, val_data=val_dir, val_fraction=0.0)
    history = json.loads(run.history_path.read_text())
    assert history["config"]["train_images"] == 12 and history["config"]["val_images"] == 3
    assert math.isfinite(run.history[0]["val_mse"])


# --------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir, extractor, norm_stats):
    """Final weights and history of a 3-epoch run, 2 steps an epoch, checkpoint every 3 steps."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run = train_compressor(data_dir, out, extractor, norm_stats, channels=CHANNELS, epochs=3, global_batch=4,
                           lr=3e-3, val_fraction=1 / 3, checkpoint_every=3, progress=False)
    return load_weights(run.final_path), run.history


# Checkpoints of that run, as (epochs done, steps done in the next epoch): epoch ends (1, 0),
# (2, 0), (3, 0); every 3 steps (1, 1) and (2, 2), the latter with all of epoch 3's steps done but
# not its validation.
@pytest.mark.parametrize("checkpoints, where", [
    (2, (1, 1)),  # mid-epoch: the finished batch is skipped
    (3, (2, 0)),  # an epoch boundary
    (4, (2, 2)),  # every step of the last epoch done, its end not
    (5, (3, 0)),  # every epoch done, the final weights not yet written
])
def test_interrupted_run_resumes_to_bit_identical_weights(train, tmp_path, monkeypatch, uninterrupted,
                                                         checkpoints, where):
    interrupt_after_checkpoints(monkeypatch, checkpoints)
    with pytest.raises(Interrupted):
        train(tmp_path, epochs=3, checkpoint_every=3)
    monkeypatch.undo()
    assert not (tmp_path / training.FINAL_WEIGHTS).exists()
    run = train(tmp_path, epochs=3, checkpoint_every=3)
    assert run.trained and run.resumed_from == where
    final, history = uninterrupted
    assert_same_weights(load_weights(run.final_path), final)
    assert run.history == history


def signal_at_step(monkeypatch, step: int) -> None:
    """SIGTERM to this process once ``step`` is counted, as a scheduler stops a job."""
    after_step = run_module.ResumableRun.after_step

    def signalled(self, position, *args, **kwargs):
        if position.global_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return after_step(self, position, *args, **kwargs)

    monkeypatch.setattr(run_module.ResumableRun, "after_step", signalled)


def test_a_stop_signal_checkpoints_stops_and_resumes_to_bit_identical_weights(train, tmp_path, monkeypatch,
                                                                              uninterrupted):
    previous = signal.getsignal(signal.SIGTERM)
    signal_at_step(monkeypatch, 3)  # mid-epoch 2, no checkpoint due
    with pytest.raises(RunStopped, match=r"the compressor stopped at step 3 on a stop signal"):
        train(tmp_path, epochs=3, checkpoint_every=4)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert load_checkpoint(tmp_path / training.TRAIN_STATE)["step"] == 3
    run = train(tmp_path, epochs=3, checkpoint_every=3)
    assert run.resumed_from == (1, 1)
    final, history = uninterrupted
    assert_same_weights(load_weights(run.final_path), final)
    assert run.history == history


def test_finished_run_is_not_retrained(train, tmp_path, monkeypatch):
    first = train(tmp_path, epochs=1)
    stamp = first.final_path.stat().st_mtime_ns
    monkeypatch.setattr(training, "_run", lambda *args, **kwargs: pytest.fail("retrained a finished run"))
    again = train(tmp_path, epochs=1)
    assert not again.trained and again.history == first.history and again.best_epoch == first.best_epoch
    assert first.final_path.stat().st_mtime_ns == stamp


def test_more_epochs_extend_a_finished_run_like_one_long_run(train, tmp_path, uninterrupted):
    train(tmp_path, epochs=2, checkpoint_every=3)
    run = train(tmp_path, epochs=3, checkpoint_every=3)
    assert run.resumed_from == (2, 0)
    assert_same_weights(load_weights(run.final_path), uninterrupted[0])


def test_resuming_with_other_settings_is_refused(train, tmp_path):
    train(tmp_path, epochs=1)
    with pytest.raises(ValueError, match=r"other settings \(lr: was 0.003, now 0.001\); use a new out_dir"):
        train(tmp_path, epochs=1, lr=1e-3)
    with pytest.raises(ValueError, match="more than the 1 asked"):
        train(tmp_path / "other", epochs=2)
        train(tmp_path / "other", epochs=1)


def test_train_state_is_a_training_checkpoint_with_every_rng_state(train, tmp_path):
    run = train(tmp_path, epochs=1)
    state = load_checkpoint(run.state_path)  # format, version and completion marker checked
    assert state["kind"] == training.STATE_KIND and state["step"] == 2 and state["complete"] is True
    (rng,) = state["rng"]  # one per process
    assert set(rng) == {"python", "numpy", "torch", "cuda"}


def test_resume_restores_the_checkpoints_rng_state(train, tmp_path, monkeypatch):
    interrupt_after_checkpoints(monkeypatch, 1)
    with pytest.raises(Interrupted):
        train(tmp_path, epochs=1, checkpoint_every=1)
    monkeypatch.undo()
    (saved,) = load_checkpoint(tmp_path / training.TRAIN_STATE)["rng"]
    restored = []
    monkeypatch.setattr(checkpoint, "restore_rng_state", restored.append)  # what restore_process_rng_state calls
    assert train(tmp_path, epochs=1, checkpoint_every=1).resumed_from == (0, 1)
    (state,) = restored
    assert torch.equal(state["torch"], saved["torch"]) and state["python"] == saved["python"]
    assert torch.equal(state["numpy"]["key"], saved["numpy"]["key"])


def test_an_invalid_or_old_format_train_state_is_refused_not_ignored(train, tmp_path):
    old = {"format": "reglue-compressor-train-state-v1", "config": {}, "progress": {"epoch": 1}}
    torch.save(old, tmp_path / training.TRAIN_STATE)
    with pytest.raises(CheckpointError, match=r"cannot resume the compressor from it: not a reglue training "
                       r"checkpoint .*found format='reglue-compressor-train-state-v1'.*`--restart`"):
        train(tmp_path, epochs=1)
    save_state_file(tmp_path / training.TRAIN_STATE, 0, {"kind": "sit", "config": {}})
    with pytest.raises(CheckpointError, match="training state of 'sit', not of the semantic compressor"):
        train(tmp_path, epochs=1)
    run = train(tmp_path, epochs=1, resume=False)
    assert run.resumed_from is None and load_checkpoint(run.state_path)["kind"] == training.STATE_KIND


def test_loader_workers_persist_across_epochs_and_resume_stays_bit_identical(train, tmp_path, monkeypatch,
                                                                            uninterrupted):
    loaders = []

    def counted_loader(*args, **kwargs):
        loaders.append(kwargs)
        return DataLoader(*args, **kwargs)

    interrupt_after_checkpoints(monkeypatch, 2)  # mid-epoch 2
    with pytest.raises(Interrupted):
        train(tmp_path, epochs=3, checkpoint_every=3, num_workers=1)
    monkeypatch.undo()
    monkeypatch.setattr(training, "DataLoader", counted_loader)
    run = train(tmp_path, epochs=3, checkpoint_every=3, num_workers=1)
    assert run.resumed_from == (1, 1)
    assert len(loaders) == 2 and all(kw["persistent_workers"] for kw in loaders)  # train + val, for 2 epochs
    final, history = uninterrupted
    assert_same_weights(load_weights(run.final_path), final)
    assert run.history == history


def test_resume_false_starts_over_and_drops_the_earlier_files(train, tmp_path, monkeypatch):
    first = train(tmp_path, epochs=1)
    monkeypatch.setattr(training._CompressorTrainer, "train_epoch", lambda self, bar: pytest.fail("killed"))
    with pytest.raises(pytest.fail.Exception):
        train(tmp_path, epochs=1, resume=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    run = train(tmp_path, epochs=1, resume=False)
    assert run.trained and run.resumed_from is None and run.history == first.history


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_channel_list_must_start_at_the_vfm_width(train, tmp_path):
    with pytest.raises(ValueError, match=r"start at 48, but the VFM gives 64 = 2 layers × 32"):
        train(tmp_path, channels=(48, 16, 4))


def test_norm_stats_must_cover_the_vfm_width(data_dir, extractor, tmp_path):
    accumulator = NormStatsAccumulator()
    accumulator.update(torch.randn(2, 32, 4, 4))
    with pytest.raises(ValueError, match="norm stats cover 32 channels, the VFM gives 64"):
        train_compressor(data_dir, tmp_path, extractor, accumulator.result(), global_batch=4)


def test_validation_split_must_leave_both_sides_non_empty(train, tmp_path):
    with pytest.raises(ValueError, match="leaves 0 for validation and 12 for training; both must be"):
        train(tmp_path, val_fraction=0.01)
    with pytest.raises(ValueError, match="leaves 12 for validation and 0 for training"):
        train(tmp_path, val_fraction=0.99)
    with pytest.raises(ValueError, match=r"val_fraction must lie in \[0, 1\)"):
        train(tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="both val_data and val_fraction=0.5 were given"):
        train(tmp_path, val_fraction=0.5, val_data=tmp_path)


def test_global_batch_must_divide_over_the_processes(train, tmp_path, monkeypatch):
    class ThreeProcesses(Accelerator):
        @property
        def num_processes(self) -> int:
            return 3

    monkeypatch.setattr(training, "Accelerator", ThreeProcesses)
    with pytest.raises(ValueError, match="global_batch 4 must be a positive multiple of the 3 processes"):
        train(tmp_path)
    assert per_process_batch(4096, 8) == 512


def test_too_few_images_for_one_global_batch(train, tmp_path):
    with pytest.raises(ValueError, match="8 training images make no full global batch of 16"):
        train(tmp_path, global_batch=16)
