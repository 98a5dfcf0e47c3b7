"""``reglue sample``: samples to PNGs and an ADM .npz (resumable, any GPU count)."""

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

NAME = "sample"
HELP = "generate samples to PNGs and an ADM .npz (resumable, any GPU count)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="RUN_DIR/ema, a training checkpoint .pt, or the authors' .pt")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of a checkpoint")
    parser.add_argument("--out", required=True, help="output folder (rerun to resume); settings.json records the "
                        "settings")
    add_settings(parser, "the SampleSettings (reglue.generate)", "num_steps=100 guidance.scale=1.5")
    parser.add_argument("--num-samples", type=int, default=None, help="default 50,000")
    parser.add_argument("--paper", action="store_true",
                        help="start from the paper's evaluation settings: SDE, 250 steps, CFG 2.8, interval [0, 0.9]")
    parser.add_argument("--mode", choices=("sde", "ode"), default=None)
    parser.add_argument("--steps", type=int, default=None, help="default 250 (key num_steps)")
    parser.add_argument("--heun", action="store_true", default=None, help="ODE only: Heun correction")
    add_guidance_options(parser, "none; with --paper scale 2.8 on [0, 0.9]")
    parser.add_argument("--labels", default=None, help="random (default) | balanced | a comma-separated class list")
    parser.add_argument("--per-device-batch", type=int, default=32,
                        help="samples advanced together per process (does not change the images)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="rows per SiT/VAE call (default 32; part of the settings: fixes the float kernels)")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default fp32")
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                        help="local diffusers folder, cached hub id, or 'pixel' (the weight-free demo autoencoder)")
    parser.add_argument("--quiet", action="store_true")
    add_resolution_check(parser, "the model was trained")


def run(args: argparse.Namespace) -> int:
    from reglue.distributed import process_state
    from reglue.encoders.autoencoder import load_vae
    from reglue.generate import PAPER, SampleSettings, generate
    from reglue.models.loading import load_sampling_model
    from reglue.progress import progress_bar

    settings = load_command_settings(SampleSettings, args, {
        "num_samples": args.num_samples, "mode": args.mode, "num_steps": args.steps,  # --steps 0 is refused
        "heun": args.heun, **guidance_values(args), "labels": args.labels, "seed": args.seed,
        "precision": args.precision, "micro_batch": args.micro_batch}, base=PAPER if args.paper else None)
    state = process_state()
    model = load_sampling_model(args.ckpt, args.weights).to(state.device)
    confirm_model_resolution(args, model)
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
