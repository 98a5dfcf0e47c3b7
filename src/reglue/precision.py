"""The one precision vocabulary of every command and setting: ``fp32``, ``bf16``, ``fp16`` and ``auto``.

``fp32`` is full precision (no autocast); ``bf16`` / ``fp16`` autocast (or store) in that type; ``auto``,
offered where the choice depends on the machine, means bf16 on a GPU that supports it, else fp32.
"""

from __future__ import annotations

import torch

from reglue.errors import InputError

PRECISIONS = ("fp32", "bf16", "fp16")
AUTO = "auto"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # accelerate's mixed_precision words


def check(word: str, *, key: str = "precision", allowed: tuple[str, ...] = (*PRECISIONS, AUTO),
          why: str = "") -> str:
    """``word`` if it is one of ``allowed``, else an InputError naming ``key`` (and ``why`` the others are not)."""
    if word not in allowed:
        raise InputError(f"{key} must be one of {', '.join(allowed)}{why}, found {word!r}.")
    return word


def resolve(word: str, device: torch.device) -> str:
    """``word`` with ``auto`` decided for ``device``: bf16 on a bf16-capable GPU, fp32 elsewhere."""
    if check(word) != AUTO:
        return word
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast_dtype(word: str, device: torch.device | None = None) -> torch.dtype | None:
    """The autocast type of ``word`` (None: fp32, no autocast); ``auto`` needs the ``device``."""
    word = resolve(word, device if device is not None else torch.device("cpu"))
    return None if word == "fp32" else DTYPES[word]
