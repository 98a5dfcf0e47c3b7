"""``reglue demo``: the whole chain, offline, on the built-in synthetic dataset, in minutes on a CPU.

There are no pretrained weights here, so the demo swaps the two frozen encoders:

- the SD-VAE becomes the weight-free pixel autoencoder (:mod:`reglue.encoders.pixel`), so the
  pictures mean something;
- DINOv2 becomes a tiny DINOv2-with-registers built from the real timm class with **random,
  untrained** weights: its semantic channels, CLS token and REPA targets only exercise the
  plumbing. Every log line, file and caption that involves it says so.

Stages, each calling what the matching ``reglue`` command calls, all under ``DIR``:

  1. images      8-class synthetic ImageFolder (:mod:`reglue.data.synthetic`)   images/
  2. prepare     ADM crop + pixel-autoencoder moments (``reglue prepare``)       data/
  3. norm-stats  channel statistics of the random VFM                             data/norm_stats.safetensors
  4. compressor  a few epochs of the semantic compressor (ReDi: a PCA instead)   data/compressor/
  5. semantics   cached semantics, CLS and REPA targets                          data/shards/*/
  6. train       the preset's tiny SiT (``reglue train``)                        runs/<preset>/
  7. sample      a class grid and class-balanced samples                          grid_<preset>.png, samples/<preset>/
  8. evaluate    pixel-space class accuracy, thumbnail FID / precision / recall  metrics.json
  9. report      loss curves, the grid(s) side by side, report.md                 loss_curves.png, grid.png, report.md

Stages 3-5 run only for presets that use the VFM (not ``sit``). ``DIR/demo.json`` records the
settings and the seconds each finished stage took: a rerun skips finished stages and resumes an
interrupted one through that stage's own resume; a rerun with other settings, or into a
non-empty folder that is no demo, is refused. Every file is written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from reglue.config import RunConfig, from_dict
from reglue.data import store
from reglue.data.dataset import PreparedDataset
from reglue.data.prepare import PrepareSettings, run_prepare
from reglue.data.synthetic import CLASSES, write_synthetic_dataset
from reglue.encoders.pixel import PIXEL_AUTOENCODER, PixelAutoencoder
from reglue.encoders.semantics import VFMSpec
from reglue.errors import ReglueError
from reglue.generate import SampleSettings, class_grid, generate
from reglue.io import atomic_write
from reglue.metrics.evaluate import read_images, write_results
from reglue.metrics.pixel_space import pixel_space_metrics
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
from reglue.presets import PRESETS, get_preset
from reglue.resolution import check_resolution
from reglue.sampling import Guidance
from reglue.training.compressor import BEST_WEIGHTS
from reglue.training.metrics import read_metrics
from reglue.training.plot import plot_run, plot_runs
from reglue.training.trainer import train

log = logging.getLogger(__name__)

UNTRAINED = "random, untrained"
VFM = VFMSpec("dinov2_vitb14_reg", "random", None, {"embed_dim": 32, "depth": 4, "num_heads": 2})
VFM_LABEL = f"tiny DINOv2-with-registers (embed 32, depth 4, 2 heads; last 4 blocks), {UNTRAINED}"
AUTOENCODER_LABEL = "pixel autoencoder (no weights: 8x8 block means of RGB + luminance)"
NOTE = (f"Plumbing checks, not results: the VFM is {UNTRAINED} and the models are tiny and briefly trained; "
        "nothing here is comparable with the paper's numbers.")
COMPARED = ("sit", "reglue")  # --compare
STATE_FILE = "demo.json"

MODEL = {"name": "SiT-S/2", "depth": 4, "hidden_size": 64, "num_heads": 4, "encoder_depth": 2,
         "projector_dim": 256}  # patch 2: (R/16)² tokens, the grid of the VFM's REPA targets
TRAIN_BATCH = 8  # on a CPU, more small steps beat fewer large ones at equal cost (tried 16 × 900 vs 8 × 1800)
LEARNING_RATE = 2e-3
EMA_DECAY = 0.995
COMPRESSOR = {"channels": (128, 64, 16), "global_batch": 32, "lr": 1e-3, "val_fraction": 0.125}
PCA_RANK = 8
SAMPLER = "sde"
EVAL_SAMPLES = 32  # samples per evaluation during training
EVAL_KEY = f"eval/fd_{VFM.name}"
EVAL_LABEL = f"FD in the feature space of the {UNTRAINED} tiny DINOv2 (random features: a plumbing check)"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo computes; a rerun into the same folder must match."""

    presets: tuple[str, ...] = ("reglue",)
    steps: int = 1500  # training steps per preset
    images_per_class: int = 32
    compressor_epochs: int = 2
    sample_steps: int = 25
    samples_per_class: int = 4  # for the metrics
    grid_rows: int = 4  # samples per class in the grid
    cfg_scale: float = 4.0
    seed: int = 0
    # Images are drawn and trained at 128²: 16×16 latents, 8×8 tokens, a 112² VFM input. A step
    # costs about a quarter of 256²'s (docs/demo.md), and at 16×16 the pixel autoencoder still
    # keeps every class's shape; 64² (8×8 latents) blurs triangles into blobs.
    resolution: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "presets", tuple(self.presets))
        unknown = [p for p in self.presets if p not in PRESETS]
        if not self.presets or unknown:
            raise ValueError(f"presets must be some of {', '.join(PRESETS)}, found {list(self.presets)}.")
        counts = {"steps": self.steps, "compressor_epochs": self.compressor_epochs, "sample_steps": self.sample_steps,
                  "samples_per_class": self.samples_per_class, "grid_rows": self.grid_rows}
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, found {value}.")
        check_resolution(self.resolution)
        if self.images_per_class < 2:
            raise ValueError(f"images_per_class must be >= 2 (one is held out for the compressor's "
                             f"validation), found {self.images_per_class}.")
        _ = self.semantics  # refuses presets that need different semantic caches

    @property
    def semantics(self) -> str | None:
        """"compressor", "pca" or None: the local semantics the presets need (at most one kind)."""
        kinds = {get_preset(p).semantics for p in self.presets} - {None}
        if len(kinds) > 1:
            raise ValueError(f"presets {list(self.presets)} need different semantic caches; run them in separate demos.")
        return kinds.pop() if kinds else None

    @property
    def uses_vfm(self) -> bool:
        return any(map(uses_vfm, self.presets))

    def to_json(self) -> dict:
        return {**asdict(self), "presets": list(self.presets)}


def uses_vfm(preset: str) -> bool:
    """Whether ``preset`` reads anything from the VFM (semantics, CLS or REPA targets)."""
    p = get_preset(preset)
    return bool(p.semantics or p.cls_token or p.repa)


@dataclass
class DemoResult:
    out: Path
    report: Path
    grid: Path
    loss_curves: Path
    metrics: Path
    stage_seconds: dict[str, float]


@dataclass(frozen=True)
class DemoPaths:
    """Where each stage writes, under the output folder ``out``."""

    out: Path

    @property
    def images(self) -> Path:
        return self.out / "images"

    @property
    def data(self) -> Path:
        return self.out / "data"

    def run(self, preset: str) -> Path:
        return self.out / "runs" / preset

    def samples(self, preset: str) -> Path:
        return self.out / "samples" / preset

    def grid(self, preset: str) -> Path:
        return self.out / f"grid_{preset}.png"


class _Ledger:
    """``demo.json``: the settings plus [stage, seconds] of each finished stage, in the order run."""

    def __init__(self, out: Path, settings: DemoSettings):
        self.path = out / STATE_FILE
        fix = "rerun with the original options to resume, or choose a new --out folder."
        store.check_or_write_json(self.path, settings.to_json(), True, fix)
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
        store.write_json_atomic(self.path, {**state, "stages": list(self.stages.items())})
        log.info("%s: done in %.1f s", stage, self.stages[stage])


def _check_out_dir(out: Path) -> None:
    """Refuse a non-empty folder that is not a demo (``demo.json``), so nothing else gets mixed in."""
    if not out.is_dir() or (out / STATE_FILE).is_file():
        return
    entries = [p.name for p in out.iterdir() if p.name != ".lock"]
    if entries:
        raise ValueError(f"{out} is not empty ({len(entries)} entries, e.g. {min(entries)!r}) and holds no "
                         f"{STATE_FILE}: it is not a demo folder. Pass a new or empty --out folder.")


def run_demo(out: str | Path, settings: DemoSettings = DemoSettings(), progress: bool = True) -> DemoResult:
    """Run (or resume) every stage into ``out``; see the module docstring."""
    paths = DemoPaths(Path(out).resolve())
    _check_out_dir(paths.out)
    with store.lock_directory(paths.out):
        ledger = _Ledger(paths.out, settings)
        log.info("demo of %s in %s; VFM: %s; autoencoder: %s", ", ".join(settings.presets), paths.out,
                 VFM_LABEL if settings.uses_vfm else "not used", AUTOENCODER_LABEL)
        _data_stages(ledger, paths, settings, progress)
        for preset in settings.presets:
            ledger.run(f"train {preset}", _train_what(preset), lambda p=preset: _train(paths, settings, p))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for preset in settings.presets:
            ledger.run(f"sample {preset}", f"class grid and {settings.samples_per_class} samples per class "
                       f"({SAMPLER.upper()}, {settings.sample_steps} steps, CFG {settings.cfg_scale})",
                       lambda p=preset: _sample(paths, settings, p, device))
        ledger.run("evaluate", "pixel-space class accuracy, thumbnail FID / precision / recall",
                   lambda: _evaluate(paths, settings))
        ledger.run("report", "loss curves, grid and report.md", lambda: _report(paths, settings, ledger.stages))
    return DemoResult(paths.out, paths.out / "report.md", paths.out / "grid.png", paths.out / "loss_curves.png",
                      paths.out / "metrics.json", dict(ledger.stages))


# ----------------------------------------------------------------------------- data stages (1-5)
def _data_stages(ledger: _Ledger, paths: DemoPaths, settings: DemoSettings, progress: bool) -> None:
    count = len(CLASSES) * settings.images_per_class
    ledger.run("images", f"{count} synthetic images, {len(CLASSES)} classes",
               lambda: write_synthetic_dataset(paths.images, settings.images_per_class, settings.resolution,
                                               settings.seed))
    prepare = PrepareSettings(source=str(paths.images), resolution=settings.resolution, vae=PIXEL_AUTOENCODER,
                              shard_size=count)
    ledger.run("prepare", f"{settings.resolution}² images encoded with the {AUTOENCODER_LABEL}",
               lambda: run_prepare(prepare, paths.data, show_progress=progress))
    if not settings.uses_vfm:
        return
    norm_stats = paths.data / NORM_STATS_FILE
    ledger.run("norm-stats", f"channel statistics of the {VFM_LABEL}",
               lambda: run_norm_stats(paths.data, VFM, out=norm_stats, num_images=count, show_progress=progress))
    compressor = paths.data / COMPRESSOR_DIR
    pca = paths.data / PCA_FILE
    if settings.semantics == "compressor":
        ledger.run("compressor", f"{settings.compressor_epochs} epochs on features of the VFM ({UNTRAINED})",
                   lambda: run_train_compressor(paths.data, norm_stats, compressor, epochs=settings.compressor_epochs,
                                                seed=settings.seed, progress=progress, **_compressor_options(count)))
    elif settings.semantics == "pca":
        ledger.run("pca", f"rank-{PCA_RANK} PCA of features of the VFM ({UNTRAINED})",
                   lambda: run_fit_pca(paths.data, norm_stats, rank=PCA_RANK, out=pca, num_images=count,
                                       show_progress=progress))
    ledger.run("semantics", f"cache semantics, CLS and REPA targets of the VFM ({UNTRAINED})",
               lambda: run_cache_semantics(
                   paths.data, norm_stats, compressor=compressor / BEST_WEIGHTS if settings.semantics == "compressor"
                   else None, pca=pca if settings.semantics == "pca" else None, repa_targets=True,
                   show_progress=progress))


def _compressor_options(count: int) -> dict:
    """The compressor's training options; its batch shrinks to the training share of ``count`` images."""
    held_out = round(count * COMPRESSOR["val_fraction"])
    return {**COMPRESSOR, "global_batch": min(COMPRESSOR["global_batch"], count - held_out)}


# ----------------------------------------------------------------------------- train (6)
def _train_what(preset: str) -> str:
    targets = f"targets from the {UNTRAINED} VFM" if uses_vfm(preset) else "no VFM targets"
    return f"tiny SiT ({MODEL['depth']} blocks of width {MODEL['hidden_size']}), preset {preset}, {targets}"


def demo_config(paths: DemoPaths, settings: DemoSettings, preset: str) -> RunConfig:
    """The validated training config of ``preset`` (the trainer saves it as ``runs/<preset>/config.yaml``)."""
    steps = settings.steps
    raw = {
        "run_dir": str(paths.run(preset)),
        "model": {**MODEL, "preset": preset},
        "data": {"dir": str(paths.data), "semantics": "cached", "num_workers": 0},
        "optim": {"lr": LEARNING_RATE},
        "train": {"global_batch": min(TRAIN_BATCH, len(CLASSES) * settings.images_per_class), "max_steps": steps,
                  "mixed_precision": "no", "ema_decay": EMA_DECAY, "seed": settings.seed},
        "checkpoint": {"every": 100, "keep_last": 1},
        "log": {"every": max(1, steps // 150), "tensorboard": False, "sample_every": 0},
        "eval": _eval_config(settings),
    }
    return from_dict(RunConfig, raw).validate()


def _eval_config(settings: DemoSettings) -> dict:
    """Quality during training: FD in the random VFM's feature space, 4 times per run, on the
    same samples each time, against every training image (the space is random, see EVAL_LABEL)."""
    images = len(CLASSES) * settings.images_per_class
    return {"every": max(1, settings.steps // 4), "num_samples": min(EVAL_SAMPLES, images), "metrics": ["fd"],
            "vfm": {"name": VFM.name, "weights": VFM.weights, "arch": dict(VFM.arch)}, "reference_images": images,
            "sampler": {"mode": SAMPLER, "steps": settings.sample_steps}, "seed": settings.seed,
            "batch": EVAL_SAMPLES, "micro_batch": EVAL_SAMPLES}


def _train(paths: DemoPaths, settings: DemoSettings, preset: str) -> None:
    result = train(demo_config(paths, settings, preset), resume="auto")
    if result.stopped_early:
        raise ReglueError(f"training {preset} stopped at step {result.step}; rerun the demo to resume it.")


# ----------------------------------------------------------------------------- sample (7)
def _sample(paths: DemoPaths, settings: DemoSettings, preset: str, device: torch.device) -> None:
    from PIL import Image

    class_names = store.read_manifest(paths.data)["class_names"]
    model = load_sampling_model(paths.run(preset) / "ema").to(device)
    autoencoder = PixelAutoencoder().to(device)
    guidance = Guidance(scale=settings.cfg_scale)
    rows_per_call = 2 if guidance.enabled else 1  # guidance doubles the rows of a model call
    common = {"mode": SAMPLER, "num_steps": settings.sample_steps, "guidance": guidance, "seed": settings.seed}
    grid_settings = SampleSettings(num_samples=len(class_names) * settings.grid_rows,
                                   micro_batch=rows_per_call * settings.grid_rows, **common)
    grid = class_grid(model, autoencoder, range(len(class_names)), grid_settings, per_class=settings.grid_rows,
                      device=device)
    vfm = VFM_LABEL if uses_vfm(preset) else "not used"
    captioned = _caption(grid, [_grid_title(preset, settings, class_names), f"VFM: {vfm} · {AUTOENCODER_LABEL}"])
    with atomic_write(paths.grid(preset)) as tmp:
        Image.fromarray(captioned).save(tmp, format="PNG")
    batch = len(class_names) * settings.samples_per_class
    sample_settings = SampleSettings(num_samples=batch, labels="balanced", micro_batch=rows_per_call * batch, **common)
    generate(model, autoencoder, paths.samples(preset), sample_settings, per_device_batch=batch, device=device)


def _grid_title(preset: str, settings: DemoSettings, class_names: list[str]) -> str:
    columns = ", ".join(f"{k} {name}" for k, name in enumerate(class_names))
    return (f"{preset}: {settings.steps} training steps · {SAMPLER.upper()} {settings.sample_steps} steps, "
            f"CFG {settings.cfg_scale} · columns: {columns}")


def _caption(image: np.ndarray, lines: list[str]) -> np.ndarray:
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


# ----------------------------------------------------------------------------- evaluate (8)
def _evaluate(paths: DemoPaths, settings: DemoSettings) -> None:
    data = PreparedDataset(paths.data, fields=("images",))
    rows = [data[i] for i in range(len(data))]
    real = torch.stack([r["images"] for r in rows]).permute(0, 2, 3, 1).numpy()  # (N, R, R, 3)
    real_labels = torch.stack([r["label"] for r in rows]).numpy()
    results = {}
    for preset in settings.presets:
        npz = paths.samples(preset) / "samples.npz"
        with np.load(npz) as packed:
            labels = packed["labels"]
        history = read_metrics(paths.run(preset))
        last = [row for row in history if "loss/latent" in row][-1]
        results[preset] = {
            "training_steps": settings.steps,
            "final_losses": {k: v for k, v in last.items() if k.startswith("loss/")},
            "fd_during_training": {str(row["step"]): row[EVAL_KEY] for row in history if EVAL_KEY in row},
            **pixel_space_metrics(real, real_labels, read_images(npz), labels, data.num_classes),
            "samples": str(npz.relative_to(paths.out)),
            "vfm": VFM_LABEL if uses_vfm(preset) else "not used",
        }
    payload = {"note": NOTE, "encoders": {"vfm": VFM_LABEL, "autoencoder": AUTOENCODER_LABEL},
               "classes": data.class_names, "presets": results}
    _check_finite(payload)
    write_results(payload, paths.out / "metrics.json")


def _check_finite(value, where: str = "metrics") -> None:
    """Every number in the nested metrics is finite (None stands for a class without samples)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ReglueError(f"{where} is {value}; the demo's training diverged: rerun with a new --out folder.")


# ----------------------------------------------------------------------------- report (9)
def _report(paths: DemoPaths, settings: DemoSettings, stage_seconds: dict[str, float]) -> None:
    from PIL import Image

    curves = paths.out / "loss_curves.png"
    if len(settings.presets) == 1:
        plot_run(paths.run(settings.presets[0]), curves, log_y=True)
    else:
        plot_runs({p: paths.run(p) for p in settings.presets}, curves, log_y=True)
    grids = [np.asarray(Image.open(paths.grid(p)).convert("RGB")) for p in settings.presets]
    with atomic_write(paths.out / "grid.png") as tmp:
        Image.fromarray(_side_by_side(grids)).save(tmp, format="PNG")
    metrics = json.loads((paths.out / "metrics.json").read_text())
    with atomic_write(paths.out / "report.md") as tmp:
        tmp.write_text(_report_text(paths, settings, metrics, stage_seconds))


def _side_by_side(images: list[np.ndarray], gap: int = 24) -> np.ndarray:
    """uint8 (H_i, W_i, 3) images left to right on white, top-aligned, ``gap`` pixels apart."""
    height = max(i.shape[0] for i in images)
    width = sum(i.shape[1] for i in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for image in images:
        canvas[: image.shape[0], x : x + image.shape[1]] = image
        x += image.shape[1] + gap
    return canvas


def _report_text(paths: DemoPaths, settings: DemoSettings, metrics: dict, stage_seconds: dict[str, float]) -> str:
    """report.md: what ran (and that the VFM is random), the grid, the curves, the metrics, the files."""
    classes = metrics["classes"]
    batch = min(TRAIN_BATCH, len(classes) * settings.images_per_class)
    columns = ", ".join(f"{k} = {name}" for k, name in enumerate(classes))
    lines = [
        "# reglue demo", "", f"**{NOTE}**", "",
        f"- VFM: {VFM_LABEL}; its semantic channels, CLS token and REPA targets carry no meaning.",
        f"- Autoencoder: {AUTOENCODER_LABEL}, in place of the SD-VAE (no weights here).",
        (f"- Data: {len(classes)} synthetic classes × {settings.images_per_class} images ([images/](images/)), "
         "prepared into [data/](data/manifest.json)."),
        (f"- Model: SiT with {MODEL['depth']} blocks of width {MODEL['hidden_size']}; {settings.steps} steps of "
         f"batch {batch} per preset."),
        "", "## Samples", "",
        (f"One column per class ({columns}), {settings.grid_rows} samples each; {SAMPLER.upper()} sampler, "
         f"{settings.sample_steps} steps, guidance scale {settings.cfg_scale}."),
        "", "![class grid](grid.png)", "", "## Training", "", "![loss curves](loss_curves.png)", "",
        *_metrics_section(metrics), *_files_section(paths, settings, metrics), *_time_section(stage_seconds),
    ]
    return "\n".join(lines)


def _metrics_section(metrics: dict) -> list[str]:
    chance = 1 / len(metrics["classes"])
    lines = [
        "## Metrics ([metrics.json](metrics.json))", "",
        ("Class accuracy: each sample gets the class whose mean real image (32×32) is nearest; chance is "
         f"{chance:.3f}, the same classifier on the real images gives the ceiling. Thumbnail FID, precision and "
         "recall use 8×8 thumbnails instead of Inception features (no Inception weights here): they compare "
         "colour layouts only and are not an FID."),
        "",
        "| preset | class accuracy | real images (ceiling) | thumbnail FID | precision | recall | final latent loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, m in metrics["presets"].items():
        lines.append(f"| {preset} | {m['class_accuracy']:.3f} | {m['class_accuracy_real_images']:.3f} | "
                     f"{m['thumbnail_fid']:.4f} | {m['thumbnail_precision']:.3f} | {m['thumbnail_recall']:.3f} | "
                     f"{m['final_losses']['loss/latent']:.4f} |")
    lines += ["", (f"During training each run was scored {EVAL_SAMPLES} samples at a time ({EVAL_LABEL}; "
                   f"the `{EVAL_KEY}` panel of the curves above):"), "",
              "| preset | step: FD |", "|---|---|"]
    for preset, m in metrics["presets"].items():
        series = ", ".join(f"{step}: {fd:.4g}" for step, fd in m["fd_during_training"].items())
        lines.append(f"| {preset} | {series} |")
    return [*lines, ""]


def _files_section(paths: DemoPaths, settings: DemoSettings, metrics: dict) -> list[str]:
    lines = ["## Files", ""]
    for preset in settings.presets:
        run = paths.run(preset).relative_to(paths.out)
        lines.append(f"- {preset}: [resolved config]({run}/config.yaml), [EMA weights]({run}/ema/config.json), "
                     f"[training log]({run}/metrics.jsonl), [grid]({paths.grid(preset).name}), "
                     f"[samples]({metrics['presets'][preset]['samples']})")
    if settings.semantics == "compressor":
        lines.append(f"- semantic compressor (trained on features of the {UNTRAINED} VFM): "
                     "[weights](data/compressor/compressor_best.safetensors), "
                     "[curve](data/compressor/loss_curve.png)")
    return [*lines, ""]


def _time_section(stage_seconds: dict[str, float]) -> list[str]:
    lines = ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in stage_seconds.items()]
    return [*lines, f"| total | {sum(stage_seconds.values()):.1f} |", ""]
