"""Per-channel statistics of the concatenated VFM layer maps (SPEC §4).

The semantic compressor sees z-scored features: ``(local − mean) / std`` per channel of the
(B, L·D, h, w) multi-layer map. ``mean`` and the population ``std`` are taken over every
patch token of a subset of training images (official: 300 batches × 256 images).

Files: ours are safetensors {"mean", "std"} with metadata (VFM, layers, resolution, image
count). The authors' release is a pickled dict {"mean": ndarray, "std": ndarray}; it loads
with ``weights_only=True`` and only numpy's array types allow-listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from reglue.errors import InputError
from reglue.io import atomic_write, read_safetensors_metadata, read_tensor_file

NORM_STATS_FILE = "norm_stats.safetensors"  # DATA/norm_stats.safetensors, written by `reglue norm-stats`
NORM_STATS_FIX = ("compute it again with `reglue norm-stats {data} --vfm-weights …` (the VFM options it was made "
                  "with), or copy it again from where it was made")

NUMPY_ARRAY_GLOBALS = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.float32)),
    type(np.dtype(np.float64)),
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),  # numpy 1.x files
    np._core.multiarray._reconstruct,
]


@dataclass
class NormStats:
    """Channel statistics: ``mean`` and ``std`` of shape (C,), float32."""

    mean: torch.Tensor
    std: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mean = torch.as_tensor(self.mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(self.std, dtype=torch.float32).reshape(-1)
        if self.mean.shape != self.std.shape:
            raise InputError(f"mean {tuple(self.mean.shape)} and std {tuple(self.std.shape)} differ in size.")
        if not bool((self.std > 0).all()):
            raise InputError("norm stats contain a non-positive std; recompute them on more images.")

    @property
    def channels(self) -> int:
        return self.mean.shape[0]

    def normalize(self, local: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> z-scored (B, C, h, w)."""
        if local.ndim != 4 or local.shape[1] != self.channels:
            raise InputError(
                f"norm stats cover {self.channels} channels, features have shape {tuple(local.shape)}; "
                "use stats computed for the same VFM and layers."
            )
        mean = self.mean.to(local.device, local.dtype)[None, :, None, None]
        std = self.std.to(local.device, local.dtype)[None, :, None, None]
        return (local - mean) / std

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        with atomic_write(path) as tmp:
            save_file({"mean": self.mean, "std": self.std}, str(tmp), metadata=self.metadata)

    @classmethod
    def load(cls, path: str | Path) -> NormStats:
        """Our safetensors file, or the authors' pickled {"mean", "std"} numpy dict (their numpy
        array types allow-listed). A damaged file or a wrong shape is an error naming it and the fix."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"norm stats file {path} not found; run `reglue norm-stats DATA` first.")
        fix = NORM_STATS_FIX.format(data="DATA")
        if path.suffix == ".safetensors":
            raw, metadata = read_tensor_file(path, "norm-stats", fix=fix), read_safetensors_metadata(path, "norm-stats", fix)
        else:
            raw = read_tensor_file(path, "norm-stats", allowed=tuple(NUMPY_ARRAY_GLOBALS), fix=fix)
            metadata = {"source": f"authors' file {path.name}"}
        if not isinstance(raw, dict) or not {"mean", "std"} <= set(raw):
            found = list(raw)[:5] if isinstance(raw, dict) else type(raw).__name__
            raise InputError(f"{path} is not a norm-stats file: expected keys 'mean' and 'std', found {found}.")
        try:
            return cls(torch.as_tensor(np.asarray(raw["mean"])), torch.as_tensor(np.asarray(raw["std"])), metadata)
        except ValueError as err:
            raise InputError(f"{path}: {str(err).rstrip('.')}; {fix}.") from None


class NormStatsAccumulator:
    """Streams (B, C, h, w) maps; float64 sums give mean and population std over all tokens."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None

    def update(self, local: torch.Tensor) -> None:
        tokens = local.detach().double().permute(1, 0, 2, 3).reshape(local.shape[1], -1)  # (C, B·h·w)
        total, total_sq = tokens.sum(1).cpu(), (tokens * tokens).sum(1).cpu()
        self.total = total if self.total is None else self.total + total
        self.total_sq = total_sq if self.total_sq is None else self.total_sq + total_sq
        self.count += tokens.shape[1]

    def result(self, metadata: dict[str, str] | None = None) -> NormStats:
        if self.count < 2:
            raise InputError(f"norm stats need at least 2 tokens, saw {self.count}.")
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean * mean).clamp_min(0)
        return NormStats(mean.float(), var.sqrt().float(), dict(metadata or {}, tokens=str(self.count)))


@torch.no_grad()
def compute_norm_stats(
    images, extractor, *, batch_size: int = 64, device: torch.device | str = "cpu", num_workers: int = 0,
    progress=None, metadata: dict | None = None,
) -> NormStats:
    """Stats of ``extractor(images).local`` over every item of ``images``, a dataset whose
    ``images[i]["images"]`` is uint8 (3, R, R) (``reglue norm-stats`` passes a seeded random subset
    of the prepared data: official 300 × 256 = 76,800 images)."""
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers)
    accumulator = NormStatsAccumulator()
    for batch in loader:
        accumulator.update(extractor(batch["images"].to(device)).local)
        if progress is not None:
            progress(len(batch["images"]))
    return accumulator.result(dict(metadata or {}, num_images=str(len(images))))
