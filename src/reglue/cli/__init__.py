"""The ``reglue`` command: argument parsing only; the work lives in the library modules.

Each command is one module of this package with ``NAME``, ``HELP``, ``configure(parser)`` and
``run(args) -> exit status``; :func:`build_parser` is a loop over :data:`COMMANDS`. Shared options and
their one vocabulary are in :mod:`reglue.cli.options`.

Errors the user can fix — everything reglue refuses on purpose (:mod:`reglue.errors`: bad input,
mismatched settings, damaged files, a missing optional package), file-system errors (a missing path,
a full disk, no permission) and running out of memory — are printed as one line and exit with
status 2; set ``REGLUE_DEBUG=1`` to see the traceback instead. Anything else is a bug: its traceback
is shown and the status is 1.

Each command imports the library modules it needs inside its ``run``: ``reglue --help`` and a
mistyped option then answer at once instead of first loading torch, timm and diffusers. This package
is the one place that defers imports (tests/test_layers.py keeps it so).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from reglue import __version__
from reglue.cli import (
    cache_semantics,
    compare,
    demo,
    evaluate,
    fit_pca,
    grid,
    models,
    norm_stats,
    plot,
    prepare,
    probe_vfm,
    sample,
    train,
    train_compressor,
    train_vfm,
    verify,
)
from reglue.errors import ReglueError

# in the order `reglue --help` lists them: the pipeline's order, then the tools
COMMANDS = (models, prepare, norm_stats, train_compressor, train_vfm, probe_vfm, train, sample, grid, evaluate, plot,
            fit_pca, cache_semantics, verify, compare, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reglue",
        description="REGLUE: latent diffusion with global and local DINOv2 semantics in one SiT.",
    )
    parser.add_argument("--version", action="version", version=f"reglue {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.NAME, help=command.HELP, description=getattr(command, "DESCRIPTION", None))
        command.configure(sub)
        sub.set_defaults(func=command.run)
    return parser


def _for_the_user(err: BaseException) -> bool:
    """Errors the user can act on (reported in one line); anything else is a bug."""
    out_of_memory = isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    return isinstance(err, (ReglueError, OSError)) or out_of_memory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as the commands read it (usage errors exit with status 2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after a command's options too (argparse takes only the run before the
    # first option); anything else unknown is the usual usage error.
    if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except Exception as err:
        if os.environ.get("REGLUE_DEBUG") == "1" or not _for_the_user(err):
            raise  # a bug: the traceback, exit status 1
        message = " ".join(str(err).split())
        print(f"reglue {args.command}: error: {message}", file=sys.stderr)
        return 2
    if "torch" in sys.modules:  # a command that loaded torch may have set up a process group
        from reglue.distributed import end_process_group

        end_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
