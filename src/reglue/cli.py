"""The ``reglue`` command: argument parsing only; the work lives in the library modules."""

from __future__ import annotations

import argparse
import sys

from reglue import __version__


def _list_models(args: argparse.Namespace) -> int:
    import torch

    from reglue.models.sit import SIT_MODELS, build_sit
    from reglue.presets import PRESETS

    print("models:  " + ", ".join(SIT_MODELS))
    print("presets: " + ", ".join(f"{p.name} (paper FID {p.paper_fid})" for p in PRESETS.values()))
    if args.count:
        for name in args.count:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reglue",
        description="REGLUE: latent diffusion with global and local DINOv2 semantics in one SiT.",
    )
    parser.add_argument("--version", action="version", version=f"reglue {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    models = commands.add_parser("models", help="list the registered SiT sizes and method presets")
    models.add_argument(
        "--count", nargs="*", metavar="NAME", help="also build NAME (e.g. SiT-B/2) and count parameters"
    )
    models.set_defaults(func=_list_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
