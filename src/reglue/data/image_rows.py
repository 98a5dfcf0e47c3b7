"""A prepared dataset or an image folder / zip as rows of uint8 images and labels: how `reglue train-vfm`
and `reglue probe-vfm` open their DATA.

Both give item i → {"images": uint8 (3, R, R), "label": int64 (−1 unlabelled)}, ``num_classes``, ``root``
and ``len``; a folder and the dataset prepared from it at the same R give the same pixels, row for row
(:mod:`reglue.data.source_dataset`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import gather_object

from reglue.data import store
from reglue.data.dataset import PreparedDataset
from reglue.data.source_dataset import ImageSourceDataset
from reglue.distributed import process_state
from reglue.errors import InputError
from reglue.resolution import DEFAULT_RESOLUTION

Images = PreparedDataset | ImageSourceDataset  # item i → {"images": uint8 (3, R, R), "label": int64}


def open_images(data: str | Path, resolution: int | None = None, *, command: str) -> tuple[Images, int]:
    """The images of ``data`` and their side R.

    ``data``: a ``reglue prepare`` directory, whose resolution is fixed (``resolution``, when given,
    must equal it; the refusal names ``reglue COMMAND`` on the source images as the fix), or an image
    folder or ``.zip`` (class sub-folders give labels, a flat one is unlabelled), cropped to ``resolution``
    on access (default DEFAULT_RESOLUTION, prepare's own); its unreadable files are left out when it is
    opened (:class:`ImageSourceDataset`): each process decodes its share of the files and the unreadable
    ones are gathered, so every file is decoded once per run, not once per process, and every process gets
    the same rows. Every process must call it.
    """
    data = Path(data)
    if not (data / store.MANIFEST).is_file() and not (data / store.SETTINGS).is_file():
        resolution = DEFAULT_RESOLUTION if resolution is None else resolution
        state = process_state()
        return ImageSourceDataset(data, resolution, rank=state.process_index, world_size=state.num_processes,
                                  gather=gather_object), resolution
    images = PreparedDataset(data, fields=("images",))  # an unfinished one: its error says how to finish it
    prepared = images.manifest["resolution"]
    if resolution is not None and resolution != prepared:
        raise InputError(
            f"{data} was prepared at resolution {prepared}, and a prepared dataset's resolution is fixed; leave out "
            f"--resolution to use {prepared}, or pass its source images at {resolution}: `reglue {command} "
            f"{images.manifest['source']} --resolution {resolution} --out ...`."
        )
    return images, prepared


def image_labels(images: Images) -> torch.Tensor:
    """(N,) int64: every row's label (−1 unlabelled), read without decoding an image."""
    if isinstance(images, ImageSourceDataset):
        return torch.tensor([item.label for item in images.items], dtype=torch.int64)
    return PreparedDataset(images.root, fields=()).read_batch(range(len(images)))["label"]
