"""The sampling benchmarks run in a tiny configuration (so they cannot rot)."""

from __future__ import annotations

import pytest

from conftest import shared_file
from test_benchmarks import load_benchmark


def test_sample_host_step_benchmark_tiny(capsys):
    result = load_benchmark("sample").main(["--host", "--batch", "3", "--micro-batch", "2", "--steps", "3",
                                            "--channels", "2", "--input-size", "4", "--z-dim", "8", "--device", "cpu"])
    assert result["draws_ms"] > 0 and result["cpu_loop_ms"] > 0 and result["ops_per_step"] > 10
    assert capsys.readouterr().out.startswith("| host | 3 | 2 |")


STAND_IN_SIT = '''
from reglue.models.sit import SiT as ReglueSiT


class StandIn(ReglueSiT):
    """The authors' SiT interface (keyword arguments, attributes, forward signature and outputs) over a tiny SiT."""

    def __init__(self, input_size, num_classes, in_channels, use_cfg, z_dims, encoder_depth, fused_attn, qk_norm):
        super().__init__(input_size=input_size, in_channels=in_channels, hidden_size=48, depth=2, num_heads=12,
                         encoder_depth=1, num_classes=num_classes, z_dim=z_dims[0], projector_dim=16)

    def forward(self, x, t, y, return_logvar=False, cls_token=None, **options):
        out, zs, cls = super().forward(x, t, y, cls_token=cls_token, **options)
        return out, [zs], cls


class SiT(ReglueSiT):
    """The authors' SiT constructor, as the compatibility-vector check calls it."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size, decoder_hidden_size, depth, num_heads,
                 encoder_depth, num_classes, z_dims, projector_dim, fused_attn, qk_norm):
        super().__init__(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
                         depth=depth, num_heads=num_heads, encoder_depth=encoder_depth, num_classes=num_classes,
                         z_dim=z_dims[0], projector_dim=projector_dim)

    def forward(self, x, t, y, return_logvar=False, cls_token=None, **options):
        out, zs, cls = super().forward(x, t, y, cls_token=cls_token, **options)
        return out, [zs], cls


SiT_models = {"SiT-B/2": StandIn}
'''

STAND_IN_SAMPLERS = '''
from reglue.sampling import Guidance, sample_sde


def euler_maruyama_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0,
                           guidance_high=1.0, path_type="linear", cls_latents=None, args=None):
    guidance = Guidance(scale=cfg_scale, cls_scale=args.cls_cfg_scale, low=guidance_low, high=guidance_high)
    return sample_sde(model, latents, y, cls_latents, num_steps=num_steps, guidance=guidance)
'''


def test_sample_vs_authors_benchmark_harness(tmp_path, capsys):
    """Checks the harness only: the suite cannot hold the authors' code, so a stand-in folder with their
    two files' interface (SiT_models, euler_maruyama_sampler) over our own tiny SiT takes its place.
    Both sides then compute the same samples from the same seed, which the reported difference shows."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sit.py").write_text(STAND_IN_SIT)
    (tmp_path / "samplers.py").write_text(STAND_IN_SAMPLERS)
    result = load_benchmark("sample_vs_authors").main([
        "--authors-code", str(tmp_path), "--batch", "3", "--steps", "3", "--input-size", "8", "--repeats", "2",
        "--device", "cpu", "--precision", "fp32", "--profile", "--json", str(tmp_path / "r.json")])
    assert result["max_abs_diff"] < 1e-5 and result["speedup"] > 0 and len(result["seconds"]["authors"]) == 2
    assert 0 < result["profile"]["reglue"]["matmul_share"] < 1 and result["profile"]["authors"]["gflop"] > 0
    assert capsys.readouterr().out.startswith("| SiT-B/2 | 3 | 3 | 2.3 | fp32 |")
    checked = load_benchmark("sample_vs_authors").main([
        "--authors-code", str(tmp_path), "--batch", "1", "--steps", "1", "--input-size", "8", "--repeats", "1",
        "--device", "cpu", "--precision", "bf16", "--profile",
        "--check-vectors", str(shared_file("compat/official_vectors.pt"))])
    assert set(checked["vectors"]) == {"forward", "sde_0", "sde_1"} and max(checked["vectors"].values()) < 1e-5
    assert 1e-5 < checked["max_abs_diff"] < 0.1 and checked["precision"] == "bf16"  # ours in bf16, theirs fp32
    assert checked["profile"]["reglue"]["gflop"] > 0
    with pytest.raises(FileNotFoundError, match="samplers.py and models/sit.py"):
        load_benchmark("sample_vs_authors").main(["--authors-code", str(tmp_path / "models")])


def test_sample_request_sizes_benchmark_tiny(capsys):
    result = load_benchmark("sample").main([
        "--requests", "1,3", "--steps", "2", "--cfg-scale", "2", "--model", "SiT-S/8", "--input-size", "16",
        "--device", "cpu", "--overrides",
        '{"depth": 2, "hidden_size": 32, "num_heads": 2, "z_dim": 16, "projector_dim": 16, "encoder_depth": 1}'])
    assert [(r["images"], r["micro_batch"]) for r in result["requests"]] == [(1, None), (1, 32), (3, None), (3, 32)]
    assert all(r["seconds"] > 0 for r in result["requests"])
    assert capsys.readouterr().out.startswith("| ImageSampler | 1 | None | 2 |")
