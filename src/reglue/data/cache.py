"""``reglue cache-semantics``: store each image's VFM-derived targets beside its moments.

Per shard, in float16 (docs/data-format.md):

- ``semantics.npy`` (n, S, h, w): compressed local semantics at the VFM grid (16×16 at 256²);
- ``cls.npy`` (n, D): the VFM [CLS] token;
- ``repa.npy`` (n, 1 + h·w, D): REPA targets (only with ``repa_targets=True``; large).

Training then skips the VFM forward. Every file is written atomically and recorded in its
shard's ``index.json`` (size and checksum, :mod:`reglue.data.integrity`), so a rerun resumes
shard by shard and redoes a shard whose cached files are missing or damaged (it first checks the
checksums of the cached files it would keep, and of the images it would cache from).
``semantics.json`` at the dataset root records what produced the cache (VFM, compressor and
norm-stats checksums, and their paths); a rerun with different inputs is refused. Rank 0's parts
(the dataset's lock, ``semantics.json``) run in :func:`reglue.distributed.on_main`: when one fails,
every process stops with its cause.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from reglue.data import integrity, store
from reglue.distributed import on_rank_zero
from reglue.encoders.semantics import SemanticEncoder
from reglue.errors import DamagedFileError, InputError
from reglue.io import atomic_write, write_json

log = logging.getLogger(__name__)


def cached_fields(has_compressor: bool, repa_targets: bool) -> tuple[str, ...]:
    return ("semantics",) * has_compressor + ("cls",) + ("repa",) * repa_targets


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
    paths: dict[str, str] | None = None,
) -> int:
    """Cache ``encoder``'s targets for every shard of the dataset at ``root``; returns shards written.

    ``info`` (JSON-able) identifies the inputs (VFM spec, checksums); it is stored in
    ``semantics.json`` and must match on a rerun. ``paths`` (option name → file, e.g.
    ``{"compressor": ...}``) are recorded beside it, so that a damaged file's message can name
    the command that rebuilds it.
    """
    root = Path(root)
    with contextlib.ExitStack() as held:
        manifest = store.read_manifest(root)
        fields = cached_fields(encoder.compressor is not None, repa_targets)
        info_path = root / store.SEMANTICS_INFO

        def claim() -> None:  # rank 0 holds the dataset's lock, as prepare does: a prepare rerun or verify
            held.enter_context(store.lock_directory(root))  # --reindex cannot interleave with the index updates
            fix = (f"delete {info_path} and the shards' semantics/cls/repa .npy files to re-cache, or pass the "
                   "original compressor, norm stats, VFM and precision.")
            store.check_or_write_json(info_path, dict(info, fields=list(fields)), fix)

        on_rank_zero(rank, f"locking {root} and checking its {store.SEMANTICS_INFO}", claim)
        mine = range(rank, len(manifest["shards"]), world_size)
        todo = _shards_to_cache(root, list(mine), fields)
        for index in mine:
            count = manifest["shards"][index]["count"]
            if index in todo:
                _cache_shard(root, index, count, encoder, fields, batch_size=batch_size, device=device,
                             progress=progress, resolution=manifest["resolution"])
            elif progress is not None:
                progress(count)
        barrier()

        def complete() -> None:  # the reader accepts the cache only once every shard has it
            recorded = store.read_json(info_path, store.SEMANTICS_REMEDY)
            write_json(info_path, dict(recorded, complete=True, paths=paths or {}), sort_keys=True)

        on_rank_zero(rank, f"marking {info_path} complete", complete)
        return len(todo)


def _shards_to_cache(root: Path, indices: list[int], fields: tuple[str, ...]) -> set[int]:
    """The shards among ``indices`` whose cached files are absent or damaged (checksums checked); their
    images are checked too, since the cache is computed from them: damaged images are refused."""
    todo = integrity.damaged_shards(root, indices, [f"{name}.npy" for name in fields])
    for index, problems in todo.items():
        for problem in (p for p in problems if p.kind != "absent"):
            log.warning("%s: %s; caching %s again", store.shard_dir(root, index) / problem.name, problem.text,
                        store.shard_name(index))
    damaged_images = integrity.damaged_shards(root, sorted(todo), ("images.npy",))
    if damaged_images:
        index, problems = min(damaged_images.items())
        raise DamagedFileError(f"{store.shard_dir(root, index) / problems[0].name}: {problems[0].text}; the semantics "
                               f"are computed from it, so first {store.prepare_remedy(root)}")
    return set(todo)


def _cache_shard(root: Path, index: int, count: int, encoder: SemanticEncoder, fields: tuple[str, ...], *,
                 batch_size: int, device: torch.device | str, progress: Callable[[int], None] | None,
                 resolution: int) -> None:
    """Compute and write one shard's cached arrays, each atomically, then record them in its index."""
    images = store.open_array(root, index, "images")  # (n, R, R, 3) memory-mapped
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in fields}
    for start in range(0, count, batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2)
        targets = encoder(batch.to(device))
        for name in fields:
            outputs[name].append(_float16(getattr(targets, name), name, store.shard_dir(root, index)))
        if progress is not None:
            progress(len(batch))
    shard, records = store.shard_dir(root, index), {}
    for name in fields:
        with atomic_write(shard / f"{name}.npy") as tmp:
            records[f"{name}.npy"] = store.save_array(tmp, _stack(outputs[name], count, encoder, name, resolution))
    store.add_records(shard, records)


def _float16(values: torch.Tensor, name: str, shard: Path) -> np.ndarray:
    """``values`` in float16, the cache's dtype, or a ValueError naming the shard when a value is not
    finite or beyond float16's ±65,504 (the cast would store inf, and training would read it).

    DINOv2's CLS and REPA targets leave its final LayerNorm, so |x| ≤ max|γ|·√(D−1) + max|β|
    (docs/data-format.md: far inside the range); the compressed semantics have no such bound."""
    half = values.half()
    if bool(torch.isfinite(half).all()):
        return half.cpu().numpy()
    found = "are not finite (NaN or inf)" if not bool(torch.isfinite(values).all()) else (
        f"reach {values.abs().max().item():.4g}, beyond float16's ±65,504")
    raise InputError(f"{shard}: the {name} targets {found}; the cache stores float16. Check the VFM weights, the norm "
                     "stats and the compressor, or train with data.semantics=online, which stores nothing.")


def _stack(parts: list[np.ndarray], count: int, encoder: SemanticEncoder, name: str, resolution: int) -> np.ndarray:
    """Concatenate batches; an empty shard gets a correctly shaped empty array."""
    if parts:
        return np.concatenate(parts)
    probe = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8)
    shape = getattr(encoder(probe.to(next(encoder.extractor.parameters()).device)), name).shape[1:]
    return np.zeros((count, *shape), np.float16)
