"""Time one REGLUE training step: model + joint loss + backward + AdamW + EMA.

Inputs are synthetic tensors of the real shapes (latent ‖ semantics, CLS target, REPA
target), so the number measures the diffusion model's step alone (no VAE/VFM forward). The
optimiser, gradient clipping and EMA are the trainer's own (``build_adamw`` and the EMA update
with the default ``optim``/``train`` settings), so the step is the one ``reglue train`` runs.

    python benchmarks/train_step.py --model SiT-B/2 --preset reglue --batch 8 --dtype bf16

Prints one Markdown table row (and JSON with ``--json PATH``): median step time over the
timed steps after warm-up, images/s and peak memory; the JSON also holds the median time of
the loss forward + backward alone (``forward_backward_s``; the rest is clip, AdamW and EMA).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import time

import torch

from reglue.config import OptimConfig, TrainConfig
from reglue.ema import EMA_UPDATES, EMAUpdate
from reglue.models import build_sit
from reglue.presets import get_preset
from reglue.training.trainer import build_adamw
from reglue.transport import JointLoss

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SiT-B/2")
    parser.add_argument("--preset", default="reglue")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ema", choices=sorted(EMA_UPDATES), default=TrainConfig.ema,
                        help="'loop' is the authors' per-parameter EMA update")
    parser.add_argument("--optimizer", choices=("fused", "loop"),
                        default="fused" if TrainConfig.fused_optimizer else "loop",
                        help="AdamW kernel (train.fused_optimizer); 'loop' is the authors' per-parameter loop")
    parser.add_argument("--compile", action="store_true", help="torch.compile each SiT block")
    parser.add_argument("--input-size", type=int, default=32, help="latent size (32 for 256² images)")
    parser.add_argument("--vfm-dim", type=int, default=768)
    parser.add_argument("--overrides", type=json.loads, default={}, help="JSON SiTConfig overrides")
    parser.add_argument("--json", help="also write the result as JSON to this path")
    return parser.parse_args(argv)


def synthetic_batch(args, preset, config, device):
    g = torch.Generator().manual_seed(0)
    channels = 4 + preset.semantic_channels
    s = args.input_size
    num_tokens = config.num_patches + int(preset.cls_token)
    batch = {
        "x0": torch.randn(args.batch, channels, s, s, generator=g),
        "y": torch.randint(0, 1000, (args.batch,), generator=g),
        "cls_target": torch.randn(args.batch, args.vfm_dim, generator=g) if preset.cls_token else None,
        "repa_target": torch.randn(args.batch, num_tokens, args.vfm_dim, generator=g) if preset.repa else None,
    }
    return {k: v.to(device) if v is not None else None for k, v in batch.items()}


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # process peak RSS


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    preset = get_preset(args.preset)
    torch.manual_seed(0)
    model = build_sit(args.model, input_size=args.input_size,
                      **preset.model_kwargs(vfm_dim=args.vfm_dim), **args.overrides).to(device)
    model.check_inputs = device.type == "cpu"  # no host syncs on accelerators
    ema = copy.deepcopy(model).requires_grad_(False)
    if args.compile:
        for block in model.blocks:
            block.compile()
    optim = OptimConfig()
    optimizer = build_adamw([p for p in model.parameters() if p.requires_grad], optim,
                            args.optimizer == "fused", device)
    loss_fn = JointLoss(**preset.loss_kwargs())
    batch = synthetic_batch(args, preset, model.config, device)
    ema_update = EMAUpdate(ema, model, args.ema)  # built once, as the trainer does
    amp = DTYPES[args.dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> tuple[float, float]:
        """(seconds of the whole step, seconds of its loss forward + backward)."""
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            terms = loss_fn(model, **batch)
        scaler.scale(terms.total).backward()
        sync()
        computed = time.perf_counter()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ema_update(TrainConfig.ema_decay)
        sync()
        return time.perf_counter() - start, computed - start

    model.train()
    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    median = statistics.median(t for t, _ in times)
    forward_backward = statistics.median(c for _, c in times)
    return {
        "model": args.model, "preset": args.preset, "batch": args.batch, "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "ema": args.ema, "optimizer": args.optimizer,
        "compile": args.compile,
        "step_s": round(median, 4), "images_per_s": round(args.batch / median, 3),
        "forward_backward_s": round(forward_backward, 4),  # the rest of a step: clip, AdamW, EMA
        "peak_mem_mib": round(peak_memory_mib(device), 1), "steps": args.steps, "warmup": args.warmup,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(
        f"| {result['model']} | {result['preset']} | {result['batch']} | {result['dtype']} | "
        f"{result['ema']} | {result['compile']} | {result['step_s']:.3f} | {result['images_per_s']:.2f} | "
        f"{result['peak_mem_mib']:.0f} |"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
