"""`reglue demo` end to end with a tiny budget: outputs well-formed, labelled random, resumable, refusals."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from reglue import demo
from reglue.cli import build_parser, main
from reglue.demo import COMPARED, DemoSettings, run_demo
from reglue.training import plot

TINY = {"steps": 3, "images_per_class": 2, "compressor_epochs": 1, "sample_steps": 2, "samples_per_class": 2,
        "grid_rows": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def stage_names(out) -> list[str]:
    return [stage for stage, _ in json.loads((out / demo.STATE_FILE).read_text())["stages"]]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A --compare demo (sit and reglue) interrupted at its evaluate stage, then rerun to the end.

    Returns (out, mtime of the first reglue grid, the panels of every loss-curve figure drawn)."""
    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(presets=COMPARED, **TINY)
    figures = []
    draw = plot._draw_figure

    def record(panels, out, **options):
        figures.append({panel.key: list(panel.lines) for panel in panels})
        return draw(panels, out, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "_evaluate", lambda paths, settings: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            run_demo(out, settings, progress=False)
        assert "evaluate" not in stage_names(out) and "sample reglue" in stage_names(out)
        grid_written = (out / "grid_reglue.png").stat().st_mtime_ns
        patch.undo()
        patch.setattr(plot, "_draw_figure", record)
        result = run_demo(out, settings, progress=False)
    assert result.report == out / "report.md"
    return out, grid_written, figures


def all_numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from all_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from all_numbers(item)
    elif isinstance(value, float | int) and not isinstance(value, bool):
        yield value


def test_outputs_are_well_formed_and_labelled_random(finished):
    out, _, _ = finished
    assert len(list((out / "images").rglob("*.png"))) == 16
    assert json.loads((out / "data" / "manifest.json").read_text())["vae"] == "pixel"
    sit, reglue = (Image.open(out / f"grid_{p}.png").size for p in COMPARED)
    side = DemoSettings().resolution  # 128²: images drawn and trained at the demo resolution
    assert reglue[0] == 8 * side and reglue[1] > side  # 8 class columns, one row, header and caption
    assert Image.open(out / "grid.png").size[0] > sit[0] + reglue[0]  # side by side, with a gap
    assert Image.open(out / "loss_curves.png").size[0] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "random, untrained" in metrics["encoders"]["vfm"] and "random, untrained" in metrics["note"]
    assert set(metrics["presets"]) == {"sit", "reglue"} and metrics["presets"]["sit"]["vfm"] == "not used"
    reglue = metrics["presets"]["reglue"]
    assert set(reglue) >= {"class_accuracy", "class_accuracy_real_images", "thumbnail_fid", "final_losses"}
    assert all(math.isfinite(x) for x in all_numbers(metrics))
    with np.load(out / reglue["samples"]) as samples:
        assert samples["arr_0"].shape == (16, side, side, 3) and samples["arr_0"].dtype == np.uint8
    config = yaml.safe_load((out / "runs" / "reglue" / "config.yaml").read_text())
    assert config["model"]["preset"] == "reglue" and config["train"]["max_steps"] == 3
    exported = json.loads((out / "runs" / "reglue" / "ema" / "config.json").read_text())
    assert exported["projector_dim"] == demo.MODEL["projector_dim"]  # model.projector_dim reaches the SiT
    for preset in COMPARED:  # both runs were scored during training: every step of 3 (every = 3 // 4 -> 1)
        assert list(metrics["presets"][preset]["fd_during_training"]) == ["1", "2", "3"]


def test_report_links_existing_files_and_says_the_encoders_are_random(finished):
    out, _, _ = finished
    report = (out / "report.md").read_text()
    assert "random, untrained" in report and "Plumbing checks" in report
    assert f"`{demo.EVAL_KEY}` panel" in report and "| reglue | 1: " in report
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert {"grid.png", "loss_curves.png", "metrics.json", "runs/reglue/config.yaml", "runs/sit/config.yaml"} <= set(links)
    missing = [link for link in links if not (out / link).exists()]
    assert not missing


def test_rerun_resumed_the_interrupted_stage_only_and_left_no_temporary_files(finished):
    out, grid_written, _ = finished
    assert (out / "grid_reglue.png").stat().st_mtime_ns == grid_written  # sampled once, before the interruption
    assert stage_names(out)[-2:] == ["evaluate", "report"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    before = (out / "report.md").stat().st_mtime_ns
    run_demo(out, DemoSettings(presets=COMPARED, **TINY), progress=False)  # all finished: nothing is redone
    assert (out / "report.md").stat().st_mtime_ns == before


def test_rerun_with_other_settings_or_into_a_foreign_folder_is_refused(finished, tmp_path, capsys):
    out, _, _ = finished
    with pytest.raises(ValueError, match="steps: was 3, now 4"):
        run_demo(out, DemoSettings(presets=COMPARED, **{**TINY, "steps": 4}), progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 2
    assert "not a demo folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_compare_draws_both_curves_in_one_figure(finished):
    _, _, figures = finished
    assert len(figures) == 1 and figures[0]["loss/latent"] == ["sit", "reglue"]
    assert figures[0]["loss/semantic"] == ["reglue"]


def test_a_preset_without_vfm_targets_skips_the_vfm_stages(tmp_path):
    result = run_demo(tmp_path, DemoSettings(presets=("sit",), **TINY), progress=False)
    assert stage_names(tmp_path) == ["images", "prepare", "train sit", "sample sit", "evaluate", "report"]
    assert not (tmp_path / "data" / "norm_stats.safetensors").exists()
    assert Image.open(result.grid).size == Image.open(tmp_path / "grid_sit.png").size
    assert Image.open(result.loss_curves).size[0] > 0


def test_cli_defaults_are_the_demo_defaults_and_settings_are_validated():
    args = build_parser().parse_args(["demo"])
    defaults = DemoSettings()
    assert (args.steps, args.images_per_class, args.sample_steps, args.seed, args.preset, args.resolution) == (
        defaults.steps, defaults.images_per_class, defaults.sample_steps, defaults.seed, defaults.presets[0],
        defaults.resolution)
    with pytest.raises(ValueError, match="resolution must be a multiple of 64"):
        DemoSettings(resolution=100)
    with pytest.raises(ValueError, match="presets"):
        DemoSettings(presets=("dit",))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        DemoSettings(steps=0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--compare", "--preset", "sit"])
