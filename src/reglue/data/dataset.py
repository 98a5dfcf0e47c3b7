"""Reading a prepared dataset at training time: random access, batched, worker-safe.

Training reads rows in random order from ImageNet's 1,282 shards, 4–5 arrays each. Rows are read
with ``os.preadv`` straight into the batch's tensors, each file opened for the reads of one batch
and closed at once, its ``.npy`` header parsed once per process. This replaced a cache of 64
``np.load(mmap_mode="r")`` maps per process, which in random order reopened (re-parsed and
re-mapped) files on almost every row, and whose maps each hold a file descriptor (Python's
``mmap`` keeps a duplicate), so keeping all 6,410 open would exceed the usual limit of 1,024 per
process. :func:`training_loader` hands whole batches from the workers in one block of shared memory
each: one copy from the page cache, none to hand the batch over. At ImageNet's shape this reads ≈ 8× the rows
per CPU second of the old reader in the main process and ≈ 4× in a worker (docs/benchmarks.md,
benchmarks/data_loading.py).
"""

from __future__ import annotations

import atexit
import bisect
import itertools
import json
import math
import multiprocessing.util  # its exit handler is registered before this module's (see _kill_workers_left_at_exit)
import os
import signal
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from reglue.data import integrity, store
from reglue.data.records import DatasetRecords, open_records
from reglue.errors import DamagedFileError, InputError


def random_subset(dataset: Dataset, num_images: int, seed: int = 0) -> Subset:
    """min(num_images, len) rows chosen by a seeded permutation, in index order (file locality)."""
    if num_images < 1:
        raise InputError(f"num_images must be >= 1, found {num_images}.")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(dataset), generator=generator)[:num_images].sort().values.tolist()
    return Subset(dataset, chosen)


class PreparedDataset(Dataset):
    """Rows of a ``reglue prepare`` directory as dicts of tensors.

    ``data``: the directory, or its records as read already (:func:`~reglue.data.records.open_records`:
    the manifest, shard indexes and side records are read once, by whoever opens the data first).
    ``fields`` picks the per-image arrays to return (``"moments"`` (8, R/8, R/8) float32,
    ``"images"`` (3, R, R) uint8, and arrays added later such as cached semantics); ``label``
    (int64, −1 when unconditional) is always returned. ``resolution`` / ``vae``, when given,
    must match the manifest; ``vfm`` (a :class:`~reglue.encoders.semantics.VFMSpec` as JSON),
    when given, must match the VFM that produced cached semantics. Opening checks every shard
    file's size against its record (:func:`reglue.data.integrity.check_sizes`, on the records). Each process
    parses the ``.npy`` headers it needs and keeps no file open, so the dataset works with
    DataLoader workers and a DistributedSampler; :meth:`read_batch` and :func:`training_loader`
    read whole batches.
    """

    def __init__(
        self,
        data: str | Path | DatasetRecords,
        fields: Sequence[str] = ("moments", "images"),
        resolution: int | None = None,
        vae: str | None = None,
        vfm: str | None = None,
    ):
        self.records = data if isinstance(data, DatasetRecords) else open_records(data)
        self.root, self.manifest = self.records.root, self.records.manifest
        self._check("resolution", resolution)
        self._check("vae", vae)
        self.fields = tuple(fields)
        self.shard_names = [s["name"] for s in self.manifest["shards"]]
        self.offsets = np.cumsum([0] + [s["count"] for s in self.manifest["shards"]]).tolist()
        self._check_fields_exist()
        self._check_vfm(vfm)
        integrity.check_sizes(self.records)
        self._files: dict[tuple[int, str], tuple[str, int]] = {}  # (shard, array) -> (path, data offset)
        self._rows: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # array -> (row shape, dtype)

    def _check(self, key: str, wanted) -> None:
        if wanted is not None and self.manifest[key] != wanted:
            raise InputError(
                f"{self.root} was prepared with {key} {self.manifest[key]!r} but training asks for "
                f"{wanted!r}; prepare the data again with --{key} {wanted} or change the run's config."
            )

    @property
    def semantics_info(self) -> dict | None:
        """What produced the cached semantics (``semantics.json``, read with the records), or None."""
        return self.records.semantics_info

    def _check_vfm(self, vfm: str | None) -> None:
        cached = set(self.fields) & set(store.CACHED_ARRAYS)
        if vfm is None or not cached:
            return
        recorded = (self.semantics_info or {}).get("vfm")
        if recorded is None or json.loads(recorded) != json.loads(vfm):
            raise InputError(
                f"the semantics cached in {self.root} were made with VFM {recorded} but training asks for "
                f"{vfm}; re-run `reglue cache-semantics` with that VFM or change the run's config."
            )

    def _check_fields_exist(self) -> None:
        unknown = set(self.fields) - set(store.SHARD_ARRAYS) - set(store.CACHED_ARRAYS)
        if unknown:
            raise InputError(f"unknown field(s) {sorted(unknown)}; choose from {store.SHARD_ARRAYS + store.CACHED_ARRAYS}.")
        cached = [name for name in self.fields if name in store.CACHED_ARRAYS]
        info = self.semantics_info or {}
        missing = [name for name in cached if name not in info.get("fields", ())]
        if cached and (missing or not info.get("complete")):
            what = f"has no cached {missing}" if missing else "holds an unfinished semantic cache"
            raise FileNotFoundError(
                f"{self.root} {what}; run `reglue cache-semantics {self.root}` "
                f"(with --repa-targets for 'repa') to finish it."
            )

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    def __len__(self) -> int:
        return self.offsets[-1]

    def _file(self, shard: int, name: str) -> tuple[str, int]:
        """(path, byte offset of row 0) of a shard array; its header is parsed once per process and its
        rows must have the shape and dtype of the other shards' (one batch tensor holds them)."""
        key = (shard, name)
        if key not in self._files:
            path = store.shard_dir(self.root, shard) / f"{name}.npy"
            shape, dtype, offset = store.npy_header(path)
            row = self._rows.setdefault(name, (shape[1:], dtype))
            count = self.offsets[shard + 1] - self.offsets[shard]
            if (shape[1:], dtype) != row or shape[0] != count:
                raise DamagedFileError(
                    f"{path} holds {shape[0]} {dtype} rows of shape {shape[1:]}, but the manifest lists {count} rows "
                    f"and the other shards hold {row[1]} rows of shape {row[0]}; "
                    f"{self.records.prepare_remedy()}"
                )
            self._files[key] = (str(path), offset)
        return self._files[key]

    def locate(self, index: int) -> tuple[int, int]:
        """Global row -> (shard, row within the shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images.")
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Row ``index``: ``{"label": () int64, field: its row}``, images as (3, R, R)."""
        return {name: value[0] for name, value in self._read([index], shared=False).items()}

    def read_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows ``indices`` as one batch, exactly what ``default_collate`` makes of ``[self[i] for i in
        indices]``: ``{"label": (B,) int64, field: (B, *row)}``, images (B, 3, R, R), rows in the order
        asked. In a DataLoader worker the tensors are in shared memory, so handing them to the main
        process copies nothing."""
        return self._read(indices, shared=get_worker_info() is not None)

    def _read(self, indices: Sequence[int], *, shared: bool) -> dict[str, torch.Tensor]:
        if not indices:
            raise InputError("no rows to read: pass at least one index.")
        located = [self.locate(index) for index in indices]
        order = sorted(range(len(located)), key=located.__getitem__)  # file by file, rows ascending
        groups = [(shard, list(members)) for shard, members in itertools.groupby(order, lambda k: located[k][0])]
        names = ("labels", *self.fields)
        files = {name: [self._file(shard, name) for shard, _ in groups] for name in names}  # row shapes now known
        layout = {}
        for name in names:
            shape, dtype = self._rows[name]
            shape = (shape[2], shape[0], shape[1]) if name == "images" else shape  # stored HWC, returned CHW
            layout["label" if name == "labels" else name] = ((len(located), *shape), _torch_dtype(dtype))
        batch = _batch_memory(layout, shared)
        for name in names:
            if name == "images":  # contiguous (B, 3, R, R), as stacking the rows gave
                hwc = torch.empty((len(located), *self._rows[name][0]), dtype=torch.uint8)
                self._fill(hwc, name, files[name], groups, located)
                batch[name].copy_(hwc.permute(0, 3, 1, 2))
            else:
                self._fill(batch["label" if name == "labels" else name], name, files[name], groups, located)
        return batch

    def _fill(self, out: torch.Tensor, name: str, files: list[tuple[str, int]], groups: list[tuple[int, list[int]]],
              located: list[tuple[int, int]]) -> None:
        """Read array ``name``'s rows into ``out`` (B, *row) with ``os.preadv``; each shard file is opened once
        and closed after its rows (no descriptor is kept), its rows read in ascending order."""
        shape, dtype = self._rows[name]
        row_bytes = math.prod(shape) * dtype.itemsize
        rows = out.numpy().view(np.uint8).reshape(len(located), row_bytes)  # the batch's own memory
        for (path, offset), (_, members) in zip(files, groups):
            fd = os.open(path, os.O_RDONLY)
            try:
                for k in members:
                    if not _read_exactly(fd, rows[k], offset + located[k][1] * row_bytes):
                        raise DamagedFileError(f"{path} ends before row {located[k][1]} (changed since the "
                                               f"dataset was opened?); {self.records.prepare_remedy()}")
            finally:
                os.close(fd)

    def __getstate__(self) -> dict:  # each worker parses the headers it needs again
        return dict(self.__dict__, _files={}, _rows={})


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _read_exactly(fd: int, view: np.ndarray, position: int) -> bool:
    """Fill ``view`` from ``fd`` at ``position``; a read may return fewer bytes (network and FUSE file systems
    do), so it goes on until the row is whole. False when the file ends first."""
    done, size = 0, view.nbytes
    while done < size:
        count = os.preadv(fd, [view[done:]], position + done)
        if count == 0:
            return False
        done += count
    return True


ALIGNMENT = 64  # bytes between the start of a batch's tensors in their shared block


def _batch_memory(layout: dict[str, tuple[tuple[int, ...], torch.dtype]], shared: bool) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of ``layout`` ({name: (shape, dtype)}). ``shared`` (a worker's batch): one block
    of shared memory holds them all, so the batch reaches the main process as one file descriptor — each
    descriptor costs the main process a socket handshake with the worker (≈ 0.2 ms), five per batch with a
    block per tensor — and not as bytes. The block is allocated as ``default_collate`` allocates one
    (``_new_shared``); ``torch.empty(...).share_memory_()`` would copy a fresh tensor into shared memory, 2-3×
    slower for a batch of 32 rows of 427 KiB."""
    if not shared:
        return {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in layout.items()}
    offsets, size = {}, 0
    for name, (shape, dtype) in layout.items():
        offsets[name] = size
        size += -(-math.prod(shape) * dtype.itemsize // ALIGNMENT) * ALIGNMENT
    block = torch.UntypedStorage._new_shared(max(size, 1))
    return {name: torch.empty(0, dtype=dtype).set_(block, offsets[name] // dtype.itemsize, shape,
                                                   torch.empty(shape, device="meta").stride())
            for name, (shape, dtype) in layout.items()}


class _Batches(Dataset):
    """A map-style view whose item ``rows`` is the batch :meth:`PreparedDataset.read_batch` reads."""

    def __init__(self, dataset: PreparedDataset):
        self.dataset = dataset

    def __getitem__(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.dataset.read_batch(rows)


def training_loader(dataset: PreparedDataset, batch_sampler: Iterable[Sequence[int]], *, num_workers: int,
                    pin_memory: bool) -> DataLoader:
    """A DataLoader of ``dataset``'s batches, one per list of rows ``batch_sampler`` yields, with the
    rows, order and values of ``DataLoader(dataset, batch_sampler=...)``, read a batch at a time
    (:meth:`PreparedDataset.read_batch`) instead of a row at a time and stacked."""
    return DataLoader(_Batches(dataset), sampler=batch_sampler, batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory, worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator())  # fixed worker seeds, global RNG untouched


def ignore_stop_signals(worker_id: int) -> None:
    """A worker ignores SIGTERM and SIGINT. Launchers and schedulers signal every process of a job (torchrun
    its workers' process groups, SLURM the whole step, a terminal its foreground group): a worker that died
    of the signal would make the main process fail ("DataLoader worker killed") before the checkpoint the
    signal asks for. The loader ends its workers itself, and a worker whose parent is gone exits; one still
    alive when the interpreter exits is killed (:func:`_kill_workers_left_at_exit`)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _kill_workers_left_at_exit() -> None:
    """At interpreter exit multiprocessing ends its daemonic children with SIGTERM and waits for them. Workers
    that ignore SIGTERM (:func:`ignore_stop_signals`) and are still alive then — a loader kept by the traceback
    of a run that raised, its persistent workers never shut down — would make the exit wait forever; they are
    killed first. Registered after multiprocessing's own handler, so it runs before it (atexit is last-in,
    first-out)."""
    left = [child for child in multiprocessing.active_children() if child.daemon]
    for child in left:
        child.kill()
    for child in left:
        try:
            child.join(timeout=5)
        except RuntimeError:  # torch's SIGCHLD handler reports each killed loader worker: expected here
            pass


atexit.register(_kill_workers_left_at_exit)
