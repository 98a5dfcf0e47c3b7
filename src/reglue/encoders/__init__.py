"""Frozen encoders: the SD-VAE, the vision foundation model (DINOv2 and the teachers of docs/vfm.md) and its
feature statistics."""

from reglue.encoders.norm_stats import NormStats, NormStatsAccumulator
from reglue.encoders.vae import VAE, latents_from_moments
from reglue.encoders.vfm import VFM_FAMILIES, VFM_MODELS, VFMExtractor, VFMFeatures, build_dinov2, build_vfm

__all__ = [
    "VAE",
    "VFM_FAMILIES",
    "VFM_MODELS",
    "NormStats",
    "NormStatsAccumulator",
    "VFMExtractor",
    "VFMFeatures",
    "build_dinov2",
    "build_vfm",
    "latents_from_moments",
]
