"""``reglue cache-semantics``: store each image's VFM-derived targets beside its moments.

Per shard, in float16 (docs/data-format.md):

- ``semantics.npy`` (n, S, h, w): compressed local semantics at the VFM grid (16×16 at 256²);
- ``cls.npy`` (n, D): the VFM [CLS] token;
- ``repa.npy`` (n, 1 + h·w, D): REPA targets (only with ``repa_targets=True``; large).

Training then skips the VFM forward. Every file is written atomically, so a rerun resumes
shard by shard. ``semantics.json`` at the dataset root records what produced the cache (VFM,
compressor and norm-stats checksums); a rerun with different inputs is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from reglue.data import store
from reglue.encoders.semantics import SemanticEncoder
from reglue.io import atomic_write


def cached_fields(has_compressor: bool, repa_targets: bool) -> tuple[str, ...]:
    return ("semantics",) * has_compressor + ("cls",) + ("repa",) * repa_targets


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def cache_semantics(
    root: str | Path,
    encoder: SemanticEncoder,
    info: dict,
    *,
    repa_targets: bool = False,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Cache ``encoder``'s targets for every shard of the dataset at ``root``; returns shards written.

    ``info`` (JSON-able) identifies the inputs (VFM spec, checksums); it is stored in
    ``semantics.json`` and must match on a rerun.
    """
    root = Path(root)
    manifest = store.read_manifest(root)
    fields = cached_fields(encoder.compressor is not None, repa_targets)
    info_path = root / store.SEMANTICS_INFO
    fix = (f"delete {info_path} and the shards' semantics/cls/repa .npy files to re-cache, or pass the original "
           "compressor, norm stats, VFM and precision.")
    store.check_or_write_json(info_path, dict(info, fields=list(fields)), rank == 0, fix)
    barrier()
    written = 0
    for index in range(rank, len(manifest["shards"]), world_size):
        shard = store.shard_dir(root, index)
        count = manifest["shards"][index]["count"]
        if all((shard / f"{name}.npy").is_file() for name in fields):
            if progress is not None:
                progress(count)
            continue
        images = store.open_array(root, index, "images")  # (n, R, R, 3) memory-mapped
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in fields}
        for start in range(0, count, batch_size):
            batch = torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2)
            targets = encoder(batch.to(device))
            for name in fields:
                outputs[name].append(getattr(targets, name).half().cpu().numpy())
            if progress is not None:
                progress(len(batch))
        for name in fields:
            _save(shard / f"{name}.npy", _stack(outputs[name], count, encoder, name, manifest))
        written += 1
    barrier()
    if rank == 0:  # the reader accepts the cache only once every shard has it
        store.write_json_atomic(info_path, dict(json.loads(info_path.read_text()), complete=True))
    return written


def _stack(parts: list[np.ndarray], count: int, encoder: SemanticEncoder, name: str, manifest: dict) -> np.ndarray:
    """Concatenate batches; an empty shard gets a correctly shaped empty array."""
    if parts:
        return np.concatenate(parts)
    probe = torch.zeros(1, 3, manifest["resolution"], manifest["resolution"], dtype=torch.uint8)
    shape = getattr(encoder(probe.to(next(encoder.extractor.parameters()).device)), name).shape[1:]
    return np.zeros((count, *shape), np.float16)
