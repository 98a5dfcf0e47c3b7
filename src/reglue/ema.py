"""Exponential moving average of model weights (used for sampling; SPEC §7).

Two implementations of the same update, chosen by ``train.ema``: ``foreach`` (one fused lerp
kernel per dtype, the default) and ``loop`` (the authors' one Python-level update per
parameter, ~4× more kernel launches; kept for side-by-side benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _trained_pairs(ema_model: nn.Module, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(EMA tensors, model tensors) of the trained parameters; frozen ones and buffers are copied.

    Copying keeps the EMA model a complete, loadable model (``pos_embed``, BatchNorm stats).
    """
    ema_params = dict(ema_model.named_parameters())
    params = dict(model.named_parameters())
    if ema_params.keys() != params.keys():
        differing = sorted(ema_params.keys() ^ params.keys())
        raise KeyError(f"EMA and model parameters differ ({differing[:3]}); build the EMA as a copy of the model.")
    averaged, trained = [], []
    for name, param in params.items():
        if param.requires_grad:
            averaged.append(ema_params[name])
            trained.append(param.detach())
        else:
            ema_params[name].copy_(param)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)
    return averaged, trained


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """ema ← decay·ema + (1 − decay)·θ for every trained parameter, in one foreach kernel per dtype."""
    averaged, trained = _trained_pairs(ema_model, model)
    if averaged:
        torch._foreach_lerp_(averaged, trained, 1.0 - decay)


@torch.no_grad()
def update_ema_loop(ema_model: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """The same update as the authors wrote it: ``ema.mul_(decay).add_(θ, alpha=1 − decay)`` per parameter."""
    for ema_param, param in zip(*_trained_pairs(ema_model, model)):
        ema_param.mul_(decay).add_(param, alpha=1 - decay)


EMA_UPDATES: dict[str, Callable[[nn.Module, nn.Module, float], None]] = {
    "foreach": update_ema, "loop": update_ema_loop,
}
