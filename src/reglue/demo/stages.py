"""The demo's stages, each calling what the matching ``reglue`` command calls (module doc of
:mod:`reglue.demo`): data, teacher, semantics, training and the class grids."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from reglue.config import RunConfig, from_dict
from reglue.data import store
from reglue.data.prepare import PrepareSettings, run_prepare
from reglue.data.synthetic import write_synthetic_dataset
from reglue.demo.settings import (
    AUTOENCODER_LABEL,
    COMPRESSOR,
    EMA_DECAY,
    LEARNING_RATE,
    MODEL,
    PCA_RANK,
    RANDOM_VFM,
    SAMPLER,
    TRAIN_BATCH,
    DemoPaths,
    DemoSettings,
    evaluation_every,
    uses_vfm,
)
from reglue.encoders.norm_stats import NormStats
from reglue.encoders.pixel import PIXEL_AUTOENCODER, PixelAutoencoder
from reglue.encoders.semantics import VFMSpec
from reglue.errors import InputError, ReglueError
from reglue.generate import SampleSettings, class_grid
from reglue.io import atomic_write, write_json
from reglue.models.loading import load_sampling_model
from reglue.pipeline import (
    COMPRESSOR_DIR,
    NORM_STATS_FILE,
    PCA_FILE,
    run_cache_semantics,
    run_fit_pca,
    run_norm_stats,
    run_train_compressor,
)
from reglue.presets import get_preset
from reglue.sampling import Guidance
from reglue.training.compressor import BEST_WEIGHTS, CompressorSettings
from reglue.training.teacher import TeacherSettings, teacher_spec, train_teacher
from reglue.training.trainer import train

log = logging.getLogger(__name__)
STATE_FILE = "demo.json"


class Ledger:
    """``demo.json``: the settings plus [stage, seconds] of each finished stage, in the order run."""

    def __init__(self, out: Path, settings: DemoSettings):
        self.path = out / STATE_FILE
        fix = "rerun with the original options to resume, or choose a new --out folder."
        store.check_or_write_json(self.path, settings.to_json(), fix)
        self.stages: dict[str, float] = dict(json.loads(self.path.read_text()).get("stages", []))

    def run(self, stage: str, what: str, work: Callable[[], object]) -> None:
        if stage in self.stages:
            log.info("%s: finished in an earlier run, skipped", stage)
            return
        log.info("%s: %s", stage, what)
        start = time.perf_counter()
        work()
        self.stages[stage] = round(time.perf_counter() - start, 1)
        state = json.loads(self.path.read_text())
        write_json(self.path, {**state, "stages": list(self.stages.items())}, sort_keys=True)
        log.info("%s: done in %.1f s", stage, self.stages[stage])


def check_out_dir(out: Path) -> None:
    """Refuse a non-empty folder that is not a demo (``demo.json``), so nothing else gets mixed in."""
    if not out.is_dir() or (out / STATE_FILE).is_file():
        return
    entries = [p.name for p in out.iterdir() if p.name != ".lock"]
    if entries:
        raise InputError(f"{out} is not empty ({len(entries)} entries, e.g. {min(entries)!r}) and holds no "
                         f"{STATE_FILE}: it is not a demo folder. Pass a new or empty --out folder.")


# ----------------------------------------------------------------------------- data and teacher
def data_stages(ledger: Ledger, paths: DemoPaths, settings: DemoSettings, progress: bool) -> None:
    """Images, the prepared data and the teacher."""
    ledger.run("images", f"{settings.num_images} synthetic images of the {settings.data!r} set, "
               f"{len(settings.classes)} classes, drawn at {settings.resolution}²",
               lambda: write_synthetic_dataset(paths.images, settings.images_per_class, settings.resolution,
                                               settings.seed, variant=settings.data))
    kinds = [None, *(["pca"] if "pca" in settings.semantic_kinds else [])]
    for kind in kinds:
        prepare = PrepareSettings(source=str(paths.images), resolution=settings.resolution, vae=PIXEL_AUTOENCODER,
                                  shard_size=settings.num_images)
        ledger.run(f"prepare {paths.data(kind).name}", f"{settings.resolution}² images encoded with the "
                   f"{AUTOENCODER_LABEL}", lambda k=kind, p=prepare: run_prepare(p, paths.data(k), show_progress=progress))
    if settings.teacher == "trained":  # every run is evaluated in its feature space, sit's too
        teacher = TeacherSettings(epochs=settings.teacher_epochs, seed=settings.seed)
        ledger.run("teacher", f"self-supervised DINOv2 teacher (`reglue train-vfm`), {settings.teacher_epochs} epochs",
                   lambda: _train_teacher(paths, teacher, progress))


def _train_teacher(paths: DemoPaths, teacher: TeacherSettings, progress: bool) -> None:
    result = train_teacher(paths.data(), paths.teacher, teacher, progress=progress)
    if result.report is not None:
        log.info("teacher: %s", result.report.verdict)


def vfm_spec(paths: DemoPaths, settings: DemoSettings) -> VFMSpec:
    """The VFM every later stage uses: the teacher trained here, or the random one (``--random-vfm``)."""
    return teacher_spec(paths.teacher) if settings.teacher == "trained" else RANDOM_VFM


def semantic_stages(ledger: Ledger, paths: DemoPaths, settings: DemoSettings, progress: bool) -> None:
    """Norm stats, compressor or PCA, and the cached semantics / CLS / REPA targets of each data copy."""
    if not settings.uses_vfm:
        return
    spec = vfm_spec(paths, settings)
    for kind in settings.semantic_kinds:
        data = paths.data(kind)
        norm_stats = data / NORM_STATS_FILE
        suffix = f" ({data.name})"
        ledger.run(f"norm-stats{suffix}", "channel statistics of the VFM's layer maps",
                   lambda d=data, n=norm_stats: run_norm_stats(d, spec, out=n, num_images=settings.num_images,
                                                               show_progress=progress))
        compressor = data / COMPRESSOR_DIR / BEST_WEIGHTS if kind == "compressor" else None
        pca = data / PCA_FILE if kind == "pca" else None
        if compressor is not None:
            ledger.run(f"compressor{suffix}", f"{settings.compressor_epochs} epochs of the semantic compressor",
                       lambda d=data, n=norm_stats: run_train_compressor(
                           d, n, d / COMPRESSOR_DIR, settings=_compressor_settings(settings), progress=progress,
                           channels=(NormStats.load(n).channels, *COMPRESSOR["channels"])))
        if pca is not None:
            ledger.run(f"pca{suffix}", f"rank-{PCA_RANK} PCA of the VFM's layer maps",
                       lambda d=data, n=norm_stats, p=pca: run_fit_pca(d, n, rank=PCA_RANK, out=p,
                                                                       num_images=settings.num_images,
                                                                       show_progress=progress))
        ledger.run(f"semantics{suffix}", "cache semantics, CLS and REPA targets",
                   lambda d=data, n=norm_stats, c=compressor, p=pca: run_cache_semantics(
                       d, n, compressor=c, pca=p, repa_targets=True, show_progress=progress))


def _compressor_settings(settings: DemoSettings) -> CompressorSettings:
    """The compressor's settings: the VFM in float32 (as on a CPU), the batch at most the training share
    of the demo's images. Its input width is the VFM's: the norm stats' channels, given beside them."""
    held_out = round(settings.num_images * COMPRESSOR["val_fraction"])
    return CompressorSettings(epochs=settings.compressor_epochs, seed=settings.seed, lr=COMPRESSOR["lr"],
                              val_fraction=COMPRESSOR["val_fraction"], vfm_precision="fp32",
                              global_batch=min(COMPRESSOR["global_batch"], settings.num_images - held_out))


# ----------------------------------------------------------------------------- train
def demo_config(paths: DemoPaths, settings: DemoSettings, preset: str, seed: int) -> RunConfig:
    """The validated training config of ``preset`` with training seed ``seed`` (saved by the trainer as
    ``runs/<preset>/seed-<seed>/config.yaml``); evaluation noise and labels do not depend on ``seed``."""
    raw = {
        "run_dir": str(paths.run(preset, seed)),
        "model": {**MODEL, "preset": preset},
        "data": {"dir": str(paths.data(get_preset(preset).semantics)), "semantics": "cached", "num_workers": 0},
        "optim": {"lr": LEARNING_RATE},
        "train": {"global_batch": min(TRAIN_BATCH, settings.num_images), "max_steps": settings.steps,
                  "precision": "fp32", "ema_decay": EMA_DECAY, "seed": seed},
        "checkpoint": {"every": 100, "keep_last": 1},
        "log": {"every": max(1, settings.steps // 150), "tensorboard": False, "sample_every": 0},
        "eval": eval_config(paths, settings),
    }
    return from_dict(RunConfig, raw).validate()


def eval_config(paths: DemoPaths, settings: DemoSettings) -> dict:
    """Quality during training, every ``evaluation_every`` steps on the same samples: FD in the VFM's CLS
    space against every prepared image, and the share of samples that a linear probe on that space's CLS
    features, fitted on every prepared image, gives the class they were drawn for (class_accuracy)."""
    spec = vfm_spec(paths, settings)
    return {"every": evaluation_every(settings.steps), "num_samples": settings.eval_samples,
            "metrics": ["fd", "class_accuracy"],
            "vfm": {"name": spec.name, "weights": spec.weights, "arch": dict(spec.arch)},
            "reference_images": settings.num_images, "sampler": {"mode": SAMPLER, "steps": settings.sample_steps},
            "seed": settings.seed, "batch": settings.eval_samples, "micro_batch": min(settings.eval_samples, 32)}


def train_stages(ledger: Ledger, paths: DemoPaths, settings: DemoSettings) -> None:
    for preset in settings.presets:
        targets = "VFM targets" if uses_vfm(preset) else "no VFM targets"
        for seed in settings.run_seeds:
            ledger.run(f"train {preset} seed {seed}", f"tiny SiT ({MODEL['depth']} blocks of width "
                       f"{MODEL['hidden_size']}), preset {preset}, {targets}, {settings.steps} steps",
                       lambda p=preset, s=seed: _train(paths, settings, p, s))


def _train(paths: DemoPaths, settings: DemoSettings, preset: str, seed: int) -> None:
    result = train(demo_config(paths, settings, preset, seed), resume="auto")
    if result.stopped_early:
        raise ReglueError(f"training {preset} (seed {seed}) stopped at step {result.step}; rerun the demo to resume.")


# ----------------------------------------------------------------------------- grids
def grid_stages(ledger: Ledger, paths: DemoPaths, settings: DemoSettings, *, caption: Callable) -> None:
    """A class grid of each preset's first seed, captioned by ``caption(preset)`` (lines of text)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for preset in settings.presets:
        ledger.run(f"grid {preset}", f"class grid, {settings.grid_rows} per class ({SAMPLER.upper()}, "
                   f"{settings.sample_steps} steps, CFG {settings.cfg_scale})",
                   lambda p=preset: _grid(paths, settings, p, device, caption(p)))


def _grid(paths: DemoPaths, settings: DemoSettings, preset: str, device: torch.device, lines: list[str]) -> None:
    from PIL import Image

    model = load_sampling_model(paths.run(preset, settings.seed) / "ema").to(device)
    guidance = Guidance(scale=settings.cfg_scale)
    rows_per_call = 2 if guidance.enabled else 1  # guidance doubles the rows of a model call
    grid_settings = SampleSettings(num_samples=len(settings.classes) * settings.grid_rows, mode=SAMPLER,
                                   num_steps=settings.sample_steps, guidance=guidance, seed=settings.seed,
                                   micro_batch=rows_per_call * settings.grid_rows)
    grid = class_grid(model, PixelAutoencoder().to(device), range(len(settings.classes)), grid_settings,
                      per_class=settings.grid_rows, device=device)
    with atomic_write(paths.grid(preset)) as tmp:
        Image.fromarray(caption_image(grid, lines)).save(tmp, format="PNG")


def caption_image(image: np.ndarray, lines: list[str]) -> np.ndarray:
    """uint8 (H, W, 3) -> the same image with ``lines`` of black text on white beneath it."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    line_height = 20
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + line_height * len(lines) + 6), "white")
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, image.shape[0] + 3 + i * line_height), line, fill="black", font=font)
    return np.asarray(canvas)
