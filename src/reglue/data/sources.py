"""Image sources for ``reglue prepare``: a folder or a zip, ImageFolder-style or flat.

- ImageFolder layout: every image lies under a class folder ``SRC/<class>/…``; class names
  sorted by name give labels 0…K−1 (as torchvision's ImageFolder).
- Flat layout: every image lies directly in SRC: an unconditional dataset (label −1).
- Folders that wrap everything (``train/<class>/…``, common in zips) are looked through.
- Both at once is refused (ambiguous). Files are ordered by their relative path, so the
  order — and every shard — is the same on every machine and every rerun.
- Files whose extension is not an image extension, and hidden files (``.name``,
  ``__MACOSX/``), are not listed; their number is reported.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from reglue.errors import InputError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
)


@dataclass(frozen=True)
class SourceItem:
    path: str  # relative POSIX path inside the source
    label: int  # class index, −1 when unconditional


@dataclass
class ImageSource:
    """A listed source: items in a fixed order, class names, and how to read bytes."""

    location: Path
    items: list[SourceItem]
    class_names: list[str]
    ignored: int  # files not listed (no image extension, hidden)
    _zip: zipfile.ZipFile | None = field(default=None, repr=False)

    def read(self, item: SourceItem) -> bytes:
        if self._zip is not None:
            return self._zip.read(item.path)
        return (self.location / item.path).read_bytes()

    def reopened(self) -> ImageSource:
        """The same listing with a zip handle of its own: each process needs one (a forked DataLoader
        worker must not share its parent's file offset)."""
        return replace(self, _zip=zipfile.ZipFile(self.location)) if self._zip is not None else self

    def __getstate__(self) -> dict:  # a zip handle does not pickle: it is reopened where unpickled
        state = self.__dict__.copy()
        state["_zip"] = self._zip is not None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _zip=zipfile.ZipFile(state["location"]) if state["_zip"] else None)


def _is_hidden(path: PurePosixPath) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in path.parts)


def _split_listing(paths: list[str]) -> tuple[list[PurePosixPath], int]:
    kept, ignored = [], 0
    for raw in paths:
        path = PurePosixPath(raw)
        if _is_hidden(path) or path.suffix.lower() not in IMAGE_EXTENSIONS:
            ignored += 1
        else:
            kept.append(path)
    return sorted(kept, key=str), ignored


def _wrapper_depth(paths: list[PurePosixPath]) -> int:
    """How many folders wrap everything (``train/cat/x.jpg``: 1), as zips of a folder often have."""
    depth = 0
    while all(len(p.parts) >= depth + 3 for p in paths) and len({p.parts[depth] for p in paths}) == 1:
        depth += 1
    return depth


def _label(paths: list[PurePosixPath], location: Path) -> tuple[list[SourceItem], list[str]]:
    depth = _wrapper_depth(paths)
    flat = [p for p in paths if len(p.parts) == depth + 1]
    nested = [p for p in paths if len(p.parts) > depth + 1]
    if flat and nested:
        raise InputError(
            f"{location} mixes {len(flat)} images at its top level (e.g. {flat[0]}) with class folders "
            f"(e.g. {nested[0].parts[depth]}/); put every image in a class folder, or all of them at the top "
            "level for an unconditional dataset."
        )
    if flat:
        return [SourceItem(str(p), -1) for p in flat], []
    class_names = sorted({p.parts[depth] for p in nested})
    index = {name: i for i, name in enumerate(class_names)}
    return [SourceItem(str(p), index[p.parts[depth]]) for p in nested], class_names


def open_source(location: str | Path) -> ImageSource:
    """List a folder or a ``.zip`` of images; raise a clear error if there is nothing to use."""
    location = Path(location)
    if not location.exists():
        raise FileNotFoundError(f"source {location} does not exist; pass an image folder or a .zip.")
    archive = None
    if location.is_dir():
        names = [str(p.relative_to(location).as_posix()) for p in location.rglob("*") if p.is_file()]
    elif zipfile.is_zipfile(location):
        archive = zipfile.ZipFile(location)
        names = [info.filename for info in archive.infolist() if not info.is_dir()]
    else:
        raise InputError(f"source {location} is neither a folder nor a zip archive.")
    paths, ignored = _split_listing(names)
    if not paths:
        raise InputError(
            f"source {location} holds no image files ({ignored} other files); expected "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))} files in class folders or at the top level."
        )
    items, class_names = _label(paths, location)
    return ImageSource(location, items, class_names, ignored, archive)


def source_fingerprint(items: list[SourceItem]) -> dict:
    """Identifies the listed source files (paths and labels), so a rerun cannot resume over a changed source."""
    digest = hashlib.sha256("".join(f"{i.path}\t{i.label}\n" for i in items).encode())
    return {"source_files": len(items), "source_sha256": digest.hexdigest()}
