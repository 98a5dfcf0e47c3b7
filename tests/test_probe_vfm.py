"""`reglue probe-vfm DATA --vfm-weights ...`: k-NN, linear probe, LDS and CDS of any VFM on held-out images.

A tiny random DINOv2 (embed 32, depth 4) on the built-in colour set at 64² (8 classes × 8 images: 2 of each
held out; VFM input 56², 4×4 patches), one thread. The teacher-folder form is tested in tests/test_teacher.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_processes
from reglue.cli import main
from reglue.data.dataset import PreparedDataset
from reglue.data.split import held_out_split
from reglue.data.synthetic import write_synthetic_dataset
from reglue.encoders.semantics import VFMSpec
from reglue.metrics.spatial import patch_grid, spatial_scores
from reglue.metrics.vfm_probe import MAX_HELD_OUT_FRACTION, PROBE_HELD_OUT_IMAGES

RESOLUTION = 64
RANDOM_VFM = ["--vfm", "dinov2_vitb14_reg", "--vfm-weights", "random", "--vfm-arch",
              "embed_dim=32,depth=4,num_heads=2"]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread
SPEC = VFMSpec("dinov2_vitb14_reg", "random", None, {"embed_dim": 32, "depth": 4, "num_heads": 2})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("probe") / "src", images_per_class=8, size=RESOLUTION,
                                   seed=0)


@pytest.fixture(scope="module")
def data(source):
    data = source.parent / "data"
    assert main(["prepare", str(source), str(data), "--resolution", str(RESOLUTION), "--vae", "pixel", "--quiet"]) == 0
    return data


def test_a_named_vfm_gets_both_accuracies_and_its_spatial_structure_on_held_out_images(data, tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["probe-vfm", str(data), *RANDOM_VFM, "--out", str(out), "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "LDS" in line and "linear probe" in line and str(out) in line
    report = json.loads((out / "report.json").read_text())
    scores = report["scores"]
    assert all(math.isfinite(scores[key]) for key in ("knn", "linear", "lds", "cds")), scores
    counts = (report["num_classes"], report["train_images"], report["held_out_images"], report["grid"])
    assert counts == (8, 48, 16, 4)
    assert report["spatial"]["d_far"] == 2 and "2512.10794" in report["spatial"]["definition"]
    md = (out / "report.md").read_text()
    assert "| LDS | CDS |" in md and f"{scores['lds']:.3f}" in md and "untrained" not in md

    # the LDS / CDS reported are the mean of the held-out images' own, from their patch tokens alone
    images = PreparedDataset(data, fields=("images",))
    labels = torch.tensor([int(images[i]["label"]) for i in range(len(images))])
    _, held_out = held_out_split(labels, PROBE_HELD_OUT_IMAGES, seed=0, max_fraction=MAX_HELD_OUT_FRACTION)
    pixels = torch.stack([images[i]["images"] for i in held_out])
    expected = spatial_scores(patch_grid(SPEC.build(RESOLUTION)(pixels).repa))
    assert scores["lds"] == pytest.approx(expected.lds.double().mean().item(), abs=1e-6)
    assert scores["cds"] == pytest.approx(expected.cds.double().mean().item(), abs=1e-6)


def test_an_image_folder_and_two_processes_give_the_numbers_of_one_process_on_prepared_data(source, data, tmp_path):
    """The same pixels, row for row, so the same split and scores; two processes embed a share each and gather
    them; --seed draws another split."""
    reports = {}
    for name, location, extra in (("prepared", data, []), ("folder", source, ["--resolution", str(RESOLUTION)]),
                                  ("seed", data, ["--seed", "1"])):
        assert main(["probe-vfm", str(location), *RANDOM_VFM, "--out", str(tmp_path / name), *extra]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())["scores"]
    run_processes(["probe-vfm", str(data), *RANDOM_VFM, "--out", str(tmp_path / "two")], processes=2)
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["details"]["processes"] == 2
    for key in ("knn", "linear", "lds", "cds"):
        assert two["scores"][key] == pytest.approx(reports["prepared"][key], abs=1e-6), key
    assert reports["folder"] == reports["prepared"] and reports["seed"] != reports["prepared"]


def test_unlabelled_or_small_data_and_mixed_forms_are_refused_in_one_line(source, data, tmp_path, capsys):
    flat = write_synthetic_dataset(tmp_path / "flat-src", images_per_class=1, size=RESOLUTION, seed=0)
    flat_only = tmp_path / "flat"
    flat_only.mkdir()
    for path in flat.rglob("*.png"):
        path.rename(flat_only / f"{path.parent.name}-{path.name}")
    few = write_synthetic_dataset(tmp_path / "few", images_per_class=3, size=RESOLUTION, seed=0)
    out = ["--out", str(tmp_path / "no")]
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "teacher.json").write_text("{}")
    folder = ["--resolution", str(RESOLUTION)]
    cases = [
        ([str(flat_only), *RANDOM_VFM, *folder, *out], "class(es) of labels; the probes need at least two"),
        ([str(few), *RANDOM_VFM, *folder, *out], "a class needs at least 4 images"),
        ([str(data), *out], "needs --vfm-weights and --out"),
        ([str(data), *RANDOM_VFM], "needs --vfm-weights and --out"),
        ([str(tmp_path), str(data), *RANDOM_VFM, *out], "--vfm* cannot go with TEACHER"),
        ([str(data), *RANDOM_VFM, "--resolution", "128", *out], "prepared at resolution 64"),
        ([str(data), *RANDOM_VFM, "--out", str(teacher)], "whose report.json this report would replace"),
    ]
    for argv, message in cases:
        assert main(["probe-vfm", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "no").exists() and sorted(p.name for p in teacher.iterdir()) == ["teacher.json"]


def test_probing_a_vfm_needs_no_lightly():
    """Only the teacher needs the `teacher` extra: the VFM probe and its command import nothing of lightly."""
    code = ("import sys; sys.modules['lightly'] = None; import reglue.metrics.vfm_probe, reglue.cli.probe_vfm; "
            "assert 'reglue.training.teacher' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0, run.stderr
