"""The autoencoder a name stands for: the SD-VAE (diffusers) or the weight-free pixel autoencoder.

Every command that takes ``--vae`` resolves it here, so ``prepare``, training previews,
``sample`` and ``grid`` accept the same names.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL

from reglue.encoders.pixel import PIXEL_AUTOENCODER, PixelAutoencoder
from reglue.encoders.vae import DEFAULT_VAE, VAE


def load_vae(source: str | os.PathLike | AutoencoderKL = DEFAULT_VAE, dtype: torch.dtype = torch.float32):
    """The autoencoder ``source`` names: the weight-free :class:`PixelAutoencoder` for ``"pixel"``
    (``dtype`` unused: it computes in float32), else the SD-VAE :class:`VAE` (a local diffusers
    folder, a cached hub id, or an ``AutoencoderKL``)."""
    if isinstance(source, (str, os.PathLike)) and str(source) == PIXEL_AUTOENCODER:
        return PixelAutoencoder()
    return VAE(source, dtype)
