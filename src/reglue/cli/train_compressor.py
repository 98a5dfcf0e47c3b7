"""``reglue train-compressor``: the semantic compressor on a prepared dataset's VFM features (resumable)."""

from __future__ import annotations

import argparse
import os

from reglue.cli.options import (
    add_precision,
    add_resolution_check,
    add_settings,
    add_vfm_options,
    confirm_data_resolution,
    load_command_settings,
    save_resolved,
    vfm_values,
)

NAME = "train-compressor"
HELP = "train the semantic compressor (resumable)"
# flag -> CompressorSettings field (the flags are shortcuts; every field is reachable as KEY=VALUE)
SHORTCUTS = {"epochs": "epochs", "global_batch": "global_batch", "lr": "lr", "val_fraction": "val_fraction",
             "num_workers": "num_workers", "checkpoint_every": "checkpoint_every", "seed": "seed",
             "precision": "vfm_precision"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data")
    parser.add_argument("--out", default=None, help="output folder (default DATA/compressor); settings.yaml there "
                        "records the resolved settings")
    add_settings(parser, "the CompressorSettings (reglue.training.compressor)", "epochs=40 global_batch=2048")
    parser.add_argument("--norm-stats", default=None, help="default DATA/norm_stats.safetensors")
    parser.add_argument("--epochs", type=int, default=None, help="default 25")
    parser.add_argument("--global-batch", type=int, default=None, help="images per step over all processes "
                        "(default 4096)")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-3")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val", default=None, help="a prepared dataset for validation")
    split.add_argument("--val-fraction", type=float, default=None, help="hold out this share of DATA instead")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="steps between resume checkpoints (default 100)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--restart", action="store_true",
                        help="discard an earlier run in the output folder (default: rerunning resumes it)")
    add_precision(parser, default=None, what="the frozen VFM's autocast (default auto)")
    parser.add_argument("--quiet", action="store_true")
    add_vfm_options(parser, "optional: defaults to the VFM recorded in the norm stats")
    add_resolution_check(parser, "DATA was prepared")


def run(args: argparse.Namespace) -> int:
    from reglue.pipeline import COMPRESSOR_DIR, NORM_STATS_FILE, run_train_compressor
    from reglue.training.compressor import CompressorSettings

    confirm_data_resolution(args)
    settings = load_command_settings(CompressorSettings, args, {
        **{field: getattr(args, flag) for flag, field in SHORTCUTS.items()}, **vfm_values(args)})
    norm_stats = args.norm_stats or os.path.join(args.data, NORM_STATS_FILE)
    out = args.out or os.path.join(args.data, COMPRESSOR_DIR)
    run = run_train_compressor(args.data, norm_stats, out, settings=settings, val_data=args.val, resume=not args.restart, progress=not args.quiet)
    save_resolved(settings, out)
    print(f"compressor: best epoch {run.best_epoch}; weights {run.best_path} (best) and {run.final_path} (final)")
    return 0
