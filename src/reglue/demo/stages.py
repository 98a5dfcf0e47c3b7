"""The demo's own stages — the synthetic images, the prepared data and the teacher — and the
comparison settings (:class:`~reglue.compare.CompareSettings`) the rest of the demo runs under."""

from __future__ import annotations

import logging

from reglue.compare import CompareSettings
from reglue.compare.stages import Ledger
from reglue.data.prepare import PrepareSettings, run_prepare
from reglue.data.synthetic import write_synthetic_dataset
from reglue.demo.settings import (
    AUTOENCODER_LABEL,
    COMPRESSOR,
    EMA_DECAY,
    LEARNING_RATE,
    MODEL,
    RANDOM_VFM,
    SAMPLER,
    TRAIN_BATCH,
    DemoPaths,
    DemoSettings,
)
from reglue.encoders.pixel import PIXEL_AUTOENCODER
from reglue.training.inputs import vfm_record
from reglue.training.teacher import TeacherSettings, train_teacher

log = logging.getLogger(__name__)
STATE_FILE = "demo.json"


def data_stages(ledger: Ledger, paths: DemoPaths, settings: DemoSettings, progress: bool) -> None:
    """Images, the prepared data and the teacher."""
    ledger.run("images", f"{settings.num_images} synthetic images of the {settings.data!r} set, "
               f"{len(settings.classes)} classes, drawn at {settings.resolution}²",
               lambda: write_synthetic_dataset(paths.images, settings.images_per_class, settings.resolution,
                                               settings.seed, variant=settings.data))
    prepare = PrepareSettings(source=str(paths.images), resolution=settings.resolution, vae=PIXEL_AUTOENCODER,
                              shard_size=settings.num_images)
    ledger.run("prepare data", f"{settings.resolution}² images encoded with the {AUTOENCODER_LABEL}",
               lambda: run_prepare(prepare, paths.data, show_progress=progress))
    if settings.teacher == "trained":  # every run is evaluated in its feature space, sit's too
        teacher = TeacherSettings(epochs=settings.teacher_epochs, seed=settings.seed)
        ledger.run("teacher", f"self-supervised DINOv2 teacher (`reglue train-vfm`), {settings.teacher_epochs} epochs",
                   lambda: _train_teacher(paths, teacher, progress))


def _train_teacher(paths: DemoPaths, teacher: TeacherSettings, progress: bool) -> None:
    result = train_teacher(paths.data, paths.teacher, teacher, progress=progress)
    if result.report is not None:
        log.info("teacher: %s", result.report.verdict)


def compare_settings(paths: DemoPaths, settings: DemoSettings) -> CompareSettings:
    """The comparison the demo runs on its data: the demo's tiny SiT, batch, lr and budget for every
    preset; the teacher trained here (or the random VFM) for the semantics and the evaluation space; the
    VFM and the compressor in float32 (as on a CPU); evaluation against every prepared image."""
    vfm = {"weights": str(paths.teacher)} if settings.teacher == "trained" else vfm_record(RANDOM_VFM)
    held_out = round(settings.num_images * COMPRESSOR["val_fraction"])
    run = {
        "model": {k: v for k, v in MODEL.items()},
        "data": {"num_workers": 0},
        "optim": {"lr": LEARNING_RATE},
        "train": {"global_batch": min(TRAIN_BATCH, settings.num_images), "max_steps": settings.steps,
                  "precision": "fp32", "ema_decay": EMA_DECAY},
        "checkpoint": {"every": 100, "keep_last": 1},
        "log": {"every": max(1, settings.steps // 150), "tensorboard": False, "sample_every": 0},
    }
    evaluation = {"num_samples": settings.eval_samples, "reference_images": settings.num_images,
                  "sampler": {"mode": SAMPLER, "steps": settings.sample_steps}, "batch": settings.eval_samples,
                  "micro_batch": min(settings.eval_samples, 32)}
    compressor = {"epochs": settings.compressor_epochs, "lr": COMPRESSOR["lr"], "widths": list(COMPRESSOR["widths"]),
                  "val_fraction": COMPRESSOR["val_fraction"],
                  "global_batch": min(COMPRESSOR["global_batch"], settings.num_images - held_out)}
    return CompareSettings(presets=settings.presets, seeds=settings.seeds, seed=settings.seed, vfm=vfm, run=run,
                           eval=evaluation, compressor=compressor, vfm_precision="fp32",
                           norm_stats_images=settings.num_images, pca_images=settings.num_images,
                           grid_rows=settings.grid_rows, grid_classes=len(settings.classes),
                           grid_steps=settings.sample_steps, grid_cfg=settings.cfg_scale)
