"""The benchmark harness runs in a tiny configuration (so it cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO, shared_file


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
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
    result = load_benchmark("prepare").main(["--vae", "tiny", "--images", "4", "--micro-batch", "2",
                                             "--json", str(tmp_path / "r.json")])
    assert result["images"] == 4 and result["images_per_s"] > 0
    assert capsys.readouterr().out.startswith("| tiny | 256 | 4 |")


def test_verify_benchmark_tiny(tmp_path, capsys):
    result = load_benchmark("verify").main(["--gb", "0.003", "--shard-size", "20", "--workers", "2", "--images", "4",
                                            "--dir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert [(r["workers"], r["cache"]) for r in result["verify"]] == [(1, "warm"), (2, "warm"), (1, "cold"), (2, "cold")]
    assert all(r["gb_per_s"] > 0 for r in result["verify"]) and result["prepare"]["rerun_kept_shards"] == 4
    assert 0 < result["prepare"]["hashing_s"] < result["prepare"]["prepare_s"]
    assert capsys.readouterr().out.startswith("| verify | 0.003 GB | warm | 1 |")
    assert list(tmp_path.iterdir()) == [tmp_path / "r.json"]  # the datasets are gone


@pytest.mark.parametrize("mode,dtype", [("sde", "fp32"), ("ode", "bf16")])
def test_sample_benchmark_tiny(capsys, mode, dtype):
    result = load_benchmark("sample").main([
        "--model", "SiT-S/8", "--input-size", "16", "--mode", mode, "--steps", "3", "--cfg-scale", "2",
        "--batch", "2", "--dtype", dtype, "--device", "cpu",
        "--overrides", '{"depth": 2, "hidden_size": 32, "num_heads": 2, "z_dim": 16, "projector_dim": 16, "encoder_depth": 1}',
    ])
    assert result["images_per_s"] > 0 and ("max_abs_vs_fp32" in result) == (dtype == "bf16")
    assert capsys.readouterr().out.startswith("| SiT-S/8 |")


# Tiny CPU settings appended to every run of benchmarks/gpu.sh (argparse keeps the last value).
TINY_COMPARE = [
    "--device", "cpu", "--models", "SiT-S/2", "--batches", "2", "--warmup", "1", "--steps", "1",
    "--sample-model", "SiT-S/2", "--sample-batch", "1", "--sde-steps", "3", "--ode-steps", "2",
    "--sit-overrides", '{"depth": 2, "hidden_size": 32, "num_heads": 2, "encoder_depth": 1, "projector_dim": 32}',
    "--vfm-overrides", '{"embed_dim": 32, "depth": 4, "num_heads": 2}', "--compressor-hidden", "16",
    "--compile-backend", "eager",
]
# Tiny CPU settings for benchmarks/train_loop.py in the same run (after `--`): both shipped configs shrunk to
# a 2-block SiT-S/2 (the name compare.py's tiny rows carry), a 64² dataset, 2 steps each, not compiled.
TINY_LOOP = [
    "--batches", "2", "--warmup", "1", "--steps", "1", "--log-every", "1", "--no-compile", "--workers", "0",
    "--resolution", "64", "--shards", "4", "--rows-per-shard", "2", "--set", "model.name=SiT-S/2", "model.depth=2",
    "model.hidden_size=32", "model.num_heads=2", "model.encoder_depth=1", "model.projector_dim=32",
]


def test_gpu_script_parses_and_every_run_works_tiny_on_cpu(tmp_path):
    """benchmarks/gpu.sh as shipped (compiled fast path, every part), each run shrunk to a tiny CPU model."""
    import os
    import subprocess

    script = REPO / "benchmarks" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="2")
    work = tmp_path / "work"
    subprocess.run(["bash", str(script), *TINY_COMPARE, "--", *TINY_LOOP, "--dir", str(work)], env=env, check=True,
                   capture_output=True, timeout=300)
    train = json.loads((tmp_path / "train" / "compare.json").read_text())
    assert [(r["setup"], r["compile"]) for r in train["train"]] == [("authors", False), ("fast", True)]
    assert all(r["step_s"] > 0 and r["gflop_per_image"] > 0 for r in train["train"])
    assert train["train_speedup"][0]["model"] == "SiT-S/2" and train["train_speedup"][0]["speedup"] > 0
    sample = json.loads((tmp_path / "sample" / "compare.json").read_text())
    fast_rows = [r for r in sample["sample"] if r["setup"] == "fast"]
    assert [(r["mode"], r["steps"]) for r in fast_rows] == [("sde", 3), ("ode", 2)]
    assert all(0 < r["max_abs_vs_fp32"] < 0.1 and r["precision"] == "bf16" for r in fast_rows)
    assert "| SiT-S/2 | SDE | 3 | 1 | 2.8 | [0.0, 0.9] | fast | bf16 |" in (tmp_path / "sample" / "compare.md").read_text()
    loop = json.loads((tmp_path / "train_loop" / "train_loop.json").read_text())
    assert [(r["config"], r["model"], r["batch_per_gpu"], r["steps"]) for r in loop["runs"]] == [
        ("reglue_sit_b2.yaml", "SiT-S/2", 2, 2), ("reglue_sit_xl2.yaml", "SiT-S/2", 2, 2)]
    isolated = {r["model"]: r["step_s"] for r in train["train"] if r["setup"] == "fast"}["SiT-S/2"]
    for run in loop["runs"]:  # one measured interval each, beside compare.py's isolated step of the same model
        assert run["images_per_s"] == run["interval_images_per_s"][0] > 0 and not run["compile"]
        assert run["isolated_step_s"] == isolated and run["loop_over_isolated"] > 0 and run["gflop_per_image"] > 0
    assert "| reglue_sit_xl2.yaml | SiT-S/2 | 2 | 1 | False |" in (tmp_path / "train_loop" / "train_loop.md").read_text()
    assert list(work.iterdir()) == []  # the dataset and the runs are gone


def test_train_loop_figures_drop_the_warm_up_and_give_mfu():
    """Medians over the intervals after the warm-up; MFU = images/s × FLOPs per image ÷ (GPUs × peak)."""
    sys.path.insert(0, str(REPO / "benchmarks"))  # train_loop.py imports compare and data_loading as sibling scripts
    try:
        bench = load_benchmark("train_loop")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    intervals = [(10, 8.0, 4.0, 41.0), (20, 100.0, 0.32, 44.2), (30, 140.0, 0.23, 46.5), (40, 120.0, 0.27, 49.2)]
    records = [{"step": step, "images_per_s": rate, "step_time_s": step_s, "wall_time_s": wall, "memory_gib": step / 4}
               for step, rate, step_s, wall in intervals] + [{"step": 40, "eval/fd_dinov2": 30.0, "wall_time_s": 60.0}]
    figures = bench.summarise(records, warmup=10, processes=2, gflop_per_image=727.0, peak=989.0)
    assert figures["interval_images_per_s"] == [100.0, 140.0, 120.0] and figures["images_per_s"] == 120.0
    assert figures["step_s"] == 0.27 and figures["peak_memory_gib"] == 10.0 and figures["warmup_s"] == 41.0
    assert figures["mfu"] == round(120 * 727e9 / (2 * 989e12), 4)
    assert "mfu" not in bench.summarise(records, warmup=10, processes=1, gflop_per_image=727.0, peak=None)
    with pytest.raises(ValueError, match="no interval after step 40"):
        bench.summarise(records, warmup=40, processes=1, gflop_per_image=727.0, peak=989.0)


def test_compare_interleaved_training_tiny(tmp_path):
    result = load_benchmark("compare").main([*TINY_COMPARE, "--parts", "train", "--interleave", "--out", str(tmp_path)])
    rows = {r["setup"]: r for r in result["train"]}
    assert rows["authors"]["online_semantics"] and not rows["fast"]["online_semantics"]
    assert all(r["images_per_s"] > 0 and r["peak_mem_mib"] >= 0 for r in rows.values())
    assert "Training speed-up" in (tmp_path / "compare.md").read_text()


def test_flop_count_matches_the_papers_sit_xl2_training_flops():
    """SiT-XL/2 REGLUE: ≈ 727 GFLOP per training image without the frozen VFM (counted on meta)."""
    compare = load_benchmark("compare")
    args = compare.parse_args([])
    flops = compare.training_flops_per_image("SiT-XL/2", args, None, compare.torch.device("cpu"))
    assert abs(flops / 1e9 - 727) < 2


@pytest.mark.parametrize("what", ["speed", "resize"])
def test_feature_space_benchmark_tiny(capsys, what):
    photos = shared_file("testdata/real_images")
    result = load_benchmark("feature_space").main([
        what, "--arch", '{"embed_dim": 32, "depth": 2, "num_heads": 2}', "--images", "6", "--batch", "3",
        "--batches", "1", "--resolution", "64", "--device", "cpu", "--photos", str(photos),
    ])
    if what == "speed":
        assert result["images_per_s"] > 0 and result["gflop_per_image"] > 0
    else:
        assert result["fd_same_images_torch_vs_pil"] >= 0 and result["input_grey_levels_max_abs"] > 0
    assert capsys.readouterr().out.startswith("{")


def test_resolution_benchmark_tiny(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))  # resolution.py imports train_step as a sibling script
    try:
        bench = load_benchmark("resolution")
        rows = bench.main(["--model", "demo", "--resolutions", "64,256", "--batch", "1", "--warmup", "0",
                           "--steps", "1", "--vfm", "dinov2_vitb14_reg", "--device", "cpu",
                           "--vfm-arch", '{"embed_dim": 32, "depth": 2, "num_heads": 2}',
                           "--json", str(tmp_path / "r.json")])
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert [(r["resolution"], r["latent"], r["tokens"]) for r in rows] == [(64, 8, 4), (256, 32, 16)]
    assert rows[1]["sit_step_vs_256"] == rows[1]["sit_forward_backward_vs_256"] == 1.0
    assert 0 < rows[0]["sit_forward_backward_s"] <= rows[0]["sit_step_s"] and rows[0]["vfm_forward_vs_256"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["resolution"] == 64
    assert "| 64² | 8² | 4² |" in capsys.readouterr().out


def test_data_loading_benchmark_tiny(tmp_path, capsys):
    result = load_benchmark("data_loading").main([
        "--shards", "6", "--rows-per-shard", "2", "--batch", "3", "--workers", "0,1", "--reader", "current",
        "--reader", "legacy", "--cold", "--dir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert [(r["cache"], r["reader"], r["process"]) for r in result["runs"]] == [
        (cache, reader, process) for cache in ("warm", "cold") for reader in ("current", "legacy")
        for process in ("main", "workers=0", "workers=1")]
    assert all(r["rows"] == 3 * 3 and r["rows_per_s"] > 0 and r["mb_per_s"] > 0 for r in result["runs"])
    assert result["row_kib"] == 427.0  # moments, semantics, CLS, REPA targets and the label of a 256² row
    assert "| current | warm | workers=1 |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [tmp_path / "r.json"]  # the dataset is gone


def test_host_overhead_benchmark_tiny(tmp_path, capsys):
    """The real trainer as process 0 of 4 with the stub SiT (one host read a step), the draws, the hand-off."""
    result = load_benchmark("host_overhead").main([
        "--global-batch", "8", "--processes", "1", "4", "--steps", "6", "--log-every", "3", "--draw-repeats", "1",
        "--workers", "1", "--tiny-rows", "64", "--real-shards", "4", "--real-rows-per-shard", "4",
        "--handoff-batches", "3", "--handoff-wait", "0.01", "--dir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    loop = result["loop"]
    assert loop["host_reads_per_step"] == 1 and loop["other_ms"] > 0 and loop["log_ms_per_step"] > 0
    assert [(r["processes"], r["rows_per_process"]) for r in result["rows"]] == [(1, 8), (4, 2)]
    assert result["rows"][0]["handoff_ms"] is None  # 8 rows a batch × 3 batches: more than the 16 rows there are
    assert result["rows"][1]["handoff_ms"] > 0 and result["rows"][1]["draws_ms"] > 0
    assert result["rows"][0]["h100_SiT-XL/2_ms"] > result["rows"][0]["h100_SiT-B/2_ms"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["global_batch"] == 8
    assert [(w["model"], w["tensors"]) for w in result["per_tensor"]] == [("SiT-B/2", 143), ("SiT-XL/2", 303)]
    assert all(w["adamw_ms"] > 0 and w["ema_ms"] > 0 and w["clip_ms"] > 0 for w in result["per_tensor"])
    assert "| 8 | 4 | 2 |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [tmp_path / "r.json"]  # the datasets are gone


def test_the_cost_estimates_in_the_docs_are_what_the_scripts_count(capsys):
    """docs/teacher.md's and docs/reproduce.md's figures come from these two scripts (FLOPs counted on meta
    tensors over the real modules); a change to a network or a recipe shows here."""
    load_benchmark("teacher_cost").main(["--config", str(REPO / "configs" / "teacher" / "vitb.yaml")])
    teacher = capsys.readouterr().out
    assert "615 GFLOPs per image (student fwd+bwd 517, teacher fwd 98)" in teacher
    assert "| 40% | 4.2 min | 6.9 h |" in teacher
    load_benchmark("reproduce_cost").main([])
    recipe = capsys.readouterr().out
    assert "| **total** | **82.0** | **7.2** | **14.4** | **1,162 GB** |" in recipe
    assert "| **total** | **156.9** | **13.8** | **27.5** | **822 GB** |" in recipe
    assert ": 2.2 GB" in recipe.splitlines()[1] and ": 11.0 GB" in recipe.splitlines()[2]  # the checkpoints
    assert "vae_encode 272.7, vae_decode 622.2, SiT-B/2 train 150.0, SiT-B/2 forward 50.0, SiT-XL/2 train 727.3" in recipe


def test_compare_setup_benchmark_tiny(tmp_path, capsys):
    result = load_benchmark("compare_setup").main(["--shards", "3", "--json", str(tmp_path / "r.json")])
    assert result["link"]["files_linked"] == 3 * 3 and result["link"]["seconds"] > 0
    assert result["semantic_norm"]["bytes_per_image"] == 2 * (16 * 16 * 16 + 768)  # float16 semantics + CLS at 256²
    assert "3 shards, 9 files linked" in capsys.readouterr().out
