"""The on-disk dataset format: a directory of memory-mappable ``.npy`` shards (docs/data-format.md).

```
DATA/
  manifest.json          # written last: format, source, resolution, VAE, counts, classes, shards
  settings.json          # the prepare settings, written first; a rerun must match them
  skipped.tsv            # every skipped source file and why
  shards/
    shard-00000/
      images.npy         # uint8   (n, R, R, 3)   ADM-cropped RGB
      moments.npy        # float32 (n, 8, R/8, R/8) VAE posterior mean ‖ std
      labels.npy         # int64   (n,)  class index, -1 when unconditional
      index.json         # source path of each row, skipped files of this shard
```

A shard is written into a hidden temporary directory and renamed into place only when all
of its files are complete and fsynced, so a shard directory under its final name is always
whole, and completed shards are never rewritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from reglue.io import atomic_write
from reglue.settings import check_same_settings

FORMAT_NAME = "reglue-dataset"
FORMAT_VERSION = 1
SHARDS_DIR = "shards"
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SKIPPED = "skipped.tsv"
SEMANTICS_INFO = "semantics.json"  # written by `reglue cache-semantics`
SHARD_ARRAYS = ("images", "moments", "labels")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_dir(root: Path, index: int) -> Path:
    return Path(root) / SHARDS_DIR / shard_name(index)


def shard_is_complete(root: Path, index: int) -> bool:
    return (shard_dir(root, index) / "index.json").is_file()


def remove_leftovers(root: Path) -> int:
    """Delete temporary shard directories and files left by an interrupted run; returns how many.

    Call it only while holding the directory's lock (:func:`lock_directory`).
    """
    root = Path(root)
    shards = root / SHARDS_DIR
    stale = list(shards.glob(".shard-*.tmp*")) if shards.is_dir() else []
    stale += list(root.glob(".*.tmp-*")) + list(shards.glob("shard-*/.*.tmp-*"))
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return len(stale)


@contextlib.contextmanager
def lock_directory(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``root`` so two jobs never write into the same dataset."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"{root} is in use by another reglue job; wait for it to finish or choose another directory."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_or_write_json(path: Path, wanted: dict, is_main: bool, fix: str) -> None:
    """Refuse a rerun whose ``wanted`` differs from what ``path`` recorded; else record it (main only).

    The comparison is :func:`reglue.settings.check_same_settings` (a ValueError listing every
    differing key, then ``fix``) over the keys of ``wanted``: anything else ``path`` holds (e.g.
    the demo's stage ledger in ``demo.json``) is the caller's and not compared.
    """
    if path.is_file():
        found = json.loads(path.read_text())
        recorded = {key: value for key, value in found.items() if key in wanted}
        check_same_settings(recorded, wanted, what=str(path.parent), fix=fix)
    elif is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, wanted)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_shard(root: Path, index: int, arrays: dict[str, np.ndarray], info: dict) -> None:
    """Write one shard's arrays and ``index.json`` atomically (temp dir, fsync, rename)."""
    final = shard_dir(root, index)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        _fsync_file(tmp / f"{name}.npy")
    (tmp / "index.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    _fsync_file(tmp / "index.json")
    os.replace(tmp, final)


def read_shard_info(root: Path, index: int) -> dict:
    return json.loads((shard_dir(root, index) / "index.json").read_text())


def open_array(root: Path, index: int, name: str) -> np.ndarray:
    """A shard array, memory-mapped read-only."""
    return np.load(shard_dir(root, index) / f"{name}.npy", mmap_mode="r", allow_pickle=False)


def write_json_atomic(path: Path, payload: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_manifest(root: Path) -> dict:
    """The manifest of a prepared dataset, checked for format and version."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a finished reglue dataset; run `reglue prepare SRC {root}` "
            "(rerunning it resumes an interrupted run)."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {manifest.get('format')} v{manifest.get('format_version')}; this reglue "
            f"reads {FORMAT_NAME} v{FORMAT_VERSION}. Re-prepare the dataset with this version."
        )
    return manifest
