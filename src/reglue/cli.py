"""The ``reglue`` command: argument parsing only; the work lives in the library modules.

Errors the user can fix — everything reglue refuses on purpose (:mod:`reglue.errors`: bad input,
mismatched settings, damaged files, a missing optional package), file-system errors (a missing path,
a full disk, no permission) and running out of memory — are printed as one line and exit with
status 2; set ``REGLUE_DEBUG=1`` to see the traceback instead. Anything else is a bug: its traceback
is shown and the status is 1.

Each command imports the library modules it needs inside its function: ``reglue --help`` and a
mistyped option then answer at once instead of first loading torch, timm and diffusers. This is
the one place the package defers imports (tests/test_layers.py keeps it so).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from reglue import __version__
from reglue.errors import InputError, ReglueError
from reglue.resolution import DEFAULT_RESOLUTION, check_resolution, confirm_resolution

AUTOCAST_CHOICES = ("auto", "none", "bf16", "fp16")
DEMO_RESOLUTION = 128  # reglue.demo.DemoSettings.resolution (a test keeps the two equal)


# ----------------------------------------------------------------------------- shared options
def _resolution(text: str) -> int:
    """argparse type of --resolution: a supported side (reglue.resolution), else a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be an integer, found {text!r}.") from None
    try:
        return check_resolution(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_resolution(parser: argparse.ArgumentParser, default: int, what: str) -> None:
    parser.add_argument("--resolution", type=_resolution, default=default, metavar="R",
                        help=f"{what} side R: a multiple of 64 from 64 to 512 (default {default}); latents R/8, "
                        "SiT tokens and VFM patches (R/16)²; later steps read it from the data's manifest")


def _add_resolution_check(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--resolution", type=_resolution, default=None, metavar="R",
                        help=f"optional check: the side {what} is at, else refused (default: read from it; "
                        "R is chosen once, by `reglue prepare --resolution R`)")


def _confirm_data_resolution(args: argparse.Namespace) -> None:
    """Refuse a --resolution that is not the one DATA was prepared at (before any work)."""
    if args.resolution is not None:
        from reglue.data.store import prepared_resolution

        prepared_resolution(args.data, args.resolution)


def _confirm_model_resolution(args: argparse.Namespace, model) -> None:
    """Refuse a --resolution that is not the one the model was trained at (before any work)."""
    confirm_resolution(args.resolution, model.config.image_size, where=f"the model {args.ckpt}", remedy=(
        "A model samples at the resolution it was trained at: leave out --resolution, or pass a model trained "
        f"at {args.resolution}²."))


def _add_vfm_options(parser: argparse.ArgumentParser, required_note: str) -> None:
    group = parser.add_argument_group("vision foundation model", required_note)
    group.add_argument("--vfm", default=None, help="registry name (default dinov2_vitb14_reg)")
    group.add_argument("--vfm-weights", default=None,
                       help="official DINOv2 .pth or timm .safetensors file, a `reglue train-vfm` folder (its "
                            "teacher.json gives name and architecture), or 'random' for a weight-free demo")
    group.add_argument("--vfm-layers", default=None, help="0-based blocks, e.g. 8,9,10,11 (default: last four)")
    group.add_argument("--vfm-arch", default=None,
                       help="architecture overrides for small models, e.g. embed_dim=64,depth=12,num_heads=2")


def _vfm_spec(args: argparse.Namespace, required: bool, default_name: str = "dinov2_vitb14_reg"):
    """The VFM the options name; a `reglue train-vfm` folder as --vfm-weights names its own VFM and
    architecture (VFMSpec.resolved), so --vfm and --vfm-arch are then left out."""
    from dataclasses import replace

    from reglue.encoders.semantics import VFMSpec

    given = any(getattr(args, k) is not None for k in ("vfm", "vfm_weights", "vfm_layers", "vfm_arch"))
    if not (given or required):
        return None
    layers = tuple(int(v) for v in args.vfm_layers.split(",")) if args.vfm_layers else None
    arch = {}
    for item in filter(None, (args.vfm_arch or "").split(",")):
        key, _, value = item.partition("=")
        if not value.isdigit():
            raise InputError(f"--vfm-arch expects key=integer pairs like depth=12, found {item!r}.")
        arch[key.strip()] = int(value)
    spec = VFMSpec(args.vfm or default_name, args.vfm_weights, layers, arch)
    if args.vfm is None and spec.weights and os.path.isdir(spec.weights):  # the folder's teacher.json names it
        spec = replace(spec, name=VFMSpec.from_teacher(spec.weights).name)
    return spec.resolved()


def _autocast(choice: str):
    import torch

    from reglue.pipeline import default_autocast

    if choice == "auto":
        return default_autocast(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


# ----------------------------------------------------------------------------- commands
def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from reglue.models.sit import SIT_MODELS, build_sit
    from reglue.presets import PRESETS

    print("models:  " + ", ".join(SIT_MODELS))
    print("presets: " + ", ".join(f"{p.name} (paper FID {p.paper_fid})" for p in PRESETS.values()))
    for name in args.count or ():
        with torch.device("meta"):  # count without allocating weights
            model = build_sit(name)
        counts = {"backbone": 0, "projector": 0}
        for key, p in model.named_parameters():
            if p.requires_grad:
                counts["projector" if key.startswith("projectors.") else "backbone"] += p.numel()
        print(
            f"{name} (REGLUE, 20 input channels): {counts['backbone'] / 1e6:.1f}M parameters "
            f"+ {counts['projector'] / 1e6:.1f}M training-only REPA projector"
        )
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from reglue.data.prepare import PrepareSettings, run_prepare
    from reglue.distributed import process_state

    settings = PrepareSettings(source=str(args.src), resolution=args.resolution, vae=args.vae,
                               max_images=args.max_images, shard_size=args.shard_size, min_size=args.min_size,
                               vae_dtype=args.vae_dtype)
    summary = run_prepare(settings, args.dst, batch_size=args.batch_size, show_progress=not args.quiet)
    if not process_state().is_main_process:
        return 0
    print(
        f"prepared {summary.images} images in {summary.shards} shards ({summary.resumed_shards} resumed) "
        f"into {args.dst}; skipped {summary.skipped} unreadable or too-small files (listed in "
        f"{args.dst}/skipped.tsv); ignored {summary.ignored} files without an image extension."
    )
    return 0


def _cmd_norm_stats(args: argparse.Namespace) -> int:
    from reglue.pipeline import run_norm_stats

    _confirm_data_resolution(args)

    out = run_norm_stats(args.data, _vfm_spec(args, required=True), out=args.out, num_images=args.num_images,
                         batch_size=args.batch_size, autocast_dtype=_autocast(args.autocast),
                         show_progress=not args.quiet)
    print(f"wrote norm stats to {out}")
    return 0


def _cmd_fit_pca(args: argparse.Namespace) -> int:
    from reglue.pipeline import NORM_STATS_FILE, run_fit_pca

    _confirm_data_resolution(args)

    norm_stats = args.norm_stats or os.path.join(args.data, NORM_STATS_FILE)
    out = run_fit_pca(args.data, norm_stats, rank=args.rank, out=args.out, num_images=args.num_images,
                      batch_size=args.batch_size, spec=_vfm_spec(args, required=False),
                      autocast_dtype=_autocast(args.autocast), show_progress=not args.quiet)
    print(f"wrote PCA (rank {args.rank}) to {out}")
    return 0


def _cmd_train_compressor(args: argparse.Namespace) -> int:
    from reglue.pipeline import NORM_STATS_FILE, run_train_compressor

    _confirm_data_resolution(args)

    norm_stats = args.norm_stats or os.path.join(args.data, NORM_STATS_FILE)
    run = run_train_compressor(
        args.data, norm_stats, args.out, spec=_vfm_spec(args, required=False), autocast_dtype=_autocast(args.autocast),
        epochs=args.epochs, global_batch=args.global_batch, lr=args.lr, val_data=args.val,
        val_fraction=args.val_fraction, num_workers=args.num_workers, checkpoint_every=args.checkpoint_every,
        resume=not args.restart, progress=not args.quiet, seed=args.seed,
    )
    print(f"compressor: best epoch {run.best_epoch}; weights {run.best_path} (best) and {run.final_path} (final)")
    return 0


def _cmd_probe_vfm(args: argparse.Namespace) -> int:
    import torch

    from reglue.training.teacher import probe_teacher

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = probe_teacher(args.teacher, args.data, out=args.out, probe_train_images=args.probe_train_images,
                           probe_held_out_images=args.probe_held_out_images, device=device)
    print(f"{report.verdict}; linear probe {report.trained.linear:.3f} trained vs {report.untrained.linear:.3f} "
          f"untrained; report in {args.out or args.teacher}")
    return 0


def _cmd_train_vfm(args: argparse.Namespace) -> int:
    from reglue.distributed import process_state
    from reglue.metrics.probe import REPORT_MD
    from reglue.training.teacher import TeacherSettings, train_teacher

    options = {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.num_heads, "epochs": args.epochs,
               "global_batch": args.batch_size, "lr": args.lr, "local_crops": args.local_crops, "seed": args.seed,
               "max_held_out_fraction": args.max_held_out_fraction, "checkpoint_every": args.checkpoint_every,
               "num_workers": args.num_workers}
    settings = TeacherSettings(**{k: v for k, v in options.items() if v is not None}, probe=args.probe,
                               tensorboard=args.tensorboard)
    result = train_teacher(args.data, args.out, settings, resolution=args.resolution, progress=not args.quiet,
                           resume=args.resume)
    if not process_state().is_main_process:
        return 0
    print(f"teacher weights {result.weights} (official DINOv2 layout); use them with --vfm-weights {result.out_dir} "
          "(its teacher.json gives the VFM and its architecture)")
    if result.report is not None:
        print(f"quality ({result.out_dir / REPORT_MD}): {result.report.verdict}; linear probe "
              f"{result.report.trained.linear:.3f} trained vs {result.report.untrained.linear:.3f} untrained")
        if not result.report.passed:
            print(f"reglue train-vfm: warning: the teacher FAILED its quality probe (see {result.out_dir / REPORT_MD}); "
                  "train longer or on more images before using it.", file=sys.stderr)
    return 0


def _cmd_cache_semantics(args: argparse.Namespace) -> int:
    from reglue.pipeline import NORM_STATS_FILE, run_cache_semantics

    _confirm_data_resolution(args)

    norm_stats = args.norm_stats or os.path.join(args.data, NORM_STATS_FILE)
    written = run_cache_semantics(args.data, norm_stats, compressor=args.compressor, pca=args.pca,
                                  repa_targets=args.repa_targets, batch_size=args.batch_size,
                                  spec=_vfm_spec(args, required=False), autocast_dtype=_autocast(args.autocast),
                                  show_progress=not args.quiet)
    print(f"cached semantics in {args.data}: {written} shard(s) written, the rest already cached")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from reglue.data.integrity import verify_dataset
    from reglue.progress import progress_bar

    _confirm_data_resolution(args)
    with progress_bar(total=None, unit="B", unit_scale=True, desc="verify", enabled=not args.quiet) as bar:
        report = verify_dataset(args.data, reindex=args.reindex, workers=args.workers, progress=bar.update,
                                planned=bar.reset)
    for damage in report.damaged:
        print(damage)
    if notice := report.legacy_notice():
        print(notice)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_train(args: argparse.Namespace) -> int:
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


def _add_guidance_options(parser: argparse.ArgumentParser, defaults: str) -> None:
    group = parser.add_argument_group("classifier-free guidance", f"defaults: {defaults} (docs/sampling.md)")
    group.add_argument("--cfg-scale", type=float, default=None, help="guidance scale w >= 1 (1 = no guidance)")
    group.add_argument("--cls-cfg-scale", type=float, default=None,
                       help="CLS guidance scale (default: --cfg-scale; 0: conditional CLS drift); > 1 guides alone")
    group.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                       help="guide only steps starting at t in [LOW, HIGH]")
    group.add_argument("--vae-only-cfg", action="store_true",
                       help="SDE only: the authors' --vae_cfg rule (docs/architecture.md)")


def _guidance(args: argparse.Namespace, base):
    """The command's :class:`Guidance`: ``base`` with the given flags on top."""
    from reglue.sampling import Guidance

    low, high = args.guidance_interval or (base.low, base.high)
    return Guidance(scale=base.scale if args.cfg_scale is None else args.cfg_scale, cls_scale=args.cls_cfg_scale,
                    low=low, high=high, vae_only=args.vae_only_cfg)


def _cmd_sample(args: argparse.Namespace) -> int:
    from reglue.distributed import process_state
    from reglue.encoders.autoencoder import load_vae
    from reglue.generate import PAPER, SampleSettings, generate
    from reglue.models.loading import load_sampling_model
    from reglue.progress import progress_bar

    base = PAPER if args.paper else SampleSettings()
    settings = SampleSettings(
        num_samples=args.num_samples, mode=args.mode or base.mode,
        num_steps=base.num_steps if args.steps is None else args.steps,  # --steps 0 is refused, not the default
        heun=args.heun, guidance=_guidance(args, base.guidance), labels=args.labels, seed=args.seed,
        precision=args.precision, micro_batch=args.micro_batch,
    )
    state = process_state()
    model = load_sampling_model(args.ckpt, args.weights).to(state.device)
    _confirm_model_resolution(args, model)
    model.check_inputs = state.device.type == "cpu"
    vae = load_vae(args.vae).to(state.device)
    mine = len(range(state.process_index, settings.num_samples, state.num_processes))
    with progress_bar(total=mine, unit="img", desc="sample", enabled=not args.quiet and state.is_main_process) as bar:
        npz = generate(model, vae, args.out, settings, per_device_batch=args.per_device_batch, device=state.device,
                       rank=state.process_index, world_size=state.num_processes, barrier=state.wait_for_everyone,
                       progress=bar.update)
    if state.is_main_process:
        print(f"wrote {settings.num_samples} samples to {args.out} and {npz}")
    return 0


def _cmd_grid(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from reglue.encoders.autoencoder import load_vae
    from reglue.generate import GRID_GUIDANCE, SampleSettings, class_grid
    from reglue.io import atomic_write
    from reglue.models.loading import load_sampling_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_sampling_model(args.ckpt).to(device)
    _confirm_model_resolution(args, model)
    classes = [int(c) for c in args.classes.split(",")]
    settings = SampleSettings(num_samples=len(classes) * args.per_class, mode=args.mode, num_steps=args.steps,
                              guidance=_guidance(args, GRID_GUIDANCE), seed=args.seed)
    grid = class_grid(model, load_vae(args.vae).to(device), classes, settings, per_class=args.per_class,
                      device=device)
    with atomic_write(args.out) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    print(f"wrote {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from reglue.metrics.evaluate import evaluate, format_table, write_results

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = [name.strip() for name in args.metrics.split(",") if name.strip()] if args.metrics else None
    vfm = _vfm_spec(args, required=True, default_name="dinov2_vitl14")  # FD_DINOv2's network by default
    results = evaluate(args.ref, args.samples, metrics=metrics, inception_weights=args.inception, vfm=vfm,
                       batch_size=args.batch_size, device=device, cache_dir=args.cache_dir,
                       resolution=args.resolution, progress=not args.quiet)
    out = args.out or str(args.samples).removesuffix(".npz") + ".metrics.json"
    write_results(results, out)
    print(format_table(results))
    print(f"wrote {out}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
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


def _cmd_demo(args: argparse.Namespace) -> int:
    import time
    from dataclasses import replace

    from reglue.demo import ALL_PRESETS, DemoSettings, quick, run_demo

    start = time.perf_counter()
    presets = tuple(args.presets.split(",")) if args.presets else (ALL_PRESETS if args.compare else ("reglue",))
    base = DemoSettings(presets=presets, seeds=3 if args.compare else 1, resolution=args.resolution,
                        teacher="random" if args.random_vfm else "trained")
    given = {"seeds": args.seeds, "steps": args.steps, "data": args.data, "images_per_class": args.images_per_class,
             "sample_steps": args.sample_steps, "seed": args.seed}  # None: not given
    # --quick shrinks the defaults; a value given on the command line wins
    settings = replace(quick(base) if args.quick else base,
                       **{name: value for name, value in given.items() if value is not None})
    result = run_demo(args.out, settings, progress=not args.quiet)
    print(f"demo finished in {time.perf_counter() - start:.0f} s. Outputs in {result.out}: report {result.report}, "
          f"results {result.results}, grids {result.grid}, curves {result.curves}")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reglue",
        description="REGLUE: latent diffusion with global and local DINOv2 semantics in one SiT.",
    )
    parser.add_argument("--version", action="version", version=f"reglue {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands.add_parser("models", help="list the registered SiT sizes and method presets")
    p.add_argument("--count", nargs="*", metavar="NAME", help="also count the parameters of NAME (e.g. SiT-B/2)")
    p.set_defaults(func=_cmd_models)

    p = commands.add_parser("prepare", help="image folder or zip → cropped images + VAE moments (resumable)")
    p.add_argument("src", help="ImageFolder tree (class sub-folders), flat folder (unconditional), or a .zip")
    p.add_argument("dst", help="output dataset directory (rerun the same command to resume)")
    _add_resolution(p, DEFAULT_RESOLUTION, "crop")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="local diffusers folder, cached hub id, or 'pixel' (the weight-free demo autoencoder)")
    p.add_argument("--vae-dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--max-images", type=int, default=None, help="use only the first N files (sorted by path)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--min-size", type=int, default=32, help="skip images whose short side is below this")
    p.add_argument("--batch-size", type=int, default=32, help="VAE batch size")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    p = commands.add_parser("norm-stats", help="per-channel mean/std of the VFM layer maps")
    p.add_argument("data", help="a prepared dataset directory")
    p.add_argument("--out", default=None, help="output file (default DATA/norm_stats.safetensors)")
    p.add_argument("--num-images", type=int, default=300 * 256, help="images in the random subset")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="auto")
    p.add_argument("--quiet", action="store_true")
    _add_vfm_options(p, "required: --vfm-weights (the VFM is recorded in the stats file for later steps)")
    _add_resolution_check(p, "DATA was prepared")
    p.set_defaults(func=_cmd_norm_stats)

    p = commands.add_parser("train-compressor", help="train the semantic compressor (resumable)")
    p.add_argument("data")
    p.add_argument("--out", default=None, help="output folder (default DATA/compressor)")
    p.add_argument("--norm-stats", default=None, help="default DATA/norm_stats.safetensors")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--global-batch", type=int, default=4096, help="images per step over all processes")
    p.add_argument("--lr", type=float, default=1e-3)
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val", default=None, help="a prepared dataset for validation")
    split.add_argument("--val-fraction", type=float, default=0.0, help="hold out this share of DATA instead")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between resume checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true", help="discard an earlier run in the output folder")
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="auto", help="precision of the frozen VFM")
    p.add_argument("--quiet", action="store_true")
    _add_vfm_options(p, "optional: defaults to the VFM recorded in the norm stats")
    _add_resolution_check(p, "DATA was prepared")
    p.set_defaults(func=_cmd_train_compressor)

    p = commands.add_parser("train-vfm", help="train a small DINOv2-with-registers teacher, self-supervised (resumable)",
                            description="DINOv2's recipe (DINO + iBOT + KoLeo, EMA teacher, multi-crop; lightly's "
                            "parts) on a prepared dataset or straight on an image folder or zip; writes "
                            "OUT/teacher.pth in the official DINOv2 layout and a k-NN / linear-probe report. Needs the teacher extra: pip install \"reglue[teacher]\". "
                            "See docs/teacher.md.")
    p.add_argument("data", help="a prepared dataset directory (`reglue prepare`), or an image folder or .zip read "
                   "directly: class sub-folders give labels, a flat folder none; unreadable files are left out and "
                   "listed in OUT/skipped.tsv")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--resolution", type=_resolution, default=None, metavar="R",
                   help="side R the images of a folder or zip are ADM-centre-cropped to, as `reglue prepare` crops "
                   f"them: a multiple of 64 from 64 to 512 (default {DEFAULT_RESOLUTION}, prepare's); a prepared "
                   "dataset trains at its own R and refuses another")
    p.add_argument("--embed-dim", type=int, default=None, help="ViT width (default 96)")
    p.add_argument("--depth", type=int, default=None, help="ViT blocks (default 4)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default 3)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training images (default 15)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step over all processes (default 32)")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default 2e-3)")
    p.add_argument("--local-crops", type=int, default=None, help="local crops per image (default 2)")
    p.add_argument("--max-held-out-fraction", type=float, default=None,
                   help="the probe holds out 10,000 labelled images, class-balanced, but at most this share of "
                        "each class (default 0.25)")
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="no k-NN / linear-probe report (unlabelled data); every image is trained on")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between resume states (default 50)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers making the crops (default 0)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to OUT/tensorboard")
    p.add_argument("--seed", type=int, default=None, help="initialisation, split, order and crops (default 0)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue the run in OUT (default); --no-resume deletes it and starts over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train_vfm)

    p = commands.add_parser("probe-vfm", help="run a finished teacher's k-NN / linear-probe report again",
                            description="The quality probe of `reglue train-vfm` (docs/teacher.md) on a finished "
                            "teacher folder, again: on the data it was trained on (the same held-out split), with "
                            "its own or other caps. Writes report.json and report.md.")
    p.add_argument("teacher", help="a finished `reglue train-vfm` output folder")
    p.add_argument("data", help="the dataset or image folder the teacher was trained on")
    p.add_argument("--out", default=None, help="folder for the report (default: the teacher folder)")
    p.add_argument("--probe-train-images", type=int, default=None,
                   help="training images the probes fit on at most (default: the teacher's setting, 50,000)")
    p.add_argument("--probe-held-out-images", type=int, default=None,
                   help="held-out images scored at most (default: the teacher's setting, 10,000)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=_cmd_probe_vfm)

    p = commands.add_parser("train", help="train a preset (sit/repa/redi/reg/reglue) from a YAML config")
    p.add_argument("--config", default=None, help="YAML file, e.g. configs/reglue_sit_b2.yaml")
    p.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint) or a checkpoint path")
    p.add_argument("--from-authors", default=None, metavar="PT",
                   help="start from the authors' checkpoint: its weights, and its args as config defaults")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.dir=data/in256 train.global_batch=64")
    _add_resolution_check(p, "data.dir was prepared")  # = data.resolution=R
    p.set_defaults(func=_cmd_train)

    p = commands.add_parser("sample", help="generate samples to PNGs and an ADM .npz (resumable, any GPU count)")
    p.add_argument("--ckpt", required=True, help="RUN_DIR/ema, a training checkpoint .pt, or the authors' .pt")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of a checkpoint")
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--paper", action="store_true",
                   help="the paper's evaluation settings: SDE, 250 steps, CFG 2.8, interval [0, 0.9]")
    p.add_argument("--mode", choices=("sde", "ode"), default=None)
    p.add_argument("--steps", type=int, default=None, help="default 250")
    p.add_argument("--heun", action="store_true", help="ODE only: Heun correction")
    _add_guidance_options(p, "none; with --paper scale 2.8 on [0, 0.9]")
    p.add_argument("--labels", default="random", help="random | balanced | a comma-separated class list")
    p.add_argument("--per-device-batch", type=int, default=32,
                   help="samples advanced together per process (does not change the images)")
    p.add_argument("--micro-batch", type=int, default=32,
                   help="rows per SiT/VAE call (memory; part of the settings: fixes the float kernels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="local diffusers folder, cached hub id, or 'pixel' (the weight-free demo autoencoder)")
    p.add_argument("--quiet", action="store_true")
    _add_resolution_check(p, "the model was trained")
    p.set_defaults(func=_cmd_sample)

    p = commands.add_parser("grid", help="a labelled sample grid, one column per class")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--classes", default="207,360,387,974,88,979,417,279")
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--out", default="grid.png")
    p.add_argument("--mode", choices=("sde", "ode"), default="sde")
    p.add_argument("--steps", type=int, default=250)
    _add_guidance_options(p, "scale 4 on [0, 0.9]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="local diffusers folder, cached hub id, or 'pixel' (the weight-free demo autoencoder)")
    _add_resolution_check(p, "the model was trained")
    p.set_defaults(func=_cmd_grid)

    p = commands.add_parser("evaluate", help="ADM suite (FID, sFID, IS, precision, recall) and FD_DINOv2; "
                            "only the metrics asked for (docs/evaluation.md)")
    p.add_argument("--ref", required=True, help="ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--samples", required=True, help="samples .npz from `reglue sample`")
    p.add_argument("--metrics", default=None,
                   help="comma-separated: fid,sfid,is,pr (Inception), fd_dinov2,pr_dinov2 (fd_NAME,pr_NAME with "
                   "--vfm NAME); default: the ADM suite if --inception is given, plus fd_dinov2 if --vfm-weights is")
    p.add_argument("--inception", default=None,
                   help="weights-inception-2015-12-05-6726825d.pth (torch-fidelity's port), or its folder; "
                   "needed for fid, sfid, is, pr")
    group = p.add_argument_group("feature space of fd_dinov2 / pr_dinov2", "needed for those metrics")
    group.add_argument("--vfm", default=None,
                       help="registry name (default dinov2_vitl14: DINOv2 ViT-L/14 without registers, FD_DINOv2)")
    group.add_argument("--vfm-weights", default=None,
                       help="e.g. weights/dinov2_vitl14_pretrain.pth (official), a timm file, a `reglue train-vfm` "
                            "folder, or 'random' for tests")
    group.add_argument("--vfm-arch", default=None,
                       help="architecture overrides for small test models, e.g. embed_dim=32,depth=4,num_heads=2")
    p.set_defaults(vfm_layers=None)  # the feature space uses the final CLS token only
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--cache-dir", default=None, help="where computed reference statistics are cached")
    p.add_argument("--out", default=None, help="JSON results (default SAMPLES.metrics.json)")
    p.add_argument("--quiet", action="store_true")
    _add_resolution_check(p, "the samples are")
    p.set_defaults(func=_cmd_evaluate)

    p = commands.add_parser("plot", help="draw runs' loss and evaluation curves into one PNG")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", default=None, help="the PNG (default RUN/loss_curves.png; required for several runs)")
    p.add_argument("--x", choices=("step", "images", "time"), default="step",
                   help="x axis: training step, images seen (step x train.global_batch) or training wall time")
    p.add_argument("--log-x", action="store_true", help="logarithmic x axis")
    p.add_argument("--log-y", action="store_true", help="logarithmic y axes (panels whose values are all positive)")
    p.add_argument("--smoothing", type=int, default=20, help="moving-average window in logged points (1: none)")
    p.add_argument("--paper", action="store_true",
                   help="mark the paper's SiT-B/2 FID-50K (Table 1) in the eval/fid panel of SiT-B/2 runs")
    p.set_defaults(func=_cmd_plot)

    p = commands.add_parser("fit-pca", help="ReDi's PCA of the z-scored VFM maps")
    p.add_argument("data")
    p.add_argument("--norm-stats", default=None, help="default DATA/norm_stats.safetensors")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--out", default=None, help="default DATA/pca.safetensors")
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="auto")
    p.add_argument("--quiet", action="store_true")
    _add_vfm_options(p, "optional: defaults to the VFM recorded in the norm stats")
    _add_resolution_check(p, "DATA was prepared")
    p.set_defaults(func=_cmd_fit_pca)

    p = commands.add_parser("cache-semantics", help="store compressed semantics, CLS (and REPA targets)")
    p.add_argument("data")
    p.add_argument("--compressor", default=None, help="compressor .safetensors (REGLUE)")
    p.add_argument("--pca", default=None, help="PCA .safetensors (ReDi)")
    p.add_argument("--norm-stats", default=None, help="default DATA/norm_stats.safetensors")
    p.add_argument("--repa-targets", action="store_true", help="also cache REPA targets (≈386 KiB/image)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="auto")
    p.add_argument("--quiet", action="store_true")
    _add_vfm_options(p, "optional: defaults to the VFM recorded in the norm stats")
    _add_resolution_check(p, "DATA was prepared")
    p.set_defaults(func=_cmd_cache_semantics)

    p = commands.add_parser("verify", help="check every file of a prepared dataset against its recorded size and "
                            "checksum; exit 0 only when all is well",
                            description="Lists each damaged file (truncated, overwritten, missing, unknown) with the "
                            "command that repairs it, then files, bytes and GB/s checked. See docs/data-format.md.")
    p.add_argument("data", help="a prepared dataset directory")
    p.add_argument("--reindex", action="store_true",
                   help="record the checksums of shards indexed without them (by an older reglue), then verify")
    p.add_argument("--workers", type=int, default=None, help="threads reading in parallel (default: one per CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_resolution_check(p, "DATA was prepared")
    p.set_defaults(func=_cmd_verify)

    p = commands.add_parser("demo", help="the whole chain offline on synthetic data with tiny models (minutes on a CPU)",
                            description="Synthetic data → prepare (pixel autoencoder) → a DINOv2 teacher trained here "
                            "(train-vfm) → norm stats, compressor, semantics → train (each preset × seed, evaluated "
                            "during training) → class grids → report.md. Rerun the same command to resume. "
                            "See docs/demo.md.")
    p.add_argument("--out", default="reglue-demo", help="output folder (new, empty, or an earlier demo to resume)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", dest="presets", default=None, choices=("reglue", "reg", "repa", "redi", "sit"),
                       help="train one preset (default reglue)")
    which.add_argument("--presets", default=None, help="comma-separated presets to compare, e.g. sit,repa")
    p.add_argument("--compare", action="store_true",
                   help="compare presets at equal budget (default all five, 3 seeds each; ≈ 16 min on 2 cores)")
    p.add_argument("--quick", action="store_true", help="the same protocol at about a third of the cost: at most "
                   "400 steps, 2 seeds and 32 evaluation samples unless given (≈ 5 min)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per preset (default 1, 3 with --compare)")
    p.add_argument("--steps", type=int, help="training steps per run (default 1500; 400 with --quick)")
    p.add_argument("--data", choices=("colours", "shapes"),
                   help="the synthetic set: classes by colour, shape and texture (default) or by shape and layout only")
    p.add_argument("--images-per-class", type=int, help="synthetic images per class (default 40)")
    p.add_argument("--sample-steps", type=int, help="sampler steps for the grids and the evaluations (default 25)")
    p.add_argument("--seed", type=int, help="seed of the data, teacher and evaluations, and the first training "
                   "seed (default 0)")
    _add_resolution(p, DEMO_RESOLUTION, "image")
    p.add_argument("--random-vfm", action="store_true",
                   help="a random, untrained VFM instead of the teacher trained here (plumbing checks only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars for the data stages (training keeps its bar)")
    p.set_defaults(func=_cmd_demo)
    return parser


def _for_the_user(err: BaseException) -> bool:
    """Errors the user can act on (reported in one line); anything else is a bug."""
    out_of_memory = isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    return isinstance(err, (ReglueError, OSError)) or out_of_memory


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `reglue train` KEY=VALUE overrides may come after its options too (argparse takes only the
    # run before the first option); anything else unknown is the usual usage error.
    if args.command == "train" and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except Exception as err:
        if os.environ.get("REGLUE_DEBUG") == "1" or not _for_the_user(err):
            raise  # a bug: the traceback, exit status 1
        message = " ".join(str(err).split())
        print(f"reglue {args.command}: error: {message}", file=sys.stderr)
        return 2
    if "torch" in sys.modules:  # a command that loaded torch may have set up a process group
        from reglue.distributed import end_process_group

        end_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
