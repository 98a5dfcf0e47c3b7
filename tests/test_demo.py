"""`reglue demo` end to end with a tiny budget: outputs well-formed, resumable, refusals, the CLI."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import yaml
from PIL import Image

from reglue.cli import build_parser, main
from reglue.compare import report as demo_report
from reglue.compare.settings import CompareSettings, copy_of
from reglue.demo import ALL_PRESETS, DemoSettings, quick, run_demo
from reglue.demo.settings import MODEL
from reglue.demo.stages import STATE_FILE

TINY = {"data": "shapes", "steps": 3, "images_per_class": 8, "teacher_epochs": 1, "compressor_epochs": 1,
        "sample_steps": 2, "eval_samples": 4, "grid_rows": 1, "resolution": 64}
RANDOM = "random and untrained"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def stage_names(out) -> list[str]:
    return [stage for stage, _ in json.loads((out / STATE_FILE).read_text())["stages"]]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """All five presets × 2 seeds, interrupted at the report stage, then rerun to the end.

    Returns (out, mtime of the first reglue grid)."""
    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(presets=ALL_PRESETS, seeds=2, **TINY)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_report, "gather_results", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            run_demo(out, settings, progress=False)
    assert "report" not in stage_names(out) and "grid reglue" in stage_names(out)
    grid_written = (out / "grid_reglue.png").stat().st_mtime_ns
    result = run_demo(out, settings, progress=False)
    assert result.report == out / "report.md"
    return out, grid_written


def all_numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from all_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from all_numbers(item)
    elif isinstance(value, float | int) and not isinstance(value, bool):
        yield value


def test_every_preset_and_seed_is_trained_evaluated_and_summarised(finished):
    out, _ = finished
    assert len(list((out / "images").rglob("*.png"))) == 12 * 8  # the shapes set: 12 classes
    assert json.loads((out / "data" / "manifest.json").read_text())["resolution"] == 64
    results = json.loads((out / "results.json").read_text())
    assert list(results["presets"]) == list(ALL_PRESETS)
    fd = results["fd_key"]
    assert fd == "eval/fd_dinov2_vitb14_reg"
    for preset, entry in results["presets"].items():
        assert list(entry["runs"]) == ["0", "1"], preset
        for run in entry["runs"].values():  # evaluated at every step of 3 (every = 3 // 4 -> 1)
            assert list(run["series"][fd]) == ["1", "2", "3"] and list(run["series"]["eval/class_accuracy"]) == [
                "1", "2", "3"]
        for key in (fd, "eval/class_accuracy", "loss/latent"):
            spread = entry["final"][key]
            assert len(spread["values"]) == 2 and spread["min"] <= spread["mean"] <= spread["max"]
            assert spread["mean"] == pytest.approx(sum(spread["values"]) / 2)
    assert all(math.isfinite(x) for x in all_numbers(results))
    assert sorted(results["ordering"]["paper_best_first"]) == sorted(ALL_PRESETS)
    assert set(results["ordering"]["repa_vs_sit"]) == {fd, "eval/class_accuracy"}
    config = yaml.safe_load((out / "runs" / "redi" / "seed-1" / "config.yaml").read_text())
    assert config["train"]["seed"] == 1 and config["eval"]["seed"] == 0 and config["data"]["dir"].endswith("datasets/pca")
    assert config["eval"]["vfm"]["weights"].endswith("teacher/teacher.pth")
    exported = json.loads((out / "runs" / "reglue" / "seed-0" / "ema" / "config.json").read_text())
    assert exported["projector_dim"] == MODEL["projector_dim"]


def test_the_teacher_is_the_vfm_of_every_stage_and_nothing_says_random(finished):
    out, _ = finished
    teacher = json.loads((out / "teacher" / "teacher.json").read_text())
    assert (out / "teacher" / "teacher.pth").is_file() and teacher["arch"]["embed_dim"] > 0
    from safetensors import safe_open

    with safe_open(str(out / "semantics" / "norm_stats.safetensors"), "pt") as handle:
        assert "teacher.pth" in handle.metadata()["vfm"]
    report = (out / "report.md").read_text()
    assert RANDOM not in report and "random, untrained" not in report
    assert "trained here by `reglue train-vfm`" in report and "k-NN accuracy" in report


def test_report_holds_every_preset_and_links_existing_files(finished):
    out, _ = finished
    report = (out / "report.md").read_text()
    for preset in ALL_PRESETS:
        assert re.search(rf"^\| {preset} \| [0-9.e+-]+ ± ", report, re.MULTILINE), preset
    assert "Does the paper's ordering hold here?" in report and "REPA − SiT" in report
    results = json.loads((out / "results.json").read_text())
    for metric, sign in (("fd", "<"), ("accuracy", ">")):
        verdict = results["ordering"][f"{metric}_vs_paper"]["verdict"]
        assert verdict in ("the paper order", "not the paper order", "not resolved")
        ranking = re.search(rf"^- Here by {'FD' if metric == 'fd' else 'class accuracy'}.*: (.*) — (.*)\.$",
                            report, re.MULTILINE)
        assert ranking and ranking[2].startswith(verdict), metric
        assert re.sub(r" [<>≈] ", " ", ranking[1]).split() == results["ordering"][f"{metric}_best_first"]
    assert re.search(r"Welch t = [+-][0-9.]+, df [0-9.]+, p = [0-9.e-]+\)", report)
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert {"grid.png", "quality_curves.png", "loss_curves.png", "results.json"} <= set(links)
    assert not [link for link in links if not (out / link).exists()]
    sizes = [Image.open(out / f"grid_{p}.png").size for p in ALL_PRESETS]
    assert sizes[0][0] == 12 * 64  # 12 class columns of 64² samples
    assert Image.open(out / "grid.png").size[0] > sum(w for w, _ in sizes)  # side by side, with gaps


def test_rerun_resumed_the_interrupted_stage_only_and_left_no_temporary_files(finished):
    out, grid_written = finished
    assert (out / "grid_reglue.png").stat().st_mtime_ns == grid_written  # drawn once, before the interruption
    assert stage_names(out)[-1] == "report"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    before = (out / "report.md").stat().st_mtime_ns
    run_demo(out, DemoSettings(presets=ALL_PRESETS, seeds=2, **TINY), progress=False)  # nothing is redone
    assert (out / "report.md").stat().st_mtime_ns == before


def test_rerun_with_other_settings_or_into_a_foreign_folder_is_refused(finished, tmp_path, capsys):
    out, _ = finished
    with pytest.raises(ValueError, match="steps: was 3, now 4"):
        run_demo(out, DemoSettings(presets=ALL_PRESETS, seeds=2, **{**TINY, "steps": 4}), progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 2
    assert "not a demo folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_random_vfm_is_labelled_and_sit_alone_skips_the_semantic_stages(tmp_path):
    settings = DemoSettings(presets=("sit",), teacher="random", **TINY)
    result = run_demo(tmp_path, settings, progress=False)
    stages = stage_names(tmp_path)
    assert stages == ["images", "prepare data", "copy plain", "train sit seed 0", "grid sit", "report"]
    assert not (tmp_path / "semantics").exists() and not (tmp_path / "teacher").exists()
    assert not (tmp_path / "data" / "eval").exists()  # nothing is written into the prepared data
    assert len(list((tmp_path / "datasets" / "plain" / "eval").glob("*-linear-probe.npz"))) == 1  # class_accuracy
    assert RANDOM in result.report.read_text()
    assert Image.open(result.grid).size == Image.open(tmp_path / "grid_sit.png").size


def test_the_cli_passes_the_demo_defaults_and_only_what_it_is_given(tmp_path, monkeypatch):
    import reglue.demo

    given = []
    monkeypatch.setattr(reglue.demo, "run_demo", lambda out, settings, progress: given.append(settings) or (
        (_ for _ in ()).throw(KeyboardInterrupt)))
    for argv in (["demo"], ["demo", "--compare", "--quick"], ["demo", "--data", "shapes", "--steps", "7",
                                                             "--presets", "sit,repa", "--seeds", "2", "--random-vfm"],
                 ["demo", "--compare", "--quick", "--steps", "1000", "--seeds", "3"]):
        with pytest.raises(KeyboardInterrupt):
            main([*argv, "--out", str(tmp_path)])
    defaults = DemoSettings()
    small = quick(DemoSettings(presets=ALL_PRESETS, seeds=3))
    assert (small.steps, small.seeds, small.eval_samples) == (400, 2, 32)
    assert given == [defaults, small,
                     DemoSettings(data="shapes", steps=7, presets=("sit", "repa"), seeds=2, teacher="random"),
                     replace(small, steps=1000, seeds=3)]  # with --quick, what is given still wins
    assert defaults.presets == ("reglue",) and defaults.teacher == "trained" and defaults.seeds == 1
    assert defaults.data == "colours" and defaults.resolution == 128
    assert small.steps < defaults.steps and small.seeds == 2 and small.presets == ALL_PRESETS
    with pytest.raises(ValueError, match="presets"):
        DemoSettings(presets=("dit",))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        DemoSettings(steps=0)
    with pytest.raises(ValueError, match="resolution must be a multiple of 64"):
        DemoSettings(resolution=100)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--preset", "sit", "--presets", "sit,repa"])


def test_the_data_copies_cover_every_preset_that_uses_the_vfm():
    copies = {presets: CompareSettings(presets=presets, vfm={"weights": "random"}).copies for presets in [
        ("sit",), ("repa",), ("reglue",), ("redi",), ("redi", "repa"), ("sit", "redi", "reg", "reglue"), ALL_PRESETS]}
    assert copies == {("sit",): ("plain",), ("repa",): ("targets",), ("reglue",): ("compressor",),
                      ("redi",): ("pca",), ("redi", "repa"): ("targets", "pca"),
                      ("sit", "redi", "reg", "reglue"): ("compressor", "pca"), ALL_PRESETS: ("compressor", "pca")}
    assert copy_of("sit", ("sit", "redi")) == "pca" and copy_of("reg", ALL_PRESETS) == "compressor"


def test_redi_with_repa_alone_caches_both_data_copies(tmp_path):
    """ReDi's PCA copy and REPA's CLS/REPA targets in their own copy, with no compressor preset to make them."""
    run_demo(tmp_path, DemoSettings(presets=("redi", "repa"), teacher="random", **TINY), progress=False)
    assert "semantics targets" in stage_names(tmp_path) and "semantics pca" in stage_names(tmp_path)
    assert (tmp_path / "datasets" / "targets" / "shards" / "shard-00000" / "repa.npy").is_file()
    assert not (tmp_path / "datasets" / "pca" / "shards" / "shard-00000" / "repa.npy").exists()  # redi: no REPA
    assert not (tmp_path / "semantics" / "compressor").exists()


def test_difference_of_spreads_compares_only_what_seeds_allow():
    spread = demo_report._spread
    one = demo_report.difference(spread([10.0]), spread([10.01]))
    assert one["intervals_apart"] is None and one["welch_t"] is None and one["difference"] == pytest.approx(-0.01)
    apart = demo_report.difference(spread([15.0, 16.0, 17.0]), spread([18.6, 18.7, 18.8]))
    assert apart["intervals_apart"] is True and apart["difference"] == pytest.approx(-2.7)
    assert apart["welch_t"] == pytest.approx(-2.7 / (1 / 3 + 0.01 / 3) ** 0.5)
    overlap = demo_report.difference(spread([15.0, 17.0]), spread([16.0, 17.0]))
    assert overlap["intervals_apart"] is False


def test_welch_test_gives_its_degrees_of_freedom_and_p_value():
    from scipy.stats import t as student_t

    spread = demo_report._spread
    apart = demo_report.difference(spread([15.0, 16.0, 17.0]), spread([18.6, 18.7, 18.8]))
    va, vb = 1.0 / 3, 0.01 / 3  # std² / n of each side
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)  # Welch-Satterthwaite, n - 1 = 2 on both sides
    assert apart["df"] == pytest.approx(df) and apart["df"] == pytest.approx(2.04, abs=0.01)
    assert apart["p_value"] == pytest.approx(2 * student_t.sf(abs(apart["welch_t"]), df))
    assert 0.04 < apart["p_value"] < 0.045
    constants = demo_report.difference(spread([2.0, 2.0]), spread([1.0, 1.0]))
    assert constants["welch_t"] == math.inf and constants["p_value"] == 0.0 and constants["df"] is None
    same = demo_report.difference(spread([1.0, 1.0]), spread([1.0, 1.0]))
    assert same["welch_t"] == 0.0 and same["p_value"] == 1.0 and same["intervals_apart"] is False


@pytest.mark.parametrize(("values", "verdict", "ties", "reversed_pairs"), [
    ({"reglue": [1.0, 1.1], "reg": [2.0, 2.1], "sit": [3.0, 3.1]}, "the paper order", [], []),
    ({"reglue": [1.0, 1.1], "reg": [1.05, 1.15], "sit": [3.0, 3.1]}, "not resolved", [["reglue", "reg"]], []),
    ({"reglue": [1.05, 1.15], "reg": [1.0, 1.1], "sit": [3.0, 3.1]}, "not resolved", [["reg", "reglue"]], []),
    ({"reglue": [3.0, 3.1], "reg": [2.0, 2.1], "sit": [2.5, 2.7]}, "not the paper order",
     [], [["reglue", "reg"], ["reglue", "sit"]]),  # reg ahead of sit, as in the paper
    ({"reglue": [1.0], "reg": [2.0], "sit": [3.0]}, "not resolved", [["reglue", "reg"], ["reg", "sit"]], []),
])
def test_an_ordering_holds_only_where_the_seeds_tell_neighbours_apart(values, verdict, ties, reversed_pairs):
    spreads = {preset: demo_report._spread(v) for preset, v in values.items()}
    best_first = sorted(spreads, key=lambda p: spreads[p]["mean"])  # lower is better, as FD
    compared = demo_report.against_paper(best_first, ["reglue", "reg", "sit"], spreads)
    assert compared == {"verdict": verdict, "ties": ties, "reversed": reversed_pairs}
