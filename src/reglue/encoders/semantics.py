"""From images to the semantic parts of REGLUE's joint state (SPEC §1, §4-§5).

- :class:`VFMSpec` names a VFM (registry name, weights file, blocks, test-size overrides) in
  a JSON-able form; ``reglue norm-stats`` records it so later steps rebuild the same VFM.
- :class:`SemanticEncoder` = frozen VFM → z-scored multi-layer maps → frozen compressor (or
  PCA): uint8 images (B, 3, R, R) → :class:`SemanticTargets`: ``semantics`` (B, S, h, w) at
  the VFM grid, ``cls`` (B, D) and ``repa`` (B, 1 + h·w, D).
- :func:`build_semantic_encoder` assembles one from the files of a prepared dataset (norm stats,
  compressor or PCA) and records what it was built from.
- :func:`upsample_semantics` brings (B, S, h, w) to the latent grid (bilinear, align_corners
  False), R/16 → R/8 per side, e.g. 16×16 → 32×32 at 256², 8×8 → 16×16 at 128².
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from reglue.encoders.norm_stats import NormStats
from reglue.encoders.vfm import VFM_MODELS, VFMExtractor, build_vfm, default_layers, vfm_family
from reglue.errors import InputError
from reglue.io import file_sha256, read_safetensors_metadata, read_tensor_file
from reglue.models.compressor import COMPRESSOR_FIX, PCA_FIX, PCAProjection, SemanticCompressor

_logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"  # the explicit value for a randomly initialised VFM (demo, tests)
TEACHER_INFO = "teacher.json"  # `reglue train-vfm` writes it beside its weights: {"vfm", "weights", "arch", ...}


@dataclass(frozen=True)
class VFMSpec:
    """Which VFM to build: registry name, weights file (or "random"), blocks, size overrides."""

    name: str = "dinov2_vitb14_reg"
    weights: str | None = None
    layers: tuple[int, ...] | None = None  # None: the model's last four blocks
    arch: dict[str, int] = field(default_factory=dict)  # embed_dim/depth/num_heads for tiny models

    def build(self, resolution: int = 256, autocast_dtype: torch.dtype | None = None) -> VFMExtractor:
        allowed = {"embed_dim", "depth", "num_heads"}
        if not set(self.arch) <= allowed:
            raise InputError(f"unknown VFM architecture key(s) {sorted(set(self.arch) - allowed)}; use {sorted(allowed)}.")
        if self.weights is None:
            raise InputError(
                f"no weights given for VFM {self.name}: pass --vfm-weights PATH "
                f"({vfm_family(self.name).accepts}), or --vfm-weights {RANDOM_WEIGHTS} for a weight-free demo."
            )
        weights = None if self.is_random else self.weights
        if self.is_random:
            _logger.warning("VFM %s has RANDOM weights: features carry no semantics (demo/testing only).", self.name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a random VFM is the same one in every step of a pipeline
            return build_vfm(
                self.name, weights=weights, layers=self.layers, resolution=resolution,
                autocast_dtype=autocast_dtype, **self.arch,
            )

    @property
    def is_random(self) -> bool:
        return self.weights == RANDOM_WEIGHTS

    @property
    def blocks(self) -> tuple[int, ...]:
        """The 0-based blocks the local semantics come from: ``layers``, or the network's last four."""
        if self.layers is not None:
            return self.layers
        vfm_family(self.name)  # an unknown name: the registry's error
        return default_layers(self.arch.get("depth", VFM_MODELS[self.name].depth))

    @classmethod
    def from_teacher(cls, folder: str | Path, layers: tuple[int, ...] | None = None) -> VFMSpec:
        """The VFM a ``reglue train-vfm`` output folder holds: the registry name, weights file and
        architecture its ``teacher.json`` records (``layers``: None = the last four blocks)."""
        path = Path(folder) / TEACHER_INFO
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; train a teacher there first: `reglue train-vfm DATA --out "
                                    f"{folder}`, or pass the weights file itself.")
        info = json.loads(path.read_text())
        return cls(info["vfm"], str(Path(folder) / info["weights"]), layers, dict(info["arch"]))

    def resolved(self) -> VFMSpec:
        """This spec with a teacher folder as ``weights`` (a ``reglue train-vfm`` output) replaced by what
        the folder records (:meth:`from_teacher`), so its architecture need not be typed again. A name or
        architecture given that differs from the recorded one is refused; other specs come back as they are."""
        if self.weights is None or self.is_random or not Path(self.weights).is_dir():
            return self
        recorded = VFMSpec.from_teacher(self.weights, self.layers)
        if self.name != recorded.name or (self.arch and self.arch != recorded.arch):
            asked = f"{self.name} with architecture {self.arch}" if self.arch else self.name
            raise InputError(
                f"the VFM weights {self.weights} are a teacher folder whose {TEACHER_INFO} records VFM "
                f"{recorded.name} with architecture {recorded.arch}, but {asked} was asked for: drop the VFM name "
                "and architecture options (the folder gives them)."
            )
        return recorded

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VFMSpec:
        raw = json.loads(text)
        layers = tuple(raw["layers"]) if raw.get("layers") is not None else None
        return cls(raw["name"], raw.get("weights"), layers, dict(raw.get("arch", {})))

    @classmethod
    def from_mapping(cls, value: Mapping, default_name: str = "dinov2_vitb14_reg") -> VFMSpec:
        """A settings mapping of VFMSpec fields (``data.vfm``, a command's ``vfm``; missing ones take the
        defaults), resolved (:meth:`resolved`): a ``reglue train-vfm`` folder as ``weights`` names its own
        VFM and architecture when ``name`` is left out."""
        known = {f.name for f in fields(cls)}
        if not set(value) <= known:
            raise InputError(f"a VFM is given by the keys {sorted(known)}, found {sorted(set(value) - known)}.")
        weights = value.get("weights")
        name = value.get("name") or (cls.from_teacher(weights).name if weights and Path(weights).is_dir()
                                     else default_name)
        layers = tuple(value["layers"]) if value.get("layers") is not None else None
        return cls(name, weights, layers, dict(value.get("arch") or {})).resolved()


class SemanticTargets(NamedTuple):
    semantics: torch.Tensor | None  # (B, S, h, w) compressed local semantics, None without a compressor
    cls: torch.Tensor  # (B, D) VFM [CLS] of the last block (or its family's stand-in, docs/vfm.md)
    repa: torch.Tensor  # (B, 1 + h·w, D) REPA target tokens


class SemanticEncoder(nn.Module):
    """Frozen VFM + norm stats + compressor/PCA: uint8 images → :class:`SemanticTargets`."""

    def __init__(self, extractor: VFMExtractor, norm_stats: NormStats | None = None,
                 compressor: nn.Module | None = None):
        super().__init__()
        if compressor is not None and norm_stats is None:
            raise InputError("a compressor needs the norm stats its input was z-scored with.")
        self.extractor = extractor
        self.norm_stats = norm_stats
        self.compressor = compressor.eval().requires_grad_(False) if compressor is not None else None

    def train(self, mode: bool = True) -> SemanticEncoder:
        """Frozen: stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> SemanticTargets:
        features = self.extractor(images)
        semantics = None
        if self.compressor is not None:
            normalized = self.norm_stats.normalize(features.local)  # (B, L·D, h, w)
            encode = getattr(self.compressor, "encode", self.compressor)  # compressor.encode or PCA
            semantics = encode(normalized).float()
        return SemanticTargets(semantics, features.cls, features.repa)


def upsample_semantics(semantics: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, h, w) -> (B, S, size, size), bilinear, align_corners False (SPEC §5)."""
    if semantics.shape[-1] == size and semantics.shape[-2] == size:
        return semantics
    return F.interpolate(semantics, size=(size, size), mode="bilinear", align_corners=False)


def check_made_at(metadata: dict, resolution: int | None, path: str | Path, remedy: str) -> None:
    """Refuse a file whose recorded ``resolution`` (metadata, str or int) is not the data's.

    Files without the record (the authors' norm stats) pass: nothing to compare."""
    made_at = metadata.get("resolution")
    if resolution is not None and made_at is not None and int(made_at) != resolution:
        raise InputError(
            f"{path} was made from {made_at}² images, but this data is {resolution}² (its manifest's "
            f"resolution); VFM features differ with the input size, so {remedy}"
        )


def load_norm_stats_and_spec(
    path: str | Path, spec: VFMSpec | None = None, *, resolution: int | None = None,
) -> tuple[NormStats, VFMSpec]:
    """The stats file and the VFM it was computed with (``spec`` overrides the recorded one).

    ``resolution`` (the data's) refuses stats recorded at another resolution."""
    stats = NormStats.load(path)
    check_made_at(stats.metadata, resolution, path,
                  "run `reglue norm-stats DATA` on this dataset (and retrain its compressor / PCA).")
    if spec is None:
        if "vfm" not in stats.metadata:
            raise InputError(
                f"{path} does not record its VFM (e.g. the authors' stats file); pass --vfm and --vfm-weights."
            )
        spec = VFMSpec.from_json(stats.metadata["vfm"])
    return stats, spec


def build_semantic_encoder(
    norm_stats: str | Path | None, *, compressor: str | Path | None = None, pca: str | Path | None = None,
    spec: VFMSpec | None = None, resolution: int = 256, autocast_dtype: torch.dtype | None = None,
) -> tuple[SemanticEncoder, dict]:
    """A :class:`SemanticEncoder` from files, and a JSON-able record identifying its inputs."""
    if compressor is not None and pca is not None:
        raise InputError("pass either a compressor or a PCA file, not both.")
    stats, info = None, {}
    if norm_stats is not None:
        stats, spec = load_norm_stats_and_spec(norm_stats, spec, resolution=resolution)
        info["norm_stats_sha256"] = file_sha256(norm_stats)
    if spec is None:
        raise InputError("no VFM given: pass --norm-stats (which records it) or --vfm/--vfm-weights.")
    module = None
    if compressor is not None:
        fix = COMPRESSOR_FIX.format(data="DATA")
        check_made_at(read_safetensors_metadata(compressor, "semantic compressor", fix), resolution, compressor,
                      "train a compressor on this dataset: `reglue train-compressor DATA`.")
        module = SemanticCompressor.from_state_dict(read_tensor_file(compressor, "semantic compressor", fix=fix),
                                                    what=f"semantic compressor {compressor}", fix=fix)
        info["compressor_sha256"] = file_sha256(compressor)
    elif pca is not None:
        check_made_at(read_safetensors_metadata(pca, "PCA", PCA_FIX.format(data="DATA")), resolution, pca,
                      "fit a PCA on this dataset: `reglue fit-pca DATA`.")
        module = PCAProjection.load(pca)
        info["pca_sha256"] = file_sha256(pca)
    extractor = spec.build(resolution, autocast_dtype)
    if module is not None:
        _check_input_width(module, compressor or pca, extractor)
    info.update(vfm=spec.to_json(), resolution=resolution, vfm_autocast=str(autocast_dtype))
    return SemanticEncoder(extractor, stats, module), info


def _check_input_width(module: SemanticCompressor | PCAProjection, path: str | Path, extractor: VFMExtractor) -> None:
    """The compressor / PCA in ``path`` must take the VFM's L·D channels (the width of its first layer)."""
    pca = isinstance(module, PCAProjection)
    (width, out), vfm = module.widths, extractor.feature_width
    if width != vfm:
        make = "fit one with `reglue fit-pca DATA`" if pca else "train one with `reglue train-compressor DATA`"
        raise InputError(
            f"{path} maps {width} VFM channels to {out}, but the VFM gives {vfm} ({len(extractor.layers)} blocks × "
            f"{extractor.embed_dim}): it was made for another VFM or other layers; pass the one made for this VFM, "
            f"or {make} (the VFM recorded in its norm stats)."
        )
