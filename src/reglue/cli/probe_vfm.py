"""``reglue probe-vfm``: a finished teacher's k-NN / linear-probe report, again."""

from __future__ import annotations

import argparse

NAME = "probe-vfm"
HELP = "run a finished teacher's k-NN / linear-probe report again"
DESCRIPTION = ("The quality probe of `reglue train-vfm` (docs/teacher.md) on a finished teacher folder, again: on "
               "the data it was trained on (the same held-out split), with its own or other caps. Writes report.json "
               "and report.md.")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("teacher", help="a finished `reglue train-vfm` output folder")
    parser.add_argument("data", help="the dataset or image folder the teacher was trained on")
    parser.add_argument("--out", default=None, help="folder for the report (default: the teacher folder)")
    parser.add_argument("--probe-train-images", type=int, default=None,
                        help="training images the probes fit on at most (default: the teacher's setting, 50,000)")
    parser.add_argument("--probe-held-out-images", type=int, default=None,
                        help="held-out images scored at most (default: the teacher's setting, 10,000)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def run(args: argparse.Namespace) -> int:
    import torch

    from reglue.training.teacher import probe_teacher

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = probe_teacher(args.teacher, args.data, out=args.out, probe_train_images=args.probe_train_images,
                           probe_held_out_images=args.probe_held_out_images, device=device)
    print(f"{report.verdict}; linear probe {report.trained.linear:.3f} trained vs {report.untrained.linear:.3f} "
          f"untrained; report in {args.out or args.teacher}")
    return 0
