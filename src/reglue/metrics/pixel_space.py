"""Pixel-space checks of class-conditional samples, for when no Inception weights exist (the demo).

- **Nearest-class-mean accuracy**: every image gets the class whose mean real image is nearest
  (Euclidean, on :data:`CLASSIFIER_SIDE`² thumbnails); the accuracy of generated samples
  against the labels they were conditioned on says whether the model draws the class it is
  asked for. The same classifier on the real images gives the ceiling; 1/K is chance.
- **Thumbnail Fréchet distance, precision and recall**: the ADM maths of
  :mod:`reglue.metrics.fid` and :mod:`reglue.metrics.manifold` on :data:`THUMBNAIL_SIDE`²
  thumbnails (192 values) instead of Inception features. They compare colour layouts only and
  are not comparable with any published FID.

Thumbnails are area averages of the uint8 images, scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from reglue.metrics.fid import feature_statistics, frechet_distance
from reglue.metrics.manifold import precision_recall

CLASSIFIER_SIDE = 32  # the pixel autoencoder's latent grid at 256²: all it keeps
THUMBNAIL_SIDE = 8  # 8·8·3 = 192 features for the Fréchet distance and precision/recall


def thumbnails(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float64 (N, side·side·3): area-averaged, in [0, 1]."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), found {images.dtype} {images.shape}.")
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double() / 255
    small = F.interpolate(pixels, size=(side, side), mode="area")  # (N, 3, side, side)
    return small.reshape(len(images), -1).numpy()


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, F) features and (N,) labels in 0..K-1 -> (K, F) per-class means; every class needs an image."""
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no real image; the class means need at least one per class.")
    return np.stack([features[labels == k].mean(axis=0) for k in range(num_classes)])


def nearest_class_mean(features: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(N, F) features, (K, F) class means -> (N,) index of the nearest mean."""
    distances = ((features[:, None, :] - means[None, :, :]) ** 2).sum(axis=-1)  # (N, K)
    return distances.argmin(axis=1)


def pixel_space_metrics(real: np.ndarray, real_labels: np.ndarray, samples: np.ndarray, sample_labels: np.ndarray,
                        num_classes: int) -> dict:
    """Class accuracy of ``samples`` (and of ``real``, the ceiling) plus thumbnail FID/precision/recall.

    ``real`` / ``samples``: uint8 (N, H, W, 3) with labels (N,) in 0..K-1 (sizes may differ).
    """
    means = class_means(thumbnails(real, CLASSIFIER_SIDE), real_labels, num_classes)
    real_hits = nearest_class_mean(thumbnails(real, CLASSIFIER_SIDE), means) == real_labels
    hits = nearest_class_mean(thumbnails(samples, CLASSIFIER_SIDE), means) == sample_labels
    per_class = [float(hits[sample_labels == k].mean()) if (sample_labels == k).any() else None
                 for k in range(num_classes)]
    real_small, sample_small = thumbnails(real, THUMBNAIL_SIDE), thumbnails(samples, THUMBNAIL_SIDE)
    precision, recall = precision_recall(real_small, sample_small)
    return {
        "class_accuracy": float(hits.mean()),
        "class_accuracy_per_class": per_class,
        "class_accuracy_real_images": float(real_hits.mean()),
        "class_accuracy_chance": 1.0 / num_classes,
        "thumbnail_fid": frechet_distance(*feature_statistics(real_small), *feature_statistics(sample_small)),
        "thumbnail_precision": precision,
        "thumbnail_recall": recall,
    }
