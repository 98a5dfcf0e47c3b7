"""Training metrics: metrics.jsonl history, resume truncation, wall time, TensorBoard and W&B mirrors."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import types

import numpy as np
import pytest
import torch

from reglue.training.metrics import (
    METRICS_FILE,
    TENSORBOARD_DIR,
    WALL_TIME_KEY,
    WANDB_ID_FILE,
    MetricsLogger,
    read_metrics,
)


def log_steps(run_dir, steps, scale=1.0, **kwargs):
    """Log loss/total = scale·step and lr = 1e-4 at ``steps``."""
    with MetricsLogger(run_dir, **kwargs) as logger:
        for step in steps:
            logger.log(step, {"loss/total": scale * step, "lr": 1e-4})


def tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)], accumulator.Tags()


# ----------------------------------------------------------------------------- metrics.jsonl
def without_wall_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != WALL_TIME_KEY} for record in records]


def test_log_appends_one_flushed_json_line_per_call(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss/total": 0.5, "grad_norm": np.float32(2.0), "images_per_s": 7})
    (first_line,) = (tmp_path / METRICS_FILE).read_text().splitlines(keepends=True)
    assert first_line.startswith('{"step": 1, "loss/total": 0.5, "grad_norm": 2.0, "images_per_s": 7.0, '
                                 '"wall_time_s": ') and first_line.endswith("}\n")
    logger.log(2, {"loss/total": torch.tensor(0.25), "lr": 1e-4})
    logger.close()
    assert without_wall_time(read_metrics(tmp_path)) == [
        {"step": 1, "loss/total": 0.5, "grad_norm": 2.0, "images_per_s": 7.0},
        {"step": 2, "loss/total": 0.25, "lr": 1e-4},
    ]


def test_non_finite_values_are_json_null_and_read_back_as_nan(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(3, {"loss/total": float("nan"), "grad_norm": float("inf"), "lr": 1e-4})
    line = (tmp_path / METRICS_FILE).read_text()
    assert without_wall_time([json.loads(line)]) == [{"step": 3, "loss/total": None, "grad_norm": None, "lr": 1e-4}]
    (record,) = read_metrics(tmp_path)
    assert math.isnan(record["loss/total"]) and math.isnan(record["grad_norm"]) and record["lr"] == 1e-4


def test_bad_steps_values_and_images_are_refused(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(TypeError, match="'loss/total' must be a number"):
            logger.log(1, {"loss/total": "low"})
        with pytest.raises(ValueError, match="other than 'step'"):
            logger.log(1, {"step": 2.0})
        with pytest.raises(ValueError, match="the logger writes those"):
            logger.log(1, {WALL_TIME_KEY: 3.0})
        with pytest.raises(ValueError, match="integer >= 0"):
            logger.log(1.5, {"lr": 1e-4})
        with pytest.raises(ValueError, match=r"uint8 numpy array \(H, W, 3\), found float32"):
            logger.log_image(1, "samples", np.zeros((4, 4, 3), np.float32))
    assert (tmp_path / METRICS_FILE).read_text() == ""
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(2, {"lr": 1e-4})


def test_resume_removes_the_steps_after_the_checkpoint_and_keeps_the_earlier(tmp_path):
    log_steps(tmp_path, range(1, 6), tensorboard=False)
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as logger:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # truncated before appending
        logger.log(4, {"loss/total": 40.0})
    history = [(r["step"], r["loss/total"]) for r in read_metrics(tmp_path)]
    assert history == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_a_new_run_replaces_an_earlier_history(tmp_path):
    log_steps(tmp_path, range(1, 4), tensorboard=False)
    log_steps(tmp_path, [1], scale=10.0, tensorboard=False)
    assert without_wall_time(read_metrics(tmp_path)) == [{"step": 1, "loss/total": 10.0, "lr": 1e-4}]


def test_cut_short_last_line_is_skipped_with_a_warning_and_dropped_on_resume(tmp_path, caplog):
    log_steps(tmp_path, [1, 2], tensorboard=False)
    with open(tmp_path / METRICS_FILE, "a") as handle:
        handle.write('{"step": 3, "loss/to')  # a crash mid-write
    with caplog.at_level(logging.WARNING, logger="reglue.training.metrics"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert "skipped 1 cut-short last line" in caplog.text
    log_steps(tmp_path, [3], tensorboard=False, resume_step=2)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_wall_time_counts_training_seconds_and_continues_across_a_resume(tmp_path):
    log_steps(tmp_path, [1, 2], tensorboard=False)
    first, second = (r[WALL_TIME_KEY] for r in read_metrics(tmp_path))
    assert 0 <= first <= second < 5  # seconds since the logger opened
    # an interrupted run: steps 1-3 logged at 10, 20 and 30 s, its last checkpoint at step 2, a line cut short
    rows = [{"step": step, "loss/total": 1.0, WALL_TIME_KEY: 10.0 * step} for step in (1, 2, 3)]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "wall_ti')
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=2) as logger:
        time.sleep(0.06)
        logger.log(3, {"loss/total": 1.0})
        logger.log(4, {"loss/total": 1.0})
    times = [r[WALL_TIME_KEY] for r in read_metrics(tmp_path)]
    # continues from step 2's 20 s: not from 0, nor from the replayed step 3's 30 s
    assert times[:2] == [10.0, 20.0] and 20.05 < times[2] <= times[3] < 25
    # a history from before wall_time_s existed resumes from 0
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss/total": 1.0}\n')
    log_steps(tmp_path, [2], tensorboard=False, resume_step=1)
    assert 0 <= read_metrics(tmp_path)[-1][WALL_TIME_KEY] < 5


def test_unreadable_line_before_the_last_is_an_error_naming_it(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "lr": 1.0}\nnot json\n{"step": 2, "lr": 1.0}\n')
    with pytest.raises(ValueError, match="line 2 is not a metrics record"):
        read_metrics(tmp_path)


def test_disabled_logger_touches_no_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not even needed off the main process
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, tensorboard=True, wandb=True, resume_step=2, enabled=False) as logger:
        logger.log(3, {"loss/total": 1.0})
        logger.log_image(3, "samples", np.zeros((4, 4, 3), np.uint8))
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- TensorBoard
def test_tensorboard_receives_every_scalar_and_the_images(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in (1, 2):
            logger.log(step, {"loss/latent": 0.5 / step, "grad_norm": 3.0})
        logger.log_image(2, "samples/ema", np.full((8, 6, 3), 200, np.uint8))
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / TENSORBOARD_DIR).iterdir())
    scalars, tags = tensorboard_scalars(tmp_path, "loss/latent")
    assert scalars == [(1, 0.5), (2, 0.25)]
    assert set(tags["scalars"]) == {"loss/latent", "grad_norm"}
    assert tags["images"] == ["samples/ema"]


def test_tensorboard_hides_the_steps_a_resume_replays(tmp_path):
    log_steps(tmp_path, range(1, 6))
    log_steps(tmp_path, [3, 4], scale=10.0, resume_step=2)
    scalars, _ = tensorboard_scalars(tmp_path, "loss/total")
    assert scalars == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_missing_tensorboard_is_a_clear_error_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install tensorboard`, or set log.tensorboard=false"):
        MetricsLogger(tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- Weights & Biases
def test_missing_wandb_is_a_clear_error_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install wandb`, or set log.wandb=false"):
        MetricsLogger(tmp_path / "run", tensorboard=False, wandb=True)
    assert not (tmp_path / "run").exists()


class FakeWandbRun:
    def __init__(self, **init_kwargs):
        self.init_kwargs, self.logged, self.finished = init_kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module recording each run it starts."""
    module = types.ModuleType("wandb")
    module.runs = []
    module.Image = lambda array: ("image", array.shape)

    def init(**kwargs):
        module.runs.append(FakeWandbRun(**kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_gets_scalars_images_and_one_run_id_across_resumes(tmp_path, fake_wandb):
    config = {"model": "SiT-B/2"}
    options = {"tensorboard": False, "wandb": True, "wandb_project": "reglue", "config": config}
    with MetricsLogger(tmp_path, **options) as logger:
        logger.log(1, {"loss/total": 0.5})
        logger.log_image(1, "samples", np.zeros((4, 4, 3), np.uint8))
    log_steps(tmp_path, [2], tensorboard=False, wandb=True, resume_step=1)
    log_steps(tmp_path, [1], tensorboard=False, wandb=True)  # a new history: a new W&B run
    first, resumed, new = fake_wandb.runs
    assert first.logged == [(1, {"loss/total": 0.5}), (1, {"samples": ("image", (4, 4, 3))})]
    assert first.finished and resumed.logged == [(2, {"loss/total": 2.0, "lr": 1e-4})]
    assert first.init_kwargs["project"] == "reglue" and first.init_kwargs["config"] == config
    assert first.init_kwargs["id"] == resumed.init_kwargs["id"] != new.init_kwargs["id"]
    assert resumed.init_kwargs["resume"] == "allow"
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == new.init_kwargs["id"]
