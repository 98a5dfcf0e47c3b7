"""Where a run finds its inputs, and how a resumed run may find them somewhere else (docs/cluster.md).

Every path a run config holds is made absolute when the run opens its inputs
(:func:`with_absolute_paths`), so ``config.yaml`` and the checkpoints name files that can be found
from any working directory. The inputs a run *reads* — ``data.dir``, and with
``data.semantics=online`` the norm stats, the compressor or PCA and the VFM weights — are recorded
with their content (:func:`input_fingerprints`, saved in every checkpoint): a resumed run whose
inputs moved (a job that copies the dataset to its nodes' local disks, at a new path every time) is
accepted when what it finds at the new path has the recorded content, and refused, naming both
paths, when it does not (:func:`moved_inputs`). An input at its recorded path is not re-read: a
dataset repaired in place (`reglue verify`, a re-cached shard) resumes as before.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from reglue.config import ConfigError, RunConfig, from_dict
from reglue.data import integrity
from reglue.data.dataset import PreparedDataset
from reglue.encoders.pixel import PIXEL_AUTOENCODER
from reglue.encoders.semantics import RANDOM_WEIGHTS
from reglue.io import existing_path, file_sha256
from reglue.presets import Preset

log = logging.getLogger(__name__)

# Every config key that holds an input's path (keys under data.vfm / eval.vfm: their "weights").
PATH_KEYS = ("data.dir", "data.norm_stats", "data.compressor", "data.pca", "data.vae", "data.vfm.weights",
             "model.init_from", "eval.inception", "eval.reference", "eval.vfm.weights")
KEYWORDS = (RANDOM_WEIGHTS, PIXEL_AUTOENCODER)  # values of path keys that name no file


def absolute_paths(raw: dict) -> dict:
    """A run config as a nested dict (``RunConfig.to_dict()``, or one a checkpoint recorded), copied, with
    ``run_dir`` and every path key that names an existing file or folder made absolute
    (:func:`reglue.io.existing_path`)."""
    raw = copy.deepcopy(raw)
    if isinstance(raw.get("run_dir"), str):  # the run's output: absolute whether or not it exists yet
        raw["run_dir"] = os.path.abspath(Path(raw["run_dir"]).expanduser())
    for dotted in PATH_KEYS:
        *sections, name = dotted.split(".")
        tree = raw
        for section in sections:
            tree = tree.get(section) if isinstance(tree, dict) else None
        if isinstance(tree, dict) and isinstance(tree.get(name), str) and tree[name] not in KEYWORDS:
            tree[name] = existing_path(tree[name])
    return raw


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """``config`` with every path that names an existing file or folder absolute."""
    return from_dict(RunConfig, absolute_paths(config.to_dict())).validate()


def read_inputs(config: RunConfig, preset: Preset, norm_stats: Path | None) -> dict[str, str]:
    """The paths of the inputs the run reads, by config key: ``data.dir``, and for online semantics
    (``norm_stats`` given) the norm stats, the preset's compressor or PCA and the VFM weights."""
    paths = {"data.dir": config.data.dir}
    if norm_stats is not None:
        paths["data.norm_stats"] = str(norm_stats)
        module = {"compressor": config.data.compressor, "pca": config.data.pca}.get(preset.semantics)
        if module:
            paths[f"data.{preset.semantics}"] = module
        weights = (config.data.vfm or {}).get("weights")
        if weights and weights != RANDOM_WEIGHTS:
            paths["data.vfm.weights"] = weights
    return paths


def input_fingerprints(paths: dict[str, str], dataset: PreparedDataset) -> dict[str, dict]:
    """``{key: {"path", "fingerprint"}}`` of :func:`read_inputs`' paths, as checkpoints record them: the
    dataset's records (:func:`reglue.data.integrity.dataset_fingerprint`), a file's sha256."""
    located = {}
    for key, path in paths.items():
        fingerprint = integrity.dataset_fingerprint(dataset.records) if key == "data.dir" \
            else file_sha256(path)
        located[key] = {"path": str(path), "fingerprint": fingerprint}
    return located


def moved_inputs(recorded: dict | None, current: dict[str, dict]) -> tuple[str, ...]:
    """The keys whose input the run finds at another path than ``recorded`` (a checkpoint's
    :func:`input_fingerprints`) with the same content: they may differ from the checkpoint's config.
    An input at another path with other content is a :class:`ConfigError` naming both paths; an input
    the checkpoint did not record (an older reglue) must keep its path, as before."""
    moved = []
    for key, now in current.items():
        then = (recorded or {}).get(key)
        if then is None or then["path"] == now["path"]:
            continue
        if then["fingerprint"] != now["fingerprint"]:
            raise ConfigError(
                f"{key}: the run read {then['path']} (content {then['fingerprint'][:16]}), but {now['path']} holds "
                f"other content ({now['fingerprint'][:16]}); resume with {key} at a copy of what the run read, or "
                "start a new run directory."
            )
        log.info("%s moved: %s -> %s (same content, %s)", key, then["path"], now["path"], now["fingerprint"][:16])
        moved.append(key)
    return tuple(moved)
