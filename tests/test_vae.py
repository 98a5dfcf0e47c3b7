"""The SD-VAE wrapper (reglue.encoders.vae) on a tiny random AutoencoderKL."""

from __future__ import annotations

import copy
import socket

import huggingface_hub
import pytest
import torch
from diffusers import AutoencoderKL

from reglue.encoders.vae import SCALE, VAE, latents_from_moments


def tiny_autoencoder(seed: int = 0) -> AutoencoderKL:
    """Four blocks, so three halvings: the SD-VAE's ×8 downsampling with 4 latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=32,
    ).eval()


@pytest.fixture(scope="module")
def autoencoder() -> AutoencoderKL:
    return tiny_autoencoder()


@pytest.fixture(scope="module")
def vae(autoencoder) -> VAE:
    return VAE(copy.deepcopy(autoencoder))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """uint8 (3, 3, 32, 48)."""
    return torch.randint(0, 256, (3, 3, 32, 48), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_scale_is_the_sd_vae_constant():
    assert SCALE == 0.18215


def test_encode_moments_shape_and_positive_std(vae, images):
    moments = vae.encode_moments(images)
    assert moments.shape == (3, 8, 4, 6) and moments.dtype == torch.float32
    assert vae.downsample_factor == 8 and vae.latent_channels == 4
    assert (moments[:, 4:] > 0).all()


def test_moments_are_diffusers_posterior_mean_and_std(vae, autoencoder, images):
    with torch.no_grad():
        posterior = autoencoder.encode(images.float() / 127.5 - 1).latent_dist
    moments = vae.encode_moments(images)
    torch.testing.assert_close(moments[:, :4], posterior.mean, rtol=0, atol=0)
    torch.testing.assert_close(moments[:, 4:], posterior.std, rtol=0, atol=0)


def test_latents_from_moments_is_the_hand_formula(vae, images):
    moments = vae.encode_moments(images)
    z = latents_from_moments(moments, torch.Generator().manual_seed(7))
    noise = torch.randn((3, 4, 4, 6), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, (moments[:, :4] + moments[:, 4:] * noise) * 0.18215, rtol=0, atol=0)
    torch.manual_seed(3)
    z_global = latents_from_moments(moments)
    torch.manual_seed(3)  # without a generator it draws like the authors' randn_like(mean)
    expected = (moments[:, :4] + moments[:, 4:] * torch.randn_like(moments[:, :4])) * 0.18215
    torch.testing.assert_close(z_global, expected, rtol=0, atol=0)


def test_latents_from_moments_rejects_odd_channels():
    with pytest.raises(ValueError, match=r"\(B, 2C, h, w\)"):
        latents_from_moments(torch.zeros(1, 7, 4, 4))


def test_decode_round_trip_gives_uint8_images(vae, images):
    z = latents_from_moments(vae.encode_moments(images), torch.Generator().manual_seed(0))
    decoded = vae.decode(z)
    assert decoded.dtype == torch.uint8 and decoded.shape == images.shape


def test_decode_is_clamp_of_scaled_pixels_truncated(autoencoder):
    shifted = copy.deepcopy(autoencoder)
    with torch.no_grad():  # push red above +1 and green below -1 so the clamp matters
        shifted.decoder.conv_out.bias.copy_(torch.tensor([3.0, -3.0, 0.0]))
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        value = 255 * (shifted.decode(z / 0.18215).sample + 1) / 2
    decoded = VAE(shifted).decode(z)
    torch.testing.assert_close(decoded, value.clamp(0, 255).floor().to(torch.uint8), rtol=0, atol=0)
    assert (decoded[:, 0] == 255).all() and (decoded[:, 1] == 0).all()
    assert (value.clamp(0, 255).round() != decoded).any()  # truncation, not rounding, is pinned


def test_batching_does_not_change_results(vae, images):
    torch.testing.assert_close(vae.encode_moments(images, batch_size=2), vae.encode_moments(images))
    z = torch.randn(3, 4, 4, 6, generator=torch.Generator().manual_seed(5))
    # CPU convolutions pick kernels by batch size: float32 rounding may flip a truncated level
    assert (vae.decode(z, batch_size=1).int() - vae.decode(z).int()).abs().max() <= 1
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        vae.encode_moments(images, batch_size=0)


def test_bfloat16_compute_keeps_float32_outputs(autoencoder, images):
    full = VAE(copy.deepcopy(autoencoder))
    half = VAE(copy.deepcopy(autoencoder), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    moments = half.encode_moments(images)
    assert moments.dtype == torch.float32
    torch.testing.assert_close(moments, full.encode_moments(images), rtol=0.05, atol=0.05)
    z = latents_from_moments(moments, torch.Generator().manual_seed(0))
    decoded = half.decode(z)
    assert decoded.dtype == torch.uint8
    assert (decoded.int() - full.decode(z).int()).abs().float().mean() < 3
    with pytest.raises(ValueError, match="dtype must be one of"):
        VAE(copy.deepcopy(autoencoder), dtype=torch.float64)


def test_vae_is_frozen_and_stays_in_eval_mode(vae):
    vae.train()
    assert not vae.training and not vae.autoencoder.training
    assert not any(p.requires_grad for p in vae.parameters())


def test_local_folder_loads_the_same_weights(autoencoder, vae, images, tmp_path):
    autoencoder.save_pretrained(tmp_path / "sd-vae")
    expected = vae.encode_moments(images)
    for source in (tmp_path / "sd-vae", str(tmp_path / "sd-vae")):
        torch.testing.assert_close(VAE(source).encode_moments(images), expected, rtol=0, atol=0)


def test_cached_hub_id_loads_without_network(autoencoder, vae, images, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--stabilityai--sd-vae-ft-ema"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    autoencoder.save_pretrained(repo / "snapshots" / "0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    torch.testing.assert_close(VAE().encode_moments(images), vae.encode_moments(images), rtol=0, atol=0)


def _no_network(*args, **kwargs):
    raise AssertionError("the VAE loader tried to use the network")


def test_uncached_hub_id_fails_at_once_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache") as caught:
        VAE("stabilityai/sd-vae-ft-mse")
    assert "--vae path/to/sd-vae-ft-ema" in str(caught.value)


def test_missing_or_wrong_paths_are_named(autoencoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing/vae does not exist"):
        VAE(tmp_path / "missing" / "vae")
    autoencoder.save_pretrained(tmp_path / "sd-vae")
    with pytest.raises(ValueError, match="found the file"):
        VAE(tmp_path / "sd-vae" / "config.json")
    (tmp_path / "sd-vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete diffusers AutoencoderKL folder"):
        VAE(tmp_path / "sd-vae")


@pytest.mark.parametrize("images, error, message", [
    (torch.zeros(1, 3, 32, 32), TypeError, "expects uint8 images"),
    (torch.zeros(1, 4, 32, 32, dtype=torch.uint8), ValueError, r"expects \(B, 3, H, W\)"),
    (torch.zeros(3, 32, 32, dtype=torch.uint8), ValueError, r"expects \(B, 3, H, W\)"),
    (torch.zeros(1, 3, 36, 32, dtype=torch.uint8), ValueError, "divisible by 8, found 36×32"),
])
def test_encode_rejects_bad_images(vae, images, error, message):
    with pytest.raises(error, match=message):
        vae.encode_moments(images)


@pytest.mark.parametrize("latents", [torch.zeros(1, 8, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.long)])
def test_decode_rejects_bad_latents(vae, latents):
    with pytest.raises(ValueError, match=r"expects float latents \(B, 4, h, w\)"):
        vae.decode(latents)
