"""The weight-free pixel autoencoder: exact round trips, the VAE's interface, `prepare --vae pixel`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reglue.cli import main
from reglue.data.dataset import PreparedDataset
from reglue.data.synthetic import write_synthetic_dataset
from reglue.encoders.autoencoder import load_vae
from reglue.encoders.pixel import PixelAutoencoder
from reglue.encoders.vae import latents_from_moments


def block_images(count: int, side: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 (count, 3, 8·side, 8·side): random pictures upscaled ×8 by nearest neighbour."""
    small = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, 3, side, side), dtype=np.uint8))
    return small.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def test_encode_then_decode_returns_block_constant_images_exactly():
    ae = PixelAutoencoder()
    images = block_images(3)
    moments = ae.encode_moments(images)
    assert moments.shape == (3, 8, 32, 32) and moments.dtype == torch.float32
    z = latents_from_moments(moments)  # std is 0: the ε draw changes nothing
    assert torch.equal(ae.decode(z), images)


def test_decode_then_encode_is_exact_and_other_images_become_block_means():
    ae = PixelAutoencoder()
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8))
    decoded = ae.decode(ae.encode(images))
    means = torch.nn.functional.avg_pool2d(images.float(), 8).round()
    assert torch.equal(decoded[:, :, ::8, ::8].float(), means)
    assert torch.equal(ae.decode(ae.encode(decoded)), decoded)


def test_latents_are_roughly_unit_scale_with_luminance_as_fourth_channel():
    ae = PixelAutoencoder()
    white = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    z = ae.encode(white)
    assert z.shape == (1, 4, 1, 1)
    assert torch.allclose(z, torch.full_like(z, (255 - 127.5) / 64))
    assert 0.5 < float(ae.encode(block_images(4, seed=2)).std()) < 1.5  # uniform grey levels: std 74/64


def test_interface_matches_the_vae_and_bad_input_is_refused():
    ae = load_vae("pixel")
    assert isinstance(ae, PixelAutoencoder)
    assert (ae.latent_channels, ae.downsample_factor, ae.dtype) == (4, 8, torch.float32)
    assert ae.device == torch.device("cpu") and not ae.train().training
    with pytest.raises(ValueError, match="uint8"):
        ae.encode_moments(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        ae.encode_moments(torch.zeros(1, 3, 12, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="first 4 channels"):
        ae.decode(torch.zeros(1, 20, 4, 4))


def test_prepare_with_vae_pixel_records_it(tmp_path):
    write_synthetic_dataset(tmp_path / "images", images_per_class=1, num_classes=2, size=64)
    assert main(["prepare", str(tmp_path / "images"), str(tmp_path / "data"), "--vae", "pixel", "--quiet"]) == 0
    data = PreparedDataset(tmp_path / "data", vae="pixel")
    row = data[0]
    assert row["moments"].shape == (8, 32, 32) and data.manifest["vae"] == "pixel"
    expected = PixelAutoencoder().encode_moments(row["images"][None])[0]
    assert torch.equal(row["moments"], expected)
