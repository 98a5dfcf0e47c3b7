"""``reglue cache-semantics``: store the compressed semantics, the CLS token (and REPA targets) per image."""

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

NAME = "cache-semantics"
HELP = "store compressed semantics, CLS (and REPA targets)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data")
    parser.add_argument("--compressor", default=None, help="compressor .safetensors (REGLUE)")
    parser.add_argument("--pca", default=None, help="PCA .safetensors (ReDi)")
    parser.add_argument("--norm-stats", default=None, help="default DATA/norm_stats.safetensors")
    add_settings(parser, "the CacheSettings (reglue.pipeline)", "repa_targets=true")
    parser.add_argument("--repa-targets", action="store_true", default=None,
                        help="also cache REPA targets (≈386 KiB/image)")
    add_feature_options(parser, vfm_note="optional: defaults to the VFM recorded in the norm stats")


def run(args: argparse.Namespace) -> int:
    from reglue.pipeline import NORM_STATS_FILE, CacheSettings, run_cache_semantics

    confirm_data_resolution(args)
    settings = load_command_settings(CacheSettings, args, {
        "repa_targets": args.repa_targets, **feature_values(args)})
    norm_stats = args.norm_stats or os.path.join(args.data, NORM_STATS_FILE)
    written = run_cache_semantics(args.data, norm_stats, compressor=args.compressor, pca=args.pca,
                                  repa_targets=settings.repa_targets, batch_size=settings.micro_batch,
                                  spec=settings.spec(required=False), autocast_dtype=autocast(settings.precision),
                                  show_progress=not args.quiet)
    print(f"cached semantics in {args.data}: {written} shard(s) written, the rest already cached")
    return 0
