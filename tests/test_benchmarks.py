"""The benchmark harness runs in a tiny configuration (so it cannot rot)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype,ema,preset", [("fp32", "loop", "reglue"), ("bf16", "foreach", "repa")])
def test_train_step_benchmark_tiny(tmp_path, capsys, dtype, ema, preset):
    bench = load_benchmark("train_step")
    out = tmp_path / "result.json"
    result = bench.main([
        "--model", "SiT-S/8", "--preset", preset, "--batch", "2", "--input-size", "16", "--vfm-dim", "32",
        "--dtype", dtype, "--ema", ema, "--warmup", "1", "--steps", "2", "--device", "cpu",
        "--overrides", '{"num_classes": 1000, "projector_dim": 32}', "--json", str(out),
    ])
    assert result["step_s"] > 0 and result["images_per_s"] > 0
    assert json.loads(out.read_text())["dtype"] == dtype
    assert capsys.readouterr().out.startswith("| SiT-S/8 |")


def test_prepare_benchmark_tiny(tmp_path, capsys):
    result = load_benchmark("prepare").main(["--vae", "tiny", "--images", "4", "--batch-size", "2",
                                             "--json", str(tmp_path / "r.json")])
    assert result["images"] == 4 and result["images_per_s"] > 0
    assert capsys.readouterr().out.startswith("| tiny | 256 | 4 |")


@pytest.mark.parametrize("mode,dtype", [("sde", "fp32"), ("ode", "bf16")])
def test_sample_benchmark_tiny(capsys, mode, dtype):
    result = load_benchmark("sample").main([
        "--model", "SiT-S/8", "--input-size", "16", "--mode", mode, "--steps", "3", "--cfg-scale", "2",
        "--batch", "2", "--dtype", dtype, "--device", "cpu",
        "--overrides", '{"depth": 2, "hidden_size": 32, "num_heads": 2, "z_dim": 16, "projector_dim": 16, "encoder_depth": 1}',
    ])
    assert result["images_per_s"] > 0 and ("max_abs_vs_fp32" in result) == (dtype == "bf16")
    assert capsys.readouterr().out.startswith("| SiT-S/8 |")
