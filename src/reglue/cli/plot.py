"""``reglue plot``: runs' loss and evaluation curves in one PNG."""

from __future__ import annotations

import argparse

from reglue.errors import InputError

NAME = "plot"
HELP = "draw runs' loss and evaluation curves into one PNG"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", default=None, help="the PNG (default RUN/loss_curves.png; required for several runs)")
    parser.add_argument("--x", choices=("step", "images", "time"), default="step",
                        help="x axis: training step, images seen (step x train.global_batch) or training wall time")
    parser.add_argument("--log-x", action="store_true", help="logarithmic x axis")
    parser.add_argument("--log-y", action="store_true",
                        help="logarithmic y axes (panels whose values are all positive)")
    parser.add_argument("--smoothing", type=int, default=20, help="moving-average window in logged points (1: none)")
    parser.add_argument("--paper", action="store_true",
                        help="mark the paper's unguided FID-50K (Table 1's SiT-B/2 presets, REGLUE SiT-XL/2's curve) "
                        "in the eval/fid panel (comparable to eval.metrics=[fid], docs/reproduce.md)")


def run(args: argparse.Namespace) -> int:
    from reglue.training.plot import plot_run, plot_runs

    options = {"x": args.x, "log_x": args.log_x, "log_y": args.log_y, "smoothing": args.smoothing,
               "paper": args.paper}
    if len(args.runs) == 1:
        drawn = plot_run(args.runs[0], args.out, **options)
    elif args.out is None:
        raise InputError(f"{len(args.runs)} runs go into one figure; name its file with --out "
                         "(e.g. --out curves.png).")
    else:
        drawn = plot_runs(args.runs, args.out, **options)
    print(f"wrote {drawn.path}")
    return 0
