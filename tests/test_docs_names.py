"""Every config key, repository path and module file that README.md and docs/ name exists today.

A renamed key (``train.mixed_precision``) or a moved file left in the docs sends a reader to something that
is not there; docs/configuration.md's table of renames is the one place old names may appear.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from conftest import REPO
from reglue.config import RENAMED_KEYS, RETIRED_KEYS, RunConfig

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = tuple(name for name, hint in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(hint))
KEY = re.compile(rf"`((?:{'|'.join(SECTIONS)})\.[a-z_][a-z_.]*[a-z_])")
PATH = re.compile(r"`((?:configs|benchmarks|scripts|tests|src/reglue|reglue)/[^`\s*{}]+)`")
# names in backticks that look like config keys and are not: a file name, an attribute, a function; and the
# DINOv2 config keys the teacher's recipe table cites (its own namespace)
NOT_KEYS = {"model.safetensors", "model.check_inputs", "checkpoint.save_state_file"}
FOREIGN_SECTION = "### The ViT-B recipe"  # docs/teacher.md: DINOv2's keys, quoted from its config


def resolves(key: str) -> bool:
    """``key`` names a field of RunConfig (a mapping-typed field, e.g. data.vfm, may take sub-keys)."""
    cls, parts = RunConfig, key.split(".")
    for i, part in enumerate(parts):
        hint = typing.get_type_hints(cls).get(part)
        if hint is None:
            return False
        if not dataclasses.is_dataclass(hint):
            last = i == len(parts) - 1
            return last or any(arg is dict or typing.get_origin(arg) is dict for arg in typing.get_args(hint) or (hint,))
        cls = hint
    return True


def named(pattern: re.Pattern) -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        if FOREIGN_SECTION in text:
            head, tail = text.split(FOREIGN_SECTION, 1)
            text = head + tail.split("\n## ", 1)[-1] if "\n## " in tail else head
        if path.name != "configuration.md":  # its rename table lists the old names on purpose
            found += [(path.name, name) for name in pattern.findall(text)]
    return sorted(set(found))


KEYS, PATHS = named(KEY), named(PATH)


def test_the_docs_name_config_keys_and_paths():
    assert len(KEYS) > 40 and len(PATHS) > 30  # the patterns still find what they are for


@pytest.mark.parametrize(("doc", "key"), KEYS, ids=[f"{d}:{k}" for d, k in KEYS])
def test_a_config_key_the_docs_name_exists(doc, key):
    if key in NOT_KEYS:
        return
    assert key not in RENAMED_KEYS, f"{doc} names {key}, which was renamed {RENAMED_KEYS[key][0]}"
    assert resolves(key) or key in RETIRED_KEYS, f"{doc} names the config key {key}, which RunConfig does not have"


@pytest.mark.parametrize(("doc", "path"), PATHS, ids=[f"{d}:{p}" for d, p in PATHS])
def test_a_path_the_docs_name_exists(doc, path):
    path = path.rstrip(".,:;)")
    if path.startswith("benchmarks/results/"):  # what a benchmark writes (git-ignored), not part of the repository
        return
    candidates = [REPO / path, REPO / "src" / path]  # reglue/… module paths live under src/
    assert any(p.exists() for p in candidates), f"{doc} names {path}, which does not exist"
