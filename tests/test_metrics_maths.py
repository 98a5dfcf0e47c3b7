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
    mean, std = inception_score(np.zeros((40, 1008)), split_size=10)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0)


@pytest.mark.parametrize("classes", [2, 5])
def test_inception_score_of_confident_balanced_predictions_is_the_number_of_classes(classes):
    labels = np.tile(np.arange(classes), 6)  # every part of 3·classes images holds each class equally often
    logits = np.full((len(labels), 1008), -1e4)
    logits[np.arange(len(labels)), labels] = 0.0
    mean, std = inception_score(logits, split_size=3 * classes)
    assert mean == pytest.approx(classes) and std == pytest.approx(0.0)


def adm_inception_score(probs, split_size):
    """ADM's compute_inception_score, written out: consecutive parts of split_size, the last one partial."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores), np.std(scores)


def softmax_rows(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# parts of 5000, 5000 and 2000; of 5, 5, 5, 5 and 3
@pytest.mark.parametrize(("images", "kwargs"), [(12_000, {}), (23, {"split_size": 5})])
def test_inception_score_uses_adm_parts_of_split_size_with_a_partial_last_part(images, kwargs):
    logits = 4.0 * np.random.default_rng(0).normal(size=(images, 1008))
    expected_mean, expected_std = adm_inception_score(softmax_rows(logits), kwargs.get("split_size", 5000))
    mean, std = inception_score(logits, **kwargs)
    assert mean == pytest.approx(expected_mean, rel=1e-10) and std == pytest.approx(expected_std, rel=1e-8)
    part = images // 10  # the rule this replaced: 10 parts of N // 10, the remainder left out
    ten_equal_parts, _ = adm_inception_score(softmax_rows(logits)[: 10 * part], part)
    assert abs(mean - ten_equal_parts) > 0.01 * mean


def test_inception_score_of_a_single_partial_part_and_bad_input():
    logits = np.full((13, 1008), -1e4)
    logits[np.arange(13), [0, 1] * 6 + [2]] = 0.0  # one part of 13: classes 0 and 1 six times, class 2 once
    marginal = np.array([6, 6, 1]) / 13
    assert inception_score(logits) == pytest.approx((np.exp(-np.sum(marginal * np.log(marginal))), 0.0))
    for bad, kwargs in [(logits[:0], {}), (logits[0], {}), (logits, {"split_size": 0})]:
        with pytest.raises(ValueError, match="Inception Score needs"):
            inception_score(bad, **kwargs)


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


@pytest.mark.parametrize(("block", "chunk_rows"), [(3, 2), (10_000, 1024)])
def test_precision_recall_on_a_half_overlap(monkeypatch, block, chunk_rows):
    # reference at 0..9 (balls of radius 2–3); half the samples at 0.25..4.25, inside them, half far away.
    # Sample balls around 0.25..4.25 reach from -2.75 to 7.25: reference points 0..7 are covered.
    monkeypatch.setattr(manifold, "ADM_BLOCK", block)
    monkeypatch.setattr(manifold, "CHUNK_ROWS", chunk_rows)
    reference = on_a_line(np.arange(10.0))
    samples = on_a_line(np.r_[np.arange(5.0) + 0.25, np.arange(5.0) + 100.0])
    precision, recall = precision_recall(reference, samples)
    assert type(precision) is float and type(recall) is float
    assert (precision, recall) == (0.5, 0.8)  # count / N in float64, as ADM: not float32's 0.800000011920929


def test_a_sample_within_float16_rounding_of_a_ball_counts_as_inside():
    # reference 0..3: the ball of 3 reaches 6 (squared radius 9). 6.001 is 9.006 away in float32 arithmetic,
    # outside; ADM casts features to float16, where 6.001 is 6.0 and the squared distance is 9: inside.
    reference = on_a_line(np.arange(4.0))
    samples = on_a_line([6.001, 50.0, 51.0, 52.0])
    assert np.float16(6.001) == 6.0
    assert precision_recall(reference, samples) == (0.25, 1.0)


def float16_row_sums_tf_gpu(x):
    """float16 row sums of (N, D ≥ 1024) float16 in TensorFlow's GPU order, written out with loops:
    256 threads each add columns t, t+256, …; each warp of 32 adds pairwise; warps add in turn."""
    threads = [x[:, t] for t in range(256)]
    for t in range(256):
        for column in range(t + 256, x.shape[1], 256):
            threads[t] = threads[t] + x[:, column]
    warps = []
    for w in range(8):
        lanes = threads[32 * w : 32 * w + 32]
        while len(lanes) > 1:
            lanes = [lanes[i] + lanes[i + 1] for i in range(0, len(lanes), 2)]
        warps.append(lanes[0])
    total = warps[0]
    for warp in warps[1:]:
        total = total + warp
    return total


def adm_float16_squared_distances(u, v):
    """ADM's DistanceBlock in numpy float16, for features on a 1/16 grid below 4, where u·v is exact."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    uv = (u16.astype(np.float64) @ v16.astype(np.float64).T).astype(np.float16)  # exact sum, then rounded
    norm_u, norm_v = float16_row_sums_tf_gpu(u16 * u16), float16_row_sums_tf_gpu(v16 * v16)
    distances = norm_u[:, None] - np.float16(2) * uv + norm_v[None, :]  # every operation rounds to float16
    assert distances.dtype == np.float16 and np.isfinite(distances).all()
    return np.maximum(distances, np.float16(0)).astype(np.float32)


def precision_recall_of(distance, reference, samples, k=3):
    """Kynkäänniemi et al.'s rule on (N, M) distances from ``distance(a, b)``, as ADM evaluates it."""
    ref_radii = np.partition(distance(reference, reference), k, axis=1)[:, k]
    gen_radii = np.partition(distance(samples, samples), k, axis=1)[:, k]
    between = distance(reference, samples)  # (N reference, M samples)
    precision = (between <= ref_radii[:, None]).any(axis=0).mean()
    recall = (between <= gen_radii[None, :]).any(axis=1).mean()
    return precision, recall


def test_precision_recall_match_adm_float16_arithmetic_on_inception_like_features():
    # 2048-d non-negative features like Inception pool features (squared norms ~ 1000), quantised to 1/16
    # so u·v is exact in any summation order; float16 rounding of norms, u·v and the expansion remains.
    rng = np.random.default_rng(0)
    features = lambda scale: np.minimum(np.round(rng.gamma(0.6, 0.7 * scale, (500, 2048)) * 16) / 16, 63 / 16)
    reference, samples = features(1.0).astype(np.float32), features(1.02).astype(np.float32)
    expected = precision_recall_of(adm_float16_squared_distances, reference, samples)
    exact_distances = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1, dtype=np.float64)
    exact = precision_recall_of(exact_distances, reference, samples)
    assert round(abs(expected[0] - exact[0]) * 500) + round(abs(expected[1] - exact[1]) * 500) >= 3
    precision, recall = precision_recall(reference, samples)
    assert type(precision) is float and type(recall) is float
    assert (precision, recall) == (float(expected[0]), float(expected[1]))


def test_squared_distances_fall_back_to_float32_for_the_whole_block_when_float16_overflows():
    u, v = torch.tensor([[0.1, 0.0]]), torch.zeros(1, 2)
    assert manifold.squared_distances(u, v).item() == float(np.float16(np.float16(0.1) ** 2))  # float16
    with_overflow = torch.tensor([[0.1, 0.0], [300.0, 0.0]])  # 300² = 90000 > 65504: not finite in float16
    distances = manifold.squared_distances(with_overflow, v)
    assert distances.dtype == torch.float32
    assert distances[0, 0].item() == float(np.float32(0.1) * np.float32(0.1))  # this entry too: float32
    assert distances[1, 0].item() == 90000.0


def test_precision_recall_of_features_beyond_float16_range_use_the_float32_fallback():
    reference = on_a_line(np.arange(10.0) * 1000.0)  # squared norms up to 8.1e7: inf in float16
    samples = on_a_line(np.r_[np.arange(5.0) + 0.25, np.arange(5.0) + 100.0] * 1000.0)
    assert precision_recall(reference, samples) == (0.5, 0.8)


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="N > 3"):
        precision_recall(on_a_line(np.arange(3.0)), on_a_line(np.arange(10.0)))
