"""``reglue demo``: the whole chain, offline, on a built-in synthetic data set, in minutes on a CPU.

There are no pretrained weights here, so the demo makes or swaps the two frozen encoders:

- the SD-VAE becomes the weight-free pixel autoencoder (:mod:`reglue.encoders.pixel`);
- DINOv2 becomes a tiny DINOv2-with-registers **trained here** on the demo's images by
  ``reglue train-vfm`` (:mod:`reglue.training.teacher`): its semantic channels, CLS token and
  REPA targets come from a network that learned from the data. ``--random-vfm`` uses a random,
  untrained one instead, for plumbing checks only.

Stages, each calling what the matching ``reglue`` command calls, all under ``DIR``:

  1. images       the synthetic ImageFolder (:mod:`reglue.data.synthetic`)            images/
  2. prepare      pixel-autoencoder moments (``reglue prepare``)                     data/
  3. teacher      the VFM (``reglue train-vfm``), with its k-NN / linear-probe report  teacher/
  4–8.            the stages of ``reglue compare data/`` (:mod:`reglue.compare`) with the demo's tiny
                  SiT and budget: data copies, semantic caches, training of each preset × seed
                  (evaluated 4 times), class grids, the report             datasets/, semantics/, runs/,
                                                                           grid_<preset>.png, report.md, ...

The evaluations score FD in the teacher's CLS space and class accuracy (a linear probe on those
features of the prepared images, cached in ``datasets/<kind>/eval/``). The semantic stages run only
for presets that use the VFM (not ``sit`` alone); the teacher is trained whenever it is used, since
every run, ``sit``'s too, is evaluated in its feature space. ``DIR/demo.json`` records the settings and
the seconds each finished stage took: a rerun skips finished stages and resumes an interrupted one
through that stage's own resume; a rerun with other settings, or into a non-empty folder that is no
demo, is refused. Every file is written atomically.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from reglue.compare import check_settings, run_stages
from reglue.compare.report import CURVES_FILE, LOSS_CURVES_FILE, RESULTS_FILE, ReportText
from reglue.compare.settings import ALL_PRESETS, ComparePaths
from reglue.compare.stages import Ledger, check_out_dir
from reglue.data import store
from reglue.demo.settings import (
    AUTOENCODER_LABEL,
    RANDOM_VFM_LABEL,
    SAMPLER,
    DemoPaths,
    DemoSettings,
    quick,
    uses_vfm,
)
from reglue.demo.stages import STATE_FILE, compare_settings, data_stages
from reglue.metrics.probe import REPORT_JSON

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
    check_out_dir(paths.out, STATE_FILE, "a demo")
    with store.lock_directory(paths.out):
        ledger = Ledger(paths.out, settings.to_json(), state_file=STATE_FILE)
        log.info("demo of %s × %d seed(s) in %s; VFM: %s; autoencoder: %s", ", ".join(settings.presets),
                 settings.seeds, paths.out, _vfm_label(settings), AUTOENCODER_LABEL)
        data_stages(ledger, paths, settings, progress)
        teacher = _teacher_summary(paths, settings)
        text = ReportText(
            title="reglue demo",
            intro=("Tiny models, a synthetic data set and CPU minutes: the numbers compare methods under one protocol "
                   "at toy scale; none is comparable with the paper's ImageNet FIDs."),
            vfm_lines=_vfm_lines(teacher),
            data_line=(f"the {settings.data!r} synthetic set, {len(settings.classes)} classes × "
                       f"{settings.images_per_class} images at {settings.resolution}²"),
            columns=list(settings.classes))
        compared, compare_paths = compare_settings(paths, settings), ComparePaths(paths.out)
        run_stages(ledger, compare_paths, paths.data, compared, text, configs=check_settings(compare_paths, compared),
                   progress=progress, caption=lambda preset: _caption(preset, settings), extra={"teacher": teacher})
    return DemoResult(paths.out, paths.out / "report.md", paths.out / RESULTS_FILE, paths.out / "grid.png",
                      paths.out / CURVES_FILE, paths.out / LOSS_CURVES_FILE, dict(ledger.stages))


def _vfm_label(settings: DemoSettings) -> str:
    if not settings.uses_vfm:
        return "not used"
    return "trained here (train-vfm)" if settings.teacher == "trained" else RANDOM_VFM_LABEL


def _teacher_summary(paths: DemoPaths, settings: DemoSettings) -> dict:
    """The teacher's probe report (report.json of ``reglue train-vfm``), or the random VFM's label."""
    if settings.teacher == "random":
        return {"label": RANDOM_VFM_LABEL}
    report = json.loads((paths.teacher / REPORT_JSON).read_text())
    return {"label": "tiny DINOv2-with-registers trained here by `reglue train-vfm`", **report}


def _vfm_lines(summary: dict) -> list[str]:
    """The report's lines about the VFM, from :func:`_teacher_summary`."""
    lines = [f"- {summary['label']}; autoencoder: {AUTOENCODER_LABEL}."]
    if "verdict" in summary:
        lines.append(f"- Teacher quality on held-out images ([report](teacher/report.md)): {summary['verdict']}")
    return lines


def _caption(preset: str, settings: DemoSettings) -> list[str]:
    vfm = _vfm_label(settings) if uses_vfm(preset) else "not used"
    return [(f"{preset}: {settings.steps} training steps, seed {settings.seed} · {SAMPLER.upper()} "
             f"{settings.sample_steps} steps, CFG {settings.cfg_scale}"),
            f"VFM: {vfm} · {AUTOENCODER_LABEL}"]
