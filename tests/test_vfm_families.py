"""The teachers beyond DINOv2 (docs/vfm.md): CLIP-L/14, SigLIP-B/16, MAE-B/L, I-JEPA-H/14, with tiny random
networks of the same timm classes: shapes at every resolution, what stands in for the class token, the patch
tokens without prefix tokens, preprocessing against a hand-written reference, strict loads of every weight
layout and the key maps' round trips, and `reglue train` end to end on semantics cached with each."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from timm.layers import QuickGELU, resample_abs_pos_embed
from torch import nn

from conftest import REPO
from reglue.cli import main
from reglue.data.prepare import PrepareSettings, run_prepare
from reglue.data.synthetic import write_synthetic_dataset
from reglue.encoders import vfm
from reglue.encoders.pixel import PIXEL_AUTOENCODER
from reglue.encoders.semantics import VFMSpec
from reglue.encoders.vfm import VFM_FAMILIES, VFM_MODELS, build_vfm
from reglue.encoders.vfm_weights import ijepa_to_timm, mae_to_timm, openai_clip_to_timm
from reglue.metrics.feature_space import load_feature_space
from reglue.models.compressor import PCAProjection
from reglue.pipeline import run_cache_semantics, run_fit_pca, run_norm_stats, run_train_compressor
from reglue.resolution import RESOLUTIONS
from reglue.training.compressor import BEST_WEIGHTS, CompressorSettings
from reglue.training.metrics import read_metrics
from test_benchmarks import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread

NEW = ("clip_vitl14", "siglip_vitb16", "mae_vitb16", "mae_vitl16", "ijepa_vith14")
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def tiny(name: str, weights=None, resolution: int = 64, seed: int = 0) -> vfm.VFMExtractor:
    torch.manual_seed(seed)
    return build_vfm(name, weights=weights, resolution=resolution, **TINY)


def random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def assert_same_features(a: vfm.VFMFeatures, b: vfm.VFMFeatures) -> None:
    for name in a._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# --------------------------------------------------------------------------------------
# Shapes, the class token or its stand-in, prefix tokens
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_every_resolution_gives_the_r16_grid(name):
    patch = VFM_FAMILIES[VFM_MODELS[name].family].patch_size
    for resolution in RESOLUTIONS:
        extractor = tiny(name, resolution=resolution)
        grid = resolution // 16
        assert extractor.input_size == patch * grid
        out = extractor(random_images(1, resolution))
        assert out.local.shape == (1, 2 * 32, grid, grid)  # the last four of 2 blocks: both
        assert out.cls.shape == (1, 32) and out.repa.shape == (1, 1 + grid * grid, 32)
        assert all(torch.isfinite(t).all() for t in out)


def class_token(vit, tokens, patches):
    return tokens[:, 0]


def attention_pool(vit, tokens, patches):
    return vit.attn_pool(patches)


def mean_patch(vit, tokens, patches):
    return patches.mean(dim=1)


# name -> (prefix tokens: class token + registers, what cls must be, computed from the final-normed tokens)
CLS_STAND_INS = {
    "dinov2_vitb14_reg": (5, class_token),
    "dinov3_vitb16": (5, class_token),
    "clip_vitl14": (1, class_token),
    "siglip_vitb16": (0, attention_pool),
    "mae_vitl16": (1, class_token),
    "ijepa_vith14": (0, mean_patch),
}


@pytest.mark.parametrize("name", CLS_STAND_INS)
def test_patch_tokens_leave_out_every_prefix_token_and_cls_is_the_familys_global_token(name):
    prefix, reference = CLS_STAND_INS[name]
    extractor = tiny(name, resolution=128)
    images = random_images(2, 128)
    out = extractor(images)
    with torch.no_grad():
        tokens = extractor.vit.forward_features(extractor.preprocess(images))  # (2, P + 64, 32) after the norm
        assert tokens.shape[1] == prefix + 64
        patches = tokens[:, prefix:]
        torch.testing.assert_close(out.repa[:, 1:], patches)
        torch.testing.assert_close(out.local[:, -32:].flatten(2).transpose(1, 2), patches)  # last block's map
        torch.testing.assert_close(out.cls, reference(extractor.vit, tokens, patches))
    torch.testing.assert_close(out.repa[:, 0], out.cls)
    assert not torch.allclose(out.cls, patches[:, 0])  # not the first patch (what token 0 is without a class token)


def test_mae_resizes_its_14x14_position_table_to_the_16x16_grid_as_repas_release_does():
    vit = tiny("mae_vitb16", resolution=256).vit
    assert vit.pos_embed.shape == (1, 1 + 14 * 14, 32)  # pretrained at 224²: the class slot and 14² patches
    with torch.no_grad():
        patches = vit.patch_embed(torch.randn(1, 3, 256, 256))  # (1, 16, 16, 32)
        table = resample_abs_pos_embed(vit.pos_embed, [16, 16])  # REPA's call: 1 prefix token, bicubic, antialias
        expected = torch.cat([vit.cls_token, patches.reshape(1, 256, 32)], dim=1) + table
        torch.testing.assert_close(vit._pos_embed(patches), expected)


def test_clip_has_openais_quickgelu_pre_norm_and_bias_free_patch_embedding():
    vit = tiny("clip_vitl14").vit
    assert all(isinstance(block.mlp.act, QuickGELU) for block in vit.blocks)
    assert isinstance(vit.norm_pre, nn.LayerNorm) and vit.patch_embed.proj.bias is None


@pytest.mark.parametrize("name", NEW)
def test_registered_sizes_preprocessing_and_patch_are_timms_of_the_released_weights(name):
    arch, family = VFM_MODELS[name], VFM_FAMILIES[VFM_MODELS[name].family]
    cfg = timm.models.get_pretrained_cfg(arch.timm_name)
    assert (family.mean, family.std, cfg.interpolation) == (tuple(cfg.mean), tuple(cfg.std), "bicubic")
    with torch.device("meta"):
        full = timm.create_model(arch.timm_name, pretrained=False, num_classes=0)
    assert (full.embed_dim, len(full.blocks), full.blocks[0].attn.num_heads) == (
        arch.embed_dim, arch.depth, arch.num_heads)
    assert full.patch_embed.patch_size[0] == family.patch_size


# --------------------------------------------------------------------------------------
# Preprocessing against a hand-written reference
# --------------------------------------------------------------------------------------


def bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
    """(size_out, size_in) weights of a bicubic resize (Keys, a = -0.75), half-pixel centres, no antialias,
    border taps clamped: what torch's F.interpolate(mode="bicubic", align_corners=False) computes."""

    def cubic(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        source = (i + 0.5) * size_in / size_out - 0.5
        base = int(np.floor(source))
        for tap in range(base - 1, base + 3):
            weights[i, min(max(tap, 0), size_in - 1)] += cubic(source - tap)
    return weights


# one name per distinct preprocessing: (mean, std) and the input side at 64² (patch 14: 56, patch 16: 64)
PREPROCESSING = {
    "clip_vitl14": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 56),
    "siglip_vitb16": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 64),
    "mae_vitb16": (*IMAGENET, 64),
    "ijepa_vith14": (*IMAGENET, 56),
}


@pytest.mark.parametrize("name", PREPROCESSING)
def test_preprocessing_is_mean_std_then_bicubic_to_the_families_side(name):
    mean, std, side = PREPROCESSING[name]
    images = random_images(2, 64, seed=3)
    x = images.double().numpy() / 255.0
    x = (x - np.array(mean).reshape(1, 3, 1, 1)) / np.array(std).reshape(1, 3, 1, 1)
    resize = bicubic_matrix(64, side)
    expected = np.einsum("ij,bcjk,lk->bcil", resize, x, resize)  # rows, then columns
    got = tiny(name).preprocess(images)
    assert got.shape == (2, 3, side, side)
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-4)  # float32 rounding


# --------------------------------------------------------------------------------------
# Weight layouts: timm's for every family, the official ones through their key maps
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_timm_layout_loads_strictly_and_gives_the_same_features(name, tmp_path):
    source = tiny(name, seed=1)
    state_dict = {k: v.contiguous() for k, v in source.vit.state_dict().items()}
    if name == "clip_vitl14":  # timm's CLIP file carries OpenAI's proj as its head: not used
        state_dict |= {"head.weight": torch.randn(24, 32), "head.bias": torch.zeros(24)}
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    loaded = tiny(name, weights=tmp_path / "model.safetensors", seed=2)
    images = random_images(2, 64)
    assert_same_features(loaded(images), source(images))


def to_openai_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm-layout CLIP vision tower in OpenAI's layout (written from openai/CLIP's model.py names), with a
    text tower, ``proj`` and ``logit_scale`` beside it, as ``torch.jit.load("ViT-L-14.pt").state_dict()``."""
    names = {"patch_embed.proj.": "conv1.", "norm_pre.": "ln_pre.", "norm.": "ln_post.", "norm1.": "ln_1.",
             "norm2.": "ln_2.", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
             "attn.proj.": "attn.out_proj.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
    out = {"visual.class_embedding": state_dict["cls_token"].reshape(-1),
           "visual.positional_embedding": state_dict["pos_embed"][0], "visual.proj": torch.randn(32, 24)}
    for key, value in state_dict.items():
        if key in ("cls_token", "pos_embed"):
            continue
        block = key.startswith("blocks.")
        if block:
            index, key = key.split(".", 2)[1:]
        for timm_name, openai_name in names.items():
            if key.startswith(timm_name):
                key = openai_name + key.removeprefix(timm_name)
                break
        out[f"visual.transformer.resblocks.{index}.{key}" if block else f"visual.{key}"] = value
    text = {"token_embedding.weight": torch.randn(10, 16), "positional_embedding": torch.randn(7, 16),
            "transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16), "ln_final.weight": torch.ones(16),
            "text_projection": torch.randn(16, 24), "logit_scale": torch.tensor(4.6)}
    return out | text


def to_official_mae(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A timm-layout MAE encoder as MAE's released checkpoint, with the pixel decoder of its visualisation
    checkpoints beside it (facebookresearch/mae models_mae.py names)."""
    decoder = {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32),
               "decoder_pos_embed": torch.zeros(1, 17, 16), "decoder_blocks.0.norm1.weight": torch.ones(16),
               "decoder_norm.weight": torch.ones(16), "decoder_pred.weight": torch.randn(768, 16)}
    return {"model": dict(state_dict) | decoder}


def to_official_ijepa(state_dict: dict[str, torch.Tensor]) -> dict[str, object]:
    """A timm-layout I-JEPA encoder as I-JEPA's training checkpoint (src/train.py save_checkpoint): DDP-wrapped
    context encoder, a predictor, an EMA target encoder that differs, the optimiser and counters."""
    ddp = {f"module.{k}": v for k, v in state_dict.items()}
    return {"encoder": ddp, "predictor": {"module.predictor_embed.weight": torch.randn(16, 32)},
            "target_encoder": {k: v + 1 for k, v in ddp.items()}, "opt": {"state": {}, "param_groups": []},
            "scaler": None, "epoch": 300, "loss": 0.5, "batch_size": 128, "world_size": 16, "lr": 1e-3}


LAYOUTS = {
    "clip_vitl14": (to_openai_clip, openai_clip_to_timm),
    "mae_vitb16": (to_official_mae, mae_to_timm),
    "mae_vitl16": (to_official_mae, mae_to_timm),
    "ijepa_vith14": (to_official_ijepa, ijepa_to_timm),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_official_layout_round_trips_through_its_key_map_and_loads_strictly(name, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="reglue.encoders.vfm_weights")
    to_official, to_timm = LAYOUTS[name]
    source = tiny(name, seed=1)
    state_dict = source.vit.state_dict()
    official = to_official(state_dict)
    mapped = to_timm(official)
    assert mapped.keys() == state_dict.keys()
    assert all(torch.equal(mapped[k], v) for k, v in state_dict.items())
    assert to_timm(state_dict).keys() == state_dict.keys()  # timm's layout passes through
    torch.save(official, tmp_path / "official.pth")
    images = random_images(2, 64)
    assert_same_features(tiny(name, weights=tmp_path / "official.pth", seed=2)(images), source(images))
    dropped = {"clip_vitl14": "OpenAI CLIP weights: 31 vision tensors kept, 7 dropped",  # 6 text tensors + proj
               "mae_vitb16": "MAE weights: 6 keys of the pixel decoder dropped"}
    assert dropped.get(name, "") in caplog.text


def test_openai_clips_torchscript_archive_is_refused_naming_the_conversion(tmp_path, monkeypatch):
    path = tmp_path / "ViT-L-14.pt"
    torch.jit.trace(nn.Linear(2, 2), torch.zeros(1, 2)).save(str(path))

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the weights were read")

    monkeypatch.setattr(vfm.timm, "create_model", refuse)
    with pytest.raises(ValueError, match="TorchScript archive") as refused:
        build_vfm("clip_vitl14", weights=path)
    message = str(refused.value)
    assert f"torch.save(torch.jit.load('{path}', map_location='cpu').state_dict(), '{path.with_suffix('.pth')}')" \
        in message and "timm/vit_large_patch14_clip_224.openai" in message


def test_weights_of_another_family_are_refused_listing_the_keys_and_what_they_are(tmp_path):
    mae = tiny("mae_vitb16").vit.state_dict()
    with pytest.raises(ValueError) as refused:
        tiny("ijepa_vith14", weights=mae)
    message = str(refused.value)
    assert "pos_embed: expected (1, 256, 32), found (1, 197, 32)" in message  # 16² positions, MAE's 1 + 14²
    assert "patch_embed.proj.weight: expected (32, 3, 14, 14)" in message
    assert "unexpected key(s), e.g. ['cls_token']" in message
    assert "width 32, patch 16, 2 blocks, 0 register tokens, a class token" in message
    full = tiny("mae_vitb16").vit.state_dict() | {"patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    full |= {f"blocks.{i}.norm1.weight": torch.ones(768) for i in range(12)}
    with pytest.raises(ValueError, match=r"--vfm mae_vitb16\)"):  # not SigLIP-B/16: that has no class token
        tiny("siglip_vitb16", weights=full)
    unknown = to_official_ijepa(tiny("ijepa_vith14").vit.state_dict())
    unknown["encoder"]["module.blocks.0.attn.rope.freqs"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\), e.g. \['blocks.0.attn.rope.freqs'\]"):
        tiny("ijepa_vith14", weights=unknown)
    with pytest.raises(ValueError, match=r"not a state dict of tensors \(found \['model'\]\); this VFM loads the "
                       r"official IN1K-vit.h.14-300e.pth.tar"):  # MAE's checkpoint is no I-JEPA checkpoint
        tiny("ijepa_vith14", weights=to_official_mae(mae))


def test_a_missing_file_names_what_the_family_loads(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"IN1K-vit.h.14-300e.pth.tar not found; pass the official "
                       r"IN1K-vit.h.14-300e.pth.tar \(https://dl.fbaipublicfiles.com/ijepa/"):
        build_vfm("ijepa_vith14", weights="weights/IN1K-vit.h.14-300e.pth.tar")
    with pytest.raises(ValueError, match=r"no weights given for VFM siglip_vitb16: pass --vfm-weights PATH "
                       r"\(timm's model.safetensors \(timm/vit_base_patch16_siglip_256.webli"):
        VFMSpec("siglip_vitb16").build()


def test_train_vfm_refuses_another_teacher(capsys):
    with pytest.raises(SystemExit) as refused:
        main(["train-vfm", "data", "--out", "teacher", "--vfm", "clip_vitl14"])
    assert refused.value.code == 2
    assert "it trains a DINOv2 ViT with registers" in capsys.readouterr().err


def test_the_fd_space_of_a_teacher_without_class_token_is_its_stand_in():
    space = load_feature_space(VFMSpec("ijepa_vith14", "random", None, TINY))
    assert (space.input_size, space.dim, space.mean) == (224, 32, IMAGENET[0])
    images = random_images(3, 64, seed=4).permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        x = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=224,
                                            mode="bicubic", antialias=True) / 255
        x = (x - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
        expected = space.vit.forward_features(x).mean(dim=1)  # the mean final-normed patch token
    np.testing.assert_allclose(space.features(images), expected.double().numpy(), atol=1e-5)


# --------------------------------------------------------------------------------------
# `reglue train` end to end on semantics cached with each family
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """8 synthetic 64² images of 2 classes, prepared with the pixel autoencoder (8×8 latents, 4×4 VFM grid)."""
    root = tmp_path_factory.mktemp("families")
    write_synthetic_dataset(root / "images", images_per_class=4, size=64, num_classes=2)
    run_prepare(PrepareSettings(source=str(root / "images"), resolution=64, vae=PIXEL_AUTOENCODER, shard_size=8),
                root / "data", show_progress=False)
    return root / "data"


@pytest.mark.parametrize("name", ["clip_vitl14", "siglip_vitb16", "mae_vitb16", "ijepa_vith14"])
def test_reglue_and_repa_train_on_semantics_cached_with_the_teacher(name, prepared, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    spec = VFMSpec(name, "random", None, TINY)
    stats = run_norm_stats(data, spec, num_images=8, batch_size=8, show_progress=False)
    run_train_compressor(data, stats, settings=CompressorSettings(epochs=1, global_batch=8, vfm_precision="fp32"),
                         progress=False)
    run_cache_semantics(data, stats, compressor=data / "compressor" / BEST_WEIGHTS, repa_targets=True,
                        batch_size=8, show_progress=False)
    assert PCAProjection.load(run_fit_pca(data, stats, rank=4, num_images=8, show_progress=False)).widths == (64, 4)
    for preset in ("reglue", "repa"):
        run_dir = tmp_path / preset
        code = main(["train", "--config", "configs/demo.yaml", f"data.dir={data}", f"model.preset={preset}",
                     f"run_dir={run_dir}", "train.max_steps=2", "log.every=1", "checkpoint.every=100"])
        assert code == 0, capsys.readouterr().err
        assert [row["step"] for row in read_metrics(run_dir)] == [1, 2]
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["vfm"]
        assert recorded["name"] == name and recorded["arch"] == TINY


def test_the_cost_table_in_the_docs_is_what_the_script_counts(capsys):
    """docs/vfm.md's FLOPs per teacher come from benchmarks/vfm_cost.py (meta tensors, the real full-size
    extractors); a change to a teacher's network shows here."""
    load_benchmark("vfm_cost").main([])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    documented = (REPO / "docs" / "vfm.md").read_text()
    assert len(rows) == 7 and all(row in documented for row in rows), rows
    assert rows[-1].startswith("| `ijepa_vith14` | `vit_huge_patch14_gap_224.in1k_ijepa` | 224² | 16² | 1280 | 5,120 |")
