"""``reglue prepare``: an image folder or zip → cropped images and VAE moments (resumable)."""

from __future__ import annotations

import argparse

from reglue.cli.options import (
    add_micro_batch,
    add_renamed,
    add_resolution,
    add_settings,
    load_command_settings,
)
from reglue.resolution import DEFAULT_RESOLUTION

NAME = "prepare"
HELP = "image folder or zip → cropped images + VAE moments (resumable)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="ImageFolder tree (class sub-folders), flat folder (unconditional), or a .zip")
    parser.add_argument("dst", help="output dataset directory (rerun the same command to resume)")
    add_settings(parser, "the PrepareSettings (reglue.data.prepare)", "shard_size=500")
    add_resolution(parser, None, "crop", extra=f" (default {DEFAULT_RESOLUTION})")
    parser.add_argument("--vae", default=None,
                        help="local diffusers folder, cached hub id, or 'pixel' (the weight-free demo autoencoder); "
                        "default stabilityai/sd-vae-ft-ema")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="the VAE's compute precision (default fp32; key vae_dtype)")
    add_renamed(parser, "--vae-dtype", "--precision")
    parser.add_argument("--max-images", type=int, default=None, help="use only the first N files (sorted by path)")
    parser.add_argument("--shard-size", type=int, default=None, help="images per shard (default 1000)")
    parser.add_argument("--min-size", type=int, default=None,
                        help="skip images whose short side is below this (default 32)")
    add_micro_batch(parser, 32, "VAE")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from reglue.data.prepare import PrepareSettings, run_prepare
    from reglue.distributed import process_state

    settings = load_command_settings(PrepareSettings, args, {
        "source": str(args.src), "resolution": args.resolution, "vae": args.vae, "max_images": args.max_images,
        "shard_size": args.shard_size, "min_size": args.min_size, "vae_dtype": args.precision})
    summary = run_prepare(settings, args.dst, batch_size=args.micro_batch, show_progress=not args.quiet)
    if not process_state().is_main_process:
        return 0
    print(
        f"prepared {summary.images} images in {summary.shards} shards ({summary.resumed_shards} resumed) "
        f"into {args.dst}; skipped {summary.skipped} unreadable or too-small files (listed in "
        f"{args.dst}/skipped.tsv); ignored {summary.ignored} files without an image extension."
    )
    return 0
