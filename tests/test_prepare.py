"""`reglue prepare`: layouts, bad files, resume byte for byte, real images, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from conftest import run_processes, shared_file
from reglue.cli import main
from reglue.data import store
from reglue.data.dataset import PreparedDataset
from reglue.data.images import adm_center_crop, load_image


def tiny_vae_dir(root: Path) -> Path:
    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    ).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory) -> Path:
    return tiny_vae_dir(tmp_path_factory.mktemp("vae"))


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def make_image_folder(root: Path) -> Path:
    """3 classes, mixed sizes and modes, plus a corrupt, a zero-byte, a tiny and a text file."""
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "eel").mkdir()
    noise(300, 200, seed=1).save(root / "cat" / "a.png")
    noise(257, 311, "L", seed=2).save(root / "cat" / "b.png")
    noise(517, 389, "RGBA", seed=3).save(root / "dog" / "c.png")
    noise(260, 260, "P", seed=4).save(root / "dog" / "d.png")
    noise(600, 256, seed=5).save(root / "eel" / "e.jpg", quality=90)
    Image.fromarray((np.arange(256 * 300).reshape(256, 300) % 65536).astype(np.uint16)).save(root / "eel" / "f.png")
    (root / "eel" / "corrupt.jpg").write_bytes((root / "eel" / "e.jpg").read_bytes()[:500])
    (root / "eel" / "empty.png").write_bytes(b"")
    noise(8, 8, seed=6).save(root / "cat" / "tiny.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def prepare(src, dst, vae, *extra) -> int:
    return main(["prepare", str(src), str(dst), "--vae", str(vae), "--shard-size", "3", "--quiet", *extra])


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_image_folder_end_to_end(tmp_path, vae_dir):
    src = make_image_folder(tmp_path / "src")
    assert prepare(src, tmp_path / "out", vae_dir) == 0
    manifest = store.read_manifest(tmp_path / "out")
    assert manifest["class_names"] == ["cat", "dog", "eel"] and manifest["num_classes"] == 3
    assert (manifest["num_images"], manifest["num_skipped"], manifest["num_ignored"]) == (6, 3, 1)
    assert [s["count"] for s in manifest["shards"]] == [2, 2, 2]  # 9 files in shards of 3, 3 skipped
    report = (tmp_path / "out" / "skipped.tsv").read_text().splitlines()
    reasons = dict(line.split("\t") for line in report[1:])
    assert set(reasons) == {"cat/tiny.png", "eel/corrupt.jpg", "eel/empty.png"}
    assert "too small" in reasons["cat/tiny.png"] and "zero-byte" in reasons["eel/empty.png"]
    data = PreparedDataset(tmp_path / "out", resolution=256, vae=str(vae_dir))
    labels = [int(data[i]["label"]) for i in range(len(data))]
    assert labels == [0, 0, 1, 1, 2, 2]
    item = data[2]
    assert item["images"].shape == (3, 256, 256) and item["images"].dtype == torch.uint8
    assert item["moments"].shape == (8, 32, 32) and bool((item["moments"][4:] > 0).all())
    expected = adm_center_crop(load_image(src / "dog" / "c.png"), 256)
    assert np.array_equal(item["images"].permute(1, 2, 0).numpy(), expected)


def test_zip_source_equals_folder(tmp_path, vae_dir):
    src = make_image_folder(tmp_path / "src")
    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(src.rglob("*")):
            handle.write(path, path.relative_to(src).as_posix())
    prepare(src, tmp_path / "a", vae_dir)
    prepare(archive, tmp_path / "b", vae_dir)
    for shard in ("shard-00000", "shard-00002"):
        for name in ("images.npy", "moments.npy", "labels.npy", "index.json"):
            a = (tmp_path / "a" / "shards" / shard / name).read_bytes()
            assert a == (tmp_path / "b" / "shards" / shard / name).read_bytes(), name


def test_flat_folder_is_unconditional(tmp_path, vae_dir):
    (tmp_path / "flat").mkdir()
    for i in range(3):
        noise(280, 256, seed=i).save(tmp_path / "flat" / f"img{i}.png")
    assert prepare(tmp_path / "flat", tmp_path / "out", vae_dir) == 0
    data = PreparedDataset(tmp_path / "out", fields=("moments",))
    assert data.num_classes == 0 and [int(data[i]["label"]) for i in range(3)] == [-1, -1, -1]


def test_crash_then_rerun_equals_clean_run_byte_for_byte(tmp_path, vae_dir, monkeypatch):
    src = make_image_folder(tmp_path / "src")
    prepare(src, tmp_path / "clean", vae_dir)

    real_write = store.write_shard
    written = []

    def crash_after_one(root, index, arrays, info):
        if written:
            raise KeyboardInterrupt  # stands for a kill mid-run
        real_write(root, index, arrays, info)
        written.append(index)

    monkeypatch.setattr(store, "write_shard", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "resumed", vae_dir)
    monkeypatch.setattr(store, "write_shard", real_write)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    stale = tmp_path / "resumed" / "shards" / ".shard-00001.tmp-999"
    stale.mkdir()  # a half-written shard left by a hard kill
    (stale / "images.npy").write_bytes(b"partial")
    first = (tmp_path / "resumed" / "shards" / "shard-00000" / "images.npy").stat().st_mtime_ns
    assert prepare(src, tmp_path / "resumed", vae_dir) == 0
    assert (tmp_path / "resumed" / "shards" / "shard-00000" / "images.npy").stat().st_mtime_ns == first
    assert tree_bytes(tmp_path / "resumed") == tree_bytes(tmp_path / "clean")


def test_kill_minus_nine_then_rerun_equals_clean_run(tmp_path, vae_dir):
    src = tmp_path / "src" / "only"
    src.mkdir(parents=True)
    for i in range(12):
        noise(300, 280, seed=i).save(src / f"{i:02d}.png")
    command = [sys.executable, "-m", "reglue", "prepare", str(tmp_path / "src"), str(tmp_path / "killed"),
               "--vae", str(vae_dir), "--shard-size", "1", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("shard-*"))) < 2 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()  # it really died mid-run
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clean = [*command[:5], str(tmp_path / "clean"), *command[6:]]  # same threads: same float kernels
    subprocess.run(clean, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert tree_bytes(tmp_path / "killed") == tree_bytes(tmp_path / "clean")


def test_real_images_follow_the_testdata_table(tmp_path, vae_dir):
    src = shared_file("testdata/real_images")
    assert prepare(src, tmp_path / "out", vae_dir, "--shard-size", "8") == 0
    manifest = store.read_manifest(tmp_path / "out")
    assert manifest["class_names"] == ["edge_cases", "grey", "photo", "texture"]
    skipped = dict(line.split("\t") for line in (tmp_path / "out" / "skipped.tsv").read_text().splitlines()[1:])
    assert set(skipped) == {f"edge_cases/{n}" for n in ("tiny_8x8.png", "truncated.jpg", "zero_bytes.png",
                                                         "not_an_image.jpg")}
    assert "too small" in skipped["edge_cases/tiny_8x8.png"]
    assert "zero-byte" in skipped["edge_cases/zero_bytes.png"]
    assert "not an image" in skipped["edge_cases/not_an_image.jpg"]
    assert "truncated" in skipped["edge_cases/truncated.jpg"]
    data = PreparedDataset(tmp_path / "out", fields=("images",))
    assert len(data) == 16 == manifest["num_images"]
    sources = [s for i in range(len(manifest["shards"])) for s in store.read_shard_info(tmp_path / "out", i)["sources"]]
    for index, relative in enumerate(sources):
        expected = adm_center_crop(load_image(src / relative), 256)
        assert np.array_equal(data[index]["images"].permute(1, 2, 0).numpy(), expected), relative
    sixteen = data[sources.index("edge_cases/sixteen_bit.png")]["images"].float()
    assert 50 < sixteen.mean() < 250  # the picture, neither white nor black


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_bad_input_one_line_errors_and_nothing_written(tmp_path, vae_dir, capsys):
    code, err = run_cli(capsys, "prepare", str(tmp_path / "missing"), str(tmp_path / "out"), "--vae", str(vae_dir))
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, "prepare", str(tmp_path / "empty"), str(tmp_path / "out"), "--vae", str(vae_dir))
    assert code == 2 and "holds no image files" in err
    src = make_image_folder(tmp_path / "src")
    code, err = run_cli(capsys, "prepare", str(src), str(tmp_path / "out"), "--vae", str(tmp_path / "novae"))
    assert code == 2 and "novae" in err
    assert not (tmp_path / "out").exists()
    assert prepare(src, tmp_path / "out", vae_dir) == 0
    before = tree_bytes(tmp_path / "out")
    code, err = run_cli(capsys, "prepare", str(src), str(tmp_path / "out"), "--vae", str(vae_dir),
                        "--shard-size", "3", "--resolution", "512")
    assert code == 2 and "resolution: was 256, now 512" in err
    assert tree_bytes(tmp_path / "out") == before


def test_mixed_layout_is_refused(tmp_path, vae_dir, capsys):
    src = make_image_folder(tmp_path / "src")
    noise(300, 300).save(src / "loose.png")
    code, err = run_cli(capsys, "prepare", str(src), str(tmp_path / "out"), "--vae", str(vae_dir))
    assert code == 2 and "mixes 1 images at its top level" in err


def test_reader_rejects_mismatched_requests(tmp_path, vae_dir):
    src = make_image_folder(tmp_path / "src")
    prepare(src, tmp_path / "out", vae_dir)
    with pytest.raises(ValueError, match="resolution 256 but training asks for 512"):
        PreparedDataset(tmp_path / "out", resolution=512)
    with pytest.raises(FileNotFoundError, match="cache-semantics"):
        PreparedDataset(tmp_path / "out", fields=("semantics",))
    with pytest.raises(FileNotFoundError, match="reglue prepare"):
        PreparedDataset(tmp_path / "nothing")
    data = PreparedDataset(tmp_path / "out")
    with pytest.raises(IndexError):
        data[len(data)]
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2)
    assert sum(len(batch["label"]) for batch in loader) == len(data)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["versions"]["reglue"]


def test_ranks_write_their_own_shards_and_match_one_process(tmp_path, vae_dir):
    from reglue.data.prepare import PrepareSettings, prepare_dataset
    from reglue.encoders.vae import VAE

    src = make_image_folder(tmp_path / "src")
    settings = PrepareSettings(source=str(src), vae=str(vae_dir), shard_size=2)
    vae = VAE(str(vae_dir))
    prepare_dataset(settings, tmp_path / "one", vae)
    other = prepare_dataset(settings, tmp_path / "two", vae, rank=1, world_size=2)
    assert other.shards == 2 and not (tmp_path / "two" / "manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "two" / "shards").iterdir()) == ["shard-00001", "shard-00003"]
    prepare_dataset(settings, tmp_path / "two", vae, rank=0, world_size=2)
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")


def test_two_processes_under_torchrun(tmp_path, vae_dir):
    src = make_image_folder(tmp_path / "src")
    common = ["prepare", str(src), "--vae", str(vae_dir), "--shard-size", "2", "--quiet"]
    run_processes([*common[:2], str(tmp_path / "ddp"), *common[2:]], processes=2, timeout=240)
    run_processes([*common[:2], str(tmp_path / "single"), *common[2:]], timeout=240)
    assert tree_bytes(tmp_path / "ddp") == tree_bytes(tmp_path / "single")


def test_rerun_over_a_changed_source_or_vae_precision_is_refused(tmp_path, vae_dir, capsys):
    src = make_image_folder(tmp_path / "src")
    assert prepare(src, tmp_path / "out", vae_dir) == 0
    noise(300, 300, seed=9).save(src / "cat" / "0new.png")
    code, err = run_cli(capsys, "prepare", str(src), str(tmp_path / "out"), "--vae", str(vae_dir), "--shard-size", "3")
    assert code == 2 and "source_files: was 9, now 10" in err
    (src / "cat" / "0new.png").unlink()
    code, err = run_cli(capsys, "prepare", str(src), str(tmp_path / "out"), "--vae", str(vae_dir), "--shard-size", "3",
                        "--precision", "bf16")
    assert code == 2 and "vae_dtype: was 'fp32', now 'bf16'" in err
    assert prepare(src.parent / "src/", tmp_path / "out", vae_dir) == 0  # same folder, other spelling


def test_zip_with_wrapping_folder_and_a_damaged_member(tmp_path, vae_dir):
    src = make_image_folder(tmp_path / "src")
    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(src.rglob("*")):
            handle.write(path, "train/" + path.relative_to(src).as_posix())
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as handle:
        info = handle.getinfo("train/cat/a.png")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + 100] ^= 0xFF  # corrupt a.png's stored bytes: its CRC check fails on read
    archive.write_bytes(bytes(data))
    assert prepare(archive, tmp_path / "out", vae_dir) == 0
    manifest = store.read_manifest(tmp_path / "out")
    assert manifest["class_names"] == ["cat", "dog", "eel"]
    skipped = (tmp_path / "out" / "skipped.tsv").read_text()
    assert "train/cat/a.png\t" in skipped and manifest["num_images"] == 5


def test_a_second_job_on_the_same_directory_is_refused(tmp_path, vae_dir, capsys):
    src = make_image_folder(tmp_path / "src")
    with store.lock_directory(tmp_path / "out"):
        code, err = run_cli(capsys, "prepare", str(src), str(tmp_path / "out"), "--vae", str(vae_dir))
    assert code == 2 and "in use by another reglue job" in err


def test_a_file_system_without_flock_is_refused_naming_the_fix(tmp_path, vae_dir, capsys, monkeypatch):
    import errno
    import fcntl

    def no_flock(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)  # as on Lustre mounted without -o flock
    src = make_image_folder(tmp_path / "src")
    code, err = run_cli(capsys, "prepare", str(src), str(tmp_path / "out"), "--vae", str(vae_dir))
    assert code == 2 and "does not support flock" in err and "-o flock" in err
    assert not (tmp_path / "out" / "shards").exists()  # nothing written
