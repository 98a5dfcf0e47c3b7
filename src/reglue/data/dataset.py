"""Reading a prepared dataset at training time: memory-mapped, random access, worker-safe."""

from __future__ import annotations

import bisect
import functools
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from reglue.data import integrity, store


def random_subset(dataset: Dataset, num_images: int, seed: int = 0) -> Subset:
    """min(num_images, len) rows chosen by a seeded permutation, in index order (memory-map locality)."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, found {num_images}.")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(dataset), generator=generator)[:num_images].sort().values.tolist()
    return Subset(dataset, chosen)


OPEN_ARRAYS = 64  # memory maps kept open per process


class PreparedDataset(Dataset):
    """Rows of a ``reglue prepare`` directory as dicts of tensors.

    ``fields`` picks the per-image arrays to return (``"moments"`` (8, R/8, R/8) float32,
    ``"images"`` (3, R, R) uint8, and arrays added later such as cached semantics); ``label``
    (int64, −1 when unconditional) is always returned. ``resolution`` / ``vae``, when given,
    must match the manifest; ``vfm`` (a :class:`~reglue.encoders.semantics.VFMSpec` as JSON),
    when given, must match the VFM that produced cached semantics. Opening checks every shard
    file's size against its record (:func:`reglue.data.integrity.check_sizes`). Shards are
    memory-mapped lazily in each process, so the dataset works with DataLoader workers and a
    DistributedSampler.
    """

    def __init__(
        self,
        root: str | Path,
        fields: Sequence[str] = ("moments", "images"),
        resolution: int | None = None,
        vae: str | None = None,
        vfm: str | None = None,
    ):
        self.root = Path(root)
        self.manifest = store.read_manifest(self.root)
        self._check("resolution", resolution)
        self._check("vae", vae)
        self.fields = tuple(fields)
        self.shard_names = [s["name"] for s in self.manifest["shards"]]
        self.offsets = np.cumsum([0] + [s["count"] for s in self.manifest["shards"]]).tolist()
        self._check_fields_exist()
        self._check_vfm(vfm)
        integrity.check_sizes(self.root, self.manifest)
        self._arrays: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()

    def _check(self, key: str, wanted) -> None:
        if wanted is not None and self.manifest[key] != wanted:
            raise ValueError(
                f"{self.root} was prepared with {key} {self.manifest[key]!r} but training asks for "
                f"{wanted!r}; prepare the data again with --{key} {wanted} or change the run's config."
            )

    @functools.cached_property
    def semantics_info(self) -> dict | None:
        """What produced the cached semantics (``semantics.json``, read once), or None without a cache."""
        path = self.root / store.SEMANTICS_INFO
        return store.read_json(path, integrity.SEMANTICS_REMEDY) if path.is_file() else None

    def _check_vfm(self, vfm: str | None) -> None:
        cached = set(self.fields) & set(store.CACHED_ARRAYS)
        if vfm is None or not cached:
            return
        recorded = (self.semantics_info or {}).get("vfm")
        if recorded is None or json.loads(recorded) != json.loads(vfm):
            raise ValueError(
                f"the semantics cached in {self.root} were made with VFM {recorded} but training asks for "
                f"{vfm}; re-run `reglue cache-semantics` with that VFM or change the run's config."
            )

    def _check_fields_exist(self) -> None:
        unknown = set(self.fields) - set(store.SHARD_ARRAYS) - set(store.CACHED_ARRAYS)
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; choose from {store.SHARD_ARRAYS + store.CACHED_ARRAYS}.")
        cached = [name for name in self.fields if name in store.CACHED_ARRAYS]
        info = self.semantics_info or {}
        missing = [name for name in cached if name not in info.get("fields", ())]
        if cached and (missing or not info.get("complete")):
            what = f"has no cached {missing}" if missing else "holds an unfinished semantic cache"
            raise FileNotFoundError(
                f"{self.root} {what}; run `reglue cache-semantics {self.root}` "
                f"(with --repa-targets for 'repa') to finish it."
            )

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    def __len__(self) -> int:
        return self.offsets[-1]

    def _array(self, shard: int, name: str) -> np.ndarray:
        """A memory-mapped shard array; at most OPEN_ARRAYS stay open (one file descriptor each)."""
        key = (shard, name)
        if key in self._arrays:
            self._arrays.move_to_end(key)
        else:
            self._arrays[key] = store.open_array(self.root, shard, name)
            if len(self._arrays) > OPEN_ARRAYS:
                self._arrays.popitem(last=False)
        return self._arrays[key]

    def locate(self, index: int) -> tuple[int, int]:
        """Global row -> (shard, row within the shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images.")
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard, row = self.locate(index)
        item = {"label": torch.tensor(int(self._array(shard, "labels")[row]))}
        for name in self.fields:
            value = torch.from_numpy(np.array(self._array(shard, name)[row]))
            item[name] = value.permute(2, 0, 1) if name == "images" else value  # HWC -> CHW
        return item

    def __getstate__(self) -> dict:  # memory maps are reopened in each worker
        state = self.__dict__.copy()
        state["_arrays"] = OrderedDict()
        return state
