"""Pixel-space demo metrics: nearest-class-mean accuracy and thumbnail FID / precision / recall."""

from __future__ import annotations

import numpy as np
import pytest

from reglue.data.synthetic import draw_image
from reglue.metrics.pixel_space import class_means, nearest_class_mean, pixel_space_metrics, thumbnails


def synthetic(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(8), per_class)
    rng = np.random.default_rng(seed)
    return np.stack([draw_image(int(k), rng, 64) for k in labels]), labels


def test_thumbnails_are_area_means_in_unit_range():
    images = np.zeros((1, 4, 4, 3), np.uint8)
    images[0, :2, :2] = 255
    small = thumbnails(images, 2).reshape(3, 2, 2)  # channels first
    assert small[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and small[:, 1, 1].tolist() == [0.0, 0.0, 0.0]


def test_nearest_class_mean_picks_the_closest_mean():
    means = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert nearest_class_mean(np.array([[0.1, 0.2], [0.9, 0.7]]), means).tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"classes \[1\] have no real image"):
        class_means(np.zeros((2, 3)), np.array([0, 0]), 2)


def test_real_images_as_samples_score_like_the_ceiling_and_wrong_labels_score_low():
    real, labels = synthetic(6, seed=0)
    held_out, held_labels = synthetic(3, seed=1)
    right = pixel_space_metrics(real, labels, held_out, held_labels, 8)
    assert right["class_accuracy"] > 0.5 and right["class_accuracy_real_images"] > 0.7  # chance: 0.125
    assert right["class_accuracy_chance"] == 0.125 and len(right["class_accuracy_per_class"]) == 8
    wrong = pixel_space_metrics(real, labels, held_out, (held_labels + 1) % 8, 8)
    assert wrong["class_accuracy"] < 0.3
    noise = np.random.default_rng(2).integers(0, 256, held_out.shape, dtype=np.uint8)
    assert pixel_space_metrics(real, labels, noise, held_labels, 8)["thumbnail_fid"] > right["thumbnail_fid"]
