"""SDE and ODE samplers for the joint (latent ‖ semantics, CLS) state (SPEC §8).

State is integrated in float64; the model sees inputs cast to its parameter dtype and a
per-sample time vector. Classifier-free guidance (one :class:`Guidance`
value) doubles the batch as [x, x] with labels [y, null] inside its interval (decided at the
step's start time) and combines the two drifts with one rule, :func:`apply_guidance`.

Rows per model call: with ``micro_batch`` every model call sees exactly this many rows (the
rows are cut into chunks and the last chunk is padded with copies of its last row). Float
kernels are chosen by shape, so a sample's result then does not depend on how many samples
share its batch — the basis of ``reglue sample``'s batch-size-independent images. Without it
a step's rows go to the model in one call, or in near-equal unpadded chunks of at most
``max_call_rows`` (nothing computed twice; results then depend on the batch size).
A :class:`~reglue.models.sit.SiT` is called without its REPA projector, whose output no
sampler uses.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from reglue.errors import InputError
from reglue.models.sit import SiT, unwrap_model
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


@dataclass(frozen=True, kw_only=True)
class Guidance:
    """Classifier-free guidance of one sampling run (SPEC §8), validated when built.

    ``scale``: w of the joint (latent ‖ semantics) drift, ``d_u + w·(d_c − d_u)``; 1 = none.
    ``cls_scale``: w of the CLS drift; None = ``scale``; 0 = the conditional CLS drift alone.
    ``low``, ``high``: a step is guided when its start time t_cur lies in [low, high].
    ``vae_only``: the authors' ``--vae_cfg`` rule (see :meth:`combine`); needs ``scale > 1``.

    Rule: the unconditional pass runs (the batch doubled as [x, x], labels [y, null]) at the
    steps inside the interval when ``scale > 1`` or the CLS scale is > 1 (the authors' sampler
    looks at ``scale`` only, so their ``cfg 1, cls 3`` silently guides nothing); a state whose
    scale is 1 then takes its conditional drift unchanged. Settings this rule would ignore are
    refused: ``scale < 1``, and a CLS scale in (0, 1) with ``scale = 1``.
    """

    scale: float = 1.0
    cls_scale: float | None = None
    low: float = 0.0
    high: float = 1.0
    vae_only: bool = False

    def __post_init__(self) -> None:
        if not self.scale >= 1.0:
            raise InputError(f"guidance scale must be >= 1 (1 = no guidance), found {self.scale}; scales below 1 "
                             "would be ignored. Use --cfg-scale 1 to sample without guidance.")
        if self.cls_scale is not None and not self.cls_scale >= 0.0:
            raise InputError(f"CLS guidance scale must be >= 0 (0 = conditional CLS drift) or None (same as the "
                             f"guidance scale), found {self.cls_scale}.")
        if self.scale == 1.0 and self.cls_scale is not None and 0.0 < self.cls_scale < 1.0:
            raise InputError(f"CLS guidance scale {self.cls_scale} with guidance scale 1 would be ignored (guidance "
                             "runs only when a scale is > 1); use a CLS scale > 1, or raise --cfg-scale.")
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise InputError(f"guidance interval [{self.low}, {self.high}] must satisfy 0 <= LOW <= HIGH <= 1.")
        if self.vae_only and self.scale <= 1.0:
            raise InputError("vae_only guidance (the authors' --vae_cfg rule) needs a guidance scale > 1, "
                             f"found {self.scale}; raise --cfg-scale or drop --vae-only-cfg.")

    @property
    def effective_cls_scale(self) -> float:
        return self.scale if self.cls_scale is None else self.cls_scale

    @property
    def enabled(self) -> bool:
        """Whether any step can be guided (a scale > 1)."""
        return self.scale > 1.0 or self.effective_cls_scale > 1.0

    def active(self, t: float) -> bool:
        """Whether the step starting at ``t`` runs the unconditional pass."""
        return self.enabled and self.low <= t <= self.high

    def combine(self, cond, uncond, *, latent_channels: int = 4, vae_only_step: bool = False):
        """(x, cls) drifts: conditional, unconditional (None when not guided) -> guided drifts.

        ``vae_only_step``: apply the authors' ``--vae_cfg`` rule at this step (their noisy steps):
        the first ``latent_channels`` (the VAE's) take d_c + w·(d_c − d_u) (sic: not
        d_u + w·(...)), the semantic channels take d_c.
        """
        if uncond is None:
            return cond
        (x_c, cls_c), (x_u, cls_u) = cond, uncond
        x = x_c
        if self.vae_only and vae_only_step:  # vae_only implies scale > 1 (__post_init__)
            k = latent_channels
            x = torch.cat([x_c[:, :k] + self.scale * (x_c[:, :k] - x_u[:, :k]), x_c[:, k:]], dim=1)
        elif self.scale > 1.0:
            x = apply_guidance(x_c, x_u, self.scale)
        if cls_c is not None and self.effective_cls_scale > 0:
            cls_c = apply_guidance(cls_c, cls_u, self.effective_cls_scale)
        return x, cls_c


NO_GUIDANCE = Guidance()


def padded_rows(n: int, micro_batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Row indices 0..n−1, padded to a multiple of ``micro_batch`` by repeating row n−1."""
    return torch.arange(-(-n // micro_batch) * micro_batch, device=device).clamp(max=n - 1)


class _JointVelocity:
    """Calls the model on the float64 state and returns float64 velocities, stacked [cond, uncond].

    ``velocity(x, cls, t, guided)`` -> v (G, B, C, H, W), v_cls (G, B, z) or None, with G = 2
    ([conditional, unconditional]) when ``guided``, else 1. The rows of each model call are
    fixed once per batch (:meth:`_call_rows`): the state's rows, doubled as [x, x] with labels
    [y, null] when guided, then padded to whole micro-batches; :meth:`_chunk_rows` cuts them into calls.
    """

    def __init__(self, model: nn.Module, y: torch.Tensor, null_label: int | None, micro_batch: int | None = None,
                 max_call_rows: int | None = None):
        core = unwrap_model(model)
        for name, value in (("micro_batch", micro_batch), ("max_call_rows", max_call_rows)):
            if value is not None and value < 1:
                raise InputError(f"{name} must be >= 1 or None, found {value}.")
        if micro_batch is not None and max_call_rows is not None:
            raise InputError("pass micro_batch (calls of exactly that many rows, padded) or max_call_rows "
                             "(unpadded calls of at most that many), not both.")
        self.model = model
        self.micro_batch = micro_batch
        self.max_call_rows = max_call_rows
        self.dtype = next(model.parameters()).dtype
        self._options = {"repa": False} if isinstance(core, SiT) else {}
        y_null = torch.full_like(y, core.num_classes if null_label is None else null_label)
        self._labels = {False: y, True: torch.cat([y, y_null])}
        self._rows = {guided: self._call_rows(y.shape[0], guided) for guided in (False, True)}

    def _call_rows(self, batch: int, guided: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(state row of each model-call row, or None when they are the state's rows; call labels)."""
        labels = self._labels[guided]
        n = labels.shape[0]
        micro = self.micro_batch or n
        if n % micro == 0 and not guided:
            return None, labels
        rows = padded_rows(n, micro, labels.device)  # rows of [x, x] (or x), the last chunk padded
        return rows % batch, labels[rows]

    def __call__(self, x, cls, t: float, guided: bool):
        B = x.shape[0]
        rows, y = self._rows[guided]
        x = x.to(self.dtype)
        cls = cls.to(self.dtype) if cls is not None else None
        if rows is not None:
            x = x[rows]
            cls = cls[rows] if cls is not None else None
        t_vec = torch.full((y.shape[0],), t, dtype=self.dtype, device=x.device)
        v, v_cls = self._forward(x, t_vec, y, cls)
        G = 2 if guided else 1
        v = v[: G * B].double().view(G, B, *v.shape[1:])  # padding rows dropped
        return v, v_cls[: G * B].double().view(G, B, -1) if v_cls is not None else None

    def _chunk_rows(self, n: int) -> list[int]:
        """Rows of each model call for a step of N rows (N is a multiple of ``micro_batch`` when set)."""
        if self.micro_batch is not None:
            return [self.micro_batch] * (n // self.micro_batch)
        calls = -(-n // (self.max_call_rows or n))
        return [n // calls + (i < n % calls) for i in range(calls)]  # near-equal, unpadded

    def _forward(self, x, t, y, cls):
        """(v (N, C, H, W), v_cls (N, z) or None): one model call per chunk of the N rows."""
        rows = self._chunk_rows(x.shape[0])
        if len(rows) == 1:
            v, _, v_cls = self.model(x, t, y, cls_token=cls, **self._options)
            return v, v_cls
        parts = zip(x.split(rows), t.split(rows), y.split(rows),
                    cls.split(rows) if cls is not None else itertools.repeat(None))
        outputs = [self.model(*part[:3], cls_token=part[3], **self._options) for part in parts]
        v_cls = torch.cat([out[2] for out in outputs]) if outputs[0][2] is not None else None
        return torch.cat([out[0] for out in outputs]), v_cls


def _cond_uncond(v: torch.Tensor, v_cls: torch.Tensor | None):
    """Stacked (G, B, ...) velocities or drifts -> ((x, cls) conditional, (x, cls) unconditional or None)."""
    cond = (v[0], v_cls[0] if v_cls is not None else None)
    if v.shape[0] == 1:
        return cond, None
    return cond, (v[1], v_cls[1] if v_cls is not None else None)


@contextlib.contextmanager
def _sampling_mode(model: nn.Module) -> Iterator[None]:
    """Sample in eval mode (no label dropout) without autograd, then restore the model's mode.

    Under autocast, each weight should be cast once per run: autocast keeps its lower-precision
    copy for as long as its context lasts, but only of weights that require grad. Frozen ones (an
    EMA, ``requires_grad_(False)``) would be cast again at every model call — 28 % of a bf16 SDE run
    at batch 2 on a CPU — so they require grad for the run (no graph is built under no_grad) and
    are frozen again after it; the numbers do not change.
    """
    was_training = model.training
    autocast = torch.is_autocast_enabled(next(model.parameters()).device.type)
    frozen = [p for p in model.parameters() if autocast and not p.requires_grad and p.is_floating_point()]
    model.eval()
    try:
        with torch.no_grad():
            for p in frozen:
                p.requires_grad_(True)
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)


def _initial_state(model, latents, y, cls_latents):
    use_cls = unwrap_model(model).use_cls_token
    if use_cls and cls_latents is None:
        raise InputError("this model jointly models the CLS token: pass cls_latents (B, z_dim) noise.")
    if not use_cls and cls_latents is not None:
        raise InputError("this model has no CLS slot (use_cls_token=False); pass cls_latents=None.")
    if latents.ndim != 4:
        raise InputError(f"latents must be (B, C, H, W) noise, found {tuple(latents.shape)}.")
    if y.shape != (latents.shape[0],):
        raise InputError(f"y must have shape ({latents.shape[0]},), found {tuple(y.shape)}.")
    cls = cls_latents.double() if cls_latents is not None else None
    return latents.double(), cls


def _on_device(generator: torch.Generator, device: torch.device) -> bool:
    """Whether ``generator`` draws on ``device`` (``cuda`` and ``cuda:0`` are one device)."""
    g = generator.device
    return g.type == device.type and (g.index is None or device.index is None or g.index == device.index)


class SampleNoise:
    """Each noisy SDE step's (ε_x, ε_cls), float64, ε_x then ε_cls: the SPEC §8 draw order.

    ``generators`` None: ``randn_like`` from the global generator (the authors' sampler, so their
    seeds reproduce). Otherwise one generator per sample, on the state's device: sample b's noise
    is drawn by generator b alone, straight into row b of two buffers allocated once, so a sample
    does not depend on its batch, and a step costs one ``normal_`` per sample and state (one
    kernel launch each on a GPU) with no host draw, stack or copy. The returned tensors are
    overwritten by the next :meth:`draw`. On CPU the numbers equal ``torch.randn(shape,
    generator=g, dtype=torch.float64)`` called ε_x then ε_cls per sample.
    """

    def __init__(self, x: torch.Tensor, cls: torch.Tensor | None, generators: list[torch.Generator] | None):
        """x (B, C, H, W) and cls (B, z) or None: the float64 state, for shapes and device."""
        self._like = (x, cls)
        self._rows = None
        if generators is None:
            return
        if len(generators) != x.shape[0]:
            raise InputError(f"noise_generators: expected one per sample ({x.shape[0]}), found {len(generators)}.")
        elsewhere = sorted({str(g.device) for g in generators if not _on_device(g, x.device)})
        if elsewhere:
            raise InputError(f"noise_generators live on {', '.join(elsewhere)} but the state is on {x.device}: "
                             f"seed them on the sampling device, seeded_generator(..., device={str(x.device)!r}).")
        self.eps_x = torch.empty_like(x)
        self.eps_cls = torch.empty_like(cls) if cls is not None else None
        cls_rows = self.eps_cls.unbind(0) if cls is not None else [None] * len(generators)
        self._rows = list(zip(generators, self.eps_x.unbind(0), cls_rows))  # row views, made once

    def draw(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ε_x (B, C, H, W), ε_cls (B, z) or None), float64."""
        if self._rows is None:
            x, cls = self._like
            return torch.randn_like(x), torch.randn_like(cls) if cls is not None else None
        for generator, eps_x, eps_cls in self._rows:
            eps_x.normal_(generator=generator)
            if eps_cls is not None:
                eps_cls.normal_(generator=generator)
        return self.eps_x, self.eps_cls


def _check_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise InputError(f"num_steps must be >= 1, found {num_steps}.")


def _model_path(model: nn.Module, path: str | None) -> str:
    """The interpolant path to sample with: ``path`` if given, else the model's own (``SiTConfig.path``)."""
    if path is not None:
        return path
    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "path", "linear")  # bare velocity modules (tests) follow the linear path


def sample_sde(
    model: nn.Module,
    latents: torch.Tensor,
    y: torch.Tensor,
    cls_latents: torch.Tensor | None = None,
    *,
    num_steps: int = 250,
    guidance: Guidance = NO_GUIDANCE,
    path: str | None = None,
    latent_channels: int = 4,
    null_label: int | None = None,
    noise_generators: list[torch.Generator] | None = None,
    micro_batch: int | None = None,
    max_call_rows: int | None = None,
) -> torch.Tensor:
    """Euler–Maruyama sampler (the authors' evaluation sampler), SPEC §8.

    latents (B, C, H, W) and cls_latents (B, z) are the initial noise; returns the float64
    joint sample (B, C, H, W) (decode the first ``latent_channels``). Noise is drawn from
    the global generator, ε_x then ε_cls, once per step, so seeds match the authors'.
    ``path``: the interpolant the score is computed for; None = the model's (``SiTConfig.path``).
    ``noise_generators``: one generator per sample, on the state's device; each step's noise of
    sample b is then drawn by generator b (ε_x then ε_cls, see :class:`SampleNoise`), so a sample
    does not depend on its batch.
    ``micro_batch``, ``max_call_rows``: rows per model call (see the module docstring); both None
    = a step's rows in one call.
    """
    _check_steps(num_steps)
    path = _model_path(model, path)
    velocity = _JointVelocity(model, y, null_label, micro_batch, max_call_rows)
    x, cls = _initial_state(model, latents, y, cls_latents)
    noise = SampleNoise(x, cls, noise_generators)
    grid = sde_time_grid(num_steps).tolist()

    def drift(v, state, t_vec, diffusion):  # d = v − ½·g·s for v (G, B, ...) and state (B, ...)
        if v is None:
            return None
        return v - 0.5 * diffusion * score_from_velocity(v, state.unsqueeze(0), t_vec, path)

    with _sampling_mode(model):
        for i in range(num_steps):
            t_cur, t_next = grid[i], grid[i + 1]
            dt = t_next - t_cur  # < 0
            last = i == num_steps - 1
            diffusion = 2 * t_cur
            if not last:
                eps_x, eps_cls = noise.draw()
            v, v_cls = velocity(x, cls, t_cur, guidance.active(t_cur))
            t_vec = torch.full((1,), t_cur, dtype=torch.float64, device=x.device)  # one t for every row
            drifts = _cond_uncond(drift(v, x, t_vec, diffusion), drift(v_cls, cls, t_vec, diffusion))
            d_x, d_cls = guidance.combine(*drifts, latent_channels=latent_channels, vae_only_step=not last)
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
    *,
    num_steps: int = 50,
    heun: bool = False,
    guidance: Guidance = NO_GUIDANCE,
    null_label: int | None = None,
    micro_batch: int | None = None,
    max_call_rows: int | None = None,
) -> torch.Tensor:
    """Euler (or Heun) probability-flow ODE sampler on ``linspace(1, 0, N + 1)``.

    The velocity is the ODE's drift for any interpolant path, so no path is needed. Heun's
    correction is applied on every step except the last (2N − 1 model calls); guidance for
    both stages of a step is decided at its start time. ``guidance.vae_only`` is refused: the
    authors' rule exists for their SDE sampler only. Returns float64.
    ``micro_batch``, ``max_call_rows``: rows per model call (see the module docstring); both None
    = a step's rows in one call.
    """
    _check_steps(num_steps)
    if guidance.vae_only:
        raise InputError("vae_only guidance (the authors' --vae_cfg) exists for the SDE sampler only; "
                         "use mode sde or drop it.")
    velocity = _JointVelocity(model, y, null_label, micro_batch, max_call_rows)
    x, cls = _initial_state(model, latents, y, cls_latents)
    grid = ode_time_grid(num_steps).tolist()

    def euler(state, d, dt):
        return state + dt * d if state is not None else None

    with _sampling_mode(model):
        for i in range(num_steps):
            t_cur, t_next = grid[i], grid[i + 1]
            dt = t_next - t_cur
            guided = guidance.active(t_cur)
            d_x, d_cls = guidance.combine(*_cond_uncond(*velocity(x, cls, t_cur, guided)))
            x_next, cls_next = euler(x, d_x, dt), euler(cls, d_cls, dt)
            if heun and i < num_steps - 1:
                p_x, p_cls = guidance.combine(*_cond_uncond(*velocity(x_next, cls_next, t_next, guided)))
                x_next = euler(x, 0.5 * d_x + 0.5 * p_x, dt)
                cls_next = euler(cls, 0.5 * d_cls + 0.5 * p_cls, dt) if cls is not None else None
            x, cls = x_next, cls_next
    return x
