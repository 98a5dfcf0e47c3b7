"""Training-time read speed of a prepared dataset at ImageNet's shape, with cached semantics.

Writes an ImageNet-shaped dataset with the project's own shard writer (``store.write_shard``, a
manifest and a complete ``semantics.json`` as ``reglue prepare`` / ``reglue cache-semantics``
record them): 1,282 shards (ImageNet's 1,281,167 images in shards of 1,000) of ``--rows-per-shard``
rows, each row at the real sizes of ``--resolution`` (256²: images uint8 (256, 256, 3), moments
float32 (8, 32, 32), semantics float16 (16, 16, 16), CLS float16 (768,), REPA targets float16
(257, 768)), filled with random values. Then it reads what training with cached semantics reads
(moments, semantics, CLS, REPA targets, labels: 451 KiB a row at 256²) in random order, batches
of ``--batch`` rows from ``reglue.training.order.process_batches`` as the trainer does:

- ``main``: the reader called in the main process, no DataLoader;
- ``workers=N``: through a DataLoader with N worker processes (0: in the main process).

``--reader current`` is :func:`reglue.data.dataset.training_loader` (what the trainer uses);
``--reader legacy`` is the reader as it was before it (kept here, in the benchmark only, to
measure the difference): an LRU of 64 ``np.load(mmap_mode="r")`` maps per process, one row at a
time, stacked by the DataLoader's default collate. Every batch is copied into a reused buffer as
it arrives, as the pin-memory thread of a GPU run does. ``warm``: every file is read once first
(the page cache holds the dataset); ``cold`` (``--cold``): the files' pages are dropped
(``posix_fadvise(DONTNEED)``) before each measurement, so rows come from the disk. Each timed
row records the load average and the CPU time other processes used meanwhile (in cores). The
dataset is deleted at the end.

    python benchmarks/data_loading.py --reader legacy --reader current --cold
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

import reglue.io
from reglue.data import store
from reglue.data.dataset import PreparedDataset, training_loader
from reglue.encoders.semantics import VFMSpec
from reglue.resolution import latent_size, token_grid
from reglue.training.order import process_batches

IMAGENET_IMAGES = 1_281_167
IMAGENET_SHARDS = 1_282  # ImageNet in prepare's default shards of 1,000 images
SEMANTIC_CHANNELS = 16  # the compressor's output
VFM_WIDTH = 768  # DINOv2-B
TRAINING_FIELDS = ("moments", "semantics", "cls", "repa")  # what training with cached semantics reads


def row_layout(resolution: int, vfm_width: int = VFM_WIDTH) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every array of a row: (shape, dtype) at ``resolution`` (SPEC §1; the VFM grid is R/16) for a VFM of
    ``vfm_width`` channels (DINOv2-B's 768; smaller for the host-overhead benchmark's tiny rows)."""
    latent, grid = latent_size(resolution), token_grid(resolution)
    return {"images": ((resolution, resolution, 3), np.dtype(np.uint8)),
            "moments": ((8, latent, latent), np.dtype(np.float32)),
            "labels": ((), np.dtype(np.int64)),
            "semantics": ((SEMANTIC_CHANNELS, grid, grid), np.dtype(np.float16)),
            "cls": ((vfm_width,), np.dtype(np.float16)),
            "repa": ((1 + grid * grid, vfm_width), np.dtype(np.float16))}


def bytes_read_per_row(resolution: int) -> int:
    layout = row_layout(resolution)
    return sum(int(np.prod(shape)) * dtype.itemsize for name, (shape, dtype) in layout.items()
               if name in (*TRAINING_FIELDS, "labels"))


def write_dataset(root: Path, *, shards: int, rows_per_shard: int, resolution: int, vfm_width: int = VFM_WIDTH) -> float:
    """The dataset (random rows, prepare's and cache-semantics' records); returns the seconds writing."""
    layout = row_layout(resolution, vfm_width)

    def write(index: int) -> dict:
        rng = np.random.default_rng(index)
        arrays = {}
        for name, (shape, dtype) in layout.items():
            shape = (rows_per_shard, *shape)
            if dtype.kind == "f":
                arrays[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
            else:
                arrays[name] = rng.integers(0, 256 if name == "images" else 1000, shape, dtype=dtype)
        sources = [f"n{index:05d}/{row}.JPEG" for row in range(rows_per_shard)]
        store.write_shard(root, index, arrays, {"sources": sources, "skipped": []})
        return {"name": store.shard_name(index), "count": rows_per_shard}

    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:  # np.save and fsync release the GIL
        entries = list(pool.map(write, range(shards)))
    reglue.io.write_json(root / store.MANIFEST, {
        "format": store.FORMAT_NAME, "format_version": store.FORMAT_VERSION, "source": "random",
        "resolution": resolution, "vae": "random", "num_images": shards * rows_per_shard, "num_classes": 1000,
        "class_names": [f"n{i:08d}" for i in range(1000)], "shards": entries}, sort_keys=True)
    reglue.io.write_json(root / store.SEMANTICS_INFO, {
        "vfm": VFMSpec(weights="random").to_json(), "resolution": str(resolution), "fields": list(store.CACHED_ARRAYS),
        "complete": True, "paths": {}}, sort_keys=True)
    return time.perf_counter() - start


def shard_files(root: Path) -> list[Path]:
    return sorted(root.glob(f"{store.SHARDS_DIR}/*/*.npy"))


def read_everything(root: Path) -> None:
    """Read every shard file once, so that the page cache holds them."""
    for path in shard_files(root):
        with open(path, "rb", buffering=0) as handle:
            while handle.read(1 << 24):
                pass


def drop_page_cache(root: Path) -> None:
    """Ask the kernel to forget the cached pages of every shard file (they are fsynced, so it can)."""
    for path in shard_files(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class LegacyReader(Dataset):
    """The reader before ``training_loader`` (kept for the comparison only): one row at a time from
    an LRU of at most 64 memory maps per process (``np.load(mmap_mode="r")``, one file descriptor
    each), stacked by the DataLoader's default collate."""

    OPEN_ARRAYS = 64

    def __init__(self, dataset: PreparedDataset):
        self.dataset = dataset
        self.arrays: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.dataset)

    def array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key in self.arrays:
            self.arrays.move_to_end(key)
        else:
            self.arrays[key] = store.open_array(self.dataset.root, shard, name)
            if len(self.arrays) > self.OPEN_ARRAYS:
                self.arrays.popitem(last=False)
        return self.arrays[key]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard, row = self.dataset.locate(index)
        item = {"label": torch.tensor(int(self.array(shard, "labels")[row]))}
        for name in self.dataset.fields:
            value = torch.from_numpy(np.array(self.array(shard, name)[row]))
            item[name] = value.permute(2, 0, 1) if name == "images" else value
        return item

    def __getstate__(self) -> dict:
        return dict(self.__dict__, arrays=OrderedDict())


def batches_of(dataset: PreparedDataset, batch: int, epochs: int):
    """Random-order batches of dataset rows, as the trainer's batch sampler yields them: one epoch
    to warm up, then ``epochs``."""
    for epoch in range(epochs + 1):
        yield from process_batches(len(dataset), batch, seed=0, epoch=epoch, rank=0, num_processes=1)


def read_batches(dataset: PreparedDataset, reader: str, workers: int | None, batch: int, epochs: int):
    """Batches of the reader: in the main process without a DataLoader (``workers`` None), else from a
    DataLoader with that many workers."""
    rows = batches_of(dataset, batch, epochs)
    if reader == "legacy":
        legacy = LegacyReader(dataset)
        if workers is None:
            return (default_collate([legacy[i] for i in chunk]) for chunk in rows)
        return iter(DataLoader(legacy, batch_sampler=rows, num_workers=workers, generator=torch.Generator()))
    if workers is None:
        return (dataset.read_batch(chunk) for chunk in rows)
    return iter(training_loader(dataset, rows, num_workers=workers, pin_memory=False))


def cpu_s() -> tuple[float, float]:
    """CPU seconds so far of this process and of its live children (the DataLoader workers); Linux only."""
    ticks, me, own, children = os.sysconf("SC_CLK_TCK"), os.getpid(), 0, 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # a process that ended meanwhile
            continue
        used = int(fields[11]) + int(fields[12])  # utime + stime
        if int(stat.parent.name) == me:
            own += used
        elif int(fields[1]) == me:  # fields[1]: the parent's pid
            children += used
    return own / ticks, children / ticks


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy so far (/proc/stat, idle and iowait excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def measure(dataset: PreparedDataset, reader: str, workers: int | None, *, batch: int, epochs: int,
            cache: str) -> dict:
    """One reader setting, timed from the first batch on (worker start-up excluded): rows/s and MB/s
    of wall time, and the CPU time per row of the main process and of the workers. On a loaded machine
    the wall rate is the share of the CPU the readers got; ``rows_per_cpu_s`` (rows per CPU second of
    the reading process: the workers where there are some) is the rate a core of their own gives."""
    batches = read_batches(dataset, reader, workers, batch, epochs)
    sink: dict[str, torch.Tensor] = {}

    def consume(item: dict[str, torch.Tensor]) -> int:  # the pin-memory thread's copy, into reused buffers
        for name, value in item.items():
            if name not in sink:
                sink[name] = torch.empty_like(value, memory_format=torch.contiguous_format)
            sink[name].copy_(value)
        return len(item["label"])

    per_epoch = len(dataset) // batch
    if per_epoch < 3:
        raise ValueError(f"{len(dataset)} rows make fewer than 3 batches of {batch}; write more shards or rows.")
    for _ in range(per_epoch):  # untimed: every file's header parsed once in each process, as after the
        consume(next(batches))  # first of ImageNet's 1,000 rows a shard (here a file holds a few rows)
    timed = epochs * per_epoch - 1  # the last batch is not timed
    if cache == "cold":
        drop_page_cache(dataset.root)
    rows, start, busy0, (own0, children0) = 0, time.perf_counter(), busy_cpu_s(), cpu_s()
    for _ in range(timed):
        rows += consume(next(batches))
    seconds = time.perf_counter() - start
    (own, children), busy = cpu_s(), busy_cpu_s() - busy0  # before the last batch: the workers still live
    own, children = own - own0, children - children0
    consume(next(batches))
    del batches  # ends the workers
    row_bytes = bytes_read_per_row(dataset.manifest["resolution"])
    reading = children if workers else own
    return {"reader": reader, "cache": cache, "process": "main" if workers is None else f"workers={workers}",
            "rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1),
            "mb_per_s": round(rows * row_bytes / seconds / 1e6, 1),
            "main_cpu_ms_per_row": round(1e3 * own / rows, 3), "worker_cpu_ms_per_row": round(1e3 * children / rows, 3),
            "rows_per_cpu_s": round(rows / reading, 1) if reading else None,
            "other_load_cores": round(max(0.0, busy - own - children) / seconds, 2),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=256, choices=(256, 512))
    parser.add_argument("--shards", type=int, default=IMAGENET_SHARDS, help="shards (ImageNet: 1,282)")
    parser.add_argument("--rows-per-shard", type=int, default=4, help="rows in each shard (sized to fit the disk)")
    parser.add_argument("--batch", type=int, default=32, help="rows per batch (one GPU's micro-batch)")
    parser.add_argument("--epochs", type=int, default=1, help="timed passes over the rows per measurement "
                        "(after one untimed pass)")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to measure")
    parser.add_argument("--reader", action="append", choices=("current", "legacy"),
                        help="reader(s) to measure (repeat the option; default: current)")
    parser.add_argument("--cold", action="store_true", help="also measure with the files' pages dropped")
    parser.add_argument("--dir", default=None, help="where the temporary dataset goes (default: the system's)")
    parser.add_argument("--json", help="also write the result as JSON to this path")
    args = parser.parse_args(argv)
    readers = args.reader or ["current"]
    settings = [None] + [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "data"
        write_s = write_dataset(root, shards=args.shards, rows_per_shard=args.rows_per_shard,
                                resolution=args.resolution)
        dataset = PreparedDataset(root, fields=TRAINING_FIELDS)
        read_everything(root)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the copy standing in for the pin-memory thread's: one thread, no OpenMP spinning
        try:
            runs = [measure(dataset, reader, workers, batch=args.batch, epochs=args.epochs, cache=cache)
                    for cache in ("warm", "cold")[: 1 + args.cold] for reader in readers for workers in settings]
        finally:
            torch.set_num_threads(threads)
    row_bytes = bytes_read_per_row(args.resolution)
    result = {"resolution": args.resolution, "shards": args.shards, "rows_per_shard": args.rows_per_shard,
              "batch": args.batch, "row_kib": round(row_bytes / 1024, 1), "write_s": round(write_s, 1),
              "runs": runs, "cpus": os.cpu_count()}
    print(f"{args.shards} shards × {args.rows_per_shard} rows at {args.resolution}², {result['row_kib']} KiB "
          f"read per row, batch {args.batch}, random order")
    print("| reader | page cache | process | rows/s | MB/s | CPU ms per row: main | CPU ms per row: workers | "
          "rows per CPU second of the reader | other load (cores) | load average |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        per_cpu_s = f"{run['rows_per_cpu_s']:,.0f}" if run["rows_per_cpu_s"] else "–"  # – : under one clock tick
        print(f"| {run['reader']} | {run['cache']} | {run['process']} | {run['rows_per_s']:,.0f} | "
              f"{run['mb_per_s']:,.0f} | {run['main_cpu_ms_per_row']} | {run['worker_cpu_ms_per_row']} | "
              f"{per_cpu_s} | {run['other_load_cores']} | {' '.join(map(str, run['load_average']))} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
