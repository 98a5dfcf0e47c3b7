"""``reglue compare``: the presets trained at equal budget over seeds on a prepared dataset, compared."""

from __future__ import annotations

import argparse

from reglue.cli.options import add_settings, add_vfm_options, load_command_settings, vfm_values

NAME = "compare"
HELP = "train presets × seeds at equal budget on prepared data and compare them (report.md, results.json)"
DESCRIPTION = ("The demo's comparison on any prepared dataset: data copies and semantic caches (norm stats, compressor, "
               "PCA) built once, each preset × seed trained with one shared run config and evaluated during training, "
               "class grids, and report.md with mean ± std over seeds and Welch's t. Rerun the same command to resume. "
               "See docs/compare.md.")
# flag -> CompareSettings key (the flags are shortcuts; every field is reachable as KEY=VALUE)
SHORTCUTS = {"seeds": "seeds", "seed": "seed", "steps": "run.train.max_steps", "model": "run.model.name",
             "global_batch": "run.train.global_batch", "lr": "run.optim.lr", "eval_every": "eval.every",
             "eval_samples": "eval.num_samples"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="a `reglue prepare` folder (any resolution); nothing is written into it")
    parser.add_argument("--out", required=True, help="output folder (new, empty, or an earlier comparison to resume)")
    add_settings(parser, "the CompareSettings (reglue.compare; run.* is a run config shared by every preset)",
                 "run.train.max_steps=20000")
    parser.add_argument("--presets", default=None, help="comma-separated presets (default sit,repa,redi,reg,reglue)")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds per preset (default 3)")
    parser.add_argument("--seed", type=int, default=None, help="the first training seed; also seeds the compressor, "
                        "evaluations and grids (default 0)")
    parser.add_argument("--model", default=None, help="SiT size of every run, e.g. SiT-B/2 (run.model.name)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run (run.train.max_steps)")
    parser.add_argument("--global-batch", type=int, default=None, help="batch of every run (run.train.global_batch)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of every run (run.optim.lr)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default a quarter "
                        "of the steps)")
    parser.add_argument("--eval-samples", type=int, default=None, help="samples per evaluation (eval.num_samples, "
                        "default 10,000)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars for the cache stages")
    add_vfm_options(parser, "the VFM behind every semantic cache and (unless eval.vfm is set) the evaluation space; "
                    "needed by every preset but sit")


def run(args: argparse.Namespace) -> int:
    import time

    from reglue.compare import CompareSettings, run_compare

    start = time.perf_counter()
    shortcuts = {key: getattr(args, flag) for flag, key in SHORTCUTS.items()}
    shortcuts["presets"] = args.presets.split(",") if args.presets else None
    vfm = {key: value for key, value in vfm_values(args).items() if value is not None}
    settings = load_command_settings(CompareSettings, args, {**shortcuts, **vfm})
    result = run_compare(args.data, args.out, settings, progress=not args.quiet)
    print(f"compare finished in {time.perf_counter() - start:.0f} s. Report {result.report}, results {result.results}")
    return 0
