"""A time or rate the docs state about this project says where it comes from.

Every number with a unit of time or throughput (s, min, h, images/s, GB/s, "N× faster", ...) in README.md
and docs/ outside docs/benchmarks.md must either be marked as an estimate, a bound or a default on its line
(≈, about, estimated, at most, up to, under, modelled, expected, default), or sit in a section that names the
command producing it (a `benchmarks/*.py` script, a `reglue` command, a test file) or points to
docs/benchmarks.md, or be the paper's. docs/benchmarks.md itself names the command of every section.
"""

from __future__ import annotations

import re

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:ms|s|min|minutes|h|hours|seconds|× (?:faster|slower|the)|"
                    r"images/s|img/s|rows/s|GB/s|it/s|step/s)(?![\w/])")
MARKED = re.compile(r"≈|~|\babout\b|estimat|\broughly\b|\bat most\b|\bup to\b|\bunder\b|\bmodelled\b|\bexpected\b|"
                    r"\bdefault\b|\bpaper\b", re.IGNORECASE)
SOURCE = re.compile(r"benchmarks/\w+\.py|benchmarks\.md|python benchmarks/|\bmeasured\b|`reglue [a-z-]+|"
                    r"tests/test_\w+\.py", re.IGNORECASE)


def prose(text: str) -> str:
    """``text`` without code blocks, and without inline code other than commands and scripts."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    return re.sub(r"`[^`]*`", lambda m: m.group(0) if re.match(r"`(reglue |python |.*benchmarks/)", m.group(0))
                  else "``", text)


def unsourced() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        if path.name == "benchmarks.md":
            continue
        for section in re.split(r"\n(?=#{2,4} )", prose(path.read_text())):
            if SOURCE.search(section):
                continue
            for paragraph in re.split(r"\n\s*\n", section):
                lines = paragraph.splitlines() if paragraph.lstrip().startswith("|") else [paragraph]
                found += [(path.name, " ".join(line.split())[:120]) for line in lines
                          if NUMBER.search(line) and not MARKED.search(line)]
    return found


def test_every_time_and_rate_in_the_docs_names_its_source_or_says_it_is_an_estimate():
    assert unsourced() == []


def test_the_check_finds_an_unsourced_time():
    """The patterns still catch what they are for: a bare measurement fails, a marked or sourced one passes."""
    assert NUMBER.search("sampling took 42 s") and not MARKED.search("sampling took 42 s")
    assert MARKED.search("≈ 42 s") and SOURCE.search("measured with `reglue sample`")


def test_every_benchmarks_section_names_its_command():
    text = (REPO / "docs" / "benchmarks.md").read_text()
    for section in re.split(r"\n(?=## )", text)[1:]:
        heading = section.splitlines()[0]
        assert re.search(r"benchmarks/\w+\.(?:py|sh)|`reglue [a-z-]+|reglue [a-z-]+", section), heading
