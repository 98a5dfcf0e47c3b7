"""State-dict helpers for every foreign or saved weight file: one key map, one strict, explained load.

Checkpoints saved from DDP or ``torch.compile`` carry ``module.`` / ``_orig_mod.`` prefixes;
:func:`load_state_dict_strict` strips them, then reports every missing, unexpected and
mis-shaped key together instead of failing on the first (timm ``checkpoint_filter_fn`` style).
:func:`weights_fingerprint` names a module's weights in records (sample folders, metrics).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from reglue.errors import InputError


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a leading ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) from every key."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def describe_state_dict_mismatch(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> str | None:
    """A readable account of how ``state_dict`` differs from ``model``'s, or None if it fits."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: expected {expected[k]}, found {found[k]}"
        for k in expected
        if k in found and expected[k] != found[k]
    ]
    if not (missing or unexpected or wrong):
        return None
    lines = []
    if wrong:
        lines.append(f"{len(wrong)} shape mismatch(es), e.g. " + "; ".join(wrong[:3]))
    if missing:
        lines.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    return "\n  ".join(lines)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, fix: str = "") -> None:
    """Strip prefixes, check every key and shape, then ``load_state_dict(strict=True)``.

    A mismatch is a ValueError naming ``what`` and every difference, then ``fix`` (by default, for a
    SiT, the size the weights look like)."""
    state_dict = strip_module_prefix(state_dict)
    problem = describe_state_dict_mismatch(model, state_dict)
    if problem is not None:
        hint = f"\n{fix[0].upper()}{fix[1:]}." if fix else ""
        embed = state_dict.get("x_embedder.proj.weight")
        if not fix and embed is not None and embed.ndim == 4:
            hint = (
                f"\nThe checkpoint looks like hidden size {embed.shape[0]}, {embed.shape[1]} input "
                f"channels, patch {embed.shape[-1]}; build the matching model (e.g. build_sit("
                "'SiT-XL/2', in_channels=...)) or pick the checkpoint made for this one."
            )
        raise InputError(f"{what} does not fit the model:\n  {problem}{hint}")
    model.load_state_dict(state_dict, strict=True)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of a module's parameters and buffers: names, dtypes, shapes, values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # 0-d too
    return digest.hexdigest()[:16]
