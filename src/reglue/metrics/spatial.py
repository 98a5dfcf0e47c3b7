"""Spatial structure of a VFM's patch tokens: LDS and CDS, iREPA's measures.

Definitions: Singh et al., "What matters for Representation Alignment: Global Information or Spatial
Structure?" (iREPA, arXiv 2512.10794, 2025), its spatial-structure metrics, as their released code computes
them (``metric_lds``, ``metric_cds``; github.com/end2end-diffusion/irepa). Across 27 encoders they found that
these measures of a teacher's patch tokens, not its classification accuracy, predict the FID of the
REPA-trained generator (Pearson |r| > 0.85, against 0.26 for linear-probe accuracy; project page
end2end-diffusion.github.io/irepa). Higher means more spatial structure.

Per image: its h×w patch tokens x_t (prefix tokens — CLS, registers — excluded), each L2-normalised;
K(t, t') = ⟨x_t, x_t'⟩ their cosine similarity; d(t, t') = |Δrow| + |Δcolumn| their Manhattan distance in
patches. The *similarity profile* s(d) is the mean K over the ordered pairs at distance exactly d, for
d = 0 .. 2(g − 1) on a g×g grid (:func:`similarity_profile`).

- **LDS** (Local vs. Distant Similarity) = mean K over the 4-neighbour pairs (d = 1) − mean K over the pairs
  with d ≥ d_far (each distance weighted by its number of pairs).
- **CDS** (Correlation-Decay Slope) = −(least-squares slope of s(d) against d) over d = 1 .. d_max, with d
  measured in sixteenths of the image side (d · 16 / g patches of iREPA's 16×16 grid), so grids compare.

iREPA fixes d_far = 6 and d_max = 8 on its 16×16 grid (256² images, patch 16). Here VFM grids run from
4×4 (64² images) to 32×32 (512²), so both scale with the side g to cover the same share of the image,
rounded half up and at least 2 (:func:`far_distance`, :func:`decay_distance`):

====  ===  ===  ===  ===  ===  ===  ===
g      4    8   12   16   20   24   32
d_far  2    3    5    6    8    9   12
d_max  2    4    6    8   10   12   16
====  ===  ===  ===  ===  ===  ===  ===

A grid needs 4-neighbours and pairs at d_far (g ≥ 2, :data:`MIN_GRID`); smaller ones are refused. The score
of a set of images is the mean of the per-image values. Both measures ignore each token's norm (the cosine
does), so they do not change with the features' scale.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from reglue.errors import InputError

IREPA_GRID = 16  # the grid iREPA's distances are defined on (256² images, patch 16)
IREPA_FAR = 6  # d_far on that grid
IREPA_DECAY = 8  # d_max on that grid
MIN_GRID = 2  # the smallest side with both 4-neighbour pairs and pairs at d_far (≥ 2)
CHUNK = 16  # images per similarity block: (CHUNK, g², g²) float32, 64 MiB at g = 32


class SpatialScores(NamedTuple):
    """Per-image LDS and CDS, each (B,) float32."""

    lds: torch.Tensor
    cds: torch.Tensor


def _scaled(distance: int, grid: int) -> int:
    """``distance`` on iREPA's 16×16 grid carried to a g×g one: distance · g / 16 rounded half up, at least 2."""
    return max(2, (2 * distance * grid + IREPA_GRID) // (2 * IREPA_GRID))


def far_distance(grid: int) -> int:
    """d_far of LDS on a g×g grid (iREPA's 6 at g = 16; the module doc's table)."""
    return _scaled(IREPA_FAR, check_grid(grid))


def decay_distance(grid: int) -> int:
    """d_max of CDS on a g×g grid (iREPA's 8 at g = 16)."""
    return _scaled(IREPA_DECAY, check_grid(grid))


def check_grid(grid: int) -> int:
    if grid < MIN_GRID:
        raise InputError(
            f"a {grid}×{grid} patch grid has no pairs of neighbouring and distant tokens to measure spatial "
            f"structure on (LDS needs at least {MIN_GRID}×{MIN_GRID}); use larger images (prepare the data at a "
            "higher --resolution) or a VFM with smaller patches."
        )
    return grid


def patch_grid(repa: torch.Tensor) -> torch.Tensor:
    """A VFM's REPA tokens (B, 1 + g², D) = [CLS; patch tokens] → the patch tokens on their grid (B, g, g, D)."""
    batch, tokens, width = repa.shape
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise InputError(f"REPA tokens must be (B, 1 + g², D), a CLS and a square grid of patches; found "
                         f"{tuple(repa.shape)}.")
    return repa[:, 1:].reshape(batch, grid, grid, width)


@functools.lru_cache(maxsize=8)
def _distances(grid: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Manhattan distance of every ordered pair (g⁴,) int64, row-major over (t, t'), and the number of
    pairs at each distance 0 .. 2(g − 1) (2g − 1,) float32; made once per grid and device."""
    rows, columns = torch.arange(grid).repeat_interleave(grid), torch.arange(grid).repeat(grid)  # (g²,) each
    distance = ((rows[:, None] - rows[None]).abs() + (columns[:, None] - columns[None]).abs()).flatten()
    counts = torch.bincount(distance, minlength=2 * grid - 1).float()
    return distance.to(device), counts.to(device)


def similarity_profile(patches: torch.Tensor) -> torch.Tensor:
    """Patch tokens (B, g, g, D) → s(d), the mean cosine similarity of the ordered token pairs at each
    Manhattan distance d = 0 .. 2(g − 1): (B, 2g − 1) float32 (s(0) = 1, the tokens with themselves)."""
    batch, grid, width = patches.shape[0], patches.shape[1], patches.shape[-1]
    if patches.ndim != 4 or patches.shape[2] != grid:
        raise InputError(f"patch tokens must be (B, g, g, D), found {tuple(patches.shape)}.")
    distance, counts = _distances(check_grid(grid), patches.device)
    tokens = F.normalize(patches.reshape(batch, grid * grid, width).float(), dim=-1)  # (B, g², D)
    sums = []
    for chunk in tokens.split(CHUNK):
        similarity = chunk @ chunk.transpose(1, 2)  # (b, g², g²)
        sums.append(similarity.new_zeros(len(chunk), 2 * grid - 1).index_add_(1, distance, similarity.flatten(1)))
    return torch.cat(sums) / counts  # (B, 2g − 1)


def spatial_scores(patches: torch.Tensor) -> SpatialScores:
    """Per-image LDS and CDS (module doc) of patch tokens (B, g, g, D)."""
    grid = patches.shape[1]
    profile = similarity_profile(patches)  # (B, 2g − 1)
    _, counts = _distances(grid, patches.device)
    far = far_distance(grid)
    distant = (profile[:, far:] * counts[far:]).sum(1) / counts[far:].sum()  # (B,) mean over the pairs d ≥ d_far
    top = decay_distance(grid)
    d = torch.arange(1, top + 1, device=patches.device, dtype=torch.float32) * IREPA_GRID / grid  # (d_max,)
    centred = d - d.mean()
    slope = ((profile[:, 1 : top + 1] * centred).sum(1)) / centred.square().sum()  # least squares, (B,)
    return SpatialScores(lds=profile[:, 1] - distant, cds=-slope)
