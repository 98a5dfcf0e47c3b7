"""``reglue fit-pca``: ReDi's PCA of the z-scored VFM maps."""

from __future__ import annotations

import argparse
import os

from reglue.cli.options import (
    add_feature_options,
    add_settings,
    autocast,
    confirm_data_resolution,
    feature_values,
    load_command_settings,
)

NAME = "fit-pca"
HELP = "ReDi's PCA of the z-scored VFM maps"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data")
    parser.add_argument("--norm-stats", default=None, help="default DATA/norm_stats.safetensors")
    parser.add_argument("--out", default=None, help="default DATA/pca.safetensors")
    add_settings(parser, "the PCASettings (reglue.pipeline)", "rank=8 num_images=20000")
    parser.add_argument("--rank", type=int, default=None, help="default 8")
    parser.add_argument("--num-images", type=int, default=None, help="default 10,000")
    add_feature_options(parser, vfm_note="optional: defaults to the VFM recorded in the norm stats")


def run(args: argparse.Namespace) -> int:
    from reglue.pipeline import NORM_STATS_FILE, PCASettings, run_fit_pca

    confirm_data_resolution(args)
    settings = load_command_settings(PCASettings, args, {
        "rank": args.rank, "num_images": args.num_images, **feature_values(args)})
    norm_stats = args.norm_stats or os.path.join(args.data, NORM_STATS_FILE)
    out = run_fit_pca(args.data, norm_stats, rank=settings.rank, out=args.out, num_images=settings.num_images,
                      batch_size=settings.micro_batch, spec=settings.spec(required=False),
                      autocast_dtype=autocast(settings.precision), show_progress=not args.quiet)
    print(f"wrote PCA (rank {settings.rank}) to {out}")
    return 0
