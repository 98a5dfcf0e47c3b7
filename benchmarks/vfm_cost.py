"""FLOPs of one 256² image through each registered teacher, relative to DINOv2-B (docs/vfm.md).

    python benchmarks/vfm_cost.py [--resolution 256]

Counts, with ``FlopCounterMode`` on meta tensors (no weights, no compute), the forward of the real
full-size extractor (:func:`reglue.encoders.vfm.build_vfm`, timm models built with ``pretrained=False``):
preprocessing, every block, the final norm on the blocks REGLUE reads and the CLS pooling (SigLIP's
attention-pool head). A multiply-add counts as 2 FLOPs. Prints one Markdown row per teacher: input side
and patch grid, width D, the L·D channels of the four blocks the compressor reads, parameters, GFLOPs
per image and the ratio to ``dinov2_vitb14_reg``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from reglue.encoders.vfm import VFM_MODELS, build_vfm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmarks
from compare import flops_of  # noqa: E402

BASELINE = "dinov2_vitb14_reg"
TEACHERS = (BASELINE, "dinov3_vitb16", "clip_vitl14", "siglip_vitb16", "mae_vitb16", "mae_vitl16", "ijepa_vith14")


def teacher_cost(name: str, resolution: int) -> dict[str, float]:
    """Input side, grid, width, feature channels, parameters and forward FLOPs of one image through ``name``."""
    with torch.device("meta"):
        extractor = build_vfm(name, weights=None, resolution=resolution)
        image = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8)
    return {"input": extractor.input_size, "grid": extractor.grid_size, "width": extractor.embed_dim,
            "channels": extractor.feature_width, "params": sum(p.numel() for p in extractor.vit.parameters()),
            "flops": flops_of(lambda: extractor(image))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args(argv)
    costs = {name: teacher_cost(name, args.resolution) for name in TEACHERS}
    base = costs[BASELINE]["flops"]
    print(f"forward of one {args.resolution}² image (FlopCounterMode, meta tensors)")
    print("| teacher | timm model | input | grid | D | 4·D channels | parameters | GFLOPs | × DINOv2-B |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cost in costs.items():
        timm_name = VFM_MODELS[name].timm_name or "DINOv2ViT (reglue)"
        print(f"| `{name}` | `{timm_name}` | {cost['input']}² | {cost['grid']}² | {cost['width']} | "
              f"{cost['channels']:,} | {cost['params'] / 1e6:.0f} M | {cost['flops'] / 1e9:.1f} | "
              f"{cost['flops'] / base:.2f} |")


if __name__ == "__main__":
    main()
