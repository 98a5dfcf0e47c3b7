"""The resume-memory and checkpoint-write benchmark runs in a tiny configuration (so it cannot rot)."""

from __future__ import annotations

import json

import torch

from reglue.checkpoint import load_checkpoint, save_checkpoint
from test_benchmarks import load_benchmark

TINY = {"depth": 2, "hidden_size": 32, "num_heads": 2, "projector_dim": 16, "z_dim": 16, "encoder_depth": 1}


def test_resume_memory_benchmark_tiny(tmp_path, capsys):
    result = load_benchmark("resume_memory").main([
        "--model", "SiT-B/2", "--write-models", "SiT-B/2", "--overrides", json.dumps(TINY), "--ranks", "2",
        "--caches", "warm", "--repeats", "2", "--raw-gb", "0.07", "--dir", str(tmp_path),
        "--json", str(tmp_path / "r.json"),
    ])
    (write,) = result["writes"]
    assert write["params"] == result["params"] > 0 and len(write["writes_s"]) == 2 and write["gb_per_s"] > 0
    assert 0 < write["ema_bytes"] < write["file_bytes"] / 3 and result["raw_write"]["gb_per_s"] > 0
    assert [(r["variant"], r["cache"]) for r in result["resumes"]] == [("eager", "warm"), ("mmap", "warm")]
    for row in result["resumes"]:
        assert [p["phase"] for p in row["phases"]] == ["start", "build", "load", "restore", "release"]
        assert all(p["vm_hwm_gb"] >= p["anon_gb"] > 0 for p in row["phases"])
        assert row["node"]["private_per_node_gb"] == round(2 * row["node"]["private_per_rank_gb"], 3)
    assert result["restored_states_identical"]
    assert capsys.readouterr().out.startswith("| model | params | checkpoint GB | save_checkpoint s |")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # the checkpoints are gone


def test_the_mapped_load_of_the_benchmarks_training_state_equals_the_eager_load(tmp_path):
    bench = load_benchmark("resume_memory")
    payload = bench.trainer_payload("SiT-B/2", *bench.trained_objects("SiT-B/2", TINY), ranks=2)
    path = save_checkpoint(tmp_path, 1, payload)
    mapped, eager = load_checkpoint(path), torch.load(path, map_location="cpu", weights_only=True)
    trained = [p for p in bench.build_model("SiT-B/2", TINY).parameters() if p.requires_grad]
    assert len(mapped["optimizer"]["state"]) == len(trained)  # every moment exists
    for part in ("model", "ema"):
        assert all(torch.equal(mapped[part][k], eager[part][k]) for k in eager[part])
    for index, state in eager["optimizer"]["state"].items():
        assert all(torch.equal(mapped["optimizer"]["state"][index][k], v) for k, v in state.items())
    assert mapped["config"] == eager["config"] and mapped["sit_config"] == eager["sit_config"]
