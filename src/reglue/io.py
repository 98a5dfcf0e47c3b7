"""Crash-safe file writing: nothing appears under its final name until it is complete."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path


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


def read_tensor_file(path: str | Path, what: str, allowed: tuple = ()) -> object:
    """Load a ``.safetensors`` file or a ``torch.save`` file (``weights_only``: no code runs).

    ``allowed`` lists extra classes/functions the pickle may name (``torch.serialization.safe_globals``).
    A file that is neither, or that names anything else, is a ValueError naming it and ``what``.
    """
    import pickle
    import zipfile

    import safetensors
    import safetensors.torch
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found; check the path.")
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path))
        lazy = zipfile.is_zipfile(path)  # memory-map tensors: reading only ``args`` of a 10 GB file is cheap
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err) and "GLOBAL" not in str(err):
            raise ValueError(f"{path} is not a readable {what} file: {str(err).strip().splitlines()[0][:200]}") from err
        raise ValueError(
            f"{path} holds pickled objects a {what} file should not contain; reglue refuses to execute "
            f"pickled code, so it is refusing to load it. Re-save it as plain tensors. ({str(err).splitlines()[-1]})"
        ) from err
    except (safetensors.SafetensorError, RuntimeError, EOFError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} is not a readable {what} file (a .safetensors, or a torch.save of tensors only): {reason}"
        ) from err


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | Path, payload: dict) -> None:
    """``payload`` as indented JSON at ``path``, atomically."""
    import json

    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def read_safetensors_metadata(path: str | Path, what: str = "safetensors") -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file's header ({} for other files or none); a
    header that does not parse is a ValueError naming the file as a ``what`` file."""
    import safetensors

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safetensors.safe_open(str(path), "pt") as handle:
            return dict(handle.metadata() or {})
    except safetensors.SafetensorError as err:
        raise ValueError(f"{path} is not a readable {what} file ({err}); rewrite it.") from err
