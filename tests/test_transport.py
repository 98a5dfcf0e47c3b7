"""Interpolant paths, score conversion, time sampling and the joint loss (SPEC §2, §7)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_sit
from reglue import transport
from reglue.presets import PRESETS
from reglue.transport import JointLoss, path_coefficients, sample_time, score_from_velocity

TIMES = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.77, 0.9, 1.0], dtype=torch.float64)
INTERIOR = TIMES[1:-1]
B, LATENT, SEMANTIC, Z, TOKENS = 3, 4, 16, 12, 17


def hand_coefficients(path: str, t: torch.Tensor):
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    c, s = torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
    return c, s, -math.pi / 2 * s, math.pi / 2 * c


# ------------------------------------------------------------------ paths


def test_linear_coefficients_values():
    alpha, sigma, d_alpha, d_sigma = path_coefficients("linear", TIMES)
    assert torch.allclose(alpha, 1 - TIMES)
    assert torch.allclose(sigma, TIMES)
    assert torch.equal(d_alpha, torch.full_like(TIMES, -1.0))
    assert torch.equal(d_sigma, torch.full_like(TIMES, 1.0))


def test_cosine_coefficients_values():
    alpha, sigma, d_alpha, d_sigma = path_coefficients("cosine", TIMES)
    for got, want in zip((alpha, sigma, d_alpha, d_sigma), hand_coefficients("cosine", TIMES)):
        assert torch.allclose(got, want, rtol=0, atol=1e-15)
    assert alpha[0] == 1 and sigma[0] == 0
    assert alpha[-1] == pytest.approx(0, abs=1e-15) and sigma[-1] == 1
    assert sigma[3] == pytest.approx(math.sqrt(0.5)) and alpha[3] == pytest.approx(math.sqrt(0.5))


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_coefficient_derivatives_match_finite_differences(path):
    h = 1e-6
    alpha_p, sigma_p, _, _ = path_coefficients(path, INTERIOR + h)
    alpha_m, sigma_m, _, _ = path_coefficients(path, INTERIOR - h)
    _, _, d_alpha, d_sigma = path_coefficients(path, INTERIOR)
    assert torch.allclose(d_alpha, (alpha_p - alpha_m) / (2 * h), rtol=0, atol=1e-8)
    assert torch.allclose(d_sigma, (sigma_p - sigma_m) / (2 * h), rtol=0, atol=1e-8)


def test_unknown_path_raises():
    with pytest.raises(ValueError):
        path_coefficients("vp", TIMES)
    with pytest.raises(ValueError):
        JointLoss(path="vp")


class RecordingVelocity(nn.Module):
    """Records the noisy inputs and returns a given velocity (no CLS, no projector)."""

    def __init__(self, velocity: torch.Tensor):
        super().__init__()
        self.velocity = velocity

    def forward(self, x, t, y, cls_token=None):
        self.x_t, self.t = x, t
        return self.velocity, None, None


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_loss_builds_x_t_and_velocity_target_from_path(path):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, LATENT, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(B, LATENT, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = (c[:, None, None, None] for c in hand_coefficients(path, t))
    v_target = d_alpha * x0 + d_sigma * eps
    model = RecordingVelocity(v_target + 1.0)
    terms = JointLoss(path=path)(model, x0, torch.zeros(B, dtype=torch.long), t=t, noise=eps)
    assert torch.allclose(model.x_t, alpha * x0 + sigma * eps, rtol=0, atol=1e-14)
    assert torch.equal(model.t, t)
    assert terms.latent.item() == pytest.approx(1.0, abs=1e-6)
    model.velocity = v_target
    assert JointLoss(path=path)(model, x0, torch.zeros(B, dtype=torch.long), t=t,
                                noise=eps).latent.item() == pytest.approx(0.0, abs=1e-10)


# ------------------------------------------------------------------ score


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_score_from_exact_velocity_of_gaussian_data(path):
    g = torch.Generator().manual_seed(1)
    t = INTERIOR
    x = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = (c[:, None, None, None] for c in hand_coefficients(path, t))
    variance = alpha**2 + sigma**2
    velocity = (d_alpha * alpha + d_sigma * sigma) / variance * x
    score = score_from_velocity(velocity, x, t, path)
    assert torch.allclose(score, -x / variance, rtol=1e-10, atol=1e-12)


def test_score_linear_matches_spec_formula():
    g = torch.Generator().manual_seed(2)
    t = INTERIOR
    x = torch.randn(len(t), 2, 3, 3, generator=g, dtype=torch.float64)
    v = torch.randn(len(t), 2, 3, 3, generator=g, dtype=torch.float64)
    te = t[:, None, None, None]
    want = ((1 - te) / -1 * v - x) / (te**2 + (1 - te) * te)
    assert torch.allclose(score_from_velocity(v, x, t, "linear"), want, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ time sampling


def test_uniform_time_sampling():
    t = sample_time(4000, "uniform", "linear", generator=torch.Generator().manual_seed(3))
    want = torch.rand(4000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, want)
    assert t.min() >= 0 and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_lognormal_time_sampling(path):
    t = sample_time(512, "lognormal", path, generator=torch.Generator().manual_seed(4))
    sigma = torch.randn(512, generator=torch.Generator().manual_seed(4)).exp()
    want = sigma / (1 + sigma) if path == "linear" else 2 / math.pi * torch.atan(sigma)
    assert torch.allclose(t, want, rtol=0, atol=1e-7)
    assert t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.median().item() - 0.5) < 0.05


def test_unknown_time_sampling_raises():
    with pytest.raises(ValueError):
        sample_time(4, "logit", "linear")
    with pytest.raises(ValueError):
        sample_time(4, "lognormal", "vp")
    with pytest.raises(ValueError):
        JointLoss(time_sampling="logit")


# ------------------------------------------------------------------ joint loss


def loss_batch(seed: int = 0, semantic: int = SEMANTIC, tokens: int = TOKENS):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x0=torch.randn(B, LATENT + semantic, 8, 8, generator=g),
        y=torch.tensor([1, 4, 9]),
        cls_target=torch.randn(B, Z, generator=g),
        repa_target=torch.randn(B, tokens, Z, generator=g),
        t=torch.tensor([0.2, 0.55, 0.9]),
        noise=torch.randn(B, LATENT + semantic, 8, 8, generator=g),
        cls_noise=torch.randn(B, Z, generator=g),
    )


def forward_by_hand(model, batch):
    t = batch["t"]
    te = t[:, None, None, None]
    x_t = (1 - te) * batch["x0"] + te * batch["noise"]
    cls_t = (1 - t[:, None]) * batch["cls_target"] + t[:, None] * batch["cls_noise"]
    with torch.no_grad():
        return model(x_t, t, batch["y"], cls_token=cls_t)


def hand_terms(model, batch):
    v, tokens, v_cls = forward_by_hand(model, batch)
    v_target = batch["noise"] - batch["x0"]
    cls_v_target = batch["cls_noise"] - batch["cls_target"]
    err = (v - v_target) ** 2
    latent = err[:, :LATENT].mean(dim=(1, 2, 3)).mean()
    semantic = err[:, LATENT:].mean(dim=(1, 2, 3)).mean()
    cls = ((v_cls - cls_v_target) ** 2).mean(dim=1).mean()
    cos = F.cosine_similarity(tokens, batch["repa_target"], dim=-1)
    repa = (-cos).mean(dim=1).mean()
    return latent, semantic, cls, repa


def test_joint_loss_terms_by_hand():
    model = tiny_sit("reglue").eval()
    batch = loss_batch()
    latent, semantic, cls, repa = hand_terms(model, batch)
    with torch.no_grad():
        terms = JointLoss(lambda_sem=1.0, lambda_cls=0.03, lambda_rep=0.5)(model, **batch)
    for got, want in ((terms.latent, latent), (terms.semantic, semantic),
                      (terms.cls, cls), (terms.repa, repa)):
        assert got.shape == ()
        assert got.item() == pytest.approx(want.item(), abs=1e-6)
    total = latent + semantic + 0.03 * cls + 0.5 * repa
    assert terms.total.item() == pytest.approx(total.item(), abs=1e-6)
    assert len({round(v.item(), 4) for v in (latent, semantic, cls, repa)}) == 4


def test_lambda_sem_schedule():
    loss = JointLoss(lambda_sem=2.0, lambda_sem_schedule=((250_000, 0.5), (500_000, 0.25)))
    steps = (0, 249_999, 250_000, 499_999, 500_000, 10**7)
    assert [loss.lambda_sem_at(s) for s in steps] == [2.0, 2.0, 1.0, 1.0, 0.5, 0.5]
    assert JointLoss(lambda_sem=2.0).lambda_sem_at(10**7) == 2.0
    assert transport.AUTHORS_XL_SEMANTIC_SCHEDULE == ((250_000, 0.5), (500_000, 0.25))


def test_loss_step_changes_total_through_lambda_sem():
    model = tiny_sit("reglue").eval()
    batch = loss_batch()
    loss = JointLoss(lambda_sem=2.0, lambda_sem_schedule=transport.AUTHORS_XL_SEMANTIC_SCHEDULE)
    with torch.no_grad():
        early, late = loss(model, **batch, step=0), loss(model, **batch, step=600_000)
    assert (early.lambda_sem, late.lambda_sem) == (2.0, 0.5)
    assert torch.equal(early.semantic, late.semantic)
    diff = (early.total - late.total).item()
    assert diff == pytest.approx(1.5 * early.semantic.item(), rel=1e-5)


def test_non_increasing_schedule_raises():
    with pytest.raises(ValueError):
        JointLoss(lambda_sem_schedule=((500_000, 0.5), (250_000, 0.25)))
    with pytest.raises(ValueError, match="must increase"):
        JointLoss(lambda_sem_schedule=((250_000, 0.5), (250_000, 0.25)))


def test_sit_preset_has_only_latent_term():
    model = tiny_sit("sit").eval()
    batch = loss_batch(semantic=0)
    with torch.no_grad():
        terms = JointLoss()(model, batch["x0"], batch["y"], t=batch["t"], noise=batch["noise"])
    assert terms.semantic is None and terms.cls is None and terms.repa is None
    assert torch.equal(terms.total, terms.latent)
    assert terms.latent.item() > 0
    detached = terms.detached()
    assert set(detached) == {"total", "latent"}
    assert not detached["total"].requires_grad and detached["total"].device == batch["x0"].device


def test_repa_preset_has_repa_but_no_cls():
    model = tiny_sit("repa").eval()
    batch = loss_batch(semantic=0, tokens=16)
    with torch.no_grad():
        terms = JointLoss()(model, batch["x0"], batch["y"], repa_target=batch["repa_target"],
                            t=batch["t"], noise=batch["noise"])
    assert terms.cls is None and terms.semantic is None
    assert terms.repa is not None and -1 <= terms.repa.item() <= 1
    assert terms.total.item() == pytest.approx((terms.latent + 0.5 * terms.repa).item(), abs=1e-6)


def test_repa_target_with_wrong_token_count_names_both_shapes():
    model = tiny_sit("reglue").eval()
    batch = loss_batch(tokens=16)
    with pytest.raises(ValueError) as info, torch.no_grad():
        JointLoss()(model, **batch)
    assert "(3, 16, 12)" in str(info.value) and "(3, 17, 12)" in str(info.value)


def test_projector_without_repa_target_raises():
    model = tiny_sit("repa").eval()
    batch = loss_batch(semantic=0)
    with pytest.raises(ValueError), torch.no_grad():
        JointLoss(lambda_rep=0.5)(model, batch["x0"], batch["y"], t=batch["t"])
    with torch.no_grad():
        terms = JointLoss(lambda_rep=0.0)(model, batch["x0"], batch["y"], t=batch["t"])
    assert terms.repa is None


def test_one_optimiser_step_updates_every_trainable_parameter():
    model = tiny_sit("reglue", perturb=True).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    torch.manual_seed(0)
    JointLoss()(model, **loss_batch()).total.backward()
    optimiser.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable_names
    for prefix in ("cls_projectors2.", "wg_norm.", "final_layer.linear_cls.", "projectors.0.",
                   "x_embedder.proj."):
        assert any(n.startswith(prefix) for n in changed), prefix
    assert "pos_embed" not in trainable_names
    assert torch.equal(model.pos_embed, before["pos_embed"])


def test_repa_term_reaches_blocks_up_to_encoder_depth():
    model = tiny_sit("reglue", perturb=True).eval()
    JointLoss()(model, **loss_batch()).repa.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.projectors[0][0].weight.grad.abs().sum() > 0
    assert model.blocks[1].attn.qkv.weight.grad is None


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    model = tiny_sit("reglue").eval()
    batch = loss_batch()
    tokens = forward_by_hand(model, batch)[1]
    jitter = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(9))
    batch["repa_target"] = tokens + 0.5 * tokens.std() * jitter
    loss = JointLoss()
    with torch.no_grad():
        fp32 = loss(model, **batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = loss(model, **batch)
    for name in ("total", "latent", "semantic", "cls", "repa"):
        got, want = getattr(bf16, name), getattr(fp32, name)
        assert torch.isfinite(got), name
        assert got.item() == pytest.approx(want.item(), rel=5e-2), name
    assert fp32.repa.item() < -0.5
    assert bf16.latent.item() != fp32.latent.item()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_loss_has_exactly_its_terms_and_backpropagates(name):
    preset = PRESETS[name]
    model = tiny_sit(name).train()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4 + preset.semantic_channels, 8, 8, generator=g)
    tokens = 16 + int(preset.cls_token)
    terms = JointLoss(**preset.loss_kwargs())(
        model, x0, torch.tensor([1, 2]),
        cls_target=torch.randn(2, 12, generator=g) if preset.cls_token else None,
        repa_target=torch.randn(2, tokens, 12, generator=g) if preset.repa else None,
        generator=g,
    )
    assert (terms.semantic is not None) == (preset.semantic_channels > 0)
    assert (terms.cls is not None) == preset.cls_token
    assert (terms.repa is not None) == preset.repa
    assert torch.isfinite(terms.total)
    terms.total.backward()
    assert model.x_embedder.proj.weight.grad is not None
