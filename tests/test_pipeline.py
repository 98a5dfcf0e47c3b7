"""norm-stats → fit-pca / cache-semantics → reader, with tiny random encoders."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import run_processes
from reglue.cli import main
from reglue.data import store
from reglue.data.dataset import PreparedDataset
from reglue.encoders.norm_stats import NormStats
from reglue.encoders.semantics import VFMSpec, upsample_semantics
from reglue.models.compressor import PCAProjection, SemanticCompressor
from reglue.pipeline import build_semantic_encoder
from test_prepare import make_image_folder, prepare, tiny_vae_dir

TINY_VFM = ["--vfm-weights", "random", "--vfm-arch", "embed_dim=32,depth=4,num_heads=2", "--vfm-layers", "2,3"]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    src = make_image_folder(root / "src")
    assert prepare(src, root / "data", tiny_vae_dir(root / "vae")) == 0
    assert main(["norm-stats", str(root / "data"), "--quiet", "--micro-batch", "4", *TINY_VFM]) == 0
    return root / "data"


def test_norm_stats_record_the_vfm(dataset_dir):
    stats = NormStats.load(dataset_dir / "norm_stats.safetensors")
    assert stats.channels == 64  # 2 layers × 32
    spec = VFMSpec.from_json(stats.metadata["vfm"])
    assert spec == VFMSpec("dinov2_vitb14_reg", "random", (2, 3), {"embed_dim": 32, "depth": 4, "num_heads": 2})
    assert stats.metadata["num_images"] == "6"


def test_random_vfm_is_the_same_in_every_step_and_leaves_global_rng_alone(dataset_dir):
    spec = VFMSpec.from_json(NormStats.load(dataset_dir / "norm_stats.safetensors").metadata["vfm"])
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = spec.build(), spec.build()
    assert torch.equal(torch.rand(1), expected_next)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_missing_vfm_weights_is_a_clear_error(dataset_dir, capsys):
    assert main(["norm-stats", str(dataset_dir), "--quiet", "--out", str(dataset_dir / "x.safetensors")]) == 2
    assert "--vfm-weights" in capsys.readouterr().err
    assert not (dataset_dir / "x.safetensors").exists()


def test_fit_pca_then_cache_semantics_for_redi(dataset_dir, tmp_path):
    assert main(["fit-pca", str(dataset_dir), "--rank", "8", "--out", str(tmp_path / "pca.safetensors"),
                 "--quiet"]) == 0
    pca = PCAProjection.load(tmp_path / "pca.safetensors")
    assert pca.rank == 8 and pca.components.shape == (8, 64)
    assert bool((pca.explained_variance[:-1] >= pca.explained_variance[1:]).all())
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy, ignore=shutil.ignore_patterns("semantics*", "cls.npy", "repa.npy"))
    assert main(["cache-semantics", str(copy), "--pca", str(tmp_path / "pca.safetensors"), "--quiet"]) == 0
    data = PreparedDataset(copy, fields=("semantics", "cls"))
    assert data[0]["semantics"].shape == (8, 16, 16) and data[0]["cls"].shape == (32,)


def test_cache_semantics_waits_for_no_one_holding_the_datasets_lock(dataset_dir, tmp_path, capsys):
    """A prepare rerun (or verify --reindex) holds the lock; cache-semantics is refused, writing nothing."""
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy, ignore=shutil.ignore_patterns("semantics*", "cls.npy", "repa.npy"))
    before = sorted(p.name for p in copy.rglob("*"))
    with store.lock_directory(copy):
        assert main(["cache-semantics", str(copy), "--quiet"]) == 2
    assert "in use by another reglue job" in capsys.readouterr().err
    assert sorted(p.name for p in copy.rglob("*")) == before
    assert main(["cache-semantics", str(copy), "--quiet"]) == 0  # the lock was the only obstacle
    assert (copy / "shards" / "shard-00000" / "cls.npy").is_file()


def save_compressor(path, channels=(64, 16, 4)) -> SemanticCompressor:
    torch.manual_seed(0)
    compressor = SemanticCompressor(channels).eval()
    save_file(compressor.state_dict(), str(path))
    return compressor


def test_cache_semantics_equals_online_encoder_up_to_fp16(dataset_dir, tmp_path):
    compressor_file = tmp_path / "compressor.safetensors"
    save_compressor(compressor_file)
    assert main(["cache-semantics", str(dataset_dir), "--compressor", str(compressor_file), "--repa-targets",
                 "--quiet", "--micro-batch", "4"]) == 0
    data = PreparedDataset(dataset_dir, fields=("images", "semantics", "cls", "repa"))
    encoder, _ = build_semantic_encoder(dataset_dir / "norm_stats.safetensors", compressor=compressor_file)
    images = torch.stack([data[i]["images"] for i in range(len(data))])
    online = encoder(images)
    cached = {name: torch.stack([data[i][name] for i in range(len(data))]) for name in ("semantics", "cls", "repa")}
    assert cached["semantics"].shape == (6, 4, 16, 16) and cached["semantics"].dtype == torch.float16
    assert cached["repa"].shape == (6, 257, 32)
    for name in cached:
        assert torch.equal(cached[name], getattr(online, name).half()), name
    assert upsample_semantics(cached["semantics"].float(), 32).shape == (6, 4, 32, 32)
    info = json.loads((dataset_dir / "semantics.json").read_text())
    assert info["fields"] == ["semantics", "cls", "repa"]

    # rerun: nothing rewritten; other compressor: refused
    before = (dataset_dir / "shards" / "shard-00000" / "semantics.npy").stat().st_mtime_ns
    assert main(["cache-semantics", str(dataset_dir), "--compressor", str(compressor_file), "--repa-targets",
                 "--quiet"]) == 0
    assert (dataset_dir / "shards" / "shard-00000" / "semantics.npy").stat().st_mtime_ns == before
    other = tmp_path / "other.safetensors"
    save_compressor(other, (64, 8, 4))
    with pytest.raises(ValueError, match="compressor_sha256"):
        main_raise(["cache-semantics", str(dataset_dir), "--compressor", str(other), "--quiet"])


def main_raise(argv):
    """Run the CLI with REGLUE_DEBUG so the error propagates for matching."""
    os.environ["REGLUE_DEBUG"] = "1"
    try:
        return main(argv)
    finally:
        del os.environ["REGLUE_DEBUG"]


def test_cache_resumes_after_partial_run(dataset_dir, tmp_path):
    compressor_file = tmp_path / "compressor.safetensors"
    save_compressor(compressor_file)
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy, ignore=shutil.ignore_patterns("semantics*", "cls.npy", "repa.npy"))
    assert main(["cache-semantics", str(copy), "--compressor", str(compressor_file), "--quiet"]) == 0
    full = np.load(copy / "shards" / "shard-00001" / "semantics.npy")
    (copy / "shards" / "shard-00001" / "semantics.npy").unlink()  # as if killed before this file
    assert main(["cache-semantics", str(copy), "--compressor", str(compressor_file), "--quiet"]) == 0
    assert np.array_equal(np.load(copy / "shards" / "shard-00001" / "semantics.npy"), full)


def test_end_to_end_prepare_to_reader_through_the_cli(tmp_path):
    """prepare → norm-stats → train-compressor (1 epoch) → cache-semantics → reader."""
    src = make_image_folder(tmp_path / "src")
    data = tmp_path / "data"
    assert prepare(src, data, tiny_vae_dir(tmp_path / "vae")) == 0
    assert "eel/corrupt.jpg" in (data / "skipped.tsv").read_text()
    assert main(["norm-stats", str(data), "--quiet", "--micro-batch", "3", *TINY_VFM]) == 0
    assert main(["train-compressor", str(data), "--epochs", "1", "--global-batch", "4", "--val-fraction", "0.34",
                 "--quiet"]) == 0
    best = data / "compressor" / "compressor_best.safetensors"
    assert (data / "compressor" / "loss_curve.png").is_file()
    recorded = (data / "compressor" / "settings.yaml").read_text()  # the resolved settings, beside the weights
    assert "epochs: 1\n" in recorded and "global_batch: 4\n" in recorded and "val_fraction: 0.34\n" in recorded
    assert main(["cache-semantics", str(data), "--compressor", str(best), "--quiet"]) == 0
    reader = PreparedDataset(data, fields=("moments", "semantics", "cls"), resolution=256)
    loader = torch.utils.data.DataLoader(reader, batch_size=4, shuffle=True, num_workers=2)
    batch = next(iter(loader))
    assert batch["semantics"].shape == (4, 16, 16, 16) and batch["cls"].shape == (4, 32)
    assert batch["moments"].shape == (4, 8, 32, 32) and batch["label"].dtype == torch.int64


def test_reader_refuses_semantics_cached_with_another_vfm(dataset_dir, tmp_path):
    compressor_file = tmp_path / "compressor.safetensors"
    save_compressor(compressor_file)
    assert main(["cache-semantics", str(dataset_dir), "--compressor", str(compressor_file), "--repa-targets",
                 "--quiet"]) == 0
    recorded = VFMSpec.from_json(NormStats.load(dataset_dir / "norm_stats.safetensors").metadata["vfm"])
    assert len(PreparedDataset(dataset_dir, fields=("semantics",), vfm=recorded.to_json())) == 6
    other = VFMSpec("dinov2_vitb14_reg", "weights/dinov2_vitb14_reg4_pretrain.pth")
    with pytest.raises(ValueError, match="re-run `reglue cache-semantics`"):
        PreparedDataset(dataset_dir, fields=("semantics",), vfm=other.to_json())


def test_vfm_weights_path_that_does_not_exist(dataset_dir, capsys, tmp_path):
    out = tmp_path / "stats.safetensors"
    code = main(["norm-stats", str(dataset_dir), "--quiet", "--out", str(out), "--vfm-weights",
                 str(tmp_path / "nope.pth")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nope.pth" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_unfinished_cache_is_refused_by_the_reader(dataset_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy, ignore=shutil.ignore_patterns("semantics*", "cls.npy", "repa.npy"))
    compressor_file = tmp_path / "compressor.safetensors"
    save_compressor(compressor_file)
    assert main(["cache-semantics", str(copy), "--compressor", str(compressor_file), "--quiet"]) == 0
    info = json.loads((copy / "semantics.json").read_text())
    assert info["complete"] is True
    (copy / "semantics.json").write_text(json.dumps(dict(info, complete=False)))  # as if killed mid-run
    with pytest.raises(FileNotFoundError, match="unfinished semantic cache"):
        PreparedDataset(copy, fields=("semantics",))
    with pytest.raises(FileNotFoundError, match="--repa-targets"):
        PreparedDataset(copy, fields=("repa",))


@pytest.mark.parametrize("args,needle", [
    (["--vfm-weights", "{tmp}/garbage.pth"], "not a readable VFM weights file"),
    (["--vfm-weights", "random", "--vfm-arch", "foo=1"], "unknown VFM architecture key"),
])
def test_bad_vfm_options_are_one_line_errors(dataset_dir, tmp_path, capsys, args, needle):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    args = [a.format(tmp=tmp_path) for a in args]
    code = main(["norm-stats", str(dataset_dir), "--quiet", "--out", str(tmp_path / "s.safetensors"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1


def test_corrupt_compressor_file_is_a_one_line_error(dataset_dir, tmp_path, capsys):
    (tmp_path / "c.safetensors").write_bytes(b"\x00" * 16)
    code = main(["cache-semantics", str(dataset_dir), "--compressor", str(tmp_path / "c.safetensors"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a readable semantic compressor file" in err


def test_reader_with_distributed_sampler_and_workers(dataset_dir):
    from torch.utils.data import DataLoader, DistributedSampler

    data = PreparedDataset(dataset_dir, fields=("moments",))
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3)
        for batch in DataLoader(data, batch_size=2, sampler=sampler, num_workers=2):
            seen += batch["moments"][:, 0, 0, 0].tolist()
    expected = [data[i]["moments"][0, 0, 0].item() for i in range(len(data))]
    assert sorted(seen) == sorted(expected)


def test_cache_semantics_and_compressor_training_under_torchrun(dataset_dir, tmp_path):
    compressor_file = tmp_path / "compressor.safetensors"
    save_compressor(compressor_file)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    for copy in (single, ddp):
        shutil.copytree(dataset_dir, copy, ignore=shutil.ignore_patterns("semantics*", "cls.npy", "repa.npy"))
    cache = ["cache-semantics", "--compressor", str(compressor_file), "--quiet"]
    run_processes([cache[0], str(ddp), *cache[1:]], processes=2, timeout=240)
    assert main([cache[0], str(single), *cache[1:]]) == 0
    for shard in ("shard-00000", "shard-00001", "shard-00002"):
        a = np.load(single / "shards" / shard / "semantics.npy")
        assert np.array_equal(a, np.load(ddp / "shards" / shard / "semantics.npy"))
    train = ["train-compressor", str(ddp), "--epochs", "1", "--global-batch", "4", "--quiet"]
    run_processes(train, processes=2, timeout=240)
    history = json.loads((ddp / "compressor" / "history.json").read_text())
    assert history["num_processes"] == 2 and history["finished"]
