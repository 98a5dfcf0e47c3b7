"""What one training step feeds the joint loss, from a prepared dataset (SPEC §1, §3, §7).

For each image: the VAE latent z = (mean + std·ε)·0.18215 from its stored moments, the
semantic channels (compressed or PCA semantics upsampled to the latent grid), the VFM [CLS]
and the REPA target tokens. Semantics come either from the dataset's cache
(``data.semantics=cached``) or from the frozen VFM run on the stored images every step
(``online``, as the authors' trainer).

:func:`open_run_inputs` opens all of that for ``reglue train`` and checks the config against
the data and this machine before the run creates anything (see its docstring).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from reglue.config import ConfigError, RunConfig
from reglue.data import store
from reglue.data.dataset import PreparedDataset
from reglue.data.integrity import verify_dataset
from reglue.data.records import DatasetRecords, open_records
from reglue.distributed import on_cpu_only, process_state
from reglue.encoders.autoencoder import vae_fingerprint
from reglue.encoders.norm_stats import NORM_STATS_FILE
from reglue.encoders.semantics import (
    SemanticEncoder,
    VFMSpec,
    build_semantic_encoder,
    load_norm_stats_and_spec,
    upsample_semantics,
)
from reglue.encoders.vae import latents_from_moments
from reglue.errors import DamagedFileError
from reglue.io import file_sha256
from reglue.models.compressor import PCAProjection
from reglue.models.semantic_norm import SemanticNorm
from reglue.models.sit import PATCH_SIZES, sit_config
from reglue.precision import autocast_dtype
from reglue.presets import Preset, get_preset
from reglue.training.locations import input_fingerprints, read_inputs, with_absolute_paths

log = logging.getLogger(__name__)


@dataclass
class JointInputs:
    x0: torch.Tensor  # (B, 4 + S, h, w) clean latent ‖ semantics
    y: torch.Tensor  # (B,) labels, null label where unconditional
    cls_target: torch.Tensor | None  # (B, D)
    repa_target: torch.Tensor | None  # (B, T, D)


def required_targets(preset: Preset) -> tuple[str, ...]:
    """The VFM-derived arrays the preset needs: semantics, cls, repa."""
    return ("semantics",) * (preset.semantic_channels > 0) + ("cls",) * preset.cls_token + ("repa",) * preset.repa


def dataset_fields(config: RunConfig, preset: Preset) -> tuple[str, ...]:
    needed = required_targets(preset)
    if config.data.semantics == "online" and needed:
        return ("moments", "images")
    return ("moments", *needed)


@dataclass
class RunInputs:
    """What a run reads, opened and checked by :func:`open_run_inputs`."""

    config: RunConfig  # paths absolute; data.vfm the VFM that made the semantics; data.vae the decoding VAE
    dataset: PreparedDataset
    rows: np.ndarray  # (N,) the training rows of the dataset
    encoder: SemanticEncoder | None  # the frozen VFM (+ compressor / PCA) of data.semantics=online
    located: dict[str, dict]  # the inputs read, by key: {"path", "fingerprint"} (training/locations.py)


def open_run_inputs(config: RunConfig, recorded: dict | None = None) -> RunInputs:
    """Open the data of ``config`` and check the config against it and this machine; writes nothing.

    Whatever cannot work is a :class:`ConfigError` naming the key and the fix, before the run
    creates a file: fp16 without a GPU, missing or damaged data (every checksum with ``data.verify``),
    cached arrays or online files, a VFM other
    than ``data.vfm``, a compressor / PCA of other widths than the VFM and the preset, a SiT token
    grid other than the REPA targets' grid, a global batch larger than the training rows, a
    ``data.vae`` that is not the data's VAE. Paths are made absolute; ``recorded``: the inputs the
    checkpoint a run resumes from recorded (:func:`~reglue.training.locations.input_fingerprints`),
    which recognise the VFM weights at a new path once the old file is gone.
    """
    config = with_absolute_paths(config)
    if config.train.precision == "fp16" and on_cpu_only():
        raise ConfigError("train.precision: fp16 needs a GPU; use bf16 or fp32 on CPUs.")
    preset = get_preset(config.model.preset)
    dataset = open_training_dataset(config, preset)
    if config.data.verify:
        verify_training_data(dataset.records)
    rows = training_rows(dataset, config)
    if len(rows) < config.train.global_batch:
        raise ConfigError(
            f"train.global_batch {config.train.global_batch} exceeds the {len(rows)} training images; "
            "lower it or use more data."
        )
    config = _resolve_vfm(config, preset, dataset, recorded)
    config = replace(config, data=replace(config.data, vae=decoding_vae(config, dataset)))
    encoder = online_encoder(config, preset, dataset.manifest["resolution"])
    if encoder is not None and encoder.compressor is not None:
        _check_semantic_widths(config, preset, encoder)
    _check_token_grid(config, preset, dataset, encoder)
    norm_stats = norm_stats_path(config) if encoder is not None else None
    located = input_fingerprints(read_inputs(config, preset, norm_stats), dataset)
    return RunInputs(config, dataset, rows, encoder, located)


def verify_training_data(records: DatasetRecords) -> None:
    """``data.verify``: every file's checksum (as ``reglue verify``, on the records the reader opened), each
    process checking its share of the shards; damage anywhere stops every process with the list of damaged
    files and their remedies."""
    state, root = process_state(), records.root
    shards = range(state.process_index, len(records.shards), state.num_processes)
    report = verify_dataset(records, shards=shards)
    reports = gather_object([([str(damage) for damage in report.damaged], report.files, report.bytes, report.seconds)])
    damaged = [damage for found, *_ in reports for damage in found]
    if damaged:
        raise DamagedFileError(f"data.verify found {len(damaged)} damaged file(s) in {root}: " + " | ".join(damaged))
    if state.is_main_process:
        files, size, seconds = (sum(r[1] for r in reports), sum(r[2] for r in reports), max(r[3] for r in reports))
        log.info("data.verify: %d files (%.2f GB) of %s intact, checked in %.1f s (%.2f GB/s, %d processes)",
                 files, size / 1e9, root, seconds, size / 1e9 / max(seconds, 1e-9), state.num_processes)


def vfm_spec(value: dict) -> VFMSpec:
    """``data.vfm`` (VFMSpec fields; missing ones take VFMSpec's defaults) as a :class:`VFMSpec`; a
    ``reglue train-vfm`` folder as ``weights`` gives the name and architecture it records."""
    return VFMSpec.from_mapping(value)


def vfm_record(spec: VFMSpec) -> dict:
    """``spec`` as the ``data.vfm`` mapping a resolved config records (YAML-safe: lists, not tuples)."""
    return {**asdict(spec), "layers": None if spec.layers is None else list(spec.layers)}


def _resolve_vfm(config: RunConfig, preset: Preset, dataset: PreparedDataset, recorded: dict | None) -> RunConfig:
    """``config`` with ``data.vfm`` = the VFM that made the run's semantics; another one is refused.

    Cached: the VFM recorded in ``semantics.json`` (a ``data.vfm`` given is compared by the reader,
    see :func:`open_training_dataset`); online: the one recorded in the norm stats, or the same VFM
    with its weights at another path when they hold the same bytes (:func:`_same_weights`). Presets
    that read nothing from a VFM keep ``data.vfm`` as given.
    """
    if not required_targets(preset):
        return config
    if config.data.semantics == "cached":
        made_with = VFMSpec.from_json(dataset.semantics_info["vfm"])
    else:
        path = norm_stats_path(config)
        try:
            made_with = load_norm_stats_and_spec(path, resolution=dataset.manifest["resolution"])[1]
        except ValueError as err:
            raise ConfigError(f"data.norm_stats: {err}") from None
        asked = vfm_spec(config.data.vfm) if config.data.vfm is not None else made_with
        if asked != made_with:
            if replace(asked, weights=made_with.weights) != made_with:
                raise ConfigError(
                    f"data.vfm: the norm stats {path} were computed with VFM {made_with.to_json()} but the run asks "
                    f"for {asked.to_json()}; compute them with the run's VFM (`reglue norm-stats "
                    f"{config.data.dir} --vfm ... --vfm-weights ...`) or set data.vfm to match (null takes theirs)."
                )
            _same_weights(asked.weights, made_with.weights, path, recorded)
        made_with = asked
    return replace(config, data=replace(config.data, vfm=vfm_record(made_with)))


def _same_weights(new: str, old: str, norm_stats: Path, recorded: dict | None) -> None:
    """Refuse VFM weights at ``new`` unless they hold the bytes of ``old`` (the norm stats' record), or —
    ``old`` gone — of the weights the run's checkpoint recorded (``recorded``, moved inputs)."""
    if not Path(new).is_file():
        raise ConfigError(f"data.vfm.weights: {new} not found; point it at the VFM weights file.")
    if Path(old).is_file():
        if file_sha256(new) == file_sha256(old):
            return
        reason = f"holds other weights than {old}"
    elif recorded and "data.vfm.weights" in recorded:
        if file_sha256(new) == recorded["data.vfm.weights"]["fingerprint"]:
            return
        reason = f"holds other weights than the run read from {recorded['data.vfm.weights']['path']}"
    else:
        reason = f"cannot be compared with {old}, which is gone"
    raise ConfigError(
        f"data.vfm.weights: the norm stats {norm_stats} were computed with the VFM weights {old}; {new} {reason}. "
        "Point data.vfm.weights at a copy of those weights, or compute the norm stats (and the compressor / PCA) "
        f"again with these: `reglue norm-stats {Path(norm_stats).parent} --vfm-weights {new} ...`."
    )


def decoding_vae(config: RunConfig, dataset: PreparedDataset) -> str:
    """The VAE previews and evaluations decode with (``data.vae``): the one the data were encoded with,
    as the manifest records it, or — given — the same VAE at another path, recognised by the content
    fingerprint the manifest records (a dataset prepared before fingerprints were recorded: not checked,
    with a warning). Another VAE is a :class:`ConfigError`."""
    recorded, given = dataset.manifest["vae"], config.data.vae
    if given is None or given == recorded:
        return recorded
    expected = dataset.manifest.get("vae_fingerprint")
    if expected is None:
        log.warning("data.vae=%s: cannot check that it is %s, the VAE %s was encoded with (its manifest records no "
                    "fingerprint of it)", given, recorded, dataset.root)
        return given
    found = vae_fingerprint(given)
    if found != expected:
        what = f"content {found[:16]}" if found else "not a local folder or file"
        raise ConfigError(
            f"data.vae: {given} ({what}) is not the VAE {dataset.root} was encoded with ({recorded}, content "
            f"{expected[:16]}); point data.vae at a copy of that VAE, or leave it null."
        )
    return given


def norm_stats_path(config: RunConfig) -> Path:
    """The norm stats of ``data.semantics=online`` (they record the VFM); a missing file is refused."""
    path = Path(config.data.norm_stats or Path(config.data.dir) / NORM_STATS_FILE)
    if not path.is_file():
        raise ConfigError(f"data.norm_stats: {path} not found; data.semantics=online runs the VFM recorded there: "
                          f"run `reglue norm-stats {config.data.dir} --vfm-weights ...` or set data.norm_stats=PATH.")
    return path


def _check_semantic_widths(config: RunConfig, preset: Preset, encoder: SemanticEncoder) -> None:
    """The online compressor / PCA must give the preset's S channels (that it takes the VFM's channels
    is checked as it is loaded, :func:`~reglue.encoders.semantics.build_semantic_encoder`)."""
    module = encoder.compressor
    if isinstance(module, PCAProjection):
        key, path = "data.pca", config.data.pca
        fix = f"fit one on this VFM's features: `reglue fit-pca {config.data.dir} --rank {preset.semantic_channels}`"
    else:
        key, path = "data.compressor", config.data.compressor
        fix = (f"train one on this VFM's features with {preset.semantic_channels} output channels "
               f"(`reglue train-compressor {config.data.dir}`)")
    widths = module.widths
    if widths[1] != preset.semantic_channels:
        raise ConfigError(
            f"{key}: {path} maps {widths[0]} VFM channels to {widths[1]}, but the {preset.name} preset models "
            f"{preset.semantic_channels} semantic channels; {fix}."
        )


def _check_token_grid(config: RunConfig, preset: Preset, dataset: PreparedDataset,
                      encoder: SemanticEncoder | None) -> None:
    """The SiT's patch must divide the latent, and give the REPA targets' grid (the VFM's) for REPA."""
    name = config.model.name
    patch, latent = sit_config(name).patch_size, dataset.manifest["resolution"] // 8
    if latent % patch:
        raise ConfigError(f"model.name: {name}'s patch {patch} does not divide the {latent}×{latent} latent of "
                          f"{config.data.dir}; choose a patch size dividing {latent}.")
    if not preset.repa:
        return
    if encoder is not None:
        vfm_grid, where = encoder.extractor.grid_size, "of the online VFM"
    else:
        vfm_grid, where = math.isqrt(dataset[0]["repa"].shape[0] - 1), f"cached in {config.data.dir}"  # (1 + h·w, D)
    if latent // patch == vfm_grid:
        return
    fitting = latent // vfm_grid if latent % vfm_grid == 0 else None
    fix = (f"use patch {fitting} (model.name={name.rsplit('/', 1)[0]}/{fitting})" if fitting in PATCH_SIZES else
           f"no registered patch size {PATCH_SIZES} gives that grid; use a preset without REPA (sit, redi)")
    raise ConfigError(
        f"model.name: {name} cuts the {latent}×{latent} latent into a {latent // patch}×{latent // patch} token grid "
        f"(patch {patch}), but the REPA targets {where} lie on the VFM's {vfm_grid}×{vfm_grid} grid; {fix}."
    )


def open_training_dataset(config: RunConfig, preset: Preset) -> PreparedDataset:
    """The prepared dataset with the arrays this run reads; clear errors for what is missing.

    With cached semantics and ``data.vfm`` set, the reader refuses a cache made by another VFM. The dataset's
    records (manifest, shard indexes, side records) are read once, here; the checks, ``data.verify`` and the
    run's input fingerprint take them from the dataset (:func:`~reglue.data.records.open_records`)."""
    fields = dataset_fields(config, preset)
    try:
        records = open_records(config.data.dir)
    except FileNotFoundError as err:
        raise ConfigError(f"data.dir: {err}") from None
    try:
        store.prepared_resolution(config.data.dir, config.data.resolution, manifest=records.manifest)
    except ValueError as err:
        raise ConfigError(f"data.resolution: {err}") from None
    vfm = vfm_spec(config.data.vfm).to_json() if config.data.vfm is not None else None
    try:
        dataset = PreparedDataset(records, fields=fields, vfm=vfm)
    except FileNotFoundError as err:
        if config.data.semantics == "cached" and set(fields) & {"semantics", "cls", "repa"}:
            raise ConfigError(
                f"data.semantics=cached but {err} Either cache them (`reglue cache-semantics "
                f"{config.data.dir}{' --repa-targets' if preset.repa else ''}`) or set data.semantics=online."
            ) from None
        raise
    except DamagedFileError:
        raise
    except ValueError as err:  # the cache's VFM is not data.vfm
        raise ConfigError(f"data.vfm: {err} Or set data.vfm to the cache's VFM (null takes it).") from None
    if "semantics" in fields and len(dataset) and dataset[0]["semantics"].shape[0] != preset.semantic_channels:
        raise ConfigError(
            f"model.preset={preset.name} models {preset.semantic_channels} semantic channels but the cache in "
            f"{config.data.dir} holds {dataset[0]['semantics'].shape[0]}; cache the matching semantics "
            f"({'a compressor' if preset.semantics == 'compressor' else 'a PCA'} of that width) or change the preset."
        )
    return dataset


def training_rows(dataset: PreparedDataset, config: RunConfig) -> np.ndarray:
    """Row indices used for training: all, or a class-balanced subset (images per class or a fraction).

    Within each class the first rows in dataset order are kept, so the subset is deterministic.
    """
    per_class, fraction = config.data.images_per_class, config.data.fraction
    if per_class is None and fraction is None:
        return np.arange(len(dataset))
    labels = np.concatenate([store.open_array(dataset.root, i, "labels") for i in range(len(dataset.offsets) - 1)])
    keep = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = per_class if per_class is not None else max(1, round(len(rows) * fraction))
        keep.append(rows[:count])
    return np.sort(np.concatenate(keep))


class InputBuilder:
    """Turns a batch of dataset rows into :class:`JointInputs` on a device.

    ``norm``: the model's :class:`~reglue.models.semantic_norm.SemanticNorm` (``loss.semantic_norm``), which
    standardises the semantic channels and the CLS target with the statistics it holds when called."""

    def __init__(self, preset: Preset, dataset: PreparedDataset, latent_size: int, null_label: int,
                 unconditional: bool, encoder: SemanticEncoder | None, *, norm: SemanticNorm | None = None):
        self.preset = preset
        self.latent_size = latent_size
        self.null_label = null_label
        self.unconditional = unconditional or dataset.num_classes == 0
        self.encoder = encoder
        self.norm = norm

    def __call__(self, batch: dict[str, torch.Tensor], device: torch.device,
                 latent_noise: torch.Tensor | None = None) -> JointInputs:
        """``latent_noise`` (B, 4, h, w): the ε of z = (mean + std·ε)·scale (fresh when None)."""
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}  # async from pinned memory
        z = latents_from_moments(batch["moments"].float(), noise=latent_noise)  # (B, 4, h, w)
        targets = self._targets(batch)
        semantics, cls = self._semantic_targets(targets)
        if self.norm is not None:
            semantics, cls = self.norm(semantics, cls)
        parts = [z] if semantics is None else [z, semantics]
        y = batch["label"]
        if self.unconditional:
            y = torch.full_like(y, self.null_label)
        repa = targets["repa"].float() if self.preset.repa else None
        if repa is not None and not self.preset.cls_token:
            repa = repa[:, 1:]  # REPA without a CLS slot aligns the patch tokens only
        return JointInputs(torch.cat(parts, dim=1), y, cls, repa)

    def semantic_targets(self, batch: dict[str, torch.Tensor], device: torch.device
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The semantic channels (B, S, h, w) on the latent grid and the CLS target (B, D) of ``batch``,
        before ``norm``; None for a part the preset lacks. ``batch`` needs only the arrays they come from
        (cached semantics / cls, or the images of ``data.semantics=online``)."""
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return self._semantic_targets(self._targets(batch))

    def _semantic_targets(self, targets: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        semantics = cls = None
        if self.preset.semantic_channels:
            semantics = upsample_semantics(targets["semantics"].float(), self.latent_size)  # (B, S, h, w)
        if self.preset.cls_token:
            cls = targets["cls"].float()  # (B, D)
        return semantics, cls

    def _targets(self, batch) -> dict[str, torch.Tensor]:
        if self.encoder is None:
            return {k: batch[k] for k in ("semantics", "cls", "repa") if k in batch}
        online = self.encoder(batch["images"])
        return {"semantics": online.semantics, "cls": online.cls, "repa": online.repa}


def online_encoder(config: RunConfig, preset: Preset, resolution: int) -> SemanticEncoder | None:
    """The frozen VFM (+ compressor / PCA) for ``data.semantics=online``; None when not needed.

    ``config`` is validated (data.compressor / data.pca are set where the preset needs them)."""
    if config.data.semantics != "online" or not required_targets(preset):
        return None
    norm_stats = norm_stats_path(config)
    compressor = config.data.compressor if preset.semantics == "compressor" else None
    pca = config.data.pca if preset.semantics == "pca" else None
    for key, path, fix in (("data.compressor", compressor, "train one with `reglue train-compressor DATA`"),
                           ("data.pca", pca, "fit one with `reglue fit-pca DATA`")):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{key}: {path} not found; {fix} or correct the path.")
    dtype = autocast_dtype(config.data.vfm_precision)
    spec = vfm_spec(config.data.vfm) if config.data.vfm is not None else None  # resolved: the stats' VFM
    encoder, _ = build_semantic_encoder(norm_stats, compressor=compressor, pca=pca, spec=spec, resolution=resolution,
                                        autocast_dtype=dtype)
    return encoder
