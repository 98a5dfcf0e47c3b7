"""Integrity of a prepared dataset: every file checked against the record its writer took.

``reglue prepare`` and ``reglue cache-semantics`` record each file they write into a shard in the
shard's ``index.json`` (``files``: name → bytes and a BLAKE2b-128 checksum, taken while the file is
written, :func:`reglue.data.store.save_array`) and give the index a checksum of its own entries
(``index_blake2b``). The checks, cheapest first (docs/data-format.md, "Integrity"):

- :func:`check_sizes`: each index's checksum and the size of every file a reader needs (one ``stat``
  each); :class:`~reglue.data.PreparedDataset` runs it at every open;
- :func:`damaged_shards`: sizes and checksums of some files of some shards, in parallel; a rerun of
  ``prepare`` / ``cache-semantics`` runs it on the shards it would keep and redoes the damaged ones;
- :func:`verify_dataset` (``reglue verify``): every recorded checksum, files no record names, entries
  of ``shards/`` the manifest does not name, and the files beside the shards (settings, semantics
  record, norm stats, compressor, PCA); with ``reindex`` it also records the checksums of shards
  indexed before records existed.

Shards without records ("legacy", from an older reglue) are checked by size only: each ``.npy`` must
be as long as its header says (header + rows × row bytes), with as many rows as its index lists.

The checks of a finished dataset take its records as :func:`reglue.data.records.open_records` read them
once (manifest, shard indexes, side records): none of them reads those files again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reglue.data import store
from reglue.data.records import MISSING, DatasetRecords, ShardIndex, open_records, read_shard_index
from reglue.encoders.norm_stats import NORM_STATS_FIX
from reglue.errors import DamagedFileError
from reglue.io import CHECKSUM, DEFAULT_FIX, file_record, new_checksum, safetensors_problem, size_problem
from reglue.models.compressor import COMPRESSOR_FIX, PCA_FIX

log = logging.getLogger(__name__)

PREPARED_FILES = tuple(f"{name}.npy" for name in store.SHARD_ARRAYS)
CACHED_FILES = tuple(f"{name}.npy" for name in store.CACHED_ARRAYS)
SIDE_FIXES = {"norm_stats": NORM_STATS_FIX, "pca": PCA_FIX, "compressor": COMPRESSOR_FIX}  # by stem or folder
LEGACY_NOTICE = ("%s: %d of %d shards were indexed without checksums (by an older reglue): their files are "
                 "checked by size only until `reglue verify --reindex %s` records them")


@dataclass(frozen=True)
class Problem:
    """What is wrong with the file ``name`` of one shard. ``kind``: absent (neither file nor record),
    missing (recorded, no file), size, checksum, index (the index itself), unrecorded (a file of a
    known name that the index does not record), leftover (a temporary file of an interrupted run) or
    unknown (a name reglue never writes)."""

    name: str
    kind: str
    text: str


@dataclass
class ShardCheck:
    """The result of :func:`check_shard`: the problems, how many files and bytes were checked (read for
    checksums or sized), the rows the index lists (None when it does not parse) and whether it is legacy."""

    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    rows: int | None = None
    legacy: bool = False


@dataclass(frozen=True)
class Damage:
    """A damaged file of a dataset, what is wrong with it and the command that repairs it."""

    path: Path
    problem: str
    remedy: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}; {self.remedy}"


@dataclass
class VerifyReport:
    """What :func:`verify_dataset` found: every damaged file, and how much it checked how fast."""

    root: Path
    damaged: list[Damage]
    shards: int
    legacy_shards: int
    files: int
    bytes: int
    seconds: float
    reindexed_shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.damaged

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """One line: files, bytes, time, throughput and the verdict."""
        verdict = "all intact" if self.ok else f"{len(self.damaged)} damaged"
        reindexed = f"; recorded checksums of {self.reindexed_shards} shard(s)" if self.reindexed_shards else ""
        return (f"checked {self.files} files ({self.bytes / 1e9:.3f} GB) in {self.shards} shards of {self.root} in "
                f"{self.seconds:.1f} s ({self.gb_per_s:.2f} GB/s): {verdict}{reindexed}")

    def legacy_notice(self) -> str | None:
        """The line saying that legacy shards were checked by size only, or None."""
        unrecorded = self.legacy_shards - self.reindexed_shards
        return LEGACY_NOTICE % (self.root, unrecorded, self.shards, self.root) if unrecorded else None


# ----------------------------------------------------------------------------- one shard
def check_shard(shard: Path, index: ShardIndex, names: Iterable[str], *, checksums: bool = False,
                full: bool = False, progress: Callable[[int], None] | None = None) -> ShardCheck:
    """Check the files ``names`` (e.g. ``"images.npy"``) of one shard directory and its ``index.json``.

    Sizes always (against the record, or the ``.npy`` header in a legacy shard), checksums with
    ``checksums``; ``full`` adds every file the index records (legacy: every file of a known name) and
    reports files it does not. ``progress(bytes)`` follows the checksum reads. ``index``: the shard's
    index as read (:func:`reglue.data.records.read_shard_index`).
    """
    if index.problem is not None:
        kind = "missing" if index.problem == MISSING else "index"
        return ShardCheck([Problem(store.INDEX, kind, index.problem)])
    records, rows = index.files, index.rows
    present = {entry.name for entry in os.scandir(shard) if entry.is_file()} - {store.INDEX}
    known = set(records) if records is not None else present & {*PREPARED_FILES, *CACHED_FILES}
    wanted = set(names) | (known if full else set())
    check = ShardCheck(rows=rows, legacy=records is None)
    for name in sorted(wanted):
        problem, checked = _check_file(shard / name, (records or {}).get(name), rows, legacy=records is None,
                                       checksums=checksums, progress=progress)
        check.files += 1
        check.bytes += checked
        if problem is not None:
            check.problems.append(problem)
    if full:
        check.problems += [_stray(name, records is not None) for name in sorted(present - wanted)]
    return check


def _check_file(path: Path, record: dict | None, rows: int, *, legacy: bool, checksums: bool,
                progress: Callable[[int], None] | None) -> tuple[Problem | None, int]:
    """One file against its ``record`` (in a ``legacy`` shard, which has none, against its ``.npy``
    header); returns the problem or None, and the bytes checked."""
    name = path.name
    if not path.is_file():
        if record is None:
            return Problem(name, "absent", "missing"), 0
        return Problem(name, "missing", f"missing (index.json records {record['bytes']:,} bytes)"), 0
    if record is None and not legacy:
        return Problem(name, "unrecorded", "not recorded in index.json (left by an interrupted run?)"), 0
    size = path.stat().st_size
    expected = record["bytes"] if record else _npy_size(path, rows)
    if isinstance(expected, Problem):
        return expected, 0
    if size != expected:
        return Problem(name, "size", size_problem(size, expected)), 0
    if checksums and record:
        if file_record(path, progress)[CHECKSUM] != record[CHECKSUM]:
            return Problem(name, "checksum", "its checksum differs from the record: bytes changed in place"), size
    elif progress is not None:
        progress(size)
    return None, size


def _npy_size(path: Path, rows: int) -> int | Problem:
    """The size a ``.npy`` file's header promises (header + rows × row bytes), or the problem with it."""
    try:
        shape, dtype, header = store.npy_header(path)
    except (ValueError, KeyError, SyntaxError, EOFError) as err:
        return Problem(path.name, "size", f"its .npy header does not parse ({type(err).__name__}: {err})")
    if not shape or shape[0] != rows:
        return Problem(path.name, "size", f"holds {shape[0] if shape else 0} rows, index.json lists {rows}")
    return header + int(np.prod(shape)) * dtype.itemsize


def _stray(name: str, recorded_shard: bool) -> Problem:
    """What a file (or shard folder) that no record names is."""
    if name.startswith(".") and ".tmp" in name:
        return Problem(name, "leftover", "a temporary file of an interrupted run")
    if recorded_shard and name in (*PREPARED_FILES, *CACHED_FILES):
        return Problem(name, "unrecorded", "not recorded in index.json (left by an interrupted run?)")
    return Problem(name, "unknown", "not a file reglue writes")


# ----------------------------------------------------------------------------- a dataset
def required_files(records: DatasetRecords) -> tuple[str, ...]:
    """The files every shard must hold: prepare's arrays, and the cached ones once the cache is complete."""
    info = records.semantics_info or {}
    cached = info.get("fields", ()) if info.get("complete") else ()
    return PREPARED_FILES + tuple(f"{name}.npy" for name in cached)


def remedy(records: DatasetRecords, name: str, kind: str) -> str:
    """The command (or action) that repairs the shard file ``name`` with a problem of ``kind``."""
    if kind == "unknown":
        return "reglue did not write it: delete it, or move it out of the dataset"
    if kind == "leftover":
        return "delete it (the next run of the command that was writing deletes it too)"
    if name in CACHED_FILES:
        return records.cache_remedy()
    return records.prepare_remedy()


def check_sizes(records: DatasetRecords) -> None:
    """Refuse a dataset whose shard indexes are damaged or whose files are missing or of another size
    than recorded (a ``stat`` per file; legacy files: a header read), naming each file, the sizes and
    the command that repairs it. Every file the dataset holds is checked (prepare's arrays, and the
    cached ones once the cache is complete), not only the fields one reader asks for: a damaged cache
    is reported by the first command that opens the data. Legacy shards are announced in one log line."""
    root, names = records.root, required_files(records)
    damaged, legacy = [], 0
    for index, entry in enumerate(records.manifest["shards"]):
        check = check_shard(store.shard_dir(root, index), records.shards[index], names)
        damaged += _damages(records, index, check)
        legacy += check.legacy
    if legacy:
        log.info(LEGACY_NOTICE, root, legacy, len(records.shards), root)
    if damaged:
        more = f" (and {len(damaged) - 1} more damaged file(s): `reglue verify {root}` lists them)" if damaged[1:] else ""
        raise DamagedFileError(f"{damaged[0]}{more}")


def _damages(records: DatasetRecords, index: int, check: ShardCheck) -> list[Damage]:
    """The problems of shard ``index`` as :class:`Damage` (a row count other than the manifest's too)."""
    shard, count = store.shard_dir(records.root, index), records.manifest["shards"][index]["count"]
    found = [Damage(shard / p.name, p.text, remedy(records, p.name, p.kind)) for p in check.problems]
    if check.rows is not None and check.rows != count:
        found.append(Damage(shard / store.INDEX, f"lists {check.rows} rows, {store.MANIFEST} {count}",
                            records.prepare_remedy()))
    return found


def damaged_shards(root: Path, indices: Sequence[int], names: Iterable[str], *, workers: int | None = None
                   ) -> dict[int, list[Problem]]:
    """Sizes and checksums of the files ``names`` of shards ``indices``, checked in parallel; the
    problems of each damaged shard (``absent`` files included). For the writers' reruns, which meet shards
    before there is a manifest: each index is read here."""
    names = tuple(names)

    def check(index: int) -> ShardCheck:
        shard = store.shard_dir(root, index)
        return check_shard(shard, read_shard_index(shard), names, checksums=True)

    with ThreadPoolExecutor(_workers(workers)) as pool:
        checks = pool.map(check, indices)
        return {index: check.problems for index, check in zip(indices, checks) if check.problems}


def verify_dataset(data: str | Path | DatasetRecords, *, reindex: bool = False,
                   shards: Sequence[int] | None = None, workers: int | None = None,
                   progress: Callable[[int], None] | None = None,
                   planned: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every file of a dataset (``reglue verify``): shards in parallel (``workers`` threads, default
    one per CPU), every recorded checksum, unknown files, and the files beside the shards.

    ``data``: the dataset's folder, or its records as read already
    (:func:`~reglue.data.records.open_records`, e.g. by the training reader). ``reindex``: also record
    the checksums of legacy shards whose files are whole, under the dataset's lock (pass the folder: its
    records are then read under the lock too).
    ``shards``: only these, and nothing outside them (a training process's share). ``planned(total bytes)``
    is called once before, ``progress(bytes)`` while reading.
    """
    start = time.perf_counter()
    root = data.root if isinstance(data, DatasetRecords) else Path(data)
    lock = store.lock_directory(root) if reindex else contextlib.nullcontext()
    with lock:
        records = data if isinstance(data, DatasetRecords) else open_records(root)
        indices = range(len(records.shards)) if shards is None else shards
        damaged, names = _side_files(records) if shards is None else ([], required_files(records))
        dirs = [store.shard_dir(root, index) for index in indices]
        if planned is not None:
            planned(sum(entry.stat().st_size for d in dirs if d.is_dir() for entry in os.scandir(d)
                        if entry.is_file() and entry.name != store.INDEX))
        report = _locked(progress)
        with ThreadPoolExecutor(_workers(workers)) as pool:
            results = list(pool.map(lambda index: _verify_shard(records, index, names, reindex=reindex,
                                                                progress=report), indices))
    for index, (check, _) in zip(indices, results):
        damaged += _damages(records, index, check)
    if shards is None:
        damaged += _strays(records)
    checks = [check for check, _ in results]
    return VerifyReport(root=root, damaged=damaged, shards=len(dirs), legacy_shards=sum(c.legacy for c in checks),
                        files=sum(c.files for c in checks), bytes=sum(c.bytes for c in checks),
                        seconds=time.perf_counter() - start, reindexed_shards=sum(done for _, done in results))


def _verify_shard(records: DatasetRecords, index: int, names: tuple[str, ...], *, reindex: bool,
                  progress: Callable[[int], None] | None) -> tuple[ShardCheck, bool]:
    """:func:`check_shard` in full with checksums; with ``reindex`` a legacy shard without problems gets
    the records of its files. Returns the check and whether the shard was re-indexed."""
    shard, info = store.shard_dir(records.root, index), records.shards[index]
    legacy = reindex and info.legacy
    check = check_shard(shard, info, names, checksums=True, full=True, progress=None if legacy else progress)
    if not (legacy and not check.problems):
        return check, False
    files = sorted({entry.name for entry in os.scandir(shard) if entry.is_file()} - {store.INDEX})
    recorded = {name: file_record(shard / name, progress) for name in files}
    store.write_shard_info(shard, dict(info.entries, **{store.FILES: recorded}))
    return check, True


def _side_files(records: DatasetRecords) -> tuple[list[Damage], tuple[str, ...]]:
    """The damaged files beside the shards (records that do not parse, safetensors files whose frame
    is damaged), and the files every shard must hold."""
    root, damaged = records.root, []
    for name, record, fix in ((store.SETTINGS, records.settings_record, store.RECORD_REMEDY),
                              (store.SEMANTICS_INFO, records.semantics_record, store.SEMANTICS_REMEDY)):
        if record.problem is not None:
            damaged.append(Damage(root / name, record.problem, fix))
    names = PREPARED_FILES if records.semantics_record.problem is not None else required_files(records)
    for path in sorted([*root.glob("*.safetensors"), *root.glob("*/*.safetensors")]):
        if path.parent.name != store.SHARDS_DIR and (problem := safetensors_problem(path)):
            key = path.stem if path.parent == root else path.parent.name
            damaged.append(Damage(path, problem, SIDE_FIXES.get(key, DEFAULT_FIX).format(data=root)))
    return damaged, names


def _strays(records: DatasetRecords) -> list[Damage]:
    """Entries of ``shards/`` that the manifest does not name."""
    named = {entry["name"] for entry in records.manifest["shards"]}
    found = []
    for entry in sorted(os.scandir(records.root / store.SHARDS_DIR), key=lambda e: e.name):
        if entry.name not in named:
            problem = _stray(entry.name, recorded_shard=False)
            text = "a shard the manifest does not name" if problem.kind == "unknown" else problem.text
            found.append(Damage(Path(entry.path), text, remedy(records, entry.name, problem.kind)))
    return found


def _locked(progress: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """``progress`` callable from several threads at once."""
    if progress is None:
        return None
    lock = threading.Lock()

    def report(count: int) -> None:
        with lock:
            progress(count)

    return report


def _workers(workers: int | None) -> int:
    return workers or min(32, os.cpu_count() or 1)


def dataset_fingerprint(records: DatasetRecords) -> str:
    """BLAKE2b-128 of what a dataset holds, wherever its folder lies: the resolution and classes, and every
    shard's name, row count and file records (the bytes and checksum of each array; a shard indexed without
    records, by an older reglue: its index), from the records read when it was opened."""
    manifest, digest = records.manifest, new_checksum()
    digest.update(json.dumps([manifest["resolution"], manifest["num_classes"], manifest["class_names"]]).encode())
    for number, (entry, index) in enumerate(zip(manifest["shards"], records.shards)):
        if index.problem is not None:  # a dataset that passed check_sizes has none
            raise DamagedFileError(f"{store.shard_dir(records.root, number) / store.INDEX}: {index.problem}; "
                                   f"{records.prepare_remedy()}")
        contents = index.files or {key: value for key, value in index.entries.items()
                                   if key != store.INDEX_CHECKSUM}
        digest.update(json.dumps([entry["name"], entry["count"], contents], sort_keys=True).encode())
    return digest.hexdigest()
