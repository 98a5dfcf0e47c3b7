"""``reglue norm-stats``: per-channel mean and std of the VFM's layer maps."""

from __future__ import annotations

import argparse

from reglue.cli.options import (
    add_feature_options,
    add_settings,
    autocast,
    confirm_data_resolution,
    feature_values,
    load_command_settings,
)

NAME = "norm-stats"
HELP = "per-channel mean/std of the VFM layer maps"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="a prepared dataset directory")
    parser.add_argument("--out", default=None, help="output file (default DATA/norm_stats.safetensors; it records "
                        "the VFM for the later steps)")
    add_settings(parser, "the NormStatsSettings (reglue.pipeline)", "num_images=10000")
    parser.add_argument("--num-images", type=int, default=None, help="images in the random subset (default 76,800)")
    add_feature_options(parser, vfm_note="required: --vfm-weights (the VFM is recorded in the stats file for later steps)")


def run(args: argparse.Namespace) -> int:
    from reglue.pipeline import NormStatsSettings, run_norm_stats

    confirm_data_resolution(args)
    settings = load_command_settings(NormStatsSettings, args, {
        "num_images": args.num_images, **feature_values(args)})
    out = run_norm_stats(args.data, settings.spec(required=True), out=args.out, num_images=settings.num_images,
                         batch_size=settings.micro_batch, autocast_dtype=autocast(settings.precision),
                         show_progress=not args.quiet)
    print(f"wrote norm stats to {out}")
    return 0
