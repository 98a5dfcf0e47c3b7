"""Metric maths on constructed data with known answers: Fréchet distance, Inception Score, precision/recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reglue.metrics import (
    feature_statistics,
    fid,
    frechet_distance,
    inception_score,
    knn_radii,
    manifold,
    precision_recall,
)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_a_full_covariance_with_itself_is_the_mean_gap():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T + np.eye(5)
    mu = rng.normal(size=5)
    assert frechet_distance(mu, sigma, mu + 2.0, sigma) == pytest.approx(4.0 * 5, abs=1e-8)


def test_frechet_distance_retries_with_eps_on_the_diagonal_when_sqrtm_is_not_finite(monkeypatch):
    calls = []
    real_sqrtm = fid.linalg.sqrtm

    def flaky_sqrtm(matrix):
        calls.append(matrix.copy())
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(fid.linalg, "sqrtm", flaky_sqrtm)
    var1, var2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    result = frechet_distance(np.zeros(2), np.diag(var1), np.zeros(2), np.diag(var2))
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], np.diag((var1 + fid.SQRTM_EPS) * (var2 + fid.SQRTM_EPS)))
    eps_var1, eps_var2 = var1 + fid.SQRTM_EPS, var2 + fid.SQRTM_EPS
    assert result == pytest.approx(np.sum(var1 + var2 - 2 * np.sqrt(eps_var1 * eps_var2)), rel=1e-9)


def test_frechet_distance_rejects_statistics_of_different_features():
    with pytest.raises(ValueError, match="same feature"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    features = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]], dtype=np.float32)
    mu, sigma = feature_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64).T))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(features[:1])


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.zeros((40, 1008)), splits=4)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0)


@pytest.mark.parametrize("classes", [2, 5])
def test_inception_score_of_confident_balanced_predictions_is_the_number_of_classes(classes):
    labels = np.tile(np.arange(classes), 6)  # every split of 3·classes holds each class equally often
    logits = np.full((len(labels), 1008), -1e4)
    logits[np.arange(len(labels)), labels] = 0.0
    mean, std = inception_score(logits, splits=2)
    assert mean == pytest.approx(classes) and std == pytest.approx(0.0)


def test_inception_score_drops_the_remainder_and_rejects_too_few_images():
    logits = np.full((13, 1008), -1e4)
    logits[np.arange(13), [0, 1] * 6 + [2]] = 0.0  # splits of 6; the 13th image (a third class) is left out
    assert inception_score(logits, splits=2)[0] == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError, match="fewer splits"):
        inception_score(logits[:3], splits=4)


def on_a_line(positions, dims=4):
    """Points (N, dims) at ``positions`` along the first axis."""
    points = np.zeros((len(positions), dims), dtype=np.float32)
    points[:, 0] = positions
    return points


def test_knn_radii_are_the_distance_to_the_third_other_point():
    radii = knn_radii(torch.from_numpy(on_a_line(np.arange(8.0))))
    np.testing.assert_allclose(radii.numpy(), [3, 2, 2, 2, 2, 2, 2, 3], atol=1e-5)


def test_precision_recall_of_identical_sets_is_one_and_of_far_sets_zero():
    points = on_a_line(np.arange(10.0))
    assert precision_recall(points, points) == pytest.approx((1.0, 1.0))
    assert precision_recall(points, on_a_line(np.arange(10.0) + 100.0)) == pytest.approx((0.0, 0.0))


@pytest.mark.parametrize("chunk_rows", [3, 1024])
def test_precision_recall_on_a_half_overlap(monkeypatch, chunk_rows):
    # reference at 0..9 (balls of radius 2–3); half the samples at 0.25..4.25, inside them, half far away.
    # Sample balls around 0.25..4.25 reach from -2.75 to 7.25: reference points 0..7 are covered.
    monkeypatch.setattr(manifold, "CHUNK_ROWS", chunk_rows)
    reference = on_a_line(np.arange(10.0))
    samples = on_a_line(np.r_[np.arange(5.0) + 0.25, np.arange(5.0) + 100.0])
    precision, recall = precision_recall(reference, samples)
    assert precision == pytest.approx(0.5)
    assert recall == pytest.approx(0.8)


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="N > 3"):
        precision_recall(on_a_line(np.arange(3.0)), on_a_line(np.arange(10.0)))
