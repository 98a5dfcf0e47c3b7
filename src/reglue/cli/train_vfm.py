"""``reglue train-vfm``: a DINOv2-with-registers teacher trained self-supervised (resumable)."""

from __future__ import annotations

import argparse
import sys

from reglue.cli.options import (
    add_renamed,
    add_resolution,
    add_retired,
    add_settings,
    load_command_settings,
    save_resolved,
)
from reglue.resolution import DEFAULT_RESOLUTION

NAME = "train-vfm"
HELP = "train a small DINOv2-with-registers teacher, self-supervised (resumable)"
DESCRIPTION = ("DINOv2's recipe (DINO + iBOT + KoLeo, EMA teacher, multi-crop; lightly's parts) on a prepared "
               "dataset or straight on an image folder or zip; writes OUT/teacher.pth in the official DINOv2 layout, "
               "a k-NN / linear-probe report and OUT/settings.yaml (the resolved settings). Recipes: "
               "configs/teacher/tiny.yaml (the demo's), configs/teacher/vitb.yaml (DINOv2's ViT-B). Needs the "
               "teacher extra: pip install \"reglue[teacher]\". See docs/teacher.md.")
# flag -> TeacherSettings field (the flags are shortcuts; every field is reachable as KEY=VALUE)
SHORTCUTS = {"embed_dim": "embed_dim", "depth": "depth", "num_heads": "num_heads", "epochs": "epochs",
             "global_batch": "global_batch", "lr": "lr", "local_crops": "local_crops", "seed": "seed",
             "checkpoint_every": "checkpoint_every", "num_workers": "num_workers", "tensorboard": "tensorboard",
             "probe": "probe", "max_held_out_fraction": "max_held_out_fraction"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="a prepared dataset directory (`reglue prepare`), or an image folder or .zip "
                        "read directly: class sub-folders give labels, a flat folder none; unreadable files are "
                        "left out and listed in OUT/skipped.tsv")
    parser.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    add_settings(parser, "the TeacherSettings (reglue.training.teacher; e.g. configs/teacher/vitb.yaml)",
                 "lr=5e-4 head_prototypes=65536")
    add_resolution(parser, None, "image", extra=(
        f"; for a folder or zip, the side its images are ADM-centre-cropped to, as `reglue prepare` crops them "
        f"(default {DEFAULT_RESOLUTION}); a prepared dataset trains at its own R and refuses another"))
    parser.add_argument("--embed-dim", type=int, default=None, help="ViT width")
    parser.add_argument("--depth", type=int, default=None, help="ViT blocks")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training images")
    parser.add_argument("--global-batch", type=int, default=None, help="images per step over all processes")
    add_renamed(parser, "--batch-size", "--global-batch")
    parser.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate")
    parser.add_argument("--local-crops", type=int, default=None, help="local crops per image")
    parser.add_argument("--max-held-out-fraction", type=float, default=None,
                        help="the probe holds out probe_held_out_images labelled images, class-balanced, but at most "
                        "this share of each class (default 0.25)")
    add_retired(parser, "--held-out-fraction", "was replaced by --max-held-out-fraction: the probe holds out "
                "probe_held_out_images (10,000) images, at most that share of each class (docs/teacher.md).")
    parser.add_argument("--no-probe", dest="probe", action="store_false", default=None,
                        help="no k-NN / linear-probe report (unlabelled data); every image is trained on")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between resume states")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers making the crops")
    parser.add_argument("--tensorboard", action="store_true", default=None,
                        help="also write TensorBoard scalars to OUT/tensorboard")
    parser.add_argument("--seed", type=int, default=None, help="initialisation, split, order and crops")
    parser.add_argument("--restart", action="store_true",
                        help="delete the run in OUT and start over (default: rerunning resumes it)")
    add_renamed(parser, "--no-resume", "--restart")
    add_retired(parser, "--resume", "is gone: rerunning train-vfm resumes by default; --restart starts over.")
    add_retired(parser, "--vfm", "is not an option of train-vfm: it trains a DINOv2 ViT with registers "
                "(dinov2_vitb14_reg's layout, sized by --embed-dim/--depth/--num-heads) and no other teacher. CLIP, "
                "SigLIP, MAE, I-JEPA and DINOv3 are used with their released weights: `reglue norm-stats DATA --vfm NAME "
                "--vfm-weights FILE` (docs/vfm.md).")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def settings(args: argparse.Namespace):
    """The run's TeacherSettings: defaults, ``--config``, the flags, ``KEY=VALUE``."""
    from reglue.training.teacher import TeacherSettings

    return load_command_settings(TeacherSettings, args, {field: getattr(args, flag)
                                                         for flag, field in SHORTCUTS.items()})


def run(args: argparse.Namespace) -> int:
    from reglue.distributed import process_state
    from reglue.metrics.probe import REPORT_MD
    from reglue.training.teacher import train_teacher

    resolved = settings(args)
    result = train_teacher(args.data, args.out, resolved, resolution=args.resolution, progress=not args.quiet,
                           resume=not args.restart)
    save_resolved(resolved, result.out_dir)
    if not process_state().is_main_process:
        return 0
    print(f"teacher weights {result.weights} (official DINOv2 layout); use them with --vfm-weights {result.out_dir} "
          "(its teacher.json gives the VFM and its architecture)")
    if result.report is not None:
        print(f"quality ({result.out_dir / REPORT_MD}): {result.report.verdict}; linear probe "
              f"{result.report.trained.linear:.3f} trained vs {result.report.untrained.linear:.3f} untrained")
        if not result.report.passed:
            print(f"reglue train-vfm: warning: the teacher FAILED its quality probe (see {result.out_dir / REPORT_MD}); "
                  "train longer or on more images before using it.", file=sys.stderr)
    return 0
