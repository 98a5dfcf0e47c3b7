"""What one training step feeds the joint loss, from a prepared dataset (SPEC §1, §3, §7).

For each image: the VAE latent z = (mean + std·ε)·0.18215 from its stored moments, the
semantic channels (compressed or PCA semantics upsampled to the latent grid), the VFM [CLS]
and the REPA target tokens. Semantics come either from the dataset's cache
(``data.semantics=cached``) or from the frozen VFM run on the stored images every step
(``online``, as the authors' trainer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reglue.config import ConfigError, RunConfig
from reglue.data import store
from reglue.data.dataset import PreparedDataset
from reglue.encoders.semantics import SemanticEncoder, upsample_semantics
from reglue.encoders.vae import latents_from_moments
from reglue.presets import Preset


@dataclass
class JointInputs:
    x0: torch.Tensor  # (B, 4 + S, h, w) clean latent ‖ semantics
    y: torch.Tensor  # (B,) labels, null label where unconditional
    cls_target: torch.Tensor | None  # (B, D)
    repa_target: torch.Tensor | None  # (B, T, D)


def required_targets(preset: Preset) -> tuple[str, ...]:
    """The VFM-derived arrays the preset needs: semantics, cls, repa."""
    return ("semantics",) * (preset.semantic_channels > 0) + ("cls",) * preset.cls_token + ("repa",) * preset.repa


def dataset_fields(config: RunConfig, preset: Preset) -> tuple[str, ...]:
    needed = required_targets(preset)
    if config.data.semantics == "online" and needed:
        return ("moments", "images")
    return ("moments", *needed)


def open_training_dataset(config: RunConfig, preset: Preset) -> PreparedDataset:
    """The prepared dataset with the arrays this run reads; clear errors for what is missing."""
    fields = dataset_fields(config, preset)
    try:
        store.read_manifest(config.data.dir)
    except FileNotFoundError as err:
        raise ConfigError(f"data.dir: {err}") from None
    try:
        dataset = PreparedDataset(config.data.dir, fields=fields)
    except FileNotFoundError as err:
        if config.data.semantics == "cached" and set(fields) & {"semantics", "cls", "repa"}:
            raise ConfigError(
                f"data.semantics=cached but {err} Either cache them (`reglue cache-semantics "
                f"{config.data.dir}{' --repa-targets' if preset.repa else ''}`) or set data.semantics=online."
            ) from None
        raise
    if "semantics" in fields and len(dataset) and dataset[0]["semantics"].shape[0] != preset.semantic_channels:
        raise ConfigError(
            f"model.preset={preset.name} models {preset.semantic_channels} semantic channels but the cache in "
            f"{config.data.dir} holds {dataset[0]['semantics'].shape[0]}; cache the matching semantics "
            f"({'a compressor' if preset.semantics == 'compressor' else 'a PCA'} of that width) or change the preset."
        )
    return dataset


def training_rows(dataset: PreparedDataset, config: RunConfig) -> np.ndarray:
    """Row indices used for training: all, or a class-balanced subset (images per class or a fraction).

    Within each class the first rows in dataset order are kept, so the subset is deterministic.
    """
    per_class, fraction = config.data.images_per_class, config.data.fraction
    if per_class is None and fraction is None:
        return np.arange(len(dataset))
    labels = np.concatenate([store.open_array(dataset.root, i, "labels") for i in range(len(dataset.offsets) - 1)])
    keep = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = per_class if per_class is not None else max(1, round(len(rows) * fraction))
        keep.append(rows[:count])
    return np.sort(np.concatenate(keep))


class InputBuilder:
    """Turns a batch of dataset rows into :class:`JointInputs` on a device."""

    def __init__(self, preset: Preset, dataset: PreparedDataset, latent_size: int, null_label: int,
                 unconditional: bool, encoder: SemanticEncoder | None):
        self.preset = preset
        self.latent_size = latent_size
        self.null_label = null_label
        self.unconditional = unconditional or dataset.num_classes == 0
        self.encoder = encoder

    def __call__(self, batch: dict[str, torch.Tensor], device: torch.device,
                 latent_noise: torch.Tensor | None = None) -> JointInputs:
        """``latent_noise`` (B, 4, h, w): the ε of z = (mean + std·ε)·scale (fresh when None)."""
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}  # async from pinned memory
        z = latents_from_moments(batch["moments"].float(), noise=latent_noise)  # (B, 4, h, w)
        targets = self._targets(batch)
        parts = [z]
        if self.preset.semantic_channels:
            parts.append(upsample_semantics(targets["semantics"].float(), self.latent_size))  # (B, S, h, w)
        y = batch["label"]
        if self.unconditional:
            y = torch.full_like(y, self.null_label)
        cls = targets["cls"].float() if self.preset.cls_token else None
        repa = targets["repa"].float() if self.preset.repa else None
        if repa is not None and not self.preset.cls_token:
            repa = repa[:, 1:]  # REPA without a CLS slot aligns the patch tokens only
        return JointInputs(torch.cat(parts, dim=1), y, cls, repa)

    def _targets(self, batch) -> dict[str, torch.Tensor]:
        if self.encoder is None:
            return {k: batch[k] for k in ("semantics", "cls", "repa") if k in batch}
        online = self.encoder(batch["images"])
        return {"semantics": online.semantics, "cls": online.cls, "repa": online.repa}


def online_encoder(config: RunConfig, preset: Preset, resolution: int) -> SemanticEncoder | None:
    """The frozen VFM (+ compressor / PCA) for ``data.semantics=online``; None when not needed."""
    from reglue.pipeline import NORM_STATS_FILE, build_semantic_encoder

    if config.data.semantics != "online" or not required_targets(preset):
        return None
    norm_stats = config.data.norm_stats or str(Path(config.data.dir) / NORM_STATS_FILE)
    compressor = config.data.compressor if preset.semantics == "compressor" else None
    pca = config.data.pca if preset.semantics == "pca" else None
    if preset.semantics == "compressor" and compressor is None:
        raise ConfigError("data.compressor: the reglue preset online needs the compressor weights file.")
    if preset.semantics == "pca" and pca is None:
        raise ConfigError("data.pca: the redi preset online needs the PCA file from `reglue fit-pca`.")
    dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[config.data.vfm_autocast]
    encoder, _ = build_semantic_encoder(norm_stats, compressor, pca, resolution=resolution, autocast_dtype=dtype)
    return encoder
