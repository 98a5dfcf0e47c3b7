"""``reglue fit-pca``: ReDi's PCA of the z-scored VFM maps."""

from __future__ import annotations

import argparse
import os

from reglue.cli.options import (
    add_micro_batch,
    add_precision,
    add_resolution_check,
    add_vfm_options,
    autocast,
    confirm_data_resolution,
    vfm_spec,
)

NAME = "fit-pca"
HELP = "ReDi's PCA of the z-scored VFM maps"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data")
    parser.add_argument("--norm-stats", default=None, help="default DATA/norm_stats.safetensors")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default=None, help="default DATA/pca.safetensors")
    parser.add_argument("--num-images", type=int, default=10_000)
    add_micro_batch(parser, 64, "VFM")
    add_precision(parser, default="auto", what="the VFM's autocast")
    parser.add_argument("--quiet", action="store_true")
    add_vfm_options(parser, "optional: defaults to the VFM recorded in the norm stats")
    add_resolution_check(parser, "DATA was prepared")


def run(args: argparse.Namespace) -> int:
    from reglue.pipeline import NORM_STATS_FILE, run_fit_pca

    confirm_data_resolution(args)
    norm_stats = args.norm_stats or os.path.join(args.data, NORM_STATS_FILE)
    out = run_fit_pca(args.data, norm_stats, rank=args.rank, out=args.out, num_images=args.num_images,
                      batch_size=args.micro_batch, spec=vfm_spec(args, required=False),
                      autocast_dtype=autocast(args.precision), show_progress=not args.quiet)
    print(f"wrote PCA (rank {args.rank}) to {out}")
    return 0
