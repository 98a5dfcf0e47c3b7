"""Cost of one training step at each resolution, relative to 256² (docs/benchmarks.md).

For each resolution R (latents R/8, tokens (R/16)²) it times the SiT step of
``benchmarks/train_step.py`` (model + joint loss + backward + AdamW + EMA, synthetic inputs of
the real shapes), its loss forward + backward alone (the part that grows with R; clip, AdamW
and EMA cost the same at every R and dominate small batches on a CPU) and, with ``--vfm``, the frozen VFM's forward on R² images (the online-semantics
cost; DINOv2 input 224·R/256):

    python benchmarks/resolution.py --model SiT-B/2 --batch 4 --vfm dinov2_vitb14_reg
    python benchmarks/resolution.py --model demo      # the demo's SiT (reglue.demo.MODEL)

Prints a Markdown table (and JSON with ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from reglue.demo.settings import MODEL as DEMO_MODEL
from reglue.encoders.vfm import build_vfm
from reglue.resolution import check_resolution, latent_size, token_grid
from train_step import parse_args as step_args
from train_step import run as run_step

DEMO = "demo"  # --model value for the demo's SiT
DEMO_OVERRIDES = {k: v for k, v in DEMO_MODEL.items() if k != "name"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SiT-B/2", help=f"a registered SiT or '{DEMO}'")
    parser.add_argument("--preset", default="reglue")
    parser.add_argument("--resolutions", default="64,128,256,512",
                        type=lambda text: [check_resolution(int(r)) for r in text.split(",")])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--vfm", default=None, help="also time this VFM's forward (random weights)")
    parser.add_argument("--vfm-arch", type=json.loads, default={}, help="JSON VFMArch overrides")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    return parser.parse_args(argv)


def sit_step_seconds(args: argparse.Namespace, resolution: int) -> dict:
    """Median seconds of one training step of ``args.model`` on R² images' latents: the whole
    step and its loss forward + backward (what grows with R; clip, AdamW and EMA do not)."""
    name, overrides = (DEMO_MODEL["name"], DEMO_OVERRIDES) if args.model == DEMO else (args.model, {})
    vfm_dim = args.vfm_arch.get("embed_dim", 768)  # the CLS / REPA target width: the VFM's (DINOv2-B: 768)
    step = step_args([
        "--model", name, "--preset", args.preset, "--batch", str(args.batch), "--dtype", args.dtype,
        "--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps),
        "--input-size", str(latent_size(resolution)), "--vfm-dim", str(vfm_dim), "--overrides", json.dumps(overrides),
    ])
    result = run_step(step)
    return {"sit_step_s": result["step_s"], "sit_forward_backward_s": result["forward_backward_s"]}


@torch.no_grad()
def vfm_forward_seconds(args: argparse.Namespace, resolution: int) -> float:
    """Median seconds of the VFM's forward (all four layer maps, CLS, REPA tokens) on a batch of R² images."""
    device = torch.device(args.device)
    extractor = build_vfm(args.vfm, weights=None, resolution=resolution, **args.vfm_arch).to(device)
    images = torch.randint(0, 256, (args.batch, 3, resolution, resolution), dtype=torch.uint8, device=device)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        extractor(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for resolution in args.resolutions:
        row = {"resolution": resolution, "latent": latent_size(resolution), "tokens": token_grid(resolution),
               **sit_step_seconds(args, resolution)}
        if args.vfm:
            row["vfm_forward_s"] = vfm_forward_seconds(args, resolution)
        rows.append(row)
    base = next((r for r in rows if r["resolution"] == 256), None)
    print(f"| R | latent | tokens | {args.model} step (s) | × 256² | forward + backward (s) | × 256² |"
          + (" VFM forward (s) | × 256² |" if args.vfm else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.vfm else ""))
    for row in rows:
        for key in ("sit_step_s", "sit_forward_backward_s", "vfm_forward_s"):
            if key in row and base is not None:
                row[key.removesuffix("_s") + "_vs_256"] = round(row[key] / base[key], 3)
        cells = [f"{row['resolution']}²", f"{row['latent']}²", f"{row['tokens']}²", f"{row['sit_step_s']:.4f}",
                 f"{row.get('sit_step_vs_256', float('nan')):.3f}", f"{row['sit_forward_backward_s']:.4f}",
                 f"{row.get('sit_forward_backward_vs_256', float('nan')):.3f}"]
        if args.vfm:
            cells += [f"{row['vfm_forward_s']:.4f}", f"{row.get('vfm_forward_vs_256', float('nan')):.3f}"]
        print("| " + " | ".join(cells) + " |")
    meta = {"model": args.model, "preset": args.preset, "batch": args.batch, "dtype": args.dtype,
            "device": args.device, "threads": torch.get_num_threads(), "vfm": args.vfm, "torch": torch.__version__}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": meta, "rows": rows}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
