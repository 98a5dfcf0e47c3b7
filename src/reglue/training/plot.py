"""Training and evaluation curves of runs (``reglue plot RUN [RUN ...]``), drawn from their metrics.jsonl.

One figure, one panel per metric, one colour per run (the same in every panel): the loss terms
(keys starting with "loss/", in the order they first appear), the evaluation metrics ("eval/...",
except the bookkeeping eval/seconds), then lambda/sem, grad_norm and lr when present. Training
panels show the raw values faint and their centred moving average over ``smoothing`` logged
points bold (the raw line alone at ``smoothing=1``); evaluation panels mark every evaluation,
unsmoothed. Non-finite values (skipped steps) are left out.

x is the training step, the images seen (step × ``train.global_batch`` of the run's config.yaml)
or the training wall time (``wall_time_s``, written by :class:`~reglue.training.metrics.MetricsLogger`).
Either axis may be logarithmic; a log y axis applies to the panels whose values are all positive
(a REPA loss is negative). When runs logged evaluations, the title names the feature network and
sample count of their ``eval`` config. ``paper=True`` marks the paper's unguided FID-50K values
(:meth:`~reglue.presets.Preset.paper_fids`: the five SiT-B/2 presets, REGLUE SiT-XL/2) in the eval/fid
panel only, in the colour of the first run of that size and preset; it says so when no run logged eval/fid.

:func:`plot_runs` draws several runs, :func:`plot_run` one run (to ``RUN_DIR/loss_curves.png`` by
default), :func:`plot_series` named series against any x the same way (the semantic
compressor's per-epoch MSE) and :func:`plot_seed_bands` the mean and spread of runs that differ
only by seed (the demo's comparison). Each returns a :class:`Plot`: the PNG's path and what every panel holds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from reglue.errors import InputError
from reglue.io import atomic_write
from reglue.presets import PAPER_BATCH, PAPER_MODEL, PRESETS
from reglue.training.metrics import METRICS_FILE, WALL_TIME_KEY, read_metrics

PLOT_FILE = "loss_curves.png"
RUN_CONFIG_FILE = "config.yaml"  # the resolved config `reglue train` writes into the run directory
LOSS_PREFIX = "loss/"
EVAL_PREFIX = "eval/"
EVAL_BOOKKEEPING = ("eval/seconds",)  # logged with the evaluations, but not a measure of the model
EXTRA_PANELS = ("lambda/sem", "grad_norm", "lr")
X_AXES = {"step": "step", "images": "images seen", "time": "training time"}
TIME_UNITS = (("h", 3600.0), ("min", 60.0), ("s", 1.0))  # the largest of which the runs last twice
DEFAULT_EVAL_NETWORK = "DINOv2 ViT-L/14"  # eval.vfm null (reglue.config.EvalConfig)
PAPER_LABEL = "paper, FID-50K"
PANEL_COLUMNS = 3

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """What plotting reads from a run's config.yaml; None where the config does not record it."""

    global_batch: int | None = None
    model: str | None = None  # model.name, e.g. "SiT-B/2"
    preset: str | None = None  # model.preset
    eval_network: str | None = None  # the feature network of eval/fd_* (eval.vfm.name)
    eval_samples: int | None = None  # eval.num_samples

    def describe_eval(self) -> str | None:
        """'fd/pr in DINOv2 ViT-L/14 features, 10,000 samples' (eval/fid is always Inception), or None
        without an eval section."""
        parts = [f"fd/pr in {self.eval_network} features" if self.eval_network else None,
                 f"{self.eval_samples:,} samples" if self.eval_samples else None]
        return ", ".join(p for p in parts if p) or None


@dataclass(frozen=True)
class PaperMark:
    """One FID the paper reports, placed on the figure's x axis next to the run it compares with."""

    preset: str
    step: int
    fid: float
    x: float  # the step, or the paper's images seen (step × PAPER_BATCH)
    colour: str  # the colour of the first SiT-B/2 run of this preset


@dataclass(frozen=True)
class Panel:
    """A panel's metric and, per run label, the (x, y) values it drew (y as logged, before smoothing)."""

    key: str
    lines: dict[str | None, tuple[np.ndarray, np.ndarray]]
    points: bool = False  # evaluation points: each value marked, never smoothed
    paper: tuple[PaperMark, ...] = ()
    bands: Mapping[str | None, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (low, high) per line


@dataclass(frozen=True)
class Plot:
    """A figure written to ``path``: its title, x label, panels (by key, in drawing order) and the
    colour of each run label."""

    path: Path
    title: str
    xlabel: str
    panels: dict[str, Panel]
    colours: dict[str | None, str]


@dataclass(frozen=True)
class _Run:
    label: str | None
    run_dir: Path
    records: list[dict]
    info: RunInfo | None  # None without config.yaml


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over ``window`` points ((window-1)//2 before, window//2 after; fewer at the
    ends), (N,) -> (N,). Clipped to the values' range: the running-sum differences carry rounding
    errors, which on a constant series (e.g. the learning rate) would draw as noise."""
    before, after = (window - 1) // 2, window // 2
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(len(values))
    lo, hi = np.maximum(index - before, 0), np.minimum(index + after + 1, len(values))
    return np.clip((cumulative[hi] - cumulative[lo]) / (hi - lo), values.min(), values.max())


# ----------------------------------------------------------------------------- reading runs
def _lookup(config: dict, *keys: str) -> object:
    """config[k1][k2]..., or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def read_run_info(run_dir: str | Path) -> RunInfo | None:
    """The plotting-relevant fields of ``run_dir/config.yaml`` (None without the file).

    Read as plain YAML, not as a RunConfig, so runs of older or newer versions plot too: a missing
    key is None, a missing ``eval`` section means no evaluation details.
    """
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise InputError(f"{path} is not readable YAML ({' '.join(str(err).split())}); restore the "
                         f"{RUN_CONFIG_FILE} `reglue train` wrote into the run.") from None
    if not isinstance(config, dict):  # a damaged file, reported like the YAML error above
        raise InputError(f"{path} holds no config mapping; restore the {RUN_CONFIG_FILE} "  # noqa: TRY004
                         "`reglue train` wrote into the run.")
    network = None
    if isinstance(config.get("eval"), dict):
        vfm = config["eval"].get("vfm")
        network = DEFAULT_EVAL_NETWORK if vfm is None else _lookup(config, "eval", "vfm", "name")

    def typed(value: object, kind: type) -> object:
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    return RunInfo(global_batch=typed(_lookup(config, "train", "global_batch"), int),
                   model=typed(_lookup(config, "model", "name"), str),
                   preset=typed(_lookup(config, "model", "preset"), str),
                   eval_network=typed(network, str),
                   eval_samples=typed(_lookup(config, "eval", "num_samples"), int))


def _read_run(label: str | None, run_dir: Path) -> _Run:
    return _Run(label, run_dir, read_metrics(run_dir), read_run_info(run_dir))


def _x_records(run: _Run, x: str) -> list[tuple[float, dict]]:
    """(x, record) for each record of ``run`` that has a value on the ``x`` axis (time in seconds)."""
    if x == "step":
        return [(float(r["step"]), r) for r in run.records]
    if x == "images":
        batch = run.info.global_batch if run.info else None
        if batch is None:
            why = "has no train.global_batch" if run.info else "is missing"
            raise InputError(
                f"plotting {run.run_dir} against images seen needs train.global_batch from its "
                f"{RUN_CONFIG_FILE}, which {why}; plot against steps (--x step), or put back the "
                f"{RUN_CONFIG_FILE} that `reglue train` wrote into the run.")
        return [(float(r["step"] * batch), r) for r in run.records]
    timed = [(r[WALL_TIME_KEY], r) for r in run.records if math.isfinite(r.get(WALL_TIME_KEY, math.nan))]
    if not timed:
        raise InputError(
            f"{run.run_dir / METRICS_FILE} records no {WALL_TIME_KEY} (runs logged before reglue wrote "
            "training time lack it); plot it against steps (--x step) or images seen (--x images).")
    return timed


def _time_unit(runs: list[list[tuple[float, dict]]]) -> tuple[str, float]:
    longest = max((x for rows in runs for x, _ in rows), default=0.0)
    return next((name, seconds) for name, seconds in TIME_UNITS if longest >= 2 * seconds or seconds == 1.0)


# ----------------------------------------------------------------------------- panels
def _panel_keys(records: list[dict]) -> list[str]:
    seen = dict.fromkeys(key for record in records for key in record)
    losses = [key for key in seen if key.startswith(LOSS_PREFIX)]
    evals = [key for key in seen if key.startswith(EVAL_PREFIX) and key not in EVAL_BOOKKEEPING]
    return losses + evals + [key for key in EXTRA_PANELS if key in seen]


def _panels(runs: dict[str | None, list[tuple[float, dict]]]) -> list[Panel]:
    """A panel for every key any run logged a finite value of, each run's (x, values) in it."""
    panels = []
    for key in _panel_keys([record for rows in runs.values() for _, record in rows]):
        lines = {}
        for label, rows in runs.items():
            pairs = [(x, r[key]) for x, r in rows if key in r and math.isfinite(r[key])]
            if pairs:
                xs, ys = zip(*pairs)
                lines[label] = (np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64))
        if lines:
            panels.append(Panel(key, lines, points=key.startswith(EVAL_PREFIX)))
    return panels


def _paper_marks(runs: list[_Run], x: str, colours: Mapping[str | None, str]) -> tuple[PaperMark, ...]:
    """The paper's FIDs of the size and preset of every run it reports (once per size and preset, the first such
    run's colour): the five SiT-B/2 presets, REGLUE SiT-XL/2."""
    if x == "time":
        raise InputError("the paper's FIDs are given at training steps, not wall time; draw paper markers "
                         "against steps (--x step) or images seen (--x images).")
    marks = {}
    for run in runs:
        info = run.info
        key = (info.model, info.preset) if info else None
        if info and info.preset in PRESETS and PRESETS[info.preset].paper_fids(info.model) and key not in marks:
            per_step = PAPER_BATCH if x == "images" else 1
            marks[key] = [PaperMark(info.preset, step, fid, float(step * per_step), colours[run.label])
                          for step, fid in PRESETS[info.preset].paper_fids(info.model)]
    if not marks:
        raise InputError(
            f"the paper's FIDs are for {PAPER_MODEL} runs of a paper preset ({', '.join(PRESETS)}) and REGLUE "
            "SiT-XL/2 runs, and by "
            f"model.name and model.preset in their {RUN_CONFIG_FILE} none of "
            f"{', '.join(str(r.run_dir) for r in runs)} is one; plot without paper markers (drop --paper).")
    return tuple(mark for preset_marks in marks.values() for mark in preset_marks)


def _with_paper(panels: list[Panel], marks: tuple[PaperMark, ...]) -> list[Panel]:
    """``panels`` with ``marks`` in the eval/fid panel (a new one after the other eval panels if no run
    logged eval/fid)."""
    key = f"{EVAL_PREFIX}fid"
    if not any(p.key == key for p in panels):
        others = [p.key for p in panels if p.points]
        _logger.warning(
            "no run logged %s (Inception FID, the paper's metric): the paper's markers get a panel of their own%s. "
            "To compare, evaluate with eval.metrics=[fid] against the reference batch (docs/reproduce.md).", key,
            f"; {', '.join(others)} measure(s) another quantity and are not comparable to them" if others else "")
        after_evals = max((i + 1 for i, p in enumerate(panels) if p.points or p.key.startswith(LOSS_PREFIX)),
                          default=0)
        panels = [*panels[:after_evals], Panel(key, {}, points=True), *panels[after_evals:]]
    return [Panel(p.key, p.lines, p.points, marks) if p.key == key else p for p in panels]


def _evaluation_title(runs: list[_Run], panels: list[Panel]) -> str | None:
    """'evaluation: <network> features, <N> samples' for the runs with eval values (per run when
    they differ), None when no run names its evaluation settings."""
    evaluated = [run for run in runs if any(run.label in p.lines for p in panels if p.points)]
    details = {run.label: run.info.describe_eval() if run.info else None for run in evaluated}
    if not any(details.values()):
        return None
    if len(set(details.values())) == 1:
        return f"evaluation: {next(iter(details.values()))}"
    return "evaluation: " + "; ".join(f"{label}: {d or 'settings not recorded'}"
                                      for label, d in details.items())


# ----------------------------------------------------------------------------- drawing
def _draw_panel(axes, panel: Panel, *, colours: Mapping[str | None, str], smoothing: int, xlabel: str,
                log_x: bool, log_y: bool) -> None:
    """One panel: per run the raw values faint and their moving average bold (only the values, bold,
    at ``smoothing=1``); evaluation points marked and unsmoothed; paper FIDs as stars."""
    for label, (xs, ys) in panel.lines.items():
        colour = colours[label]
        if label in panel.bands:
            axes.fill_between(xs, *panel.bands[label], color=colour, alpha=0.2, linewidth=0)
        if panel.points:
            axes.plot(xs, ys, linewidth=1.5, color=colour, label=label, marker="o", markersize=4)
            continue
        if smoothing > 1:
            axes.plot(xs, ys, linewidth=0.8, alpha=0.3, color=colour)
        axes.plot(xs, moving_average(ys, smoothing) if smoothing > 1 else ys, linewidth=2.0, color=colour,
                  label=label)
    star = {"linestyle": "none", "marker": "*", "markersize": 13, "markeredgecolor": "black"}
    if panel.paper:  # one legend entry for every paper mark, in no run's colour
        axes.plot([], [], color="white", label=PAPER_LABEL, **star)
    for mark in panel.paper:
        axes.plot([mark.x], [mark.fid], color=mark.colour, **star)
        axes.annotate(f"{mark.preset} {mark.fid:g}", (mark.x, mark.fid), textcoords="offset points",
                      xytext=(5, 4), fontsize=7)
    values = ([ys for _, ys in panel.lines.values()] + [np.array([mark.fid for mark in panel.paper])]
              + [np.concatenate(band) for band in panel.bands.values()])
    positive = all(np.all(v > 0) for v in values)
    axes.set(title=panel.key, xlabel=xlabel, yscale="log" if log_y and positive else "linear")
    if log_x:
        axes.set_xscale("log", nonpositive="mask")  # a step-0 evaluation is left out, not squashed
    axes.grid(True, which="major", alpha=0.3)
    if panel.paper or any(label is not None for label in panel.lines):
        axes.legend(fontsize=8)


def _draw_figure(panels: list[Panel], out: Path, *, title: str, colours: Mapping[str | None, str],
                 **panel_options) -> None:
    """Lay ``panels`` out in rows of PANEL_COLUMNS and save the PNG atomically; ``panel_options``
    (smoothing, xlabel, log_x, log_y) go to every panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(PANEL_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for index, panel in enumerate(panels, start=1):
        _draw_panel(figure.add_subplot(rows, columns, index), panel, colours=colours, **panel_options)
    figure.suptitle(title)
    with atomic_write(out) as tmp:
        figure.savefig(tmp, format="png")


def _check_options(smoothing: int, x: str) -> None:
    if smoothing < 1:
        raise InputError(f"smoothing is a window of logged points and must be >= 1, found {smoothing}.")
    if x not in X_AXES:
        raise InputError(f"unknown x axis {x!r}; choose one of {', '.join(X_AXES)}.")


def _plot(runs: Mapping[str | None, Path], out: Path, *, title: str, x: str, log_x: bool, log_y: bool,
          smoothing: int, paper: bool) -> Plot:
    _check_options(smoothing, x)
    loaded = [_read_run(label, Path(run_dir)) for label, run_dir in runs.items()]
    rows = {run.label: _x_records(run, x) for run in loaded}
    xlabel = X_AXES[x]
    if x == "time":
        unit, seconds = _time_unit(list(rows.values()))
        rows = {label: [(t / seconds, r) for t, r in timed] for label, timed in rows.items()}
        xlabel = f"{xlabel} ({unit})"
    panels = _panels(rows)
    if not any(p.key.startswith(LOSS_PREFIX) for p in panels):
        raise InputError(
            f"{', '.join(map(str, runs.values()))}: {sum(len(r.records) for r in loaded)} metrics records "
            "but no finite value of a 'loss/...' key; plot a run once it has logged its first training steps.")
    colours = {run.label: f"C{i}" for i, run in enumerate(loaded)}
    if paper:
        panels = _with_paper(panels, _paper_marks(loaded, x, colours))
    evaluation = _evaluation_title(loaded, panels)
    title = f"{title}\n{evaluation}" if evaluation else title
    _draw_figure(panels, out, title=title, colours=colours, smoothing=smoothing, xlabel=xlabel, log_x=log_x,
                 log_y=log_y)
    return Plot(out, title, xlabel, {p.key: p for p in panels}, colours)


def run_labels(run_dirs: Sequence[str | Path]) -> dict[str, Path]:
    """Legend labels of ``run_dirs``: their folder names, or the paths as given when names repeat."""
    paths = [Path(d) for d in run_dirs]
    resolved = [p.resolve() for p in paths]
    repeated = next((p for i, p in enumerate(paths) if resolved[i] in resolved[:i]), None)
    if repeated is not None:
        raise InputError(f"the run {repeated} is given twice; give each run directory once.")
    names = [p.name for p in resolved]
    return dict(zip(names if len(set(names)) == len(names) else map(str, paths), paths, strict=True))


def plot_runs(
    runs: Mapping[str, str | Path] | Sequence[str | Path],
    out: str | Path,
    *,
    x: str = "step",
    log_x: bool = False,
    log_y: bool = False,
    smoothing: int = 20,
    paper: bool = False,
) -> Plot:
    """Draw several runs into one figure at ``out``, one colour per run; see the module doc.

    ``runs``: run directories (labelled by :func:`run_labels`) or a mapping legend label → directory.
    ``x``: "step", "images" (needs each run's config.yaml) or "time" (its wall_time_s).
    ``log_x``/``log_y``: logarithmic axes. ``smoothing``: the moving-average window in logged
    points (1: none). ``paper``: mark the paper's SiT-B/2 FIDs (at least one run must be SiT-B/2).
    Raises FileNotFoundError for a run without metrics.jsonl and ValueError (naming the run and the
    fix) when no run logged a loss or a run lacks what ``x`` needs.
    """
    runs = dict(runs) if isinstance(runs, Mapping) else run_labels(runs)
    return _plot(runs, Path(out), title=" vs ".join(runs), x=x, log_x=log_x, log_y=log_y, smoothing=smoothing,
                 paper=paper)


def plot_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    x: str = "step",
    log_x: bool = False,
    log_y: bool = False,
    smoothing: int = 20,
    paper: bool = False,
) -> Plot:
    """Draw one run's curves to ``out`` (default ``run_dir/loss_curves.png``), titled with its folder
    name and without a legend of runs; options and errors as :func:`plot_runs`."""
    run_dir = Path(run_dir)
    out = run_dir / PLOT_FILE if out is None else Path(out)
    return _plot({None: run_dir}, out, title=run_dir.resolve().name, x=x, log_x=log_x, log_y=log_y,
                 smoothing=smoothing, paper=paper)


def plot_series(
    series: Mapping[str, tuple[Sequence[float], Sequence[float | None]]],
    out: str | Path,
    *,
    title: str,
    panel: str,
    xlabel: str = "step",
    log_y: bool = False,
) -> Plot:
    """Draw named ``(x, y)`` series into one panel titled ``panel`` at ``out``.

    Every point is marked and none smoothed (a curve of one or two epochs still shows); non-finite
    and None values are left out and a series with none left is dropped. Raises ValueError when no
    series has a finite value.
    """
    lines = {}
    for label, (xs, ys) in series.items():
        pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
        if pairs:
            x_values, y_values = zip(*pairs)
            lines[label] = (np.asarray(x_values, dtype=np.float64), np.asarray(y_values, dtype=np.float64))
    if not lines:
        raise InputError(f"no finite value in the series {list(series)} to plot into {out}; "
                         "plot after the first point.")
    panels = [Panel(panel, lines, points=True)]
    colours = {label: f"C{i}" for i, label in enumerate(lines)}
    _draw_figure(panels, Path(out), title=title, colours=colours, smoothing=1, xlabel=xlabel, log_x=False,
                 log_y=log_y)
    return Plot(Path(out), title, xlabel, {panel: panels[0]}, colours)


def seed_statistics(run_dirs: Sequence[str | Path], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, standard deviation) of ``key`` over runs that differ only by seed.

    Only the steps every run logged a finite value at are kept; the deviation is the sample one
    (n − 1), 0 for a single run."""
    return _seed_statistics([read_metrics(run_dir) for run_dir in run_dirs], key)


def _seed_statistics(histories: Sequence[list[dict]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`seed_statistics` of the runs' metrics records (one list per run)."""
    series = [{r["step"]: r[key] for r in records if math.isfinite(r.get(key, math.nan))} for records in histories]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    values = np.array([[s[step] for step in steps] for s in series], dtype=np.float64).reshape(len(series), -1)
    deviation = values.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(steps))
    return np.asarray(steps, dtype=np.float64), values.mean(axis=0), deviation


def plot_seed_bands(
    runs: Mapping[str, Sequence[str | Path]], out: str | Path, *, keys: Sequence[str], title: str,
) -> Plot:
    """One panel per metric in ``keys``: per label its mean over the seeds' runs (marked points) and a
    band of ± one standard deviation; ``runs`` maps a label (e.g. a preset) to its seeds' run dirs.
    Raises ValueError when a key has no step that every run of a label logged."""
    panels = []
    histories: dict[str, list[list[dict]]] = {}  # per label its runs' records, each metrics.jsonl read once
    for key in keys:
        lines, bands = {}, {}
        for label, run_dirs in runs.items():
            if label not in histories:
                histories[label] = [read_metrics(run_dir) for run_dir in run_dirs]
            steps, mean, deviation = _seed_statistics(histories[label], key)
            if not len(steps):
                raise InputError(f"{key}: the runs of {label} ({', '.join(map(str, run_dirs))}) share no logged "
                                 "step; plot them once every run has logged it.")
            lines[label], bands[label] = (steps, mean), (mean - deviation, mean + deviation)
        panels.append(Panel(key, lines, points=True, bands=bands))
    colours = {label: f"C{i}" for i, label in enumerate(runs)}
    _draw_figure(panels, Path(out), title=title, colours=colours, smoothing=1, xlabel=X_AXES["step"], log_x=False,
                 log_y=False)
    return Plot(Path(out), title, X_AXES["step"], {p.key: p for p in panels}, colours)
