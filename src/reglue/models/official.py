"""The authors' checkpoint formats (SPEC §9): one key map, one strict, explained load.

Their training script saves ``torch.save({"model", "ema", "opt", "args", "steps"})`` with
``args`` an ``argparse.Namespace``; weights may carry DDP's ``module.`` prefix. Parameter
names are otherwise identical to ours, so the key map only strips that prefix.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


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


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Strip prefixes, check every key and shape, then ``load_state_dict(strict=True)``."""
    state_dict = strip_module_prefix(state_dict)
    problem = describe_state_dict_mismatch(model, state_dict)
    if problem is not None:
        hint = ""
        embed = state_dict.get("x_embedder.proj.weight")
        if embed is not None and embed.ndim == 4:
            hint = (
                f"\nThe checkpoint looks like hidden size {embed.shape[0]}, {embed.shape[1]} input "
                f"channels, patch {embed.shape[-1]}; build the matching model (e.g. build_sit("
                "'SiT-XL/2', in_channels=...)) or pick the checkpoint made for this one."
            )
        raise ValueError(f"{what} does not fit the model:\n  {problem}{hint}")
    model.load_state_dict(state_dict, strict=True)


# The authors' argparse names (REPA/REG/REGLUE train.py) and the run-config keys they mean.
AUTHORS_ARGS = {
    "model": "model.name",
    "encoder_depth": "model.encoder_depth",
    "qk_norm": "model.qk_norm",
    "cfg_prob": "model.class_dropout_prob",
    "proj_coeff": "loss.lambda_rep",
    "cls": "loss.lambda_cls",
    "path_type": "loss.path",
    "weighting": "loss.time_sampling",
    "batch_size": "train.global_batch",
    "learning_rate": "optim.lr",
    "max_grad_norm": "optim.grad_clip",
    "mixed_precision": "train.mixed_precision",
    "max_train_steps": "train.max_steps",
    "seed": "train.seed",
}


def config_values_from_authors_args(args: Mapping) -> dict[str, object]:
    """Our config keys (dotted) for the authors' ``args`` entries we understand."""
    return {ours: args[theirs] for theirs, ours in AUTHORS_ARGS.items() if theirs in args}


def load_authors_checkpoint(path: str | Path) -> dict:
    """Read the authors' ``.pt`` training checkpoint without executing pickled code.

    Returns the raw dict; ``args`` (if present) is converted to a plain ``dict``.
    """
    from reglue.io import read_tensor_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; download the authors' SiT-XL/2 checkpoint and pass its path."
        )
    checkpoint = read_tensor_file(path, "authors' checkpoint", allowed=(argparse.Namespace,))
    if not isinstance(checkpoint, dict) or not ({"model", "ema"} & set(checkpoint)):
        raise ValueError(
            f"{path} is not an authors'-format checkpoint (a dict with 'model'/'ema' entries); "
            f"found {type(checkpoint).__name__} with keys {list(checkpoint)[:5] if isinstance(checkpoint, dict) else '-'}."
        )
    if isinstance(checkpoint.get("args"), argparse.Namespace):
        checkpoint["args"] = vars(checkpoint["args"])
    return checkpoint
