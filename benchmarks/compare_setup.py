"""What `reglue compare` adds before any training, at ImageNet's shape.

- **Linking the data copies** (`reglue.data.store.link_prepared`): per copy, one index read and
  rewritten and three hard links per shard — the cost is per shard, not per byte, so a dataset of
  ``--shards`` shards (1,282 for ImageNet at 1,000 images a shard) with one row each times it.
- **`loss.semantic_norm`'s statistics** (`reglue.training.target_stats`): a fresh run reads the cached
  semantics and CLS of at most STATS_IMAGES training rows once; the bytes are counted from the cached
  arrays' shapes (float16) at ``--resolution`` for the reglue preset.

    python benchmarks/compare_setup.py                    # 1,282 shards, 256²
    python benchmarks/compare_setup.py --shards 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmarks
from data_loading import VFM_WIDTH, write_dataset  # noqa: E402

from reglue.data import store  # noqa: E402
from reglue.presets import get_preset  # noqa: E402
from reglue.training.target_stats import STATS_IMAGES  # noqa: E402

IMAGENET_SHARDS = 1282


def link_seconds(shards: int, root: Path) -> dict:
    """Seconds to link a prepared dataset of ``shards`` one-row shards into a copy, and the files linked."""
    data, copy = root / "data", root / "copy"
    write_dataset(data, shards=shards, rows_per_shard=1, resolution=64)
    start = time.perf_counter()
    linked = store.link_prepared(data, copy)
    return {"shards": shards, "files_linked": linked, "seconds": time.perf_counter() - start}


def semantic_norm_bytes(resolution: int) -> dict:
    """Bytes `loss.semantic_norm` reads once per fresh run: the float16 semantics (S, R/16, R/16) and CLS (D)."""
    grid, channels = resolution // 16, get_preset("reglue").semantic_channels
    per_image = 2 * (channels * grid * grid + VFM_WIDTH)
    return {"images": STATS_IMAGES, "bytes_per_image": per_image, "megabytes": STATS_IMAGES * per_image / 1e6}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=IMAGENET_SHARDS)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="compare-setup-"))
    try:
        result = {"link": link_seconds(args.shards, root), "semantic_norm": semantic_norm_bytes(args.resolution)}
    finally:
        shutil.rmtree(root)
    link, norm = result["link"], result["semantic_norm"]
    print(f"link_prepared: {link['shards']} shards, {link['files_linked']} files linked in {link['seconds']:.2f} s "
          f"({1e3 * link['seconds'] / link['shards']:.2f} ms per shard)")
    print(f"loss.semantic_norm: {norm['images']} images × {norm['bytes_per_image']} B = {norm['megabytes']:.1f} MB "
          f"read once at {args.resolution}²")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
