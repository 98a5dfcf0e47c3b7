"""``reglue demo``: the whole chain offline on synthetic data with tiny models (minutes on a CPU)."""

from __future__ import annotations

import argparse

from reglue.cli.options import add_resolution, add_settings, load_command_settings

NAME = "demo"
HELP = "the whole chain offline on synthetic data with tiny models (minutes on a CPU)"
DESCRIPTION = ("Synthetic data → prepare (pixel autoencoder) → a DINOv2 teacher trained here (train-vfm) → norm "
               "stats, compressor, semantics → train (each preset × seed, evaluated during training) → class grids "
               "→ report.md. Rerun the same command to resume. See docs/demo.md.")
DEMO_RESOLUTION = 128  # reglue.demo.DemoSettings.resolution (a test keeps the two equal)
# flag -> DemoSettings field (the flags are shortcuts; every field is reachable as KEY=VALUE)
SHORTCUTS = {"seeds": "seeds", "steps": "steps", "data": "data", "images_per_class": "images_per_class",
             "sample_steps": "sample_steps", "seed": "seed", "resolution": "resolution"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reglue-demo", help="output folder (new, empty, or an earlier demo to resume)")
    add_settings(parser, "the DemoSettings (reglue.demo)", "teacher_epochs=20")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--preset", dest="presets", default=None, choices=("reglue", "reg", "repa", "redi", "sit"),
                       help="train one preset (default reglue)")
    which.add_argument("--presets", default=None, help="comma-separated presets to compare, e.g. sit,repa")
    parser.add_argument("--compare", action="store_true",
                        help="compare presets at equal budget (default all five, 3 seeds each; ≈ 16 min on 2 cores)")
    parser.add_argument("--quick", action="store_true", help="the same protocol at about a third of the cost: at "
                        "most 400 steps, 2 seeds and 32 evaluation samples unless given (≈ 5 min)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="training seeds per preset (default 1, 3 with --compare)")
    parser.add_argument("--steps", type=int, help="training steps per run (default 1500; 400 with --quick)")
    parser.add_argument("--data", choices=("colours", "shapes"), help="the synthetic set: classes by colour, shape "
                        "and texture (default) or by shape and layout only")
    parser.add_argument("--images-per-class", type=int, help="synthetic images per class (default 40)")
    parser.add_argument("--sample-steps", type=int, help="sampler steps for the grids and the evaluations "
                        "(default 25)")
    parser.add_argument("--seed", type=int, help="seed of the data, teacher and evaluations, and the first training "
                        "seed (default 0)")
    add_resolution(parser, None, "image", extra=f" (default {DEMO_RESOLUTION})")
    parser.add_argument("--random-vfm", action="store_true",
                        help="a random, untrained VFM instead of the teacher trained here (plumbing checks only)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars for the data stages (training keeps its bar)")


def run(args: argparse.Namespace) -> int:
    import time

    from reglue.demo import ALL_PRESETS, DemoSettings, quick, run_demo

    start = time.perf_counter()
    presets = tuple(args.presets.split(",")) if args.presets else (ALL_PRESETS if args.compare else ("reglue",))
    base = DemoSettings(presets=presets, seeds=3 if args.compare else 1,
                        teacher="random" if args.random_vfm else "trained")
    # --quick shrinks the defaults; a file, a flag or a KEY=VALUE given wins
    settings = load_command_settings(DemoSettings, args, {field: getattr(args, flag)
                                                          for flag, field in SHORTCUTS.items()},
                                     base=quick(base) if args.quick else base)
    result = run_demo(args.out, settings, progress=not args.quiet)
    print(f"demo finished in {time.perf_counter() - start:.0f} s. Outputs in {result.out}: report {result.report}, "
          f"results {result.results}, grids {result.grid}, curves {result.curves}")
    return 0
