"""`reglue train-vfm`: a DINOv2-with-registers teacher trained here (tiny models, CPU, one thread).

One prepared copy of the built-in colour set at 64² (8 classes × 48 images; the VFM input is 56²,
4×4 tokens) serves every test. Torch runs on one thread throughout, as the killed subprocess does:
bit-identical resumes need the same float reductions, and the thread count changes them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from reglue.cli import main
from reglue.data.dataset import PreparedDataset
from reglue.data.synthetic import write_synthetic_dataset
from reglue.encoders.semantics import VFMSpec
from reglue.encoders.vfm import DINOv2ViT, build_dinov2, build_vfm, dinov2_to_timm, timm_to_dinov2
from reglue.training.teacher import (
    INSTALL_HINT,
    TRAIN_STATE,
    VFM_NAME,
    WEIGHTS_FILE,
    SelfDistillation,
    TeacherSettings,
    teacher_spec,
    train_teacher,
)

RESOLUTION = 64
# the learning test's run: 10 epochs × 9 steps of 32 images, ≈ 20 s on one core. Checked by hand
# with seeds 0, 1, 2: k-NN 0.85 / 0.79 / 0.73 trained vs 0.55 / 0.63 / 0.63 untrained.
LEARNING = TeacherSettings(embed_dim=64, depth=2, num_heads=2, epochs=10, global_batch=32, seed=0)
TINY = ["--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--epochs", "1", "--batch-size", "8",
        "--checkpoint-every", "3", "--no-probe", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # autouse: set before the module's other fixtures train anything
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    write_synthetic_dataset(root / "src", images_per_class=48, size=RESOLUTION, seed=0)
    assert main(["prepare", str(root / "src"), str(root / "data"), "--resolution", str(RESOLUTION), "--vae", "pixel",
                 "--quiet"]) == 0
    return root / "data"


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


def test_bad_input_fails_with_one_clear_line(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train-vfm", str(data), "--out", str(out), "--batch-size", "512", "--quiet"]) == 2
    assert "288 training images" in capsys.readouterr().err and not out.exists()

    assert main(["train-vfm", str(data), "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["train-vfm", str(data), "--out", str(out), *TINY, "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "other settings (settings.lr: was 0.002, now 0.01)" in err and "--no-resume" in err
    assert main(["train-vfm", str(data), "--out", str(out), *TINY, "--lr", "0.01", "--no-resume"]) == 0

    for name in ["lightly", *(m for m in sys.modules if m.startswith("lightly."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if lightly were not installed
    monkeypatch.delitem(sys.modules, "reglue.training.teacher")
    capsys.readouterr()
    assert main(["train-vfm", str(data), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and INSTALL_HINT in err and not (tmp_path / "never").exists()
