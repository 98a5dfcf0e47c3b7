"""A comparison's results: per-run evaluations gathered over seeds (``results.json``), curves with
mean ± spread, the grids side by side, and ``report.md`` with the protocol, the final table with
its statistics and whether the paper's ordering holds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reglue.compare.settings import ComparePaths, CompareSettings
from reglue.config import RunConfig
from reglue.errors import ReglueError
from reglue.io import atomic_write
from reglue.metrics.evaluate import write_results
from reglue.metrics.feature_space import FD_DINOV2
from reglue.metrics.feature_space import fd_key as _metric_fd_key
from reglue.presets import get_preset
from reglue.training.evaluation import eval_due
from reglue.training.metrics import read_metrics
from reglue.training.plot import plot_runs, plot_seed_bands

ACCURACY_KEY = "eval/class_accuracy"
RESULTS_FILE = "results.json"
CURVES_FILE = "quality_curves.png"
LOSS_CURVES_FILE = "loss_curves.png"


@dataclass(frozen=True)
class Metric:
    """One evaluated quantity: its metrics key, short name, label in the report and direction."""

    key: str
    name: str  # fd | accuracy | fid | precision | recall: the ordering's names
    label: str
    lower_is_better: bool


def fd_key(vfm_name: str) -> str:
    """The in-training FD's metrics key for a VFM of registry name ``vfm_name``."""
    return f"eval/{_metric_fd_key(vfm_name)}"


def metrics_of(config: RunConfig) -> list[Metric]:
    """What a run's evaluations log, in the order of ``eval.metrics``."""
    evaluated = config.eval
    space = evaluated.vfm["name"] if evaluated.vfm and evaluated.vfm.get("name") else FD_DINOV2.name
    table = {"fd": [Metric(fd_key(space), "fd", f"FD ({space} space)", True)],
             "fid": [Metric("eval/fid", "fid", "FID (Inception)", True)],
             "pr": [Metric("eval/precision", "precision", "precision", False),
                    Metric("eval/recall", "recall", "recall", False)],
             "class_accuracy": [Metric(ACCURACY_KEY, "accuracy", "class accuracy", False)]}
    return [metric for name in evaluated.metrics for metric in table[name]]


def gather_results(paths: ComparePaths, settings: CompareSettings, config: RunConfig, extra: dict) -> dict:
    """Every run's evaluation series and final values, and per preset their mean and spread over seeds;
    ``config``: a run's config (the protocol every run shares); ``extra``: entries to add (e.g. the VFM)."""
    metrics = metrics_of(config)
    keys = tuple(m.key for m in metrics)
    presets = {}
    for preset in settings.presets:
        runs = {seed: _run_result(paths.run(preset, seed), keys) for seed in settings.run_seeds}
        final = {key: _spread([run["final"][key] for run in runs.values()]) for key in (*keys, "loss/latent")}
        presets[preset] = {"runs": {str(s): r for s, r in runs.items()}, "final": final}
    fd = next((m.key for m in metrics if m.name == "fd"), None)
    return {
        "protocol": protocol(settings, config),
        **extra,
        "metrics": {m.key: "lower is better" if m.lower_is_better else "higher is better" for m in metrics},
        "fd_key": fd,
        "presets": presets,
        "ordering": ordering(presets, metrics),
    }


def _run_result(run_dir: Path, keys: tuple[str, ...]) -> dict:
    history = read_metrics(run_dir)
    series = {key: {str(r["step"]): r[key] for r in history if key in r} for key in keys}
    losses = [r for r in history if "loss/latent" in r]
    if not losses or not all(series.values()):
        raise ReglueError(f"{run_dir} has no evaluation or loss logged: delete that folder and remove its 'train' "
                          "entry from the folder's ledger (compare.json / demo.json), then rerun to train it again.")
    final = {key: values[max(values, key=int)] for key, values in series.items()}
    final["loss/latent"] = losses[-1]["loss/latent"]
    for key, value in final.items():
        if not math.isfinite(value):
            raise ReglueError(f"{run_dir}: {key} is {value}; the training diverged: rerun with a new --out folder.")
    return {"series": series, "final": final}


def _spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "min": float(array.min()), "max": float(array.max()),
            "values": [float(v) for v in array]}


def ordering(presets: dict, metrics: list[Metric]) -> dict:
    """The presets ranked by each metric's final mean (``<name>_best_first``), each set against the
    paper's FID ranking of the same presets (``<name>_vs_paper``, :func:`against_paper`), and REPA
    against SiT when both ran."""
    paper = sorted(presets, key=lambda p: get_preset(p).paper_fid)
    result = {"paper_best_first": paper}
    for metric in metrics:
        spreads = {p: presets[p]["final"][metric.key] for p in presets}
        sign = 1 if metric.lower_is_better else -1
        best_first = sorted(presets, key=lambda p: sign * spreads[p]["mean"])
        result[f"{metric.name}_best_first"] = best_first
        result[f"{metric.name}_vs_paper"] = against_paper(best_first, paper, spreads)
    if {"sit", "repa"} <= set(presets):
        result["repa_vs_sit"] = {m.key: difference(presets["repa"]["final"][m.key], presets["sit"]["final"][m.key])
                                 for m in metrics}
    return result


def against_paper(best_first: list[str], paper: list[str], spreads: dict[str, dict]) -> dict:
    """Whether a measured ranking agrees with the paper's, counting only what the seeds resolve.

    Two presets are told apart when their mean ± std intervals are apart (:func:`intervals_apart`; never
    with one seed). ``reversed``: pairs the paper ranks one way and the runs clearly the other way;
    ``ties``: neighbours of the measured ranking that are not told apart. The verdict is
    ``"not the paper order"`` when any pair is clearly reversed, ``"the paper order"`` when the
    ranking is the paper's and every neighbour is told apart, else ``"not resolved"``."""
    def apart(a: str, b: str) -> bool:
        return bool(intervals_apart(spreads[a], spreads[b]))

    rank = {p: i for i, p in enumerate(best_first)}
    reversed_pairs = [[a, b] for i, a in enumerate(paper) for b in paper[i + 1 :] if rank[b] < rank[a] and apart(a, b)]
    ties = [[a, b] for a, b in zip(best_first, best_first[1:]) if not apart(a, b)]
    if reversed_pairs:
        verdict = "not the paper order"
    elif best_first == paper and not ties:
        verdict = "the paper order"
    else:
        verdict = "not resolved"
    return {"verdict": verdict, "reversed": reversed_pairs, "ties": ties}


def intervals_apart(a: dict, b: dict) -> bool | None:
    """Whether two spreads' mean ± std intervals do not overlap; None when either has one value."""
    if min(len(a["values"]), len(b["values"])) < 2:
        return None
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def difference(a: dict, b: dict) -> dict:
    """a − b of two spreads (:func:`_spread`), whether their mean ± std intervals are apart, and
    Welch's unequal-variance t-test of the two sets of values (``scipy.stats.ttest_ind`` with
    ``equal_var=False``): t = (mean_a − mean_b) / sqrt(std_a²/n_a + std_b²/n_b), its
    Welch–Satterthwaite degrees of freedom and the two-sided p-value.

    With one seed on either side there is no spread to compare: ``intervals_apart``, ``welch_t``,
    ``df`` and ``p_value`` are None; with no spread on both sides t is ±inf (0 for equal means) and
    ``df`` None. Two or three seeds make a weak test; the report prints the numbers, not a verdict."""
    diff = a["mean"] - b["mean"]
    apart = intervals_apart(a, b)
    if apart is None:
        return {"difference": diff, "intervals_apart": None, "welch_t": None, "df": None, "p_value": None}
    if a["std"] == b["std"] == 0:  # scipy gives nan for two equal constants
        welch_t = math.copysign(math.inf, diff) if diff else 0.0
        return {"difference": diff, "intervals_apart": apart, "welch_t": welch_t, "df": None,
                "p_value": 0.0 if diff else 1.0}
    from scipy.stats import ttest_ind  # imported here: scipy.stats takes a while to import

    test = ttest_ind(a["values"], b["values"], equal_var=False)
    return {"difference": diff, "intervals_apart": apart, "welch_t": float(test.statistic),
            "df": float(test.df), "p_value": float(test.pvalue)}


def protocol(settings: CompareSettings, config: RunConfig) -> dict:
    """What is fixed and what varies across the compared runs (``config``: one run's, all share these)."""
    model = {k: v for k, v in vars(config.model).items() if k not in ("preset", "init_from") and v is not None}
    train, sampler = config.train, config.eval.sampler
    return {
        "fixed": {"model": model, "steps": train.max_steps, "batch": train.global_batch, "lr": config.optim.lr,
                  "ema_decay": train.ema_decay, "precision": train.precision,
                  "loss": {k: v for k, v in vars(config.loss).items() if v not in (None, [])},
                  "data_images_per_class": config.data.images_per_class, "data_fraction": config.data.fraction,
                  "evaluation_samples": config.eval.num_samples, "evaluation_seed": config.eval.seed,
                  "evaluation_every": config.eval.every,
                  "sampler": f"{sampler.mode.upper()} {sampler.steps} steps, guidance {sampler.cfg}"},
        "varies": {"preset": list(settings.presets), "training_seed": list(settings.run_seeds)},
    }


# ----------------------------------------------------------------------------- figures and report.md
@dataclass(frozen=True)
class ReportText:
    """The report's own words: title, an opening paragraph, the lines about the VFM and the data, and the
    class names of the grid's columns."""

    title: str
    intro: str
    vfm_lines: list[str]
    data_line: str
    columns: list[str]


def write_report(paths: ComparePaths, settings: CompareSettings, config: RunConfig, text: ReportText,
                 stage_seconds: dict[str, float], *, extra: dict) -> dict:
    """results.json, the curves, grid.png and report.md in ``paths.out``; returns the results."""
    from PIL import Image

    results = gather_results(paths, settings, config, extra)
    write_results(results, paths.out / RESULTS_FILE)
    runs = {p: [paths.run(p, s) for s in settings.run_seeds] for p in settings.presets}
    plot_seed_bands(runs, paths.out / CURVES_FILE, keys=list(results["metrics"]),
                    title=f"mean ± 1 std over {settings.seeds} seed(s), {config.eval.num_samples} samples per evaluation")
    first = {p: paths.run(p, settings.seed) for p in settings.presets}
    plot_runs(first, paths.out / LOSS_CURVES_FILE, log_y=True)
    grids = [np.asarray(Image.open(paths.grid(p)).convert("RGB")) for p in settings.presets]
    with atomic_write(paths.out / "grid.png") as tmp:
        Image.fromarray(side_by_side(grids)).save(tmp, format="PNG")
    with atomic_write(paths.out / "report.md") as tmp:
        tmp.write_text(report_text(paths, settings, config, results, text, stage_seconds))
    return results


def side_by_side(images: list[np.ndarray], gap: int = 24) -> np.ndarray:
    """uint8 (H_i, W_i, 3) images left to right on white, top-aligned, ``gap`` pixels apart."""
    height = max(i.shape[0] for i in images)
    width = sum(i.shape[1] for i in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for image in images:
        canvas[: image.shape[0], x : x + image.shape[1]] = image
        x += image.shape[1] + gap
    return canvas


def report_text(paths: ComparePaths, settings: CompareSettings, config: RunConfig, results: dict, text: ReportText,
                stage_seconds: dict[str, float]) -> str:
    metrics = metrics_of(config)
    columns = ", ".join(f"{k} = {name}" for k, name in enumerate(text.columns))
    lines = [
        f"# {text.title}", "", text.intro, "",
        "## The VFM", "", *text.vfm_lines, "",
        *_protocol_section(settings, config, results, text), *_table_section(settings, results, metrics),
        *_ordering_section(results, metrics), "## Curves", "",
        f"![quality curves]({CURVES_FILE})", "", f"![loss curves]({LOSS_CURVES_FILE}) (first seed of each preset)", "",
        "## Samples", "",
        (f"One column per class ({columns}), {settings.grid_rows} samples each from the first seed's EMA; "
         f"SDE {settings.grid_steps} steps, guidance scale {settings.grid_cfg}."), "",
        "![class grids](grid.png)", "", *_files_section(paths, settings), *_time_section(stage_seconds),
    ]
    return "\n".join(lines)


def _protocol_section(settings: CompareSettings, config: RunConfig, results: dict, text: ReportText) -> list[str]:
    fixed = results["protocol"]["fixed"]
    model = ", ".join(f"{k} {v}" for k, v in fixed["model"].items() if k != "name")
    evaluated = ", ".join(f"`{key}` ({direction})" for key, direction in results["metrics"].items())
    return [
        "## Protocol", "",
        (f"Every preset trains the same {fixed['model']['name']} ({model}) on {text.data_line} for "
         f"{fixed['steps']} steps of batch {fixed['batch']} (lr {fixed['lr']}, EMA {fixed['ema_decay']}, "
         f"{fixed['precision']}), with training seeds {', '.join(map(str, settings.run_seeds))}; data, VFM and "
         f"evaluation samples are the same for all. Each run is evaluated at steps "
         f"{_evaluation_steps(config.eval.every, fixed['steps'])} on the same {fixed['evaluation_samples']} EMA "
         f"samples ({fixed['sampler']}, seed {fixed['evaluation_seed']}): {evaluated}."),
        "",
    ]


def _evaluation_steps(every: int, steps: int) -> str:
    return ", ".join(str(step) for step in range(1, steps + 1) if eval_due(step, every, steps))


def _table_section(settings: CompareSettings, results: dict, metrics: list[Metric]) -> list[str]:
    steps = results["protocol"]["fixed"]["steps"]
    arrows = {True: "↓", False: "↑"}
    header = " | ".join(f"{m.label} {arrows[m.lower_is_better]}" for m in metrics)
    lines = [f"## Final step ({steps}), mean ± std over {settings.seeds} seed(s)", "",
             f"| preset | {header} | latent loss | paper FID (B/2, 400K) |",
             "|---|" + "---|" * (len(metrics) + 2)]
    for preset, entry in results["presets"].items():
        f = entry["final"]
        cells = " | ".join(_pm(f[m.key]) for m in metrics)
        lines.append(f"| {preset} | {cells} | {_pm(f['loss/latent'])} | {get_preset(preset).paper_fid} |")
    return [*lines, ""]


def _pm(spread: dict) -> str:
    return f"{spread['mean']:.4g} ± {spread['std']:.2g}"


def _ordering_section(results: dict, metrics: list[Metric]) -> list[str]:
    o = results["ordering"]
    if len(o["paper_best_first"]) < 2:
        return []
    lines = ["## Does the paper's ordering hold here?", "",
             f"- Paper (FID, best first): {' < '.join(o['paper_best_first'])}."]
    for m in metrics:
        sign = "<" if m.lower_is_better else ">"
        lines.append(f"- Here by {m.label}: {_ranking(o[f'{m.name}_best_first'], o[f'{m.name}_vs_paper'], sign)}.")
    lines.append("- `≈`: neighbours whose mean ± std intervals overlap; an order holds only where neighbours are apart.")
    if "repa_vs_sit" in o:
        parts = [f"{m.label} {o['repa_vs_sit'][m.key]['difference']:+.4g} ({_clear(o['repa_vs_sit'][m.key])})"
                 for m in metrics]
        lines.append(f"- REPA − SiT: {', '.join(parts)}.")
    return [*lines, ""]


def _ranking(best_first: list[str], compared: dict, sign: str) -> str:
    """``reg < repa ≈ sit`` — the paper order / not the paper order (… clearly reversed) / not resolved."""
    ties = {tuple(pair) for pair in compared["ties"]}
    text = best_first[0]
    for a, b in zip(best_first, best_first[1:]):
        text += f" {'≈' if (a, b) in ties else sign} {b}"
    verdict = compared["verdict"]
    if compared["reversed"]:
        verdict += " (clearly reversed: " + ", ".join(f"{b} ahead of {a}" for a, b in compared["reversed"]) + ")"
    return f"{text} — {verdict}"


def _clear(compared: dict) -> str:
    if compared["intervals_apart"] is None:
        return "one seed: no spread to compare"
    where = "mean ± std intervals apart" if compared["intervals_apart"] else "within the seeds' spread"
    if compared["df"] is None:
        return f"{where}, no spread on either side"
    return f"{where}, Welch t = {compared['welch_t']:+.1f}, df {compared['df']:.1f}, p = {compared['p_value']:.2g}"


def _files_section(paths: ComparePaths, settings: CompareSettings) -> list[str]:
    lines = ["## Files", "", f"- [results.json]({RESULTS_FILE}): every series and final value per run"]
    for preset in settings.presets:
        run = paths.run(preset, settings.seed).relative_to(paths.out)
        lines.append(f"- {preset}: [config]({run}/config.yaml), [EMA weights]({run}/ema/config.json), "
                     f"[training log]({run}/metrics.jsonl), [grid]({paths.grid(preset).name})")
    return [*lines, ""]


def _time_section(stage_seconds: dict[str, float]) -> list[str]:
    lines = ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in stage_seconds.items()]
    return [*lines, f"| total | {sum(stage_seconds.values()):.1f} |", ""]
