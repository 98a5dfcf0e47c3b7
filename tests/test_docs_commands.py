"""The `reglue …` commands shown in README.md and docs/ stay true to today's command line.

Commands in bash blocks must parse as written; commands quoted inline in prose are often
fragments (``reglue prepare --vae pixel``), so for those every command and option must exist.
"""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from conftest import REPO
from reglue.cli import build_parser, parse_args

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_VALUES = {"${p}": "reglue", "$RANK": "0", "$HOST": "localhost", "$R": "128"}
INVOCATION = re.compile(r"(?:^|&&\s*|\s)(?:\S*/)?(?:reglue|-m reglue\.cli)\s+([a-z].*)$")


def block_commands() -> list[tuple[str, str]]:
    """(file name, arguments) of each reglue invocation in the docs' bash blocks."""
    found = []
    for path in DOCS:
        for language, block in re.findall(r"```([\w-]*)\n(.*?)```", path.read_text(), flags=re.DOTALL):
            if language not in ("", "bash", "sh"):  # a ```text or ```python block pairs its fences too
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                for name, value in SHELL_VALUES.items():
                    line = line.replace(name, value)
                match = INVOCATION.search(line)
                if match:
                    found.append((path.name, match.group(1).split("&&")[0].split(";")[0]))
    return found


def inline_commands() -> list[tuple[str, str]]:
    """(file name, arguments) of each `reglue …` code span with at least one argument."""
    found = []
    for path in DOCS:
        for span in re.findall(r"`(?:\S*/)?reglue ([a-z][^`]*)`", path.read_text().replace("\n", " ")):
            if " " in span:
                found.append((path.name, span))
    return found


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


BLOCKS, INLINE = block_commands(), inline_commands()


def test_the_docs_show_the_commands_of_every_stage():
    names = {shlex.split(args)[0] for _, args in BLOCKS + INLINE}
    assert {"demo", "prepare", "norm-stats", "train-compressor", "cache-semantics", "fit-pca", "train", "sample",
            "grid", "evaluate", "plot", "verify"} <= names


@pytest.mark.parametrize(("doc", "args"), BLOCKS, ids=[f"{d}:{a[:40]}" for d, a in BLOCKS])
def test_documented_command_parses(doc, args):
    try:
        parse_args(shlex.split(args))  # as the command line parses it: KEY=VALUE may follow the options
    except SystemExit as exit_:
        pytest.fail(f"{doc}: `reglue {args}` does not parse (exit {exit_.code})")


@pytest.mark.parametrize(("doc", "args"), INLINE, ids=[f"{d}:{a[:40]}" for d, a in INLINE])
def test_quoted_command_names_existing_options(doc, args):
    name, *rest = shlex.split(args.replace("…", " "))
    commands = subcommands()
    assert name in commands, f"{doc}: `reglue {args}` names no command {name!r}"
    known = commands[name]._option_string_actions
    unknown = [word.split("=")[0] for word in rest if word.startswith("--") and word.split("=")[0] not in known]
    assert not unknown, f"{doc}: `reglue {args}` uses options {name} does not have: {unknown}"
