"""``reglue grid``: a labelled sample grid, one column per class."""

from __future__ import annotations

import argparse

from reglue.cli.options import (
    add_guidance_options,
    add_resolution_check,
    add_settings,
    confirm_model_resolution,
    guidance_values,
    load_command_settings,
)

NAME = "grid"
HELP = "a labelled sample grid, one column per class"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--classes", default="207,360,387,974,88,979,417,279")
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--out", default="grid.png")
    add_settings(parser, "the SampleSettings (reglue.generate) of the grid's sampler", "num_steps=100")
    parser.add_argument("--mode", choices=("sde", "ode"), default=None, help="default sde")
    parser.add_argument("--steps", type=int, default=None, help="default 250 (key num_steps)")
    add_guidance_options(parser, "scale 4 on [0, 0.9]")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                        help="local diffusers folder, cached hub id, or 'pixel' (the weight-free demo autoencoder)")
    add_resolution_check(parser, "the model was trained")


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from reglue.encoders.autoencoder import load_vae
    from reglue.generate import GRID_GUIDANCE, SampleSettings, class_grid
    from reglue.io import atomic_write
    from reglue.models.loading import load_sampling_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_sampling_model(args.ckpt).to(device)
    confirm_model_resolution(args, model)
    classes = [int(c) for c in args.classes.split(",")]
    base = SampleSettings(num_samples=len(classes) * args.per_class, guidance=GRID_GUIDANCE)
    settings = load_command_settings(SampleSettings, args, {
        "mode": args.mode, "num_steps": args.steps, **guidance_values(args), "seed": args.seed}, base=base)
    grid = class_grid(model, load_vae(args.vae).to(device), classes, settings, per_class=args.per_class,
                      device=device)
    with atomic_write(args.out) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    print(f"wrote {args.out}")
    return 0
