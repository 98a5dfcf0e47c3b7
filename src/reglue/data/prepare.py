"""``reglue prepare``: an image folder or zip → a training-ready dataset directory.

Each source image is read robustly (:mod:`reglue.data.images`), ADM centre-cropped to
R×R, and encoded by the SD-VAE to posterior moments; results are written as fixed-size
shards (:mod:`reglue.data.store`). Shard k holds the sources with sorted positions
[k·S, (k+1)·S), minus the files that had to be skipped, so the output depends only on the
source and the settings — not on the number of processes or on interruptions:

- rerunning after an interruption (even ``kill -9``) keeps completed shards whose files match
  their records (sizes and checksums, :mod:`reglue.data.integrity`) and redoes the rest, giving
  byte-identical files; a shard damaged since (truncated, overwritten, a file lost) is redone too;
- with several processes (``accelerate launch``), rank r writes shards k ≡ r (mod world);
  rank 0 writes the manifest once every shard is complete. Rank 0's parts (the directory's lock,
  ``settings.json``, the manifest) run in :func:`reglue.distributed.on_main`: when one fails, every
  process stops with its cause.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import reglue
from reglue.data import integrity, store
from reglue.data.images import BadImageError
from reglue.data.source_dataset import read_crop
from reglue.data.sources import ImageSource, open_source, source_fingerprint
from reglue.distributed import on_rank_zero, process_state
from reglue.encoders.autoencoder import load_vae, vae_fingerprint, vae_location
from reglue.errors import InputError
from reglue.io import write_json
from reglue.precision import DTYPES
from reglue.progress import progress_bar
from reglue.resolution import DEFAULT_RESOLUTION, check_resolution

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PrepareSettings:
    """Everything that determines the output; a rerun into the same directory must match."""

    source: str
    resolution: int = DEFAULT_RESOLUTION
    vae: str = "stabilityai/sd-vae-ft-ema"
    max_images: int | None = None
    shard_size: int = 1000
    min_size: int = 32
    vae_dtype: str = "fp32"  # the VAE's compute precision: fp32, fp16 or bf16

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", str(Path(self.source).expanduser().resolve()))
        object.__setattr__(self, "vae", vae_location(self.vae))  # a local VAE's path, valid from any directory
        if self.vae_dtype not in DTYPES:
            raise InputError(f"vae_dtype must be one of {', '.join(DTYPES)}, found {self.vae_dtype!r}.")
        check_resolution(self.resolution)
        if self.shard_size < 1:
            raise InputError(f"shard_size must be >= 1, found {self.shard_size}.")
        if self.max_images is not None and self.max_images < 1:
            raise InputError(f"max_images must be >= 1, found {self.max_images}.")


@dataclass
class PrepareSummary:
    images: int
    skipped: int
    ignored: int
    shards: int
    resumed_shards: int


def shard_ranges(num_items: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard over the sorted source items."""
    return [(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]


def _crop_shard(source: ImageSource, items, settings: PrepareSettings):
    """Read and crop one shard's files; returns images (n, R, R, 3), labels, kept paths, skips."""
    images, labels, kept, skipped = [], [], [], []
    for item in items:
        try:
            images.append(read_crop(source, item, settings.resolution, settings.min_size))
        except BadImageError as err:  # unreadable, too small, ...: skip, never crash
            skipped.append({"path": item.path, "reason": err.reason})
            continue
        labels.append(item.label)
        kept.append(item.path)
    R = settings.resolution
    array = np.stack(images) if images else np.zeros((0, R, R, 3), np.uint8)
    return array, np.asarray(labels, np.int64), kept, skipped


def _encode(vae, images: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 (n, R, R, 3) -> float32 moments (n, 8, R/8, R/8)."""
    R = images.shape[1]
    if len(images) == 0:
        return np.zeros((0, 8, R // 8, R // 8), np.float32)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    return vae.encode_moments(pixels, batch_size=batch_size).float().cpu().numpy()


def prepare_dataset(
    settings: PrepareSettings,
    dst: str | Path,
    vae,
    *,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: Callable[[int], None] | None = None,
    source: ImageSource | None = None,
) -> PrepareSummary:
    """Prepare (or resume preparing) ``dst`` from ``settings.source`` with ``vae``.

    ``vae.encode_moments(uint8 (B, 3, R, R)) -> (B, 8, R/8, R/8)``; ``progress(n)`` is called
    after each of this rank's shards, written or kept intact, with the number of source files it
    covers. ``source``: the already opened ``settings.source``, if the caller has it.
    """
    dst = Path(dst)
    source = source if source is not None else open_source(settings.source)
    items = source.items[: settings.max_images]
    shards = shard_ranges(len(items), settings.shard_size)
    wanted = dict(asdict(settings), format_version=store.FORMAT_VERSION, **source_fingerprint(items))
    fix = "rerun with the original settings and source to resume, or choose a new output directory."
    with contextlib.ExitStack() as held:

        def claim() -> None:  # rank 0 holds the directory's lock until the end, so no other job writes into it
            held.enter_context(store.lock_directory(dst))
            store.check_or_write_json(dst / store.SETTINGS, wanted, fix)
            if removed := store.remove_leftovers(dst):
                log.info("removed %d temporary file(s) of an interrupted run", removed)

        on_rank_zero(rank, f"locking {dst} and checking its {store.SETTINGS}", claim)
        mine = range(rank, len(shards), world_size)
        _discard_damaged(dst, [index for index in mine if store.shard_dir(dst, index).is_dir()])
        resumed = 0
        for index in mine:
            shard_items = items[slice(*shards[index])]
            if store.shard_is_complete(dst, index):
                resumed += 1
            else:
                images, labels, kept, skipped = _crop_shard(source, shard_items, settings)
                moments = _encode(vae, images, batch_size)
                arrays = {"images": images, "moments": moments, "labels": labels}
                store.write_shard(dst, index, arrays, {"sources": kept, "skipped": skipped})
            if progress is not None:
                progress(len(shard_items))
        barrier()
        summary = on_rank_zero(rank, f"writing {dst / store.MANIFEST}", lambda: _finalize(
            dst, settings, source, range(len(shards)), write=True))
        summary = summary or _finalize(dst, settings, source, range(rank, len(shards), world_size), write=False)
    summary.resumed_shards = resumed
    return summary


def _discard_damaged(dst: Path, present: list[int]) -> None:
    """Check the files of the ``present`` shards (index, sizes and checksums, in parallel) and delete
    the damaged shards, which are then written again: a rerun repairs exactly what was damaged."""
    damaged = integrity.damaged_shards(dst, present, integrity.PREPARED_FILES)
    cached = f"; its cached semantics go with it: then {store.cache_remedy(dst)}" if damaged and (
        dst / store.SEMANTICS_INFO).is_file() else ""
    for index, problems in damaged.items():
        log.warning("%s: %s; writing %s again%s", store.shard_dir(dst, index) / problems[0].name, problems[0].text,
                    store.shard_name(index), cached)
        store.discard_shard(dst, index)


def _finalize(dst: Path, settings: PrepareSettings, source: ImageSource, indices: range, write: bool):
    """Sum up ``indices``' shards; with ``write`` (rank 0, all shards) also write the manifest
    and the skipped-files report."""
    shards, skipped = [], []
    for index in indices:
        info = store.read_shard_info(dst, index)
        shards.append({"name": store.shard_name(index), "count": len(info["sources"])})
        skipped.extend(info["skipped"])
    images = sum(s["count"] for s in shards)
    if write:
        store.write_skipped(dst / store.SKIPPED, skipped)
        write_json(dst / store.MANIFEST, _manifest(settings, source, shards, images, skipped), sort_keys=True)
    return PrepareSummary(images, len(skipped), source.ignored, len(indices), 0)


def _manifest(settings, source, shards, images, skipped) -> dict:
    import PIL

    R = settings.resolution
    return {
        "format": store.FORMAT_NAME,
        "format_version": store.FORMAT_VERSION,
        "source": settings.source,
        "resolution": R,
        "vae": settings.vae,
        "vae_fingerprint": vae_fingerprint(settings.vae),  # a moved VAE folder is recognised by its content
        "vae_dtype": settings.vae_dtype,
        "arrays": {
            "images": {"dtype": "uint8", "shape": [R, R, 3]},
            "moments": {"dtype": "float32", "shape": [8, R // 8, R // 8]},
            "labels": {"dtype": "int64", "shape": []},
        },
        "num_images": images,
        "num_skipped": len(skipped),
        "num_ignored": source.ignored,
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "shards": shards,
        "versions": {"reglue": reglue.__version__, "torch": torch.__version__.split("+")[0],
                     "numpy": np.__version__, "pillow": PIL.__version__},
    }


def run_prepare(
    settings: PrepareSettings, dst: str | Path, *, batch_size: int = 32, show_progress: bool = True,
) -> PrepareSummary:
    """Prepare with the VAE named in ``settings`` (``"pixel"``: the weight-free pixel autoencoder)
    on this process's device; works alone or under ``accelerate launch`` / ``torchrun`` (each
    rank writes its own shards)."""
    state = process_state()
    source = open_source(settings.source)  # fail fast on a bad source, before loading the VAE
    vae = load_vae(settings.vae, dtype=DTYPES[settings.vae_dtype]).to(state.device)
    shards = shard_ranges(len(source.items[: settings.max_images]), settings.shard_size)
    mine = sum(stop - start for start, stop in shards[state.process_index :: state.num_processes])
    bar = progress_bar(total=mine, unit="img", desc="prepare", enabled=show_progress and state.is_main_process)
    with bar:
        return prepare_dataset(settings, dst, vae, batch_size=batch_size, rank=state.process_index,
                               world_size=state.num_processes, barrier=state.wait_for_everyone,
                               progress=bar.update, source=source)
