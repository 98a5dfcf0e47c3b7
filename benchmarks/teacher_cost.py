"""FLOPs of one teacher training image at a recipe's shape, and an epoch's cost on 8 × H100.

    python benchmarks/teacher_cost.py --config configs/teacher/vitb.yaml --resolution 256

Counts, with ``FlopCounterMode`` on meta tensors (no weights, no compute), the real modules of one
step of ``reglue train-vfm`` for one image: the student (:class:`~reglue.training.teacher.SelfDistillation`)
forward and backward on its 2 global crops (one masked for iBOT) and its local crops, and the EMA
teacher's forward on the 2 global crops. The loss terms, the optimiser and the EMA update are
elementwise and left out (under 1 % at ViT-B). An epoch over ImageNet-1k's 1,281,167 images then costs
FLOPs / (8 × 989 TFLOP/s dense bf16 × MFU), printed for several MFUs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from reglue.config import load_settings
from reglue.training.teacher import SelfDistillation, TeacherSettings, crop_sizes

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmarks
from compare import PEAK_TFLOPS, flops_of  # noqa: E402

IMAGENET_TRAIN = 1_281_167
H100_BF16 = PEAK_TFLOPS["H100"] * 1e12  # dense bf16 FLOP/s of one H100 SXM
GPUS = 8
MFUS = (0.3, 0.4, 0.5)


def image_flops(settings: TeacherSettings, resolution: int) -> dict[str, float]:
    """FLOPs of one training image: student forward + backward, teacher forward.

    Meta tensors cannot select the masked patch tokens by value (a boolean index has no shape without
    data), so the count runs with every patch token selected (torch's ``meta_nonzero_assume_all_nonzero``)
    and then takes away the head's cost of the tokens a mean mask leaves out: the mean of ``mask_ratio``
    of one of the two global crops' g² patches is masked.
    """
    global_side, local_side = crop_sizes(resolution, settings)
    tokens = 2 * (global_side // 14) ** 2  # patch tokens of the 2 global crops
    unmasked = tokens - round(sum(settings.mask_ratio) / 2 * tokens / 2)
    with torch.device("meta"):
        student, teacher = SelfDistillation(settings), SelfDistillation(settings)
        global_crops = torch.zeros(2, 3, global_side, global_side)
        local_crops = torch.zeros(settings.local_crops, 3, local_side, local_side)
        masks = torch.ones(2, global_side // 14, global_side // 14, dtype=torch.bool)
        row = torch.zeros(1, settings.embed_dim)

    def student_step() -> None:
        cls, logits, masked = student(global_crops, masks, local_crops)
        (cls.sum() + logits.sum() + masked.sum()).backward()

    def teacher_step() -> None:
        with torch.no_grad():
            teacher(global_crops, masks, mask_input=False)

    with torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True):
        counted = {"student": flops_of(student_step), "teacher": flops_of(teacher_step)}
    head_forward = flops_of(lambda: teacher.head(row))
    head_step = flops_of(lambda: student.head(row.requires_grad_()).sum().backward())
    counted["student"] -= unmasked * head_step
    counted["teacher"] -= unmasked * head_forward
    counted["total"] = counted["student"] + counted["teacher"]
    return counted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/teacher/vitb.yaml")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--images", type=int, default=IMAGENET_TRAIN, help="images per epoch")
    args = parser.parse_args(argv)
    settings = load_settings(TeacherSettings, args.config)
    flops = image_flops(settings, args.resolution)
    epoch = flops["total"] * args.images
    print(f"{args.config} at {args.resolution}²: {flops['total'] / 1e9:.0f} GFLOPs per image "
          f"(student fwd+bwd {flops['student'] / 1e9:.0f}, teacher fwd {flops['teacher'] / 1e9:.0f}); "
          f"epoch of {args.images:,} images {epoch / 1e18:.3f} EFLOPs")
    print("| MFU | epoch on 8 × H100 | " + f"{settings.epochs} epochs |")
    print("|---|---|---|")
    for mfu in MFUS:
        seconds = epoch / (GPUS * H100_BF16 * mfu)
        print(f"| {mfu:.0%} | {seconds / 60:.1f} min | {seconds * settings.epochs / 3600:.1f} h |")


if __name__ == "__main__":
    main()
