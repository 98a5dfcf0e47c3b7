"""The ADM evaluation suite over two ``.npz`` files: FID, sFID, Inception Score, precision, recall.

Inputs are ADM batches (SPEC §10): ``arr_0`` uint8 (N, H, W, 3), and for the reference optionally
``mu``/``sigma`` (pool features) and ``mu_s``/``sigma_s`` (spatial features), which ADM computed on
the full training set and which are then used as they are. Precision/recall compare the samples
with the first 10K reference images, whatever the reference holds.

What is computed from the reference (its first-10K pool features, and any missing statistics) is
cached in ``cache_dir`` (default: beside the reference) as
``<reference stem>.inception-<key>.npz``, key = SHA-256 of the reference's and the weights' byte
sizes and modification times, so replacing either file invalidates it. A cache that cannot be
written is only logged. Arrays are read whole: 50K 256² samples take 9.8 GB of memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from reglue.io import atomic_write
from reglue.metrics.fid import feature_statistics, frechet_distance
from reglue.metrics.inception import InceptionFeatures, extract_features, load_inception, resolve_weights_path
from reglue.metrics.iscore import SPLIT_SIZE, inception_score
from reglue.metrics.manifold import NEIGHBOURHOOD_K, precision_recall

log = logging.getLogger(__name__)

PR_REFERENCE_IMAGES = 10_000  # ADM's reference batches hold 10K images for precision/recall
STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")
METRICS = ("fid", "sfid", "inception_score", "inception_score_std", "precision", "recall")


def read_images(path: str | Path) -> np.ndarray:
    """``arr_0`` of an ADM ``.npz``: uint8 ``(N, H, W, 3)``, N ≥ 1; ValueError naming what is wrong."""
    path = _require_file(path)
    with np.load(path) as npz:
        if "arr_0" not in npz:
            raise ValueError(
                f"{path} has no arr_0 (found {sorted(npz.files)}); expected an ADM .npz of images."
            )
        images = npz["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(
            f"{path}: arr_0 should be uint8 images (N, H, W, 3), found {images.dtype} {images.shape}; "
            "re-pack it with `reglue sample` or np.savez(path, arr_0=images_uint8_nhwc)."
        )
    return images


def reference_features(
    ref_npz: str | Path,
    extractor: InceptionFeatures,
    weights_path: str | Path,
    batch_size: int,
    device: str | torch.device,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """``mu``, ``sigma`` (2048), ``mu_s``, ``sigma_s`` (2023) and ``pool`` (≤10K, 2048) of the reference.

    Stored statistics are used as they are; the rest is computed and cached (see the module docstring).
    """
    ref_npz = _require_file(ref_npz)
    cache = _cache_path(ref_npz, resolve_weights_path(weights_path), cache_dir)
    if cache.is_file():
        with np.load(cache) as cached:
            return {name: cached[name] for name in (*STATISTICS, "pool")}
    with np.load(ref_npz) as npz:
        stored = {name: npz[name] for name in STATISTICS if name in npz}
    images = read_images(ref_npz)
    if len(stored) == len(STATISTICS):
        features = extract_features(images[:PR_REFERENCE_IMAGES], extractor, batch_size, device, progress)
        result = stored
    else:
        features = extract_features(images, extractor, batch_size, device, progress)
        result = _statistics(features) | stored  # stored statistics win over computed ones
    result["pool"] = features["pool"][:PR_REFERENCE_IMAGES]
    _write_cache(cache, result)
    return result


def evaluate(
    ref_npz: str | Path,
    samples_npz: str | Path,
    inception_weights: str | Path,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    split_size: int = SPLIT_SIZE,
    progress: bool = False,
) -> dict[str, float]:
    """FID, sFID, Inception Score (mean and std over parts of ``split_size`` images), precision and recall.

    Fails before any feature extraction on missing weights or a malformed sample file.
    """
    resolve_weights_path(inception_weights)  # a missing weights file fails before any reading
    samples = read_images(samples_npz)
    if len(samples) <= NEIGHBOURHOOD_K:
        raise ValueError(
            f"{samples_npz} holds {len(samples)} images; precision/recall with k={NEIGHBOURHOOD_K} needs "
            f"more than {NEIGHBOURHOOD_K}; generate more samples."
        )
    extractor = load_inception(inception_weights)
    ref = reference_features(ref_npz, extractor, inception_weights, batch_size, device, cache_dir, progress)
    features = extract_features(samples, extractor, batch_size, device, progress)
    gen = _statistics(features)
    is_mean, is_std = inception_score(features["logits"], split_size=split_size)
    precision, recall = precision_recall(ref["pool"], features["pool"], device=device)
    return {
        "fid": frechet_distance(ref["mu"], ref["sigma"], gen["mu"], gen["sigma"]),
        "sfid": frechet_distance(ref["mu_s"], ref["sigma_s"], gen["mu_s"], gen["sigma_s"]),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "precision": precision,
        "recall": recall,
    }


def write_results(results: dict[str, float], path: str | Path) -> None:
    """Write ``results`` as indented JSON to ``path``, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")


def format_table(results: dict[str, float]) -> str:
    """The metrics as a two-column plain-text table, in ADM's order."""
    names = [name for name in METRICS if name in results]
    width = max(len(name) for name in names)
    return "\n".join(f"{name:<{width}}  {results[name]:.4f}" for name in names)


def _require_file(path: str | Path) -> Path:
    """``path`` as a Path; FileNotFoundError when no file is there."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass an ADM-format .npz (arr_0: uint8 N×H×W×3).")
    return path


def _statistics(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``mu``/``sigma`` of the pool features and ``mu_s``/``sigma_s`` of the spatial ones."""
    mu, sigma = feature_statistics(features["pool"])
    mu_s, sigma_s = feature_statistics(features["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def _cache_path(ref_npz: Path, weights: Path, cache_dir: str | Path | None) -> Path:
    """Where the reference's computed features live, keyed by both files' sizes and mtimes."""
    stamp = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (ref_npz, weights)]
    key = hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]
    return Path(cache_dir or ref_npz.parent) / f"{ref_npz.stem}.inception-{key}.npz"


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Save ``arrays`` to ``path`` atomically; an unwritable place is logged, not raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    except OSError as err:
        log.warning(
            "could not cache reference Inception features at %s (%s); they will be recomputed", path, err
        )
