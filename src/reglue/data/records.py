"""A prepared dataset's records, read once when it is opened: the one object its checks and its reader take.

A dataset describes itself in a few small files (docs/data-format.md): ``manifest.json`` (the shards and
their row counts), each shard's ``index.json`` (its rows and the record, size and BLAKE2b, of each of
its files), ``settings.json`` (the prepare settings) and ``semantics.json`` (what made the semantic
cache). :func:`open_records` reads each of them once into :class:`DatasetRecords`; the size check and
``reglue verify`` (:mod:`reglue.data.integrity`), the training reader
(:class:`~reglue.data.dataset.PreparedDataset`), the dataset's fingerprint and the remedies that name
the repairing command all take that object, so opening a run's data reads none of them twice.

Of a shard's index only what a reader or a check uses is kept (row count, file records): ImageNet's
1,282 indexes list 1.28 M source paths, ≈ 150 MB of Python strings that every process and every loader
worker would otherwise hold. A shard indexed without records (by an older reglue) keeps its whole index,
which its fingerprint and ``reglue verify --reindex`` need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reglue.data import store
from reglue.errors import DamagedFileError

MISSING = "missing"  # the problem of a shard whose index.json does not exist


@dataclass(frozen=True)
class ShardIndex:
    """A shard's ``index.json`` as read: its row count and file records, or what is wrong with it."""

    rows: int = 0
    files: dict[str, dict] | None = None  # {file name: {"bytes", "blake2b"}}; None: indexed without records
    entries: dict | None = None  # the whole index, kept only when it records no files (legacy)
    problem: str | None = None  # MISSING, or why it cannot be used (unparsable, checksum mismatch)

    @property
    def legacy(self) -> bool:
        return self.problem is None and self.files is None


def read_shard_index(shard: Path) -> ShardIndex:
    """The index of the shard directory ``shard``, or a :class:`ShardIndex` naming what is wrong with it."""
    path = shard / store.INDEX
    if not path.is_file():
        return ShardIndex(problem=MISSING)
    try:
        info = json.loads(path.read_text())
        rows = len(info["sources"])
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
        return ShardIndex(problem=f"does not parse as a shard index ({type(err).__name__}: {err})")
    files = info.get(store.FILES)
    if files is not None and info.get(store.INDEX_CHECKSUM) != store.index_checksum(info):
        return ShardIndex(problem=f"its entries do not match its checksum ({store.INDEX_CHECKSUM}): "
                                  "edited or damaged")
    return ShardIndex(rows=rows, files=files, entries=None if files else info)


@dataclass(frozen=True)
class SideRecord:
    """A JSON record beside the shards (``settings.json``, ``semantics.json``) as read: its value, or
    why it does not parse; ``present`` False when the file does not exist."""

    present: bool
    value: object = None
    problem: str | None = None


def _read_side(path: Path) -> SideRecord:
    if not path.is_file():
        return SideRecord(present=False)
    value, problem = store.parse_json(path)
    return SideRecord(present=True, value=value, problem=problem)


@dataclass(frozen=True)
class DatasetRecords:
    """What the prepared dataset at ``root`` records about itself, read once (:func:`open_records`)."""

    root: Path
    manifest: dict
    shards: tuple[ShardIndex, ...]  # in the manifest's order
    settings_record: SideRecord  # settings.json
    semantics_record: SideRecord  # semantics.json

    @property
    def settings(self) -> dict:
        """``settings.json``: the settings the dataset was prepared with; a missing or damaged one is a
        :class:`DamagedFileError` naming it."""
        record, path = self.settings_record, self.root / store.SETTINGS
        if not record.present or record.problem is not None or not isinstance(record.value, dict):
            problem = "missing" if not record.present else record.problem or "is not a JSON object"
            raise DamagedFileError(f"{path} {problem}; {store.RECORD_REMEDY}")
        return record.value

    @property
    def semantics_info(self) -> dict | None:
        """What produced the cached semantics (``semantics.json``), None without a cache; a damaged one is
        a :class:`DamagedFileError` naming it and what to do."""
        record = self.semantics_record
        if record.problem is not None:
            path = self.root / store.SEMANTICS_INFO
            raise DamagedFileError(f"{path} {record.problem}; {store.SEMANTICS_REMEDY}")
        return record.value if record.present else None

    def prepare_remedy(self) -> str:
        """The command that rebuilds the shards (:func:`reglue.data.store.prepare_remedy`), from the
        settings read at opening."""
        recorded = self.settings_record.value if isinstance(self.settings_record.value, dict) else {}
        return store.prepare_remedy(self.root, settings=recorded)

    def cache_remedy(self) -> str:
        """The command that rebuilds the cached semantics (:func:`reglue.data.store.cache_remedy`), from
        the record read at opening."""
        recorded = self.semantics_record.value if isinstance(self.semantics_record.value, dict) else {}
        return store.cache_remedy(self.root, info=recorded)


def open_records(root: str | Path) -> DatasetRecords:
    """Read the records of the prepared dataset at ``root``: its manifest (checked for format and version;
    a missing one is a FileNotFoundError saying how to make it), every shard's index, ``settings.json`` and
    ``semantics.json``. Problems of the indexes and side records are kept, for the checks to report."""
    root = Path(root)
    manifest = store.read_manifest(root)
    shards = tuple(read_shard_index(store.shard_dir(root, index)) for index in range(len(manifest["shards"])))
    return DatasetRecords(root=root, manifest=manifest, shards=shards,
                          settings_record=_read_side(root / store.SETTINGS),
                          semantics_record=_read_side(root / store.SEMANTICS_INFO))

