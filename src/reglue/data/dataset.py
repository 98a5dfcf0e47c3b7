"""Reading a prepared dataset at training time: memory-mapped, random access, worker-safe."""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from reglue.data import store


class PreparedDataset(Dataset):
    """Rows of a ``reglue prepare`` directory as dicts of tensors.

    ``fields`` picks the per-image arrays to return (``"moments"`` (8, R/8, R/8) float32,
    ``"images"`` (3, R, R) uint8, and arrays added later such as cached semantics); ``label``
    (int64, −1 when unconditional) is always returned. ``resolution`` / ``vae``, when given,
    must match the manifest; ``vfm`` (a :class:`~reglue.encoders.semantics.VFMSpec` as JSON),
    when given, must match the VFM that produced cached semantics. Shards are memory-mapped
    lazily in each process, so the dataset works with DataLoader workers and a
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
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    def _check(self, key: str, wanted) -> None:
        if wanted is not None and self.manifest[key] != wanted:
            raise ValueError(
                f"{self.root} was prepared with {key} {self.manifest[key]!r} but training asks for "
                f"{wanted!r}; prepare the data again with --{key} {wanted} or change the run's config."
            )

    @property
    def semantics_info(self) -> dict | None:
        """What produced the cached semantics (``semantics.json``), or None without a cache."""
        path = self.root / store.SEMANTICS_INFO
        return json.loads(path.read_text()) if path.is_file() else None

    def _check_vfm(self, vfm: str | None) -> None:
        cached = set(self.fields) & {"semantics", "cls", "repa"}
        if vfm is None or not cached:
            return
        recorded = (self.semantics_info or {}).get("vfm")
        if recorded is None or json.loads(recorded) != json.loads(vfm):
            raise ValueError(
                f"the semantics cached in {self.root} were made with VFM {recorded} but training asks for "
                f"{vfm}; re-run `reglue cache-semantics` with that VFM or change the run's config."
            )

    def _check_fields_exist(self) -> None:
        first = next((i for i, name in enumerate(self.shard_names) if self.offsets[i + 1] > self.offsets[i]), None)
        if first is None:
            return
        for name in (*self.fields, "labels"):
            path = self.root / store.SHARDS_DIR / self.shard_names[first] / f"{name}.npy"
            if not path.is_file():
                hint = "run `reglue cache-semantics`" if name not in store.SHARD_ARRAYS else "re-run `reglue prepare`"
                raise FileNotFoundError(f"{path} is missing: the dataset has no '{name}' array; {hint}.")

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    def __len__(self) -> int:
        return self.offsets[-1]

    def _array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._arrays:
            self._arrays[key] = np.load(
                self.root / store.SHARDS_DIR / self.shard_names[shard] / f"{name}.npy", mmap_mode="r"
            )
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
        state["_arrays"] = {}
        return state
