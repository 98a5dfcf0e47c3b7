"""The comparison's stages, each calling what the matching ``reglue`` command calls (module doc of
:mod:`reglue.compare`): the data copies, the semantic caches, the training runs and the class grids."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from reglue.compare.settings import ComparePaths, CompareSettings, copy_of, evaluation_every
from reglue.config import RunConfig, from_dict, load_config
from reglue.data import store
from reglue.distributed import on_main, process_state
from reglue.encoders.autoencoder import load_vae
from reglue.encoders.norm_stats import NormStats
from reglue.encoders.semantics import VFMSpec
from reglue.errors import InputError, ReglueError
from reglue.generate import SampleSettings, class_grid
from reglue.io import atomic_write, write_json
from reglue.models.loading import load_sampling_model
from reglue.pipeline import run_cache_semantics, run_fit_pca, run_norm_stats, run_train_compressor
from reglue.precision import autocast_dtype
from reglue.presets import get_preset
from reglue.sampling import Guidance
from reglue.training.compressor import BEST_WEIGHTS, CompressorSettings
from reglue.training.inputs import vfm_record
from reglue.training.trainer import train

log = logging.getLogger(__name__)
STATE_FILE = "compare.json"


class Ledger:
    """``STATE_FILE`` in ``out``: the settings plus [stage, seconds] of each finished stage, in the order run.

    Every process runs every stage (a stage's work is itself multi-process aware); the main process keeps
    the record, and every process reads the same one at the start, so all skip the same stages."""

    def __init__(self, out: Path, settings: dict, state_file: str = STATE_FILE):
        self.path = out / state_file
        fix = "rerun with the original options to resume, or choose a new --out folder."
        on_main(f"checking {self.path}", lambda: store.check_or_write_json(self.path, settings, fix))
        self.stages: dict[str, float] = dict(json.loads(self.path.read_text()).get("stages", []))

    def run(self, stage: str, what: str, work: Callable[[], object]) -> None:
        if stage in self.stages:
            log.info("%s: finished in an earlier run, skipped", stage)
            return
        log.info("%s: %s", stage, what)
        start = time.perf_counter()
        work()
        self.stages[stage] = round(time.perf_counter() - start, 1)

        def record() -> None:
            state = json.loads(self.path.read_text())
            write_json(self.path, {**state, "stages": list(self.stages.items())}, sort_keys=True)

        on_main(f"recording stage {stage!r} in {self.path}", record)
        log.info("%s: done in %.1f s", stage, self.stages[stage])


def check_out_dir(out: Path, state_file: str, what: str) -> None:
    """Refuse a non-empty folder without ``state_file``, so nothing else gets mixed in; ``what``: "a demo",
    "a comparison"."""
    if not out.is_dir() or (out / state_file).is_file():
        return
    entries = [p.name for p in out.iterdir() if p.name != ".lock"]
    if entries:
        raise InputError(f"{out} is not empty ({len(entries)} entries, e.g. {min(entries)!r}) and holds no "
                         f"{state_file}: it is not {what} folder. Pass a new or empty --out folder.")


# ----------------------------------------------------------------------------- semantic caches
def cache_stages(ledger: Ledger, paths: ComparePaths, data: Path, settings: CompareSettings, progress: bool) -> None:
    """The data copies, then (for presets that read the VFM) norm stats, compressor / PCA and each copy's
    cached semantics, CLS and REPA targets. Norm stats, compressor and PCA are fitted on ``data`` once;
    ReDi's norm stats and PCA are of its own blocks (:func:`copy_spec`)."""
    for kind in settings.copies:
        ledger.run(f"copy {kind}", f"link the prepared data into {paths.copy(kind)}",
                   lambda k=kind: on_main(f"linking {data} into {paths.copy(k)}", lambda: _link(data, paths.copy(k))))
    cached = [kind for kind in settings.copies if kind != "plain"]
    if not cached:
        return
    dtype = autocast_dtype(settings.vfm_precision, process_state().device)
    paths.semantics.mkdir(parents=True, exist_ok=True)
    for norm_stats, kind in {paths.norm_stats(kind): kind for kind in cached}.items():  # pca's, or the others'
        ledger.run("norm-stats" + (" pca" if kind == "pca" else ""),
                   f"channel statistics of the VFM's blocks {_blocks(settings, kind)}",
                   lambda k=kind, n=norm_stats: run_norm_stats(
                       data, copy_spec(settings, k), out=n, num_images=settings.norm_stats_images, autocast_dtype=dtype,
                       show_progress=progress))
    if "compressor" in cached:
        compressor, widths = compressor_settings(settings), compressor_widths(settings)
        stats = paths.norm_stats("compressor")
        ledger.run("compressor", f"{compressor.epochs} epochs of the semantic compressor",
                   lambda: run_train_compressor(
                       data, stats, paths.compressor, settings=compressor, progress=progress,
                       channels=None if widths is None else (NormStats.load(stats).channels, *widths)))
    if "pca" in cached:
        rank = get_preset("redi").semantic_channels
        ledger.run("pca", f"rank-{rank} PCA of the VFM's blocks {_blocks(settings, 'pca')}",
                   lambda: run_fit_pca(data, paths.norm_stats("pca"), rank=rank, out=paths.pca,
                                       num_images=settings.pca_images, autocast_dtype=dtype, show_progress=progress))
    for kind in cached:
        ledger.run(f"semantics {kind}", "cache semantics, CLS and REPA targets",
                   lambda k=kind: run_cache_semantics(
                       paths.copy(k), paths.norm_stats(k), compressor=paths.compressor / BEST_WEIGHTS if k == "compressor"
                       else None, pca=paths.pca if k == "pca" else None, repa_targets=_needs_repa(k, settings),
                       autocast_dtype=dtype, show_progress=progress))


def _link(data: Path, copy: Path) -> None:
    """Link ``data`` into ``copy`` afresh: what an interrupted copy stage left there (its ledger entry is
    missing, so no later stage used it) is this comparison's own and is removed first."""
    for leftover in [copy, *copy.parent.glob(f".{copy.name}.tmp-*")]:
        if leftover.exists():
            shutil.rmtree(leftover)
    copy.parent.mkdir(parents=True, exist_ok=True)
    store.link_prepared(data, copy)


def vfm_spec(settings: CompareSettings) -> VFMSpec:
    """The compared VFM (a ``reglue train-vfm`` folder names its own architecture)."""
    return VFMSpec.from_mapping(settings.vfm)


def copy_spec(settings: CompareSettings, kind: str) -> VFMSpec:
    """The VFM of the copy ``kind``'s cache: ``settings.vfm``; for ReDi's (``pca``) the same network on the
    last block only (the preset's ``semantic_layers``, as the paper's ReDi: PCA of the last layer)."""
    spec = vfm_spec(settings)
    if kind != "pca":
        return spec
    return replace(spec, layers=spec.blocks[-get_preset("redi").semantic_layers :])


def _blocks(settings: CompareSettings, kind: str) -> str:
    layers = copy_spec(settings, kind).layers
    return "(the last four)" if layers is None else str(list(layers))


def compressor_settings(settings: CompareSettings) -> CompressorSettings:
    """REGLUE's compressor: ``settings.compressor`` over the paper's defaults, seeded by ``settings.seed``,
    its VFM at ``settings.vfm_precision`` (the ``widths`` key is not a CompressorSettings field)."""
    given = {k: v for k, v in settings.compressor.items() if k != "widths"}
    return from_dict(CompressorSettings, {"seed": settings.seed, "vfm_precision": settings.vfm_precision, **given})


def compressor_widths(settings: CompareSettings) -> tuple[int, ...] | None:
    """The compressor's widths after the VFM's, ``compressor.widths`` (hidden, ..., S), checked to end in the
    reglue preset's S; None when not given: the compressor's own default (the paper's hidden 256 → 16)."""
    if "widths" not in settings.compressor:
        return None
    widths, channels = tuple(settings.compressor["widths"]), get_preset("reglue").semantic_channels
    if not widths or widths[-1] != channels:
        raise InputError(f"compressor.widths must end in {channels} (the reglue preset's semantic channels), found "
                         f"{list(widths)}.")
    return widths


def _needs_repa(kind: str, settings: CompareSettings) -> bool:
    """Whether a preset training on the copy ``kind`` aligns to REPA targets (they are large: only then)."""
    return any(get_preset(p).repa for p in settings.presets if copy_of(p, settings.presets) == kind)


# ----------------------------------------------------------------------------- train
def max_steps(settings: CompareSettings) -> int:
    """The training steps every run takes: ``run.train.max_steps``, or RunConfig's default."""
    return settings.run.get("train", {}).get("max_steps", RunConfig().train.max_steps)


def run_configs(paths: ComparePaths, settings: CompareSettings) -> dict[tuple[str, int], RunConfig]:
    """The validated config of every (preset, training seed): ``settings.run`` (``log.every`` by default at
    most 1/150 of the steps) and the shared evaluation (:func:`eval_config`), each with its run's folder,
    preset, data copy and seed; saved by the trainer as ``runs/<preset>/seed-<seed>/config.yaml``.
    Evaluation noise and labels do not depend on the seed."""
    shared = copy.deepcopy(settings.run)
    log_every = min(RunConfig().log.every, max(1, max_steps(settings) // 150))  # the report reads the final loss
    shared["log"] = {"every": log_every, **shared.get("log", {})}
    shared["eval"] = eval_config(settings)
    configs = {}
    for preset in settings.presets:
        for seed in settings.run_seeds:
            raw = copy.deepcopy(shared)
            raw["run_dir"] = str(paths.run(preset, seed))
            raw.setdefault("model", {})["preset"] = preset
            raw.setdefault("data", {}).update(dir=str(paths.copy(copy_of(preset, settings.presets))),
                                              semantics="cached")
            raw.setdefault("train", {})["seed"] = seed
            configs[preset, seed] = from_dict(RunConfig, raw).validate()
    return configs


def eval_config(settings: CompareSettings) -> dict:
    """Quality during training: ``settings.eval`` over these defaults — four evaluations per run, FD in
    the compared VFM's CLS space against the prepared images and ``class_accuracy`` (a linear probe on
    that space's CLS features, fitted on those images), the samples' noise and labels seeded by
    ``settings.seed``."""
    defaults = {"every": evaluation_every(max_steps(settings)), "metrics": ["fd", "class_accuracy"],
                "seed": settings.seed}
    if settings.vfm is not None:
        defaults["vfm"] = {k: v for k, v in vfm_record(vfm_spec(settings)).items() if k != "layers"}
    return {**defaults, **settings.eval}


def train_stages(ledger: Ledger, configs: dict[tuple[str, int], RunConfig]) -> None:
    """Train each (preset, seed) of ``configs`` (:func:`run_configs`) in turn."""
    for (preset, seed), config in configs.items():
        model = config.model
        size = model.name + "".join(f", {k} {getattr(model, k)}" for k in ("depth", "hidden_size")
                                    if getattr(model, k) is not None)
        ledger.run(f"train {preset} seed {seed}", f"{size}, preset {preset}, {config.train.max_steps} steps",
                   lambda c=config, p=preset, s=seed: _train(c, p, s))


def _train(config: RunConfig, preset: str, seed: int) -> None:
    result = train(config, resume="auto")
    if result.stopped_early:
        raise ReglueError(f"training {preset} (seed {seed}) stopped at step {result.step}; rerun the same command to "
                          "resume.")


# ----------------------------------------------------------------------------- grids
def grid_stages(ledger: Ledger, paths: ComparePaths, settings: CompareSettings, *, classes: list[int],
                caption: Callable[[str], list[str]]) -> None:
    """A class grid of each preset's first seed (``classes``: the columns), captioned by ``caption(preset)``;
    drawn by the main process."""
    device = process_state().device
    for preset in settings.presets:
        ledger.run(f"grid {preset}", f"class grid, {settings.grid_rows} per class (SDE, {settings.grid_steps} "
                   f"steps, CFG {settings.grid_cfg})",
                   lambda p=preset: on_main(f"drawing the grid of {p}", lambda: _grid(
                       paths, settings, p, classes=classes, device=device, lines=caption(p))))


def _grid(paths: ComparePaths, settings: CompareSettings, preset: str, *, classes: list[int], device: torch.device,
          lines: list[str]) -> None:
    from PIL import Image

    run = paths.run(preset, settings.seed)
    model = load_sampling_model(run / "ema").to(device)
    vae = load_vae(load_config(run / "config.yaml").data.vae).to(device)  # the run's decoding VAE
    guidance = Guidance(scale=settings.grid_cfg)
    rows_per_call = 2 if guidance.enabled else 1  # guidance doubles the rows of a model call
    grid_settings = SampleSettings(num_samples=len(classes) * settings.grid_rows, mode="sde",
                                   num_steps=settings.grid_steps, guidance=guidance, seed=settings.seed,
                                   micro_batch=rows_per_call * settings.grid_rows)
    grid = class_grid(model, vae, classes, grid_settings, per_class=settings.grid_rows, device=device)
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
