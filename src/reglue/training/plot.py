"""Loss curves of a training run (``reglue plot RUN_DIR``), drawn from its metrics.jsonl.

One panel per loss term the run logged (keys starting with "loss/", in the order they first
appear), then grad_norm and lr when present; x is the training step. Each panel shows the raw
values faint and their centred moving average over ``smoothing`` logged points bold (the raw
line alone at ``smoothing=1``), on a log y axis when every value is positive. Non-finite values
(skipped steps) are left out. :func:`plot_runs` draws several runs into one such figure, one
colour per run (e.g. the demo's ``sit`` vs ``reglue`` comparison); :func:`plot_series` draws
named series against any x the same way (the semantic compressor's per-epoch MSE).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from reglue.io import atomic_write
from reglue.training.metrics import read_metrics

PLOT_FILE = "loss_curves.png"
LOSS_PREFIX = "loss/"
EXTRA_PANELS = ("grad_norm", "lr")
PANEL_COLUMNS = 3


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over ``window`` points ((window-1)//2 before, window//2 after; fewer at the
    ends), (N,) -> (N,). Clipped to the values' range: the running-sum differences carry rounding
    errors, which on a constant series (e.g. the learning rate) would draw as noise."""
    before, after = (window - 1) // 2, window // 2
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(len(values))
    lo, hi = np.maximum(index - before, 0), np.minimum(index + after + 1, len(values))
    return np.clip((cumulative[hi] - cumulative[lo]) / (hi - lo), values.min(), values.max())


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` where it was logged with a finite value."""
    pairs = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
    steps, values = zip(*pairs) if pairs else ((), ())
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def _panel_keys(records: list[dict]) -> list[str]:
    seen = dict.fromkeys(key for record in records for key in record)
    losses = [key for key in seen if key.startswith(LOSS_PREFIX)]
    return losses + [key for key in EXTRA_PANELS if key in seen]


def _panels(runs: dict[str | None, list[dict]]) -> list[tuple[str, list]]:
    """(key, [(label, steps, values), ...]) for every key any run logged a finite value of."""
    panels = []
    for key in _panel_keys([record for records in runs.values() for record in records]):
        lines = [(label, *_series(records, key)) for label, records in runs.items()]
        lines = [line for line in lines if len(line[2])]
        if lines:
            panels.append((key, lines))
    return panels


def _draw_panel(axes, key: str, lines: list[tuple[str | None, np.ndarray, np.ndarray]], smoothing: int,
                colours: Mapping[str | None, str] | None = None, *, xlabel: str = "step",
                marker: str | None = None) -> None:
    """One panel: per (label, steps, values) line the raw values faint and their moving average bold
    (only the values, bold, at ``smoothing=1``), in ``colours[label]`` when given (so a run keeps its
    colour in panels it shares with fewer runs); ``marker`` marks every point of the bold line."""
    for label, steps, values in lines:
        colour = (colours or {}).get(label)
        if smoothing > 1:
            (raw,) = axes.plot(steps, values, linewidth=0.8, alpha=0.3, color=colour)
            colour = raw.get_color()
        smoothed = moving_average(values, smoothing) if smoothing > 1 else values
        axes.plot(steps, smoothed, linewidth=2.0, color=colour, label=label, marker=marker)
    positive = all(np.all(values > 0) for _, _, values in lines)
    axes.set(title=key, xlabel=xlabel, yscale="log" if positive else "linear")
    axes.grid(True, which="major", alpha=0.3)
    if any(label is not None for label, _, _ in lines):
        axes.legend()


def _draw_figure(panels: list[tuple[str, list]], title: str, smoothing: int, out: Path,
                 **panel_options) -> Path:
    """Lay ``panels`` ((key, lines) each) out in rows of PANEL_COLUMNS and save the PNG atomically;
    ``panel_options`` (``xlabel``, ``marker``) go to every panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(PANEL_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), dpi=100)
    FigureCanvasAgg(figure)
    labels = dict.fromkeys(label for _, lines in panels for label, _, _ in lines)  # first appearance order
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    for index, (key, lines) in enumerate(panels, start=1):
        _draw_panel(figure.add_subplot(rows, columns, index), key, lines, smoothing, colours, **panel_options)
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_write(out) as tmp:
        figure.savefig(tmp, format="png")
    return out


def _check_smoothing(smoothing: int) -> None:
    if smoothing < 1:
        raise ValueError(f"smoothing is a window of logged points and must be >= 1, found {smoothing}.")


def _require_losses(panels: list[tuple[str, list]], where: str, records: int) -> None:
    if not any(key.startswith(LOSS_PREFIX) for key, _ in panels):
        raise ValueError(
            f"{where} has {records} metrics records but no finite value of a 'loss/...' key; "
            "plot a run once it has logged its first training steps."
        )


def plot_run(run_dir: str | Path, out: str | Path | None = None, smoothing: int = 20) -> Path:
    """Draw the run's loss curves to ``out`` (default ``run_dir/loss_curves.png``) and return its path.

    ``smoothing``: the moving-average window in logged points (1: no smoothing).
    Raises FileNotFoundError without ``run_dir/metrics.jsonl``, ValueError when it holds no loss value.
    """
    _check_smoothing(smoothing)
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    panels = _panels({None: records})
    _require_losses(panels, str(run_dir), len(records))
    out = run_dir / PLOT_FILE if out is None else Path(out)
    return _draw_figure(panels, run_dir.resolve().name, smoothing, out)


def plot_runs(runs: Mapping[str, str | Path], out: str | Path, smoothing: int = 20) -> Path:
    """Draw several runs into one figure at ``out``: ``runs`` maps a legend label to a run directory.

    A panel per loss term any run logged (then grad_norm, lr), each run's curve in its own colour.
    Raises like :func:`plot_run` when a run has no metrics or none of them logged a loss.
    """
    _check_smoothing(smoothing)
    records = {label: read_metrics(Path(run_dir)) for label, run_dir in runs.items()}
    panels = _panels(records)
    _require_losses(panels, ", ".join(map(str, runs.values())), sum(map(len, records.values())))
    return _draw_figure(panels, " vs ".join(runs), smoothing, Path(out))


def plot_series(
    series: Mapping[str, tuple[Sequence[float], Sequence[float | None]]],
    out: str | Path,
    *,
    title: str,
    panel: str,
    xlabel: str = "step",
    smoothing: int = 1,
    marker: str | None = "o",
) -> Path:
    """Draw named ``(x, y)`` series into one panel titled ``panel`` at ``out``; returns its path.

    The panel is drawn like every panel of :func:`plot_run` (log y axis when all values are
    positive; non-finite and None values left out; a series with none left is dropped).
    ``marker`` marks each point, so a curve of one or two epochs still shows. Raises ValueError
    when no series has a finite value.
    """
    _check_smoothing(smoothing)
    lines = []
    for label, (xs, ys) in series.items():
        pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if pairs:
            x, y = zip(*pairs)
            lines.append((label, np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)))
    if not lines:
        raise ValueError(f"no finite value in the series {list(series)} to plot into {out}; "
                         "plot after the first point.")
    return _draw_figure([(panel, lines)], title, smoothing, Path(out), xlabel=xlabel, marker=marker)
