"""Damaged prepared datasets and moved files: each fault found, named with its remedy, and repaired
by a rerun of the command that wrote it (docs/data-format.md, "Integrity")."""

from __future__ import annotations

import builtins
import collections
import io
import json
import logging
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import run_processes
from reglue.cli import main, parse_args
from reglue.data import store
from reglue.data.dataset import PreparedDataset
from reglue.data.integrity import verify_dataset
from reglue.data.records import open_records
from reglue.encoders.norm_stats import NormStats
from reglue.errors import DamagedFileError
from reglue.models.compressor import SemanticCompressor
from reglue.models.sit import SiT
from test_prepare import noise, tree_bytes

TINY_VFM = ["--vfm-weights", "random", "--vfm-arch", "embed_dim=32,depth=4,num_heads=2", "--vfm-layers", "2,3"]
PREPARE = ["--vae", "pixel", "--resolution", "64", "--shard-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A 64² source of 2 classes × 3 images, prepared into 3 shards of 2 (pixel autoencoder), and a copy
    with norm stats of a tiny random DINOv2 and cached semantics + CLS (a (64, 16, 4) compressor)."""
    root = tmp_path_factory.mktemp("integrity")
    for index in range(6):
        (root / "src" / f"c{index % 2}").mkdir(parents=True, exist_ok=True)
        noise(80, 72, seed=index).save(root / "src" / f"c{index % 2}" / f"{index}.png")
    assert main(["prepare", str(root / "src"), str(root / "data"), *PREPARE]) == 0
    shutil.copytree(root / "data", root / "cached")
    assert main(["norm-stats", str(root / "cached"), "--quiet", "--micro-batch", "6", *TINY_VFM]) == 0
    torch.manual_seed(0)
    save_file(SemanticCompressor((64, 16, 4)).state_dict(), str(root / "compressor.safetensors"))
    assert main(["cache-semantics", str(root / "cached"), "--compressor", str(root / "compressor.safetensors"),
                 "--quiet"]) == 0
    return {"root": root, "src": root / "src", "data": root / "data", "cached": root / "cached",
            "compressor": root / "compressor.safetensors"}


def copy(made: dict, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made[name], tmp_path / name))


def shard_file(data: Path, index: int, name: str) -> Path:
    return store.shard_dir(data, index) / name


def verify_cli(capsys, data: Path, *extra: str) -> tuple[int, list[str]]:
    code = main(["verify", str(data), "--quiet", *extra])
    return code, capsys.readouterr().out.strip().splitlines()


def prepare_again(made: dict, data: Path) -> int:
    return main(["prepare", str(made["src"]), str(data), *PREPARE])


def truncate_and_open(data: Path, path: Path, fields: tuple[str, ...]) -> tuple[int, str]:
    """Halve ``path``; its former size and the DamagedFileError message of opening ``data``."""
    size = path.stat().st_size
    os.truncate(path, size // 2)
    with pytest.raises(DamagedFileError) as refused:
        PreparedDataset(data, fields=fields)
    return size, str(refused.value)


def flip_byte(path: Path, at: int, mask: int) -> None:
    """XOR the byte at ``at`` of ``path`` with ``mask``: same size, other contents."""
    raw = bytearray(path.read_bytes())
    raw[at] ^= mask
    path.write_bytes(raw)


def files_state(data: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every shard file: unchanged means not rewritten."""
    return {str(p.relative_to(data)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in data.glob("shards/*/*")}


def record_reads(monkeypatch, root: Path) -> collections.Counter:
    """From here on, how often each JSON record of the dataset at ``root`` (manifest, shard indexes, settings,
    semantics record) is opened for reading, by path relative to ``root``: ``open``, ``Path.read_text`` and
    ``Path.open`` all go through ``io.open``."""
    reads, real_open, root = collections.Counter(), io.open, Path(root).resolve()

    def counting(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and "r" in mode and str(file).endswith(".json"):
            path = Path(os.fspath(file)).resolve()
            if path.is_relative_to(root):
                reads[str(path.relative_to(root))] += 1
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting)
    monkeypatch.setattr(builtins, "open", counting)
    return reads


def each_record_once(data: Path) -> dict[str, int]:
    """Every JSON record of ``data`` opened once: what opening it once reads."""
    return {str(path.relative_to(data)): 1 for path in [*data.glob("*.json"), *data.glob("shards/*/index.json")]}


# ----------------------------------------------------------------------------- the faults
def test_a_fresh_dataset_verifies_and_its_records_match_the_files(made, capsys):
    code, lines = verify_cli(capsys, made["cached"])
    assert code == 0 and len(lines) == 1
    assert lines[0].startswith("checked 15 files (") and "in 3 shards" in lines[0] and "GB/s): all intact" in lines[0]
    info = json.loads(shard_file(made["cached"], 0, "index.json").read_text())
    assert sorted(info["files"]) == ["cls.npy", "images.npy", "labels.npy", "moments.npy", "semantics.npy"]
    assert info["files"]["images.npy"]["bytes"] == shard_file(made["cached"], 0, "images.npy").stat().st_size


def test_a_truncated_file_is_refused_at_open_and_a_rerun_repairs_exactly_its_shard(made, tmp_path):
    data = copy(made, "data", tmp_path)
    before, kept = tree_bytes(data), files_state(data)
    images = shard_file(data, 1, "images.npy")
    size, message = truncate_and_open(data, images, ("images",))
    assert f"{images}: {size // 2:,} bytes, expected {size:,} (truncated)" in message
    assert f"rerun `reglue prepare {made['src']} {data} --resolution 64 --vae pixel" in message
    assert "--shard-size 2" in message and "keeps intact shards and redoes damaged ones" in message
    remedy = shlex.split(re.search(r"rerun `reglue ([^`]*)`", message).group(1))
    assert parse_args(remedy).precision == "fp32"  # today's command line takes it as written
    assert prepare_again(made, data) == 0
    assert tree_bytes(data) == before  # the shard is back, byte for byte
    after = files_state(data)
    assert all(after[name] == kept[name] for name in kept if "shard-00001" not in name)  # the others untouched
    assert all(after[name] != kept[name] for name in kept if "shard-00001" in name)


def test_a_flipped_byte_passes_the_size_check_but_not_verify_and_a_rerun_repairs_it(made, tmp_path, capsys):
    data = copy(made, "data", tmp_path)
    before, kept = tree_bytes(data), files_state(data)
    moments = shard_file(data, 2, "moments.npy")
    flip_byte(moments, -100, 0x01)
    assert len(PreparedDataset(data)) == 6  # sizes only at open: the damage is not seen there
    code, lines = verify_cli(capsys, data)
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith(f"{moments}: its checksum differs from the record: bytes changed in place; "
                               f"rerun `reglue prepare {made['src']} {data} ")
    assert lines[1].endswith(": 1 damaged")
    assert prepare_again(made, data) == 0
    assert tree_bytes(data) == before
    after = files_state(data)
    assert all(after[name] == kept[name] for name in kept if "shard-00002" not in name)
    assert verify_cli(capsys, data)[0] == 0


def test_a_missing_file_is_refused_at_open_and_listed_by_verify(made, tmp_path, capsys):
    data = copy(made, "data", tmp_path)
    labels = shard_file(data, 0, "labels.npy")
    size = labels.stat().st_size
    labels.unlink()
    with pytest.raises(DamagedFileError, match=f"{labels}: missing \\(index.json records {size} bytes\\); rerun "):
        PreparedDataset(data, fields=("moments",))
    index = shard_file(data, 2, "index.json")
    index.unlink()
    code, lines = verify_cli(capsys, data)
    assert code == 1 and lines[0].startswith(f"{labels}: missing") and "reglue prepare" in lines[0]
    assert lines[1].startswith(f"{index}: missing; rerun `reglue prepare")
    assert prepare_again(made, data) == 0 and tree_bytes(data) == tree_bytes(made["data"])


def test_an_extra_unknown_file_and_a_leftover_are_listed_by_verify(made, tmp_path, capsys):
    data = copy(made, "data", tmp_path)
    (store.shard_dir(data, 1) / "images (copy).npy").write_bytes(b"x")
    (data / "shards" / ".shard-00002.tmp-4242").mkdir()
    assert len(PreparedDataset(data)) == 6  # harmless to a reader
    code, lines = verify_cli(capsys, data)
    assert code == 1
    assert lines[0] == (f"{store.shard_dir(data, 1) / 'images (copy).npy'}: not a file reglue writes; reglue did not "
                        "write it: delete it, or move it out of the dataset")
    assert lines[1].startswith(f"{data / 'shards' / '.shard-00002.tmp-4242'}: a temporary file of an interrupted run; "
                               "delete it")


def test_a_shard_index_that_does_not_parse_or_was_edited_is_named(made, tmp_path, capsys):
    data = copy(made, "data", tmp_path)
    index = shard_file(data, 0, "index.json")
    index.write_text(index.read_text()[:40])
    with pytest.raises(DamagedFileError, match=f"{index}: does not parse as a shard index .*; rerun `reglue prepare"):
        PreparedDataset(data)
    edited = shard_file(data, 2, "index.json")
    info = json.loads(edited.read_text())
    edited.write_text(json.dumps(dict(info, sources=info["sources"][:1]), indent=1, sort_keys=True))
    code, lines = verify_cli(capsys, data)
    assert code == 1 and lines[0].startswith(f"{index}: does not parse")
    assert lines[1].startswith(f"{edited}: its entries do not match its checksum (index_blake2b): edited or damaged")
    assert prepare_again(made, data) == 0 and tree_bytes(data) == tree_bytes(made["data"])


def test_a_damaged_manifest_or_settings_file_is_named(made, tmp_path, capsys):
    data = copy(made, "data", tmp_path)
    (data / "settings.json").write_text("{")
    code, lines = verify_cli(capsys, data)
    assert code == 1 and lines[0].startswith(f"{data / 'settings.json'}: does not parse as JSON")
    (data / "manifest.json").write_text('{"format": "reglue-da')
    with pytest.raises(DamagedFileError, match="manifest.json does not parse as JSON .*; rerun `reglue prepare SRC"):
        PreparedDataset(data)


# ----------------------------------------------------------------------------- the semantic cache
def test_a_truncated_cache_file_names_cache_semantics_and_a_rerun_repairs_only_its_shard(made, tmp_path):
    data = copy(made, "cached", tmp_path)
    before, kept = tree_bytes(data), files_state(data)
    semantics = shard_file(data, 1, "semantics.npy")
    size, message = truncate_and_open(data, semantics, ("moments", "semantics", "cls"))
    assert f"{semantics}: {size // 2:,} bytes, expected {size:,} (truncated); rerun `reglue cache-semantics {data} --compressor " \
           f"{made['compressor']} --norm-stats " in message
    command = ["cache-semantics", str(data), "--compressor", str(made["compressor"]), "--quiet"]
    assert main(command) == 0
    changed = {name for name, state in files_state(data).items() if state != kept[name]}
    assert changed == {"shards/shard-00001/semantics.npy", "shards/shard-00001/cls.npy", "shards/shard-00001/index.json"}
    assert {k: v for k, v in tree_bytes(data).items() if k != "semantics.json"} == \
           {k: v for k, v in before.items() if k != "semantics.json"}


def test_cache_semantics_refuses_to_cache_from_damaged_images(made, tmp_path, capsys):
    data = copy(made, "cached", tmp_path)
    shard_file(data, 0, "cls.npy").unlink()
    images = shard_file(data, 0, "images.npy")
    flip_byte(images, 500, 0xFF)
    code = main(["cache-semantics", str(data), "--compressor", str(made["compressor"]), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{images}: its checksum differs from the record" in err
    assert "the semantics are computed from it, so first rerun `reglue prepare" in err


def test_a_garbled_semantics_record_is_named(made, tmp_path):
    data = copy(made, "cached", tmp_path)
    (data / "semantics.json").write_bytes(b"\x00\x01")
    with pytest.raises(DamagedFileError, match="semantics.json does not parse as JSON .* copy it again"):
        PreparedDataset(data, fields=("semantics",))


# ----------------------------------------------------------------------------- files users move
def test_a_compressor_file_of_the_wrong_shape_truncated_or_mismatched_is_named(made, tmp_path, capsys):
    data = copy(made, "cached", tmp_path)

    def cache_with(path: Path) -> str:
        assert main(["cache-semantics", str(data), "--compressor", str(path), "--quiet"]) == 2
        return " ".join(capsys.readouterr().err.split())

    wide = tmp_path / "wide.safetensors"  # made for a VFM of 128 channels; this one gives 2 blocks × 32
    save_file(SemanticCompressor((128, 16, 4)).state_dict(), str(wide))
    assert (f"{wide} maps 128 VFM channels to 4, but the VFM gives 64 (2 blocks × 32): it was made for another VFM "
            "or other layers; pass the one made for this VFM, or train one with `reglue train-compressor DATA`"
            ) in cache_with(wide)
    odd = tmp_path / "odd.safetensors"
    state = SemanticCompressor((64, 16, 4)).state_dict()
    state["encoder.model.1.bn1.running_mean"] = torch.zeros(15)
    save_file(state, str(odd))
    err = cache_with(odd)
    assert f"semantic compressor {odd} does not fit the model: 1 shape mismatch(es)" in err
    assert "Train it again with `reglue train-compressor DATA --restart`, or copy it again" in err
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(made["compressor"].read_bytes()[:-1000])
    err = cache_with(cut)
    assert f"{cut} is not a readable semantic compressor file: " in err and "bytes, expected" in err
    assert "(truncated); train it again with `reglue train-compressor DATA --restart`" in err


def test_verify_names_damaged_files_beside_the_shards(made, tmp_path, capsys):
    data = copy(made, "cached", tmp_path)
    stats = data / "norm_stats.safetensors"
    stats.write_bytes(stats.read_bytes() + b"\x00" * 8)
    code, lines = verify_cli(capsys, data)
    assert code == 1 and lines[0].startswith(f"{stats}: ") and "(longer than written); compute it again with " \
        f"`reglue norm-stats {data} --vfm-weights" in lines[0]


def test_norm_stats_truncated_or_of_the_wrong_shape_are_named(made, tmp_path):
    stats = made["cached"] / "norm_stats.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(stats.read_bytes()[:-10])
    with pytest.raises(DamagedFileError, match=f"{cut} is not a readable norm-stats file: .*bytes, expected .*"
                                               r"\(truncated\); compute it again with `reglue norm-stats DATA"):
        NormStats.load(cut)
    uneven = tmp_path / "uneven.safetensors"
    save_file({"mean": torch.zeros(64), "std": torch.ones(63)}, str(uneven))
    with pytest.raises(ValueError, match=f"{uneven}: mean \\(64,\\) and std \\(63,\\) differ in size; compute it "):
        NormStats.load(uneven)


def test_an_exported_model_truncated_or_mismatched_is_named(tmp_path):
    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=4,
                use_cls_token=False, projector_dim=16, z_dim=16, encoder_depth=1)
    model.save_pretrained(tmp_path / "ema")
    weights, config = tmp_path / "ema" / "model.safetensors", tmp_path / "ema" / "config.json"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(DamagedFileError, match=f"{weights} is not a readable SiT weights file: .*truncated.*copy "
                                               "config.json and model.safetensors again, together"):
        SiT.from_pretrained(tmp_path / "ema")
    model.save_pretrained(tmp_path / "ema")
    config.write_text(config.read_text().replace('"depth": 2', '"depth": 3'))
    with pytest.raises(ValueError, match=f"{weights} does not fit the model:(.|\\n)*Its config.json describes another "
                                         "model: copy config.json and model.safetensors again"):
        SiT.from_pretrained(tmp_path / "ema")
    config.write_text("{")
    with pytest.raises(DamagedFileError, match=f"{config} does not parse as JSON"):
        SiT.from_pretrained(tmp_path / "ema")


# ----------------------------------------------------------------------------- old datasets, training
def strip_records(data: Path) -> None:
    """The dataset as an older reglue indexed it: no file records, no index checksum."""
    for path in data.glob("shards/*/index.json"):
        info = json.loads(path.read_text())
        path.write_text(json.dumps({k: info[k] for k in ("sources", "skipped")}, indent=1, sort_keys=True) + "\n")


def test_a_dataset_indexed_without_checksums_keeps_working_and_reindex_records_them(made, tmp_path, capsys, caplog):
    data = copy(made, "cached", tmp_path)
    strip_records(data)
    with caplog.at_level(logging.INFO, logger="reglue.data.integrity"):
        assert len(PreparedDataset(data, fields=("moments", "semantics"))) == 6
    notice = (f"{data}: 3 of 3 shards were indexed without checksums (by an older reglue): their files are checked "
              f"by size only until `reglue verify --reindex {data}` records them")
    assert [r.getMessage() for r in caplog.records] == [notice]  # one line, not one per shard
    cls = shard_file(data, 2, "cls.npy")
    size = cls.stat().st_size
    os.truncate(cls, size - 2)  # the .npy header's promise is the size check
    with pytest.raises(DamagedFileError, match=f"{cls}: {size - 2} bytes, expected {size} \\(truncated\\)"):
        PreparedDataset(data, fields=("cls",))
    code, lines = verify_cli(capsys, data, "--reindex")
    assert code == 1 and lines[0].startswith(f"{cls}: {size - 2} bytes") and "1 of 3 shards were indexed without" in lines[1]
    shutil.copy(shard_file(made["cached"], 2, "cls.npy"), cls)
    code, lines = verify_cli(capsys, data, "--reindex")
    assert code == 0 and lines[-1].endswith("all intact; recorded checksums of 1 shard(s)")
    assert tree_bytes(data) == tree_bytes(made["cached"])  # the records equal those taken while writing


def test_data_verify_checks_every_checksum_before_training(made, tmp_path):
    from reglue.training.inputs import verify_training_data

    data = copy(made, "data", tmp_path)
    verify_training_data(open_records(data))
    images = shard_file(data, 0, "images.npy")
    flip_byte(images, 200, 0x10)
    with pytest.raises(DamagedFileError, match=f"data.verify found 1 damaged file\\(s\\) in {data}: {images}: its "
                                               "checksum differs"):
        verify_training_data(open_records(data))


def test_verify_reads_the_manifest_and_each_index_once(made, monkeypatch, capsys):
    reads = record_reads(monkeypatch, made["cached"])
    code, _ = verify_cli(capsys, made["cached"])
    assert code == 0
    assert dict(reads) == each_record_once(made["cached"])
    assert set(reads) == {"manifest.json", "settings.json", "semantics.json", *(f"shards/{store.shard_name(i)}/index.json"
                                                                                 for i in range(3))}


def test_verify_report_counts_bytes_and_throughput(made):
    report = verify_dataset(made["data"], workers=2)
    sizes = sum(p.stat().st_size for p in made["data"].glob("shards/*/*.npy"))
    assert report.ok and report.files == 9 and report.bytes == sizes and report.gb_per_s > 0


def test_prepare_under_torchrun_repairs_the_damaged_shards_of_each_rank(made, tmp_path):
    data = copy(made, "data", tmp_path)
    kept = files_state(data)
    for index in (0, 1):  # rank 0 writes shards 0 and 2, rank 1 shard 1
        images = shard_file(data, index, "images.npy")
        flip_byte(images, -1, 0xFF)
    run_processes(["prepare", str(made["src"]), str(data), *PREPARE], processes=2, timeout=240)
    assert tree_bytes(data) == tree_bytes(made["data"])
    after = files_state(data)
    assert all(after[name] == kept[name] for name in kept if "shard-00002" in name)
    assert np.array_equal(np.load(shard_file(data, 1, "images.npy")), np.load(shard_file(made["data"], 1, "images.npy")))
