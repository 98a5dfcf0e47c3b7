"""VFM weight files and their layouts: a safe read of a local file, and one pure key map per
official layout onto timm's names (:mod:`reglue.encoders.vfm` loads the result strictly).

- :func:`read_weights_file`: ``.safetensors`` or a ``torch.save`` of tensors (``weights_only``); a hub
  id fails at once, saying where to put the file (reglue never downloads);
- :func:`dinov2_to_timm` / :func:`timm_to_dinov2`: the official DINOv2 layout and back.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from reglue.errors import InputError
from reglue.io import read_tensor_file
from reglue.state_dict import strip_module_prefix

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

Weights = Mapping[str, torch.Tensor] | str | os.PathLike | None


def _has_cls_slot(num_positions: int) -> bool:
    """True for 1 + g² positions (official layout), False for g² (timm's, patches only)."""
    patches = num_positions - 1
    return math.isqrt(patches) ** 2 == patches and math.isqrt(num_positions) ** 2 != num_positions


def dinov2_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an official DINOv2 state dict onto timm's names; timm-layout input passes unchanged.

    - ``module.`` / ``_orig_mod.`` prefixes are stripped;
    - ``mask_token`` is dropped (masked-image pretraining only, never used at inference);
    - ``register_tokens`` (1, R, D) → ``reg_token``;
    - ``pos_embed`` (1, 1 + g², D) → (1, g², D), its CLS slot added into ``cls_token`` (1, 1, D);
    - ViT-g's SwiGLU ``blocks.i.mlp.w12`` / ``mlp.w3`` → ``mlp.fc1`` / ``mlp.fc2``.
    """
    source = strip_module_prefix(state_dict)
    source.pop("mask_token", None)
    out = {}
    for key, value in source.items():
        key = "reg_token" if key == "register_tokens" else key
        key = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", key)
        out[key] = value
    pos_embed = out.get("pos_embed")
    if pos_embed is not None and "cls_token" in out and _has_cls_slot(pos_embed.shape[1]):
        out["cls_token"] = out["cls_token"] + pos_embed[:, :1]
        out["pos_embed"] = pos_embed[:, 1:]
    return out


def timm_to_dinov2(
    state_dict: Mapping[str, torch.Tensor], *, mask_token: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """A timm-layout DINOv2 state dict in the official layout: the inverse of :func:`dinov2_to_timm`.

    - ``reg_token`` → ``register_tokens``; a model without registers writes none;
    - ``pos_embed`` (1, g², D) → (1, 1 + g², D) with a zero CLS slot, ``cls_token`` unchanged (timm
      keeps the CLS position folded into ``cls_token``; the split is not recorded, so the canonical
      one is written: the forward is the same, and mapped back every tensor is bit-identical);
    - ``mask_token`` (1, D): the given one (official (1, D) or lightly's (1, 1, D)), else zeros (the
      official initial value; inference never uses it);
    - ViT-g's SwiGLU ``mlp.fc1`` / ``mlp.fc2`` → ``mlp.w12`` / ``mlp.w3`` (recognised by fc1's width
      2·(⌊8D/3⌋ + 7)//8·8).

    Keys come in the official order (``cls_token, pos_embed, register_tokens, mask_token``, patch
    embed, blocks, norm). ``dinov2_to_timm(timm_to_dinov2(sd)) == sd`` for every timm-layout ``sd``,
    and ``timm_to_dinov2(dinov2_to_timm(official), mask_token=official["mask_token"]) == official``
    for an official dict whose CLS position slot is zero.
    """
    source = strip_module_prefix(state_dict)
    cls_token, pos_embed = source.pop("cls_token"), source.pop("pos_embed")
    dim = cls_token.shape[-1]
    slot = torch.zeros_like(pos_embed[:, :1])  # (1, 1, D)
    out = {"cls_token": cls_token, "pos_embed": torch.cat([slot, pos_embed], dim=1)}  # (1, 1 + g², D)
    if "reg_token" in source:
        out["register_tokens"] = source.pop("reg_token")
    out["mask_token"] = torch.zeros(1, dim, dtype=cls_token.dtype) if mask_token is None else mask_token.reshape(1, dim)
    fc1 = source.get("blocks.0.mlp.fc1.weight")
    swiglu = fc1 is not None and fc1.shape[0] == 2 * swiglu_hidden_features(dim)
    for key, value in source.items():
        if swiglu:
            key = re.sub(r"^(blocks\.\d+\.mlp)\.fc1\.", r"\1.w12.", key)
            key = re.sub(r"^(blocks\.\d+\.mlp)\.fc2\.", r"\1.w3.", key)
        out[key] = value
    return out


def _looks_like_hub_id(text: str) -> bool:
    """``org/name`` or ``hf-hub:org/name`` without a weights-file suffix."""
    return (
        re.fullmatch(r"(hf[-_]hub:)?[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None
        and Path(text).suffix not in WEIGHT_SUFFIXES
    )


def _hub_id_error(hub_id: str) -> FileNotFoundError:
    repo = re.sub(r"^hf[-_]hub:", "", hub_id)
    local = f"weights/{repo.split('/')[-1]}/model.safetensors"
    return FileNotFoundError(
        f"weights={hub_id!r} looks like a hub id, but reglue never downloads weights (runs are "
        f"offline). On a machine with internet run `huggingface-cli download {repo} "
        f"model.safetensors --local-dir {Path(local).parent}`, copy the file to {local} here and "
        f"pass weights={local!r}. The official DINOv2 .pth (e.g. dinov2_vitb14_reg4_pretrain.pth "
        "from https://dl.fbaipublicfiles.com/dinov2/) works as well."
    )


def read_weights_file(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save``d ``.pth``/``.bin`` (tensors only)."""
    path = Path(source)
    if not path.is_file():
        if _looks_like_hub_id(str(source)):
            raise _hub_id_error(str(source))
        raise FileNotFoundError(
            f"VFM weights file {path} not found; pass the path of an official DINOv2 .pth or a "
            "timm .safetensors/.pth/.bin file, or weights=None for a random model."
        )
    state_dict = read_tensor_file(path, "VFM weights")
    if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
        found = list(state_dict)[:5] if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise InputError(
            f"{path} is not a state dict of tensors (found {found}); save the backbone weights "
            "alone, e.g. torch.save(model.state_dict(), path)."
        )
    return dict(state_dict)


def read_weights(weights: Weights) -> tuple[Mapping[str, torch.Tensor] | None, str]:
    """(state dict or None, its name for errors); builders call it before building the model,
    so a missing file or a hub id fails at once."""
    if weights is None or isinstance(weights, Mapping):
        return weights, "the given state dict"
    return read_weights_file(weights), str(weights)


def swiglu_hidden_features(embed_dim: int) -> int:
    """The official ViT-g SwiGLU hidden width (⌊8D/3⌋ + 7)//8·8 (4096 for D = 1536)."""
    return (int(4 * embed_dim * 2 / 3) + 7) // 8 * 8
