"""``reglue compare DATA --out DIR``: the five methods (or any of them) trained at equal budget on a
prepared dataset, over several seeds, evaluated during training and summarised with their spread.

Inputs: the prepared data (``reglue prepare``, any resolution), the VFM (DINOv2 / DINOv3 weights or a
``reglue train-vfm`` folder), one base run config shared by every preset (``run``: model size, steps,
batch, lr, ...), the presets, the seeds and the evaluation (``eval``). Stages, each calling what the
matching ``reglue`` command calls, all under ``DIR``:

  1. copy         the data's arrays hard-linked into one folder per cache kind   datasets/<kind>/
                  (nothing is ever written into DATA)
  2. semantics    norm stats, REGLUE's compressor, ReDi's PCA (fitted on DATA),  semantics/
                  then each copy's cached semantics / CLS / REPA targets          datasets/<kind>/
  3. train        each preset × seed (``reglue train``), evaluating itself        runs/<preset>/seed-<s>/
  4. grid         a class grid of each preset's first seed                         grid_<preset>.png
  5. report       results over seeds, curves (mean ± std), grids side by side     results.json, report.md, ...

``DIR/compare.json`` records the settings and the seconds each finished stage took: a rerun skips
finished stages and resumes an interrupted one through that stage's own resume (a training run from
its last checkpoint); a rerun with other settings, or into a non-empty folder that is no comparison,
is refused. Under ``torchrun`` / ``accelerate launch`` every stage uses all processes (the grids and
the report are drawn by the main one). ``reglue demo --compare`` is the demo's data and teacher
followed by these stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reglue.compare.report import RESULTS_FILE, ReportText, write_report
from reglue.compare.settings import ALL_PRESETS, ComparePaths, CompareSettings
from reglue.compare.stages import (
    STATE_FILE,
    Ledger,
    cache_stages,
    check_out_dir,
    compressor_settings,
    compressor_widths,
    grid_stages,
    run_configs,
    train_stages,
    vfm_spec,
)
from reglue.config import RunConfig
from reglue.data import store
from reglue.distributed import on_main, process_state
from reglue.encoders.semantics import RANDOM_WEIGHTS
from reglue.errors import InputError
from reglue.metrics.probe import REPORT_JSON, REPORT_MD
from reglue.training.evaluation import feature_spec

log = logging.getLogger(__name__)

__all__ = ["ALL_PRESETS", "CompareResult", "CompareSettings", "check_settings", "run_compare", "run_stages"]


@dataclass
class CompareResult:
    out: Path
    report: Path
    results: Path
    stage_seconds: dict[str, float]


def run_compare(data: str | Path, out: str | Path, settings: CompareSettings | None = None,
                progress: bool = True) -> CompareResult:
    """Run (or resume) every stage on the prepared ``data`` into ``out``; see the module docstring.
    Every setting is checked (each run's config built and validated) before anything is written."""
    settings = CompareSettings() if settings is None else settings
    data, paths = Path(data).resolve(), ComparePaths(Path(out).resolve())
    manifest = store.read_manifest(data)
    configs = check_settings(paths, settings)
    if not manifest["num_classes"] or next(iter(configs.values())).data.unconditional:
        raise InputError(f"{data}: a comparison needs class labels (its class grids and class accuracy are per "
                         "class) and conditional runs; prepare an image folder of class folders, and leave "
                         "run.data.unconditional out.")
    process_state()  # under torchrun / accelerate launch: the process group every stage shares
    with contextlib.ExitStack() as held:

        def claim() -> None:  # the main process holds the folder's lock, as cache-semantics holds a dataset's
            check_out_dir(paths.out, STATE_FILE, "a comparison")
            held.enter_context(store.lock_directory(paths.out))

        on_main(f"locking {paths.out}", claim)
        ledger = Ledger(paths.out, {"data": str(data), **settings.to_json()})
        log.info("comparing %s × %d seed(s) on %s in %s", ", ".join(settings.presets), settings.seeds, data, paths.out)
        text = ReportText(
            title="reglue compare",
            intro=("Every preset under one protocol on the same data, VFM and evaluation samples; the spread is "
                   "over training seeds. Compare these numbers with each other, not with the paper's ImageNet FIDs "
                   "unless the protocol is the paper's."),
            vfm_lines=vfm_lines(settings), data_line=data_line(data, manifest),
            columns=list(manifest["class_names"][: settings.grid_classes]))
        run_stages(ledger, paths, data, settings, text, configs=configs, progress=progress,
                   extra={"vfm": {"lines": text.vfm_lines}})
    return CompareResult(paths.out, paths.out / "report.md", paths.out / RESULTS_FILE, dict(ledger.stages))


def run_stages(ledger: Ledger, paths: ComparePaths, data: Path, settings: CompareSettings, text: ReportText, *,
               configs: dict[tuple[str, int], RunConfig], progress: bool, extra: dict,
               caption: Callable[[str], list[str]] | None = None) -> None:
    """The comparison's stages under ``ledger`` (a demo passes its own): caches, training, grids, report.
    ``configs``: every run's, from :func:`check_settings`; ``extra``: entries results.json adds (the VFM);
    ``caption(preset)``: the lines under a preset's grid (default: the preset, steps and seed)."""
    config = next(iter(configs.values()))  # the protocol every run shares
    cache_stages(ledger, paths, data, settings, progress)
    train_stages(ledger, configs)
    steps = config.train.max_steps
    caption = caption or (lambda p: [f"{p}: {steps} training steps, seed {settings.seed} · SDE {settings.grid_steps} "
                                     f"steps, CFG {settings.grid_cfg}"])
    grid_stages(ledger, paths, settings, classes=list(range(len(text.columns))), caption=caption)
    ledger.run("report", "results over seeds, curves, grids and report.md", lambda: on_main(
        "writing the report", lambda: write_report(paths, settings, config, text, ledger.stages, extra=extra)))


def check_settings(paths: ComparePaths, settings: CompareSettings) -> dict[tuple[str, int], RunConfig]:
    """Every run's validated config (:func:`~reglue.compare.stages.run_configs`), the VFM and the compressor's
    settings, built once to refuse what cannot work before any file is written; returns the configs."""
    configs = run_configs(paths, settings)
    if settings.vfm is not None:
        spec = vfm_spec(settings)
        _check_weights("vfm.weights", spec.weights, f"the VFM {spec.name}'s weights (official DINOv2 .pth, timm "
                       ".safetensors or a `reglue train-vfm` folder): --vfm-weights PATH")
    if "compressor" in settings.copies:
        compressor_settings(settings)
        compressor_widths(settings)
    first = next(iter(configs.values()))
    evaluated = first.eval
    if evaluated.every and {"fd", "pr", "class_accuracy"} & set(evaluated.metrics):
        space = feature_spec(first)
        _check_weights("eval.vfm.weights", space.weights, f"the evaluation space {space.name}'s weights "
                       "(docs/evaluation.md): eval.vfm.weights=PATH, or leave eval.vfm out to score in the "
                       "compared VFM's space")
    if evaluated.every and "fid" in evaluated.metrics:
        _check_weights("eval.inception", evaluated.inception, "the Inception-v3 weights (docs/evaluation.md)")
    return configs


def _check_weights(key: str, path: str | None, what: str) -> None:
    """Refuse a weights setting that is unset or names no file, before hours of caching are spent."""
    if path is None:
        raise InputError(f"{key}: not set; give {what}.")
    if path != RANDOM_WEIGHTS and not Path(path).exists():
        raise InputError(f"{key}: {path} not found; give {what}.")


def vfm_lines(settings: CompareSettings) -> list[str]:
    """The report's lines about the compared VFM: its spec, and a ``reglue train-vfm`` folder's probe verdict."""
    if not settings.uses_vfm and settings.vfm is None:
        return ["- No preset reads a VFM."]
    spec = vfm_spec(settings)
    lines = [f"- `{spec.name}`, weights `{spec.weights}`" + (f", arch {dict(spec.arch)}" if spec.arch else "") + "."]
    folder = Path(settings.vfm.get("weights") or "")
    if folder.is_dir() and (folder / REPORT_JSON).is_file():
        report = json.loads((folder / REPORT_JSON).read_text())
        lines.append(f"- Teacher quality on held-out images ({folder / REPORT_MD}): {report['verdict']}")
    return lines


def data_line(data: Path, manifest: dict) -> str:
    return (f"`{data}` ({manifest['num_images']} images of {manifest['num_classes']} classes at "
            f"{manifest['resolution']}²)")
