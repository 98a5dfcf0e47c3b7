"""Exponential moving average of model weights (used for sampling; SPEC §7)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """ema ← decay·ema + (1 − decay)·θ for every parameter, in one foreach kernel per dtype.

    Same maths as the authors' per-parameter loop; frozen parameters (``pos_embed``) and
    buffers are copied so the EMA model stays a complete, loadable model.
    """
    ema_params = dict(ema_model.named_parameters())
    params = dict(model.named_parameters())
    if ema_params.keys() != params.keys():
        differing = sorted(ema_params.keys() ^ params.keys())
        raise KeyError(f"EMA and model parameters differ ({differing[:3]}); build the EMA as a copy of the model.")
    trained, averaged = [], []
    for name, param in params.items():
        if param.requires_grad:
            trained.append(param.detach())
            averaged.append(ema_params[name])
        else:
            ema_params[name].copy_(param)
    if averaged:
        torch._foreach_lerp_(averaged, trained, 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)
