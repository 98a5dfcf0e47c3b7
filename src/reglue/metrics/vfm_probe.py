"""``reglue probe-vfm``: what a frozen VFM's features know, measured on held-out labelled images.

Two kinds of number, both on the same held-out images:

- **classification**: k-NN and linear-probe accuracy of the final-normed CLS features
  (:mod:`reglue.metrics.probe`), the probes fitted on the features of the other images;
- **spatial structure**: LDS and CDS of the final-normed patch tokens (``VFMFeatures.repa`` without its
  first token; :mod:`reglue.metrics.spatial`), averaged over the images. iREPA found these, not the
  accuracies, predict the FID of a generator aligned to the VFM (REPA), so they rank teachers before training.

The held-out images are :func:`reglue.data.split.held_out_split` of the labels: ``held_out_images``
(:data:`PROBE_HELD_OUT_IMAGES`) class-balanced rows drawn from ``seed``, at most ``max_held_out_fraction``
(:data:`MAX_HELD_OUT_FRACTION`) of each class — with the defaults, the very rows a ``reglue train-vfm``
teacher with default settings holds out of the same data and never trains on. The probes fit on at most
``train_images`` (:data:`PROBE_TRAIN_IMAGES`) of the other rows (a seeded subset, :func:`probe_rows`), so
memory does not grow with the data.

:func:`embed` extracts the features: each process its share of the rows (every world-th one), in batches
of :data:`PROBE_BATCH`, gathered in row order afterwards; the spatial scores are computed batch by batch,
so no patch tokens are kept. :func:`probe_features` and :func:`score` serve any set of extractors (the
teacher's report probes a trained and an untrained network, :mod:`reglue.training.teacher`);
:func:`probe_vfm` runs the whole probe for one VFM and writes ``report.json`` / ``report.md``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from reglue.data.image_rows import Images, image_labels, open_images
from reglue.data.split import held_out_split
from reglue.distributed import gather_strided, on_main, process_state
from reglue.encoders.semantics import TEACHER_INFO, VFMSpec
from reglue.errors import InputError
from reglue.metrics.probe import ProbeScores, VFMReport, probe_scores, write_report
from reglue.metrics.spatial import patch_grid, spatial_scores
from reglue.seeding import PROBE_STREAM, seeded_generator

PROBE_BATCH = 64  # images per VFM call
PROBE_TRAIN_IMAGES = 50_000  # the probes fit on at most this many training images (a seeded subset)
PROBE_HELD_OUT_IMAGES = 10_000  # held out (class-balanced) and scored
MAX_HELD_OUT_FRACTION = 0.25  # on small data, at most this share of each class is held out
REPORT_TITLE = "VFM probe by reglue probe-vfm"


def probe_rows(rows: list[int], cap: int, seed: int, part: int) -> list[int]:
    """At most ``cap`` of ``rows``: all of them when they fit, else a subset drawn from (seed, PROBE_STREAM,
    part), in row order. It bounds the probe's features and similarity blocks whatever the data's size."""
    if len(rows) <= cap:
        return rows
    picked = torch.randperm(len(rows), generator=seeded_generator(seed, PROBE_STREAM, part))[:cap]
    return sorted(rows[i] for i in picked.tolist())


@dataclass(frozen=True)
class Embedded:
    """One extractor's features of some rows: ``cls`` (N, D) and, when asked for, ``spatial`` (N, 2), each
    image's LDS and CDS."""

    cls: torch.Tensor
    spatial: torch.Tensor | None = None


def _gathered(parts: list[torch.Tensor], width: int, total: int, device: torch.device) -> torch.Tensor:
    mine = torch.cat(parts) if parts else torch.empty(0, width, device=device)
    return gather_strided(mine, total)


@torch.no_grad()
def embed(extractors: list[nn.Module], images: Images, rows: list[int], *, spatial: bool = False
          ) -> tuple[list[Embedded], torch.Tensor]:
    """Each extractor's features of the uint8 images at ``rows`` (:class:`Embedded`, on the extractors'
    device) and their (len(rows),) int64 labels. Every process reads and embeds its share
    (``rows[rank::world]``) in batches of PROBE_BATCH, each image once; the shares are then gathered
    (:func:`reglue.distributed.gather_strided`), so every process returns all rows, in ``rows``' order."""
    device = next(extractors[0].parameters()).device
    state = process_state()
    mine = rows[state.process_index::state.num_processes]
    cls: list[list[torch.Tensor]] = [[] for _ in extractors]
    scores: list[list[torch.Tensor]] = [[] for _ in extractors]
    labels = []
    for start in range(0, len(mine), PROBE_BATCH):
        items = [images[i] for i in mine[start : start + PROBE_BATCH]]
        batch = torch.stack([item["images"] for item in items]).to(device)  # (b, 3, R, R)
        labels += [int(item["label"]) for item in items]
        for extractor, found, measured in zip(extractors, cls, scores, strict=True):
            features = extractor(batch)
            found.append(features.cls)
            if spatial:
                measured.append(torch.stack(spatial_scores(patch_grid(features.repa)), dim=1))  # (b, 2)
    embedded = [Embedded(_gathered(found, extractor.embed_dim, len(rows), device),
                         _gathered(measured, 2, len(rows), device) if spatial else None)
                for extractor, found, measured in zip(extractors, cls, scores, strict=True)]
    return embedded, gather_strided(torch.tensor(labels, dtype=torch.int64, device=device), len(rows))


@dataclass(frozen=True)
class ProbeFeatures:
    """The probe's inputs, per backbone name: the (N, D) training and (M, D) held-out CLS features and the
    held-out images' (M, 2) LDS / CDS; the labels (N,) and (M,); ``grid`` the side of the patch grid."""

    train: dict[str, torch.Tensor]
    held_out: dict[str, torch.Tensor]
    spatial: dict[str, torch.Tensor]
    train_labels: torch.Tensor
    held_out_labels: torch.Tensor
    num_classes: int
    grid: int


def probe_features(images: Images, train_rows: list[int], held_out: list[int], extractors: dict[str, nn.Module],
                   *, train_images: int, held_out_images: int, seed: int) -> ProbeFeatures:
    """The features of at most ``held_out_images`` of the held-out rows and at most ``train_images`` training
    rows (seeded subsets, :func:`probe_rows`), for each named extractor: features are extracted for those
    rows only, each process its share (every process calls this, as a collective)."""
    train_rows = probe_rows(train_rows, train_images, seed, part=0)
    held_out = probe_rows(held_out, held_out_images, seed, part=1)
    networks = list(extractors.values())
    train, train_labels = embed(networks, images, train_rows)
    scored, held_labels = embed(networks, images, held_out, spatial=True)
    return ProbeFeatures({name: e.cls for name, e in zip(extractors, train, strict=True)},
                         {name: e.cls for name, e in zip(extractors, scored, strict=True)},
                         {name: e.spatial for name, e in zip(extractors, scored, strict=True)},
                         train_labels, held_labels, images.num_classes, networks[0].grid_size)


def score(features: ProbeFeatures) -> dict[str, ProbeScores]:
    """Per backbone: k-NN / linear-probe accuracy of its CLS features (on their device) and the mean LDS / CDS
    of its held-out images."""
    scores = {}
    for name, train in features.train.items():
        accuracy = probe_scores(train, features.train_labels, features.held_out[name], features.held_out_labels,
                                num_classes=features.num_classes)
        lds, cds = features.spatial[name].double().mean(0).tolist()
        scores[name] = replace(accuracy, lds=lds, cds=cds)
    return scores


def _check_data(images: Images, held_out: list[int], max_held_out_fraction: float) -> None:
    """Refuse data the probes cannot score: fewer than two classes of labels, or no image held out."""
    if images.num_classes < 2:
        raise InputError(f"{images.root} has {images.num_classes} class(es) of labels; the probes need at least two: "
                         "pass labelled images (an image folder with one sub-folder per class, or the dataset "
                         "`reglue prepare` made of one).")
    if not held_out:
        raise InputError(
            f"max_held_out_fraction {max_held_out_fraction} of each class of the {len(images)} images in "
            f"{images.root} holds none out for the probes (a class needs at least "
            f"{math.ceil(1 / max_held_out_fraction)} images); raise it (`--max-held-out-fraction`) or use more "
            "images per class.")


def _check_counts(train_images: int, held_out_images: int, max_held_out_fraction: float) -> None:
    if train_images < 1 or held_out_images < 1 or not 0.0 < max_held_out_fraction < 1.0:
        raise InputError(f"train_images and held_out_images must be >= 1 and max_held_out_fraction in (0, 1); found "
                         f"{train_images}, {held_out_images} and {max_held_out_fraction}.")


def probe_vfm(spec: VFMSpec, data: str | Path, out: str | Path, *, resolution: int | None = None,
              train_images: int = PROBE_TRAIN_IMAGES, held_out_images: int = PROBE_HELD_OUT_IMAGES,
              max_held_out_fraction: float = MAX_HELD_OUT_FRACTION, seed: int = 0,
              device: str | torch.device | None = None) -> VFMReport:
    """k-NN, linear probe, LDS and CDS of the VFM ``spec`` on the labelled images of ``data`` (a prepared
    dataset, or an image folder or zip cropped to ``resolution``; module doc); the main process writes
    ``out/report.json`` and ``out/report.md`` (a teacher folder's own report is never replaced). The data is
    checked before the VFM is loaded. ``device`` None: this process's own (its GPU under torchrun, else the
    CPU). Every process of a run calls it and returns the report."""
    _check_counts(train_images, held_out_images, max_held_out_fraction)
    if (Path(out) / TEACHER_INFO).is_file():
        raise InputError(f"{out} holds a `reglue train-vfm` teacher, whose report.json this report would replace; "
                         f"pass another --out (`reglue probe-vfm {out} DATA` probes it against its untrained self).")
    images, resolution = open_images(data, resolution, command="probe-vfm")
    train_rows, held_out = held_out_split(image_labels(images), held_out_images, seed=seed,
                                          max_fraction=max_held_out_fraction)
    _check_data(images, held_out, max_held_out_fraction)
    start = time.perf_counter()
    extractor = spec.build(resolution).to(process_state().device if device is None else device)
    features = probe_features(images, train_rows, held_out, {"vfm": extractor}, train_images=train_images,
                              held_out_images=held_out_images, seed=seed)
    name = f"{spec.name} ({spec.weights})"
    report = VFMReport(name, score(features)["vfm"], features.num_classes, len(features.train_labels),
                       len(features.held_out_labels), features.grid)
    details = {
        "vfm": spec.to_json(), "data": f"{images.root}: {len(images)} images at {resolution}², "
                                       f"{images.num_classes} classes",
        "vfm input": f"{extractor.input_size}² → {extractor.grid_size}×{extractor.grid_size} patches of "
                     f"{extractor.embed_dim} channels",
        "held-out split": f"held_out_split(labels, {held_out_images}, seed={seed}, max_fraction="
                          f"{max_held_out_fraction}); probes fit on at most {train_images} other images",
        "time": f"{time.perf_counter() - start:.1f} s", "seed": seed, "processes": process_state().num_processes}
    on_main(f"writing the report to {out}", lambda: _write(out, report, details))
    return report


def _write(out: str | Path, report: VFMReport, details: dict[str, object]) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    write_report(out, report, title=REPORT_TITLE, details=details)
