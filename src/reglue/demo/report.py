"""The demo's results: per-run evaluations gathered over seeds (``results.json``), curves with
mean ± spread, the grids side by side, and ``report.md`` with the protocol, the teacher's quality,
the final table and whether the paper's ordering holds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from reglue.demo.settings import (
    AUTOENCODER_LABEL,
    MODEL,
    RANDOM_VFM_LABEL,
    SAMPLER,
    TRAIN_BATCH,
    DemoPaths,
    DemoSettings,
    evaluation_every,
)
from reglue.errors import ReglueError
from reglue.io import atomic_write
from reglue.metrics.evaluate import write_results
from reglue.metrics.feature_space import fd_key as _metric_fd_key
from reglue.metrics.probe import REPORT_JSON, REPORT_MD
from reglue.presets import get_preset
from reglue.training.evaluation import eval_due
from reglue.training.metrics import read_metrics
from reglue.training.plot import plot_runs, plot_seed_bands

ACCURACY_KEY = "eval/class_accuracy"
RESULTS_FILE = "results.json"
CURVES_FILE = "quality_curves.png"
LOSS_CURVES_FILE = "loss_curves.png"


def fd_key(vfm_name: str) -> str:
    """The in-training FD's metrics key for a VFM of registry name ``vfm_name``."""
    return f"eval/{_metric_fd_key(vfm_name)}"


def teacher_summary(paths: DemoPaths, settings: DemoSettings) -> dict:
    """The teacher's probe report (report.json of ``reglue train-vfm``), or the random VFM's label."""
    if settings.teacher == "random":
        return {"label": RANDOM_VFM_LABEL}
    report = json.loads((paths.teacher / REPORT_JSON).read_text())
    return {"label": "tiny DINOv2-with-registers trained here by `reglue train-vfm`", **report}


def gather_results(paths: DemoPaths, settings: DemoSettings, vfm_name: str) -> dict:
    """Every run's evaluation series and final values, and per preset their mean and spread over seeds."""
    keys = (fd_key(vfm_name), ACCURACY_KEY)
    presets = {}
    for preset in settings.presets:
        runs = {seed: _run_result(paths.run(preset, seed), keys) for seed in settings.run_seeds}
        final = {key: _spread([run["final"][key] for run in runs.values()]) for key in (*keys, "loss/latent")}
        presets[preset] = {"runs": {str(s): r for s, r in runs.items()}, "final": final}
    return {
        "protocol": protocol(settings),
        "teacher": teacher_summary(paths, settings),
        "class_accuracy": {"probe": "linear probe on the VFM's CLS features, fitted on every prepared image",
                           "chance": 1 / len(settings.classes)},
        "fd_key": keys[0],
        "presets": presets,
        "ordering": ordering(presets, keys[0]),
    }


def _run_result(run_dir: Path, keys: tuple[str, ...]) -> dict:
    history = read_metrics(run_dir)
    series = {key: {str(r["step"]): r[key] for r in history if key in r} for key in keys}
    losses = [r for r in history if "loss/latent" in r]
    if not losses or not all(series.values()):
        raise ReglueError(f"{run_dir} has no evaluation or loss logged: delete that folder and start over with a new "
                          "--out folder, or remove its 'train' entry from demo.json and rerun the demo to train it again.")
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


def ordering(presets: dict, fd: str) -> dict:
    """The presets ranked by final mean FD (lower is better) and by class accuracy (higher is better),
    each set against the paper's FID ranking of the same presets (:func:`against_paper`), and REPA
    against SiT when both ran."""
    paper = sorted(presets, key=lambda p: get_preset(p).paper_fid)
    result = {"paper_best_first": paper}
    for name, key, sign in (("fd", fd, 1), ("accuracy", ACCURACY_KEY, -1)):
        spreads = {p: presets[p]["final"][key] for p in presets}
        best_first = sorted(presets, key=lambda p: sign * spreads[p]["mean"])
        result[f"{name}_best_first"] = best_first
        result[f"{name}_vs_paper"] = against_paper(best_first, paper, spreads)
    if {"sit", "repa"} <= set(presets):
        result["repa_vs_sit"] = {key: difference(presets["repa"]["final"][key], presets["sit"]["final"][key])
                                 for key in (fd, ACCURACY_KEY)}
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

    ties = [[a, b] for a, b in zip(best_first, best_first[1:]) if not apart(a, b)]
    position = {preset: i for i, preset in enumerate(best_first)}
    reversed_pairs = [[a, b] for i, a in enumerate(paper) for b in paper[i + 1:]
                      if position[a] > position[b] and apart(a, b)]  # the paper has a before b
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


def protocol(settings: DemoSettings) -> dict:
    """What is fixed and what varies across the compared runs."""
    return {
        "fixed": {"data": f"{settings.data!r} synthetic set, {len(settings.classes)} classes × "
                          f"{settings.images_per_class} images at {settings.resolution}²",
                  "teacher": settings.teacher, "model": MODEL, "steps": settings.steps,
                  "batch": min(TRAIN_BATCH, settings.num_images), "evaluation_samples": settings.eval_samples,
                  "evaluation_seed": settings.seed, "sampler": f"{SAMPLER.upper()} {settings.sample_steps} steps, "
                                                             "no guidance"},
        "varies": {"preset": list(settings.presets), "training_seed": list(settings.run_seeds)},
    }


# ----------------------------------------------------------------------------- figures and report.md
def write_report(paths: DemoPaths, settings: DemoSettings, vfm_name: str, stage_seconds: dict[str, float]) -> None:
    from PIL import Image

    results = gather_results(paths, settings, vfm_name)
    write_results(results, paths.out / RESULTS_FILE)
    runs = {p: [paths.run(p, s) for s in settings.run_seeds] for p in settings.presets}
    plot_seed_bands(runs, paths.out / CURVES_FILE, keys=[results["fd_key"], ACCURACY_KEY],
                    title=f"mean ± 1 std over {settings.seeds} seed(s), {settings.eval_samples} samples per evaluation")
    first = {p: paths.run(p, settings.seed) for p in settings.presets}
    plot_runs(first, paths.out / LOSS_CURVES_FILE, log_y=True)
    grids = [np.asarray(Image.open(paths.grid(p)).convert("RGB")) for p in settings.presets]
    with atomic_write(paths.out / "grid.png") as tmp:
        Image.fromarray(side_by_side(grids)).save(tmp, format="PNG")
    with atomic_write(paths.out / "report.md") as tmp:
        tmp.write_text(report_text(paths, settings, results, stage_seconds))


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


def report_text(paths: DemoPaths, settings: DemoSettings, results: dict, stage_seconds: dict[str, float]) -> str:
    columns = ", ".join(f"{k} = {name}" for k, name in enumerate(settings.classes))
    lines = [
        "# reglue demo", "",
        ("Tiny models, a synthetic data set and CPU minutes: the numbers compare methods under one protocol "
         "at toy scale; none is comparable with the paper's ImageNet FIDs."), "",
        *_teacher_section(results["teacher"]), *_protocol_section(settings, results), *_table_section(settings, results),
        *_ordering_section(results), "## Curves", "",
        f"![quality curves]({CURVES_FILE})", "", f"![loss curves]({LOSS_CURVES_FILE}) (first seed of each preset)", "",
        "## Samples", "",
        (f"One column per class ({columns}), {settings.grid_rows} samples each from the first seed's EMA; "
         f"{SAMPLER.upper()} {settings.sample_steps} steps, guidance scale {settings.cfg_scale}."), "",
        "![class grids](grid.png)", "", *_files_section(paths, settings), *_time_section(stage_seconds),
    ]
    return "\n".join(lines)


def _teacher_section(teacher: dict) -> list[str]:
    lines = ["## The VFM", "", f"- {teacher['label']}; autoencoder: {AUTOENCODER_LABEL}."]
    if "verdict" in teacher:
        lines.append(f"- Teacher quality on held-out images ([report](teacher/report.md)): {teacher['verdict']}")
    return [*lines, ""]


def _protocol_section(settings: DemoSettings, results: dict) -> list[str]:
    fixed = results["protocol"]["fixed"]
    chance = results["class_accuracy"]["chance"]
    return [
        "## Protocol", "",
        (f"Every preset trains the same SiT ({MODEL['depth']} blocks of width {MODEL['hidden_size']}) on "
         f"{fixed['data']} for {settings.steps} steps of batch {fixed['batch']}, with training seeds "
         f"{', '.join(map(str, settings.run_seeds))}; data, teacher and evaluation samples are the "
         f"same for all. Each run is evaluated at steps {_evaluation_steps(settings.steps)} on the same "
         f"{settings.eval_samples} EMA samples "
         f"({fixed['sampler']}): FD of the samples' CLS features in the VFM's space against every prepared image "
         f"(`{results['fd_key']}`, lower is better) and the share of samples that a linear probe on the same CLS "
         f"features, fitted on every prepared image, assigns their conditioning class (`{ACCURACY_KEY}`, higher is "
         f"better; chance {chance:.3f})."),
        "",
    ]


def _evaluation_steps(steps: int) -> str:
    every = evaluation_every(steps)
    return ", ".join(str(step) for step in range(1, steps + 1) if eval_due(step, every, steps))


def _table_section(settings: DemoSettings, results: dict) -> list[str]:
    fd = results["fd_key"]
    lines = [f"## Final step ({settings.steps}), mean ± std over {settings.seeds} seed(s)", "",
             "| preset | FD in the VFM space ↓ | class accuracy ↑ | latent loss | paper FID (B/2, 400K) |",
             "|---|---|---|---|---|"]
    for preset, entry in results["presets"].items():
        f = entry["final"]
        lines.append(f"| {preset} | {_pm(f[fd])} | {_pm(f[ACCURACY_KEY])} | {_pm(f['loss/latent'])} | "
                     f"{get_preset(preset).paper_fid} |")
    return [*lines, ""]


def _pm(spread: dict) -> str:
    return f"{spread['mean']:.4g} ± {spread['std']:.2g}"


def _ordering_section(results: dict) -> list[str]:
    o = results["ordering"]
    if len(o["paper_best_first"]) < 2:
        return []
    lines = ["## Does the paper's ordering hold here?", "",
             f"- Paper (FID, best first): {' < '.join(o['paper_best_first'])}.",
             f"- Here by FD in the VFM space: {_ranking(o['fd_best_first'], o['fd_vs_paper'], '<')}.",
             f"- Here by class accuracy: {_ranking(o['accuracy_best_first'], o['accuracy_vs_paper'], '>')}.",
             ("- `≈`: neighbours whose mean ± std intervals overlap; an order holds only where neighbours "
              "are apart.")]
    if "repa_vs_sit" in o:
        fd, accuracy = (o["repa_vs_sit"][k] for k in (results["fd_key"], ACCURACY_KEY))
        lines.append(f"- REPA − SiT: FD {fd['difference']:+.4g} ({_clear(fd)}), class accuracy "
                     f"{accuracy['difference']:+.3f} ({_clear(accuracy)}).")
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


def _files_section(paths: DemoPaths, settings: DemoSettings) -> list[str]:
    lines = ["## Files", "", f"- [results.json]({RESULTS_FILE}): every series and final value per run"]
    if (paths.teacher / REPORT_MD).is_file():
        lines.append("- [teacher/](teacher/report.md): the trained VFM (`teacher.pth`, official DINOv2 layout)")
    for preset in settings.presets:
        run = paths.run(preset, settings.seed).relative_to(paths.out)
        lines.append(f"- {preset}: [config]({run}/config.yaml), [EMA weights]({run}/ema/config.json), "
                     f"[training log]({run}/metrics.jsonl), [grid]({paths.grid(preset).name})")
    return [*lines, ""]


def _time_section(stage_seconds: dict[str, float]) -> list[str]:
    lines = ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in stage_seconds.items()]
    return [*lines, f"| total | {sum(stage_seconds.values()):.1f} |", ""]

