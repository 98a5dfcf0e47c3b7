"""Semantic compressor (REGLUE) and PCA projection (ReDi)."""

from __future__ import annotations

import pytest
import torch

from reglue.models import PCAProjection, SemanticCompressor


def test_default_compressor_matches_spec_layout():
    model = SemanticCompressor()
    keys = model.state_dict()
    assert keys["encoder.model.0.weight"].shape == (256, 3072, 3, 3)
    assert keys["encoder.model.1.bn1.running_mean"].shape == (256,)
    assert keys["encoder.model.2.weight"].shape == (16, 256, 3, 3)
    assert keys["decoder.model.0.weight"].shape == (256, 16, 3, 3)
    assert keys["decoder.model.2.weight"].shape == (3072, 256, 3, 3)
    assert "encoder.model.3.weight" not in keys  # no residual block after the last conv


def test_longer_channel_lists_and_shapes():
    model = SemanticCompressor((24, 12, 8, 4)).eval()
    names = [type(m).__name__ for m in model.encoder.model]
    assert names == ["Conv2d", "ResidualBlock", "Conv2d", "ResidualBlock", "Conv2d"]
    x = torch.randn(2, 24, 16, 16)
    assert model.encode(x).shape == (2, 4, 16, 16)
    assert model(x).shape == x.shape
    assert SemanticCompressor.from_state_dict(model.state_dict()).channels == (24, 12, 8, 4)


def test_compressor_rejects_wrong_feature_width():
    with pytest.raises(ValueError, match=r"\(B, 24, h, w\).*found \(2, 23, 16, 16\)"):
        SemanticCompressor((24, 8)).encode(torch.randn(2, 23, 16, 16))


def test_from_state_dict_rejects_foreign_dict():
    with pytest.raises(ValueError, match="not a semantic-compressor state dict"):
        SemanticCompressor.from_state_dict({"pos_embed": torch.zeros(1)})


def low_rank_features(n: int = 4000, channels: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with variance 25, 9, 1 along three known orthonormal directions (+ small noise)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))
    coeffs = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)
    x = coeffs @ basis[:, :3].T + 0.01 * torch.randn(n, channels, generator=g, dtype=torch.float64) + 2.0
    return x.float(), basis[:, :3].T.float()


def test_pca_recovers_known_directions_in_order():
    x, directions = low_rank_features()
    pca = PCAProjection.fit(x, rank=3)
    overlap = (pca.components @ directions.T).abs()
    assert torch.allclose(overlap, torch.eye(3), atol=5e-2)
    assert torch.allclose(pca.explained_variance, torch.tensor([25.0, 9.0, 1.0]), rtol=0.1)
    assert torch.allclose(pca.mean, torch.full((10,), 2.0), atol=0.2)


def test_pca_streaming_equals_one_shot_and_projects_maps():
    x, _ = low_rank_features()
    one = PCAProjection.fit(x, rank=2)
    streamed = PCAProjection.fit(iter(x.split(333)), rank=2)
    assert torch.allclose(one.components, streamed.components, atol=1e-5)
    maps = x[:32].T.reshape(1, 10, 4, 8)  # (B, C, h, w)
    projected = one(maps)
    expected = (x[:32] - one.mean) @ one.components.T  # (32, 2)
    assert projected.shape == (1, 2, 4, 8)
    assert torch.allclose(projected.reshape(2, 32).T, expected, atol=1e-5)


def test_pca_sign_is_deterministic():
    x, _ = low_rank_features()
    pca = PCAProjection.fit(-x, rank=3)
    top = pca.components.gather(1, pca.components.abs().argmax(1, keepdim=True))
    assert (top > 0).all()


def test_pca_save_load(tmp_path):
    x, _ = low_rank_features()
    pca = PCAProjection.fit(x, rank=3)
    pca.save(tmp_path / "pca.safetensors")
    loaded = PCAProjection.load(tmp_path / "pca.safetensors")
    assert loaded.rank == 3 and torch.equal(loaded.components, pca.components)
    assert not list(tmp_path.glob(".*tmp*"))


def test_pca_bad_input():
    with pytest.raises(ValueError, match="rank must lie"):
        PCAProjection(4, rank=5)
    with pytest.raises(ValueError, match="at least 2"):
        PCAProjection.fit(torch.randn(1, 4), rank=2)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        PCAProjection(4, 2)(torch.randn(1, 3, 2, 2))
