"""The teacher's recipes: configs/teacher/*.yaml resolve, through `reglue train-vfm --config`, to the
settings they and docs/teacher.md state; DINOv2's ViT-B values are checked field by field."""

from __future__ import annotations

import re
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lightly")

from reglue.cli import parse_args  # noqa: E402
from reglue.cli import train_vfm as train_vfm_command  # noqa: E402
from reglue.config import ConfigError, load_settings, settings_dict  # noqa: E402
from reglue.errors import InputError  # noqa: E402
from reglue.training.teacher import TeacherSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# DINOv2's ViT-B/14 values (facebookresearch/dinov2, dinov2/configs/ssl_default_config.yaml, vit_base),
# written here independently of the recipe file and the docs so that a change to either is caught.
DINOV2_VITB = {
    "embed_dim": 768, "depth": 12, "num_heads": 12, "layerscale_init": 1e-5, "drop_path_rate": 0.3,
    "epochs": 100, "global_batch": 1024, "lr": 4e-3, "lr_scaling": "sqrt_wrt_1024", "min_lr": 1e-6,
    "warmup_fraction": 0.1, "weight_decay": 0.04, "weight_decay_end": 0.4, "clip_grad": 3.0,
    "head_hidden_dim": 2048, "head_bottleneck_dim": 256, "head_prototypes": 65536, "student_temp": 0.1,
    "teacher_temp": 0.07, "warmup_teacher_temp": 0.04, "teacher_temp_warmup_fraction": 0.3,
    "center_momentum": 0.9, "momentum_start": 0.992, "ibot_weight": 1.0, "koleo_weight": 0.1,
    "freeze_last_layer_fraction": 0.01, "local_crops": 8, "local_crop_size": 98,
    "global_crop_scale": (0.32, 1.0), "local_crop_scale": (0.05, 0.32), "mask_ratio": (0.1, 0.5),
    "precision": "auto",
}
# settings that are not DINOv2's (the run's own): the recipe keeps TeacherSettings' values
RUN_OWN = {"seed", "probe", "probe_train_images", "probe_held_out_images", "checkpoint_every", "num_workers",
           "tensorboard", "max_held_out_fraction"}


def resolved(*argv: str) -> TeacherSettings:
    args = parse_args(["train-vfm", "data", "--out", "out", *argv])
    return train_vfm_command.settings(args)


def recipe_table() -> dict[str, object]:
    """The `| `field` | value | DINOv2 key |` rows of docs/teacher.md's ViT-B table, values parsed as YAML."""
    text = (REPO / "docs" / "teacher.md").read_text().split("### The ViT-B recipe", 1)[1]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", text, flags=re.MULTILINE)
    return {name: yaml.safe_load(value.strip()) for name, value in rows}


def test_the_vitb_recipe_resolves_every_dinov2_setting_field_by_field():
    settings = resolved("--config", str(REPO / "configs" / "teacher" / "vitb.yaml"))
    for name, value in DINOV2_VITB.items():
        assert getattr(settings, name) == pytest.approx(value), name
    assert settings.peak_lr == pytest.approx(4e-3)  # batch 1024: the base lr itself
    covered = set(DINOV2_VITB) | RUN_OWN
    assert {f.name for f in fields(TeacherSettings)} <= covered, "a new setting needs its DINOv2 value here"


def test_the_docs_table_states_the_recipe():
    table = recipe_table()
    assert set(table) == set(DINOV2_VITB)
    for name, value in table.items():
        expected = DINOV2_VITB[name]
        assert (list(expected) if isinstance(expected, tuple) else expected) == pytest.approx(value), name


def test_the_tiny_recipe_is_the_demos_teacher():
    assert resolved("--config", str(REPO / "configs" / "teacher" / "tiny.yaml")) == TeacherSettings()


def test_flags_and_key_values_win_over_the_file_in_that_order():
    vitb = str(REPO / "configs" / "teacher" / "vitb.yaml")
    settings = resolved("--config", vitb, "--global-batch", "256", "--epochs", "3", "head_prototypes=4096")
    assert (settings.global_batch, settings.epochs, settings.head_prototypes) == (256, 3, 4096)
    assert settings.peak_lr == pytest.approx(4e-3 * 0.5)  # sqrt(256 / 1024)
    assert resolved("--config", vitb, "--epochs", "3", "epochs=5").epochs == 5


def test_every_field_is_reachable_and_a_saved_settings_file_loads_back(tmp_path):
    settings = resolved("global_crop_scale=[0.4, 1.0]", "lr_scaling=linear_wrt_1024", "precision=bf16")
    assert settings.global_crop_scale == (0.4, 1.0) and settings.precision == "bf16"
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings_dict(settings)))
    assert load_settings(TeacherSettings, path) == settings


@pytest.mark.parametrize("override, message", [
    ("no_such_setting=1", r"unknown config key\(s\) \['no_such_setting'\]"),
    ("mask_ratio=[0.1]", r"mask_ratio: expected 2 values"),
    ("lr_scaling=cubic", r"lr_scaling must be one of"),
    ("precision=half", r"precision must be one of"),
])
def test_a_bad_setting_is_refused_naming_it(override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        resolved(override)


def test_the_recipe_settings_reach_the_training(tmp_path):
    """drop_path_rate builds stochastic depth, lr_scaling sets the peak, weight_decay_end schedules the
    decay of the >= 2-D parameters, precision sets the step's autocast."""
    from accelerate import Accelerator
    from torch.utils.data import default_collate

    from reglue.data.source_dataset import ImageSourceDataset
    from reglue.data.synthetic import write_synthetic_dataset
    from reglue.training.run import ResumableRun
    from reglue.training.teacher import CropViews, _TeacherTrainer, build_backbone

    small = dict(embed_dim=32, depth=2, num_heads=2, global_batch=4, epochs=2, head_prototypes=16,
                 head_hidden_dim=16, head_bottleneck_dim=8, local_crops=1)
    assert all(block.drop_path1.drop_prob == 0.3 for block in build_backbone(
        TeacherSettings(**small, drop_path_rate=0.3)).vit.blocks)
    settings = TeacherSettings(**small, lr=1e-3, lr_scaling="linear_wrt_1024", weight_decay=0.04,
                               weight_decay_end=0.4, warmup_fraction=0.0, precision="bf16")
    images = ImageSourceDataset(write_synthetic_dataset(tmp_path / "src", images_per_class=2, size=64,
                                                        num_classes=2), resolution=64)
    def trainer_of(settings, out):
        run = ResumableRun(tmp_path / out, {}, Accelerator(cpu=True), name="the teacher", fix="")
        return _TeacherTrainer(run, images, list(range(len(images))), settings, 64)

    trainer = trainer_of(settings, "out")
    first, last = trainer.schedules(0), trainer.schedules(trainer.total_steps - 1)
    assert first["lr"] == pytest.approx(1e-3 * 4 / 1024)  # linear rule at batch 4
    assert first["weight_decay"] == pytest.approx(0.04) and last["weight_decay"] == pytest.approx(0.4)
    assert "weight_decay" not in trainer_of(TeacherSettings(**small), "o2").schedules(0)
    seen = []
    trainer.student.backbone.vit.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    views = CropViews(images, settings, 64)
    terms = trainer.losses(default_collate([views[(0, 0)], views[(0, 1)]]), teacher_temp=0.04)
    assert seen and set(seen) == {torch.bfloat16} and terms["total"].dtype == torch.float32
    with pytest.raises(InputError, match="fp16 would need a loss scaler"):
        replace(settings, precision="fp16")
