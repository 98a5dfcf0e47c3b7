"""``reglue train``: train a preset (sit / repa / redi / reg / reglue) from a YAML config."""

from __future__ import annotations

import argparse

from reglue.cli.options import add_resolution_check, add_settings

NAME = "train"
HELP = "train a preset (sit/repa/redi/reg/reglue) from a YAML config"


def configure(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "the run config (reglue.config.RunConfig, e.g. configs/reglue_sit_b2.yaml)",
                 "data.dir=data/in256 train.global_batch=64")
    parser.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint) or a checkpoint path")
    parser.add_argument("--from-authors", default=None, metavar="PT",
                        help="start from the authors' checkpoint: its weights, and its args as config defaults")
    add_resolution_check(parser, "data.dir was prepared")  # = data.resolution=R


def run(args: argparse.Namespace) -> int:
    from reglue.config import load_config
    from reglue.distributed import process_state
    from reglue.training.trainer import train

    adopted = []
    if args.from_authors:
        from reglue.models.official import config_values_from_authors_args, load_authors_checkpoint

        checkpoint_args = load_authors_checkpoint(args.from_authors).get("args") or {}
        values = [f"{k}={v}" for k, v in config_values_from_authors_args(checkpoint_args).items()]
        print(f"adopting from the authors' checkpoint: {' '.join(values) or 'no recognised args'}")
        adopted = [*values, f"model.init_from={args.from_authors}"]
    check = [f"data.resolution={args.resolution}"] if args.resolution is not None else []
    config = load_config(args.config, [*adopted, *check, *args.overrides])  # your KEY=VALUE overrides win
    result = train(config, resume=args.resume)
    if not process_state().is_main_process:
        return 0
    state = "stopped early (resume with --resume auto)" if result.stopped_early else "finished"
    print(f"training {state} at step {result.step} in {result.run_dir}; "
          f"{result.skipped_updates} non-finite update(s) skipped; EMA weights in {result.run_dir / 'ema'}")
    return 0
