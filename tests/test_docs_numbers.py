"""A time, rate or size the docs state about this project says where it comes from.

Every number with a unit of time, throughput, size or compute, or a count of the project's things (s, min, h,
images/s, GB/s, "N× faster", B, KiB, GB, GFLOP, tests, files, tensors, parameters, shards, ...) in README.md
and docs/ outside docs/benchmarks.md must either be marked as an estimate, a bound or a default on its line
(≈, about, estimated, at most, up to, under, modelled, expected, default), or sit in a section that names the
command producing it (a `benchmarks/*.py` script, a `reglue` command, a test file) or points to
docs/benchmarks.md, or be the paper's. docs/benchmarks.md itself names the command of every section.
"""

from __future__ import annotations

import re

import numpy as np

from conftest import REPO
from reglue.cli import main
from reglue.data.synthetic import write_synthetic_dataset

IMAGENET = 1_281_167

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:ms|s|min|minutes|h|hours|seconds|× (?:faster|slower|the)|"
                    r"images/s|img/s|rows/s|GB/s|it/s|step/s|B|KiB|MiB|GiB|KB|MB|GB|TB|GFLOP|TFLOP|EFLOP|"
                    r"tests|files|commands|tensors|parameters|lines|checks|cases|modules|shards)(?![\w/])")
MARKED = re.compile(r"≈|~|≥|≤|\babout\b|estimat|\broughly\b|\bat most\b|\bup to\b|\bunder\b|\bmodelled\b|"
                    r"\bexpected\b|\bdefault\b|\bpaper\b", re.IGNORECASE)
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


def test_the_size_per_image_table_is_what_prepare_writes(tmp_path):
    """docs/data-format.md's bytes per image at each resolution are the arrays `reglue prepare` writes, and
    its ImageNet column is them × 1,281,167."""
    text = (REPO / "docs" / "data-format.md").read_text().split("## Size per image", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+)² \| ([\d,]+) B \| ([\d,]+) B \| ([\d,]+) B \| ([\d,]+) B .*\| ([\d.]+) (GB|TB) \|$",
                      text, flags=re.MULTILINE)
    assert len(rows) == 4
    source = write_synthetic_dataset(tmp_path / "src", images_per_class=1, size=512, num_classes=2)
    for side, images, moments, label, total, imagenet, unit in rows:
        data = tmp_path / f"data{side}"
        assert main(["prepare", str(source), str(data), "--resolution", side, "--vae", "pixel", "--quiet"]) == 0
        shard = next((data / "shards").iterdir())
        written = [np.load(shard / f"{name}.npy", mmap_mode="r").nbytes // 2 for name in ("images", "moments", "labels")]
        stated = [int(v.replace(",", "")) for v in (images, moments, label)]
        assert written == stated and sum(written) == int(total.replace(",", "")), side
        scale = 1e9 if unit == "GB" else 1e12
        assert f"{sum(written) * IMAGENET / scale:.{len(imagenet.partition('.')[2])}f}" == imagenet, side
