"""The ``reglue`` command: argument parsing only; the work lives in the library modules."""

from __future__ import annotations

import argparse
import sys

from reglue import __version__


def _list_models(args: argparse.Namespace) -> int:
    from reglue.models.sit import SIT_MODELS, build_sit
    from reglue.presets import PRESETS

    print("models:  " + ", ".join(SIT_MODELS))
    print("presets: " + ", ".join(f"{p.name} (paper FID {p.paper_fid})" for p in PRESETS.values()))
    if args.count:
        for name in args.count:
            model = build_sit(name)
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"{name} (REGLUE heads, 20 input channels): {n / 1e6:.1f}M trainable parameters")
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
