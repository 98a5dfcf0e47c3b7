"""A weight-free pixel-space autoencoder, usable wherever the SD-VAE is (``--vae pixel``).

The offline demo has no SD-VAE weights, and a randomly initialised VAE would turn every
picture into noise. :class:`PixelAutoencoder` keeps the pipeline's latent shape instead —
4 channels on the R/8 × R/8 grid — with a fixed, invertible map:

- **encode**: average each 8×8 block of (R, G, B) and of the luminance
  Y = 0.299 R + 0.587 G + 0.114 B, then scale every channel as (v − 127.5) / 64 so that
  typical images give roughly unit-variance latents z (B, 4, R/8, R/8). The stored moments are
  concat(z / SCALE, 0): with std 0 the pipeline's z = (mean + std·ε)·SCALE gives z back.
- **decode**: RGB = round(64·z + 127.5) clamped to 0..255, each latent pixel repeated over its
  8×8 block; the luminance channel is redundant and ignored.

So encode→decode returns an image exactly when it is constant on 8×8 blocks (e.g. a 32×32
picture upscaled ×8 by nearest neighbour); any other image comes back as its 8×8 block means.
decode→encode is exact on the uint8 grid. Everything runs in float32 on the module's device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reglue.encoders.vae import SCALE
from reglue.errors import InputError

PIXEL_AUTOENCODER = "pixel"  # the --vae value (and the dataset's recorded VAE) that selects it
DOWNSAMPLE = 8  # the pipeline's latent grid is R/8 × R/8, as for the SD-VAE
PIXEL_CENTRE = 127.5
PIXEL_STEP = 64.0  # grey levels per latent unit: 0..255 maps to about -2..2
LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of the redundant fourth channel


class PixelAutoencoder(nn.Module):
    """uint8 images (B, 3, H, W) <-> latents (B, 4, H/8, W/8) with no weights (module docstring).

    The same interface as :class:`reglue.encoders.vae.VAE`: ``encode_moments``, ``decode``,
    ``latent_channels``, ``downsample_factor``, ``device``, ``dtype``; always in eval mode.
    """

    identity = PIXEL_AUTOENCODER

    def __init__(self):
        super().__init__()
        self.register_buffer("luminance", torch.tensor(LUMINANCE).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> PixelAutoencoder:
        """Stays in eval mode whatever ``mode`` says (nothing to train)."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.luminance.device

    @property
    def latent_channels(self) -> int:
        return 4

    @property
    def downsample_factor(self) -> int:
        return DOWNSAMPLE

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 latents z (B, 4, H/8, W/8): scaled block means of R, G, B, Y."""
        _check_images(images)
        rgb = images.to(self.device, torch.float32)
        luma = (rgb * self.luminance).sum(dim=1, keepdim=True)  # (B, 1, H, W)
        means = F.avg_pool2d(torch.cat([rgb, luma], dim=1), DOWNSAMPLE)  # (B, 4, H/8, W/8)
        return ((means - PIXEL_CENTRE) / PIXEL_STEP).to(images.device)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 concat(z / SCALE, 0) (B, 8, H/8, W/8); ``batch_size`` is unused
        (no weights, no memory peak) and kept for the VAE's signature."""
        z = self.encode(images)
        return torch.cat([z / SCALE, torch.zeros_like(z)], dim=1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Latents z (B, 4, h, w) -> uint8 images (B, 3, 8h, 8w); the luminance channel is ignored."""
        if not latents.is_floating_point() or latents.ndim != 4 or latents.shape[1] != 4:
            raise InputError(
                f"PixelAutoencoder.decode expects float latents (B, 4, h, w), found {latents.dtype} of shape "
                f"{tuple(latents.shape)}; pass the first 4 channels of the sampled state."
            )
        rgb = latents[:, :3].float() * PIXEL_STEP + PIXEL_CENTRE  # (B, 3, h, w) grey levels
        image = rgb.round().clamp(0, 255).to(torch.uint8)
        return image.repeat_interleave(DOWNSAMPLE, dim=2).repeat_interleave(DOWNSAMPLE, dim=3).contiguous()


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise InputError(
            f"PixelAutoencoder expects uint8 RGB images (B, 3, H, W), found {images.dtype} of shape "
            f"{tuple(images.shape)}; permute (B, H, W, 3) arrays with .permute(0, 3, 1, 2)."
        )
    if images.shape[2] % DOWNSAMPLE or images.shape[3] % DOWNSAMPLE:
        raise InputError(
            f"PixelAutoencoder needs H and W divisible by {DOWNSAMPLE}, found {images.shape[2]}×{images.shape[3]}; "
            "crop with reglue.data.images.adm_center_crop first."
        )
