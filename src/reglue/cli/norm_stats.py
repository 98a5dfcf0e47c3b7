"""``reglue norm-stats``: per-channel mean and std of the VFM's layer maps."""

from __future__ import annotations

import argparse

from reglue.cli.options import (
    add_micro_batch,
    add_precision,
    add_resolution_check,
    add_vfm_options,
    autocast,
    confirm_data_resolution,
    vfm_spec,
)

NAME = "norm-stats"
HELP = "per-channel mean/std of the VFM layer maps"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="a prepared dataset directory")
    parser.add_argument("--out", default=None, help="output file (default DATA/norm_stats.safetensors)")
    parser.add_argument("--num-images", type=int, default=300 * 256, help="images in the random subset")
    add_micro_batch(parser, 64, "VFM")
    add_precision(parser, default="auto", what="the VFM's autocast")
    parser.add_argument("--quiet", action="store_true")
    add_vfm_options(parser, "required: --vfm-weights (the VFM is recorded in the stats file for later steps)")
    add_resolution_check(parser, "DATA was prepared")


def run(args: argparse.Namespace) -> int:
    from reglue.pipeline import run_norm_stats

    confirm_data_resolution(args)
    out = run_norm_stats(args.data, vfm_spec(args, required=True), out=args.out, num_images=args.num_images,
                         batch_size=args.micro_batch, autocast_dtype=autocast(args.precision),
                         show_progress=not args.quiet)
    print(f"wrote norm stats to {out}")
    return 0
