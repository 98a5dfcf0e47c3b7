"""Training checkpoints: exact RNG resume, atomic save, pruning, skipping invalid files."""

from __future__ import annotations

import dataclasses
import io
import random
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from reglue.checkpoint import (
    FORMAT,
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
    save_state_file,
)


def _draws() -> list:
    """The next values of every generator, including the cached-Gaussian paths."""
    return [
        random.random(), random.gauss(0, 1),
        np.random.random(3).tolist(), float(np.random.standard_normal()),
        torch.rand(3).tolist(), torch.randn(1).item(),
    ]


def _model_and_optimizer(seed: int = 0) -> tuple[nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    optimizer.zero_grad()
    model(torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
    optimizer.step()


def _payload() -> dict:
    """What the trainer saves: weights, EMA, AdamW after a step, scaler, config, 2 ranks' RNG, data position."""
    model, optimizer = _model_and_optimizer()
    _step(model, optimizer, seed=1)
    return {
        "model": model.state_dict(),
        "ema": {k: v.clone() * 0.5 for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "grad_scaler": torch.amp.GradScaler("cpu").state_dict(),
        "config": {
            "model": {"name": "SiT-B/2", "depth": 12, "use_cls_token": True},
            "train": {"lr": 1e-4, "betas": [0.9, 0.999], "mixed_precision": "bf16", "data_dir": None},
        },
        "rng": [capture_rng_state(), capture_rng_state()],
        "data": {"epoch": 1, "batches_seen": 17, "images_seen": 4352},
    }


def _assert_same(found: object, expected: object, where: str = "state") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(found, torch.Tensor) and found.dtype == expected.dtype, where
        assert torch.equal(found, expected), where
    elif isinstance(expected, dict):
        assert isinstance(found, dict) and list(found) == list(expected), where
        for key in expected:
            _assert_same(found[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(found) is type(expected) and len(found) == len(expected), where
        for index, (a, b) in enumerate(zip(found, expected)):
            _assert_same(a, b, f"{where}[{index}]")
    else:
        assert found == expected and type(found) is type(expected), where


# ----------------------------------------------------------------------------- RNG


@pytest.mark.parametrize("through_file", [False, True], ids=["in_memory", "through_checkpoint"])
def test_restored_rng_state_replays_the_draws_that_followed_capture(tmp_path, through_file):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached Gaussian in Python's and NumPy's states
    np.random.standard_normal()
    state = capture_rng_state()
    if through_file:
        save_checkpoint(tmp_path, 0, {"rng": [state]})
        state = load_checkpoint(checkpoint_path(tmp_path, 0))["rng"][0]
    expected = _draws()
    assert _draws() != expected  # the generators moved on
    restore_rng_state(state)
    assert _draws() == expected


def test_cuda_states_beyond_this_machines_devices_are_ignored():
    state = capture_rng_state()
    state["cuda"] = list(state["cuda"]) + [torch.zeros(16, dtype=torch.uint8)]  # one device too many
    expected = torch.rand(3)
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_state_replays_on_the_device():
    state = capture_rng_state()
    expected = torch.rand(3, device="cuda")
    restore_rng_state(state)
    assert torch.equal(torch.rand(3, device="cuda"), expected)


def test_rng_state_missing_a_generator_is_refused():
    state = capture_rng_state()
    del state["numpy"]
    with pytest.raises(ValueError, match="lacks \\['numpy'\\]"):
        restore_rng_state(state)


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip_resumes_the_optimizer_exactly(tmp_path):
    payload = _payload()
    path = save_checkpoint(tmp_path, 7, payload)
    assert path == tmp_path / "checkpoints" / "step-000000007.pt"

    state = load_checkpoint(path)
    assert (state["format"], state["version"], state["step"], state["complete"]) == (FORMAT, 1, 7, True)
    _assert_same({k: state[k] for k in payload}, payload)

    # Continue both the original and the restored model/optimiser by one step: identical.
    original, original_opt = _model_and_optimizer()
    original.load_state_dict(payload["model"])
    original_opt.load_state_dict(payload["optimizer"])
    resumed, resumed_opt = _model_and_optimizer(seed=99)
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])
    _step(original, original_opt, seed=2)
    _step(resumed, resumed_opt, seed=2)
    _assert_same(resumed.state_dict(), original.state_dict())


def test_every_value_type_the_payload_check_accepts_loads_weights_only(tmp_path):
    payload = {
        "leaves": [None, True, 3, 2.5, "text", torch.float16, torch.Size([2, 3])],
        "ordered": OrderedDict(a=torch.arange(3)),
        "int_keys": {0: {"step": torch.tensor(1.0)}},
        "tuple": (1, (2.0, "x")),
        "parameter": nn.Parameter(torch.ones(2)),
    }
    state = load_checkpoint(save_checkpoint(tmp_path, 1, payload))
    _assert_same({k: state[k] for k in payload}, payload)


@dataclasses.dataclass
class _Config:
    lr: float = 1e-4


@pytest.mark.parametrize(
    "payload, entry",
    [
        ({"config": {"train": _Config()}}, "payload['config']['train']"),
        ({"data": {"order": np.arange(4)}}, "payload['data']['order']"),
        ({"loss": np.float64(0.5)}, "payload['loss']"),
        ({"config": {"data_dir": Path("data")}}, "payload['config']['data_dir']"),
        ({"extra": [1, Fraction(1, 2)]}, "payload['extra'][1]"),
    ],
    ids=["dataclass", "numpy_array", "numpy_scalar", "path", "arbitrary_object"],
)
def test_payload_with_objects_needing_pickle_is_refused_before_writing(tmp_path, payload, entry):
    with pytest.raises(ValueError, match="weights_only") as info:
        save_checkpoint(tmp_path, 1, payload)
    assert entry in str(info.value)
    assert list_checkpoints(tmp_path) == []
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_payload_may_not_override_the_format_keys(tmp_path):
    with pytest.raises(ValueError, match="reserved key\\(s\\) \\['step'\\]"):
        save_checkpoint(tmp_path, 1, {"step": 5})


# ----------------------------------------------------------------------------- memory-mapped loading


def _maps_file(tensor: torch.Tensor, path: Path) -> bool:
    """Whether ``tensor``'s data lies in a memory mapping of ``path`` (Linux: /proc/self/maps)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_loaded_tensors_map_the_file_and_writes_into_them_stay_private(tmp_path):
    payload = _payload()
    save_checkpoint(tmp_path, 1, payload)
    path, state = latest_valid_checkpoint(tmp_path)
    weight = state["model"]["weight"]
    assert _maps_file(weight, path) and _maps_file(state["optimizer"]["state"][0]["exp_avg"], path)
    weight.add_(1.0)  # copy-on-write: this process's page only
    assert torch.equal(weight, payload["model"]["weight"] + 1.0)
    assert torch.equal(load_checkpoint(path)["model"]["weight"], payload["model"]["weight"])


def test_a_pruned_checkpoint_still_resumes_the_optimizer_exactly_through_its_loaded_tensors(tmp_path):
    payload = _payload()
    state = load_checkpoint(save_checkpoint(tmp_path, 1, payload))
    for step in (2, 3):
        save_checkpoint(tmp_path, step, {}, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]  # step 1's file is unlinked, still mapped

    original, original_opt = _model_and_optimizer()
    original.load_state_dict(payload["model"])
    original_opt.load_state_dict(payload["optimizer"])
    resumed, resumed_opt = _model_and_optimizer(seed=99)
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])  # keeps the mapped moments and updates them in place
    for seed in (2, 3):
        _step(original, original_opt, seed=seed)
        _step(resumed, resumed_opt, seed=seed)
    _assert_same(resumed.state_dict(), original.state_dict())
    _assert_same(resumed_opt.state_dict(), original_opt.state_dict())


# ----------------------------------------------------------------------------- atomicity


def test_crash_while_writing_leaves_no_file_and_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, 1, _payload())
    second = save_checkpoint(tmp_path, 2, _payload())
    before = second.read_bytes()
    real_save = torch.save

    def write_half_then_fail(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 3, _payload(), keep_last=1)  # pruning only follows a finished write
    assert list_checkpoints(tmp_path) == [(1, first), (2, second)]
    assert sorted(p.name for p in second.parent.iterdir()) == [first.name, second.name]  # no temp file
    assert second.read_bytes() == before
    assert load_checkpoint(second)["step"] == 2


def test_killed_writer_leaves_only_a_temp_file_which_is_ignored_then_removed(tmp_path):
    script = textwrap.dedent(f"""
        import os, torch
        from reglue.checkpoint import save_checkpoint
        def killed_mid_write(obj, f):
            with open(f, "wb") as handle:
                handle.write(b"partial")
            os._exit(9)
        torch.save = killed_mid_write
        save_checkpoint({str(tmp_path)!r}, 5, {{}})
    """)
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    directory = tmp_path / "checkpoints"
    (leftover,) = directory.iterdir()
    assert leftover.name.startswith(".step-000000005.pt.tmp")
    assert list_checkpoints(tmp_path) == []
    assert resolve_resume(tmp_path, "auto") is None

    save_checkpoint(tmp_path, 6, {})
    assert [p.name for p in directory.iterdir()] == ["step-000000006.pt"]


# ----------------------------------------------------------------------------- pruning, listing


def test_pruning_keeps_the_last_n_milestones_and_the_file_just_written(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "checkpoints" / "step-latest.pt").write_text("not ours either")
    for step in range(1, 11):
        save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, keep_last=3, milestones=[2, 5])
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 5, 8, 9, 10]

    # Saving an older step (after resuming from an explicit path) never deletes that file.
    save_checkpoint(tmp_path, 4, {}, keep_last=1, milestones=range(0, 100, 5))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5, 10]
    assert (tmp_path / "checkpoints" / "notes.txt").is_file()
    assert (tmp_path / "checkpoints" / "step-latest.pt").is_file()


def test_keep_last_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        save_checkpoint(tmp_path, 1, {}, keep_last=0)


def test_list_checkpoints_orders_by_step_not_by_name(tmp_path):
    for step in (1_000_000_000, 3, 999_999_999):  # the first outgrows the 9-digit padding
        save_checkpoint(tmp_path, step, {}, keep_last=10)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 999_999_999, 1_000_000_000]
    assert list_checkpoints(tmp_path / "elsewhere") == []


# ----------------------------------------------------------------------------- invalid files


def _write_truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def test_truncated_newest_checkpoint_is_skipped_with_a_log_line(tmp_path):
    older = save_checkpoint(tmp_path, 1, _payload())
    newest = save_checkpoint(tmp_path, 2, _payload())
    _write_truncated(newest)
    lines = []
    path, state = latest_valid_checkpoint(tmp_path, log=lines.append)
    assert (path, state["step"]) == (older, 1)
    assert len(lines) == 1 and lines[0].startswith(f"skipping {newest}: ")


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"this is not a checkpoint\n" * 40, "truncated or corrupt"),
        ({"model": {}, "ema": {}, "steps": 3}, "not a reglue training checkpoint"),
        ({"format": "reglue-compressor-train-state-v1", "progress": {}},
         "found format='reglue-compressor-train-state-v1'\\); a file an older reglue wrote resumes only"),
        ({"format": FORMAT, "version": 1, "step": 3}, "lacks the completion marker"),
        ({"format": FORMAT, "version": 2, "step": 3, "complete": True}, "format version 2"),
        ({"format": FORMAT, "version": 1, "step": 3, "extra": Fraction(1, 3), "complete": True}, "pickled"),
    ],
    ids=["garbage", "foreign", "older_format", "incomplete", "newer_version", "pickled_object"],
)
def test_invalid_checkpoint_files_raise_checkpoint_error(tmp_path, content, reason):
    path = tmp_path / "step-000000003.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=reason) as info:
        load_checkpoint(path)
    assert isinstance(info.value, ValueError) and info.value.path == path


def _first_tensor_record(path: Path) -> tuple[int, int]:
    """(offset of the local header, offset of the data) of the checkpoint's first tensor record."""
    with zipfile.ZipFile(path) as archive:
        record = next(r for r in archive.infolist() if r.filename.endswith("/data/0"))
        header = path.read_bytes()[record.header_offset:record.header_offset + 30]
    name_length, extra_length = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return record.header_offset, record.header_offset + 30 + name_length + extra_length


@pytest.mark.parametrize("damage", ["cut_in_tensor_data", "cut_last_byte", "zeroed_record_header"])
def test_damage_a_mapped_load_would_not_read_is_still_refused(tmp_path, damage):
    """A mapped load reads no tensor data; truncation still loses the zip's central directory, and a
    damaged record header (which a mapped load alone would step over, shifting a tensor) is checked."""
    path = save_checkpoint(tmp_path, 1, _payload())
    data = path.read_bytes()
    header, start = _first_tensor_record(path)
    damaged = {
        "cut_in_tensor_data": data[: start + 6],
        "cut_last_byte": data[:-1],
        "zeroed_record_header": data[:header] + bytes(start - header) + data[start:],
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_latest_valid_checkpoint_is_none_without_files_and_an_error_when_none_is_valid(tmp_path):
    assert latest_valid_checkpoint(tmp_path, log=print) is None
    for step in (1, 2):
        _write_truncated(save_checkpoint(tmp_path, step, _payload()))
    lines = []
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint") as info:
        latest_valid_checkpoint(tmp_path, log=lines.append)
    assert "step-000000001.pt" in str(info.value) and "step-000000002.pt" in str(info.value)
    assert len(lines) == 2


# ----------------------------------------------------------------------------- resume choice


def test_resume_none_starts_fresh_only_in_a_run_dir_without_checkpoints(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "") is None
    save_checkpoint(tmp_path, 3, {})
    for resume in (None, ""):
        with pytest.raises(CheckpointError, match="already holds 1 checkpoint\\(s\\) up to step 3.*--resume auto"):
            resolve_resume(tmp_path, resume)


def test_resume_auto_takes_the_newest_valid_checkpoint_or_none(tmp_path):
    assert resolve_resume(tmp_path, "auto") is None
    save_checkpoint(tmp_path, 1, {})
    newest = save_checkpoint(tmp_path, 2, {})
    path, state = resolve_resume(tmp_path, "auto")
    assert (path, state["step"]) == (newest, 2)


def test_resume_from_a_path_loads_that_checkpoint_or_fails(tmp_path):
    older = save_checkpoint(tmp_path, 1, {})
    newest = save_checkpoint(tmp_path, 2, {})
    path, state = resolve_resume(tmp_path, str(older))
    assert (path, state["step"]) == (older, 1)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step-000000009.pt"))
    _write_truncated(newest)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):  # no silent fallback for a path
        resolve_resume(tmp_path, str(newest))


def test_a_named_state_file_has_the_checkpoint_guarantees_without_pruning(tmp_path):
    path = tmp_path / "run" / "train_state.pt"
    payload = _payload()
    (tmp_path / "run").mkdir()
    stale = tmp_path / "run" / ".train_state.pt.tmp-12345"  # what a writer killed mid-save leaves
    stale.write_bytes(b"half")
    for step in (1, 2, 3, 4):
        assert save_state_file(path, step, payload) == path
    state = load_checkpoint(path)
    assert (state["format"], state["version"], state["step"], state["complete"]) == (FORMAT, 1, 4, True)
    _assert_same({k: state[k] for k in payload}, payload)
    assert sorted(p.name for p in path.parent.iterdir()) == ["train_state.pt"]
    with pytest.raises(ValueError, match="reserved key"):
        save_state_file(path, 5, {"complete": False})
    with pytest.raises(ValueError, match="weights_only"):
        save_state_file(path, 5, {"where": Path("x")})
    assert load_checkpoint(path)["step"] == 4  # a refused save writes nothing
