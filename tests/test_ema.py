"""EMA update."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_sit
from reglue.ema import EMA_UPDATES, update_ema


def test_foreach_ema_equals_authors_loop():
    model = tiny_sit("reglue")
    ema = copy.deepcopy(model).requires_grad_(False)
    reference = copy.deepcopy(ema)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    update_ema(ema, model, decay=0.9)
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        expected = ref_params[name].mul(0.9).add(param, alpha=0.1) if param.requires_grad else param
        assert torch.allclose(dict(ema.named_parameters())[name], expected, atol=1e-6), name


def test_ema_rejects_mismatched_models():
    with pytest.raises(KeyError, match="build the EMA as a copy"):
        update_ema(tiny_sit("sit"), tiny_sit("reglue"))


def test_loop_ema_equals_foreach_ema_and_copies_frozen_parts():
    model = tiny_sit("reglue")
    emas = {kind: copy.deepcopy(model).requires_grad_(False) for kind in EMA_UPDATES}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # frozen pos_embed moves too: it must be copied, not averaged
    for kind, ema in emas.items():
        EMA_UPDATES[kind](ema, model, 0.9)
    for (name, a), b in zip(emas["foreach"].named_parameters(), emas["loop"].parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert torch.equal(emas["loop"].pos_embed, model.pos_embed)


def test_an_update_built_once_follows_the_model_step_after_step():
    """EMAUpdate gathers the tensors once; in-place changes (optimiser steps, load_state_dict) reach it."""
    from reglue.ema import EMAUpdate

    model = tiny_sit("reglue")
    ema, reference = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(model).requires_grad_(False)
    update = EMAUpdate(ema, model, "foreach")
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        if step == 1:
            model.load_state_dict(tiny_sit("reglue", seed=5).state_dict())  # copies into the same tensors
        update(0.9)
        update_ema(reference, model, 0.9)
    for (name, a), b in zip(ema.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="unknown EMA update"):
        EMAUpdate(ema, model, "lerp")
