"""The SiT backbone: registry, presets, shapes, persistence and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_sit
from reglue.models import SIT_MODELS, SiT, build_sit, load_state_dict_strict, sit_config
from reglue.presets import PRESETS, get_preset


def inputs(model: SiT, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    cls = torch.randn(batch, cfg.z_dim, generator=g) if cfg.use_cls_token else None
    return x, t, y, cls


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_forward_shapes(preset):
    model = tiny_sit(preset).eval()
    x, t, y, cls = inputs(model)
    v, tokens, cls_v = model(x, t, y, cls_token=cls)
    p = PRESETS[preset]
    assert v.shape == x.shape and torch.isfinite(v).all()
    num_patches = (8 // 2) ** 2
    if p.repa:
        assert tokens.shape == (2, num_patches + int(p.cls_token), 12)
    else:
        assert tokens is None and not hasattr(model, "projectors")
    assert (cls_v is not None) == p.cls_token
    if p.cls_token:
        assert cls_v.shape == (2, 12)
    assert model.pos_embed.shape[1] == num_patches + int(p.cls_token)


def test_cls_token_changes_patch_velocity():
    model = tiny_sit("reglue").eval()
    x, t, y, cls = inputs(model)
    v1, _, _ = model(x, t, y, cls_token=cls)
    v2, _, _ = model(x, t, y, cls_token=cls + 1.0)
    assert not torch.allclose(v1, v2)


def test_fresh_model_outputs_zero_velocity_and_pos_embed_is_frozen():
    model = build_sit("SiT-S/8", input_size=16, num_classes=10, z_dim=8, projector_dim=8).eval()
    x, t, y, cls = inputs(model)
    v, _, cls_v = model(x, t, y, cls_token=cls)
    assert torch.count_nonzero(v) == 0 and torch.count_nonzero(cls_v) == 0
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("name", SIT_MODELS)
def test_registry_builds_every_size(name):
    with torch.device("meta"):
        model = build_sit(name)
    depth, hidden = len(model.blocks), model.config.hidden_size
    expected = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152)}[name[4:].split("/")[0]]
    assert (depth, hidden) == expected
    assert model.final_layer.linear.in_features == hidden  # S included: final width is D


def test_small_size_runs_end_to_end():
    model = build_sit("SiT-S/4", input_size=8, num_classes=10).eval()
    v, tokens, cls_v = model(*inputs(model)[:3], cls_token=inputs(model)[3])
    assert v.shape == (2, 20, 8, 8) and tokens.shape == (2, 5, 768) and cls_v.shape == (2, 768)


def test_unknown_model_and_option_are_named():
    with pytest.raises(ValueError, match="SiT-XL/2"):
        build_sit("SiT-XXL/2")
    with pytest.raises(TypeError, match="hidden_sise"):
        sit_config("SiT-B/2", hidden_sise=3)


def test_config_cross_field_errors():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        sit_config("SiT-B/2", input_size=31)
    with pytest.raises(ValueError, match="encoder_depth"):
        sit_config("SiT-B/2", encoder_depth=13)
    with pytest.raises(ValueError, match="z_dim"):
        sit_config("SiT-B/2", z_dim=None, use_cls_token=True)


def test_qk_norm_adds_named_norms_and_runs():
    model = tiny_sit("reg", qk_norm=True).eval()
    assert "blocks.0.attn.q_norm.weight" in model.state_dict()
    v, _, _ = model(*inputs(model)[:3], cls_token=inputs(model)[3])
    assert torch.isfinite(v).all()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x, t, y, c: (x[:, :19], t, y, c), r"\(B, 20, 8, 8\).*found \(2, 19, 8, 8\)"),
        (lambda x, t, y, c: (x[..., :7, :7], t, y, c), r"found \(2, 20, 7, 7\)"),
        (lambda x, t, y, c: (x, t, y + 11, c), r"labels must lie in 0..9 \(or 10 = null label\)"),
        (lambda x, t, y, c: (x, t, y - 11, c), r"labels must lie"),
        (lambda x, t, y, c: (x, t + 1.5, y, c), r"t must lie in \[0, 1\]"),
        (lambda x, t, y, c: (x, t[:1], y, c), r"per-sample vector"),
        (lambda x, t, y, c: (x, t, y.float(), c), r"integer labels"),
        (lambda x, t, y, c: (x, t, y, None), r"pass cls_token of shape \(2, 12\)"),
        (lambda x, t, y, c: (x, t, y, c[:, :5]), r"found \(2, 5\)"),
    ],
)
def test_bad_input_names_expected_and_found(mutate, match):
    model = tiny_sit("reglue").eval()
    x, t, y, cls = mutate(*inputs(model))
    with pytest.raises(ValueError, match=match):
        model(x, t, y, cls_token=cls)


def test_cls_token_given_to_model_without_cls_slot():
    model = tiny_sit("repa").eval()
    x, t, y, _ = inputs(model)
    with pytest.raises(ValueError, match="no CLS slot"):
        model(x, t, y, cls_token=torch.zeros(2, 12))


def test_state_dict_from_another_size_names_expected_and_found():
    small = build_sit("SiT-S/8", input_size=16, num_classes=10)
    other = build_sit("SiT-S/8", input_size=16, num_classes=10, hidden_size=192, num_heads=3)
    with pytest.raises(ValueError, match=r"expected \(1, 5, 384\), found \(1, 5, 192\)") as err:
        load_state_dict_strict(small, other.state_dict(), "checkpoint")
    assert "hidden size 192" in str(err.value)
    with pytest.raises(ValueError, match="missing key"):
        load_state_dict_strict(small, {k: v for k, v in small.state_dict().items() if "wg_norm" not in k}, "ckpt")


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = tiny_sit("reglue").eval()
    model.save_pretrained(tmp_path / "snap")
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["config.json", "model.safetensors"]
    loaded = SiT.from_pretrained(tmp_path / "snap").eval()
    assert loaded.config == model.config
    x, t, y, cls = inputs(model)
    assert torch.equal(model(x, t, y, cls_token=cls)[0], loaded(x, t, y, cls_token=cls)[0])


def test_from_pretrained_missing_files_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        SiT.from_pretrained(tmp_path)


def test_training_mode_drops_labels_to_null():
    model = tiny_sit("sit", class_dropout_prob=1.0)
    x, t, y, _ = inputs(model)
    y = torch.zeros_like(y)
    null = torch.full_like(y, 10)
    model.train()
    dropped = model(x, t, y)[0]
    model.eval()
    assert torch.equal(dropped, model(x, t, null)[0])
    assert not torch.equal(dropped, model(x, t, y)[0])


def test_check_inputs_can_be_switched_off_for_fast_paths():
    model = tiny_sit("sit").eval()
    model.check_inputs = False
    x, t, y, _ = inputs(model)
    model(x, t + 0.5, y)  # out of range t is no longer validated (no host sync)


def test_preset_lookup():
    assert get_preset("reglue").model_kwargs() == {"in_channels": 20, "use_cls_token": True, "z_dim": 768}
    assert get_preset("redi").model_kwargs()["in_channels"] == 12
    assert get_preset("sit").model_kwargs()["z_dim"] is None
    assert get_preset("repa").loss_kwargs() == {"lambda_sem": 0.0, "lambda_cls": 0.0, "lambda_rep": 0.5}
    with pytest.raises(ValueError, match="reglue"):
        get_preset("dit")


@pytest.mark.parametrize("qk_norm", [False, True])
def test_math_attention_equals_sdpa_with_the_same_weights(qk_norm):
    model = tiny_sit("reglue", qk_norm=qk_norm).eval()
    state = model.state_dict()
    x, t, y, cls = inputs(model)

    def outputs_and_grads(kernel):
        model.set_attention(kernel).zero_grad()
        out = model(x, t, y, cls_token=cls)
        sum(o.square().sum() for o in out).backward()
        return [*out, *(p.grad for p in model.parameters() if p.requires_grad)]

    sdpa, math = outputs_and_grads("sdpa"), outputs_and_grads("math")
    assert model.state_dict().keys() == state.keys()  # the authors' checkpoints still load
    for a, b in zip(sdpa, math):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        model.set_attention("flash")
