"""The built-in synthetic dataset: deterministic, labelled, readable by `reglue prepare`."""

from __future__ import annotations

import numpy as np
import pytest

from reglue.data.sources import open_source
from reglue.data.synthetic import CLASSES, draw_image, write_synthetic_dataset


def test_dataset_is_deterministic_and_an_image_folder(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", images_per_class=3, size=32, seed=5)
    b = write_synthetic_dataset(tmp_path / "b", images_per_class=3, size=32, seed=5)
    c = write_synthetic_dataset(tmp_path / "c", images_per_class=3, size=32, seed=6)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 3 * len(CLASSES)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    source = open_source(a)
    assert source.class_names == sorted(CLASSES) and len(source.items) == 3 * len(CLASSES)


def test_classes_differ_in_colour_statistics():
    means = []
    for label in range(len(CLASSES)):
        images = np.stack([draw_image(label, np.random.default_rng([0, label, i]), 64) for i in range(8)])
        means.append(images.reshape(-1, 3).mean(0))
    means = np.array(means)
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(len(CLASSES), dtype=bool)].min() > 2.0  # every pair of classes differs


def test_bad_arguments():
    with pytest.raises(ValueError, match="label must lie"):
        draw_image(99, np.random.default_rng(0))
    with pytest.raises(ValueError, match="num_classes must lie"):
        write_synthetic_dataset("unused", num_classes=0)
