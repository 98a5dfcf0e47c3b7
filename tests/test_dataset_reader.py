"""The training-time reader: batched reads equal the rows, in workers too, with no descriptor kept;
and the float16 the semantic cache stores."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

import reglue.io
from reglue.data import store
from reglue.data.cache import cache_semantics
from reglue.data.dataset import PreparedDataset, training_loader
from reglue.errors import DamagedFileError

FIELDS = ("images", "moments", "semantics", "cls", "repa")
COUNTS = (3, 1, 4, 2, 5, 3, 1, 2)  # rows per shard: uneven, so rows cross shard boundaries unevenly


def row_arrays(rng: np.random.Generator, count: int, side: int = 8) -> dict[str, np.ndarray]:
    """A shard's arrays at tiny shapes, each in the dtype reglue stores it in."""
    return {"images": rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8),
            "moments": rng.standard_normal((count, 8, side // 8 + 1, side // 8 + 1), dtype=np.float32),
            "labels": rng.integers(0, 10, count),
            "semantics": rng.standard_normal((count, 16, 2, 2)).astype(np.float16),
            "cls": rng.standard_normal((count, 12)).astype(np.float16),
            "repa": rng.standard_normal((count, 5, 12)).astype(np.float16)}


def write_dataset(root: Path, counts: tuple[int, ...], cached: bool = True) -> Path:
    """Shards of random rows with prepare's records, and a complete semantic cache when ``cached``."""
    rng = np.random.default_rng(0)
    for index, count in enumerate(counts):
        arrays = {k: v for k, v in row_arrays(rng, count).items() if cached or k in store.SHARD_ARRAYS}
        store.write_shard(root, index, arrays, {"sources": [f"{i}.png" for i in range(count)], "skipped": []})
    reglue.io.write_json(root / store.MANIFEST, {
        "format": store.FORMAT_NAME, "format_version": store.FORMAT_VERSION, "source": "random", "resolution": 64,
        "vae": "random", "num_images": sum(counts), "num_classes": 10, "class_names": [str(i) for i in range(10)],
        "shards": [{"name": store.shard_name(i), "count": c} for i, c in enumerate(counts)]})
    if cached:
        reglue.io.write_json(root / store.SEMANTICS_INFO, {"fields": list(store.CACHED_ARRAYS), "complete": True})
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("reader") / "data", COUNTS)


def expected_row(root: Path, dataset: PreparedDataset, index: int) -> dict[str, torch.Tensor]:
    """Row ``index`` straight from the .npy files (np.load), as the reader must return it."""
    shard, row = dataset.locate(index)
    item = {"label": torch.tensor(int(np.load(store.shard_dir(root, shard) / "labels.npy")[row]))}
    for name in FIELDS:
        value = torch.from_numpy(np.load(store.shard_dir(root, shard) / f"{name}.npy")[row])
        item[name] = value.permute(2, 0, 1) if name == "images" else value
    return item


def assert_same(found: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> None:
    """Same fields, each of the same dtype, shape, strides and values."""
    assert list(found) == list(wanted)
    for name, value in wanted.items():
        assert found[name].dtype == value.dtype and found[name].shape == value.shape, name
        assert found[name].stride() == value.stride() and torch.equal(found[name], value), name


BATCHES = [[20, 0, 7, 7, 3], [5, 4], [19, 11, 2, 8, 13, 1, 6, 14, 9, 10, 12, 15, 16, 17, 18]]  # repeats, any order


def test_rows_and_batches_are_the_files_rows(data):
    dataset = PreparedDataset(data, fields=FIELDS)
    assert len(dataset) == sum(COUNTS)
    for index in range(len(dataset)):
        wanted = expected_row(data, dataset, index)
        found = dataset[index]
        assert list(found) == list(wanted)
        assert all(found[k].dtype == v.dtype and torch.equal(found[k], v) for k, v in wanted.items())
    for rows in BATCHES:
        wanted = default_collate([expected_row(data, dataset, i) for i in rows])
        assert_same(dataset.read_batch(rows), wanted)  # exactly what stacking the rows gives, in the order asked
        assert_same(dataset.read_batch(rows), default_collate([dataset[i] for i in rows]))
    with pytest.raises(IndexError, match="out of range"):
        dataset.read_batch([0, len(dataset)])


class SharedInWorker(Dataset):
    """Whether each tensor of ``read_batch`` was allocated in shared memory, asked inside a worker, and
    how many blocks of memory the batch's tensors lie in."""

    def __init__(self, dataset: PreparedDataset):
        self.dataset = dataset

    def __getitem__(self, rows: list[int]) -> dict[str, bool]:
        batch = self.dataset.read_batch(rows)
        blocks = {value.untyped_storage().data_ptr() for value in batch.values()}
        return {name: value.is_shared() for name, value in batch.items()} | {"blocks": len(blocks)}


def test_training_loader_in_workers_matches_the_row_by_row_loader(data):
    dataset = PreparedDataset(data, fields=("moments", "semantics", "cls", "repa"))
    row_by_row = list(DataLoader(dataset, batch_sampler=BATCHES))
    for workers in (0, 2):
        batches = list(training_loader(dataset, iter(BATCHES), num_workers=workers, pin_memory=False))
        assert len(batches) == len(BATCHES)
        for found, wanted in zip(batches, row_by_row):
            assert_same(found, wanted)
    flags = DataLoader(SharedInWorker(dataset), sampler=[[0, 5]], batch_size=None, num_workers=1)
    assert next(iter(flags)) == {"label": True, "moments": True, "semantics": True, "cls": True, "repa": True,
                                 "blocks": 1}  # one block: handed over as one file descriptor
    assert not any(value.is_shared() for value in dataset.read_batch([0, 5]).values())  # the main process's own


def test_survives_pickling_and_keeps_no_file_descriptor(tmp_path):
    root = write_dataset(tmp_path / "many", (2,) * 40)  # 240 files: more than the 64 maps the reader once kept
    dataset = PreparedDataset(root, fields=FIELDS)
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("counting open file descriptors needs /proc")
    before = len(os.listdir(fd_dir))
    everything = dataset.read_batch(list(range(len(dataset)))[::-1])
    assert len(os.listdir(fd_dir)) == before  # every file was closed after its rows
    copy = pickle.loads(pickle.dumps(dataset))  # as DataLoader workers receive it
    assert copy._files == {} and len(dataset._files) == 40 * 6  # a worker parses the headers it needs itself
    assert_same(copy.read_batch(list(range(len(copy)))[::-1]), everything)
    assert_same(copy[7], {name: value[len(dataset) - 1 - 7] for name, value in everything.items()})


def test_a_shard_with_other_rows_is_named(tmp_path):
    root = write_dataset(tmp_path / "data", (2, 2))
    wrong = store.shard_dir(root, 1) / "cls.npy"
    np.save(wrong, np.zeros((2, 13), np.float16))  # the same size as the record, another row shape
    os.truncate(wrong, (store.shard_dir(root, 0) / "cls.npy").stat().st_size)
    dataset = PreparedDataset(root, fields=("cls",))
    dataset.read_batch([0, 1])
    with pytest.raises(DamagedFileError, match=r"shard-00001/cls\.npy holds 2 float16 rows of shape \(13,\).*"
                                               r"shape \(12,\).*rerun `reglue prepare"):
        dataset.read_batch([2])


class ConstantTargets:
    """A stand-in semantic encoder whose CLS targets are all ``value``."""

    compressor = None

    def __init__(self, value: float):
        self.value = value

    def __call__(self, images: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(cls=torch.full((len(images), 4), self.value))


@pytest.mark.parametrize("value,found", [(7e4, r"reach 7e\+04, beyond float16's ±65,504"),
                                         (float("nan"), r"are not finite \(NaN or inf\)")])
def test_cache_semantics_refuses_targets_float16_cannot_hold(tmp_path, value, found):
    root = write_dataset(tmp_path / "data", (2, 3), cached=False)
    with pytest.raises(ValueError, match=f"shard-00000: the cls targets {found}; the cache stores float16"):
        cache_semantics(root, ConstantTargets(value), {"vfm": "stand-in"})
    assert not (store.shard_dir(root, 0) / "cls.npy").exists()
    assert cache_semantics(root, ConstantTargets(65504.0), {"vfm": "stand-in"}) == 2  # float16's largest: kept
    assert PreparedDataset(root, fields=("cls",))[4]["cls"].tolist() == [65504.0] * 4


LOADER_LEFT_ALIVE = """
from torch.utils.data import DataLoader
from reglue.data.dataset import ignore_stop_signals
loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True,
                    worker_init_fn=ignore_stop_signals)
batches = iter(loader)
next(batches)
KEPT = [loader, batches]  # as the traceback of a run that raised keeps them
"""


def test_the_interpreter_exits_with_loader_workers_that_ignore_sigterm_still_alive():
    """multiprocessing ends daemonic children at exit with SIGTERM, which these workers ignore: without the
    exit handler that kills them first, a process whose run raised would wait for them forever."""
    done = subprocess.run([sys.executable, "-c", LOADER_LEFT_ALIVE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
