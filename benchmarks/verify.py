"""Throughput of ``reglue verify`` and what the file records cost ``reglue prepare``.

1. verify: writes ``--gb`` GB of shards shaped like 256² data (random images and moments,
   through ``store.write_shard``, so each file is recorded as prepare records it) into a
   temporary folder, then times ``verify_dataset`` with 1 … ``--workers`` threads, from the
   page cache (warm) and after asking the kernel to drop the files' pages (cold:
   ``posix_fadvise(DONTNEED)``), and the size check every open of the dataset runs.
2. prepare: times ``prepare_dataset`` on ``--images`` synthetic 500×375 JPEGs with the pixel
   autoencoder (the cheapest encoder, so the hashing share is an upper bound; with the SD-VAE
   the total is hundreds of times larger), the time spent inside the checksum while writing,
   and a rerun over the finished dataset (which checks the checksums of every shard it keeps).

The temporary folder is deleted at the end.

    OMP_NUM_THREADS=1 python benchmarks/verify.py --gb 1.2 --images 256
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import reglue.io
from reglue.data import integrity, store
from reglue.data.prepare import PrepareSettings, prepare_dataset
from reglue.data.records import open_records
from reglue.encoders.autoencoder import load_vae

ROW_BYTES = 256 * 256 * 3 + 8 * 32 * 32 * 4 + 8  # image, moments, label of one 256² row


def write_dataset(root: Path, gb: float, shard_size: int) -> tuple[int, float]:
    """Shards of random 256² rows totalling ``gb`` GB, and a manifest; returns (rows, seconds writing)."""
    rng = np.random.default_rng(0)
    rows = max(1, round(gb * 1e9 / ROW_BYTES))
    shards, seconds = [], 0.0
    for index, start in enumerate(range(0, rows, shard_size)):
        count = min(shard_size, rows - start)
        arrays = {"images": rng.integers(0, 256, (count, 256, 256, 3), dtype=np.uint8),
                  "moments": rng.standard_normal((count, 8, 32, 32), dtype=np.float32),
                  "labels": rng.integers(0, 1000, count)}
        begin = time.perf_counter()
        store.write_shard(root, index, arrays, {"sources": [f"{start + i}.jpg" for i in range(count)], "skipped": []})
        seconds += time.perf_counter() - begin
        shards.append({"name": store.shard_name(index), "count": count})
    reglue.io.write_json(root / store.MANIFEST, {
        "format": store.FORMAT_NAME, "format_version": store.FORMAT_VERSION, "resolution": 256, "vae": "random",
        "num_images": rows, "num_classes": 1000, "class_names": [], "shards": shards}, sort_keys=True)
    return rows, seconds


def drop_page_cache(root: Path) -> None:
    """Ask the kernel to forget the cached pages of every shard file (they are fsynced, so it can)."""
    for path in root.glob("shards/*/*"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_verify(root: Path, workers: int, cold: bool) -> dict:
    if cold:
        drop_page_cache(root)
    report = integrity.verify_dataset(root, workers=workers)
    assert report.ok, report.damaged
    return {"workers": workers, "cache": "cold" if cold else "warm", "gb": round(report.bytes / 1e9, 3),
            "seconds": round(report.seconds, 2), "gb_per_s": round(report.gb_per_s, 2)}


class TimedChecksum:
    """A checksum that adds the seconds its updates take to ``TimedChecksum.seconds``."""

    seconds = 0.0

    def __init__(self, digest):
        self.digest = digest

    def update(self, data) -> None:
        start = time.perf_counter()
        self.digest.update(data)
        TimedChecksum.seconds += time.perf_counter() - start

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def time_prepare(folder: Path, images: int) -> dict:
    """prepare with the pixel autoencoder: total seconds, seconds inside the checksum, and a rerun."""
    spec = importlib.util.spec_from_file_location("prepare_benchmark", Path(__file__).with_name("prepare.py"))
    prepare_benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_benchmark)
    prepare_benchmark.make_images(folder / "src", images)
    settings = PrepareSettings(source=str(folder / "src"), resolution=256, vae="pixel", shard_size=max(images // 4, 1))
    vae = load_vae("pixel")
    new_checksum = reglue.io.new_checksum
    reglue.io.new_checksum = lambda: TimedChecksum(new_checksum())
    try:
        start = time.perf_counter()
        prepare_dataset(settings, folder / "dst", vae)
        total = time.perf_counter() - start
    finally:
        reglue.io.new_checksum = new_checksum
    start = time.perf_counter()
    summary = prepare_dataset(settings, folder / "dst", vae)
    rerun = time.perf_counter() - start
    written = sum(p.stat().st_size for p in (folder / "dst").glob("shards/*/*.npy"))
    return {"images": images, "mb_written": round(written / 1e6, 1), "prepare_s": round(total, 2),
            "hashing_s": round(TimedChecksum.seconds, 3), "hashing_share": round(TimedChecksum.seconds / total, 4),
            "rerun_s": round(rerun, 2), "rerun_kept_shards": summary.resumed_shards}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.2, help="size of the dataset verify reads")
    parser.add_argument("--shard-size", type=int, default=250, help="rows per shard of that dataset")
    parser.add_argument("--workers", type=int, default=2, help="time verify with 1 … this many threads")
    parser.add_argument("--images", type=int, default=256, help="images of the prepare measurement")
    parser.add_argument("--dir", default=None, help="where the temporary folder goes (default: the system's)")
    parser.add_argument("--json", help="also write the result as JSON to this path")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "data"
        rows, write_s = write_dataset(root, args.gb, args.shard_size)
        start = time.perf_counter()
        integrity.check_sizes(open_records(root))
        open_s = time.perf_counter() - start
        runs = [time_verify(root, workers, cold) for cold in (False, True) for workers in range(1, args.workers + 1)]
        prepare = time_prepare(Path(tmp), args.images)
    result = {"rows": rows, "write_with_records_s": round(write_s, 2), "open_size_check_s": round(open_s, 4),
              "verify": runs, "prepare": prepare, "load_average": [round(x, 2) for x in os.getloadavg()],
              "cpus": os.cpu_count()}
    for run in runs:
        print(f"| verify | {run['gb']} GB | {run['cache']} | {run['workers']} | {run['seconds']} | {run['gb_per_s']} |")
    print(f"| prepare | {prepare['images']} images, {prepare['mb_written']} MB | pixel | hashing "
          f"{prepare['hashing_s']} s of {prepare['prepare_s']} s ({100 * prepare['hashing_share']:.2f} %) | "
          f"rerun {prepare['rerun_s']} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
