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
      index.json         # source path of each row, skipped files of this shard, and the
                         # record (size, BLAKE2b) of every file of the shard
```

A shard is written into a hidden temporary directory and renamed into place only when all
of its files are complete and fsynced, so a shard directory under its final name is always
whole. Each file's record is taken while it is written (:class:`reglue.io.RecordingWriter`);
:mod:`reglue.data.integrity` checks the files against them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import shlex
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from reglue.errors import DamagedFileError, InputError
from reglue.io import RecordingWriter, atomic_write, new_checksum, write_json
from reglue.resolution import confirm_resolution
from reglue.settings import check_same_settings

FORMAT_NAME = "reglue-dataset"
FORMAT_VERSION = 1
SHARDS_DIR = "shards"
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SKIPPED = "skipped.tsv"
SEMANTICS_INFO = "semantics.json"  # written by `reglue cache-semantics`
SHARD_ARRAYS = ("images", "moments", "labels")  # written by `reglue prepare`
CACHED_ARRAYS = ("semantics", "cls", "repa")  # written by `reglue cache-semantics`
INDEX = "index.json"
FILES = "files"  # the index's records: {file name: {"bytes", "blake2b"}}
INDEX_CHECKSUM = "index_blake2b"  # the index's checksum of its own other entries
RECORD_REMEDY = "copy it again from where it was made: it tells a rerun whether its settings match the files written"
SEMANTICS_REMEDY = ("copy it again from where the dataset was made; without it the cached arrays cannot be "
                    "trusted: delete it and every shard's semantics.npy, cls.npy and repa.npy, and cache them again "
                    "with `reglue cache-semantics`")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_dir(root: Path, index: int) -> Path:
    return Path(root) / SHARDS_DIR / shard_name(index)


def shard_is_complete(root: Path, index: int) -> bool:
    return (shard_dir(root, index) / INDEX).is_file()


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
    """Hold an exclusive lock on ``root`` so two jobs never write into the same dataset.

    ``flock`` on ``root/.lock``: it holds across nodes on local file systems, NFSv4 and GPFS, and on
    Lustre mounted with ``-o flock`` (``localflock``: within one node only); a file system without it
    is refused with the fix (docs/cluster.md, "Locks")."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{root} is in use by another reglue job; wait for it to finish or choose another directory."
            ) from None
        except OSError as err:  # ENOSYS, ENOLCK, EOPNOTSUPP: the file system has no flock
            raise OSError(
                err.errno, f"cannot lock {root / '.lock'} ({err.strerror}): this file system does not support "
                "flock, which keeps two jobs from writing into one dataset. Write the dataset on a file system "
                "that does (Lustre: mount with -o flock), or on local disk and copy it afterwards."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_or_write_json(path: Path, wanted: dict, fix: str) -> None:
    """Refuse a rerun whose ``wanted`` differs from what ``path`` recorded; else record it (callers run it
    on the main process only, in :func:`reglue.distributed.on_main`).

    The comparison is :func:`reglue.settings.check_same_settings` (a ValueError listing every
    differing key, then ``fix``) over the keys of ``wanted``: anything else ``path`` holds (e.g.
    the demo's stage ledger in ``demo.json``) is the caller's and not compared.
    """
    if path.is_file():
        found = read_json(path, RECORD_REMEDY)
        recorded = {key: value for key, value in found.items() if key in wanted}
        check_same_settings(recorded, wanted, what=str(path.parent), fix=fix)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, wanted, sort_keys=True)


def save_array(path: Path, array: np.ndarray) -> dict:
    """``np.save`` ``array`` to ``path`` and fsync it; returns the file's record (bytes, checksum)."""
    with open(path, "wb") as handle:
        writer = RecordingWriter(handle)
        np.save(writer, np.ascontiguousarray(array), allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    return writer.record()


def index_checksum(info: dict) -> str:
    """BLAKE2b-128 of a shard index's entries other than its own checksum (sorted, compact JSON)."""
    digest = new_checksum()
    digest.update(json.dumps({key: value for key, value in info.items() if key != INDEX_CHECKSUM}, sort_keys=True).encode())
    return digest.hexdigest()


def write_shard_info(directory: Path, info: dict) -> None:
    """A shard's ``index.json``, atomically; an index with file records also gets its own checksum."""
    if FILES in info:
        info = dict(info, **{INDEX_CHECKSUM: index_checksum(info)})
    with atomic_write(directory / INDEX) as tmp:
        tmp.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def add_records(directory: Path, records: dict[str, dict]) -> None:
    """Add the records of files written into a finished shard to its index (atomically). A shard
    indexed without records (an older reglue) stays so: `reglue verify --reindex` records it whole."""
    info = read_json(directory / INDEX, functools.partial(prepare_remedy, directory.parent.parent))
    if FILES in info:
        write_shard_info(directory, dict(info, **{FILES: {**info[FILES], **records}}))


def write_shard(root: Path, index: int, arrays: dict[str, np.ndarray], info: dict) -> None:
    """Write one shard's arrays and ``index.json`` (``info`` plus the record of every array's file)
    atomically: temp dir, fsync, rename."""
    final = shard_dir(root, index)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    records = {f"{name}.npy": save_array(tmp / f"{name}.npy", array) for name, array in arrays.items()}
    write_shard_info(tmp, dict(info, **{FILES: records}))
    os.replace(tmp, final)


def discard_shard(root: Path, index: int) -> None:
    """Delete a shard directory (to write it again); an interruption leaves a leftover that
    :func:`remove_leftovers` deletes, never a shard directory that looks complete."""
    final = shard_dir(root, index)
    doomed = final.with_name(f".{final.name}.tmp-discarded-{os.getpid()}")
    os.replace(final, doomed)
    shutil.rmtree(doomed)


def parse_json(path: Path) -> tuple[object, str | None]:
    """A JSON file's value and None, or None and why it does not parse."""
    try:
        return json.loads(Path(path).read_text()), None
    except (ValueError, UnicodeDecodeError) as err:
        return None, f"does not parse as JSON ({err})"


def read_json(path: Path, remedy: str | Callable[[], str]) -> dict:
    """A JSON file; one that does not parse is a :class:`DamagedFileError` naming it and ``remedy``
    (a callable is called only then: a remedy may itself read files)."""
    value, problem = parse_json(path)
    if problem is not None:
        raise DamagedFileError(f"{path} {problem}; {remedy() if callable(remedy) else remedy}")
    return value


def link_prepared(source: Path, dest: Path) -> int:
    """A copy at ``dest`` of what ``reglue prepare`` wrote into ``source``: the shard arrays
    (:data:`SHARD_ARRAYS`) hard-linked (copied where ``dest`` is on another file system), the manifest and
    settings copied, each shard's index naming those arrays only (a cache in ``source`` is not carried).
    Every writer in reglue replaces a file (write, then rename) and never writes into one, so what is
    later written into the copy — a semantic cache, evaluation statistics — never reaches ``source``.
    Built in a temporary folder renamed into place; returns the number of arrays linked."""
    source, dest = Path(source), Path(dest)
    manifest = read_manifest(source)
    if dest.exists():
        raise InputError(f"{dest} exists; link a prepared dataset into a new folder.")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    linked = 0
    for index in range(len(manifest["shards"])):
        info = read_shard_info(source, index)
        (tmp / SHARDS_DIR / shard_name(index)).mkdir(parents=True)
        for name in SHARD_ARRAYS:
            _link_or_copy(shard_dir(source, index) / f"{name}.npy", shard_dir(tmp, index) / f"{name}.npy")
            linked += 1
        if FILES in info:
            kept = {f"{name}.npy" for name in SHARD_ARRAYS}
            info = {key: value for key, value in info.items() if key != INDEX_CHECKSUM}
            info[FILES] = {name: record for name, record in info[FILES].items() if name in kept}
        write_shard_info(shard_dir(tmp, index), info)
    for name in (SETTINGS, SKIPPED, MANIFEST):
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    os.replace(tmp, dest)
    return linked


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError as err:  # EXDEV: another file system; EPERM: one that has no hard links
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(source, dest)


def read_shard_info(root: Path, index: int) -> dict:
    return read_json(shard_dir(root, index) / INDEX, functools.partial(prepare_remedy, root))


def open_array(root: Path, index: int, name: str) -> np.ndarray:
    """A shard array, memory-mapped read-only."""
    return np.load(shard_dir(root, index) / f"{name}.npy", mmap_mode="r", allow_pickle=False)


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """A ``.npy`` file's shape, dtype and the byte offset where its (C-order) data starts, from its
    header alone; ValueError, KeyError, SyntaxError or EOFError when the header does not parse."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran_order, dtype = read_header[version](handle)
        if fortran_order:
            raise InputError("its data is in Fortran order; reglue writes C order")
        return shape, dtype, handle.tell()


def write_skipped(path: Path, skipped: list[dict]) -> None:
    """``skipped.tsv``: a header, then one line ``path<TAB>reason`` per skipped source file."""
    with atomic_write(path) as tmp:
        tmp.write_text("path\treason\n" + "".join(f"{s['path']}\t{s['reason']}\n" for s in skipped))


def read_manifest(root: Path) -> dict:
    """The manifest of a prepared dataset, checked for format and version."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a finished reglue dataset; run `reglue prepare SRC {root}` "
            "(rerunning it resumes an interrupted run)."
        )
    manifest = read_json(path, functools.partial(prepare_remedy, root))
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path} has format {manifest.get('format')} v{manifest.get('format_version')}; this reglue "
            f"reads {FORMAT_NAME} v{FORMAT_VERSION}. Re-prepare the dataset with this version."
        )
    return manifest


def prepared_resolution(root: str | Path, asked: int | None = None, *, manifest: dict | None = None) -> int:
    """The side R ``root`` was prepared at (its manifest; ``manifest``: the one read already); ``asked``, a
    ``--resolution`` given as a check, must equal it (:func:`reglue.resolution.confirm_resolution`)."""
    manifest = read_manifest(Path(root)) if manifest is None else manifest
    found = manifest["resolution"]
    source = shlex.quote(str(manifest.get("source") or "SRC"))
    return confirm_resolution(asked, found, where=f"{root} (its manifest.json)", remedy=(
        f"Leave the resolution out to work at {found}², or prepare the images at {asked}² into a new folder: "
        f"`reglue prepare {source} NEW_DIR --resolution {asked}`."))


# ----------------------------------------------------------------------------- remedies
# prepare's recorded settings -> the flag that sets each on the command line
PREPARE_OPTIONS = {"resolution": "--resolution", "vae": "--vae", "vae_dtype": "--precision",
                   "shard_size": "--shard-size", "min_size": "--min-size", "max_images": "--max-images"}
AUTOCAST_OPTIONS = {"None": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}  # recorded -> --precision


def prepare_remedy(root: Path, settings: dict | None = None) -> str:
    """The command that rebuilds ``root``'s shards, from the settings it recorded (``settings``: its
    ``settings.json`` as read already; read here when None): a rerun keeps the intact shards, redoes
    missing or damaged ones and writes the manifest again."""
    try:
        settings = json.loads((Path(root) / SETTINGS).read_text()) if settings is None else settings
        options = [f"{flag} {shlex.quote(str(settings[key]))}"
                   for key, flag in PREPARE_OPTIONS.items() if settings.get(key) is not None]
        command = " ".join(["reglue prepare", shlex.quote(settings["source"]), shlex.quote(str(root)), *options])
    except (OSError, ValueError, KeyError, TypeError):  # no readable settings.json: the command's shape only
        command = f"reglue prepare SRC {shlex.quote(str(root))} OPTIONS"
    return f"rerun `{command}` (the settings it was prepared with): it keeps intact shards and redoes damaged ones"


def cache_remedy(root: Path, info: dict | None = None) -> str:
    """The command that rebuilds ``root``'s cached semantics, from ``semantics.json`` (its fields, the
    files it was made from, the VFM's precision; ``info``: as read already, read here when None): a rerun
    keeps intact shards and redoes damaged ones."""
    if info is None:
        try:
            info = dict(json.loads((Path(root) / SEMANTICS_INFO).read_text()))
        except (OSError, ValueError, TypeError):  # no readable semantics.json: the command's shape only
            info = {}
    made_from = {key: "FILE" for key in ("compressor", "pca") if f"{key}_sha256" in info}  # before paths were kept
    paths = info.get("paths") or made_from
    options = [f"--{key.replace('_', '-')} {shlex.quote(value)}" for key, value in sorted(paths.items()) if value]
    options += ["--repa-targets"] * ("repa" in info.get("fields", ()))
    if info.get("vfm_autocast") in AUTOCAST_OPTIONS:
        options.append(f"--precision {AUTOCAST_OPTIONS[info['vfm_autocast']]}")
    command = " ".join(["reglue cache-semantics", shlex.quote(str(root)), *options])
    return f"rerun `{command}` (the files it was made from): it keeps intact shards and redoes damaged ones"
