"""Improved precision and recall (Kynkäänniemi et al. 2019) with k = 3, as in ADM (SPEC §10).

Each feature set is a union of balls: around every feature, the ball reaching its k-th nearest
neighbour in the same set (itself excluded). Precision is the fraction of sample features inside
any reference ball; recall the fraction of reference features inside any sample ball. A point
exactly on a ball's surface counts as inside. Distances are computed in row chunks with
``torch.cdist`` so 10K reference × 50K sample features fit in memory.
"""

from __future__ import annotations

import numpy as np
import torch

NEIGHBOURHOOD_K = 3
CHUNK_ROWS = 1024  # rows of one (chunk, N) distance block: 1024 × 50K float32 = 200 MB


def precision_recall(
    reference: np.ndarray, samples: np.ndarray, k: int = NEIGHBOURHOOD_K, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """Precision and recall of ``samples`` ``(M, D)`` against ``reference`` ``(N, D)`` features."""
    for name, features in (("reference", reference), ("samples", samples)):
        if features.ndim != 2 or features.shape[0] <= k:
            raise ValueError(
                f"precision/recall with k={k} needs {name} features (N, D) with N > {k}, found shape "
                f"{features.shape}; evaluate more images."
            )
    ref = torch.as_tensor(reference, dtype=torch.float32, device=device)
    gen = torch.as_tensor(samples, dtype=torch.float32, device=device)
    precision = _fraction_inside(gen, ref, knn_radii(ref, k))
    recall = _fraction_inside(ref, gen, knn_radii(gen, k))
    return precision, recall


def knn_radii(features: torch.Tensor, k: int = NEIGHBOURHOOD_K) -> torch.Tensor:
    """Distance ``(N,)`` from each row of ``features`` ``(N, D)`` to its k-th nearest other row."""
    radii = [
        torch.kthvalue(torch.cdist(chunk, features), k + 1, dim=1).values  # +1: the row itself is at 0
        for chunk in features.split(CHUNK_ROWS)
    ]
    return torch.cat(radii)


def _fraction_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``points`` ``(M, D)`` within ``radii`` ``(N,)`` of at least one of ``centres`` ``(N, D)``."""
    inside = [(torch.cdist(chunk, centres) <= radii).any(dim=1) for chunk in points.split(CHUNK_ROWS)]
    return torch.cat(inside).float().mean().item()
