"""Quality during training: EMA samples scored every ``eval.every`` steps (docs/training.md).

The paper compares methods by how fast their FID falls with training. :class:`Evaluator` draws
``eval.num_samples`` samples from the EMA with the per-index noise and labels of ``reglue sample``
(:func:`reglue.generate.sample_batch`, seed ``eval.seed``): the same samples at every evaluation,
so a curve moves only because the model does. Sample i is drawn by process i mod world, and every
SiT, VAE and feature-network call sees exactly ``eval.micro_batch`` rows, so the numbers do not
depend on the number of processes. The features are gathered on the main process in index order
and scored against the reference statistics (in :func:`reglue.distributed.on_main`: when scoring or
the reference cache fails there, every process stops with its cause):

- ``fd``: Fréchet distance in the feature space of ``eval.vfm`` (DINOv2 ViT-L/14 by default:
  ``eval/fd_dinov2``; another network ``n``: ``eval/fd_n``), see docs/evaluation.md;
- ``pr``: precision and recall (k = 3) in that space (``eval/precision``, ``eval/recall``);
- ``fid``: Inception FID on the 2048-d pool features (``eval/fid``; weights in ``eval.inception``);
- ``class_accuracy``: the share of samples that a linear probe on that space's CLS features
  (:func:`reglue.metrics.probe.fit_linear_probe`) assigns the label they were drawn for
  (``eval/class_accuracy``): does the model draw the class it is asked for. The probe is fitted once
  on the features and labels of the reference images (the training set's; an ADM ``.npz`` has no
  labels) and cached beside their features (``DATA/eval/<space>-<fingerprint>-<n>-linear-probe.npz``).

The reference is ``eval.reference`` (an ADM ``.npz`` of images) or, by default, the prepared
training set: ``eval.reference_images`` of its images chosen by a seeded permutation. Its features
are computed once per feature network and cached beside the data
(``DATA/eval/<space>-<fingerprint>-<n>.npz``), keyed by the network's weights fingerprint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from reglue.config import ConfigError, RunConfig
from reglue.data.dataset import PreparedDataset, random_subset
from reglue.data.records import DatasetRecords
from reglue.distributed import on_rank_zero
from reglue.encoders.autoencoder import load_vae
from reglue.encoders.semantics import VFMSpec
from reglue.generate import SampleSettings, sample_batch
from reglue.io import atomic_write, file_sha256
from reglue.metrics.evaluate import image_batch_shape, read_images
from reglue.metrics.feature_space import FD_DINOV2, FeatureSpace, load_feature_space
from reglue.metrics.fid import feature_statistics, frechet_distance
from reglue.metrics.inception import extract_features, load_inception, resolve_weights_path
from reglue.metrics.manifold import NEIGHBOURHOOD_K, precision_recall
from reglue.metrics.probe import LinearProbe, fit_linear_probe
from reglue.models.sit import SiT
from reglue.sampling import padded_rows
from reglue.state_dict import weights_fingerprint

log = logging.getLogger(__name__)
REFERENCE_DIR = "eval"  # DATA/eval/: cached reference features of the training set
PROBE_SUFFIX = "-linear-probe"  # class_accuracy's probe: the reference features' cache name + this
PROBE_SEED = 0  # the probe's minibatch order: one probe per reference, whatever the run's seeds


class InceptionSpace:
    """The Inception-v3 pool features (FID) behind the same interface as :class:`FeatureSpace`."""

    key, network = "fid", "inception-v3-2015-12-05"

    def __init__(self, weights: str | Path, *, device: torch.device):
        self.extractor = load_inception(resolve_weights_path(weights)).to(device).eval()
        self.fingerprint = weights_fingerprint(self.extractor)
        self.device = device

    def features(self, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float64 (N, 2048) pool features."""
        return extract_features(images, self.extractor, batch_size=batch_size, device=self.device)["pool"].astype(
            np.float64)


def eval_due(step: int, every: int, max_steps: int) -> bool:
    """Whether the run evaluates after ``step``: every ``every`` steps and at the last one."""
    return every > 0 and (step % every == 0 or step == max_steps)


def feature_spec(config: RunConfig) -> VFMSpec:
    """``eval.vfm`` as a :class:`VFMSpec`; null is FD_DINOv2's DINOv2 ViT-L/14 (weights required)."""
    if config.eval.vfm is None:
        return FD_DINOV2
    return VFMSpec.from_mapping({**config.eval.vfm, "layers": None})  # a train-vfm folder names its VFM


class Evaluator:
    """Scores the EMA at a step; built (and every setting checked) before the run writes a file."""

    def __init__(self, config: RunConfig, *, device: torch.device, rank: int = 0, world_size: int = 1,
                 gather: Callable[[list], list] = gather_object, records: DatasetRecords | None = None):
        """``records``: the training data as the run opened it (read once); None: opened here."""
        e = config.eval
        self.config, self.device = config, device
        self.rank, self.world_size, self.gather = rank, world_size, gather
        self.data_dir = Path(config.data.dir)
        self.images = PreparedDataset(records or self.data_dir, fields=("images",))  # the training set's pixels
        self.manifest = self.images.manifest
        self.resolution = self.manifest["resolution"]
        self._check_reference()
        self.class_accuracy = "class_accuracy" in e.metrics
        if self.class_accuracy:
            self._check_classes()
        try:
            self.spaces: list[FeatureSpace | InceptionSpace] = []
            if {"fd", "pr", "class_accuracy"} & set(e.metrics):
                self.spaces.append(load_feature_space(feature_spec(config), device=device))
            if "fid" in e.metrics:
                self.spaces.append(InceptionSpace(e.inception, device=device))
        except (OSError, ValueError) as err:
            raise ConfigError(f"eval.vfm/eval.inception: {err}") from None
        vae = config.data.vae or self.manifest["vae"]
        try:
            self.vae = load_vae(vae).to(device)
        except (OSError, ValueError) as err:
            raise ConfigError(f"eval: the dataset's VAE {vae} is needed to decode the samples and does not load "
                              f"({err}); put its weights where the message says, point data.vae at a copy of it, "
                              "or set eval.every=0.") from None
        self.settings = SampleSettings(
            num_samples=e.num_samples, mode=e.sampler.mode, num_steps=e.sampler.steps,
            guidance=e.sampler.guidance(), labels="random", seed=e.seed, micro_batch=e.micro_batch,
        )
        self._reference: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        self._probe: LinearProbe | None = None

    def _check_classes(self) -> None:
        """class_accuracy needs labelled training images as its reference (the probe fits on their labels)."""
        if self.config.eval.reference is not None:
            raise ConfigError(f"eval.metrics: class_accuracy fits its linear probe on the labelled reference images, "
                              f"and eval.reference ({self.config.eval.reference}) has no labels; set "
                              "eval.reference=null (the training set) or leave class_accuracy out.")
        if self.images.num_classes < 2:
            raise ConfigError(f"eval.metrics: class_accuracy needs labelled data of at least 2 classes; "
                              f"{self.data_dir} has {self.images.num_classes}. Leave class_accuracy out.")

    # ------------------------------------------------------------------ reference
    def _check_reference(self) -> None:
        e = self.config.eval
        if e.reference is None:
            count = min(len(self.images), e.reference_images)
        else:
            path = Path(e.reference)
            if not path.is_file():
                raise ConfigError(f"eval.reference: {path} not found; pass an ADM .npz of reference images "
                                  "or null for the training set.")
            try:
                shape = image_batch_shape(path)
            except ValueError as err:
                raise ConfigError(f"eval.reference: {err}") from None
            if shape[1:] != (self.resolution, self.resolution, 3):
                raise ConfigError(f"eval.reference: {path} holds images of shape {tuple(shape[1:])}, but the run "
                                  f"samples {self.resolution}² RGB images; use a reference batch of the data's "
                                  "resolution, or null for the training set.")
            count = shape[0]
        if "pr" in e.metrics and count < e.num_samples:
            raise ConfigError(f"eval.num_samples: precision/recall compares {e.num_samples} samples with a reference "
                              f"of {count} images; lower eval.num_samples to at most {count} or use a larger reference.")
        if count <= NEIGHBOURHOOD_K:
            raise ConfigError(f"eval.reference: {count} reference images are too few; use at least "
                              f"{NEIGHBOURHOOD_K + 1}.")

    def _cache_path(self, space) -> Path:
        e = self.config.eval
        source = (f"train{e.reference_images}" if e.reference is None
                  else f"npz{file_sha256(e.reference)[:16]}")
        return self.data_dir / REFERENCE_DIR / f"{space.network}-{space.fingerprint}-{source}.npz"

    def _reference_features(self) -> dict[str, np.ndarray]:
        """Reference features per space key (main process; other processes get an empty dict)."""
        paths = {space.key: self._cache_path(space) for space in self.spaces}
        # the main process's look decides for all (each its own could differ: data staged to node-local
        # disks, where only the main process's node has the cache); the gather also makes every process
        # look before the main one may write
        cached = self.gather([all(path.is_file() for path in paths.values())])[0]
        if cached:
            return on_rank_zero(self.rank, f"reading the reference features cached in {self.data_dir / REFERENCE_DIR}",
                                lambda: {key: np.load(path)["features"] for key, path in paths.items()}) or {}
        images = self._reference_images()
        mine = list(range(self.rank, len(images), self.world_size))
        local = {space.key: self._features(space, np.stack([images[i] for i in mine])) if mine else None
                 for space in self.spaces}
        gathered = self.gather([(mine, local)])

        def cache() -> dict[str, np.ndarray]:
            features = {key: _in_index_order(gathered, key) for key in paths}
            for key, path in paths.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(path) as tmp, open(tmp, "wb") as handle:
                    np.savez(handle, features=features[key])
                log.info("cached reference features (%d images) in %s", len(features[key]), path)
            return features

        return on_rank_zero(self.rank, f"caching the reference features in {self.data_dir / REFERENCE_DIR}",
                            cache) or {}

    def _reference_images(self):
        """uint8 (H, W, 3) reference images, indexable: the ADM batch or the training subset."""
        e = self.config.eval
        if e.reference is not None:
            return read_images(e.reference)
        return _SubsetImages(self._reference_subset())

    def _reference_subset(self):
        return random_subset(self.images, self.config.eval.reference_images, seed=0)

    def _linear_probe(self, space: FeatureSpace, features: np.ndarray) -> LinearProbe:
        """class_accuracy's probe on the (N, D) reference ``features`` of ``space``: read from its cache beside
        them, or fitted on them and their labels and cached (main process)."""
        path = self._cache_path(space)
        path = path.with_name(f"{path.stem}{PROBE_SUFFIX}.npz")
        if path.is_file():
            return LinearProbe.load(path, device=self.device)
        labels = PreparedDataset(self.images.records, fields=()).read_batch(self._reference_subset().indices)["label"]
        probe = fit_linear_probe(torch.from_numpy(features).to(self.device), labels.to(self.device),
                                 num_classes=self.images.num_classes, seed=PROBE_SEED)
        probe.save(path)
        log.info("cached the class_accuracy linear probe (%d reference images) in %s", len(labels), path)
        return probe

    # ------------------------------------------------------------------ scoring
    def _features(self, space, images: np.ndarray) -> np.ndarray:
        """Features of uint8 (N, H, W, 3) in fixed-size calls of ``micro_batch`` rows (padded)."""
        micro = self.config.eval.micro_batch
        rows = padded_rows(len(images), micro).numpy()
        return space.features(images[rows], batch_size=micro)[: len(images)]

    @torch.no_grad()
    def __call__(self, ema: SiT, step: int) -> dict[str, float] | None:
        """``eval/<metric>`` values and ``eval/seconds`` on the main process; None on the others."""
        start = time.perf_counter()
        if self._reference is None:  # features and their statistics, once per run
            self._reference = {key: (features, *feature_statistics(features))
                               for key, features in self._reference_features().items()}
        mine = list(range(self.rank, self.settings.num_samples, self.world_size))
        keys = [space.key for space in self.spaces] + (["labels"] if self.class_accuracy else [])
        local: dict[str, list[np.ndarray]] = {key: [] for key in keys}
        for chunk_start in range(0, len(mine), self.config.eval.batch):
            indices = mine[chunk_start : chunk_start + self.config.eval.batch]
            images, labels = sample_batch(ema, self.vae, indices, self.settings, self.device)
            for space in self.spaces:
                local[space.key].append(self._features(space, images))
            if self.class_accuracy:
                local["labels"].append(labels)
        merged = {key: np.concatenate(parts) if parts else None for key, parts in local.items()}
        gathered = self.gather([(mine, merged)])

        def score() -> dict[str, float]:
            values = {}
            for space in self.spaces:
                samples = _in_index_order(gathered, space.key)
                values.update(self._score(space, samples, self._reference[space.key]))
            if self.class_accuracy:
                values["eval/class_accuracy"] = self._class_accuracy(gathered)
            values["eval/seconds"] = time.perf_counter() - start
            return values

        return on_rank_zero(self.rank, f"scoring the evaluation of step {step}", score)

    def _class_accuracy(self, gathered: list) -> float:
        """Share of the samples whose features the reference images' linear probe gives their drawn class."""
        space = self.spaces[0]  # the VFM's space (Inception's, when asked for, comes after it)
        if self._probe is None:
            self._probe = self._linear_probe(space, self._reference[space.key][0])
        samples = torch.from_numpy(_in_index_order(gathered, space.key))
        return self._probe.accuracy(samples, torch.from_numpy(_in_index_order(gathered, "labels")))

    def _score(self, space, samples: np.ndarray, reference: tuple) -> dict[str, float]:
        """``reference``: (features (N, D), mean (D,), covariance (D, D))."""
        metrics = self.config.eval.metrics
        features, mu, sigma = reference
        values = {}
        if space.key == "fid" or "fd" in metrics:
            values[f"eval/{space.key}"] = frechet_distance(*feature_statistics(samples), mu, sigma)
        if space.key != "fid" and "pr" in metrics:
            precision, recall = precision_recall(features, samples)
            values["eval/precision"], values["eval/recall"] = precision, recall
        return values

    def describe(self) -> str:
        """One line naming what is measured: networks with fingerprints, sample count, reference."""
        e = self.config.eval
        networks = ", ".join(f"{s.network} ({s.fingerprint})" for s in self.spaces)
        if self.class_accuracy:
            networks += f" (class_accuracy: a linear probe on {self.spaces[0].network}'s CLS features)"
        reference = e.reference or f"the training set ({e.reference_images} images at most)"
        return (f"evaluating {', '.join(e.metrics)} every {e.every} steps on {e.num_samples} EMA samples "
                f"in {networks} against {reference}")


class _SubsetImages:
    """The ``images`` of a subset of the prepared data as uint8 (H, W, 3), by index."""

    def __init__(self, subset):
        self.subset = subset

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.subset[index]["images"].permute(1, 2, 0).numpy()


def _in_index_order(gathered: list, key: str) -> np.ndarray:
    """Concatenate every process's (indices, {key: features}) in sample-index order."""
    indices = np.concatenate([np.asarray(idx, dtype=np.int64) for idx, _ in gathered if idx])
    features = np.concatenate([feats[key] for idx, feats in gathered if idx])
    return features[np.argsort(indices, kind="stable")]
