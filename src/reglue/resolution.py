"""The image resolutions reglue trains at, and the grids each one implies (SPEC §1, generalised).

Any side R that is a multiple of 64 from 64 to 512 (64, 128, 192, …, 512):

- latents: R/8 × R/8 (SD-VAE and the pixel autoencoder downsample by 8);
- SiT tokens: (R/16)² with patch 2 on the latents;
- DINOv2: input side 224·R/256 = 7R/8 (a multiple of 14: 56, 112, 168, 224, …, 448), so its
  14-pixel patches give the same (R/16)² grid; DINOv3: input side R, 16-pixel patches;
- the semantic maps are up-sampled from the VFM grid R/16 to the latent grid R/8.

The multiple of 64 is what keeps all of these integers: R/16 tokens per side and a DINOv2
input that is a whole number of 14-pixel patches. The paper trains at 256² (and 512²); the
prepared data's manifest records R once and every later step reads it from there.
"""

from __future__ import annotations

from reglue.errors import InputError

RESOLUTION_STEP = 64
MIN_RESOLUTION = 64
MAX_RESOLUTION = 512
RESOLUTIONS = tuple(range(MIN_RESOLUTION, MAX_RESOLUTION + 1, RESOLUTION_STEP))
DEFAULT_RESOLUTION = 256  # the paper's; the crop side when reading images without --resolution
LATENT_DOWNSAMPLE = 8  # image pixels per latent pixel (SD-VAE, pixel autoencoder)
TOKEN_PIXELS = 16  # image pixels per SiT token side: patch 2 on the R/8 latents


def check_resolution(resolution: int) -> int:
    """``resolution`` itself when reglue supports it, else a ValueError naming the supported sides."""
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise InputError(f"resolution must be an integer, found {resolution!r}.")
    if resolution not in RESOLUTIONS:
        raise InputError(
            f"resolution must be a multiple of {RESOLUTION_STEP} from {MIN_RESOLUTION} to {MAX_RESOLUTION} "
            f"({', '.join(map(str, RESOLUTIONS))}), found {resolution}; the paper uses 256 (and 512), "
            "64 and 128 make fast research runs."
        )
    return resolution


def latent_size(resolution: int) -> int:
    """Latent side R/8."""
    return check_resolution(resolution) // LATENT_DOWNSAMPLE


def token_grid(resolution: int) -> int:
    """SiT token grid side (= the VFM patch grid side) R/16."""
    return check_resolution(resolution) // TOKEN_PIXELS


def confirm_resolution(asked: int | None, found: int, *, where: str, remedy: str) -> int:
    """``found``, the resolution ``where`` is at, when ``asked`` is None or equal to it.

    Every step after ``reglue prepare`` reads R from what it is given (the data's manifest, the
    model, the sample arrays); ``asked`` is a ``--resolution`` / ``data.resolution`` given only as
    a check, which a script looping over resolutions can pass to every command. Another R is a
    ValueError naming both sides and ``remedy`` (the fix)."""
    if asked is not None and check_resolution(asked) != found:
        raise InputError(
            f"resolution {asked} was asked for, but {where} is at {found}²: R is chosen once, by `reglue prepare "
            f"--resolution R`, and every later step reads it from there. {remedy}"
        )
    return found
