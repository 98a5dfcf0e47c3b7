"""The authors' checkpoint format (SPEC §9): reading it safely and mapping its ``args``.

Their training script saves ``torch.save({"model", "ema", "opt", "args", "steps"})`` with
``args`` an ``argparse.Namespace``; weights may carry DDP's ``module.`` prefix. Parameter
names are otherwise identical to ours, so :func:`reglue.state_dict.load_state_dict_strict`
(which strips that prefix) is the whole key map.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from reglue.errors import InputError
from reglue.io import read_tensor_file

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
    "mixed_precision": "train.precision",
    "max_train_steps": "train.max_steps",
    "seed": "train.seed",
}


AUTHORS_WORDS = {"no": "fp32"}  # their --mixed-precision words that are spelled otherwise here (reglue.precision)


def config_values_from_authors_args(args: Mapping) -> dict[str, object]:
    """Our config keys (dotted) for the authors' ``args`` entries we understand."""
    return {ours: AUTHORS_WORDS.get(args[theirs], args[theirs]) if ours == "train.precision" else args[theirs]
            for theirs, ours in AUTHORS_ARGS.items() if theirs in args}


def load_authors_checkpoint(path: str | Path) -> dict:
    """Read the authors' ``.pt`` training checkpoint without executing pickled code.

    Returns the raw dict; ``args`` (if present) is converted to a plain ``dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; download the authors' SiT-XL/2 checkpoint and pass its path."
        )
    checkpoint = read_tensor_file(path, "authors' checkpoint", allowed=(argparse.Namespace,))
    if not isinstance(checkpoint, dict) or not ({"model", "ema"} & set(checkpoint)):
        raise InputError(
            f"{path} is not an authors'-format checkpoint (a dict with 'model'/'ema' entries); "
            f"found {type(checkpoint).__name__} with keys {list(checkpoint)[:5] if isinstance(checkpoint, dict) else '-'}."
        )
    if isinstance(checkpoint.get("args"), argparse.Namespace):
        checkpoint["args"] = vars(checkpoint["args"])
    return checkpoint
