"""Crash-safe file writing (nothing appears under its final name until it is complete), the record
of a file's size and checksum (taken while it is written), and checks of files users move."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from reglue.errors import DamagedFileError, InputError

CHECKSUM = "blake2b"  # the checksum's key in a file record: BLAKE2b with a 16-byte digest
READ_BLOCK = 8 << 20  # bytes per read while checksumming (hashlib releases the GIL on such blocks)
DEFAULT_FIX = "write it again, or copy it again from where it was made"


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def new_checksum():
    """An empty BLAKE2b-128 checksum (``update`` it, then ``hexdigest``): the ``blake2b`` of the records."""
    return hashlib.blake2b(digest_size=16)


class RecordingWriter:
    """A binary file open for writing whose ``write`` also feeds a checksum and a byte count, so the
    :meth:`record` of what was written costs no second pass over the file (``np.save(writer, array)``)."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.digest = new_checksum()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return self.handle.write(view)

    def record(self) -> dict:
        """``{"bytes": size, "blake2b": hex digest}`` of everything written."""
        return {"bytes": self.size, CHECKSUM: self.digest.hexdigest()}


def file_record(path: str | Path, progress: Callable[[int], None] | None = None) -> dict:
    """The :meth:`RecordingWriter.record` of a file; ``progress(bytes)`` after each block read."""
    digest = new_checksum()
    size = _digest_file(path, digest, progress)
    return {"bytes": size, CHECKSUM: digest.hexdigest()}


def _digest_file(path: str | Path, digest, progress: Callable[[int], None] | None = None) -> int:
    """Feed a file's bytes to ``digest`` (a hashlib object) in READ_BLOCK blocks; returns their count."""
    size = 0
    block = bytearray(READ_BLOCK)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(block):
            digest.update(view[:count])
            size += count
            if progress is not None:
                progress(count)
    return size


def size_problem(found: int, expected: int) -> str:
    """How a file of ``found`` bytes differs from the ``expected`` size, in words."""
    how = "truncated" if found < expected else "longer than written"
    return f"{found:,} bytes, expected {expected:,} ({how})"


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a ``.safetensors`` file's frame, or None: a header that does not parse, or a
    size other than 8 + header + the end of the last tensor the header describes (a cut-off copy)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > size - 8:
            return f"{size:,} bytes, too short for the header it starts with (truncated)"
        try:
            header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            return f"its header does not parse ({type(err).__name__}: {str(err)[:100]})"
    return size_problem(size, 8 + length + end) if size != 8 + length + end else None


def check_safetensors(path: str | Path, what: str, fix: str = DEFAULT_FIX) -> None:
    """Refuse a ``.safetensors`` file whose frame is damaged (:func:`safetensors_problem`), naming it,
    what it is (``what``) and ``fix``; files of other kinds pass."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file() and (problem := safetensors_problem(path)):
        raise DamagedFileError(f"{path} is not a readable {what} file: {problem}; {fix}.")


def read_tensor_file(path: str | Path, what: str, allowed: tuple = (), fix: str = DEFAULT_FIX) -> object:
    """Load a ``.safetensors`` file or a ``torch.save`` file (``weights_only``: no code runs).

    ``allowed`` lists extra classes/functions the pickle may name (``torch.serialization.safe_globals``).
    A file that is neither, or that names anything else, is a ValueError naming it and ``what``; a
    damaged ``.safetensors`` file (:func:`check_safetensors`) a :class:`DamagedFileError` ending in ``fix``.
    """
    import pickle
    import zipfile

    import safetensors
    import safetensors.torch
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found; check the path.")
    check_safetensors(path, what, fix)
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path))
        lazy = zipfile.is_zipfile(path)  # memory-map tensors: reading only ``args`` of a 10 GB file is cheap
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err) and "GLOBAL" not in str(err):
            raise InputError(f"{path} is not a readable {what} file: {str(err).strip().splitlines()[0][:200]}") from err
        raise InputError(
            f"{path} holds pickled objects a {what} file should not contain; reglue refuses to execute "
            f"pickled code, so it is refusing to load it. Re-save it as plain tensors. ({str(err).splitlines()[-1]})"
        ) from err
    except (safetensors.SafetensorError, RuntimeError, EOFError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise InputError(
            f"{path} is not a readable {what} file (a .safetensors, or a torch.save of tensors only): {reason}"
        ) from err


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    _digest_file(path, digest)
    return digest.hexdigest()


def existing_path(value: str) -> str:
    """``value`` as an absolute path when it names an existing file or folder, so that it stays valid from
    any working directory (symbolic links are kept, not resolved); anything else — a hub id, a keyword,
    a path that is not there — unchanged."""
    path = Path(value).expanduser()
    return os.path.abspath(path) if path.exists() else value


def path_fingerprint(path: str | Path) -> str:
    """Hex sha256 of what ``path`` holds, wherever it lies: a file's bytes, or for a directory (a
    diffusers model folder) the names and sha256 of its files, hidden ones left out, in name order."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(path).parts)):
        digest.update(f"{file.relative_to(path).as_posix()}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def write_json(path: str | Path, payload: dict, *, sort_keys: bool = False) -> None:
    """``payload`` as indented JSON at ``path``, atomically (keys sorted with ``sort_keys``)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n")


def read_safetensors_metadata(path: str | Path, what: str = "safetensors", fix: str = DEFAULT_FIX) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file's header ({} for other files or none); a
    damaged file is a :class:`DamagedFileError` naming it as a ``what`` file, ending in ``fix``."""
    import safetensors

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    check_safetensors(path, what, fix)
    try:
        with safetensors.safe_open(str(path), "pt") as handle:
            return dict(handle.metadata() or {})
    except safetensors.SafetensorError as err:
        raise InputError(f"{path} is not a readable {what} file ({err}); {fix}.") from err
