"""``reglue demo``: the whole chain, offline, on a built-in synthetic data set, in minutes on a CPU.

There are no pretrained weights here, so the demo makes or swaps the two frozen encoders:

- the SD-VAE becomes the weight-free pixel autoencoder (:mod:`reglue.encoders.pixel`);
- DINOv2 becomes a tiny DINOv2-with-registers **trained here** on the demo's images by
  ``reglue train-vfm`` (:mod:`reglue.training.teacher`): its semantic channels, CLS token and
  REPA targets come from a network that learned from the data. ``--random-vfm`` uses a random,
  untrained one instead, for plumbing checks only.

Stages, each calling what the matching ``reglue`` command calls, all under ``DIR``:

  1. images       the synthetic ImageFolder (:mod:`reglue.data.synthetic`)            images/
  2. prepare      pixel-autoencoder moments (``reglue prepare``); ReDi: a copy       data/ (data-pca/)
  3. teacher      the VFM (``reglue train-vfm``), with its k-NN / linear-probe report  teacher/
  4. semantics    norm stats, compressor (ReDi: PCA), cached semantics/CLS/REPA      data/...
  5. train        each preset × seed (``reglue train``), evaluating itself 4 times   runs/<preset>/seed-<s>/
  6. grid         a class grid of each preset's first seed                           grid_<preset>.png
  7. report       results over seeds, curves (mean ± std), grids side by side        results.json, report.md, ...

The class-accuracy metric of the evaluations is a linear probe on the VFM's CLS features of the
prepared images, fitted by the first run's first evaluation and cached in ``data/eval/``.
Stage 4 runs only for presets that use the VFM (not ``sit`` alone); the teacher is trained
whenever it is used, since every run, ``sit``'s too, is evaluated in its feature space. ``DIR/demo.json``
records the settings and the seconds each finished stage took: a rerun skips finished stages and
resumes an interrupted one through that stage's own resume; a rerun with other settings, or into a
non-empty folder that is no demo, is refused. Every file is written atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from reglue.data import store
from reglue.demo.report import CURVES_FILE, LOSS_CURVES_FILE, RESULTS_FILE, write_report
from reglue.demo.settings import (
    ALL_PRESETS,
    AUTOENCODER_LABEL,
    RANDOM_VFM_LABEL,
    SAMPLER,
    DemoPaths,
    DemoSettings,
    quick,
    uses_vfm,
)
from reglue.demo.stages import (
    Ledger,
    check_out_dir,
    data_stages,
    grid_stages,
    semantic_stages,
    train_stages,
    vfm_spec,
)

log = logging.getLogger(__name__)

__all__ = ["ALL_PRESETS", "DemoResult", "DemoSettings", "quick", "run_demo"]


@dataclass
class DemoResult:
    out: Path
    report: Path
    results: Path
    grid: Path
    curves: Path
    loss_curves: Path
    stage_seconds: dict[str, float]


def run_demo(out: str | Path, settings: DemoSettings | None = None, progress: bool = True) -> DemoResult:
    """Run (or resume) every stage into ``out`` (``settings`` None: the defaults); see the module docstring."""
    settings = DemoSettings() if settings is None else settings
    paths = DemoPaths(Path(out).resolve())
    check_out_dir(paths.out)
    with store.lock_directory(paths.out):
        ledger = Ledger(paths.out, settings)
        log.info("demo of %s × %d seed(s) in %s; VFM: %s; autoencoder: %s", ", ".join(settings.presets),
                 settings.seeds, paths.out, _vfm_label(settings), AUTOENCODER_LABEL)
        data_stages(ledger, paths, settings, progress)
        semantic_stages(ledger, paths, settings, progress)
        train_stages(ledger, paths, settings)
        vfm_name = vfm_spec(paths, settings).name
        grid_stages(ledger, paths, settings, caption=lambda preset: _caption(preset, settings))
        ledger.run("report", "results over seeds, curves, grids and report.md",
                   lambda: write_report(paths, settings, vfm_name, ledger.stages))
    return DemoResult(paths.out, paths.out / "report.md", paths.out / RESULTS_FILE, paths.out / "grid.png",
                      paths.out / CURVES_FILE, paths.out / LOSS_CURVES_FILE, dict(ledger.stages))


def _vfm_label(settings: DemoSettings) -> str:
    if not settings.uses_vfm:
        return "not used"
    return "trained here (train-vfm)" if settings.teacher == "trained" else RANDOM_VFM_LABEL


def _caption(preset: str, settings: DemoSettings) -> list[str]:
    vfm = _vfm_label(settings) if uses_vfm(preset) else "not used"
    return [(f"{preset}: {settings.steps} training steps, seed {settings.seed} · {SAMPLER.upper()} "
             f"{settings.sample_steps} steps, CFG {settings.cfg_scale}"),
            f"VFM: {vfm} · {AUTOENCODER_LABEL}"]
