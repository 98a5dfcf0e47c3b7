"""Sampling throughput of the joint model (no VAE decode): SDE or ODE, fp32 or bf16 autocast.

    python benchmarks/sample.py --model SiT-B/2 --mode sde --steps 250 --cfg-scale 2.8 --batch 2
    python benchmarks/sample.py --model SiT-B/2 --mode ode --steps 50 --batch 2 --dtype bf16
    python benchmarks/sample.py --host --batch 64 --steps 20
    python benchmarks/sample.py --requests 2,32 --steps 4 --cfg-scale 2.3

Random weights with perturbed (non-zero) heads, REGLUE preset; prints one Markdown row and, for
bf16, the max-abs difference of its samples from the fp32 ones of the same noise.

``--host``: the host time of one SDE step of ``reglue sample`` (per-sample noise generators,
CFG at every step, ``--micro-batch`` rows per model call) with the SiT replaced by a stub that
returns its inputs as the velocities, so no model compute counts. Per step, at ``--batch``:

- ``draws_ms``: the per-sample noise draws alone (the sampler's own drawing code, called as the
  loop calls it) at the real shapes (``--channels``×``--input-size``², ``--z-dim``) on this CPU;
- ``other_ms``: every other host cost of the step loop — Python, op dispatch, the guidance cat,
  time vectors, micro-batch chunking and padding, dtype casts, drift and update arithmetic —
  measured by running the loop with the same batch but each sample shrunk to one element
  (1×1×1 state, 1-wide CLS): the loops over samples and over micro-batch chunks and every op
  stay, the arithmetic all but vanishes. That is what the host spends per step when the
  arithmetic runs on an accelerator (plus its launch latency, a few µs per op: ``ops``
  counts the ATen ops a step dispatches). The ``meta`` device is not used for this: many of
  its kernels are Python functions (≈ 0.3 ms per elementwise op here), far slower than the
  C++ dispatch they would stand for;
- ``cpu_loop_ms``: the whole loop at the real shapes on this CPU, where the float64 state
  arithmetic of the batch is host compute too (for reference).

``--requests 2,32``: :class:`~reglue.generate.ImageSampler` asked for that many images (SDE, CFG
on [0, ``--guidance-high``], the weight-free ``pixel`` autoencoder so that the SiT's time shows),
with its default ``micro_batch=None`` (the rows a step has, at most ``MAX_CALL_ROWS``) and with
``micro_batch=32`` (``reglue sample``'s fixed micro-batch, which pads a small request to 32 rows
per call); seconds, seconds per image, and the load.

``--host``: each figure is the fastest of three repeats (the least disturbed by other work on a shared
machine); ``load_1min`` is the load average when it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from reglue.encoders.pixel import PixelAutoencoder
from reglue.generate import ImageSampler
from reglue.models import build_sit
from reglue.presets import get_preset
from reglue.sampling import Guidance, SampleNoise, sample_ode, sample_sde
from reglue.seeding import NOISE_STREAM, seeded_generator


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
    parser.add_argument("--host", action="store_true", help="host time per SDE step with a stub model (see above)")
    parser.add_argument("--requests", type=lambda s: [int(n) for n in s.split(",")],
                        help="ImageSampler's time for these numbers of images (see above)")
    parser.add_argument("--micro-batch", type=int, default=32, help="--host: rows per model call")
    parser.add_argument("--channels", type=int, default=20, help="--host: joint state channels")
    parser.add_argument("--z-dim", type=int, default=768, help="--host: CLS width")
    return parser.parse_args(argv)


class StubVelocity(nn.Module):
    """The SiT's call signature at no compute: the inputs come back as the velocities."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the sampler the model's dtype
        self.num_classes = num_classes
        self.use_cls_token = True

    def forward(self, x, t, y, cls_token=None):
        return x, None, cls_token


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _fastest_ms(fn, steps: int, repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs of ``fn``, in milliseconds per step (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times) / steps


def _host_costs(args, channels: int, size: int, z_dim: int) -> tuple[float, float, float]:
    """(draws ms, whole-loop ms, ATen ops) per SDE step with states of these shapes."""
    device = torch.device(args.device)
    generators = [seeded_generator(0, NOISE_STREAM, i) for i in range(args.batch)]
    latents = torch.zeros(args.batch, channels, size, size, device=device)
    cls = torch.zeros(args.batch, z_dim, device=device)
    y = torch.zeros(args.batch, dtype=torch.long, device=device)
    noise = SampleNoise(latents.double(), cls.double(), generators)

    def draws():
        for _ in range(args.steps):
            noise.draw()

    stub = StubVelocity().to(device)

    def loop():
        sample_sde(stub, latents, y, cls, num_steps=args.steps, guidance=Guidance(scale=2.0),
                   noise_generators=generators, micro_batch=args.micro_batch)

    with _OpCounter() as counter:
        loop()
    return _fastest_ms(draws, args.steps), _fastest_ms(loop, args.steps), counter.ops / args.steps


def host_step(args: argparse.Namespace) -> dict:
    """Milliseconds per SDE step: the noise draws and every other host cost (module docstring)."""
    draws_ms, cpu_loop_ms, _ = _host_costs(args, args.channels, args.input_size, args.z_dim)
    draw_dispatch_ms, loop_dispatch_ms, ops = _host_costs(args, 1, 1, 1)
    return {"batch": args.batch, "micro_batch": args.micro_batch, "steps": args.steps,
            "state": [args.channels, args.input_size, args.input_size], "z_dim": args.z_dim,
            "draws_ms": round(draws_ms, 3), "other_ms": round(loop_dispatch_ms - draw_dispatch_ms, 3),
            "draw_dispatch_ms": round(draw_dispatch_ms, 3), "ops_per_step": round(ops, 1),
            "cpu_loop_ms": round(cpu_loop_ms, 2), "load_1min": round(os.getloadavg()[0], 2)}


def random_model(args: argparse.Namespace, device: torch.device):
    """The REGLUE SiT of ``--model``, random weights with every head moved off zero."""
    torch.manual_seed(0)
    options = {**get_preset("reglue").model_kwargs(), "input_size": args.input_size, **args.overrides}
    model = build_sit(args.model, **options).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.check_inputs = device.type == "cpu"
    return model


def requests(args: argparse.Namespace) -> list[dict]:
    """Seconds ImageSampler takes for each request size, unpadded (its default) and padded to 32 rows."""
    device = torch.device(args.device)
    sampler = ImageSampler(random_model(args, device), PixelAutoencoder(), device=device)
    guidance = Guidance(scale=args.cfg_scale, high=args.guidance_high)
    sampler([0], guidance=guidance, num_steps=1, output_type="np")  # warm-up
    rows = []
    for count in args.requests:
        for micro_batch in (None, 32):
            start = time.perf_counter()
            sampler(list(range(count)), guidance=guidance, num_steps=args.steps, micro_batch=micro_batch,
                    output_type="np")
            seconds = time.perf_counter() - start
            rows.append({"images": count, "micro_batch": micro_batch, "steps": args.steps, "seconds": seconds,
                         "seconds_per_image": seconds / count, "load_1min": round(os.getloadavg()[0], 2)})
    return rows


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = random_model(args, device)
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
    args = parse_args(argv)
    if args.host:
        result = host_step(args)
        print(f"| host | {result['batch']} | {result['micro_batch']} | {result['draws_ms']:.2f} | "
              f"{result['other_ms']:.2f} | {result['draw_dispatch_ms']:.2f} | {result['ops_per_step']:.0f} | "
              f"{result['cpu_loop_ms']:.1f} | {result['load_1min']} |")
        return result
    if args.requests:
        rows = requests(args)
        for row in rows:
            print(f"| ImageSampler | {row['images']} | {row['micro_batch']} | {row['steps']} | {row['seconds']:.1f} | "
                  f"{row['seconds_per_image']:.2f} | {row['load_1min']} |")
        return {"requests": rows}
    result = run(args)
    print(f"| {result['model']} | {result['mode']} | {result['steps']} | {result['cfg']} | {result['batch']} | "
          f"{result['dtype']} | {result['seconds']:.1f} | {result['images_per_s']:.4f} | "
          f"{result.get('max_abs_vs_fp32', '-')} |")
    return result


if __name__ == "__main__":
    main()
