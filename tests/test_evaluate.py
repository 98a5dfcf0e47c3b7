"""The Inception feature extractor (random weights, same architecture) and `evaluate` end to end on tiny .npz files."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from reglue.encoders.semantics import VFMSpec
from reglue.metrics import (
    INCEPTION_WEIGHTS_FILE,
    evaluate,
    extract_features,
    feature_statistics,
    format_table,
    frechet_distance,
    load_inception,
    write_results,
)
from reglue.metrics.feature_space import FeatureSpace, load_feature_space
from test_feature_space import save_tiny_dinov2

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
    reference = images(8, seed=2)  # precision/recall compare the 8 samples with 8 reference images
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
        tmp_path / "ref.npz", tmp_path / "samples.npz", inception_weights=random_weights, batch_size=4, split_size=2
    )
    assert results["fid"] == pytest.approx(2048 + np.trace(sigma), rel=1e-6)
    assert results["sfid"] == pytest.approx(2023 + np.trace(sigma_s), rel=1e-6)
    assert set(results) == {"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall",
                            "networks"}
    assert results["networks"]["inception"]["weights"] == str(random_weights)
    assert len(results["networks"]["inception"]["weights_fingerprint"]) == 16
    assert 0.0 <= results["precision"] <= 1.0 and 0.0 <= results["recall"] <= 1.0
    write_results(results, tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text()) == results
    table = format_table(results)
    assert table.splitlines()[0].startswith("fid") and "precision" in table
    assert table.splitlines()[-1].startswith("# inception: ") and "fingerprint " in table


def test_evaluate_computes_and_caches_reference_statistics(tmp_path, random_weights, extractor, monkeypatch):
    calls = []  # the real sqrtm of 2048² low-rank products takes a minute; record the arguments instead
    monkeypatch.setattr(evaluate_module, "frechet_distance", lambda *stats: calls.append(stats) or 0.0)
    reference = images(6, seed=3)
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    np.savez(tmp_path / "samples.npz", arr_0=images(5, seed=4))
    cache_dir = tmp_path / "cache"
    run = lambda: evaluate(
        tmp_path / "ref.npz", tmp_path / "samples.npz", inception_weights=random_weights, batch_size=4,
        cache_dir=cache_dir, split_size=5,
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
        evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz", inception_weights=random_weights)


def test_evaluate_cli_prints_the_table_and_writes_json(tmp_path, random_weights, capsys):
    from reglue.cli import main

    np.savez(tmp_path / "ref.npz", arr_0=images(20, seed=3), mu=np.zeros(2048), sigma=np.zeros((2048, 2048)),
             mu_s=np.zeros(2023), sigma_s=np.zeros((2023, 2023)))
    np.savez(tmp_path / "samples.npz", arr_0=images(20, seed=4))
    assert main(["evaluate", "--ref", str(tmp_path / "ref.npz"), "--samples", str(tmp_path / "samples.npz"),
                 "--inception", str(random_weights), "--micro-batch", "10", "--quiet"]) == 0
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


# --------------------------------------------------------------------------------------
# FD_DINOv2 and precision/recall in a VFM's space (tiny DINOv2 ViT-L/14 stand-ins, no Inception)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vfm(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "dinov2_vitl14_tiny.pth")


def tiny_vfm_args(spec) -> list[str]:
    return ["--vfm-weights", spec.weights, "--vfm-arch", "embed_dim=32,depth=4,num_heads=2"]


def test_evaluate_cli_fd_dinov2_needs_no_inception_and_names_the_network(tmp_path, tiny_vfm, capsys):
    from reglue.cli import main

    np.savez(tmp_path / "ref.npz", arr_0=images(12, size=40, seed=3))
    np.savez(tmp_path / "samples.npz", arr_0=images(10, size=40, seed=4))
    assert main(["evaluate", "--ref", str(tmp_path / "ref.npz"), "--samples", str(tmp_path / "samples.npz"),
                 "--metrics", "fd_dinov2,pr_dinov2", *tiny_vfm_args(tiny_vfm), "--micro-batch", "4", "--quiet"]) == 0
    results = json.loads((tmp_path / "samples.metrics.json").read_text())
    assert set(results) == {"fd_dinov2", "precision_dinov2", "recall_dinov2", "networks"}
    space = load_feature_space(tiny_vfm)
    expected = feature_statistics(space.features(images(12, size=40, seed=3)))
    got = feature_statistics(space.features(images(10, size=40, seed=4)))
    assert results["fd_dinov2"] == pytest.approx(frechet_distance(*expected, *got), rel=1e-6)
    assert results["fd_dinov2"] > 0 and 0 <= results["recall_dinov2"] <= 1
    info = results["networks"]["dinov2"]
    assert info["network"] == "dinov2_vitl14" and info["weights_fingerprint"] == space.fingerprint
    assert info["weights"] == tiny_vfm.weights and "inception" not in results["networks"]
    out = capsys.readouterr().out
    assert out.startswith("fd_dinov2") and f"# dinov2: dinov2_vitl14, weights {tiny_vfm.weights}" in out
    assert f"fingerprint {space.fingerprint}" in out


def test_evaluate_default_metrics_follow_the_weights_given(tmp_path, tiny_vfm):
    np.savez(tmp_path / "ref.npz", arr_0=images(6, seed=3))
    np.savez(tmp_path / "samples.npz", arr_0=images(5, seed=4))
    results = evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz", vfm=tiny_vfm, batch_size=4)
    assert set(results) == {"fd_dinov2", "networks"}  # no Inception weights: FD_DINOv2 alone
    with pytest.raises(ValueError, match="nothing to evaluate.*--inception.*--vfm-weights"):
        evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz")


def test_evaluate_other_network_is_fd_of_its_name(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=images(6, seed=3))
    np.savez(tmp_path / "samples.npz", arr_0=images(5, seed=4))
    spec = VFMSpec("dinov2_vitb14_reg", weights="random", arch={"embed_dim": 32, "depth": 2, "num_heads": 2})
    results = evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz", vfm=spec, batch_size=4,
                       metrics=["fd_dinov2_vitb14_reg"])
    assert set(results) == {"fd_dinov2_vitb14_reg", "networks"}
    assert results["networks"]["dinov2_vitb14_reg"]["random_weights"] is True
    with pytest.raises(ValueError, match=r"unknown metric\(s\) 'fd_dinov2'; .*fd_dinov2_vitb14_reg, pr_dinov2_vitb14_reg"):
        evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz", vfm=spec, metrics=["fd_dinov2"])


def test_reference_statistics_in_a_space_are_cached_per_network_fingerprint(tmp_path, tiny_vfm, monkeypatch):
    np.savez(tmp_path / "ref.npz", arr_0=images(6, seed=3))
    np.savez(tmp_path / "samples.npz", arr_0=images(5, seed=4))
    cache_dir = tmp_path / "cache"
    calls = []
    monkeypatch.setattr(evaluate_module, "frechet_distance", lambda *stats: calls.append(stats) or 0.0)
    run = lambda spec: evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz", metrics=["fd_dinov2"], vfm=spec,
                                batch_size=4, cache_dir=cache_dir)
    run(tiny_vfm)
    (cache,) = cache_dir.glob("ref.fd_dinov2-*.npz")
    with np.load(cache) as cached:
        assert str(cached["fingerprint"]) == run(tiny_vfm)["networks"]["dinov2"]["weights_fingerprint"]
        planted = dict(cached) | {"mu": np.full(32, 7.0)}
    np.savez(cache, **planted)

    extracted = []
    real_features = FeatureSpace.features
    monkeypatch.setattr(FeatureSpace, "features", lambda self, x, **kw: extracted.append(len(x)) or real_features(
        self, x, **kw))
    calls.clear()
    run(tiny_vfm)  # the same network: the planted statistics are read, only the samples go through it
    np.testing.assert_array_equal(calls[0][0], np.full(32, 7.0))
    assert extracted == [5]

    other = save_tiny_dinov2(tmp_path / "other.pth", seed=1)  # same name and shape, other weights
    calls.clear(), extracted.clear()
    run(other)
    assert not np.array_equal(calls[0][0], np.full(32, 7.0)) and extracted == [6, 5]
    assert len(list(cache_dir.glob("ref.fd_dinov2-*.npz"))) == 2

    renamed = next(p for p in cache_dir.glob("ref.fd_dinov2-*.npz") if p != cache)  # other's file under tiny's name
    renamed.replace(cache)
    calls.clear(), extracted.clear()
    run(tiny_vfm)  # the file records another fingerprint: refused and recomputed
    assert extracted == [6, 5]


@pytest.fixture
def no_features(monkeypatch):
    """Bad input must be refused before any image goes through a network."""
    def refuse(*args, **kwargs):
        raise AssertionError("features were computed before the input was checked")

    monkeypatch.setattr(FeatureSpace, "features", refuse)
    monkeypatch.setattr(evaluate_module, "extract_features", refuse)


def test_evaluate_refuses_a_reference_of_another_resolution(tmp_path, tiny_vfm, random_weights, no_features):
    np.savez(tmp_path / "ref.npz", arr_0=images(8, size=64))
    np.savez(tmp_path / "samples.npz", arr_0=images(8, size=32))
    for kwargs in ({"vfm": tiny_vfm}, {"inception_weights": random_weights}):
        with pytest.raises(ValueError, match=r"holds 64×64 images but the samples .* are 32×32.*VIRTUAL_imagenet32"):
            evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz", **kwargs)


def test_evaluate_refuses_vfm_weights_of_another_shape(tmp_path, tiny_vfm, no_features):
    np.savez(tmp_path / "ref.npz", arr_0=images(6))
    np.savez(tmp_path / "samples.npz", arr_0=images(6))
    wrong = VFMSpec("dinov2_vitl14", weights=tiny_vfm.weights, arch={"embed_dim": 64, "depth": 4, "num_heads": 2})
    with pytest.raises(ValueError, match=r"(?s)do not fit the model:.*cls_token: expected \(1, 1, 64\), found \(1, 1, 32\)"):
        evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz", vfm=wrong)


def test_evaluate_refuses_too_small_a_reference_for_precision_recall(tmp_path, tiny_vfm, no_features):
    np.savez(tmp_path / "ref.npz", arr_0=images(6))
    np.savez(tmp_path / "samples.npz", arr_0=images(9))
    with pytest.raises(ValueError, match=r"holds 6 images, but precision/recall \(pr_dinov2\) compare the 9 samples "
                                         r"with min\(9, 10000\) = 9 reference images; use a reference with at least 9"):
        evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz", vfm=tiny_vfm, metrics=["fd_dinov2", "pr_dinov2"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--metrics", "fid,fd_dinov3"], "unknown metric(s) 'fd_dinov3'; choose from fid, sfid, is, pr, fd_dinov2, pr_dinov2"),
        (["--metrics", "fid"], "fid need the Inception-v3 weights: download weights-inception-2015-12-05-6726825d.pth"),
        (["--metrics", "fd_dinov2"], "FD_DINOv2 needs DINOv2 ViT-L/14 without registers, but no weights were given"),
        ([], "nothing to evaluate"),
    ],
)
def test_evaluate_cli_bad_requests_are_one_line_with_the_fix(tmp_path, capsys, argv, message):
    from reglue.cli import main

    np.savez(tmp_path / "s.npz", arr_0=images(4))
    code = main(["evaluate", "--ref", str(tmp_path / "s.npz"), "--samples", str(tmp_path / "s.npz"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
