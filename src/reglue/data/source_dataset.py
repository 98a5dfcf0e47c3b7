"""Reading an image folder or zip directly at training time: ADM crops made on access, as prepare makes them.

:func:`read_crop` is the one way a source file becomes a training image: read its bytes
(:class:`~reglue.data.sources.ImageSource`), decode it (:func:`~reglue.data.images.load_image`) and
ADM-centre-crop it (:func:`~reglue.data.images.adm_center_crop`). ``reglue prepare`` stores its
result in shards; :class:`ImageSourceDataset` returns it row by row, so a folder and the dataset
prepared from it at the same resolution give the same pixels, row for row.

Which files are used is decided when the dataset is opened: every listed file is read and cropped
once, and those that fail — the files prepare skips (``BadImageError``: not an image, truncated,
too small, …, and any other read error) — are left out and listed in ``skipped``
({"path", "reason"}, prepare's ``skipped.tsv`` records), so training never meets a bad file
mid-run. The rows are the remaining files in the source's sorted order, which is the order of
prepare's rows (without ``--max-images``).

The check is split over the processes of a run and decoded by threads within each: process r of N
decodes the files r, r + N, r + 2N, … (:func:`unreadable_files`), and the unreadable ones are
gathered, so every process ends with the same rows and the same ``skipped``, whatever N is. Nothing
decoded is kept: a training row is decoded again by the loader worker that reads its batch. This is
the design that holds at ImageNet's scale: its 1.28 M files decoded at 256² would be 250 GB of pixels
per process if kept, while the rows must be known before step 1 (the held-out split and the epoch
order are drawn over them), so skipping bad files lazily, batch by batch, is not an option.
The check costs one decode per file for the whole run (5.6 ms for a 500×375 JPEG cropped to 256² on
one core here: ≈ 2 CPU-hours for ImageNet, ≈ 2 min on 8 processes of 8 threads; docs/teacher.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from reglue.data.images import MIN_SIZE, BadImageError, adm_center_crop, load_image
from reglue.data.sources import ImageSource, SourceItem, open_source, source_fingerprint
from reglue.errors import InputError
from reglue.resolution import check_resolution


def read_crop(source: ImageSource, item: SourceItem, resolution: int, min_size: int = MIN_SIZE) -> np.ndarray:
    """One source file → its ADM centre crop, uint8 (R, R, 3).

    Raises :class:`BadImageError` for every file that cannot be used (its ``reason`` is the skip
    report's): the decoder's reasons, and "unreadable (…)" for any other failure (a bad zip CRC, a
    plugin error), so that no single file can stop a job.
    """
    try:
        return adm_center_crop(load_image(source.read(item), min_size=min_size), resolution)
    except BadImageError:
        raise
    except Exception as err:  # any unreadable member: a skip, never a crash
        raise BadImageError(f"unreadable ({type(err).__name__}: {err})") from err


def unreadable_files(source: ImageSource, rows: Sequence[int], resolution: int, min_size: int = MIN_SIZE, *,
                     workers: int | None = None) -> list[tuple[int, str]]:
    """(row, reason) of each of ``source``'s files ``rows`` that :func:`read_crop` refuses, in ``rows``'
    order; decoded by ``workers`` threads (default: one per CPU, at most 8; the decoders release the GIL)."""

    def problem(row: int) -> str | None:
        try:
            read_crop(source, source.items[row], resolution, min_size)
        except BadImageError as err:
            return err.reason
        return None

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        return [(row, reason) for row, reason in zip(rows, pool.map(problem, rows)) if reason is not None]


class ImageSourceDataset(Dataset):
    """Rows of an image folder or ``.zip`` (ImageFolder layout or flat; :func:`open_source`) as dicts of tensors.

    Item i → {"images": uint8 (3, R, R), "label": int64 (−1 when unconditional)}, the fields and
    shapes of :class:`~reglue.data.dataset.PreparedDataset` with ``fields=("images",)``. Opening
    reads every file once over all processes (module doc): this one, ``rank`` of ``world_size``,
    decodes its share with ``workers`` threads, and ``gather`` (every process must call it, e.g.
    accelerate's ``gather_object``) returns the (row, reason) pairs of every process's share,
    concatenated. ``skipped`` lists the files left out, in the source's order, ``ignored`` counts
    the files without an image extension (and hidden ones). Works with DataLoader workers: a zip
    is reopened in each process.
    """

    def __init__(self, location: str | Path, resolution: int, min_size: int = MIN_SIZE, *, rank: int = 0,
                 world_size: int = 1, gather: Callable[[list], list] = lambda found: found,
                 workers: int | None = None):
        self.root = Path(location)
        self.resolution = check_resolution(resolution)
        self.min_size = min_size
        self._source = open_source(self.root)
        self._pid = os.getpid()
        listed = self._source.items
        mine = unreadable_files(self._source, range(rank, len(listed), world_size), resolution, min_size,
                                workers=workers)
        unreadable = dict(sorted(gather(mine)))  # row -> reason, in the source's order
        self.items: list[SourceItem] = [item for row, item in enumerate(listed) if row not in unreadable]
        self.skipped: list[dict[str, str]] = [{"path": listed[row].path, "reason": reason}
                                              for row, reason in unreadable.items()]
        if not self.items:
            raise InputError(
                f"none of the {len(self.skipped)} image files in {self.root} can be read (e.g. "
                f"{self.skipped[0]['path']}: {self.skipped[0]['reason']}); pass a folder or .zip of readable images."
            )

    @property
    def ignored(self) -> int:
        return self._source.ignored

    @property
    def fingerprint(self) -> dict:
        """The listed files' count and checksum (:func:`source_fingerprint`), as ``reglue prepare`` records them."""
        return source_fingerprint(self._source.items)

    @property
    def class_names(self) -> list[str]:
        return self._source.class_names

    @property
    def num_classes(self) -> int:
        return len(self._source.class_names)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images.")
        if self._pid != os.getpid():  # a forked worker: its own zip handle
            self._source, self._pid = self._source.reopened(), os.getpid()
        item = self.items[index]
        try:
            image = read_crop(self._source, item, self.resolution, self.min_size)  # (R, R, 3)
        except BadImageError as err:
            raise InputError(
                f"{self.root / item.path} was readable when the dataset was opened but is not now ({err.reason}); "
                "the source changed during the run: restore the file, or start the run again."
            ) from err
        return {"images": torch.from_numpy(image).permute(2, 0, 1), "label": torch.tensor(item.label)}  # HWC -> CHW
