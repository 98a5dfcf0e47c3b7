"""Sample quality over two ``.npz`` files: the ADM suite and the Fréchet distance in a VFM's space.

Metric names (``metrics=``; ``reglue evaluate --metrics``), each computed only when asked:

- Inception (needs ``inception_weights``): ``fid``, ``sfid``, ``is`` (→ ``inception_score`` and
  ``inception_score_std``), ``pr`` (→ ``precision``, ``recall``);
- a VFM feature space (:mod:`reglue.metrics.feature_space`), named by its suffix ``s`` = ``dinov2``
  for DINOv2 ViT-L/14 without registers, else the network name: ``fd_<s>`` (→ ``fd_<s>``) and
  ``pr_<s>`` (→ ``precision_<s>``, ``recall_<s>``).

The default (``metrics=None``) is the ADM suite when Inception weights are given, plus ``fd_<s>``
when VFM weights are given. Results also hold ``networks``: per feature space its network, its
weights and their fingerprint.

Inputs are ADM batches (SPEC §10): ``arr_0`` uint8 (N, H, W, 3), and for the reference optionally
``mu``/``sigma`` (pool features) and ``mu_s``/``sigma_s`` (spatial features), which ADM computed on
the full training set and which are then used as they are. Precision/recall compare the samples
with the first 10K reference images, whatever the reference holds. Everything that can be checked
without features is checked first (names, weights files, shapes, resolutions, image counts), then
the networks are loaded (a weights file of the wrong shape fails there), then features are made.

What is computed from the reference is cached in ``cache_dir`` (default: beside the reference):
Inception as ``<reference stem>.inception-<key>.npz``, key = SHA-256 of the reference's and the
weights' byte sizes and modification times; a feature space as ``<stem>.<fd key>-<key>.npz``, key =
SHA-256 of the network name, its weights fingerprint, the preprocessing and the reference's size
and modification time (the file also records network and fingerprint, checked when read). A cache
that cannot be written is only logged. Arrays are read whole: 50K 256² samples take 9.8 GB.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reglue.encoders.semantics import VFMSpec
from reglue.errors import InputError
from reglue.io import atomic_write, write_json
from reglue.metrics.feature_space import FD_DINOV2, FeatureSpace, fd_key, load_feature_space
from reglue.metrics.fid import feature_statistics, frechet_distance
from reglue.metrics.inception import (
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    InceptionFeatures,
    extract_features,
    load_inception,
    resolve_weights_path,
)
from reglue.metrics.iscore import SPLIT_SIZE, inception_score
from reglue.metrics.manifold import NEIGHBOURHOOD_K, precision_recall
from reglue.resolution import confirm_resolution
from reglue.state_dict import weights_fingerprint

log = logging.getLogger(__name__)

PR_REFERENCE_IMAGES = 10_000  # ADM's reference batches hold 10K images for precision/recall
STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")
METRICS = ("fid", "sfid", "inception_score", "inception_score_std", "precision", "recall")  # ADM's order
INCEPTION_METRICS = ("fid", "sfid", "is", "pr")
INCEPTION_NETWORK = "inception-v3-2015-12-05 (torch-fidelity port)"
PREPROCESSING = "bicubic-antialias-float-v1"  # feature_space.preprocess; part of the cache key


def space_metrics(network: str) -> tuple[str, str]:
    """The two metric names of a feature space: ``("fd_dinov2", "pr_dinov2")`` or ``fd_/pr_<network>``."""
    suffix = fd_key(network).removeprefix("fd_")
    return f"fd_{suffix}", f"pr_{suffix}"


def resolve_metrics(
    metrics: Sequence[str] | None, *, network: str, inception: bool, vfm_weights: bool,
) -> tuple[str, ...]:
    """The metric names to compute, in a fixed order; ValueError for an unknown name or none at all."""
    known = (*INCEPTION_METRICS, *space_metrics(network))
    if metrics is None:
        metrics = [*(INCEPTION_METRICS if inception else ()), *(space_metrics(network)[:1] if vfm_weights else ())]
        if not metrics:
            raise InputError(
                "nothing to evaluate: pass Inception weights (--inception) for the ADM suite "
                f"({','.join(INCEPTION_METRICS)}) and/or VFM weights (--vfm-weights) for {known[-2]}, or name "
                "the metrics with --metrics."
            )
    unknown = [name for name in metrics if name not in known]
    if unknown:
        other = "" if network == FD_DINOV2.name else f" (for --vfm {network}; fd_dinov2 is DINOv2 ViT-L/14's)"
        raise InputError(
            f"unknown metric(s) {', '.join(map(repr, unknown))}; choose from {', '.join(known)}{other}. "
            "With --vfm NAME the feature-space metrics are fd_NAME and pr_NAME."
        )
    if not metrics:
        raise InputError(f"no metric named; choose from {', '.join(known)}.")
    return tuple(name for name in known if name in metrics)


def image_batch_shape(path: str | Path) -> tuple[int, int, int, int]:
    """``arr_0``'s shape (N, H, W, 3) from the ``.npz``'s array header, without reading the pixels.

    ValueError (naming what is wrong and the fix) unless ``arr_0`` is uint8 (N, H, W, 3) with N ≥ 1.
    """
    path = _require_file(path)
    try:
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else (
                np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(handle)
    except KeyError:
        with np.load(path) as npz:
            found = sorted(npz.files)
        raise InputError(f"{path} has no arr_0 (found {found}); expected an ADM .npz of images.") from None
    except (zipfile.BadZipFile, ValueError) as err:
        raise InputError(f"{path} is not a readable .npz ({err}); expected an ADM .npz of images.") from err
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] == 0:
        raise InputError(
            f"{path}: arr_0 should be uint8 images (N, H, W, 3), found {dtype} {shape}; "
            "re-pack it with `reglue sample` or np.savez(path, arr_0=images_uint8_nhwc)."
        )
    return tuple(int(n) for n in shape)


def read_images(path: str | Path) -> np.ndarray:
    """``arr_0`` of an ADM ``.npz``: uint8 ``(N, H, W, 3)``, N ≥ 1; ValueError naming what is wrong."""
    image_batch_shape(path)
    with np.load(path) as npz:
        return npz["arr_0"]


def reference_features(
    ref_npz: str | Path,
    extractor: InceptionFeatures,
    weights_path: str | Path,
    batch_size: int,
    device: str | torch.device,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    images: Callable[[], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """``mu``, ``sigma`` (2048), ``mu_s``, ``sigma_s`` (2023) and ``pool`` (≤10K, 2048) of the reference.

    Stored statistics are used as they are; the rest is computed and cached (see the module docstring).
    ``images``: gives the reference's images when they must be read (default: read ``ref_npz``).
    """
    ref_npz = _require_file(ref_npz)
    cache = _cache_path(ref_npz, resolve_weights_path(weights_path), cache_dir)
    if cache.is_file():
        with np.load(cache) as cached:
            return {name: cached[name] for name in (*STATISTICS, "pool")}
    with np.load(ref_npz) as npz:
        stored = {name: npz[name] for name in STATISTICS if name in npz}
    images = (images or functools.partial(read_images, ref_npz))()
    if len(stored) == len(STATISTICS):
        features = extract_features(images[:PR_REFERENCE_IMAGES], extractor, batch_size, device, progress)
        result = stored
    else:
        features = extract_features(images, extractor, batch_size, device, progress)
        result = _statistics(features) | stored  # stored statistics win over computed ones
    result["pool"] = features["pool"][:PR_REFERENCE_IMAGES]
    _write_cache(cache, result, "Inception features")
    return result


def space_reference(
    ref_npz: str | Path, space: FeatureSpace, *, batch_size: int = 64, cache_dir: str | Path | None = None,
    progress: bool = False, images: Callable[[], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """``mu`` (D,), ``sigma`` (D, D) float64 of all reference images in ``space`` and ``features``
    (≤10K, D) float32 of the first 10K (precision/recall); computed once, then read from the cache."""
    ref_npz = _require_file(ref_npz)
    cache = _space_cache_path(ref_npz, space, cache_dir)
    if cache.is_file():
        with np.load(cache) as cached:
            recorded = (str(cached["network"]), str(cached["fingerprint"]))
            if recorded == (space.network, space.fingerprint):
                return {name: cached[name] for name in ("mu", "sigma", "features")}
        log.warning("%s was made with %s weights %s, not %s %s; recomputing it",
                    cache, *recorded, space.network, space.fingerprint)
    images = (images or functools.partial(read_images, ref_npz))()
    features = space.features(images, batch_size=batch_size, progress=progress)
    mu, sigma = feature_statistics(features)
    result = {"mu": mu, "sigma": sigma, "features": features[:PR_REFERENCE_IMAGES].astype(np.float32)}
    identity = {"network": np.array(space.network), "fingerprint": np.array(space.fingerprint)}
    _write_cache(cache, result | identity, f"{space.key} features")
    return result


@dataclass(frozen=True, kw_only=True)
class EvaluateSettings:
    """What ``reglue evaluate`` computes (``--config`` / ``KEY=VALUE``; paths stay arguments).

    ``metrics``: the names ``--metrics`` takes (fid, sfid, is, pr, fd_dinov2, pr_dinov2, ...; None: what the
    given weights allow); ``vfm``: VFMSpec fields of
    the fd/pr feature space (None: DINOv2 ViT-L/14, FD_DINOv2's network); ``micro_batch``: images per
    network call (memory only).
    """

    metrics: list | None = None
    vfm: dict | None = None
    micro_batch: int = 250

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise InputError(f"micro_batch must be >= 1, found {self.micro_batch}.")

    def spec(self) -> VFMSpec:
        """The feature space's network (resolved; a ``reglue train-vfm`` folder names its own)."""
        return VFMSpec.from_mapping(self.vfm or {}, FD_DINOV2.name)


def evaluate(
    ref_npz: str | Path,
    samples_npz: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    inception_weights: str | Path | None = None,
    vfm: VFMSpec | FeatureSpace | None = None,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    split_size: int = SPLIT_SIZE,
    resolution: int | None = None,
    progress: bool = False,
) -> dict:
    """The asked ``metrics`` (module docstring) of ``samples_npz`` against ``ref_npz``.

    ``vfm`` is the feature space of ``fd_<s>``/``pr_<s>``: a :class:`VFMSpec` (loaded on ``device``)
    or a loaded :class:`FeatureSpace`; None = :data:`FD_DINOV2` (whose weights must then be given).
    ``resolution``, when given, is a check: the samples must be R² images.
    Returns ``{metric: float, ..., "networks": {"inception" | <s>: {network, weights, weights_fingerprint, ...}}}``.
    Bad input fails before any feature is computed (module docstring).
    """
    spec = vfm if isinstance(vfm, VFMSpec) else FD_DINOV2 if vfm is None else None
    network = vfm.network if isinstance(vfm, FeatureSpace) else spec.name
    asked = resolve_metrics(metrics, network=network, inception=inception_weights is not None,
                            vfm_weights=isinstance(vfm, FeatureSpace) or spec.weights is not None)
    fd_name, pr_name = space_metrics(network)
    inception_asked = [name for name in asked if name in INCEPTION_METRICS]
    if inception_asked:
        inception_weights = _inception_weights(inception_weights, inception_asked)
    _check_inputs(ref_npz, samples_npz, asked, stored_inception=_has_stored_statistics(ref_npz),
                  resolution=resolution)

    extractor = load_inception(inception_weights) if inception_asked else None
    space = None
    if fd_name in asked or pr_name in asked:
        space = vfm if isinstance(vfm, FeatureSpace) else load_feature_space(spec, device=device)
    samples = read_images(samples_npz)
    # The reference's pixels: read at most once, and only if a feature cache misses.
    ref_images = functools.cache(functools.partial(read_images, ref_npz))
    results, networks = {}, {}
    if extractor is not None:
        results |= _inception_metrics(ref_npz, samples, extractor, inception_weights, inception_asked,
                                      batch_size=batch_size, device=device, cache_dir=cache_dir,
                                      split_size=split_size, progress=progress, ref_images=ref_images)
        networks["inception"] = {"network": INCEPTION_NETWORK, "weights": str(inception_weights),
                                 "weights_fingerprint": weights_fingerprint(extractor)}
    if space is not None:
        suffix = fd_name.removeprefix("fd_")
        ref = space_reference(ref_npz, space, batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                              images=ref_images)
        features = space.features(samples, batch_size=batch_size, progress=progress)
        if fd_name in asked:
            results[fd_name] = frechet_distance(ref["mu"], ref["sigma"], *feature_statistics(features))
        if pr_name in asked:
            precision, recall = precision_recall(ref["features"], features.astype(np.float32), device=device)
            results |= {f"precision_{suffix}": precision, f"recall_{suffix}": recall}
        networks[suffix] = space.describe()
    return results | {"networks": networks}


def write_results(results: dict, path: str | Path) -> None:
    """Write ``results`` as indented JSON to ``path``, atomically."""
    write_json(path, results)


def format_table(results: dict) -> str:
    """The metrics as a two-column plain-text table (ADM's order, then the feature-space ones), then
    one line per network naming its weights and their fingerprint."""
    names = [name for name in METRICS if name in results]
    names += [name for name, value in results.items() if isinstance(value, float) and name not in names]
    width = max(len(name) for name in names)
    lines = [f"{name:<{width}}  {results[name]:.4f}" for name in names]
    for space, info in results.get("networks", {}).items():
        random = " (RANDOM weights: numbers for testing only)" if info.get("random_weights") else ""
        lines.append(f"# {space}: {info['network']}, weights {info['weights']}, "
                     f"fingerprint {info['weights_fingerprint']}{random}")
    return "\n".join(lines)


def _inception_metrics(
    ref_npz, samples: np.ndarray, extractor: InceptionFeatures, weights: Path, asked: Sequence[str], *,
    batch_size: int, device, cache_dir, split_size: int, progress: bool, ref_images: Callable[[], np.ndarray],
) -> dict[str, float]:
    """The asked Inception metrics; the reference's features only when a metric compares with it."""
    features = extract_features(samples, extractor, batch_size, device, progress)
    ref = None
    if set(asked) & {"fid", "sfid", "pr"}:
        ref = reference_features(ref_npz, extractor, weights, batch_size, device, cache_dir, progress,
                                 images=ref_images)
    results = {}
    if "fid" in asked or "sfid" in asked:
        gen = _statistics(features)
        if "fid" in asked:
            results["fid"] = frechet_distance(ref["mu"], ref["sigma"], gen["mu"], gen["sigma"])
        if "sfid" in asked:
            results["sfid"] = frechet_distance(ref["mu_s"], ref["sigma_s"], gen["mu_s"], gen["sigma_s"])
    if "is" in asked:
        is_mean, is_std = inception_score(features["logits"], split_size=split_size)
        results |= {"inception_score": is_mean, "inception_score_std": is_std}
    if "pr" in asked:
        results["precision"], results["recall"] = precision_recall(ref["pool"], features["pool"], device=device)
    return results


def _inception_weights(weights: str | Path | None, asked: Sequence[str]) -> Path:
    """The Inception weights file; FileNotFoundError naming the metrics that need it and the fix."""
    if weights is None:
        raise FileNotFoundError(
            f"{','.join(asked)} need the Inception-v3 weights: download {INCEPTION_WEIGHTS_FILE} from "
            f"{INCEPTION_WEIGHTS_URL} and pass it with --inception, or ask only for fd_dinov2 (--metrics fd_dinov2)."
        )
    return resolve_weights_path(weights)


def _check_inputs(ref_npz, samples_npz, asked: Sequence[str], *, stored_inception: bool,
                  resolution: int | None) -> None:
    """Refuse, before any feature is computed, inputs the asked metrics cannot use (with the fix)."""
    samples = image_batch_shape(samples_npz)
    confirm_resolution(resolution, samples[1], where=f"the samples {samples_npz}", remedy=(
        f"Leave out the resolution to evaluate them at their own, or evaluate samples of a model trained at "
        f"{resolution}² against a reference batch of that resolution."))
    precision_recall_asked = [name for name in asked if name == "pr" or name.startswith("pr_")]
    needed = NEIGHBOURHOOD_K + 1 if precision_recall_asked else 2 if asked != ("is",) else 1
    if samples[0] < needed:
        what = f"precision/recall with k={NEIGHBOURHOOD_K}" if precision_recall_asked else "a covariance"
        raise InputError(
            f"{samples_npz} holds {samples[0]} images; {what} needs more than {needed - 1}; generate more samples."
        )
    if asked == ("is",):
        return  # the Inception Score does not look at the reference
    ref = image_batch_shape(ref_npz)
    if ref[1:3] != samples[1:3]:
        raise InputError(
            f"the reference {ref_npz} holds {ref[1]}×{ref[2]} images but the samples {samples_npz} are "
            f"{samples[1]}×{samples[2]}; compare at one resolution: use the reference batch of the samples' "
            f"resolution (e.g. VIRTUAL_imagenet{samples[1]}_labeled.npz) or sample at {ref[1]}²."
        )
    space_asked = any(name.startswith(("fd_", "pr_")) for name in asked)
    if ref[0] < 2 and (space_asked or not stored_inception):
        raise InputError(f"the reference {ref_npz} holds {ref[0]} image; its statistics need at least 2.")
    if precision_recall_asked:
        wanted = min(samples[0], PR_REFERENCE_IMAGES)
        if ref[0] < wanted:
            raise InputError(
                f"the reference {ref_npz} holds {ref[0]} images, but precision/recall ({', '.join(precision_recall_asked)}) "
                f"compare the {samples[0]} samples with min({samples[0]}, {PR_REFERENCE_IMAGES}) = {wanted} reference "
                f"images; use a reference with at least {wanted} images, evaluate at most {ref[0]} samples, or "
                f"leave {', '.join(precision_recall_asked)} out of --metrics."
            )


def _has_stored_statistics(ref_npz: str | Path) -> bool:
    """True when the reference carries all of ADM's stored Inception statistics."""
    with np.load(_require_file(ref_npz)) as npz:
        return all(name in npz.files for name in STATISTICS)


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


def _file_stamp(path: Path) -> tuple[int, int]:
    return path.stat().st_size, path.stat().st_mtime_ns


def _cache_path(ref_npz: Path, weights: Path, cache_dir: str | Path | None) -> Path:
    """Where the reference's Inception features live, keyed by both files' sizes and mtimes."""
    stamp = [_file_stamp(p) for p in (ref_npz, weights)]
    key = hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]
    return Path(cache_dir or ref_npz.parent) / f"{ref_npz.stem}.inception-{key}.npz"


def _space_cache_path(ref_npz: Path, space: FeatureSpace, cache_dir: str | Path | None) -> Path:
    """Where the reference's features in ``space`` live: keyed by network, fingerprint, preprocessing, file."""
    stamp = (space.network, space.fingerprint, space.input_size, PREPROCESSING, _file_stamp(ref_npz))
    key = hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]
    return Path(cache_dir or ref_npz.parent) / f"{ref_npz.stem}.{space.key}-{key}.npz"


def _write_cache(path: Path, arrays: dict[str, np.ndarray], what: str) -> None:
    """Save ``arrays`` to ``path`` atomically; an unwritable place is logged, not raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    except OSError as err:
        log.warning("could not cache reference %s at %s (%s); they will be recomputed", what, path, err)
