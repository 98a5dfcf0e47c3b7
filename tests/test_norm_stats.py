"""Norm stats of the VFM layer maps: computing, saving, and the authors' file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shared_file
from reglue.encoders.norm_stats import NormStats, NormStatsAccumulator


def test_authors_released_file_loads_without_unsafe_unpickling():
    stats = NormStats.load(shared_file("compat/authors_norm_stats_dinov2_b14_reg_layers_8_11.pth"))
    assert stats.channels == 3072
    assert stats.mean.dtype == torch.float32 and bool((stats.std > 0).all())


class Payload:
    """Stands for arbitrary pickled code."""


def test_pickle_with_other_objects_is_refused(tmp_path):
    path = tmp_path / "stats.pth"
    torch.save({"mean": np.zeros(4, np.float32), "std": np.ones(4, np.float32),
                "extra": Payload()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        NormStats.load(path)


def test_numpy_dict_in_authors_format_loads(tmp_path):
    path = tmp_path / "stats.pth"
    torch.save({"mean": np.arange(4, dtype=np.float32), "std": np.full(4, 2.0, np.float32)}, path)
    stats = NormStats.load(path)
    assert torch.equal(stats.mean, torch.arange(4.0)) and torch.equal(stats.std, torch.full((4,), 2.0))


def test_wrong_keys_and_missing_file():
    with pytest.raises(FileNotFoundError, match="reglue norm-stats"):
        NormStats.load("/nonexistent/stats.pth")


def test_accumulator_equals_population_stats_over_all_tokens():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 6, 4, 4, generator=g) * 3 + 1 for _ in range(4)]
    acc = NormStatsAccumulator()
    for b in batches:
        acc.update(b)
    tokens = torch.cat(batches).permute(1, 0, 2, 3).reshape(6, -1).double()
    stats = acc.result({"vfm": "test"})
    assert torch.allclose(stats.mean.double(), tokens.mean(1), atol=1e-6)
    assert torch.allclose(stats.std.double(), tokens.std(1, unbiased=False), atol=1e-6)
    assert stats.metadata["tokens"] == str(4 * 3 * 16)


def test_save_load_round_trip_and_normalize(tmp_path):
    stats = NormStats(torch.tensor([1.0, -2.0]), torch.tensor([2.0, 4.0]), {"layers": "8,9,10,11"})
    stats.save(tmp_path / "norm_stats.safetensors")
    loaded = NormStats.load(tmp_path / "norm_stats.safetensors")
    assert loaded.metadata["layers"] == "8,9,10,11"
    x = torch.tensor([3.0, 2.0]).reshape(1, 2, 1, 1)
    assert torch.equal(loaded.normalize(x).flatten(), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="cover 2 channels"):
        loaded.normalize(torch.zeros(1, 3, 1, 1))


def test_non_positive_std_is_rejected():
    with pytest.raises(ValueError, match="non-positive std"):
        NormStats(torch.zeros(2), torch.tensor([1.0, 0.0]))
