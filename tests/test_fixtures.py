"""The compatibility vectors and test images shipped in tests/fixtures are ../shared's, byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import FIXTURES, shared_source

SHIPPED = ("compat", "testdata/real_images")  # what tests/fixtures mirrors of ../shared


def files_under(root: Path) -> dict[str, str]:
    """{path relative to root: sha256} of every file below each of SHIPPED."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for part in SHIPPED for path in sorted((root / part).rglob("*")) if path.is_file()}


def test_the_shipped_fixtures_equal_the_shared_folder():
    shared = files_under(shared_source())
    shipped = files_under(FIXTURES)
    assert shared, "../shared holds none of the fixtures"
    assert sorted(shipped) == sorted(shared), "tests/fixtures lists other files than ../shared"
    differing = [name for name, digest in shared.items() if shipped[name] != digest]
    assert not differing, f"tests/fixtures differs from ../shared in {differing}: copy ../shared's files again"


def test_the_shipped_fixtures_stay_small():
    size = sum(path.stat().st_size for path in FIXTURES.rglob("*") if path.is_file())
    assert 0 < size <= 15 * 2**20, f"tests/fixtures holds {size / 2**20:.1f} MiB; the limit is 15 MiB"
