"""SDE and ODE samplers for the joint (latent ‖ semantics, CLS) state (SPEC §8).

State is integrated in float64; the model sees inputs cast to its parameter dtype and a
per-sample time vector. Classifier-free guidance doubles the batch as [x, x] with labels
[y, null] inside ``[guidance_low, guidance_high]`` (decided at the step's start time) and
combines the two drifts with one rule, :func:`apply_guidance`.

``micro_batch``: when given, every model call sees exactly this many rows (the rows are cut
into chunks and the last chunk is padded with copies of its last row). Float kernels are
chosen by shape, so a sample's result then does not depend on how many samples share its
batch — the basis of ``reglue sample``'s batch-size-independent images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from reglue.models.sit import unwrap_model
from reglue.transport import score_from_velocity

SDE_LAST_TIME = 0.04  # the Euler-Maruyama grid stops here, then takes one noiseless step to 0


def sde_time_grid(num_steps: int) -> torch.Tensor:
    """``linspace(1, 0.04, N)`` with 0 appended: N + 1 float64 points."""
    grid = torch.linspace(1.0, SDE_LAST_TIME, num_steps, dtype=torch.float64)
    return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])


def ode_time_grid(num_steps: int) -> torch.Tensor:
    """``linspace(1, 0, N + 1)`` in float64."""
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + w·(cond − uncond)."""
    return uncond + scale * (cond - uncond)


class _Guidance:
    """The guidance options of one sampling run and the rule that combines drifts."""

    def __init__(self, cfg_scale, cls_cfg_scale, guidance_low, guidance_high, latent_channels):
        if guidance_low > guidance_high:
            raise ValueError(
                f"guidance interval [{guidance_low}, {guidance_high}] is empty; pass LOW <= HIGH."
            )
        self.cfg_scale = cfg_scale
        self.cls_cfg_scale = cfg_scale if cls_cfg_scale is None else cls_cfg_scale
        self.low, self.high = guidance_low, guidance_high
        self.latent_channels = latent_channels

    def active(self, t: float) -> bool:
        return self.cfg_scale > 1.0 and self.low <= t <= self.high

    def combine(self, cond, uncond, vae_only: bool = False):
        """(x, cls) drifts: conditional, unconditional (None without guidance) -> guided."""
        if uncond is None:
            return cond
        (x_c, cls_c), (x_u, cls_u) = cond, uncond
        if vae_only:
            # The authors' `--vae_cfg` rule, reproduced as is: the 4 VAE channels take
            # d_c + w·(d_c − d_u) (not d_u + w·(...)), the semantic channels take d_c.
            k = self.latent_channels
            latent = x_c[:, :k] + self.cfg_scale * (x_c[:, :k] - x_u[:, :k])
            x = torch.cat([latent, x_c[:, k:]], dim=1)
        else:
            x = apply_guidance(x_c, x_u, self.cfg_scale)
        if cls_c is not None and self.cls_cfg_scale > 0:
            cls_c = apply_guidance(cls_c, cls_u, self.cls_cfg_scale)
        return x, cls_c


def padded_rows(n: int, micro_batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Row indices 0..n−1, padded to a multiple of ``micro_batch`` by repeating row n−1."""
    return torch.arange(-(-n // micro_batch) * micro_batch, device=device).clamp(max=n - 1)


class _JointVelocity:
    """Calls the model on the float64 state and returns float64 velocities.

    Returns ((v, v_cls) conditional, (v, v_cls) unconditional or None).
    """

    def __init__(self, model: nn.Module, y: torch.Tensor, null_label: int | None, micro_batch: int | None = None):
        core = unwrap_model(model)
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 or None, found {micro_batch}.")
        self.model = model
        self.micro_batch = micro_batch
        self.dtype = next(model.parameters()).dtype
        self.y = y
        self.y_null = torch.full_like(y, core.num_classes if null_label is None else null_label)

    def __call__(self, x, cls, t: torch.Tensor, guided: bool):
        B = x.shape[0]
        y = self.y
        if guided:  # (2B, ...): [x, x] with labels [y, null]
            x, y = torch.cat([x, x]), torch.cat([y, self.y_null])
            cls = torch.cat([cls, cls]) if cls is not None else None
        t_vec = torch.full((x.shape[0],), float(t), dtype=self.dtype, device=x.device)
        cls = cls.to(self.dtype) if cls is not None else None
        v, v_cls = self._forward(x.to(self.dtype), t_vec, y, cls)
        v = v.double()
        v_cls = v_cls.double() if v_cls is not None else None
        if not guided:
            return (v, v_cls), None
        cls_c, cls_u = (v_cls[:B], v_cls[B:]) if v_cls is not None else (None, None)
        return (v[:B], cls_c), (v[B:], cls_u)

    def _forward(self, x, t, y, cls):
        """(v (N, C, H, W), v_cls (N, z) or None), in fixed-size chunks when ``micro_batch`` is set."""
        n = x.shape[0]
        outputs = [self.model(x[rows], t[rows], y[rows], cls_token=cls[rows] if cls is not None else None)
                   for rows in padded_rows(n, self.micro_batch or n, x.device).split(self.micro_batch or n)]
        v = torch.cat([out[0] for out in outputs])[:n]  # padding rows dropped
        v_cls = torch.cat([out[2] for out in outputs])[:n] if outputs[0][2] is not None else None
        return v, v_cls


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Sample in eval mode (no label dropout), then restore the model's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _initial_state(model, latents, y, cls_latents):
    use_cls = unwrap_model(model).use_cls_token
    if use_cls and cls_latents is None:
        raise ValueError("this model jointly models the CLS token: pass cls_latents (B, z_dim) noise.")
    if not use_cls and cls_latents is not None:
        raise ValueError("this model has no CLS slot (use_cls_token=False); pass cls_latents=None.")
    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, H, W) noise, found {tuple(latents.shape)}.")
    if y.shape != (latents.shape[0],):
        raise ValueError(f"y must have shape ({latents.shape[0]},), found {tuple(y.shape)}.")
    cls = cls_latents.double() if cls_latents is not None else None
    return latents.double(), cls


def _step_noise(x, cls, generators):
    """ε_x then ε_cls (float64): from the global generator, or per sample from ``generators``."""
    if generators is None:
        return torch.randn_like(x), torch.randn_like(cls) if cls is not None else None
    if len(generators) != x.shape[0]:
        raise ValueError(f"noise_generators: expected one per sample ({x.shape[0]}), found {len(generators)}.")
    pairs = []
    for g in generators:
        e_x = torch.randn(x.shape[1:], generator=g, dtype=torch.float64)
        pairs.append((e_x, torch.randn(cls.shape[1:], generator=g, dtype=torch.float64) if cls is not None else None))
    eps_x = torch.stack([p[0] for p in pairs]).to(x.device)
    eps_cls = torch.stack([p[1] for p in pairs]).to(x.device) if cls is not None else None
    return eps_x, eps_cls


def _check_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, found {num_steps}.")


def sample_sde(
    model: nn.Module,
    latents: torch.Tensor,
    y: torch.Tensor,
    cls_latents: torch.Tensor | None = None,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    cls_cfg_scale: float | None = None,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    vae_only_cfg: bool = False,
    latent_channels: int = 4,
    null_label: int | None = None,
    path: str = "linear",
    noise_generators: list[torch.Generator] | None = None,
    micro_batch: int | None = None,
) -> torch.Tensor:
    """Euler–Maruyama sampler (the authors' evaluation sampler), SPEC §8.

    latents (B, C, H, W) and cls_latents (B, z) are the initial noise; returns the float64
    joint sample (B, C, H, W) (decode the first ``latent_channels``). Noise is drawn from
    the global generator, ε_x then ε_cls, once per step, so seeds match the authors'.
    ``cls_cfg_scale``: None = same as ``cfg_scale``; 0 = conditional CLS drift only.
    ``vae_only_cfg``: the authors' ``--vae_cfg`` rule (see :meth:`_Guidance.combine`).
    ``noise_generators``: one CPU generator per sample; each step's noise of sample b is then
    drawn from generator b (ε_x then ε_cls), so a sample does not depend on its batch.
    ``micro_batch``: rows per model call (see the module docstring); None = the whole batch.
    """
    _check_steps(num_steps)
    guidance = _Guidance(cfg_scale, cls_cfg_scale, guidance_low, guidance_high, latent_channels)
    velocity = _JointVelocity(model, y, null_label, micro_batch)
    x, cls = _initial_state(model, latents, y, cls_latents)
    grid = sde_time_grid(num_steps).tolist()

    def drift(v, state, t, diffusion):  # d = v − ½·g·s
        if v is None:
            return None
        t_vec = torch.full((state.shape[0],), t, dtype=torch.float64, device=state.device)
        return v - 0.5 * diffusion * score_from_velocity(v, state, t_vec, path)

    with _eval_mode(model):
        for i in range(num_steps):
            t_cur, t_next = grid[i], grid[i + 1]
            dt = t_next - t_cur  # < 0
            last = i == num_steps - 1
            diffusion = 2 * t_cur
            if not last:
                eps_x, eps_cls = _step_noise(x, cls, noise_generators)
            guided = guidance.active(t_cur)
            cond, uncond = velocity(x, cls, t_cur, guided)
            cond = (drift(cond[0], x, t_cur, diffusion), drift(cond[1], cls, t_cur, diffusion))
            if uncond is not None:
                uncond = (drift(uncond[0], x, t_cur, diffusion), drift(uncond[1], cls, t_cur, diffusion))
            d_x, d_cls = guidance.combine(cond, uncond, vae_only=vae_only_cfg and not last)
            x = x + d_x * dt
            if cls is not None:
                cls = cls + d_cls * dt
            if not last:
                noise_scale = diffusion**0.5 * abs(dt) ** 0.5
                x = x + noise_scale * eps_x
                if cls is not None:
                    cls = cls + noise_scale * eps_cls
    return x


def sample_ode(
    model: nn.Module,
    latents: torch.Tensor,
    y: torch.Tensor,
    cls_latents: torch.Tensor | None = None,
    num_steps: int = 50,
    heun: bool = False,
    cfg_scale: float = 1.0,
    cls_cfg_scale: float | None = None,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    latent_channels: int = 4,
    null_label: int | None = None,
    micro_batch: int | None = None,
) -> torch.Tensor:
    """Euler (or Heun) probability-flow ODE sampler on ``linspace(1, 0, N + 1)``.

    Heun's correction is applied on every step except the last (2N − 1 model calls);
    guidance for both stages of a step is decided at its start time. Returns float64.
    ``micro_batch``: rows per model call (see the module docstring); None = the whole batch.
    """
    _check_steps(num_steps)
    guidance = _Guidance(cfg_scale, cls_cfg_scale, guidance_low, guidance_high, latent_channels)
    velocity = _JointVelocity(model, y, null_label, micro_batch)
    x, cls = _initial_state(model, latents, y, cls_latents)
    grid = ode_time_grid(num_steps).tolist()

    def euler(state, d, dt):
        return state + dt * d if state is not None else None

    with _eval_mode(model):
        for i in range(num_steps):
            t_cur, t_next = grid[i], grid[i + 1]
            dt = t_next - t_cur
            guided = guidance.active(t_cur)
            d_x, d_cls = guidance.combine(*velocity(x, cls, t_cur, guided))
            x_next, cls_next = euler(x, d_x, dt), euler(cls, d_cls, dt)
            if heun and i < num_steps - 1:
                p_x, p_cls = guidance.combine(*velocity(x_next, cls_next, t_next, guided))
                x_next = euler(x, 0.5 * d_x + 0.5 * p_x, dt)
                cls_next = euler(cls, 0.5 * d_cls + 0.5 * p_cls, dt) if cls is not None else None
            x, cls = x_next, cls_next
    return x
