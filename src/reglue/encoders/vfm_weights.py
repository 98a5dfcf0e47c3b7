"""VFM weight files and their layouts: a safe read of a local file, and one pure key map per
family onto timm's names (:mod:`reglue.encoders.vfm` loads the result strictly).

- :func:`read_weights_file`: ``.safetensors`` or a ``torch.save`` file (``weights_only``: no code runs); a
  hub id fails at once, saying where to put the file (reglue never downloads); a TorchScript archive
  (OpenAI's CLIP ``.pt``) is refused, naming the one-line conversion;
- one key map per family, each turning the official layout it knows into timm's names and passing
  timm's own layout through (``module.`` / ``_orig_mod.`` prefixes stripped everywhere):
  :func:`dinov2_to_timm` (and back, :func:`timm_to_dinov2`), :func:`openai_clip_to_timm`,
  :func:`mae_to_timm`, :func:`ijepa_to_timm`; DINOv3 and SigLIP load timm's layout only
  (:func:`reglue.state_dict.strip_module_prefix`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from reglue.errors import InputError
from reglue.io import read_tensor_file
from reglue.state_dict import strip_module_prefix

_logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".tar")  # .tar: I-JEPA's .pth.tar

Weights = Mapping[str, torch.Tensor] | str | os.PathLike | None
KeyMap = Callable[[Mapping[str, object]], dict[str, object]]  # a file's content → timm-layout state dict


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


# OpenAI CLIP's vision-tower names (after ``visual.``) → timm's, in order; timm's ``_convert_openai_clip``
# does the same. torch's MultiheadAttention ``in_proj`` and timm's ``qkv`` both stack [q; k; v] rows.
_OPENAI_CLIP_NAMES = (
    (r"^conv1\.", "patch_embed.proj."),
    (r"^ln_pre\.", "norm_pre."),
    (r"^ln_post\.", "norm."),
    (r"^transformer\.resblocks\.(\d+)\.ln_(\d)\.", r"blocks.\1.norm\2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
)


def openai_clip_to_timm(state_dict: Mapping[str, object]) -> dict[str, object]:
    """OpenAI CLIP's state dict (``visual.*``, e.g. ``torch.jit.load("ViT-L-14.pt").state_dict()``) onto
    timm's names; timm's layout (``timm/vit_large_patch14_clip_224.openai``) passes, less its ``head``.

    - only ``visual.*`` is kept, the prefix stripped: the text tower and ``logit_scale`` are dropped;
    - ``conv1`` → ``patch_embed.proj``, ``ln_pre`` → ``norm_pre``, ``ln_post`` → ``norm``; per block
      ``ln_1``/``ln_2`` → ``norm1``/``norm2``, ``attn.in_proj_{weight,bias}`` →
      ``attn.qkv.{weight,bias}``, ``attn.out_proj`` → ``attn.proj``, ``mlp.c_fc``/``mlp.c_proj`` →
      ``mlp.fc1``/``mlp.fc2``;
    - ``class_embedding`` (D,) → ``cls_token`` (1, 1, D); ``positional_embedding`` (1 + g², D) →
      ``pos_embed`` (1, 1 + g², D) (timm's CLIP keeps the class slot in the table);
    - ``proj`` (D, 768) into the joint text-image space is dropped, as is timm's ``head`` (the same
      matrix): REGLUE's cls is the D-wide final-normed class token.
    """
    source = strip_module_prefix(state_dict)
    if not any(key.startswith("visual.") for key in source):
        return {key: value for key, value in source.items() if not key.startswith("head.")}
    out: dict[str, object] = {}
    for key, value in source.items():
        if not key.startswith("visual.") or key == "visual.proj":
            continue
        key = key.removeprefix("visual.")
        if key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)  # (D,) → (1, 1, D)
        elif key == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)  # (1 + g², D) → (1, 1 + g², D)
        else:
            for pattern, name in _OPENAI_CLIP_NAMES:
                key = re.sub(pattern, name, key)
            out[key] = value
    _logger.info("OpenAI CLIP weights: %d vision tensors kept, %d dropped (text tower, logit scale, proj)",
                 len(out), len(source) - len(out))
    return out


def _unwrap(checkpoint: Mapping[str, object], key: str) -> Mapping[str, object]:
    """``checkpoint[key]`` when it is the state dict an official checkpoint nests there, else
    ``checkpoint``."""
    inner = checkpoint.get(key)
    return inner if isinstance(inner, Mapping) else checkpoint


def mae_to_timm(checkpoint: Mapping[str, object]) -> dict[str, object]:
    """MAE's official checkpoint ``{"model": state_dict}`` (``mae_pretrain_vit_{base,large}.pth``) as timm's
    state dict; its names are timm's already. A bare state dict (timm's layout) passes. The pixel decoder
    of the visualisation checkpoints (``decoder_*``, ``mask_token``: pretraining only) is dropped."""
    source = strip_module_prefix(_unwrap(checkpoint, "model"))
    out = {key: value for key, value in source.items() if not key.startswith(("decoder_", "mask_token"))}
    if len(out) < len(source):
        _logger.info("MAE weights: %d keys of the pixel decoder dropped (pretraining only)",
                     len(source) - len(out))
    return out


def ijepa_to_timm(checkpoint: Mapping[str, object]) -> dict[str, object]:
    """I-JEPA's official training checkpoint (``IN1K-vit.h.14-300e.pth.tar``: ``encoder``, ``predictor``,
    ``target_encoder``, ``opt``, ...) as timm's state dict: its context ``encoder``, the one timm and REPA
    load, ``module.`` stripped; its names are timm's already. A bare state dict (timm's layout) passes."""
    return strip_module_prefix(_unwrap(checkpoint, "encoder"))


def _looks_like_hub_id(text: str) -> bool:
    """``org/name`` or ``hf-hub:org/name`` without a weights-file suffix."""
    return (
        re.fullmatch(r"(hf[-_]hub:)?[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None
        and Path(text).suffix not in WEIGHT_SUFFIXES
    )


def _hub_id_error(hub_id: str, accepts: str) -> FileNotFoundError:
    repo = re.sub(r"^hf[-_]hub:", "", hub_id)
    local = f"weights/{repo.split('/')[-1]}/model.safetensors"
    return FileNotFoundError(
        f"weights={hub_id!r} looks like a hub id, but reglue never downloads weights (runs are "
        f"offline). On a machine with internet run `huggingface-cli download {repo} "
        f"model.safetensors --local-dir {Path(local).parent}`, copy the file to {local} here and "
        f"pass weights={local!r}. This VFM loads {accepts}."
    )


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (OpenAI's CLIP ``.pt``): a zip holding ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def _torchscript_error(path: Path) -> InputError:
    converted = path.with_suffix(".pth")
    return InputError(
        f"{path} is a TorchScript archive (as OpenAI's CLIP ViT-L-14.pt): reglue reads weights with "
        "torch.load(weights_only=True), which refuses TorchScript, and never runs the code such an archive "
        "holds. Convert it once, on a machine you trust: python -c \"import torch; "
        f"torch.save(torch.jit.load('{path}', map_location='cpu').state_dict(), '{converted}')\" and pass "
        f"{converted}; or pass timm's model.safetensors of timm/vit_large_patch14_clip_224.openai."
    )


def read_weights_file(source: str | os.PathLike, *, accepts: str) -> Mapping[str, object]:
    """What a ``.safetensors`` or ``torch.save`` file (``weights_only``) holds: a state dict, or an official
    checkpoint holding one (a family's key map unwraps it). ``accepts`` names the files the VFM loads."""
    path = Path(source)
    if not path.is_file():
        if _looks_like_hub_id(str(source)):
            raise _hub_id_error(str(source), accepts)
        raise FileNotFoundError(f"VFM weights file {path} not found; pass {accepts}, or weights=None for a "
                                "random model.")
    if _is_torchscript(path):
        raise _torchscript_error(path)
    checkpoint = read_tensor_file(path, "VFM weights")
    if not isinstance(checkpoint, Mapping):
        raise InputError(f"{path} is not a state dict of tensors (found {type(checkpoint).__name__}); save "
                         "the backbone weights alone, e.g. torch.save(model.state_dict(), path).")
    return checkpoint


def read_weights(
    weights: Weights, key_map: KeyMap, *, accepts: str,
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(timm-layout state dict or None, its name for errors): the file read, ``key_map`` applied and every
    value checked to be a tensor. Builders call it before building the model, so a missing file, a hub id
    or a file of another kind fails at once."""
    if weights is None:
        return None, "no weights"
    checkpoint, what = (weights, "the given state dict") if isinstance(weights, Mapping) else (
        read_weights_file(weights, accepts=accepts), str(weights))
    state_dict = key_map(checkpoint)
    if not all(torch.is_tensor(value) for value in state_dict.values()):
        raise InputError(
            f"{what} is not a state dict of tensors (found {list(checkpoint)[:5]}); this VFM loads "
            f"{accepts}. Save the backbone weights alone, e.g. torch.save(model.state_dict(), path)."
        )
    return state_dict, what


def swiglu_hidden_features(embed_dim: int) -> int:
    """The official ViT-g SwiGLU hidden width (⌊8D/3⌋ + 7)//8·8 (4096 for D = 1536)."""
    return (int(4 * embed_dim * 2 / 3) + 7) // 8 * 8
