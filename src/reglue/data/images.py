"""Reading one source image robustly, and the ADM centre crop (SPEC §1).

:func:`load_image` turns a file path or its bytes (e.g. a zip member) into an RGB
``PIL.Image``, or raises :class:`BadImageError` with a short reason for the skip report.
Its rules:

- **Modes.** Grey (L, 1), CMYK, YCbCr, palette (P), RGBA, LA and P-with-transparency become
  RGB through PIL's ``convert("RGB")``, exactly as ADM and EDM2's dataset tool do. Grey images
  come out with three equal channels.
- **Alpha** is dropped, not composited: each pixel keeps its stored colour values whatever
  its alpha (so a fully transparent pixel shows its stored colour, not black or white).
- **16-bit** images (modes I;16, I;16L, I;16B, I;16N and I) are scaled to 8 bits as
  round(value / 257), values beyond 0..65535 clipped; PIL's own conversion would clip every
  value above 255 to white. Exception: when no value exceeds 255 the file holds 8-bit data
  in a 16-bit container (as some tools write it), and the values are kept as they are —
  dividing would turn a normal picture black. 32-bit float images (mode F) have no defined
  range and are rejected.
- **EXIF orientation is ignored**: pixels are used as stored, like ADM and the authors'
  preprocessing, so that crops match theirs (a photo tagged "rotate 90°" stays sideways).
- **Truncated or corrupt** files are rejected: the whole image is decoded up front and PIL's
  ``LOAD_TRUNCATED_IMAGES`` is left off (if a caller turns it on, truncated files pass).
- **Too small**: a short side below ``min_size`` (default 32 px) is rejected.
- **Decompression bombs**: more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's warning
  level; about 89 megapixels by default) are rejected rather than decoded.
- Animated or multi-page files give their first frame. A missing file is not a bad image: it
  raises ``FileNotFoundError``.

:func:`adm_center_crop` is ADM's ``center_crop_arr``: halve with a box filter while the short
side is at least twice the target, resize with bicubic so that the short side equals the
target, then cut the centre square.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from reglue.errors import InputError

MIN_SIZE = 32  # default minimum short side in pixels
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# What Pillow's decoders raise on damaged data (OSError covers "image file is truncated").
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


class BadImageError(InputError):
    """A source file that cannot be used as a training image; ``str(err)`` is the short reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_image(source: str | os.PathLike | bytes, min_size: int = MIN_SIZE) -> Image.Image:
    """A file path or the file's bytes -> fully decoded RGB image (rules in the module doc).

    Raises :class:`BadImageError` for files that are empty, not images, truncated or corrupt,
    too small, too large or of an unusable mode.
    """
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
    if not data:
        raise BadImageError("zero-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise BadImageError("not an image (cannot identify the format)") from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise BadImageError(f"too many pixels (decompression-bomb guard): {err}") from None
        width, height = image.size
        if min(width, height) < min_size:
            raise BadImageError(f"too small: {width}×{height} < minimum {min_size} px short side")
        try:
            image.load()
        except _DECODE_ERRORS as err:
            raise BadImageError(f"truncated or corrupt: {err}") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded PIL image -> RGB (16-bit range scaled to 8 bits, alpha dropped)."""
    if image.mode == "F":
        raise BadImageError("unsupported mode F (32-bit float pixels have no defined range)")
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)  # (H, W), any byte order
        if values.max() > 255:  # true 16-bit range; otherwise 8-bit data in a 16-bit container
            values = np.rint(values / 257)
        grey = np.clip(values, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    with warnings.catch_warnings():  # PIL nags about P + transparency bytes; we drop alpha anyway
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        return image.convert("RGB")


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM centre crop: RGB image (W×H) -> uint8 array (size, size, 3).

    1. While the short side is ≥ 2·size: resize to (W//2, H//2) with ``Image.BOX``.
    2. Resize with ``Image.BICUBIC`` to (round(W·s), round(H·s)), s = size / short side
       (Python's round, halves to even; the short side lands exactly on ``size``).
    3. Cut size×size at offsets ((W' − size)//2, (H' − size)//2).
    """
    if image.mode != "RGB":
        raise InputError(f"adm_center_crop expects an RGB image, found mode {image.mode}; use load_image.")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)))  # writable copy
