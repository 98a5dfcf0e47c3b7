"""`reglue train-vfm`: a DINOv2-with-registers teacher trained here (tiny models, CPU, one thread).

One copy of the built-in colour set at 64² (8 classes × 48 images; the VFM input is 56², 4×4
tokens), as an image folder and prepared, serves every test. Torch runs on one thread throughout, as the killed subprocess does:
bit-identical resumes need the same float reductions, and the thread count changes them.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import replace

import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from conftest import run_processes
from reglue.cli import main
from reglue.data import source_dataset
from reglue.data.dataset import PreparedDataset
from reglue.data.image_rows import open_images
from reglue.data.prepare import PrepareSettings
from reglue.data.source_dataset import ImageSourceDataset, unreadable_files
from reglue.data.sources import open_source
from reglue.data.synthetic import write_synthetic_dataset
from reglue.encoders.semantics import VFMSpec
from reglue.encoders.vfm import DINOv2ViT, build_dinov2, build_vfm
from reglue.encoders.vfm_weights import dinov2_to_timm, timm_to_dinov2
from reglue.errors import InputError
from reglue.training import run as run_module
from reglue.training.run import RunStopped
from reglue.training.teacher import (
    INSTALL_HINT,
    SKIPPED_FILE,
    TRAIN_STATE,
    VFM_NAME,
    WEIGHTS_FILE,
    SelfDistillation,
    TeacherSettings,
    split_rows,
    teacher_spec,
    train_teacher,
)

RESOLUTION = 64
# the learning test's run: 10 epochs × 9 steps of 32 images, ≈ 20 s on one core. Checked by hand
# with seeds 0, 1, 2: k-NN 0.85 / 0.79 / 0.73 trained vs 0.55 / 0.63 / 0.63 untrained.
LEARNING = TeacherSettings(embed_dim=64, depth=2, num_heads=2, epochs=10, global_batch=32, seed=0)
TINY = ["--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--epochs", "1", "--global-batch", "8",
        "--checkpoint-every", "3", "--no-probe", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # autouse: set before the module's other fixtures train anything
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The image folder: 8 class sub-folders of 48 PNGs."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("teacher") / "src", images_per_class=48, size=RESOLUTION,
                                   seed=0)


@pytest.fixture(scope="module")
def data(source):
    """The folder prepared at 64²."""
    data = source.parent / "data"
    assert main(["prepare", str(source), str(data), "--resolution", str(RESOLUTION), "--vae", "pixel", "--quiet"]) == 0
    return data


@pytest.fixture(scope="module")
def learned(data, tmp_path_factory):
    return train_teacher(data, tmp_path_factory.mktemp("learned"), LEARNING, progress=False)


def test_a_short_cpu_run_learns_features_that_beat_the_untrained_network(learned):
    report = learned.report
    assert report.passed, report.verdict  # k-NN gain >= 0.05 absolute
    assert report.knn_gain > 0.15 and report.trained.linear > report.untrained.linear + 0.1, report
    assert report.held_out_images == 96 and report.train_images == 288
    md = (learned.out_dir / "report.md").read_text()
    assert "PASSED" in md and "untrained (same init)" in md
    assert (learned.out_dir / "loss_curves.png").stat().st_size > 0


def test_the_teacher_loads_as_a_vfm_and_gives_the_trained_modules_features(learned, data):
    images = torch.stack([PreparedDataset(data, fields=("images",))[i]["images"] for i in range(6)])
    official = torch.load(learned.weights, map_location="cpu", weights_only=True)
    assert list(official)[:4] == ["cls_token", "pos_embed", "register_tokens", "mask_token"]
    assert official["pos_embed"].shape == (1, 1 + 37 * 37, 64) and official["mask_token"].shape == (1, 64)

    state = torch.load(learned.out_dir / TRAIN_STATE, map_location="cpu", weights_only=True)
    network = SelfDistillation(LEARNING)
    network.load_state_dict(state["teacher"])
    by_file = build_dinov2(64, 2, 2, weights=learned.weights, layers=(0, 1), resolution=RESOLUTION)
    with torch.no_grad():
        tokens = network.backbone.encode(by_file.preprocess(images))  # (6, 5 + 16, 64), the training forward
    spec = teacher_spec(learned.out_dir)
    assert spec == VFMSpec(VFM_NAME, str(learned.out_dir / WEIGHTS_FILE), None, LEARNING.arch) == learned.spec
    for extractor in (by_file, spec.build(resolution=RESOLUTION),
                      build_vfm(VFM_NAME, weights=learned.weights, resolution=RESOLUTION, **LEARNING.arch)):
        features = extractor(images)
        torch.testing.assert_close(features.cls, tokens[:, 0], atol=1e-6, rtol=0)
        torch.testing.assert_close(features.repa[:, 1:], tokens[:, 5:], atol=1e-6, rtol=0)


def test_a_teacher_folder_names_its_own_vfm_and_architecture(learned, data, tmp_path, capsys):
    """--vfm-weights OUT_DIR (or data.vfm.weights / eval.vfm.weights) needs no --vfm-arch typed again."""
    from reglue.encoders.semantics import load_norm_stats_and_spec
    from reglue.errors import InputError

    folder = str(learned.out_dir)
    assert VFMSpec(weights=folder).resolved() == learned.spec
    assert VFMSpec(weights=folder, arch=dict(LEARNING.arch)).resolved() == learned.spec  # the same, typed again
    assert VFMSpec(weights=folder, layers=(0,)).resolved().layers == (0,)
    with pytest.raises(InputError, match=r"teacher folder .* drop the VFM name and architecture options"):
        VFMSpec(weights=folder, arch={**LEARNING.arch, "depth": 12}).resolved()
    with pytest.raises(InputError, match="but dinov2_vitl14 was asked for"):
        VFMSpec("dinov2_vitl14", folder).resolved()
    plain = VFMSpec(weights=str(learned.weights))
    assert plain.resolved() is plain
    with pytest.raises(FileNotFoundError, match="train a teacher there first"):
        VFMSpec(weights=str(tmp_path)).resolved()

    out = tmp_path / "stats.safetensors"
    assert main(["norm-stats", str(data), "--vfm-weights", folder, "--out", str(out), "--num-images", "8",
                 "--quiet"]) == 0
    assert load_norm_stats_and_spec(out)[1] == learned.spec  # the folder's VFM, recorded for later steps
    assert main(["norm-stats", str(data), "--vfm-weights", folder, "--vfm-arch", "depth=12", "--out",
                 str(tmp_path / "other.safetensors"), "--quiet"]) == 2
    assert "teacher folder" in capsys.readouterr().err


def test_probe_vfm_runs_a_finished_teachers_probe_again(learned, data, tmp_path, capsys):
    from reglue.metrics.probe import ProbeReport, ProbeScores
    from reglue.training.teacher import probe_teacher

    again = tmp_path / "again"
    assert main(["probe-vfm", str(learned.out_dir), str(data), "--out", str(again)]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "LDS" in out
    assert ProbeReport.from_json(json.loads((again / "report.json").read_text())) == learned.report  # the same split
    report = learned.report
    assert report.grid == 4 and "| LDS | CDS |" in (again / "report.md").read_text()
    assert all(isinstance(s.lds, float) and isinstance(s.cds, float) for s in (report.trained, report.untrained))
    # the folder as any VFM: a default teacher holds out the rows `probe-vfm DATA` holds out, so the same scores
    assert main(["probe-vfm", str(data), "--vfm-weights", str(learned.out_dir), "--out", str(tmp_path / "vfm")]) == 0
    assert ProbeScores(**json.loads((tmp_path / "vfm" / "report.json").read_text())["scores"]) == report.trained
    capped = probe_teacher(learned.out_dir, data, out=tmp_path / "capped", probe_train_images=50,
                           probe_held_out_images=20)
    assert (capped.train_images, capped.held_out_images) == (50, 20)

    other = write_synthetic_dataset(tmp_path / "other", images_per_class=2, size=RESOLUTION, seed=1)
    assert main(["probe-vfm", str(learned.out_dir), str(other), "--out", str(tmp_path / "no")]) == 2
    assert "is not the data the teacher" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert main(["probe-vfm", str(tmp_path), str(data)]) == 2
    assert "holds no finished teacher" in capsys.readouterr().err


def test_the_probe_holds_out_a_class_balanced_capped_set_and_trains_on_the_rest(data):
    images = PreparedDataset(data, fields=("images",))  # 8 classes of 48
    labels = torch.tensor([int(images[i]["label"]) for i in range(len(images))])
    train_rows, held_out = split_rows(images, replace(LEARNING, probe_held_out_images=20))
    assert len(held_out) == 20 and labels[held_out].bincount(minlength=8).tolist() == [3] * 4 + [2] * 4
    assert sorted(train_rows + held_out) == list(range(384))
    _, capped = split_rows(images, LEARNING)  # 10,000 asked; at most a quarter of each class: 12 of each 48
    assert labels[capped].bincount().tolist() == [12] * 8
    assert split_rows(images, replace(LEARNING, probe=False)) == (list(range(384)), [])


def test_a_teacher_recorded_with_held_out_fraction_is_refused_clearly(learned, data, tmp_path, capsys):
    """Runs of an older reglue held out a quarter by another split: probing them, or resuming, is refused."""
    from reglue.training.teacher import INFO_FILE, probe_teacher

    old = tmp_path / "old"
    shutil.copytree(learned.out_dir, old)
    info = json.loads((old / INFO_FILE).read_text())
    settings = info["config"]["settings"]
    settings["held_out_fraction"] = settings.pop("max_held_out_fraction")
    (old / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(InputError, match="trained by an older reglue, which held out held_out_fraction 0.25"):
        probe_teacher(old, data)
    with pytest.raises(InputError, match=r"settings.held_out_fraction: was 0.25, now absent.*--restart"):
        train_teacher(data, old, LEARNING, progress=False)


def _official_state_dict(dim=24, depth=2, grid=4, registers=4, swiglu=False, seed=0) -> dict[str, torch.Tensor]:
    """Random tensors under the keys and shapes of an official DINOv2 checkpoint (CLS position slot 0)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "register_tokens": (1, registers, dim),
              "mask_token": (1, dim), "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,)}
    hidden = 64 if swiglu else 4 * dim
    fc1, fc2 = ("w12", "w3") if swiglu else ("fc1", "fc2")
    for i in range(depth):
        shapes.update({f"blocks.{i}.norm1.weight": (dim,), f"blocks.{i}.norm1.bias": (dim,),
                       f"blocks.{i}.attn.qkv.weight": (3 * dim, dim), f"blocks.{i}.attn.qkv.bias": (3 * dim,),
                       f"blocks.{i}.attn.proj.weight": (dim, dim), f"blocks.{i}.attn.proj.bias": (dim,),
                       f"blocks.{i}.ls1.gamma": (dim,), f"blocks.{i}.norm2.weight": (dim,),
                       f"blocks.{i}.norm2.bias": (dim,), f"blocks.{i}.mlp.{fc1}.weight": (hidden * (1 + swiglu), dim),
                       f"blocks.{i}.mlp.{fc1}.bias": (hidden * (1 + swiglu),),
                       f"blocks.{i}.mlp.{fc2}.weight": (dim, hidden), f"blocks.{i}.mlp.{fc2}.bias": (dim,),
                       f"blocks.{i}.ls2.gamma": (dim,)})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    state = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    state["pos_embed"][:, 0] = 0.0
    return state


@pytest.mark.parametrize("swiglu", [False, True])
def test_timm_to_dinov2_inverts_dinov2_to_timm_key_by_key(swiglu):
    official = _official_state_dict(swiglu=swiglu)  # swiglu: D 24 → hidden (64 + 7)//8·8 = 64, ViT-g's rule
    back = timm_to_dinov2(dinov2_to_timm(official), mask_token=official["mask_token"])
    assert list(back) == list(official)
    for key in official:
        assert torch.equal(back[key], official[key]), key
    timm_layout = dinov2_to_timm(official)
    again = dinov2_to_timm(timm_to_dinov2(timm_layout))
    assert list(again) == list(timm_layout) and all(torch.equal(again[k], timm_layout[k]) for k in timm_layout)


def test_a_nonzero_cls_position_slot_is_folded_the_same_way():
    official = _official_state_dict(seed=1)
    official["pos_embed"][:, 0] = torch.randn(official["pos_embed"].shape[-1])
    timm_layout = dinov2_to_timm(official)
    written = timm_to_dinov2(timm_layout)
    assert torch.equal(written["pos_embed"][:, 0], torch.zeros_like(written["pos_embed"][:, 0]))
    assert all(torch.equal(dinov2_to_timm(written)[k], timm_layout[k]) for k in timm_layout)


def test_a_real_backbone_round_trips_through_the_official_layout():
    vit = DINOv2ViT(img_size=518, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_register_tokens=4, swiglu=False)
    state = vit.state_dict()
    official = timm_to_dinov2(state)
    assert official["mask_token"].shape == (1, 32) and not official["mask_token"].any()
    back = dinov2_to_timm(official)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def _weights(run_dir):
    state = torch.load(run_dir / TRAIN_STATE, map_location="cpu", weights_only=True)
    return state, torch.load(run_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)


def test_a_run_killed_mid_way_resumes_bit_identically(data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["train-vfm", str(data), "--out", str(straight), *TINY]) == 0
    command = [sys.executable, "-m", "reglue", "train-vfm", str(data), "--out", str(killed), *TINY]
    process = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not (killed / TRAIN_STATE).exists():
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / WEIGHTS_FILE).exists()

    settings = TeacherSettings(embed_dim=32, depth=1, num_heads=2, epochs=1, global_batch=8, checkpoint_every=3,
                               probe=False)  # what TINY asks for
    result = train_teacher(data, killed, settings, progress=False)
    assert result.trained and 0 < result.resumed_from_step < 48  # no probe: all 384 images trained on, by 8
    (a_state, a_weights), (b_state, b_weights) = _weights(straight), _weights(killed)
    assert a_state["step"] == b_state["step"] == 48
    for part in ("student", "teacher", "dino_loss", "ibot_loss"):
        assert a_state[part].keys() == b_state[part].keys()
        for key in a_state[part]:
            assert torch.equal(a_state[part][key], b_state[part][key]), (part, key)
    for s1, s2 in zip(a_state["optimizer"]["state"].values(), b_state["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert a_weights.keys() == b_weights.keys() and all(torch.equal(a_weights[k], b_weights[k]) for k in a_weights)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 49))  # the replayed steps logged once
    # rerun: the finished run is found, not retrained (checkpoint_every may change)
    assert not train_teacher(data, killed, replace(settings, checkpoint_every=7), progress=False).trained


def test_a_stop_signal_checkpoints_stops_and_resumes_bit_identically(data, tmp_path, monkeypatch):
    """SIGTERM to this process at step 5 (of 12): the run checkpoints there and stops; resumed, it ends
    as the uninterrupted run, each step logged once."""
    settings = TeacherSettings(embed_dim=32, depth=1, num_heads=2, epochs=1, global_batch=32, checkpoint_every=3,
                               probe=False)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_teacher(data, straight, settings, progress=False)
    after_step = run_module.ResumableRun.after_step

    def signalled(self, position, *args, **kwargs):
        if position.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return after_step(self, position, *args, **kwargs)

    monkeypatch.setattr(run_module.ResumableRun, "after_step", signalled)
    with pytest.raises(RunStopped, match="the teacher stopped at step 5 on a stop signal"):
        train_teacher(data, stopped, settings, progress=False)
    monkeypatch.undo()
    assert torch.load(stopped / TRAIN_STATE, weights_only=True)["step"] == 5 and not (stopped / WEIGHTS_FILE).exists()
    assert train_teacher(data, stopped, settings, progress=False).resumed_from_step == 5
    (a_state, a_weights), (b_state, b_weights) = _weights(straight), _weights(stopped)
    for part in ("student", "teacher", "dino_loss", "ibot_loss"):
        assert all(torch.equal(a_state[part][key], b_state[part][key]) for key in a_state[part]), part
    assert all(torch.equal(a_weights[k], b_weights[k]) for k in a_weights)
    steps = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_bad_input_fails_with_one_clear_line(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train-vfm", str(data), "--out", str(out), "--global-batch", "512", "--quiet"]) == 2
    assert "288 training images" in capsys.readouterr().err and not out.exists()

    assert main(["train-vfm", str(data), "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["train-vfm", str(data), "--out", str(out), *TINY, "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "other settings (settings.lr: was 0.002, now 0.01)" in err and "--restart" in err
    assert yaml.safe_load((out / "settings.yaml").read_text())["lr"] == 0.002  # the refused run wrote nothing
    assert main(["train-vfm", str(data), "--out", str(out), *TINY, "--lr", "0.01", "--restart"]) == 0
    assert yaml.safe_load((out / "settings.yaml").read_text())["lr"] == 0.01  # the resolved settings, beside

    for name in ["lightly", *(m for m in sys.modules if m.startswith("lightly."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if lightly were not installed
    monkeypatch.delitem(sys.modules, "reglue.training.teacher")
    capsys.readouterr()
    assert main(["train-vfm", str(data), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and INSTALL_HINT in err and not (tmp_path / "never").exists()


# --------------------------------------------------------------------------------------
# Straight from an image folder or zip
# --------------------------------------------------------------------------------------


def test_a_folder_and_a_zip_give_the_pixels_of_the_dataset_prepared_from_them(source, data, tmp_path):
    prepared = PreparedDataset(data, fields=("images",))
    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(source.rglob("*.png")):
            handle.write(path, "src/" + path.relative_to(source).as_posix())  # a wrapping folder, as zips have
    for images in (ImageSourceDataset(source, RESOLUTION), ImageSourceDataset(archive, RESOLUTION)):
        assert len(images) == len(prepared) == 384 and images.num_classes == prepared.num_classes == 8
        assert images.class_names == prepared.class_names and images.skipped == []
        for i in range(len(prepared)):
            mine, theirs = images[i], prepared[i]
            assert mine.keys() == theirs.keys()
            assert mine["images"].dtype == torch.uint8 and torch.equal(mine["images"], theirs["images"]), i
            assert mine["label"].dtype == torch.int64 and torch.equal(mine["label"], theirs["label"]), i
    # DataLoader workers (forked) read the zip through handles of their own
    loader = DataLoader(images, batch_size=64, num_workers=2)
    stacked = torch.cat([batch["images"] for batch in loader])  # (384, 3, 64, 64)
    assert torch.equal(stacked, torch.stack([prepared[i]["images"] for i in range(len(prepared))]))


def test_a_teacher_trained_on_the_folder_equals_the_one_trained_on_its_prepared_data(source, data, tmp_path):
    settings = TeacherSettings(embed_dim=32, depth=1, num_heads=2, epochs=1, global_batch=32, seed=0)  # 9 steps + probe
    from_data = train_teacher(data, tmp_path / "data", settings, progress=False)
    from_folder = train_teacher(source, tmp_path / "folder", settings, resolution=RESOLUTION, progress=False)
    (a_state, a_weights), (b_state, b_weights) = _weights(tmp_path / "data"), _weights(tmp_path / "folder")
    assert a_state["step"] == b_state["step"] == 9 and a_state["config"] == b_state["config"]
    for part in ("student", "teacher", "dino_loss", "ibot_loss"):
        assert all(torch.equal(a_state[part][k], b_state[part][k]) for k in a_state[part]), part
    assert a_weights.keys() == b_weights.keys() and all(torch.equal(a_weights[k], b_weights[k]) for k in a_weights)
    assert from_data.report.trained == from_folder.report.trained  # the probe reads the same held-out pixels
    assert (tmp_path / "folder" / SKIPPED_FILE).read_text() == "path\treason\n"
    assert not (tmp_path / "data" / SKIPPED_FILE).exists()
    # the same number of files, one of them moved to another class: not the run's data any more
    changed = tmp_path / "changed"
    shutil.copytree(source, changed)
    first_class, second_class = sorted(p for p in changed.iterdir() if p.is_dir())[:2]
    moved = sorted(first_class.glob("*.png"))[0]
    moved.rename(second_class / f"moved-{moved.name}")
    with pytest.raises(ValueError, match="source_sha256"):
        train_teacher(changed, tmp_path / "folder", settings, resolution=RESOLUTION, progress=False)


def folder_with_unreadable_files(source, folder):
    """2 classes × 12 images of ``source`` in ``folder``, with a file that is not an image, an empty one, one
    too small and one without an image extension; the names of the two classes."""
    first, second = sorted(path.name for path in source.iterdir())[:2]
    for name in (first, second):
        (folder / name).mkdir(parents=True)
        for path in sorted((source / name).glob("*.png"))[:12]:
            shutil.copy(path, folder / name / path.name)
    (folder / first / "broken.png").write_bytes(b"not an image at all")
    (folder / first / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(folder / second / "tiny.png")
    (folder / second / "notes.txt").write_text("not listed: no image extension")
    return first, second


def test_unreadable_files_are_left_out_up_front_counted_and_listed(source, tmp_path, caplog, capsys):
    folder = tmp_path / "images"
    first, second = folder_with_unreadable_files(source, folder)

    images = ImageSourceDataset(folder, RESOLUTION)
    assert len(images) == 24 and images.ignored == 1
    reasons = {s["path"]: s["reason"] for s in images.skipped}
    assert set(reasons) == {f"{first}/broken.png", f"{first}/empty.jpg", f"{second}/tiny.png"}
    assert "not an image" in reasons[f"{first}/broken.png"] and "too small" in reasons[f"{second}/tiny.png"]

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="reglue.training.teacher"):  # the command line, end to end
        assert main(["train-vfm", str(folder), "--out", str(out), "--resolution", str(RESOLUTION), *TINY]) == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "24 images cropped to 64² on access, 2 classes; skipped 3 unreadable or too-small file(s)" in logged
    assert f"{first}/broken.png (not an image" in logged and "ignored 1 file(s)" in logged and str(out / SKIPPED_FILE) in logged
    listed = (out / SKIPPED_FILE).read_text().splitlines()
    assert listed[0] == "path\treason" and {line.split("\t")[0] for line in listed[1:]} == set(reasons)
    info = json.loads((out / "teacher.json").read_text())
    assert info["resolution"] == RESOLUTION and info["config"]["data"]["images"] == 24
    assert "--vfm-weights" in capsys.readouterr().out

    for path in folder.rglob("*.png"):
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 27 image files"):
        ImageSourceDataset(folder, RESOLUTION)


def test_each_process_decodes_its_share_of_a_folder_once_and_all_get_the_same_rows(source, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder_with_unreadable_files(source, folder)
    alone = ImageSourceDataset(folder, RESOLUTION)
    listed = open_source(folder)
    decoded = collections.Counter()
    real_read_crop = source_dataset.read_crop

    def counting(source, item, *args):
        decoded[item.path] += 1
        return real_read_crop(source, item, *args)

    monkeypatch.setattr(source_dataset, "read_crop", counting)
    world = 3
    shares = [unreadable_files(listed, range(rank, len(listed.items), world), RESOLUTION)
              for rank in range(world)]
    decoded.clear()
    for rank in range(world):  # each process of three, given the others' findings by its gather
        others = [found for other in range(world) if other != rank for found in shares[other]]
        images = ImageSourceDataset(folder, RESOLUTION, rank=rank, world_size=world,
                                    gather=lambda mine: others + mine)
        assert images.items == alone.items and images.skipped == alone.skipped and len(images.skipped) == 3
    assert decoded == {item.path: 1 for item in listed.items}  # over the three processes, every file once


def test_two_processes_skip_and_report_what_one_process_does(source, tmp_path):
    folder = tmp_path / "images"
    folder_with_unreadable_files(source, folder)
    args = ["--resolution", str(RESOLUTION), *TINY]
    assert main(["train-vfm", str(folder), "--out", str(tmp_path / "one"), *args]) == 0
    run_processes(["train-vfm", str(folder), "--out", str(tmp_path / "two"), *args], processes=2)
    assert (tmp_path / "two" / SKIPPED_FILE).read_text() == (tmp_path / "one" / SKIPPED_FILE).read_text()
    one, two = (json.loads((tmp_path / run / "teacher.json").read_text())["config"]["data"]
                for run in ("one", "two"))
    assert one == two and one["images"] == 24


def test_the_resolution_of_prepared_data_is_fixed_and_a_folder_defaults_to_prepares(source, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train-vfm", str(data), "--out", str(out), "--resolution", "128", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prepared at resolution 64" in err and "fixed" in err
    assert f"reglue train-vfm {source.resolve()} --resolution 128" in err and not out.exists()
    opened = [open_images(data, resolution, command="train-vfm")[1] for resolution in (RESOLUTION, None)]
    assert opened == [RESOLUTION, RESOLUTION]

    images, resolution = open_images(source, command="train-vfm")  # no --resolution: prepare's default
    assert resolution == images.resolution == PrepareSettings(source="a").resolution == 256
    assert images[0]["images"].shape == (3, 256, 256)
    with pytest.raises(SystemExit):  # argparse: a usage error naming the supported sides
        main(["train-vfm", str(source), "--out", str(out), "--resolution", "100"])
    assert "multiple of 64" in capsys.readouterr().err
