"""The training step's host work: randomness drawn on the training device, one host read per step.

On a GPU every value brought to the host (``.item()``, ``float(t)``, ``.tolist()``) waits for the
device; the trainer reads one small status per step, of the *previous* step (Trainer.train_step).
These tests count the reads and the random draws of real training steps on the CPU.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from reglue.training import step_noise
from reglue.training.step_noise import StepNoise
from reglue.training.trainer import Trainer, train
from reglue.transport import JointLoss
from test_train import cached_data, config_for  # noqa: F401 (cached_data is a fixture)

RANDOM_FUNCTIONS = {torch.randn, torch.rand, torch.randint, torch.randn_like, torch.rand_like, torch.randint_like,
                    torch.normal, torch.bernoulli, torch.multinomial, torch.randperm, torch.Tensor.normal_,
                    torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.exponential_, torch.Tensor.random_}


class Pausable:
    """A counting mode that ignores what happens while ``paused``."""

    paused = False

    def unread(self, batches):
        """``batches`` with its fetching not counted: the data order and the rows are host values by design."""
        while True:
            self.paused = True
            try:
                batch = next(batches)
            finally:
                self.paused = False
            yield batch


class HostReads(Pausable, TorchDispatchMode):
    """Counts what brings a tensor's value to the host: dispatched ``item``/``float``/``bool``/``int``
    (``_local_scalar_dense``, ``is_nonzero``) and ``Tensor.tolist`` (not dispatched on CPU tensors),
    except while ``paused``."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        real_tolist = torch.Tensor.tolist

        def tolist(tensor):
            self.count += not self.paused
            return real_tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.count += not self.paused
        return func(*args, **(kwargs or {}))


class RandomCalls(Pausable, TorchFunctionMode):
    """Records every random draw as (name, its generator, the device it draws on)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RANDOM_FUNCTIONS and not self.paused:
            self.calls.append((func.__name__, kwargs.get("generator"), kwargs.get("device")))
        return func(*args, **kwargs)


def test_a_step_reads_the_device_once_and_only_the_previous_steps_status(cached_data, monkeypatch):
    """Outside logging, evaluation and checkpoints, a step's only host read besides fetching its data is
    the previous step's status (none in the first step)."""
    reads = HostReads(monkeypatch)
    per_step = []
    real_step = Trainer.train_step

    def counted(self, batches):
        self.acc.unwrap_model(self.model).check_inputs = False  # input checks are CPU-only (they read values)
        before = reads.count
        with reads:
            real_step(self, reads.unread(batches))
        per_step.append(reads.count - before)

    monkeypatch.setattr(Trainer, "train_step", counted)
    result = train(config_for(cached_data, "host-reads", "train.max_steps=5", "log.every=1000",
                              "checkpoint.every=1000"))
    assert result.step == 5
    assert per_step == [0, 1, 1, 1, 1]


def test_the_steps_randomness_is_made_on_the_training_device_by_its_own_generator(cached_data, monkeypatch):
    made_on = []
    real_generator = step_noise.seeded_generator

    def recording(*stream, device):
        made_on.append(torch.device(device))
        return real_generator(*stream, device=device)

    monkeypatch.setattr(step_noise, "seeded_generator", recording)
    calls, devices = [], []
    real_step = Trainer.train_step

    def observed(self, batches):
        devices.append(self.acc.device)
        with RandomCalls() as random_calls:
            real_step(self, random_calls.unread(batches))
        calls.extend(random_calls.calls)

    monkeypatch.setattr(Trainer, "train_step", observed)
    train(config_for(cached_data, "device-noise", "train.max_steps=2"))
    assert made_on == devices == [torch.device("cpu")] * 2  # one generator per step, on the training device
    drawn = [(name, generator and generator.device, device and torch.device(device)) for name, generator, device in calls]
    assert len(drawn) == 2 * 5 and all(g == d == devices[0] for _, g, d in drawn), drawn  # nothing global
    assert [name for name, *_ in drawn[:5]] == ["rand", "randn", "randn", "randn", "rand"]  # t, ε, noise, CLS, dropout


def test_step_noise_is_drawn_in_place_and_sliced_without_copies():
    loss = JointLoss()

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.clone.default):
                self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with Copies() as copies:
        noise = StepNoise.draw(0, 7, global_batch=8, channels=20, size=4, vfm_dim=6, loss=loss, dropout=0.1,
                               device="cpu")
        rows = noise.rows(2, 6)
    assert copies.ops == []
    assert rows.noise.shape == (4, 20, 4, 4) and rows.noise.data_ptr() == noise.noise[2].data_ptr()
    again = StepNoise.draw(0, 7, global_batch=8, channels=20, size=4, vfm_dim=6, loss=loss, dropout=0.1,
                           device="cpu")
    assert all(torch.equal(getattr(noise, f), getattr(again, f)) for f in ("t", "latent_eps", "noise", "cls_noise",
                                                                          "drop"))


@pytest.mark.parametrize("fused", [True, False])
def test_a_nonfinite_update_is_skipped_with_and_without_the_device_side_skip(cached_data, monkeypatch, fused):
    """Fused AdamW skips a non-finite update on the device; the per-parameter loop after a host read.
    Either way the model, the EMA and the optimiser state are those of a run without that step's update."""
    real = JointLoss.__call__
    calls = []

    def poisoned(self, *args, **kwargs):
        terms = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(JointLoss, "__call__", poisoned)
    run = f"skip-{fused}"
    result = train(config_for(cached_data, run, "train.max_steps=3", f"train.fused_optimizer={str(fused).lower()}"))
    assert result.skipped_updates == 1 and result.step == 3
    from reglue import checkpoint as ckpt

    _, payload = ckpt.latest_valid_checkpoint(cached_data / run, print)
    steps = {float(state["step"]) for state in payload["optimizer"]["state"].values()}
    assert steps == {2.0}  # 3 steps, one of them skipped: AdamW counted 2 updates


def test_checkpoints_are_written_while_training_goes_on_and_hold_their_own_step(cached_data, monkeypatch):
    """Step 2's checkpoint write is held until step 3 has run: with a synchronous save the run would
    wait forever. The file still holds step 2's state, as a run stopped at step 2 writes it."""
    from reglue import checkpoint as ckpt

    released, events = threading.Event(), []
    real_save, real_step = ckpt.save_checkpoint, Trainer.train_step

    def held(run_dir, step, payload, *args):
        events.append(f"write {step}")
        if step == 2:
            assert released.wait(60), "the run waited for the checkpoint write"
        return real_save(run_dir, step, payload, *args)

    def step(self, batches):
        events.append(f"step {self.step + 1}")
        real_step(self, batches)
        if self.step + 1 == 3:
            released.set()

    monkeypatch.setattr(ckpt, "save_checkpoint", held)
    monkeypatch.setattr(Trainer, "train_step", step)
    every = ["train.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=3"]
    train(config_for(cached_data, "background-save", *every))
    assert events[:4] == ["step 1", "step 2", "write 2", "step 3"] and events[-1] == "write 4"
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    train(config_for(cached_data, "stopped-at-2", *every), stop_after_steps=2)
    held_file = ckpt.load_checkpoint(ckpt.checkpoint_path(cached_data / "background-save", 2))
    stopped = ckpt.load_checkpoint(ckpt.checkpoint_path(cached_data / "stopped-at-2", 2))
    for part in ("model", "ema"):
        assert all(torch.equal(held_file[part][k], stopped[part][k]) for k in stopped[part]), part


def test_a_failed_background_write_is_logged_and_the_next_checkpoint_written_at_once(cached_data, monkeypatch,
                                                                                   caplog):
    from reglue import checkpoint as ckpt

    real_save = ckpt.save_checkpoint

    def fails_at_2(run_dir, step, payload, *args):
        if step == 2:
            raise OSError(5, "Input/output error")  # a passing fault of the file system
        return real_save(run_dir, step, payload, *args)

    monkeypatch.setattr(ckpt, "save_checkpoint", fails_at_2)
    result = train(config_for(cached_data, "write-fault", "train.max_steps=6", "checkpoint.every=2",
                              "checkpoint.keep_last=3"))
    assert result.step == 6 and "the previous checkpoint was not written" in caplog.text
    assert [step for step, _ in ckpt.list_checkpoints(cached_data / "write-fault")] == [4, 6]


def test_two_failed_checkpoint_writes_in_a_row_stop_the_run(cached_data, monkeypatch):
    from reglue import checkpoint as ckpt

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_checkpoint", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        train(config_for(cached_data, "disk-full", "train.max_steps=8", "checkpoint.every=2"))
    assert ckpt.list_checkpoints(cached_data / "disk-full") == []  # step 2's failed, then step 4's: stopped
