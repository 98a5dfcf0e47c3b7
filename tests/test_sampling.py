"""Samplers (SPEC §8): call counts, guidance interval, guidance rules, reference loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_sit
from reglue.presets import PRESETS
from reglue.sampling import Guidance, SampleNoise, sample_ode, sample_sde
from reglue.seeding import NOISE_STREAM, seeded_generator

B, LATENT, SEMANTIC, Z = 2, 4, 16, 12


class CallRecorder(nn.Module):
    """Wraps a model and records (batch size, time, labels, cls_token) of every call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model
        self.calls: list[tuple[int, float, torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x, t, y, cls_token=None, **options):  # options reach the wrapped SiT, as through DDP
        assert torch.all(t == t[0])
        cls = None if cls_token is None else cls_token.clone()
        self.calls.append((x.shape[0], float(t[0]), y.clone(), cls))
        self.options = options
        return self.module(x, t, y, cls_token=cls_token, **options)

    @property
    def batches(self) -> list[int]:
        return [c[0] for c in self.calls]

    @property
    def times(self) -> list[float]:
        return [c[1] for c in self.calls]


class ConstantVelocity(nn.Module):
    """Velocity constant per channel, one set for real labels and one for the null label.

    With ``cls_coupling`` the image velocity also adds that multiple of mean(cls), so the
    CLS trajectory shows in the returned image state.
    """

    def __init__(self, channels: int, cls_dim: int | None = None, cls_coupling: float = 0.0,
                 num_classes: int = 10, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.num_classes = num_classes
        self.v_cond = torch.randn(channels, generator=g, dtype=torch.float64)
        self.v_uncond = torch.randn(channels, generator=g, dtype=torch.float64)
        self.cls_dim = cls_dim
        self.use_cls_token = cls_dim is not None
        if cls_dim is not None:
            self.c_cond = torch.randn(cls_dim, generator=g, dtype=torch.float64)
            self.c_uncond = torch.randn(cls_dim, generator=g, dtype=torch.float64)
        self.cls_coupling = cls_coupling

    def forward(self, x, t, y, cls_token=None):
        null = (y == self.num_classes)[:, None]
        v = torch.where(null, self.v_uncond, self.v_cond)[:, :, None, None] + 0 * x
        if self.cls_dim is None:
            return v, None, None
        v = v + self.cls_coupling * cls_token.mean(-1)[:, None, None, None]
        v_cls = torch.where(null, self.c_uncond, self.c_cond) + 0 * cls_token
        return v, None, v_cls


def authors_coefficients(path: str, t: float) -> tuple[float, float, float, float]:
    """(α, σ, α̇, σ̇) as the authors' ``get_score_from_velocity`` spells them per path type."""
    if path == "linear":
        return 1 - t, t, -1.0, 1.0
    return (math.cos(t * math.pi / 2), math.sin(t * math.pi / 2),
            -math.pi / 2 * math.sin(t * math.pi / 2), math.pi / 2 * math.cos(t * math.pi / 2))


def reference_sde(model, x, cls, y, num_steps, cfg=1.0, cls_cfg=None, low=0.0, high=1.0,
                  vae_only=False, null=10, path="linear"):
    """SPEC §8 Euler–Maruyama written out as the authors' ``euler_maruyama_sampler(..., path_type)``:
    score = (α/α̇·v − x) / (σ² − α/α̇·σ̇·σ), g = 2·t, ε_x then ε_cls per noisy step. Guidance as
    reglue.sampling.Guidance decides it: the unconditional pass runs when cfg > 1 or the CLS scale > 1
    (the authors look at cfg only: identical whenever cfg > 1)."""
    cls_cfg = cfg if cls_cfg is None else cls_cfg
    x, cls = x.double(), None if cls is None else cls.double()
    y_null = torch.full_like(y, null)
    grid = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    for i in range(num_steps):
        t, dt, last = grid[i], grid[i + 1] - grid[i], i == num_steps - 1
        g = 2 * t
        if not last:
            eps_x = torch.randn_like(x)
            eps_cls = None if cls is None else torch.randn_like(cls)

        def drifts(labels):
            with torch.no_grad():
                v, _, v_cls = model(x, torch.full((x.shape[0],), t, dtype=torch.float64), labels,
                                    cls_token=cls)
            out = []
            for vel, state in ((v, x), (v_cls, cls)):
                if vel is None:
                    out.append(None)
                    continue
                alpha, sigma, d_alpha, d_sigma = authors_coefficients(path, t)
                ratio = alpha / d_alpha
                score = (ratio * vel.double() - state) / (sigma**2 - ratio * d_sigma * sigma)
                out.append(vel.double() - 0.5 * g * score)
            return out

        d_x, d_cls = drifts(y)
        if (cfg > 1 or cls_cfg > 1) and low <= t <= high:
            u_x, u_cls = drifts(y_null)
            if cfg > 1 and vae_only and not last:
                k = LATENT
                d_x = torch.cat([d_x[:, :k] + cfg * (d_x[:, :k] - u_x[:, :k]), d_x[:, k:]], 1)
            elif cfg > 1:
                d_x = u_x + cfg * (d_x - u_x)
            if d_cls is not None and cls_cfg > 0:
                d_cls = u_cls + cls_cfg * (d_cls - u_cls)
        x = x + d_x * dt
        if cls is not None:
            cls = cls + d_cls * dt
        if not last:
            x = x + math.sqrt(g) * math.sqrt(abs(dt)) * eps_x
            if cls is not None:
                cls = cls + math.sqrt(g) * math.sqrt(abs(dt)) * eps_cls
    return x


def reference_ode(model, x, cls, y, num_steps, heun=False, cfg=1.0, low=0.0, high=1.0, null=10):
    """SPEC §8 ODE written out: Euler on linspace(1, 0, N+1), Heun except on the last step."""
    x, cls = x.double(), cls.double()
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()

    def velocity(x, cls, t, guided):
        t_vec = torch.full((x.shape[0],), t, dtype=torch.float64)
        with torch.no_grad():
            v, _, v_cls = model(x, t_vec, y, cls_token=cls)
            if not guided:
                return v, v_cls
            u, _, u_cls = model(x, t_vec, torch.full_like(y, null), cls_token=cls)
        return u + cfg * (v - u), u_cls + cfg * (v_cls - u_cls)

    for i in range(num_steps):
        t, t_next = grid[i], grid[i + 1]
        dt, guided = t_next - t, cfg > 1 and low <= t <= high
        d_x, d_cls = velocity(x, cls, t, guided)
        x_next, cls_next = x + dt * d_x, cls + dt * d_cls
        if heun and i < num_steps - 1:
            p_x, p_cls = velocity(x_next, cls_next, t_next, guided)
            x_next, cls_next = x + dt * (d_x + p_x) / 2, cls + dt * (d_cls + p_cls) / 2
        x, cls = x_next, cls_next
    return x


def reglue_inputs(seed: int = 1, batch: int = B):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, LATENT + SEMANTIC, 8, 8, generator=g)
    cls = torch.randn(batch, Z, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, cls, y


def seeded(fn, *args, seed: int = 123, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


def sde_starts(num_steps: int) -> list[float]:
    return torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist()


def ode_grid(num_steps: int) -> list[float]:
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()


@pytest.fixture(scope="module")
def reglue_model():
    return tiny_sit("reglue").eval()


# ------------------------------------------------------------------ call counts


@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_sde_makes_one_call_per_step(reglue_model, num_steps):
    x, cls, y = reglue_inputs()
    model = CallRecorder(reglue_model)
    seeded(sample_sde, model, x, y, cls, num_steps=num_steps)
    assert len(model.calls) == num_steps
    assert model.times == pytest.approx(sde_starts(num_steps))


@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_ode_euler_makes_one_call_per_step(reglue_model, num_steps):
    x, cls, y = reglue_inputs()
    model = CallRecorder(reglue_model)
    sample_ode(model, x, y, cls, num_steps=num_steps)
    assert len(model.calls) == num_steps
    assert model.times == pytest.approx(ode_grid(num_steps)[:-1])


@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_ode_heun_makes_two_calls_per_step_but_the_last(reglue_model, num_steps):
    x, cls, y = reglue_inputs()
    model = CallRecorder(reglue_model)
    sample_ode(model, x, y, cls, num_steps=num_steps, heun=True)
    assert len(model.calls) == 2 * num_steps - 1
    grid = ode_grid(num_steps)
    expected = [t for i in range(num_steps - 1) for t in (grid[i], grid[i + 1])] + [grid[-2]]
    assert model.times == pytest.approx(expected)


# ------------------------------------------------------------------ guidance interval


def assert_doubling(calls, guided_flags, y, null):
    assert len(calls) == len(guided_flags)
    for (batch, _, labels, cls), guided in zip(calls, guided_flags):
        if guided:
            assert batch == 2 * B
            assert torch.equal(labels, torch.cat([y, torch.full_like(y, null)]))
            assert torch.equal(cls[:B], cls[B:])
        else:
            assert batch == B
            assert torch.equal(labels, y)


@pytest.mark.parametrize("null_label", [None, 7])
def test_sde_doubles_batch_exactly_inside_interval(reglue_model, null_label):
    x, cls, y = reglue_inputs()
    starts = sde_starts(10)
    low, high = starts[6], starts[3]
    model = CallRecorder(reglue_model)
    seeded(sample_sde, model, x, y, cls, num_steps=10, guidance=Guidance(scale=2.0, low=low, high=high), null_label=null_label)
    guided = [low <= t <= high for t in starts]
    assert guided == [False] * 3 + [True] * 4 + [False] * 3
    assert_doubling(model.calls, guided, y, 10 if null_label is None else null_label)


def test_sde_last_step_is_guided_when_interval_reaches_its_start(reglue_model):
    x, cls, y = reglue_inputs()
    model = CallRecorder(reglue_model)
    seeded(sample_sde, model, x, y, cls, num_steps=4, guidance=Guidance(scale=1.5, low=0.0, high=0.05))
    assert model.batches == [B, B, B, 2 * B]
    assert model.times[-1] == pytest.approx(0.04)


def test_ode_doubles_batch_exactly_inside_interval(reglue_model):
    x, cls, y = reglue_inputs()
    model = CallRecorder(reglue_model)
    sample_ode(model, x, y, cls, num_steps=8, guidance=Guidance(scale=3.0, low=0.3, high=0.7))
    starts = ode_grid(8)[:-1]
    guided = [0.3 <= t <= 0.7 for t in starts]
    assert sum(guided) == 3
    assert_doubling(model.calls, guided, y, 10)


def test_ode_heun_correction_uses_guidance_of_step_start(reglue_model):
    x, cls, y = reglue_inputs()
    model = CallRecorder(reglue_model)
    sample_ode(model, x, y, cls, num_steps=8, heun=True, guidance=Guidance(scale=3.0, low=0.3, high=0.7))
    grid = ode_grid(8)
    expected_times, guided = [], []
    for i in range(8):
        step_guided = 0.3 <= grid[i] <= 0.7
        stages = (grid[i], grid[i + 1]) if i < 7 else (grid[i],)
        expected_times += stages
        guided += [step_guided] * len(stages)
    assert model.times == pytest.approx(expected_times)
    assert model.batches[2:4] == [B, B]  # step at 0.75: corrector at 0.625 (inside) not doubled
    assert model.batches[8:10] == [2 * B, 2 * B]  # step at 0.375: corrector at 0.25 doubled
    assert_doubling(model.calls, guided, y, 10)


def test_cfg_scale_one_ignores_interval_and_never_doubles(reglue_model):
    x, cls, y = reglue_inputs()
    full, part = CallRecorder(reglue_model), CallRecorder(reglue_model)
    a = seeded(sample_sde, full, x, y, cls, num_steps=6, guidance=Guidance(scale=1.0))
    b = seeded(sample_sde, part, x, y, cls, num_steps=6, guidance=Guidance(scale=1.0, low=0.0, high=0.9))
    assert torch.equal(a, b)
    assert full.batches == part.batches == [B] * 6
    c = sample_ode(full, x, y, cls, num_steps=4, heun=True, guidance=Guidance(scale=1.0))
    d = sample_ode(part, x, y, cls, num_steps=4, heun=True, guidance=Guidance(scale=1.0, high=0.9))
    assert torch.equal(c, d)
    assert set(full.batches + part.batches) == {B}


# ------------------------------------------------------------------ guidance rules


def test_cls_cfg_scale_none_equals_cfg_scale(reglue_model):
    x, cls, y = reglue_inputs()
    a = seeded(sample_sde, reglue_model, x, y, cls, num_steps=5, guidance=Guidance(scale=2.5))
    b = seeded(sample_sde, reglue_model, x, y, cls, num_steps=5, guidance=Guidance(scale=2.5, cls_scale=2.5))
    c = seeded(sample_sde, reglue_model, x, y, cls, num_steps=5, guidance=Guidance(scale=2.5, cls_scale=1.5))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    d = sample_ode(reglue_model, x, y, cls, num_steps=4, heun=True, guidance=Guidance(scale=2.5))
    e = sample_ode(reglue_model, x, y, cls, num_steps=4, heun=True, guidance=Guidance(scale=2.5, cls_scale=2.5))
    assert torch.equal(d, e)


def test_cls_cfg_scale_zero_keeps_conditional_cls_drift_and_guides_latent():
    model = ConstantVelocity(LATENT + SEMANTIC, cls_dim=Z, cls_coupling=1.0)
    x, cls, y = reglue_inputs()
    kwargs = dict(num_steps=5, guidance=Guidance(scale=3.0, low=0.2, high=0.9))
    got = seeded(sample_sde, model, x, y, cls, num_steps=5, guidance=Guidance(scale=3.0, cls_scale=0, low=0.2, high=0.9))
    want = seeded(reference_sde, model, x, cls, y, cls_cfg=0, low=0.2, high=0.9,
                  num_steps=5, cfg=3.0)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    guided_cls = seeded(sample_sde, model, x, y, cls, **kwargs)
    assert not torch.allclose(got, guided_cls)
    unguided = seeded(sample_sde, model, x, y, cls, num_steps=5)
    assert not torch.allclose(got, unguided)


def test_cls_cfg_scale_zero_on_real_model_matches_reference():
    model = tiny_sit("reglue").double().eval()
    x, cls, y = reglue_inputs()
    got = seeded(sample_sde, model, x, y, cls, num_steps=4, guidance=Guidance(scale=2.0, cls_scale=0))
    want = seeded(reference_sde, model, x, cls, y, num_steps=4, cfg=2.0, cls_cfg=0)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_vae_only_cfg_rule_matches_hand_derivation():
    model = ConstantVelocity(LATENT + SEMANTIC)
    x, _, y = reglue_inputs()
    got = seeded(sample_sde, model, x, y, num_steps=4, guidance=Guidance(scale=4.0, vae_only=True))
    want = seeded(reference_sde, model, x, None, y, num_steps=4, cfg=4.0, vae_only=True)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    standard = seeded(sample_sde, model, x, y, num_steps=4, guidance=Guidance(scale=4.0))
    assert not torch.allclose(got, standard)


def test_vae_only_cfg_one_noisy_step_in_closed_form():
    model = ConstantVelocity(LATENT + SEMANTIC)
    x, _, y = reglue_inputs()
    w = 4.0
    got = seeded(sample_sde, model, x, y, num_steps=2, guidance=Guidance(scale=w, vae_only=True))
    torch.manual_seed(123)
    eps = torch.randn_like(x.double())
    v_c = model.v_cond[None, :, None, None]
    v_u = model.v_uncond[None, :, None, None]
    # t = 1: score = −x, g = 2, so the drift is v + x and d_c − d_u = v_c − v_u.
    d1 = x.double() + torch.cat([(v_c + w * (v_c - v_u))[:, :LATENT], v_c[:, LATENT:]], 1)
    x1 = x.double() - 0.96 * d1 + math.sqrt(2 * 0.96) * eps
    # t = 0.04 → 0 with standard guidance: drift = 1.96·v + x.
    d2 = x1 + 1.96 * (v_u + w * (v_c - v_u))
    assert torch.allclose(got, x1 - 0.04 * d2, rtol=0, atol=1e-12)


def test_sde_matches_reference_loop_float64():
    model = tiny_sit("reglue").double().eval()
    x, cls, y = reglue_inputs(seed=5, batch=3)
    got = seeded(sample_sde, model, x, y, cls, num_steps=6, guidance=Guidance(scale=2.0, low=0.3, high=0.8))
    want = seeded(reference_sde, model, x, cls, y, low=0.3, high=0.8, num_steps=6, cfg=2.0)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    unguided = seeded(reference_sde, model, x, cls, y, num_steps=6)
    assert not torch.allclose(got, unguided, atol=1e-6)


@pytest.mark.parametrize("heun", [False, True])
def test_ode_matches_reference_loop_float64(heun):
    model = tiny_sit("reglue").double().eval()
    x, cls, y = reglue_inputs(seed=6, batch=3)
    got = sample_ode(model, x, y, cls, num_steps=5, heun=heun, guidance=Guidance(scale=2.0, low=0.3, high=0.7))
    want = reference_ode(model, x, cls, y, num_steps=5, heun=heun, cfg=2.0, low=0.3, high=0.7)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_sde_takes_the_cosine_path_from_the_model_and_matches_the_authors_sampler():
    """A model trained on the cosine path is sampled with the cosine score unless told otherwise."""
    model = tiny_sit("reglue", path="cosine").double().eval()
    x, cls, y = reglue_inputs(seed=7, batch=3)
    guidance = Guidance(scale=2.0, high=0.8)
    got = seeded(sample_sde, model, x, y, cls, num_steps=6, guidance=guidance)
    want = seeded(reference_sde, model, x, cls, y, num_steps=6, cfg=2.0, high=0.8, path="cosine")
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    linear = seeded(sample_sde, model, x, y, cls, num_steps=6, guidance=guidance, path="linear")
    assert not torch.allclose(got, linear, atol=1e-6)  # the path matters: the old default was wrong


# ------------------------------------------------------------------ guidance values


def test_cls_guidance_alone_runs_the_unconditional_pass_and_guides_only_the_cls():
    """cfg 1 with cls 3: the CLS is guided, the joint state takes its conditional drift."""
    model = ConstantVelocity(LATENT + SEMANTIC, cls_dim=Z, cls_coupling=1.0)
    x, cls, y = reglue_inputs()
    recorder = CallRecorder(model)
    got = seeded(sample_sde, recorder, x, y, cls, num_steps=4, guidance=Guidance(scale=1.0, cls_scale=3.0))
    assert recorder.batches == [2 * B] * 4
    want = seeded(reference_sde, model, x, cls, y, num_steps=4, cfg=1.0, cls_cfg=3.0)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    unguided = seeded(sample_sde, model, x, y, cls, num_steps=4)
    assert not torch.allclose(got, unguided, atol=1e-6)  # the CLS trajectory (coupled into x) changed
    ode = CallRecorder(model)
    sample_ode(ode, x, y, cls, num_steps=3, guidance=Guidance(cls_scale=3.0, high=0.5))
    assert ode.batches == [B, B, 2 * B]  # steps start at 1, 2/3, 1/3


@pytest.mark.parametrize("kwargs,message", [
    ({"scale": 0.5}, "must be >= 1"),
    ({"scale": -2.0}, "must be >= 1"),
    ({"scale": float("nan")}, "must be >= 1"),
    ({"cls_scale": -1.0}, "must be >= 0"),
    ({"scale": 1.0, "cls_scale": 0.5}, "would be ignored"),
    ({"low": -0.1}, "0 <= LOW <= HIGH <= 1"),
    ({"high": 1.5}, "0 <= LOW <= HIGH <= 1"),
    ({"vae_only": True}, "needs a guidance scale > 1"),
])
def test_guidance_that_would_do_nothing_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Guidance(**kwargs)


def test_guidance_is_frozen_and_keyword_only():
    g = Guidance(scale=2.0, cls_scale=0.0, low=0.1, high=0.9)
    assert (g.enabled, g.effective_cls_scale, g.active(0.05), g.active(0.5)) == (True, 0.0, False, True)
    assert not Guidance().enabled and Guidance(cls_scale=1.0).enabled is False
    with pytest.raises(TypeError):
        Guidance(2.0)  # the scale must be named
    with pytest.raises(AttributeError):
        g.scale = 3.0


def test_ode_refuses_the_authors_vae_only_rule(reglue_model):
    x, cls, y = reglue_inputs()
    with pytest.raises(ValueError, match="SDE sampler only"):
        sample_ode(reglue_model, x, y, cls, num_steps=2, guidance=Guidance(scale=2.0, vae_only=True))


# ------------------------------------------------------------------ presets


def preset_inputs(name: str):
    g = torch.Generator().manual_seed(3)
    channels = LATENT + PRESETS[name].semantic_channels
    x = torch.randn(B, channels, 8, 8, generator=g)
    cls = torch.randn(B, Z, generator=g) if PRESETS[name].cls_token else None
    y = torch.randint(0, 10, (B,), generator=g)
    return x, cls, y


@pytest.mark.parametrize("cfg", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_samples_finite(name, cfg):
    model = tiny_sit(name).eval()
    x, cls, y = preset_inputs(name)
    outs = [
        seeded(sample_sde, model, x, y, cls, num_steps=3, guidance=Guidance(scale=cfg, high=0.7)),
        sample_ode(model, x, y, cls, num_steps=3, guidance=Guidance(scale=cfg)),
        sample_ode(model, x, y, cls, num_steps=3, heun=True, guidance=Guidance(scale=cfg)),
    ]
    for out in outs:
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
        assert not torch.equal(out, x.double())


# ------------------------------------------------------------------ bad input


def test_empty_guidance_interval_raises(reglue_model):
    x, cls, y = reglue_inputs()
    with pytest.raises(ValueError):
        sample_sde(reglue_model, x, y, cls, num_steps=2, guidance=Guidance(low=0.8, high=0.2))
    with pytest.raises(ValueError):
        sample_ode(reglue_model, x, y, cls, num_steps=2, guidance=Guidance(low=0.8, high=0.2))


def test_zero_steps_raises(reglue_model):
    x, cls, y = reglue_inputs()
    with pytest.raises(ValueError):
        sample_sde(reglue_model, x, y, cls, num_steps=0)
    with pytest.raises(ValueError):
        sample_ode(reglue_model, x, y, cls, num_steps=0)


@pytest.mark.parametrize("check_inputs", [True, False])
def test_missing_cls_latents_for_cls_model_raises(reglue_model, check_inputs):
    x, _, y = reglue_inputs()
    reglue_model.check_inputs = check_inputs
    try:
        with pytest.raises(ValueError, match="pass cls_latents"):
            sample_sde(reglue_model, x, y, num_steps=2)
        with pytest.raises(ValueError, match="pass cls_latents"):
            sample_ode(reglue_model, x, y, num_steps=2)
    finally:
        reglue_model.check_inputs = True


def test_cls_latents_for_model_without_cls_slot_raises():
    model = tiny_sit("repa").eval()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="no CLS slot"):
        sample_sde(model, x, torch.tensor([1, 2]), torch.randn(2, 12), num_steps=2)


# ------------------------------------------------------------------ model mode


def test_training_mode_model_samples_as_in_eval_and_stays_training():
    model = tiny_sit("reglue")
    x, cls, y = reglue_inputs()
    kwargs = dict(num_steps=4, guidance=Guidance(scale=2.0))
    model.eval()
    want_sde = seeded(sample_sde, model, x, y, cls, **kwargs)
    want_ode = sample_ode(model, x, y, cls, heun=True, **kwargs)
    model.train()
    got_sde = seeded(sample_sde, model, x, y, cls, **kwargs)
    assert model.training and model.y_embedder.training
    got_ode = seeded(sample_ode, model, x, y, cls, heun=True, **kwargs)
    assert model.training and model.y_embedder.training
    assert torch.equal(got_sde, want_sde)
    assert torch.equal(got_ode, want_ode)


# ------------------------------------------------------------------ per-sample noise on the device


class RandomOps(TorchDispatchMode):
    """Records every ATen op (name, first argument's storage) and those that draw random numbers
    (op name, output tensor, generator)."""

    def __init__(self):
        super().__init__()
        self.draws: list[tuple[str, torch.Tensor, torch.Generator | None]] = []
        self.ops: list[str] = []
        self.inputs: list[int | None] = []  # storage of each op's first argument, when a tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.ops.append(name)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.inputs.append(first.untyped_storage().data_ptr() if first is not None else None)
        if name in ("normal", "normal_", "randn", "randn_like", "rand", "rand_like", "uniform_"):
            self.draws.append((name, out, kwargs.get("generator")))
        return out


def test_step_noise_is_drawn_on_the_sampling_device_by_each_samples_generator(reglue_model):
    """Every noisy step draws in place, on the state's device, one normal_ per sample and state
    from that sample's own generator (ε_x then ε_cls), into buffers allocated once; nothing is
    drawn elsewhere and stacked or copied over."""
    x, cls, y = reglue_inputs(batch=3)
    generators = [seeded_generator(5, NOISE_STREAM, i, device=x.device) for i in range(3)]
    assert all(g.device == x.device for g in generators)
    with RandomOps() as recorded:
        sample_sde(reglue_model, x, y, cls, num_steps=4, guidance=Guidance(scale=2.0), noise_generators=generators)
    noisy_steps = 3
    assert [name for name, _, _ in recorded.draws] == ["normal_"] * (noisy_steps * 3 * 2)
    seeds = [g.initial_seed() for g in generators]  # the dispatcher hands over new wrappers of the same generators
    assert [g.initial_seed() for _, _, g in recorded.draws] == [s for s in seeds for _ in range(2)] * noisy_steps
    assert all(g.device == x.device for _, _, g in recorded.draws)
    assert all(out.device == x.device and out.dtype == torch.float64 for _, out, _ in recorded.draws)
    assert [tuple(out.shape) for _, out, _ in recorded.draws[:2]] == [tuple(x.shape[1:]), tuple(cls.shape[1:])]
    assert len({out.untyped_storage().data_ptr() for _, out, _ in recorded.draws}) == 2  # two buffers, every step
    assert "stack" not in recorded.ops


def test_sample_noise_keeps_the_cpu_numbers_of_per_sample_randn():
    """On CPU each step's ε_x, ε_cls of sample b are torch.randn(...) from generator b, in that
    order, in float64 — the numbers every earlier version drew (images stay the same)."""
    x, cls = torch.zeros(3, 2, 4, 4, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64)
    noise = SampleNoise(x, cls, [seeded_generator(1, NOISE_STREAM, i) for i in range(3)])
    reference = [seeded_generator(1, NOISE_STREAM, i) for i in range(3)]
    for _ in range(2):
        eps_x, eps_cls = noise.draw()
        for b, g in enumerate(reference):
            assert torch.equal(eps_x[b], torch.randn(2, 4, 4, generator=g, dtype=torch.float64))
            assert torch.equal(eps_cls[b], torch.randn(5, generator=g, dtype=torch.float64))


def test_noise_generators_on_another_device_are_refused():
    x, cls = torch.zeros(2, 2, 4, 4, dtype=torch.float64, device="meta"), torch.zeros(2, 5, device="meta")
    with pytest.raises(ValueError, match="seed them on the sampling device"):
        SampleNoise(x, cls, [seeded_generator(0, NOISE_STREAM, i) for i in range(2)])
    with pytest.raises(ValueError, match="one per sample"):
        SampleNoise(torch.zeros(2, 3), None, [seeded_generator(0, NOISE_STREAM, 0)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_noise_on_cuda_comes_from_cuda_generators(reglue_model):
    x, cls, y = (t.cuda() for t in reglue_inputs(batch=2))
    model = copy.deepcopy(reglue_model).cuda()
    generators = [seeded_generator(5, NOISE_STREAM, i, device="cuda") for i in range(2)]
    with RandomOps() as recorded:
        sample = sample_sde(model, x, y, cls, num_steps=3, noise_generators=generators)
    assert sample.is_cuda and len(recorded.draws) == 2 * 2 * 2
    assert all(eps.is_cuda and g.device.type == "cuda" for _, eps, g in recorded.draws)
    with pytest.raises(ValueError, match="seed them on the sampling device"):
        sample_sde(model, x, y, cls, num_steps=3, noise_generators=[seeded_generator(5, NOISE_STREAM, i) for i in range(2)])


# ------------------------------------------------------------------ rows per model call


def test_sit_samples_without_its_repa_projector(reglue_model):
    """The sampler asks the SiT to skip the REPA projector (its output is unused): the velocities are
    the ones the full forward gives, bit for bit."""
    x, cls, y = reglue_inputs()
    t = torch.full((B,), 0.7)
    with torch.no_grad():
        full = reglue_model(x, t, y, cls_token=cls)
        skipped = reglue_model(x, t, y, cls_token=cls, repa=False)
    assert full[1] is not None and skipped[1] is None
    assert torch.equal(full[0], skipped[0]) and torch.equal(full[2], skipped[2])
    model = CallRecorder(reglue_model)
    seeded(sample_sde, model, x, y, cls, num_steps=2)
    assert model.options == {"repa": False}


def test_max_call_rows_cuts_a_step_into_near_equal_unpadded_calls(reglue_model):
    x, cls, y = reglue_inputs(batch=5)
    model = CallRecorder(reglue_model)
    starts = sde_starts(3)
    out = seeded(sample_sde, model, x, y, cls, num_steps=3, guidance=Guidance(scale=2.0, high=starts[1]),
                 max_call_rows=4)
    assert model.batches == [3, 2] + [4, 3, 3] * 2  # 5 rows, then 10 guided rows
    whole = seeded(sample_sde, reglue_model, x, y, cls, num_steps=3, guidance=Guidance(scale=2.0, high=starts[1]))
    assert torch.allclose(out, whole, atol=1e-5)  # other shapes, other kernels: equal within float rounding
    with pytest.raises(ValueError, match="not both"):
        sample_sde(reglue_model, x, y, cls, num_steps=2, micro_batch=4, max_call_rows=4)


def test_frozen_weights_are_cast_once_per_run_under_autocast():
    """Autocast keeps its bf16 copy of a weight only while the weight requires grad; a frozen model (an
    EMA) is still cast once per sampling run, not once per step, gives the same samples as an unfrozen
    one, and is frozen again afterwards."""
    model = tiny_sit("reglue").eval()
    x, cls, y = reglue_inputs()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def weight_casts(num_steps: int) -> tuple[int, torch.Tensor]:
        with RandomOps() as recorded, torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(0)
            out = sample_sde(model, x, y, cls, num_steps=num_steps)
        return sum(op == "_to_copy" and ptr in weights for op, ptr in zip(recorded.ops, recorded.inputs)), out

    unfrozen_casts, unfrozen = weight_casts(3)
    model.requires_grad_(False)
    assert weight_casts(3)[0] == weight_casts(6)[0] == unfrozen_casts > 0
    assert torch.equal(weight_casts(3)[1], unfrozen)
    assert not any(p.requires_grad for p in model.parameters())
