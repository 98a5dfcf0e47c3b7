"""Throughput of ``reglue prepare`` (decode + ADM crop + VAE moments + shard writing).

Writes N synthetic JPEG photos (ImageNet-like 500×375) to a temporary ImageFolder, then
times ``prepare_dataset`` with a randomly initialised VAE: ``tiny`` (the test-suite size) or
``sd`` (the SD-VAE architecture, the real cost per image without downloading weights).

    python benchmarks/prepare.py --vae sd --images 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from reglue.data.prepare import PrepareSettings, prepare_dataset
from reglue.encoders.vae import VAE

VAE_CONFIGS = {
    "tiny": {"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 8},
    "sd": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
}


def make_images(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        gradient = np.linspace(0, 255, 500, dtype=np.float32)[None, :, None]
        pixels = np.clip(gradient + rng.normal(0, 40, (375, 500, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", choices=sorted(VAE_CONFIGS), default="tiny")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--json", help="also write the result as JSON to this path")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    blocks = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
    autoencoder = AutoencoderKL(down_block_types=blocks[0], up_block_types=blocks[1], latent_channels=4,
                                **VAE_CONFIGS[args.vae])
    vae = VAE(autoencoder)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        make_images(src, args.images)
        settings = PrepareSettings(source=str(src), resolution=args.resolution, vae=f"random-{args.vae}",
                                   shard_size=max(args.images // 4, 1))
        start = time.perf_counter()
        summary = prepare_dataset(settings, dst, vae, batch_size=args.micro_batch)
        seconds = time.perf_counter() - start
    result = {
        "vae": args.vae, "images": summary.images, "resolution": args.resolution, "seconds": round(seconds, 2),
        "images_per_s": round(summary.images / seconds, 2), "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(f"| {args.vae} | {args.resolution} | {summary.images} | {seconds:.1f} | {result['images_per_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
