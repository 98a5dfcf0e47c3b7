"""`reglue plot`: several runs in one figure, eval points, x axes, log axes, paper markers, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from matplotlib.colors import to_rgb
from PIL import Image

from reglue.cli import main
from reglue.training import plot
from reglue.training.metrics import METRICS_FILE, MetricsLogger
from reglue.training.plot import moving_average, plot_run, plot_runs, plot_series

STEPS = range(10, 101, 10)
EVAL_STEPS = (50, 100)


def fake_run(run_dir, *, preset="reglue", model="SiT-B/2", batch=4, scale=1.0, eval_metrics=("fd_dinov2", "fid"),
             config=True, wall_time=True):
    """A run directory as `reglue train` leaves it: loss rows every 10 steps (wall time 2 s a step), an
    evaluation row of its own at steps 50 and 100 (its values scale/step·1000), and config.yaml."""
    rows = []
    for step in STEPS:
        rows.append({"step": step, "loss/total": scale / step, "loss/latent": scale / (2 * step),
                     "loss/repa": -0.5, "grad_norm": 1.0, "lr": 1e-4, "images_per_s": 9.0}
                    | ({"wall_time_s": 2.0 * step} if wall_time else {}))
        if step in EVAL_STEPS:
            rows.append({"step": step, **{f"eval/{m}": scale * 1000 / step for m in eval_metrics},
                         "eval/seconds": 3.0} | ({"wall_time_s": 2.0 * step + 1} if wall_time else {}))
    run_dir.mkdir(parents=True)
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    if config:
        (run_dir / "config.yaml").write_text(yaml.safe_dump({
            "model": {"name": model, "preset": preset}, "train": {"global_batch": batch, "max_steps": 100},
            "eval": {"every": 50, "num_samples": 500, "vfm": {"name": "dinov2_vitl14", "weights": None}}}))
    return run_dir


@pytest.fixture
def two_runs(tmp_path):
    return (fake_run(tmp_path / "run_a", preset="reglue", batch=4),
            fake_run(tmp_path / "run_b", preset="sit", batch=8, scale=2.0))


@pytest.fixture
def recorded(monkeypatch):
    """What `reglue plot` drew: {"plots": [Plot], "axes": {panel key: matplotlib axes}}."""
    seen = {"plots": [], "axes": {}}
    draw_panel, draw_runs = plot._draw_panel, plot.plot_runs

    def record_panel(axes, panel, **options):
        draw_panel(axes, panel, **options)
        seen["axes"][panel.key] = axes

    def record_runs(*args, **kwargs):
        seen["plots"].append(draw_runs(*args, **kwargs))
        return seen["plots"][-1]

    monkeypatch.setattr(plot, "_draw_panel", record_panel)
    monkeypatch.setattr(plot, "plot_runs", record_runs)
    return seen


def has_colour(image: Image.Image, colour: str) -> bool:
    rgb = np.round(np.array(to_rgb(colour)) * 255).astype(np.uint8)
    return bool(np.any(np.all(np.asarray(image.convert("RGB")) == rgb, axis=-1)))


# ----------------------------------------------------------------------------- several runs
def test_plot_command_draws_two_runs_in_one_figure_with_every_metric_in_its_own_panel(two_runs, tmp_path,
                                                                                      recorded, capsys):
    out = tmp_path / "both.png"
    assert main(["plot", *map(str, two_runs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    (drawn,) = recorded["plots"]
    assert list(drawn.panels) == ["loss/total", "loss/latent", "loss/repa", "eval/fd_dinov2", "eval/fid",
                                  "grad_norm", "lr"]  # losses, evaluations (not eval/seconds), then the rest
    assert drawn.colours == {"run_a": "C0", "run_b": "C1"}
    for key in ("eval/fd_dinov2", "eval/fid"):
        panel = drawn.panels[key]
        assert panel.points and list(panel.lines) == ["run_a", "run_b"]
        for label, scale in (("run_a", 1.0), ("run_b", 2.0)):
            xs, ys = panel.lines[label]
            np.testing.assert_array_equal(xs, EVAL_STEPS)
            np.testing.assert_allclose(ys, [scale * 1000 / s for s in EVAL_STEPS])
    np.testing.assert_array_equal(drawn.panels["loss/total"].lines["run_b"][0], list(STEPS))
    assert drawn.title == "run_a vs run_b\nevaluation: fd/pr in dinov2_vitl14 features, 500 samples"
    for key, axes in recorded["axes"].items():  # a run keeps its colour in every panel
        colours = {line.get_label(): line.get_color() for line in axes.lines if not line.get_label().startswith("_")}
        assert colours == {"run_a": "C0", "run_b": "C1"}, key
        markers = {line.get_marker() for line in axes.lines}
        assert markers == ({"o"} if key.startswith("eval/") else {"None"}), key  # evaluations marked, unsmoothed
        assert len(axes.lines) == (2 if key.startswith("eval/") else 4), key  # training: raw + moving average
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (3 * 450, 3 * 320)  # 7 panels, 3 columns
        assert has_colour(image, "C0") and has_colour(image, "C1")  # both series are in the pixels


def test_the_title_names_each_runs_evaluation_settings_when_they_differ(two_runs, tmp_path):
    run_a, run_b = two_runs
    config = yaml.safe_load((run_b / "config.yaml").read_text())
    config["eval"] = {"num_samples": 1000, "vfm": None}  # null: the default network
    (run_b / "config.yaml").write_text(yaml.safe_dump(config))
    drawn = plot_runs([run_a, run_b], tmp_path / "out.png")
    assert drawn.title.splitlines()[1] == ("evaluation: run_a: fd/pr in dinov2_vitl14 features, 500 samples; "
                                           "run_b: fd/pr in DINOv2 ViT-L/14 features, 1,000 samples")
    del config["eval"]  # a run from before evaluation existed: no details to give
    (run_b / "config.yaml").write_text(yaml.safe_dump(config))
    (run_a / "config.yaml").unlink()
    assert plot_runs([run_a, run_b], tmp_path / "out.png").title == "run_a vs run_b"


def test_runs_are_labelled_by_folder_name_or_by_path_when_names_repeat(tmp_path):
    first, second = fake_run(tmp_path / "a" / "run"), fake_run(tmp_path / "b" / "run")
    assert plot.run_labels([first, tmp_path / "run_c"]) == {"run": first, "run_c": tmp_path / "run_c"}
    assert list(plot_runs([first, second], tmp_path / "out.png").colours) == [str(first), str(second)]


# ----------------------------------------------------------------------------- axes
def test_x_images_is_step_times_each_runs_global_batch_and_x_time_its_wall_time(two_runs, tmp_path):
    images = plot_runs(two_runs, tmp_path / "images.png", x="images")
    assert images.xlabel == "images seen"
    np.testing.assert_array_equal(images.panels["loss/total"].lines["run_a"][0], [4 * s for s in STEPS])
    np.testing.assert_array_equal(images.panels["eval/fid"].lines["run_b"][0], [8 * s for s in EVAL_STEPS])
    timed = plot_runs(two_runs, tmp_path / "time.png", x="time")
    assert timed.xlabel == "training time (min)"  # the runs last 201 s: minutes
    np.testing.assert_allclose(timed.panels["loss/total"].lines["run_a"][0], [2 * s / 60 for s in STEPS])
    np.testing.assert_allclose(timed.panels["eval/fd_dinov2"].lines["run_b"][0], [(2 * s + 1) / 60 for s in EVAL_STEPS])


def test_log_axes_on_request_and_a_log_y_only_where_values_are_positive(two_runs, tmp_path, recorded):
    run_a, run_b = map(str, two_runs)
    assert main(["plot", run_a, run_b, "--out", str(tmp_path / "linear.png")]) == 0
    assert {axes.get_yscale() for axes in recorded["axes"].values()} == {"linear"}
    assert {axes.get_xscale() for axes in recorded["axes"].values()} == {"linear"}
    assert main(["plot", run_a, run_b, "--out", str(tmp_path / "log.png"), "--log-y", "--log-x"]) == 0
    scales = {key: axes.get_yscale() for key, axes in recorded["axes"].items()}
    assert scales.pop("loss/repa") == "linear"  # negative: a log axis cannot show it
    assert set(scales.values()) == {"log"}
    assert {axes.get_xscale() for axes in recorded["axes"].values()} == {"log"}


def test_one_run_goes_to_its_folder_without_a_legend_of_runs(two_runs, recorded, capsys):
    run_a, _ = two_runs
    assert main(["plot", str(run_a), "--smoothing", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run_a / plot.PLOT_FILE}"
    assert (run_a / plot.PLOT_FILE).is_file()
    assert recorded["axes"]["loss/total"].get_legend() is None
    assert len(recorded["axes"]["loss/total"].lines) == 1  # smoothing 1: the raw line alone


# ----------------------------------------------------------------------------- paper markers
def test_paper_markers_only_on_request_and_only_for_sit_b2_runs(tmp_path, recorded):
    runs = [fake_run(tmp_path / "reglue_b2"), fake_run(tmp_path / "sit_b2", preset="sit"),
            fake_run(tmp_path / "reglue_xl2", model="SiT-XL/2")]
    out = str(tmp_path / "paper.png")
    assert main(["plot", *map(str, runs), "--out", out]) == 0
    assert all(not panel.paper for panel in recorded["plots"][-1].panels.values())
    assert main(["plot", *map(str, runs), "--out", out, "--paper"]) == 0
    marks = recorded["plots"][-1].panels["eval/fid"].paper
    assert [(m.preset, m.step, m.fid, m.x, m.colour) for m in marks] == [
        ("reglue", 300_000, 14.5, 300_000, "C0"), ("reglue", 400_000, 12.9, 400_000, "C0"),
        ("sit", 400_000, 33.0, 400_000, "C1"),
        *[("reglue", step, fid, step, "C2") for step, fid in (  # REGLUE SiT-XL/2's unguided curve, its own colour
            (50_000, 20.0), (100_000, 7.8), (200_000, 4.6), (400_000, 3.2), (700_000, 2.7), (1_000_000, 2.5))]]
    legend = [text.get_text() for text in recorded["axes"]["eval/fid"].get_legend().get_texts()]
    assert legend == ["reglue_b2", "sit_b2", "reglue_xl2", "paper, FID-50K"]
    images = plot_runs(runs, out, x="images", paper=True).panels["eval/fid"].paper
    assert [m.x for m in images][:3] == [300_000 * 256, 400_000 * 256, 400_000 * 256]  # at the paper's batch
    with pytest.raises(ValueError, match="drop --paper"):
        plot_runs([fake_run(tmp_path / "sit_xl2", model="SiT-XL/2", preset="sit")], out, paper=True)
    with pytest.raises(ValueError, match="not wall time"):
        plot_runs(runs, out, x="time", paper=True)


def test_paper_markers_get_an_fid_panel_when_no_run_logged_fid(tmp_path, caplog):
    """Markers go only into the eval/fid panel; a run that logged another metric is told it is not comparable."""
    run = fake_run(tmp_path / "run", eval_metrics=("fd_dinov2",))
    drawn = plot_run(run, paper=True)
    assert list(drawn.panels)[3:6] == ["eval/fd_dinov2", "eval/fid", "grad_norm"]
    assert drawn.panels["eval/fid"].lines == {} and len(drawn.panels["eval/fid"].paper) == 2
    assert not drawn.panels["eval/fd_dinov2"].paper
    assert "no run logged eval/fid" in caplog.text and "eval/fd_dinov2 measure(s) another quantity" in caplog.text


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_naming_the_run_and_the_fix(two_runs, tmp_path, capsys):
    run_a, run_b = map(str, two_runs)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", run_a, str(empty), "--out", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert f"no metrics.jsonl in {empty}" in error and "reglue train" in error
    with pytest.raises(SystemExit) as exit_:
        main(["plot", run_a, "--x", "epochs"])
    assert exit_.value.code == 2 and "invalid choice: 'epochs' (choose from" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown x axis 'epochs'; choose one of step, images, time"):
        plot_run(run_a, x="epochs")
    bare = fake_run(tmp_path / "bare", config=False, wall_time=False)
    assert main(["plot", run_a, str(bare), "--out", str(tmp_path / "x.png"), "--x", "images"]) == 2
    error = capsys.readouterr().err
    assert f"plotting {bare} against images seen needs train.global_batch" in error and "--x step" in error
    assert main(["plot", str(bare), "--x", "time"]) == 2
    error = capsys.readouterr().err
    assert f"{bare / METRICS_FILE} records no wall_time_s" in error and "--x step" in error
    assert main(["plot", run_a, run_b]) == 2
    assert "name its file with --out" in capsys.readouterr().err
    assert main(["plot", run_a, run_a, "--out", str(tmp_path / "x.png")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    (tmp_path / "bare" / "config.yaml").write_text("model: [unclosed")
    assert main(["plot", str(bare)]) == 2
    assert "config.yaml is not readable YAML" in capsys.readouterr().err


def test_a_run_without_a_loss_value_or_a_bad_smoothing_is_refused(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"lr": 1e-4, "loss/total": float("nan")})
    with pytest.raises(ValueError, match="no finite value of a 'loss/...' key"):
        plot_run(tmp_path)
    assert not (tmp_path / plot.PLOT_FILE).exists()
    with pytest.raises(ValueError, match="smoothing"):
        plot_run(tmp_path, smoothing=0)


# ----------------------------------------------------------------------------- panels
def test_moving_average_is_centred_and_exact_at_the_ends():
    np.testing.assert_allclose(moving_average(np.array([0.0, 0.0, 3.0, 0.0, 0.0]), 3), [0, 1, 1, 1, 0])
    np.testing.assert_allclose(moving_average(np.array([3.0, 0.0]), 3), [1.5, 1.5])
    np.testing.assert_allclose(moving_average(np.full(7, 2.0), 4), np.full(7, 2.0))


def test_moving_average_of_a_constant_series_is_exactly_constant():
    assert np.all(moving_average(np.full(120, 2e-3), 20) == 2e-3)


def test_plot_run_of_a_logged_run_draws_losses_lambda_grad_norm_and_lr(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 41):
            logger.log(step, {"loss/total": 1 / step, "loss/latent": 0.5 / step, "lambda/sem": 1.0,
                              "grad_norm": 2.0, "lr": 1e-4 * min(1, step / 10), "images_per_s": 9.0})
    drawn = plot_run(tmp_path, log_y=True)
    assert drawn.path == tmp_path / plot.PLOT_FILE and drawn.title == tmp_path.name
    assert list(drawn.panels) == ["loss/total", "loss/latent", "lambda/sem", "grad_norm", "lr"]
    with Image.open(drawn.path) as image:
        assert image.format == "PNG" and image.size == (3 * 450, 2 * 320)  # 5 panels, 3 columns
    assert plot_run(tmp_path, x="time").xlabel == "training time (s)"


def test_plot_series_draws_named_series_against_any_x_through_the_panel_code(tmp_path, recorded):
    drawn = plot_series({"train": ([1, 2], [0.5, 0.25]), "validation": ([1, 2], [None, None])},
                        tmp_path / "curve.png", title="semantic compressor", panel="MSE", xlabel="epoch", log_y=True)
    with Image.open(drawn.path) as image:
        assert image.format == "PNG"
    axes = recorded["axes"]["MSE"]
    # an all-None series is left out; one line per series, each point marked, none smoothed
    assert list(drawn.panels["MSE"].lines) == ["train"]
    assert (axes.get_xlabel(), axes.get_yscale(), [line.get_marker() for line in axes.lines]) == ("epoch", "log", ["o"])
    with pytest.raises(ValueError, match="no finite value"):
        plot_series({"train": ([1], [float("nan")])}, tmp_path / "none.png", title="t", panel="p")
    assert not (tmp_path / "none.png").exists()
