"""The data-pipeline steps after ``prepare``, as functions the CLI (or a notebook) calls.

Each step reads what the previous one wrote, so the VFM is named once (at ``norm-stats``)
and recorded in the stats file's metadata; later steps rebuild the same VFM from it.

    norm-stats DATA          → DATA/norm_stats.safetensors        (records the VFM)
    train-compressor DATA    → DATA/compressor/compressor_{best,final}.safetensors
    fit-pca DATA             → DATA/pca.safetensors                (ReDi preset)
    cache-semantics DATA     → per-shard semantics/cls[/repa] .npy
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from reglue.data.cache import cache_semantics
from reglue.data.dataset import PreparedDataset, random_subset
from reglue.data.store import read_manifest
from reglue.distributed import on_main, process_state
from reglue.encoders.norm_stats import NORM_STATS_FILE, compute_norm_stats
from reglue.encoders.semantics import (
    VFMSpec,
    build_semantic_encoder,
    load_norm_stats_and_spec,
)
from reglue.errors import InputError
from reglue.io import file_sha256
from reglue.models.compressor import PCAProjection
from reglue.precision import AUTO, autocast_dtype
from reglue.precision import check as check_precision
from reglue.progress import progress_bar
from reglue.training.compressor import CompressorSettings, train_compressor

log = logging.getLogger(__name__)

PCA_FILE = "pca.safetensors"
COMPRESSOR_DIR = "compressor"
OFFICIAL_NORM_STATS_IMAGES = 300 * 256
NORM_STATS_SEED = 0  # the seeded subset of images behind the norm stats


@dataclass(frozen=True, kw_only=True)
class FeatureSettings:
    """How a command runs the frozen VFM over a prepared dataset (norm-stats, fit-pca, cache-semantics).

    ``vfm``: VFMSpec fields ``{name, weights, layers, arch}`` (``--vfm``, ``--vfm-weights``, ...); None: the
    VFM the norm stats record (norm-stats itself needs one). ``micro_batch``: images per VFM call (memory
    only). ``precision``: the VFM's autocast, fp32 | bf16 | fp16 | auto.
    """

    vfm: dict | None = None
    micro_batch: int = 64
    precision: str = AUTO

    def __post_init__(self) -> None:
        for name in ("micro_batch", "num_images", "rank"):  # the counts a subclass has
            if getattr(self, name, 1) < 1:
                raise InputError(f"{name} must be >= 1, found {getattr(self, name)}.")
        check_precision(self.precision)

    def spec(self, *, required: bool, default_name: str = "dinov2_vitb14_reg") -> VFMSpec | None:
        """The VFM (resolved), or None when none is given and none is ``required``."""
        if self.vfm is None and not required:
            return None
        return VFMSpec.from_mapping(self.vfm or {}, default_name)


@dataclass(frozen=True, kw_only=True)
class NormStatsSettings(FeatureSettings):
    num_images: int = OFFICIAL_NORM_STATS_IMAGES  # the seeded random subset


@dataclass(frozen=True, kw_only=True)
class PCASettings(FeatureSettings):
    rank: int = 8
    num_images: int = 10_000


@dataclass(frozen=True, kw_only=True)
class CacheSettings(FeatureSettings):
    repa_targets: bool = False  # also cache the REPA targets (≈386 KiB per 256² image)


def run_norm_stats(
    data: str | Path, spec: VFMSpec, *, out: str | Path | None = None, num_images: int = OFFICIAL_NORM_STATS_IMAGES,
    batch_size: int = 64, autocast_dtype: torch.dtype | None = None, show_progress: bool = True,
) -> Path:
    """Compute the VFM layer-map stats of ``data`` and save them (with the VFM spec) to ``out``.

    Under several processes the main one computes while the others wait (:func:`reglue.distributed.on_main`)."""
    state = process_state()
    out = Path(out) if out is not None else Path(data) / NORM_STATS_FILE

    def compute() -> None:
        dataset = PreparedDataset(data, fields=("images",))
        extractor = spec.build(dataset.manifest["resolution"], autocast_dtype).to(state.device)
        metadata = {"vfm": spec.to_json(), "resolution": str(dataset.manifest["resolution"]),
                    "layers": ",".join(map(str, extractor.layers)), "seed": str(NORM_STATS_SEED)}
        subset = random_subset(dataset, num_images, seed=NORM_STATS_SEED)  # index order: memory-map locality
        with progress_bar(total=len(subset), desc="norm-stats", unit="img", enabled=show_progress) as bar:
            stats = compute_norm_stats(subset, extractor, batch_size=batch_size, device=state.device,
                                       progress=bar.update, metadata=metadata)
        stats.save(out)

    on_main(f"computing the norm stats {out}", compute)
    return out


def run_fit_pca(
    data: str | Path, norm_stats: str | Path, *, rank: int = 8, out: str | Path | None = None,
    num_images: int = 10_000, batch_size: int = 64, spec: VFMSpec | None = None,
    autocast_dtype: torch.dtype | None = None, show_progress: bool = True,
) -> Path:
    """Fit ReDi's PCA on the z-scored VFM maps of a seeded subset of ``data``.

    Under several processes the main one fits while the others wait (:func:`reglue.distributed.on_main`)."""
    from torch.utils.data import DataLoader

    state = process_state()
    out = Path(out) if out is not None else Path(data) / PCA_FILE

    def fit() -> None:
        dataset = PreparedDataset(data, fields=("images",))
        stats, vfm = load_norm_stats_and_spec(norm_stats, spec, resolution=dataset.manifest["resolution"])
        extractor = vfm.build(dataset.manifest["resolution"], autocast_dtype).to(state.device)
        subset = random_subset(dataset, num_images)
        loader = DataLoader(subset, batch_size=batch_size)

        def token_batches():
            with progress_bar(total=len(subset), desc="fit-pca", unit="img", enabled=show_progress) as bar:
                for batch in loader:
                    maps = stats.normalize(extractor(batch["images"].to(state.device)).local)  # (B, C, h, w)
                    bar.update(len(maps))
                    yield maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])  # (B·h·w, C)

        PCAProjection.fit(token_batches(), rank).save(out, {"resolution": dataset.manifest["resolution"],
                                                            "vfm": vfm.to_json()})

    on_main(f"fitting the PCA {out}", fit)
    return out


def run_train_compressor(
    data: str | Path, norm_stats: str | Path, out_dir: str | Path | None = None, *,
    settings: CompressorSettings = CompressorSettings(), **options,
):
    """Train the semantic compressor on ``data`` with the VFM recorded in ``norm_stats``.

    ``settings`` (:class:`~reglue.training.compressor.CompressorSettings`) and ``options`` (val_data,
    resume, progress) go to :func:`reglue.training.compressor.train_compressor`. Returns its ``CompressorRun``.
    """
    resolution = read_manifest(data)["resolution"]
    spec = VFMSpec.from_mapping(settings.vfm) if settings.vfm is not None else None
    stats, spec = load_norm_stats_and_spec(norm_stats, spec, resolution=resolution)
    device = process_state().device
    extractor = spec.build(resolution, autocast_dtype(settings.vfm_precision, device)).to(device)

    out_dir = Path(out_dir) if out_dir is not None else Path(data) / COMPRESSOR_DIR
    inputs = {"vfm": spec.to_json(), "norm_stats_sha256": file_sha256(norm_stats)}
    return train_compressor(data, out_dir, extractor, stats, inputs=inputs, **settings.training_options(), **options)


def run_cache_semantics(
    data: str | Path, norm_stats: str | Path | None, *, compressor: str | Path | None = None,
    pca: str | Path | None = None, repa_targets: bool = False, batch_size: int = 64,
    spec: VFMSpec | None = None, autocast_dtype: torch.dtype | None = None, show_progress: bool = True,
) -> int:
    """Cache compressed semantics, CLS (and REPA targets) for every image of ``data``."""
    state = process_state()
    manifest = read_manifest(data)
    encoder, info = build_semantic_encoder(norm_stats, compressor=compressor, pca=pca, spec=spec,
                                           resolution=manifest["resolution"], autocast_dtype=autocast_dtype)
    encoder.to(state.device)
    mine = sum(s["count"] for s in manifest["shards"][state.process_index :: state.num_processes])
    given = {"norm_stats": norm_stats, "compressor": compressor, "pca": pca}
    paths = {key: str(Path(value).resolve()) for key, value in given.items() if value is not None}
    with progress_bar(total=mine, desc="cache-semantics", unit="img", enabled=show_progress and state.is_main_process) as bar:
        return cache_semantics(data, encoder, info, repa_targets=repa_targets, batch_size=batch_size,
                               device=state.device, rank=state.process_index, world_size=state.num_processes,
                               barrier=state.wait_for_everyone, progress=bar.update, paths=paths)
