"""Numerical equivalence with the authors' implementation (the compatibility vectors in tests/fixtures/compat)."""

from __future__ import annotations

import argparse

import pytest
import torch

from reglue.models import SemanticCompressor, SiT, build_sit, load_authors_checkpoint, load_state_dict_strict
from reglue.models.sit import sincos_pos_embed_2d
from reglue.sampling import Guidance, sample_sde


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_fresh_model_reproduces_official_pos_embed(official_vectors, official_config):
    model = SiT(**official_config)
    assert torch.equal(model.pos_embed, official_vectors["state_dict"]["pos_embed"])


def test_pos_embed_layout_row_major_column_first():
    emb = sincos_pos_embed_2d(8, grid_size=3, cls_slot=True)  # (10, 8)
    assert torch.equal(emb[0], torch.zeros(8))
    token = 1 + 2 * 3 + 1  # row 2, column 1
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    col = torch.cat([(1 * omega).sin(), (1 * omega).cos()]).float()
    row = torch.cat([(2 * omega).sin(), (2 * omega).cos()]).float()
    assert torch.allclose(emb[token], torch.cat([col, row]))


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_official_state_dict_loads_strictly_and_forward_matches(official_vectors, official_model, attention):
    f = official_vectors["forward"]
    official_model.set_attention(attention)  # math: the authors' timm-style attention
    try:
        with torch.no_grad():
            out, zs, cls_out = official_model(f["x"], f["t"], f["y"], cls_token=f["cls_token"])
    finally:
        official_model.set_attention("sdpa")
    assert max_abs(out, f["out"]) < 1e-5
    assert max_abs(zs, f["zs"]) < 1e-5
    assert max_abs(cls_out, f["cls_out"]) < 1e-5


@pytest.mark.parametrize("case", [0, 1])
def test_sde_samples_reproduce_authors_seed_for_seed(official_vectors, official_model, case):
    sample = official_vectors["sde_samples"][case]
    p = sample["params"]
    torch.manual_seed(sample["torch_manual_seed"])
    out = sample_sde(
        official_model, sample["latents"], sample["y"], sample["cls_latents"],
        num_steps=p["num_steps"],
        guidance=Guidance(scale=p["cfg_scale"], cls_scale=p["cls_cfg_scale"], low=p["guidance_low"],
                          high=p["guidance_high"], vae_only=p["vae_cfg"] == "true"),
    )
    assert out.dtype == torch.float64
    assert max_abs(out, sample["out"]) < 1e-5


def test_official_state_dict_with_module_prefix_loads(official_vectors, official_config):
    model = SiT(**official_config)
    prefixed = {"module." + k: v for k, v in official_vectors["state_dict"].items()}
    load_state_dict_strict(model, prefixed, "checkpoint")
    assert torch.equal(model.blocks[0].attn.qkv.weight, official_vectors["state_dict"]["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("name,encoder_depth", [("SiT-B/2", 4), ("SiT-XL/2", 8)])
def test_registry_matches_official_keys_and_shapes(official_vectors, name, encoder_depth):
    with torch.device("meta"):  # shapes only: skip allocating and initialising weights
        model = build_sit(name, in_channels=20, z_dim=768)
    assert model.encoder_depth == encoder_depth
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = {k: tuple(s) for k, s in official_vectors["official_keys"][name].items()}
    assert ours == official


@pytest.mark.parametrize("name,millions", [("SiT-B/2", 132), ("SiT-XL/2", 677)])
def test_parameter_counts_match_paper(name, millions):
    """The paper counts the sampling network: the REPA projector is training-only."""
    with torch.device("meta"):
        model = build_sit(name)
    backbone = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("projectors"))
    assert abs(backbone / 1e6 - millions) < 1.0, backbone


def test_compressor_vector(official_vectors):
    vec = official_vectors["compressor"]
    model = SemanticCompressor(vec["channels"])
    model.load_state_dict(vec["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        assert max_abs(model.encode(vec["x"]), vec["latent"]) < 1e-5
        assert max_abs(model(vec["x"]), vec["reconstruction"]) < 1e-5


def test_compressor_from_prefixed_state_dict_infers_channels(official_vectors):
    vec = official_vectors["compressor"]
    model = SemanticCompressor.from_state_dict({"module." + k: v for k, v in vec["state_dict"].items()}).eval()
    assert model.channels == tuple(vec["channels"])
    with torch.no_grad():
        assert max_abs(model.decode(model.encode(vec["x"])), vec["reconstruction"]) < 1e-5


def test_authors_checkpoint_format_loads_without_unpickling_code(tmp_path, official_vectors, official_config):
    args = argparse.Namespace(model="SiT-XL/2", cfg_prob=0.1, encoder_depth=8)
    state = {"module." + k: v for k, v in official_vectors["state_dict"].items()}
    path = tmp_path / "0400000.pt"
    torch.save({"model": state, "ema": state, "opt": {}, "args": args, "steps": 400000}, path)
    checkpoint = load_authors_checkpoint(path)
    assert checkpoint["args"]["encoder_depth"] == 8 and checkpoint["steps"] == 400000
    model = SiT(**official_config)
    load_state_dict_strict(model, checkpoint["ema"], "EMA weights")


class Payload:
    """Stands for arbitrary pickled code in a checkpoint."""


def test_authors_checkpoint_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "ema": {}, "args": Payload()}, path)
    with pytest.raises(ValueError, match="refuses to execute"):
        load_authors_checkpoint(path)
