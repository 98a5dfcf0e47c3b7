"""The run skeleton every trainer plugs into (reglue.training.run): finished runs, refused settings,
the atomic train state with every process's RNG states, and checkpoint-and-stop on a signal.

The trainers' bit-exact resumes through it are in their own files: tests/test_train.py (SiT),
tests/test_compressor_training.py and tests/test_teacher.py (a kill, a stop signal, a resume each)."""

from __future__ import annotations

import os
import random
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from reglue.checkpoint import CheckpointError, load_checkpoint
from reglue.io import write_json
from reglue.settings import SettingsError
from reglue.training import run as run_module
from reglue.training.run import TRAIN_STATE, Position, ResumableRun, RunStopped, StopFlag

CONFIG = {"lr": 0.001, "seed": 0, "log": {"every": 10}}
ONE_PROCESS = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, device=torch.device("cpu"))


def resumable(out_dir, config=CONFIG, **options) -> ResumableRun:
    options = {"name": "the toy", "owner": "a toy trainer", "kind": "toy", "fix": "start over.", "free": ("log.",),
               **options}
    return ResumableRun(out_dir, config, ONE_PROCESS, **options)


def draws() -> list:
    return [random.random(), np.random.random(2).tolist(), torch.rand(2).tolist()]


def test_a_finished_run_is_found_by_its_record_and_outputs(tmp_path):
    run = resumable(tmp_path)
    assert run.finished("record.json") is None
    write_json(tmp_path / "record.json", {"config": {**CONFIG, "log": {"every": 1}}, "epochs": 3})
    assert run.finished("record.json", outputs=("weights.pt",)) is None  # its outputs are not all there
    (tmp_path / "weights.pt").write_bytes(b"")
    assert run.finished("record.json", outputs=("weights.pt",))["epochs"] == 3  # a free key may differ


def test_other_settings_are_refused_naming_each_key(tmp_path):
    write_json(tmp_path / "record.json", {"config": {**CONFIG, "lr": 0.01, "seed": 1}})
    message = (r"the toy run in .* was made with other settings \(lr: was 0.01, now 0.001, seed: was 1, now 0\); "
               r"start over\.")
    with pytest.raises(SettingsError, match=message):
        resumable(tmp_path).finished("record.json")
    resumable(tmp_path).save_state(0, {})
    with pytest.raises(SettingsError, match=r"\(lr: was 0.001, now 0.002\)"):
        resumable(tmp_path, config={**CONFIG, "lr": 0.002}).load_state()
    with pytest.raises(ValueError, match="optim.lr: was 0.001, now 0.002"):  # a caller's error class and free keys
        ResumableRun(tmp_path, {"optim": {"lr": 0.002}}, ONE_PROCESS, name="n", fix="f", error=ValueError,
                     free=("optim.beta",)).check_settings({"optim": {"lr": 0.001, "beta": 0.9}})


def test_the_train_state_is_written_atomically_with_kind_settings_and_rng(tmp_path, monkeypatch):
    run = resumable(tmp_path)
    assert run.load_state() is None
    run.save_state(7, {"weights": torch.arange(3.0), "progress": {"global_step": 7}})
    state = load_checkpoint(tmp_path / TRAIN_STATE)  # format, version, completion marker checked
    assert (state["step"], state["kind"], state["config"]) == (7, "toy", CONFIG)
    assert torch.equal(state["weights"], torch.arange(3.0)) and len(state["rng"]) == 1

    def dies_mid_write(payload, path):  # a process killed while writing: half a file, then nothing
        open(path, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        run.save_state(8, {"weights": torch.zeros(3)})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [TRAIN_STATE]  # no temporary file left
    assert run.load_state()["step"] == 7  # the last whole state stays


def test_a_state_of_another_kind_or_format_is_refused(tmp_path):
    resumable(tmp_path, kind="other").save_state(0, {})
    with pytest.raises(CheckpointError, match="training state of 'other', not of a toy trainer \\('toy'\\); start over"):
        resumable(tmp_path).load_state()
    torch.save({"weights": torch.zeros(1)}, tmp_path / TRAIN_STATE)
    with pytest.raises(CheckpointError, match="cannot resume the toy from it: not a reglue training checkpoint"):
        resumable(tmp_path).load_state()


def test_restoring_the_saved_rng_states_replays_the_draws(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    run = resumable(tmp_path)
    run.save_state(0, {})
    expected = draws()
    assert draws() != expected
    run.restore_rng(run.load_state()["rng"])
    assert draws() == expected
    two_processes = [run.load_state()["rng"][0]] * 2  # saved by two processes, resumed on one: left as seeded
    now = torch.get_rng_state()
    run.restore_rng(two_processes)
    assert torch.equal(torch.get_rng_state(), now)


def test_start_over_deletes_only_the_named_files(tmp_path):
    (tmp_path / "a").write_text("earlier run")
    (tmp_path / "b").write_text("someone else's")
    resumable(tmp_path / "new").start_over(["a"])
    resumable(tmp_path).start_over(["a", "missing"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "new"]


class Bar:
    def __init__(self):
        self.steps, self.postfix = 0, {}

    def update(self, n):
        self.steps += n

    def set_postfix(self, **values):
        self.postfix = values


def test_steps_checkpoint_on_their_cadence_and_a_stop_signal_checkpoints_and_stops(tmp_path):
    run, position, bar, saved = resumable(tmp_path), Position(), Bar(), []

    def step(loss):
        position.advance()
        run.after_step(position, loss, bar, checkpoint_every=2, checkpoint=lambda: saved.append(position.global_step))

    previous = signal.getsignal(signal.SIGTERM)
    with run.stop.installed():
        for _ in range(3):
            step(0.5)
        position.next_epoch()
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the flag: the next step checkpoints, then stops
        with pytest.raises(RunStopped, match=r"the toy stopped at step 4 on a stop signal; its state is in .*"
                                             r"train_state.pt: run the same command again to resume"):
            step(0.25)
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
    assert saved == [2, 4] and bar.steps == 4 and bar.postfix == {"epoch": 2, "loss": "0.2500"}
    assert (position.epoch, position.step_in_epoch, position.global_step) == (1, 1, 4)


def test_a_second_ctrl_c_aborts_at_once_a_repeated_sigterm_does_not():
    flag = StopFlag()
    flag(signal.SIGTERM, None)
    flag(signal.SIGTERM, None)
    assert flag.raised
    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        flag(signal.SIGINT, None)


def test_metrics_and_progress_bar_are_the_main_process_s(tmp_path, monkeypatch):
    with resumable(tmp_path).open_metrics(resume_step=None, tensorboard=False) as metrics:
        metrics.log(1, {"loss": 0.5})
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    other = SimpleNamespace(**{**vars(ONE_PROCESS), "is_main_process": False})
    monkeypatch.setattr(run_module, "on_main", lambda what, work: None)  # what a process other than the main gets
    silent = ResumableRun(tmp_path / "other", CONFIG, other, name="n", fix="f")
    assert not silent.open_metrics(resume_step=None).enabled and not (tmp_path / "other").exists()
    assert type(silent.progress_bar(total=3, initial=0, desc="d")).__name__ == "_Silent"
