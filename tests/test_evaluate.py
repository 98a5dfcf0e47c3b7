"""The Inception feature extractor (random weights, same architecture) and `evaluate` end to end on tiny .npz files."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from reglue.metrics import (
    INCEPTION_WEIGHTS_FILE,
    evaluate,
    extract_features,
    feature_statistics,
    format_table,
    load_inception,
    write_results,
)

evaluate_module = importlib.import_module("reglue.metrics.evaluate")  # the module, not the function


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A randomly initialised Inception-v3 state dict of torch-fidelity's layout, saved where the real file goes."""
    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pt"
    torch.save({}, empty)
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:  # skip loading: keep the random initialisation
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        network = FeatureExtractorInceptionV3("random", ["2048"], feature_extractor_weights_path=str(empty))
    path = folder / INCEPTION_WEIGHTS_FILE
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def extractor(random_weights):
    return load_inception(random_weights)


def images(count, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def test_features_have_the_adm_shapes(extractor):
    features = extract_features(images(3, size=64), extractor, batch_size=2)
    assert features["pool"].shape == (3, 2048)
    assert features["spatial"].shape == (3, 7 * 17 * 17) == (3, 2023)
    assert features["logits"].shape == (3, 1008)
    assert all(np.isfinite(value).all() for value in features.values())


def test_spatial_features_are_mixed_6d_branch1x1_first_7_channels_channels_last(extractor):
    seen = []
    handle = extractor.network.Mixed_6d.branch1x1.register_forward_hook(
        lambda m, i, out: seen.append(out.clone())
    )
    try:
        features = extract_features(images(2), extractor, batch_size=2)
    finally:
        handle.remove()
    expected = seen[0][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()  # TF's (N, 17, 17, 7) order
    np.testing.assert_array_equal(features["spatial"], expected)


def test_logits_are_pool_times_the_weights_without_bias(extractor):
    features = extract_features(images(2), extractor, batch_size=2)
    expected = features["pool"] @ extractor.network.fc.weight.numpy().T
    np.testing.assert_allclose(features["logits"], expected, rtol=1e-4, atol=1e-6)


def test_missing_weights_fail_fast_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        load_inception(tmp_path)  # a folder without the file
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_inception(tmp_path / "nowhere.pth")


def test_weights_of_another_network_are_refused(tmp_path):
    path = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="not an Inception-v3 state dict"):
        load_inception(path)


def test_evaluate_uses_stored_statistics_and_gives_the_known_fid(tmp_path, random_weights, extractor):
    samples = images(8, seed=1)
    reference = images(6, seed=2)
    features = extract_features(samples, extractor, batch_size=4)
    mu, sigma = feature_statistics(features["pool"])
    mu_s, sigma_s = feature_statistics(features["spatial"])
    # planted: means shifted by 1 in every dimension, zero covariances -> FID = D + tr(sigma)
    np.savez(
        tmp_path / "ref.npz",
        arr_0=reference,
        mu=mu + 1.0,
        sigma=np.zeros_like(sigma),
        mu_s=mu_s + 1.0,
        sigma_s=np.zeros_like(sigma_s),
    )
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    results = evaluate(
        tmp_path / "ref.npz", tmp_path / "samples.npz", random_weights, batch_size=4, split_size=2
    )
    assert results["fid"] == pytest.approx(2048 + np.trace(sigma), rel=1e-6)
    assert results["sfid"] == pytest.approx(2023 + np.trace(sigma_s), rel=1e-6)
    assert set(results) == {"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall"}
    assert 0.0 <= results["precision"] <= 1.0 and 0.0 <= results["recall"] <= 1.0
    write_results(results, tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text()) == results
    table = format_table(results)
    assert table.splitlines()[0].startswith("fid") and "precision" in table


def test_evaluate_computes_and_caches_reference_statistics(tmp_path, random_weights, extractor, monkeypatch):
    calls = []  # the real sqrtm of 2048² low-rank products takes a minute; record the arguments instead
    monkeypatch.setattr(evaluate_module, "frechet_distance", lambda *stats: calls.append(stats) or 0.0)
    reference = images(6, seed=3)
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    np.savez(tmp_path / "samples.npz", arr_0=images(5, seed=4))
    cache_dir = tmp_path / "cache"
    run = lambda: evaluate(
        tmp_path / "ref.npz", tmp_path / "samples.npz", random_weights, 4, cache_dir=cache_dir, split_size=5
    )

    run()
    expected_mu, expected_sigma = feature_statistics(extract_features(reference, extractor)["pool"])
    np.testing.assert_allclose(calls[0][0], expected_mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(calls[0][1], expected_sigma, rtol=1e-4, atol=1e-9)
    (cache,) = cache_dir.glob("ref.inception-*.npz")

    with np.load(cache) as cached:  # plant a recognisable mean: the second run must read it, not recompute
        planted = dict(cached) | {"mu": np.full(2048, 7.0)}
    np.savez(cache, **planted)
    calls.clear()
    run()
    np.testing.assert_array_equal(calls[0][0], np.full(2048, 7.0))


@pytest.mark.parametrize(
    ("arr_0", "match"),
    [
        (images(4).astype(np.float32), "uint8"),
        (images(4)[..., 0], r"\(N, H, W, 3\)"),
        (images(3), "needs more than 3"),
    ],
)
def test_evaluate_rejects_malformed_samples(tmp_path, random_weights, arr_0, match):
    np.savez(tmp_path / "ref.npz", arr_0=images(4))
    np.savez(tmp_path / "samples.npz", arr_0=arr_0)
    with pytest.raises(ValueError, match=match):
        evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz", random_weights)


def test_evaluate_cli_prints_the_table_and_writes_json(tmp_path, random_weights, capsys):
    from reglue.cli import main

    np.savez(tmp_path / "ref.npz", arr_0=images(12, seed=3), mu=np.zeros(2048), sigma=np.zeros((2048, 2048)),
             mu_s=np.zeros(2023), sigma_s=np.zeros((2023, 2023)))
    np.savez(tmp_path / "samples.npz", arr_0=images(20, seed=4))
    assert main(["evaluate", "--ref", str(tmp_path / "ref.npz"), "--samples", str(tmp_path / "samples.npz"),
                 "--inception", str(random_weights), "--batch-size", "10", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fid") and "recall" in out
    assert set(json.loads((tmp_path / "samples.metrics.json").read_text())) >= {"fid", "sfid", "precision"}


def test_evaluate_cli_without_weights_is_one_line(tmp_path, capsys):
    from reglue.cli import main

    np.savez(tmp_path / "s.npz", arr_0=images(2))
    code = main(["evaluate", "--ref", str(tmp_path / "s.npz"), "--samples", str(tmp_path / "s.npz"),
                 "--inception", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "weights-inception-2015-12-05" in err and len(err.splitlines()) == 1
