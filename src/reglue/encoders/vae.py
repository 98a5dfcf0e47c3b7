"""The SD-VAE between uint8 images and diffusion latents (SPEC §3).

- :class:`VAE` wraps diffusers' ``AutoencoderKL``, frozen and always in eval mode.
  ``encode_moments`` turns uint8 images (B, 3, H, W) into the stored posterior moments
  concat(mean, std) (B, 8, H/8, W/8); ``decode`` turns latents (B, 4, h, w) back into
  uint8 images (B, 3, 8h, 8w).
- :func:`latents_from_moments` draws the training latent z = (mean + std·ε)·SCALE.

:func:`load_vae` picks between this and the weight-free pixel autoencoder (``"pixel"``,
:mod:`reglue.encoders.pixel`) used by the offline demo.

Weights come from a local diffusers folder (config.json + diffusion_pytorch_model.safetensors),
a hub id already in the local Hugging Face cache, or an ``AutoencoderKL`` instance. Nothing
is ever downloaded: a hub id missing from the cache fails at once, naming the fix.

Pixels enter as x/127.5 − 1. Decoding uses the authors' ``generate.py`` expression,
clamp(255·((x + 1)/2), 0, 255) in float32 then a cast to uint8, which truncates: a value
v ∈ [0, 255] becomes ⌊v⌋. (DiT/REPA scripts compute 127.5·x + 128 instead, i.e. round half
up; truncation is on average half a grey level darker, and it is what the authors measured.)

Inputs may live on any device; each batch is moved to the VAE's device and dtype, and the
results come back on the input's device as float32 (moments) or uint8 (images).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from torch import nn

from reglue.errors import InputError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

SCALE = 0.18215  # SD-VAE latent scale: z = sample · SCALE, decode(z / SCALE)
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # "stabilityai/sd-vae-ft-mse" is the other option
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _folder_for(source: str | os.PathLike) -> Path:
    """The diffusers folder that ``source`` names: a local folder or a cached hub snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(
            f"VAE weights must be a diffusers folder (config.json + diffusion_pytorch_model.safetensors), "
            f"found the file {path}; pass the folder that contains it."
        )
    name = str(source)
    if _HUB_ID.fullmatch(name):
        config = try_to_load_from_cache(name, "config.json")
        if isinstance(config, str):
            return Path(config).parent
        raise FileNotFoundError(
            f"VAE {name!r}: no such folder, and not in the local Hugging Face cache "
            f"({hub_constants.HF_HUB_CACHE}); reglue never downloads. On a machine with internet run "
            f"`huggingface-cli download {name} --local-dir sd-vae-ft-ema`, copy that folder here and "
            "pass it, e.g. --vae path/to/sd-vae-ft-ema."
        )
    raise FileNotFoundError(
        f"VAE folder {path} does not exist; pass a diffusers folder (config.json + weights), "
        "e.g. --vae path/to/sd-vae-ft-ema."
    )


def load_autoencoder(
    source: str | os.PathLike | AutoencoderKL = DEFAULT_VAE, dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """An ``AutoencoderKL`` in ``dtype`` from an instance (cast in place), a local folder or a cached hub id."""
    if isinstance(source, nn.Module):  # an AutoencoderKL already built
        # diffusers warns on every .to(dtype), so cast only when it changes something
        return source if source.dtype == dtype else source.to(dtype=dtype)
    folder = _folder_for(source)
    # diffusers is imported when a VAE is loaded, not with this module: it takes ≈ 2 s (it imports
    # torch._dynamo), which every process that never loads one would pay at start-up.
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(
            f"{folder} is not a complete diffusers AutoencoderKL folder (expected config.json and "
            f"diffusion_pytorch_model.safetensors): {err}"
        ) from err


def latents_from_moments(
    moments: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Training latent z = (mean + std·ε)·SCALE with a fresh ε ~ N(0, I) (SPEC §3).

    ``moments`` (B, 2C, h, w) = concat(mean, std) -> z (B, C, h, w), same dtype and device.
    ε is drawn with ``torch.randn`` from ``generator`` (the global generator if None, which
    then matches ``torch.randn_like(mean)`` draw for draw), unless given as ``noise`` (B, C, h, w).
    """
    if moments.ndim != 4 or moments.shape[1] % 2:
        raise InputError(
            f"moments must be (B, 2C, h, w) = concat(mean, std), found shape {tuple(moments.shape)}; "
            "pass what VAE.encode_moments returned."
        )
    mean, std = moments.chunk(2, dim=1)  # (B, C, h, w) each
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return (mean + std * noise) * SCALE


class VAE(nn.Module):
    """Frozen SD-VAE: uint8 images <-> posterior moments and latents.

    ``source``: a hub id in the local cache (default ``stabilityai/sd-vae-ft-ema``), a local
    diffusers folder, or an ``AutoencoderKL`` (used in place: cast, frozen, set to eval).
    ``dtype``: the compute dtype of the weights (float32, float16 or bfloat16); outputs are
    float32 moments / uint8 images whatever it is.
    """

    def __init__(self, source: str | os.PathLike | AutoencoderKL = DEFAULT_VAE, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in COMPUTE_DTYPES:
            raise InputError(f"VAE dtype must be one of {COMPUTE_DTYPES}, found {dtype}.")
        self.autoencoder = load_autoencoder(source, dtype).requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VAE:
        """Stays in eval mode whatever ``mode`` says: the VAE is frozen."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: 8 for the SD-VAE (one halving per down block but the last)."""
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 concat(mean, std) (B, 2·latent_channels, H/f, W/f), f = 8."""
        self._check_images(images)
        outputs = []
        for chunk in images.split(_positive(batch_size)):
            pixels = chunk.to(self.device, torch.float32) / 127.5 - 1
            posterior = self.autoencoder.encode(pixels.to(self.dtype)).latent_dist
            std = torch.exp(0.5 * posterior.logvar.float())  # = posterior.std, computed in float32
            outputs.append(torch.cat([posterior.mean.float(), std], dim=1).to(images.device))
        return torch.cat(outputs).contiguous()  # convolutions may hand back channels-last strides

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Latents (B, latent_channels, h, w) (already × SCALE) -> uint8 images (B, 3, f·h, f·w)."""
        self._check_latents(latents)
        outputs = []
        for chunk in latents.split(_positive(batch_size)):
            z = chunk.to(self.device, torch.float32) / SCALE
            pixels = self.autoencoder.decode(z.to(self.dtype)).sample.float()  # in [-1, 1] nominally
            image = torch.clamp(255.0 * ((pixels + 1) / 2), 0, 255).to(torch.uint8)  # truncates
            outputs.append(image.to(latents.device))
        return torch.cat(outputs).contiguous()

    def _check_images(self, images: torch.Tensor) -> None:
        f = self.downsample_factor
        if images.dtype != torch.uint8:
            raise TypeError(
                f"VAE.encode_moments expects uint8 images in 0..255, found dtype {images.dtype}; "
                "convert with (x * 255).round().to(torch.uint8) if x is in [0, 1]."
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(
                f"VAE.encode_moments expects (B, 3, H, W) RGB images, found shape {tuple(images.shape)}; "
                "permute (B, H, W, 3) arrays with .permute(0, 3, 1, 2)."
            )
        if images.shape[2] % f or images.shape[3] % f:
            raise InputError(
                f"VAE.encode_moments needs H and W divisible by {f}, found {images.shape[2]}×{images.shape[3]}; "
                "crop with reglue.data.images.adm_center_crop first."
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        c = self.latent_channels
        if not latents.is_floating_point() or latents.ndim != 4 or latents.shape[1] != c:
            raise InputError(
                f"VAE.decode expects float latents (B, {c}, h, w), found {latents.dtype} of shape "
                f"{tuple(latents.shape)}; pass the first {c} channels of the sampled state."
            )


def _positive(batch_size: int) -> int:
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, found {batch_size}.")
    return batch_size
