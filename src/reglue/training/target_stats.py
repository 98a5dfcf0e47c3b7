"""The statistics ``loss.semantic_norm`` standardises the targets with, measured once at a fresh run's start.

They come from a seeded subset of the training rows (:data:`STATS_IMAGES` at most) through the run's own
target path (:meth:`~reglue.training.inputs.InputBuilder.semantic_targets`: the cached semantics and CLS, or
the online VFM on the images; the semantics upsampled to the latent grid), summed in float64. With several
processes each takes a strided share of the subset and the sums are added over the processes, so every
process holds the same statistics. The model keeps them (:mod:`reglue.models.semantic_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reglue.data.dataset import PreparedDataset, training_loader
from reglue.distributed import process_state, sum_over_processes
from reglue.training.inputs import InputBuilder

# Plenty for a standardisation: from n = 10,000 images a channel's mean is known to about ±std/√n (1 % of its
# std) and its std to about ±std/√(2n) (0.7 %), for the CLS dimensions and, as a bound, for the semantic
# channels (whose h·w values per image add information beyond n). A few per cent would do; more images only
# cost start-up time (data.semantics=online: a VFM forward per image).
STATS_IMAGES = 10_000
STATS_FIELDS = ("images", "semantics", "cls")  # the arrays the semantic targets are made from


@dataclass
class TargetStats:
    """Per-channel statistics, float64 on the CPU, before the std floor of ``SemanticNorm.set_statistics``."""

    semantic_mean: torch.Tensor  # (S,)
    semantic_std: torch.Tensor  # (S,)
    cls_mean: torch.Tensor  # (D,)
    cls_std: torch.Tensor  # (D,)
    images: int

    def tensors(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of :meth:`~reglue.models.semantic_norm.SemanticNorm.set_statistics`."""
        return {"semantic_mean": self.semantic_mean, "semantic_std": self.semantic_std,
                "cls_mean": self.cls_mean, "cls_std": self.cls_std}

    def describe(self) -> str:
        """One line: the ranges of the means and stds of each part (the targets' scale before normalising)."""
        parts = [f"{name} mean [{mean.min():.4g}, {mean.max():.4g}], std [{std.min():.4g}, {std.max():.4g}]"
                 for name, mean, std in (("semantic channels", self.semantic_mean, self.semantic_std),
                                         ("CLS", self.cls_mean, self.cls_std)) if mean.numel()]
        return f"loss.semantic_norm: statistics of {self.images} training images: {'; '.join(parts)}"


def stats_rows(rows: np.ndarray, seed: int) -> np.ndarray:
    """min(:data:`STATS_IMAGES`, N) of the N training ``rows``, drawn by a permutation seeded with ``seed``,
    in dataset order (file locality)."""
    chosen = np.random.default_rng(seed).permutation(len(rows))[:STATS_IMAGES]
    return rows[np.sort(chosen)]


def measure_target_stats(builder: InputBuilder, dataset: PreparedDataset, rows: np.ndarray, *,
                         widths: tuple[int, int], seed: int, micro_batch: int, num_workers: int,
                         device: torch.device) -> TargetStats:
    """The mean and std of each of the S semantic channels (over images × positions) and of each of the
    D CLS dimensions, ``widths`` = (S, D), of the targets ``builder`` makes from ``dataset``'s
    :func:`stats_rows` of ``rows``, read ``micro_batch`` rows at a time. Every process must call it (a
    collective)."""
    state = process_state()
    chosen = stats_rows(rows, seed)
    share = chosen[state.process_index :: state.num_processes]
    reader = PreparedDataset(dataset.records, fields=[f for f in dataset.fields if f in STATS_FIELDS])
    batches = [share[i : i + micro_batch].tolist() for i in range(0, len(share), micro_batch)]
    S, D = widths
    sums = torch.zeros(2 + 2 * S + 2 * D, dtype=torch.float64, device=device)  # [counts, Σs, Σs², Σc, Σc²]
    with torch.no_grad():
        for batch in training_loader(reader, batches, num_workers=num_workers, pin_memory=False):
            semantics, cls = builder.semantic_targets(batch, device)
            sums += torch.cat([_counts(semantics, cls, device), _power_sums(semantics, (0, 2, 3), S, device),
                               _power_sums(cls, (0,), D, device)])
    sums = sum_over_processes(sums).cpu()
    semantic_mean, semantic_std = _mean_std(sums[2 : 2 + 2 * S], sums[0])
    cls_mean, cls_std = _mean_std(sums[2 + 2 * S :], sums[1])
    return TargetStats(semantic_mean, semantic_std, cls_mean, cls_std, images=len(chosen))


def _counts(semantics: torch.Tensor | None, cls: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(2,) float64: the values per semantic channel (B·h·w) and the CLS vectors (B) of a batch."""
    return torch.tensor([0 if semantics is None else semantics[:, 0].numel(), 0 if cls is None else len(cls)],
                        dtype=torch.float64, device=device)


def _power_sums(x: torch.Tensor | None, dims: tuple[int, ...], width: int,
                device: torch.device) -> torch.Tensor:
    """(2·width,) float64: Σx and Σx² per channel (dim 1) over ``dims``; zeros for a part the preset lacks."""
    if x is None:
        return torch.zeros(2 * width, dtype=torch.float64, device=device)
    x = x.double()
    return torch.cat([x.sum(dims), x.square().sum(dims)])


def _mean_std(sums: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2·C,) [Σx, Σx²] over ``count`` values -> mean (C,), population std (C,)."""
    half = len(sums) // 2
    first, second = sums[:half], sums[half:]
    mean = first / count.clamp(min=1)
    return mean, (second / count.clamp(min=1) - mean.square()).clamp(min=0).sqrt()
