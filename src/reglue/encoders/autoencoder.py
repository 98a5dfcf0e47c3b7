"""The autoencoder a name stands for: the SD-VAE (diffusers) or the weight-free pixel autoencoder.

Every command that takes ``--vae`` resolves it here, so ``prepare``, training previews,
``sample`` and ``grid`` accept the same names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from reglue.encoders.pixel import PIXEL_AUTOENCODER, PixelAutoencoder
from reglue.encoders.vae import DEFAULT_VAE, VAE
from reglue.io import existing_path, path_fingerprint

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


def vae_location(source: str) -> str:
    """``source`` as a manifest records it: an existing local folder or file as an absolute path (valid
    from any working directory); a hub id or ``"pixel"`` unchanged."""
    return source if source == PIXEL_AUTOENCODER else existing_path(source)


def vae_fingerprint(source: str) -> str | None:
    """The content fingerprint of a local VAE (:func:`reglue.io.path_fingerprint`), the same wherever its
    folder lies; None for a hub id or ``"pixel"``, names that mean the same everywhere."""
    path = Path(source).expanduser()
    return path_fingerprint(path) if source != PIXEL_AUTOENCODER and path.exists() else None


def load_vae(source: str | os.PathLike | AutoencoderKL = DEFAULT_VAE, dtype: torch.dtype = torch.float32):
    """The autoencoder ``source`` names: the weight-free :class:`PixelAutoencoder` for ``"pixel"``
    (``dtype`` unused: it computes in float32), else the SD-VAE :class:`VAE` (a local diffusers
    folder, a cached hub id, or an ``AutoencoderKL``)."""
    if isinstance(source, (str, os.PathLike)) and str(source) == PIXEL_AUTOENCODER:
        return PixelAutoencoder()
    return VAE(source, dtype)
