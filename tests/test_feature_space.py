"""FD_DINOv2's feature space (tiny random DINOv2 ViT-L/14 stand-ins) and the Fréchet distance maths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import shared_file
from reglue.encoders.semantics import VFMSpec
from reglue.encoders.vfm import build_vfm
from reglue.metrics.feature_space import FD_DINOV2, fd_key, load_feature_space, preprocess
from reglue.metrics.fid import feature_statistics, frechet_distance
from reglue.state_dict import weights_fingerprint

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def tiny_dinov2_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny DINOv2 without registers in the official file layout (CLS slot in pos_embed, mask_token),
    with layer scales near 1 and perturbed weights so that the CLS token depends on the image."""
    torch.manual_seed(seed)
    vit = build_vfm("dinov2_vitl14", weights=None, **TINY).vit
    state = {}
    for name, value in vit.state_dict().items():
        if name.endswith(".gamma"):
            value = torch.ones_like(value)
        state[name] = value + 0.05 * torch.randn_like(value)
    state["pos_embed"] = torch.cat([torch.zeros(1, 1, TINY["embed_dim"]), state["pos_embed"]], dim=1)  # (1, 1370, D)
    state["mask_token"] = torch.zeros(1, TINY["embed_dim"])
    return state


def save_tiny_dinov2(path, seed: int = 0) -> VFMSpec:
    torch.save(tiny_dinov2_state_dict(seed), path)
    return VFMSpec("dinov2_vitl14", weights=str(path), arch=TINY)


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> VFMSpec:
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "dinov2_vitl14_tiny.pth")


@pytest.fixture(scope="module")
def space(tiny_spec):
    return load_feature_space(tiny_spec)


def photo_crops(size: int = 256) -> np.ndarray:
    """Real photographs (the shared test images), centre-cropped and resized to size²: (4, size, size, 3)."""
    crops = []
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"):
        with Image.open(shared_file(f"testdata/real_images/photo/{name}")) as image:
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            crops.append(np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size))))
    return np.stack(crops)


# --------------------------------------------------------------------------------------
# Preprocessing and features against hand-written references
# --------------------------------------------------------------------------------------


def test_preprocessing_matches_hand_written_torch_ops():
    images = torch.from_numpy(photo_crops(256)).permute(0, 3, 1, 2)  # (4, 3, 256, 256) uint8
    pixels = images.to(torch.float32)  # 0..255, no rounding anywhere below
    resized = F.interpolate(pixels, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.stack(
        [(resized[:, c] / 255 - m) / s for c, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))],
        dim=1,
    )
    got = preprocess(images)
    assert got.shape == (4, 3, 224, 224) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_antialiased_bicubic_is_pils_float_filter():
    """The resize is PIL's bicubic (a = −0.5, support widened when shrinking) on unrounded values,
    i.e. dgm-eval's --clean_resize before its clip; PIL's uint8 resize differs by its roundings."""
    images = photo_crops(256)
    pil = np.stack([
        np.stack([np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F").resize((224, 224), Image.BICUBIC))
                  for c in range(3)], axis=-1)
        for img in images
    ])  # (4, 224, 224, 3) float, 0..255 (overshoot kept)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((pil / 255 - mean) / std).transpose(0, 3, 1, 2)
    got = preprocess(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    assert np.abs(got - expected).max() < 0.05 / 255 / 0.224  # a twentieth of a grey level


def test_features_match_a_hand_written_official_dinov2_forward(space, tiny_spec):
    """CLS of the official hub model: conv patch embed, positions resized by scale factor 16.1/37 without
    antialias (interpolate_offset=0.1), [CLS; patches] + positions, the blocks, the final LayerNorm."""
    official = torch.load(tiny_spec.weights, weights_only=True)
    images = photo_crops(256)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        patches = F.conv2d(x, official["patch_embed.proj.weight"], official["patch_embed.proj.bias"], stride=14)
        tokens = torch.cat([official["cls_token"].expand(4, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        grid = official["pos_embed"][:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
        positions = torch.cat([official["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)], dim=1)  # (1, 257, D)
        tokens = tokens + positions
        for block in space.vit.blocks:  # timm's blocks hold the same weights
            tokens = block(tokens)
        expected = F.layer_norm(tokens, (32,), official["norm.weight"], official["norm.bias"], eps=1e-6)[:, 0]
    got = space.features(images, batch_size=3)
    assert got.shape == (4, 32) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected.double().numpy(), atol=1e-5, rtol=0)
    assert np.std(got, axis=0).mean() > 0.01  # the features depend on the image


def test_space_names_network_and_fingerprint(space):
    assert space.key == "fd_dinov2" and space.network == "dinov2_vitl14" and space.dim == 32
    assert space.fingerprint == weights_fingerprint(space.vit) and len(space.fingerprint) == 16
    assert fd_key("dinov2_vitl14") == "fd_dinov2"
    assert fd_key("dinov2_vitb14_reg") == "fd_dinov2_vitb14_reg"
    assert fd_key("dinov3_vitl16") == "fd_dinov3_vitl16"


def test_features_do_not_depend_on_batch_size_and_report_progress(space):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    done = []
    first = space.features(images, batch_size=2, progress=done.append)
    assert done == [2, 2, 1]
    np.testing.assert_allclose(space.features(images, batch_size=5), first, atol=1e-6, rtol=0)
    assert space.features(images[:0]).shape == (0, 32)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 64, 64, 3), np.float32), r"uint8 numpy images \(N, H, W, 3\); found float32"),
        (np.zeros((2, 3, 64, 64), np.uint8), r"found uint8 \(2, 3, 64, 64\)"),
        (np.zeros((2, 64, 48, 3), np.uint8), r"square images .* found \(2, 64, 48, 3\)"),
    ],
)
def test_bad_images_are_refused_naming_what_was_found(space, images, match):
    with pytest.raises(ValueError, match=match):
        space.features(images)


# --------------------------------------------------------------------------------------
# Loading: the canonical network, weights problems up front
# --------------------------------------------------------------------------------------


def test_default_space_without_weights_fails_fast_naming_the_file(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the weights were found")

    monkeypatch.setattr(VFMSpec, "build", refuse)
    with pytest.raises(FileNotFoundError) as err:
        load_feature_space()
    message = str(err.value)
    assert FD_DINOV2.name == "dinov2_vitl14" and FD_DINOV2.weights is None
    assert "dinov2_vitl14_pretrain.pth" in message and "--vfm-weights weights/dinov2_vitl14_pretrain.pth" in message
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth is not a file"):
        load_feature_space(VFMSpec("dinov2_vitl14", weights="nowhere.pth"))
    with pytest.raises(ValueError, match="unknown VFM 'dinov2_vitx14'"):
        load_feature_space(VFMSpec("dinov2_vitx14", weights="random"))


def test_weights_of_another_shape_list_the_mismatch(tmp_path):
    spec = save_tiny_dinov2(tmp_path / "tiny.pth")
    with pytest.raises(ValueError) as err:
        load_feature_space(VFMSpec(spec.name, weights=spec.weights, arch={**TINY, "embed_dim": 64}))
    assert "cls_token: expected (1, 1, 64), found (1, 1, 32)" in str(err.value)
    assert "width 32, patch 14, 4 blocks, 0 register tokens" in str(err.value)


def test_random_spec_gives_the_same_network_each_time():
    spec = VFMSpec("dinov2_vitl14", weights="random", arch=TINY)
    first, second = load_feature_space(spec), load_feature_space(spec)
    assert first.fingerprint == second.fingerprint and first.is_random and first.key == "fd_dinov2"


def test_fingerprint_covers_zero_dimensional_buffers():
    norm = torch.nn.BatchNorm2d(3)  # num_batches_tracked is a 0-d tensor
    before = weights_fingerprint(norm)
    norm.num_batches_tracked += 1
    assert weights_fingerprint(norm) != before


# --------------------------------------------------------------------------------------
# The Fréchet distance
# --------------------------------------------------------------------------------------


def test_fd_of_a_set_with_itself_is_zero(space):
    rng = np.random.default_rng(0)
    crops = photo_crops(256)
    images = np.concatenate([np.roll(crops, shift, axis=(1, 2)) for shift in rng.integers(0, 256, size=(12, 2))])
    features = space.features(images)  # (48, 32): more images than dimensions
    mu, sigma = feature_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    other_mu, other_sigma = feature_statistics(features[::-1].copy())  # the same set in another order
    assert abs(frechet_distance(mu, sigma, other_mu, other_sigma)) < 1e-6 * np.trace(sigma)


def closed_form(mu1, var1, mu2, var2) -> float:
    """FD of Gaussians with diagonal covariances: |μ1−μ2|² + Σ(σ1 + σ2 − 2√(σ1σ2))."""
    return float(((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum())


def test_fd_of_two_gaussians_matches_the_closed_form_on_given_moments():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = closed_form(mu1, var1, mu2, var2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # the same rotation of both: FD is unchanged
    rotated = frechet_distance(rotation @ mu1, rotation @ np.diag(var1) @ rotation.T,
                               rotation @ mu2, rotation @ np.diag(var2) @ rotation.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_fd_of_two_sampled_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 1.0, 0.0, 1.0])
    var1, var2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 4.0])
    n = 200_000
    a = mu1 + np.sqrt(var1) * rng.standard_normal((n, 4))
    b = mu2 + np.sqrt(var2) * rng.standard_normal((n, 4))
    got = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert got == pytest.approx(closed_form(mu1, var1, mu2, var2), abs=0.05)  # 3.593 ± 0.013 (1σ over seeds)
