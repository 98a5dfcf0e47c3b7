"""Interpolant paths, training-time sampling and the joint REGLUE loss (SPEC §2, §7).

Clock: t = 1 is pure noise, t = 0 is data. x_t = α_t·x₀ + σ_t·ε and the model regresses
the velocity v = α̇_t·x₀ + σ̇_t·ε (paper Eq. 3-4). The latent, the semantic channels and the
CLS vector share t and draw independent noise; the REPA term aligns the projector output
with the VFM tokens by negative cosine similarity (Eq. 7-9).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reglue.errors import InputError

PATHS = ("linear", "cosine")
TIME_SAMPLINGS = ("uniform", "lognormal")
# The authors' XL schedule: λ_s × 0.5 from step 250k, × 0.25 from step 500k.
AUTHORS_XL_SEMANTIC_SCHEDULE: tuple[tuple[int, float], ...] = ((250_000, 0.5), (500_000, 0.25))


def lambda_sem_milestones(schedule: Sequence[Sequence]) -> tuple[tuple[int, float], ...]:
    """``[[step, factor], ...]`` as ``((step, factor), ...)``; ValueError unless every step is a
    whole number >= 0, every factor a number >= 0 and the steps increase."""
    milestones = []
    for item in schedule:
        ok = isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2
        step, factor = item if ok else (None, None)
        if not (ok and isinstance(step, int | float) and not isinstance(step, bool) and float(step).is_integer()
                and step >= 0 and isinstance(factor, int | float) and not isinstance(factor, bool) and factor >= 0):
            raise InputError(f"expected [step, factor] pairs (whole step >= 0, factor >= 0), found {item!r}; "
                             "e.g. [[250000, 0.5], [500000, 0.25]].")
        milestones.append((int(step), float(factor)))
    steps = [s for s, _ in milestones]
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise InputError(f"milestone steps must increase, found {steps}; list the [step, factor] pairs in "
                         "increasing step order, e.g. [[250000, 0.5], [500000, 0.25]].")
    return tuple(milestones)


def path_coefficients(path: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(α_t, σ_t, α̇_t, σ̇_t), each shaped like ``t``."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == "cosine":
        half_pi = math.pi / 2
        return (
            torch.cos(half_pi * t), torch.sin(half_pi * t),
            -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t),
        )
    raise InputError(f"unknown path {path!r}; choose one of {PATHS}.")


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against x."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path: str) -> torch.Tensor:
    """Score of x_t from the velocity: s = (α/α̇·v − x) / (σ² − (α/α̇)·σ̇·σ); t is (B,)."""
    alpha, sigma, d_alpha, d_sigma = path_coefficients(path, expand_like(t, x))
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma**2 - ratio * d_sigma * sigma)


def sample_time(
    batch: int, sampling: str, path: str, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training times (B,) in float32: uniform U(0,1), or lognormal σ = exp(N(0,1)) mapped to t."""
    if sampling == "uniform":
        return torch.rand(batch, device=device, generator=generator)
    if sampling == "lognormal":
        sigma = torch.randn(batch, device=device, generator=generator).exp()
        if path == "linear":
            return sigma / (1 + sigma)
        if path == "cosine":
            return (2 / math.pi) * torch.atan(sigma)
        raise InputError(f"unknown path {path!r}; choose one of {PATHS}.")
    raise InputError(f"unknown time sampling {sampling!r}; choose one of {TIME_SAMPLINGS}.")


@dataclass
class LossTerms:
    """Batch-mean loss terms (absent parts are None) and the weighted total."""

    total: torch.Tensor
    latent: torch.Tensor
    semantic: torch.Tensor | None
    cls: torch.Tensor | None
    repa: torch.Tensor | None
    lambda_sem: float

    def detached(self) -> dict[str, torch.Tensor]:
        """The present terms by name, as detached 0-d tensors on their device (no host sync)."""
        names = ("total", "latent", "semantic", "cls", "repa")
        return {n: getattr(self, n).detach() for n in names if getattr(self, n) is not None}


def negative_cosine(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, T, z) × (B, T, z) -> (B,): mean over tokens of −cos, normalised in float32."""
    a = F.normalize(tokens.float(), dim=-1)
    b = F.normalize(target.float(), dim=-1)
    return -(a * b).sum(-1).mean(-1)


class JointLoss:
    """L = L_lat + λ_s(step)·L_sem + λ_cls·L_cls + λ_rep·L_rep (SPEC §7).

    ``x0`` (B, 4 + S, H, W) stacks the clean latent and S semantic channels; the first
    ``latent_channels`` form L_lat, the rest L_sem. ``cls_target`` (B, z) is the clean
    CLS vector (only for models with a CLS slot); ``repa_target`` (B, T, z) the VFM tokens
    the projector aligns to. Terms whose part is absent are None and cost nothing.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        path: str = "linear",
        time_sampling: str = "uniform",
        lambda_sem: float = 1.0,
        lambda_cls: float = 0.03,
        lambda_rep: float = 0.5,
        lambda_sem_schedule: Sequence[tuple[int, float]] = (),
    ):
        if path not in PATHS:
            raise InputError(f"unknown path {path!r}; choose one of {PATHS}.")
        if time_sampling not in TIME_SAMPLINGS:
            raise InputError(f"unknown time sampling {time_sampling!r}; choose one of {TIME_SAMPLINGS}.")
        self.latent_channels = latent_channels
        self.path = path
        self.time_sampling = time_sampling
        self.lambda_sem = lambda_sem
        self.lambda_cls = lambda_cls
        self.lambda_rep = lambda_rep
        self.lambda_sem_schedule = lambda_sem_milestones(lambda_sem_schedule)

    def lambda_sem_at(self, step: int) -> float:
        """λ_s times the factor of the last schedule milestone reached by ``step``."""
        factor = 1.0
        for milestone, f in self.lambda_sem_schedule:
            if step >= milestone:
                factor = f
        return self.lambda_sem * factor

    def __call__(
        self,
        model,
        x0: torch.Tensor,
        y: torch.Tensor,
        cls_target: torch.Tensor | None = None,
        repa_target: torch.Tensor | None = None,
        step: int = 0,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        cls_noise: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> LossTerms:
        """One joint loss evaluation; ``t``/``noise``/``cls_noise`` default to fresh draws and
        ``force_drop_ids`` (label dropout decisions) to the model's own draw."""
        B = x0.shape[0]
        if x0.ndim != 4 or x0.shape[1] < self.latent_channels:
            raise InputError(
                f"x0 must be (B, {self.latent_channels} + S, H, W), found {tuple(x0.shape)}."
            )
        if t is None:
            t = sample_time(B, self.time_sampling, self.path, x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        alpha, sigma, d_alpha, d_sigma = path_coefficients(self.path, t.to(x0.dtype))
        x_t = expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * noise
        v_target = expand_like(d_alpha, x0) * x0 + expand_like(d_sigma, x0) * noise

        cls_t = cls_v_target = None
        if cls_target is not None:
            if cls_noise is None:
                cls_noise = torch.randn(
                    cls_target.shape, device=x0.device, dtype=cls_target.dtype, generator=generator
                )
            cls_t = alpha[:, None] * cls_target + sigma[:, None] * cls_noise
            cls_v_target = d_alpha[:, None] * cls_target + d_sigma[:, None] * cls_noise

        extra = {} if force_drop_ids is None else {"force_drop_ids": force_drop_ids}
        v, repa_tokens, cls_v = model(x_t, t, y, cls_token=cls_t, **extra)

        sq_err = (v.float() - v_target.float()) ** 2  # (B, 4 + S, H, W)
        latent = sq_err[:, : self.latent_channels].mean((1, 2, 3)).mean()
        semantic = sq_err[:, self.latent_channels :].mean((1, 2, 3)).mean() if x0.shape[1] > self.latent_channels else None
        cls = ((cls_v.float() - cls_v_target.float()) ** 2).mean(-1).mean() if cls_v is not None else None
        repa = self._repa_term(repa_tokens, repa_target)

        lambda_sem = self.lambda_sem_at(step)
        total = latent
        for weight, term in ((lambda_sem, semantic), (self.lambda_cls, cls), (self.lambda_rep, repa)):
            if term is not None:
                total = total + weight * term
        return LossTerms(total, latent, semantic, cls, repa, lambda_sem)

    def _repa_term(self, tokens: torch.Tensor | None, target: torch.Tensor | None) -> torch.Tensor | None:
        if self.lambda_rep == 0 or (tokens is None and target is None):
            return None
        if tokens is None:
            raise InputError("repa_target given but the model has no projector (z_dim=None).")
        if target is None:
            raise InputError(
                "the model has a REPA projector and lambda_rep > 0 but no repa_target was given; "
                "pass the VFM tokens or set lambda_rep=0."
            )
        if tokens.shape != target.shape:
            raise InputError(
                f"REPA target shape {tuple(target.shape)} does not match the projector output "
                f"{tuple(tokens.shape)}: models with a CLS slot align [CLS; patches] (1 + N tokens), "
                "others the N patch tokens."
            )
        return negative_cosine(tokens, target).mean()
