"""Sampling throughput of the joint model (no VAE decode): SDE or ODE, fp32 or bf16 autocast.

    python benchmarks/sample.py --model SiT-B/2 --mode sde --steps 250 --cfg-scale 2.8 --batch 2
    python benchmarks/sample.py --model SiT-B/2 --mode ode --steps 50 --batch 2 --dtype bf16

Random weights with perturbed (non-zero) heads, REGLUE preset; prints one Markdown row and, for
bf16, the max-abs difference of its samples from the fp32 ones of the same noise.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from reglue.models import build_sit
from reglue.presets import get_preset
from reglue.sampling import Guidance, sample_ode, sample_sde


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SiT-B/2")
    parser.add_argument("--mode", choices=("sde", "ode"), default="sde")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--guidance-high", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--overrides", type=json.loads, default={}, help="JSON SiTConfig overrides")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    options = {**get_preset("reglue").model_kwargs(), "input_size": args.input_size, **args.overrides}
    model = build_sit(args.model, **options).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.check_inputs = device.type == "cpu"
    c = model.config
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(args.batch, c.in_channels, c.input_size, c.input_size, generator=g).to(device)
    cls = torch.randn(args.batch, c.z_dim, generator=g).to(device)
    y = torch.arange(args.batch, device=device) % c.num_classes

    def draw(dtype: str) -> tuple[torch.Tensor, float]:
        torch.manual_seed(2)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            sampler = sample_sde if args.mode == "sde" else sample_ode
            x = sampler(model, latents, y, cls, num_steps=args.steps,
                        guidance=Guidance(scale=args.cfg_scale, high=args.guidance_high))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return x, time.perf_counter() - start

    x, seconds = draw(args.dtype)
    result = {"model": args.model, "mode": args.mode, "steps": args.steps, "cfg": args.cfg_scale,
              "batch": args.batch, "dtype": args.dtype, "seconds": round(seconds, 2),
              "images_per_s": round(args.batch / seconds, 4)}
    if args.dtype == "bf16":
        reference, _ = draw("fp32")
        result["max_abs_vs_fp32"] = round(float((x - reference).abs().max()), 4)
    return result


def main(argv: list[str] | None = None) -> dict:
    result = run(parse_args(argv))
    print(f"| {result['model']} | {result['mode']} | {result['steps']} | {result['cfg']} | {result['batch']} | "
          f"{result['dtype']} | {result['seconds']:.1f} | {result['images_per_s']:.4f} | "
          f"{result.get('max_abs_vs_fp32', '-')} |")
    return result


if __name__ == "__main__":
    main()
