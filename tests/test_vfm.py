"""VFM features (SPEC §4): DINOv2 against the authors' vectors, weight loading, DINOv3 option."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from conftest import shared_file
from reglue.encoders import vfm
from reglue.encoders.vfm import VFM_MODELS, build_dinov2, build_vfm
from reglue.encoders.vfm_weights import dinov2_to_timm
from reglue.resolution import RESOLUTIONS

HAS_DINOV3 = "vit_small_patch16_dinov3" in timm.list_models("*dinov3*")


@pytest.fixture(scope="module")
def vectors() -> dict:
    return torch.load(shared_file("compat/dinov2_vectors.pt"), weights_only=True)


def build_from_vectors(vectors: dict, weights="state_dict", **overrides):
    """The vectors' tiny DINOv2 (64 wide, 12 blocks, 2 heads, patch 14, 4 registers, 518²)."""
    arch = vectors["arch"]
    kwargs = {
        "patch_size": arch["patch_size"], "num_register_tokens": arch["num_register_tokens"],
        "img_size": arch["img_size"], "layers": arch["layers"],
        "weights": vectors["state_dict"] if weights == "state_dict" else weights,
    }
    kwargs.update(overrides)
    return build_dinov2(arch["embed_dim"], arch["depth"], arch["num_heads"], **kwargs)


@pytest.fixture(scope="module")
def extractor(vectors):
    return build_from_vectors(vectors)


def random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


# --------------------------------------------------------------------------------------
# The authors' vectors
# --------------------------------------------------------------------------------------


def test_preprocessing_matches_vectors(vectors, extractor):
    x = extractor.preprocess(vectors["raw_uint8"])
    assert x.shape == vectors["preprocessed"].shape == (2, 3, 224, 224)
    assert x.dtype == torch.float32
    assert (x - vectors["preprocessed"]).abs().max() < 1e-6


def test_official_tiny_dinov2_matches_vectors(vectors, extractor):
    out = extractor(vectors["raw_uint8"])
    assert out.local.shape == vectors["layer_feats"].shape == (2, 256, 16, 16)
    assert out.cls.shape == (2, 64) and out.repa.shape == (2, 257, 64)
    patches = out.repa[:, 1:].transpose(1, 2).reshape(2, 64, 16, 16)  # row-major tokens
    assert (out.local - vectors["layer_feats"]).abs().max() < 1e-4
    assert (out.cls - vectors["cls_last"]).abs().max() < 1e-4
    assert (patches - vectors["patch_last"]).abs().max() < 1e-4
    assert torch.equal(out.repa[:, 0], out.cls)
    assert torch.equal(out.local[:, -64:], patches)  # block 11 is also the last block


# --------------------------------------------------------------------------------------
# Weight loading
# --------------------------------------------------------------------------------------


def test_key_map_turns_official_layout_into_timm_and_is_idempotent(vectors):
    official = vectors["state_dict"]
    mapped = dinov2_to_timm(official)
    assert "mask_token" not in mapped and "register_tokens" not in mapped
    assert torch.equal(mapped["reg_token"], official["register_tokens"])
    assert mapped["pos_embed"].shape == (1, 37 * 37, 64)
    assert torch.equal(mapped["pos_embed"], official["pos_embed"][:, 1:])
    assert torch.equal(mapped["cls_token"], official["cls_token"] + official["pos_embed"][:, :1])
    assert "mask_token" in official and official["pos_embed"].shape == (1, 1370, 64)  # input untouched
    again = dinov2_to_timm(mapped)
    assert again.keys() == mapped.keys()
    assert all(torch.equal(again[k], mapped[k]) for k in mapped)


def test_official_file_and_timm_safetensors_give_identical_outputs(vectors, extractor, tmp_path):
    expected = extractor(vectors["raw_uint8"])
    official_path = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(vectors["state_dict"], official_path)
    timm_path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(extractor.vit.state_dict(), str(timm_path))
    for path in (official_path, str(timm_path)):
        out = build_from_vectors(vectors, weights=path)(vectors["raw_uint8"])
        for got, want in zip(out, expected, strict=True):
            assert torch.equal(got, want)


def test_module_prefix_loads(vectors, extractor):
    prefixed = {f"module.{k}": v for k, v in vectors["state_dict"].items()}
    out = build_from_vectors(vectors, weights=prefixed)(vectors["raw_uint8"])
    assert torch.equal(out.local, extractor(vectors["raw_uint8"]).local)


def test_wrong_width_names_expected_and_found_shapes(vectors):
    with pytest.raises(ValueError) as err:
        build_dinov2(32, 12, 2, weights=vectors["state_dict"], img_size=518)
    message = str(err.value)
    assert "cls_token: expected (1, 1, 32), found (1, 1, 64)" in message
    assert "width 64, patch 14, 12 blocks" in message


def test_missing_keys_are_listed(vectors):
    partial = {k: v for k, v in vectors["state_dict"].items() if not k.startswith("norm.")}
    with pytest.raises(ValueError, match=r"2 missing key\(s\).*norm\.bias"):
        build_from_vectors(vectors, weights=partial)


@pytest.fixture
def no_model_building(monkeypatch):
    """Weights problems must surface before any (possibly 1B-parameter) model is built."""

    def refuse(**kwargs):
        raise AssertionError("a model was built before the weights were found")

    monkeypatch.setattr(vfm, "DINOv2ViT", refuse)


def test_missing_path_raises_file_not_found_naming_it(tmp_path, no_model_building):
    path = tmp_path / "nowhere" / "dinov2_vitb14_reg4_pretrain.pth"
    with pytest.raises(FileNotFoundError, match=str(path)):
        build_vfm("dinov2_vitg14_reg", weights=path)


def test_hub_id_fails_fast_saying_where_to_put_the_file(no_model_building):
    with pytest.raises(FileNotFoundError) as err:
        build_vfm("dinov2_vitb14_reg", weights="timm/vit_base_patch14_reg4_dinov2.lvd142m")
    message = str(err.value)
    assert "never downloads" in message
    assert "huggingface-cli download timm/vit_base_patch14_reg4_dinov2.lvd142m model.safetensors" in message
    assert "weights='weights/vit_base_patch14_reg4_dinov2.lvd142m/model.safetensors'" in message


def test_file_that_is_not_a_state_dict_is_rejected(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=r"not a state dict of tensors \(found \['teacher'\]\)"):
        build_vfm("dinov2_vits14_reg", weights=path, depth=1, layers=(0,))


def test_giant_swiglu_loads_official_keys_and_computes_official_mlp():
    """ViT-g's official ``mlp.w12``/``mlp.w3`` load into timm's SwiGLUPacked: silu(x1)·x2."""
    torch.manual_seed(0)
    source = build_dinov2(64, 2, 2, swiglu=True, weights=None, layers=(0, 1))
    with torch.no_grad():  # off timm's init (layer scale 1e-5, tiny tokens) so every part shows
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    timm_layout = source.vit.state_dict()
    cls_position = torch.randn(1, 1, 64)
    official = {
        k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3."): v
        for k, v in timm_layout.items() if k not in ("cls_token", "pos_embed", "reg_token")
    }
    official.update(
        cls_token=timm_layout["cls_token"] - cls_position,
        pos_embed=torch.cat([cls_position, timm_layout["pos_embed"]], dim=1),
        register_tokens=timm_layout["reg_token"], mask_token=torch.zeros(1, 64),
    )
    assert official["blocks.0.mlp.w12.weight"].shape == (2 * 176, 64)  # (⌊8·64/3⌋+7)//8·8 = 176
    loaded = build_dinov2(64, 2, 2, swiglu=True, weights=official, layers=(0, 1))
    images = random_images(1, 256)
    for got, want in zip(loaded(images), source(images), strict=True):
        assert (got - want).abs().max() < 1e-5
    x = torch.randn(3, 64)
    w12 = F.linear(x, official["blocks.0.mlp.w12.weight"], official["blocks.0.mlp.w12.bias"])
    x1, x2 = w12.chunk(2, dim=-1)
    expected = F.linear(F.silu(x1) * x2, official["blocks.0.mlp.w3.weight"], official["blocks.0.mlp.w3.bias"])
    assert torch.allclose(loaded.vit.blocks[0].mlp(x), expected, atol=1e-6)


# --------------------------------------------------------------------------------------
# Registry, resolution, caching, freezing, precision
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, width, heads, fc1_width",
    [
        ("dinov2_vits14_reg", 384, 6, 1536),
        ("dinov2_vitb14_reg", 768, 12, 3072),
        ("dinov2_vitl14_reg", 1024, 16, 4096),
        ("dinov2_vitg14_reg", 1536, 24, 8192),  # SwiGLU: w12 is 2 × 4096
    ],
)
def test_registered_dinov2_sizes_have_official_shapes(name, width, heads, fc1_width):
    extractor = build_vfm(name, weights=None, depth=1, layers=(0,))  # one block keeps it fast
    keys = extractor.vit.state_dict()
    assert keys["pos_embed"].shape == (1, 37 * 37, width)
    assert keys["reg_token"].shape == (1, 4, width)
    assert keys["blocks.0.mlp.fc1.weight"].shape == (fc1_width, width)
    assert extractor.vit.blocks[0].attn.num_heads == heads


def test_registry_depths_and_default_layers_are_the_last_four_blocks():
    assert {n: a.depth for n, a in VFM_MODELS.items() if a.family == "dinov2"} == {
        "dinov2_vits14_reg": 12, "dinov2_vitb14_reg": 12, "dinov2_vitl14_reg": 24, "dinov2_vitg14_reg": 40,
        "dinov2_vits14": 12, "dinov2_vitb14": 12, "dinov2_vitl14": 24, "dinov2_vitg14": 40,
    }
    assert build_vfm("dinov2_vits14_reg", weights=None, depth=6).layers == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="unknown VFM 'dinov2_vitx14'"):
        build_vfm("dinov2_vitx14", weights=None)


@pytest.mark.parametrize(
    "name, width, heads, fc1_width",
    [("dinov2_vits14", 384, 6, 1536), ("dinov2_vitb14", 768, 12, 3072), ("dinov2_vitl14", 1024, 16, 4096),
     ("dinov2_vitg14", 1536, 24, 8192)],
)
def test_registered_dinov2_without_registers_has_official_shapes(name, width, heads, fc1_width):
    extractor = build_vfm(name, weights=None, depth=1, layers=(0,))
    keys = extractor.vit.state_dict()
    assert "reg_token" not in keys and extractor.vit.num_prefix_tokens == 1
    assert keys["pos_embed"].shape == (1, 37 * 37, width)
    assert keys["blocks.0.mlp.fc1.weight"].shape == (fc1_width, width)
    assert extractor.vit.blocks[0].attn.num_heads == heads
    out = build_vfm(name, weights=None, depth=1, layers=(0,), embed_dim=32, num_heads=2)(random_images(1, 256))
    assert out.repa.shape == (1, 1 + 256, 32)  # [CLS; patches], nothing else


def tiny_official_state_dict(registers: int) -> dict[str, torch.Tensor]:
    """A random state dict in the official hub layout: CLS slot in pos_embed, mask_token, registers or not."""
    torch.manual_seed(1)
    source = build_dinov2(32, 2, 2, weights=None, layers=(0, 1), num_register_tokens=registers).vit.state_dict()
    official = {k: v for k, v in source.items() if k not in ("pos_embed", "reg_token")}
    official.update(pos_embed=torch.randn(1, 1 + 37 * 37, 32), mask_token=torch.zeros(1, 32))
    if registers:
        official["register_tokens"] = torch.randn(1, registers, 32)
    return official


def test_official_no_register_layout_loads_and_resizes_positions_like_the_hub_model():
    """dinov2_vitl14_pretrain.pth's layout: no register_tokens; the hub model resizes the 37×37
    positions with scale factor (16 + 0.1) / 37 and no antialias (interpolate_offset=0.1)."""
    official = tiny_official_state_dict(registers=0)
    extractor = build_vfm("dinov2_vitl14", weights=official, embed_dim=32, depth=2, num_heads=2)
    grid = official["pos_embed"][:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    got = extractor.vit.grid_pos_embed((16, 16)).reshape(1, 16, 16, 32).permute(0, 3, 1, 2)
    assert torch.equal(got, expected)
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True)  # the *_reg models' rule
    assert (got - by_size).abs().max() > 1e-3


def test_register_weights_in_a_model_without_registers_name_the_fix():
    with pytest.raises(ValueError) as err:
        build_vfm("dinov2_vitl14", weights=tiny_official_state_dict(registers=4), embed_dim=32, depth=2,
                  num_heads=2)
    message = str(err.value)
    assert "unexpected key(s), e.g. ['reg_token']" in message
    assert "32, patch 14, 2 blocks, 4 register tokens" in message and "embed_dim=32, depth=2" in message


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_every_resolution_gives_an_r16_grid_from_a_7r8_input(vectors, resolution):
    """R² images → 224·R/256 = 7R/8 input, 14-px patches: an (R/16)² grid (32×32, 1025 tokens at 512²)."""
    side, grid = 7 * resolution // 8, resolution // 16
    extractor = build_from_vectors(vectors, resolution=resolution)
    assert (extractor.input_size, extractor.grid_size) == (side, grid)
    images = random_images(1, resolution)
    assert extractor.preprocess(images).shape == (1, 3, side, side)
    out = extractor(images)
    assert out.local.shape == (1, 4 * 64, grid, grid)
    assert out.repa.shape == (1, 1 + grid * grid, 64)
    assert out.cls.shape == (1, 64)
    assert torch.equal(out.repa[:, 0], out.cls)
    assert torch.equal(out.local[:, -64:].flatten(2).transpose(1, 2), out.repa[:, 1:])  # block 11 is the last
    assert extractor.vit.grid_pos_embed((grid, grid)).shape == (1, grid * grid, 64)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_dinov2_without_registers_resizes_positions_by_scale_to_every_grid(resolution):
    """The no-register models resize positions by scale (grid + 0.1) / 37: it must land on R/16 at every R."""
    torch.manual_seed(0)
    grid = resolution // 16
    extractor = build_vfm("dinov2_vits14", weights=None, embed_dim=32, depth=2, num_heads=2, resolution=resolution)
    assert extractor.vit.interpolate_offset == 0.1 and extractor.vit.num_prefix_tokens == 1
    assert (extractor.input_size, extractor.grid_size) == (7 * resolution // 8, grid)
    out = extractor(random_images(1, resolution))
    assert out.local.shape == (1, 2 * 32, grid, grid)
    assert out.cls.shape == (1, 32) and out.repa.shape == (1, 1 + grid * grid, 32)
    assert torch.equal(out.local[:, -32:].flatten(2).transpose(1, 2), out.repa[:, 1:])


def test_resized_position_embedding_is_computed_once_per_grid(vectors, monkeypatch):
    calls = []

    def counting_resample(*args, **kwargs):
        calls.append(kwargs["new_size"])
        return resample(*args, **kwargs)

    resample = vfm.resample_abs_pos_embed
    monkeypatch.setattr(vfm, "resample_abs_pos_embed", counting_resample)
    extractor = build_from_vectors(vectors)
    images = random_images(1, 256)
    first = extractor(images)
    extractor(images)
    assert calls == [[16, 16]]
    with torch.no_grad():  # new weights must invalidate the cache
        extractor.vit.pos_embed.mul_(2.0)
    assert not torch.equal(extractor(images).local, first.local)
    assert calls == [[16, 16], [16, 16]]


def test_extractor_is_frozen_and_stays_in_eval(extractor, vectors):
    assert not any(p.requires_grad for p in extractor.parameters())
    assert not extractor.training
    extractor.train()
    assert not extractor.training and not extractor.vit.training
    out = extractor(vectors["raw_uint8"][:1])
    assert out.local.grad_fn is None and out.repa.grad_fn is None


def test_bf16_autocast_returns_float32_close_to_fp32(vectors, extractor):
    reference = extractor(vectors["raw_uint8"])
    out = build_from_vectors(vectors, autocast_dtype=torch.bfloat16)(vectors["raw_uint8"])
    for got, want in zip(out, reference, strict=True):
        assert got.dtype == torch.float32
        assert not torch.equal(got, want)  # autocast really ran
        assert (got - want).abs().max() < 0.05 * want.abs().max()


# --------------------------------------------------------------------------------------
# DINOv3 (timm, RoPE)
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_DINOV3, reason="this timm has no DINOv3 models (timm >= 1.0.20 needed)")
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_tiny_dinov3_through_the_same_api(resolution):
    """R² images → input side R, 16-px patches: an (R/16)² grid at every R."""
    torch.manual_seed(0)
    grid, batch = resolution // 16, 2 if resolution <= 256 else 1
    tiny = {"embed_dim": 32, "depth": 3, "num_heads": 2, "resolution": resolution}
    extractor = build_vfm("dinov3_vits16", weights=None, **tiny)
    assert extractor.layers == (0, 1, 2)
    assert (extractor.input_size, extractor.grid_size) == (resolution, grid)
    images = random_images(batch, resolution)
    assert extractor.preprocess(images).shape == (batch, 3, resolution, resolution)
    out = extractor(images)
    assert out.local.shape == (batch, 3 * 32, grid, grid)
    assert out.cls.shape == (batch, 32) and out.repa.shape == (batch, 1 + grid * grid, 32)
    assert torch.equal(out.repa[:, 0], out.cls)
    assert torch.equal(out.local[:, -32:].flatten(2).transpose(1, 2), out.repa[:, 1:])
    reloaded = build_vfm("dinov3_vits16", weights=extractor.vit.state_dict(), **tiny)
    assert torch.equal(reloaded(images).local, out.local)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, found",
    [
        (torch.rand(1, 3, 256, 256), "torch.float32 (1, 3, 256, 256)"),
        (torch.zeros(1, 1, 256, 256, dtype=torch.uint8), "torch.uint8 (1, 1, 256, 256)"),
        (torch.zeros(1, 3, 224, 224, dtype=torch.uint8), "torch.uint8 (1, 3, 224, 224)"),
        (torch.zeros(3, 256, 256, dtype=torch.uint8), "torch.uint8 (3, 256, 256)"),
    ],
)
def test_bad_images_name_expected_and_found(extractor, images, found):
    with pytest.raises(ValueError) as err:
        extractor(images)
    assert "uint8 (B, 3, 256, 256)" in str(err.value) and found in str(err.value)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"layers": (9, 8)}, r"strictly increasing .* found \(9, 8\)"),
        ({"layers": (8, 12)}, r"in 0\.\.11.*found \(8, 12\)"),
        ({"layers": ()}, r"at least one; found \(\)"),
        ({"resolution": 300}, "multiple of 64 from 64 to 512.*found 300"),
        ({"autocast_dtype": torch.float64}, "autocast_dtype.*found torch.float64"),
    ],
)
def test_bad_build_arguments_are_rejected(vectors, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_from_vectors(vectors, **overrides)
