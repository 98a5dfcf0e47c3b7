"""The toy-scale experiments of docs/science.md: when do semantic channels help?

Each experiment compares arms that differ in one setting, every arm under the demo's protocol
(``reglue demo --compare``: the demo's data, teacher, tiny SiT, 1,500 steps of batch 8, 3 seeds,
64 evaluation samples, FD in the teacher's space and class accuracy). The protocol is fixed here,
before any run; an arm is one ``reglue compare`` run (its own folder, resumable).

    reglue demo --compare --out DEMO                      # the reference arm, its data and teacher
    python scripts/toy_science.py --demo DEMO --out EXP   # every other arm, then the tables
    python scripts/toy_science.py --demo DEMO --out EXP --tables-only

Arms run ``--jobs`` at a time (default 2), each on one thread. The tables (markdown, mean ± std over
seeds, Welch's t against the experiment's reference arm) and the curves are written to
``EXP/science.md`` and ``EXP/<experiment>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from reglue.compare import CompareSettings
from reglue.compare.report import ACCURACY_KEY, difference
from reglue.config import save_settings
from reglue.data.prepare import PrepareSettings, run_prepare
from reglue.data.synthetic import write_synthetic_dataset
from reglue.demo.settings import DemoPaths, DemoSettings
from reglue.demo.stages import compare_settings
from reglue.encoders.pixel import PIXEL_AUTOENCODER
from reglue.training.plot import plot_seed_bands

LARGE_IMAGES_PER_CLASS = 160  # the data-size experiment's larger set; its first 40 per class are the demo's images
DEMO_ARM = "demo"  # the reference arm: the finished `reglue demo --compare` folder itself


@dataclass(frozen=True)
class Arm:
    """One ``reglue compare`` run: its presets, the run-config keys it changes, and its data."""

    name: str
    presets: tuple[str, ...]
    run: dict = field(default_factory=dict)  # nested RunConfig keys over the demo's
    large_data: bool = False  # the 160-per-class set instead of the demo's 40


@dataclass(frozen=True)
class Experiment:
    name: str
    question: str
    arms: tuple[str, ...]  # the first is the reference of the Welch tests
    presets: tuple[str, ...]
    # the question's contrasts: (preset, arm) − (preset, arm), e.g. REGLUE − REG within each data size
    contrasts: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = ()


ARMS = {arm.name: arm for arm in (
    Arm(DEMO_ARM, ("sit", "repa", "redi", "reg", "reglue")),
    Arm("semantic-norm", ("redi", "reglue"), {"loss": {"semantic_norm": True}}),
    Arm("width-128", ("sit", "repa", "reglue"), {"model": {"hidden_size": 128, "depth": 6}}),
    Arm("data-40", ("sit", "reg", "reglue"), {"data": {"images_per_class": 40}}, large_data=True),
    Arm("data-160", ("sit", "reg", "reglue"), large_data=True),
    Arm("lambda-sem-0.25", ("reglue",), {"loss": {"lambda_sem": 0.25}}),
)}
EXPERIMENTS = (
    Experiment("semantic-norm", "Does standardising the semantic channels and the CLS token per channel (loss."
               "semantic_norm) close the gap of the presets that generate semantic channels?",
               (DEMO_ARM, "semantic-norm"), ("sit", "redi", "reglue"),
               contrasts=tuple(((p, arm), ("sit", DEMO_ARM)) for p in ("redi", "reglue")
                               for arm in (DEMO_ARM, "semantic-norm"))),
    Experiment("capacity", "Does a larger SiT (width 64 → 128, depth 4 → 6) change the ordering?",
               (DEMO_ARM, "width-128"), ("sit", "repa", "reglue"),
               contrasts=tuple(((p, arm), ("sit", arm)) for p in ("repa", "reglue") for arm in (DEMO_ARM, "width-128"))),
    Experiment("data-size", "Does REGLUE's gain over REG grow as the data shrink (160 → 40 images per class)?",
               ("data-160", "data-40"), ("sit", "reg", "reglue"),
               contrasts=tuple(((p, arm), (q, arm)) for p, q in (("reglue", "reg"), ("reglue", "sit"))
                               for arm in ("data-160", "data-40"))),
    Experiment("lambda-sem", "Does a lower semantic loss weight λ_s (1 → 0.25) help REGLUE here?",
               (DEMO_ARM, "lambda-sem-0.25"), ("reglue",),
               contrasts=tuple((("reglue", arm), ("sit", DEMO_ARM)) for arm in (DEMO_ARM, "lambda-sem-0.25"))),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a finished `reglue demo --compare` folder")
    parser.add_argument("--out", type=Path, required=True, help="folder of the arms and the tables")
    parser.add_argument("--jobs", type=int, default=2, help="arms run at a time, one thread each")
    parser.add_argument("--arms", default=None, help="comma-separated arms to run (default all)")
    parser.add_argument("--tables-only", action="store_true", help="write the tables of the finished arms")
    args = parser.parse_args()
    demo, out = args.demo.resolve(), args.out.resolve()
    if not (demo / "teacher" / "teacher.json").is_file():
        sys.exit(f"{demo} holds no demo with a trained teacher; run `reglue demo --compare --out {demo}` first.")
    out.mkdir(parents=True, exist_ok=True)
    if not args.tables_only:
        names = args.arms.split(",") if args.arms else [a for a in ARMS if a != DEMO_ARM]
        large = prepare_large_data(demo, out) if any(ARMS[n].large_data for n in names) else None
        with ThreadPoolExecutor(args.jobs) as pool:
            for name, seconds in zip(names, pool.map(lambda n: run_arm(ARMS[n], demo, out, large), names)):
                print(f"{name}: {seconds:.0f} s", flush=True)
    (out / "science.md").write_text(tables(demo, out))
    print(f"tables in {out / 'science.md'}")
    return 0


def demo_settings(demo: Path) -> DemoSettings:
    recorded = json.loads((demo / "demo.json").read_text())
    fields = {k: v for k, v in recorded.items() if k != "stages"}
    return DemoSettings(**{**fields, "presets": tuple(fields["presets"])})


def prepare_large_data(demo: Path, out: Path) -> Path:
    """The demo's synthetic set drawn with 160 images per class (same seed: each class's first 40 are the
    demo's), prepared with the pixel autoencoder like the demo's data."""
    settings = replace(demo_settings(demo), images_per_class=LARGE_IMAGES_PER_CLASS)
    images, data = out / "large-images", out / "large-data"
    if not (data / "manifest.json").is_file():
        write_synthetic_dataset(images, settings.images_per_class, settings.resolution, settings.seed,
                                variant=settings.data)
        run_prepare(PrepareSettings(source=str(images), resolution=settings.resolution, vae=PIXEL_AUTOENCODER,
                                    shard_size=settings.num_images), data, show_progress=False)
    return data


def arm_settings(arm: Arm, demo: Path) -> CompareSettings:
    """The demo's comparison settings with the arm's presets, data size and run-config change."""
    base = demo_settings(demo)
    if arm.large_data:
        base = replace(base, images_per_class=LARGE_IMAGES_PER_CLASS)
    settings = compare_settings(DemoPaths(demo), replace(base, presets=arm.presets))
    return replace(settings, run=merged(settings.run, arm.run))


def run_arm(arm: Arm, demo: Path, out: Path, large: Path | None) -> float:
    """``reglue compare`` with :func:`arm_settings` (one thread); returns seconds."""
    settings = arm_settings(arm, demo)
    config = out / f"{arm.name}.yaml"
    save_settings(settings, config)
    data = large if arm.large_data else DemoPaths(demo).data
    command = [sys.executable, "-m", "reglue", "compare", str(data), "--out", str(out / arm.name), "--config",
               str(config), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    with open(out / f"{arm.name}.log", "a") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return time.perf_counter() - start


def merged(base: dict, changes: dict) -> dict:
    result = {**base}
    for key, value in changes.items():
        result[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return result


# ----------------------------------------------------------------------------- tables
def arm_dir(arm: str, demo: Path, out: Path) -> Path:
    return demo if arm == DEMO_ARM else out / arm


def tables(demo: Path, out: Path) -> str:
    lines = []
    for experiment in EXPERIMENTS:
        if not all((arm_dir(a, demo, out) / "results.json").is_file() for a in experiment.arms):
            lines += [f"## {experiment.name}: not run yet", ""]
            continue
        lines += experiment_table(experiment, demo, out)
    return "\n".join(lines)


def experiment_table(experiment: Experiment, demo: Path, out: Path) -> list[str]:
    results = {a: json.loads((arm_dir(a, demo, out) / "results.json").read_text()) for a in experiment.arms}
    fd = results[experiment.arms[0]]["fd_key"]
    reference = experiment.arms[0]
    lines = [f"## {experiment.name}", "", f"{experiment.question} Measured with `reglue compare`, one run per arm "
             "(scripts/toy_science.py).", "",
             f"| preset | arm | FD ↓ | class accuracy ↑ | latent loss | FD vs {reference} | accuracy vs {reference} | "
             "wall time |", "|---|---|---|---|---|---|---|---|"]
    for preset in experiment.presets:
        for arm in experiment.arms:
            entry = results[arm]["presets"].get(preset)
            if entry is None:
                continue
            final, base = entry["final"], results[reference]["presets"][preset]["final"]
            tests = ["—", "—"] if arm == reference else [
                welch(difference(final[k], base[k])) for k in (fd, ACCURACY_KEY)]
            lines.append(f"| {preset} | {arm} | {pm(final[fd])} | {pm(final[ACCURACY_KEY])} | "
                         f"{pm(final['loss/latent'])} | {tests[0]} | {tests[1]} | "
                         f"{train_minutes(arm_dir(arm, demo, out), preset):.1f} min |")
    if experiment.contrasts:
        lines += ["", "| contrast | FD difference | class-accuracy difference |", "|---|---|---|"]
        for (a, arm_a), (b, arm_b) in experiment.contrasts:
            first, second = (results[arm]["presets"][p]["final"] for p, arm in ((a, arm_a), (b, arm_b)))
            lines.append(f"| {a} ({arm_a}) − {b} ({arm_b}) | {welch(difference(first[fd], second[fd]))} | "
                         f"{welch(difference(first[ACCURACY_KEY], second[ACCURACY_KEY]))} |")
    lines += ["", *curve_table(experiment, results, fd)]
    curves = out / f"{experiment.name}.png"
    runs = {f"{preset} ({arm})": [arm_dir(arm, demo, out) / "runs" / preset / f"seed-{s}"
                                  for s in seeds(results[arm])]
            for preset in experiment.presets for arm in experiment.arms if preset in results[arm]["presets"]}
    plot_seed_bands(runs, curves, keys=[fd, ACCURACY_KEY], title=f"{experiment.name}: mean ± 1 std over seeds")
    return [*lines, "", f"![{experiment.name}]({curves.name})", ""]


def curve_table(experiment: Experiment, results: dict, fd: str) -> list[str]:
    """The curves as numbers: per preset and arm, the mean over seeds of FD and class accuracy at every
    evaluated step (the PNG beside the tables draws them with their ± 1 std bands)."""
    first = results[experiment.arms[0]]["presets"][experiment.presets[0]]["runs"]
    steps = sorted(next(iter(first.values()))["series"][fd], key=int)
    lines = ["| preset | arm | " + " | ".join(f"step {int(s):,}" for s in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for preset in experiment.presets:
        for arm in experiment.arms:
            entry = results[arm]["presets"].get(preset)
            if entry is None:
                continue
            cells = []
            for step in steps:
                fds = [run["series"][fd][step] for run in entry["runs"].values()]
                accuracies = [run["series"][ACCURACY_KEY][step] for run in entry["runs"].values()]
                cells.append(f"{sum(fds) / len(fds):.3g} / {sum(accuracies) / len(accuracies):.2f}")
            lines.append(f"| {preset} | {arm} | " + " | ".join(cells) + " |")
    return ["FD / class accuracy during training (mean over seeds):", "", *lines]


def seeds(results: dict) -> list[str]:
    return next(iter(results["presets"].values()))["runs"].keys()


def train_minutes(folder: Path, preset: str) -> float:
    """Minutes the folder's ledger records for training ``preset`` over all its seeds."""
    ledger = folder / ("demo.json" if (folder / "demo.json").is_file() else "compare.json")
    stages = json.loads(ledger.read_text())["stages"]
    return sum(seconds for stage, seconds in stages if stage.startswith(f"train {preset} seed")) / 60


def pm(spread: dict) -> str:
    return f"{spread['mean']:.3g} ± {spread['std']:.2g}"


def welch(compared: dict) -> str:
    if compared["welch_t"] is None:
        return f"{compared['difference']:+.3g}"
    return f"{compared['difference']:+.3g} (t = {compared['welch_t']:+.1f}, p = {compared['p_value']:.2g})"


if __name__ == "__main__":
    sys.exit(main())
