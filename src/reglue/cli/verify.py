"""``reglue verify``: every file of a prepared dataset against its recorded size and checksum."""

from __future__ import annotations

import argparse

from reglue.cli.options import add_resolution_check, confirm_data_resolution

NAME = "verify"
HELP = ("check every file of a prepared dataset against its recorded size and checksum; exit 0 only when all "
        "is well")
DESCRIPTION = ("Lists each damaged file (truncated, overwritten, missing, unknown) with the command that repairs "
               "it, then files, bytes and GB/s checked. See docs/data-format.md.")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="a prepared dataset directory")
    parser.add_argument("--reindex", action="store_true",
                        help="record the checksums of shards indexed without them (by an older reglue), then verify")
    parser.add_argument("--workers", type=int, default=None, help="threads reading in parallel (default: one per CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_resolution_check(parser, "DATA was prepared")


def run(args: argparse.Namespace) -> int:
    from reglue.data.integrity import verify_dataset
    from reglue.progress import progress_bar

    confirm_data_resolution(args)
    with progress_bar(total=None, unit="B", unit_scale=True, desc="verify", enabled=not args.quiet) as bar:
        report = verify_dataset(args.data, reindex=args.reindex, workers=args.workers, progress=bar.update,
                                planned=bar.reset)
    for damage in report.damaged:
        print(damage)
    if notice := report.legacy_notice():
        print(notice)
    print(report.summary())
    return 0 if report.ok else 1
