"""iREPA's spatial-structure measures of patch tokens (reglue.metrics.spatial): LDS and CDS."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from reglue.errors import InputError
from reglue.metrics import spatial


def _halves(grid: int = 4, width: int = 8) -> torch.Tensor:
    """(1, g, g, D): the left half of the grid one token, the right half an orthogonal one."""
    tokens = torch.zeros(1, grid, grid, width)
    tokens[..., : grid // 2, 0] = 1.0
    tokens[..., grid // 2 :, 1] = 1.0
    return tokens


def test_lds_and_cds_of_a_grid_split_in_two_halves_are_the_counted_ones():
    """4×4, d_far = 2, d_max = 2. Cosine 1 within a half, 0 across. Of the 24 neighbour pairs, 20 lie in one
    half (all 12 vertical, 8 of 12 horizontal): 5/6. Of the other 96 pairs, 56 − 20 = 36 do: 3/8. So
    LDS = 5/6 − 3/8 = 11/24. At d = 2, 20 of 34 pairs lie in one half (8 vertical, 0 of 8 horizontal, 12 of 18
    diagonal): s(2) = 10/17; distances 4 and 8 sixteenths apart, so CDS = (5/6 − 10/17) / 4 = 25/408."""
    scores = spatial.spatial_scores(_halves())
    assert scores.lds.item() == pytest.approx(11 / 24, abs=1e-6)
    assert scores.cds.item() == pytest.approx(25 / 408, abs=1e-6)
    profile = spatial.similarity_profile(_halves())
    assert profile[0, :3].tolist() == pytest.approx([1.0, 5 / 6, 10 / 17], abs=1e-6)


def _loop_lds(tokens: torch.Tensor, far: int) -> float:
    """LDS of one image (g, g, D) by a loop over every ordered pair: the definition, written out."""
    grid = tokens.shape[0]
    cells = list(itertools.product(range(grid), range(grid)))
    near, distant = [], []
    for (y, x), (v, u) in itertools.product(cells, cells):
        d = abs(y - v) + abs(x - u)
        cosine = F.cosine_similarity(tokens[y, x], tokens[v, u], dim=0).item()
        (near if d == 1 else distant if d >= far else []).append(cosine)
    return sum(near) / len(near) - sum(distant) / len(distant)


def test_the_vectorised_lds_equals_the_loop_over_pairs_in_chunks_and_at_any_token_scale(monkeypatch):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 6, 6, 5, generator=g).cumsum(dim=1)  # some structure down the columns
    expected = [_loop_lds(image, far=spatial.far_distance(6)) for image in tokens]
    assert spatial.far_distance(6) == 2
    assert spatial.spatial_scores(tokens).lds.tolist() == pytest.approx(expected, abs=1e-5)
    monkeypatch.setattr(spatial, "CHUNK", 2)  # the images in blocks of two: the same numbers
    scaled = tokens * torch.rand(3, 6, 6, 1, generator=g).mul(100).add(0.01)  # every token its own scale
    chunked = spatial.spatial_scores(scaled)
    assert chunked.lds.tolist() == pytest.approx(expected, abs=1e-5)
    torch.testing.assert_close(chunked.cds, spatial.spatial_scores(tokens).cds, atol=1e-5, rtol=0)


def test_a_smooth_field_has_high_lds_and_cds_and_independent_tokens_none():
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(8, 64, 3, 3, generator=g)  # (B, D, 3, 3): a few independent values per image
    smooth = F.interpolate(coarse, size=16, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)  # (B, 16, 16, D)
    field = spatial.spatial_scores(smooth)
    noise = spatial.spatial_scores(torch.randn(8, 16, 16, 64, generator=g))
    assert (field.lds > 0.7).all() and (field.cds > 0.08).all(), field
    assert noise.lds.abs().max() < 0.02 and noise.cds.abs().max() < 0.005, noise


def test_the_distances_scale_with_the_grid_as_the_table_says():
    sides = (2, 4, 8, 12, 16, 20, 24, 32)
    assert [spatial.far_distance(g) for g in sides] == [2, 2, 3, 5, 6, 8, 9, 12]
    assert [spatial.decay_distance(g) for g in sides] == [2, 2, 4, 6, 8, 10, 12, 16]
    # the same image-space structure (one half against the other, as above) at 4×4 to 32×32: close scores
    scores = [spatial.spatial_scores(_halves(g)) for g in (4, 8, 16, 32)]
    assert [round(s.lds.item(), 2) for s in scores] == [0.46, 0.51, 0.55, 0.57]
    assert [round(s.cds.item(), 3) for s in scores] == [0.061, 0.053, 0.05, 0.048]


def test_repa_tokens_give_their_patch_grid_and_bad_grids_are_refused():
    repa = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)  # CLS + 4×4 patches
    grid = spatial.patch_grid(repa)
    assert grid.shape == (2, 4, 4, 3) and torch.equal(grid[:, 0, 1], repa[:, 2]) and torch.equal(grid[:, 3, 3],
                                                                                                   repa[:, 16])
    with pytest.raises(InputError, match=r"\(B, 1 \+ g², D\)"):
        spatial.patch_grid(repa[:, :16])
    with pytest.raises(InputError, match="1×1 patch grid .* higher --resolution"):
        spatial.spatial_scores(torch.randn(2, 1, 1, 3))
    with pytest.raises(InputError, match=r"\(B, g, g, D\)"):
        spatial.similarity_profile(torch.randn(2, 4, 3, 3))
