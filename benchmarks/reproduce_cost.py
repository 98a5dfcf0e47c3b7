"""Compute, disk and wall time of the paper's runs on one 8 × H100 node (docs/reproduce.md).

    python benchmarks/reproduce_cost.py            # Markdown tables: Table 1 (five SiT-B/2 runs) and XL/2

FLOPs per image are counted with ``FlopCounterMode`` on meta tensors (no weights, no compute) over the
networks each stage runs, built from the same classes as the pipeline: the SD-VAE (diffusers'
``AutoencoderKL`` with sd-vae-ft-ema's configuration) for prepare and for decoding samples, DINOv2-B/14
with 4 registers at 224² for norm-stats, the compressor and the cache, REGLUE's SiT for training (forward
+ backward, cached semantics) and sampling (forward per sampler step), and the evaluation networks. A stage's
time is its FLOPs ÷ (8 GPUs × 989 TFLOP/s dense bf16 × MFU) at the MFUs given (40 % and 20 % by default:
diffusion transformers of this size are reported at 15–40 %; the I/O-bound stages, prepare's JPEG decoding
and the cache's writes, run below it). Disk is the prepared dataset's bytes per image
(docs/data-format.md) and the checkpoint files' sizes (fp32 model, EMA and the two AdamW moments).
Estimates, not measurements: no GPU ran them here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from reglue.encoders.vfm import build_vfm
from reglue.models.sit import build_sit
from reglue.presets import get_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmarks
from compare import PEAK_TFLOPS, flops_of, sit_training_flops  # noqa: E402

IMAGENET = 1_281_167
GPUS, PEAK = 8, PEAK_TFLOPS["H100"] * 1e12  # one node of H100 SXM, dense bf16
GiB = 1024**3
SD_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32)
# bytes per 256² image on disk (docs/data-format.md): images + moments + labels, the semantic cache, REPA targets
PREPARED, SEMANTICS, REPA = 229_384, 8_192 + 1_536, 394_752
B2_STEPS, XL2_STEPS, BATCH = 400_000, 800_000, 256
PCA_SEMANTICS = 8 * 16 * 16 * 2 + 1_536  # ReDi's rank-8 float16 maps and the CLS
NORM_STATS_IMAGES, PCA_IMAGES, COMPRESSOR_EPOCHS, SAMPLES = 76_800, 10_000, 25, 50_000


def per_image() -> dict[str, float]:
    """FLOPs per 256² image of every network the recipe runs."""
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
        image, latent = torch.zeros(1, 3, 256, 256), torch.zeros(1, 4, 32, 32)
        flops = {"vae_encode": flops_of(lambda: vae.encode(image)), "vae_decode": flops_of(lambda: vae.decode(latent))}
        for name in ("SiT-B/2", "SiT-XL/2"):
            model = build_sit(name, **get_preset("reglue").model_kwargs(vfm_dim=768))
            flops[f"{name} train"] = sit_training_flops(model)  # forward + backward, one image
            c = model.config
            x, t, y, z = (torch.zeros(1, c.in_channels, c.input_size, c.input_size), torch.zeros(1),
                          torch.zeros(1, dtype=torch.long), torch.zeros(1, c.z_dim))
            with torch.no_grad():
                flops[f"{name} forward"] = flops_of(lambda m=model: m(x, t, y, z))
    vfm = build_vfm("dinov2_vitb14_reg", weights=None, resolution=256)  # on the CPU: autocast has no meta device
    with torch.no_grad():
        flops["dinov2_b"] = flops_of(lambda: vfm(torch.zeros(1, 3, 256, 256, dtype=torch.uint8)))
    return flops


def stages(flops: dict[str, float], model: str, steps: int, runs: int, sampler_steps: int, guided: bool,
           redi: bool) -> list:
    """(stage, FLOPs, disk bytes written) of the recipe for ``runs`` training runs of ``model``; ``redi``: with
    ReDi's PCA cached into a copy of the dataset (a dataset holds one semantic cache)."""
    forwards = sampler_steps * (2 if guided else 1)  # guided: the unconditional pass too (all steps, an upper bound)
    redi_rows = [
        ("ReDi: norm-stats of the last block + fit-pca", (NORM_STATS_IMAGES + PCA_IMAGES) * flops["dinov2_b"], 0),
        ("ReDi: a copy of the dataset + cache-semantics (PCA)", IMAGENET * flops["dinov2_b"],
         IMAGENET * (PREPARED + PCA_SEMANTICS)),
    ] if redi else []
    return [
        ("prepare (SD-VAE encode)", IMAGENET * flops["vae_encode"], IMAGENET * PREPARED),
        ("norm-stats", NORM_STATS_IMAGES * flops["dinov2_b"], 0),
        ("train-compressor (25 epochs, DINOv2 online)", COMPRESSOR_EPOCHS * IMAGENET * flops["dinov2_b"], 0),
        ("cache-semantics (+ REPA targets)", IMAGENET * flops["dinov2_b"], IMAGENET * (SEMANTICS + REPA)),
        *redi_rows,
        (f"train {runs} × {model}, {steps // 1000}K steps × {BATCH}", runs * steps * BATCH * flops[f"{model} train"], 0),
        (f"sample {runs} × 50K, SDE {sampler_steps}{', CFG' if guided else ''}",
         runs * SAMPLES * (forwards * flops[f"{model} forward"] + flops["vae_decode"]), runs * SAMPLES * 196_608),
    ]


def checkpoint_bytes(model: str) -> int:
    """fp32 model + EMA + AdamW's two moments (the EMA has no projector: counted with it, an upper bound)."""
    with torch.device("meta"):
        count = sum(p.numel() for p in build_sit(model, **get_preset("reglue").model_kwargs(vfm_dim=768)).parameters())
    return 4 * 4 * count


def table(rows: list, mfus: list[float]) -> str:
    hours = " | ".join(f"hours at {mfu:.0%} MFU" for mfu in mfus)
    lines = [f"| stage | EFLOP | {hours} | disk written |", "|---|---|" + "---|" * len(mfus) + "---|"]
    for stage, flops, disk in rows:
        times = " | ".join(f"{flops / (GPUS * PEAK * mfu) / 3600:.2f}" for mfu in mfus)
        lines.append(f"| {stage} | {flops / 1e18:.3f} | {times} | {disk / 1e9:,.0f} GB |")
    total = sum(r[1] for r in rows)
    times = " | ".join(f"**{total / (GPUS * PEAK * mfu) / 3600:.1f}**" for mfu in mfus)
    lines.append(f"| **total** | **{total / 1e18:.1f}** | {times} | **{sum(r[2] for r in rows) / 1e9:,.0f} GB** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.4, 0.2], help="model FLOPs utilisations")
    args = parser.parse_args(argv)
    flops = per_image()
    print("GFLOP per 256² image: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items()))
    for model in ("SiT-B/2", "SiT-XL/2"):
        print(f"{model} checkpoint (model + EMA + AdamW, fp32): {checkpoint_bytes(model) / 1e9:.1f} GB")
    print("\nTable 1 (SiT, REPA, ReDi, REG, REGLUE at SiT-B/2, unguided):\n")
    print(table(stages(flops, "SiT-B/2", B2_STEPS, 5, 250, guided=False, redi=True), args.mfu))
    print("\nSiT-XL/2 headline (800K steps, guided):\n")
    print(table(stages(flops, "SiT-XL/2", XL2_STEPS, 1, 250, guided=True, redi=False), args.mfu))


if __name__ == "__main__":
    main()
