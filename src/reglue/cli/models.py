"""``reglue models``: the registered SiT sizes and method presets, and parameter counts."""

from __future__ import annotations

import argparse

NAME = "models"
HELP = "list the registered SiT sizes and method presets"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", nargs="*", metavar="NAME", help="also count the parameters of NAME (e.g. SiT-B/2)")


def run(args: argparse.Namespace) -> int:
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
