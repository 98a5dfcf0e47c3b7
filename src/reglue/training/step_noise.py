"""A training step's randomness, drawn on the training device (DESIGN practices 8 and 15).

Every random number of step s — the times t, the ε of the VAE latent, the joint state's noise,
the CLS noise and the label-dropout decisions — comes from one generator on the training device
seeded with (seed, STEP_STREAM, s), drawn for the whole global batch of G samples in that order;
each process (and each accumulation micro-batch) takes the rows of its own samples as views. A
sample's randomness therefore depends only on (seed, step, its row of the global batch): the same
whatever the number of processes and accumulation steps, and replayed exactly on resume.

Cost: G·(4 + C)·h·w + G·(D + 2) numbers per step on the device (26 M at G = 1,024 and 256²:
about 0.1 ms and 100 MB for a moment on an H100; the host only launches five kernels). Drawing
only this process's rows would not keep the values independent of the process count: a CUDA
generator cannot skip ahead to a row (which thread draws which element depends on the launch
grid). The numbers are the device's own: a run on CUDA draws other values than the same run on
a CPU (and may differ between GPU models), while two runs on the same kind of device agree.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from reglue.seeding import STEP_STREAM, seeded_generator
from reglue.transport import JointLoss, sample_time


@dataclass
class StepNoise:
    """Every random draw of one step for the rows it holds (all G rows when drawn)."""

    t: torch.Tensor  # (G,) training times
    latent_eps: torch.Tensor  # (G, 4, h, w): z = (mean + std·ε)·scale
    noise: torch.Tensor  # (G, C, h, w): the joint state's noise
    cls_noise: torch.Tensor  # (G, D)
    drop: torch.Tensor  # (G,) bool: label dropped to the null label

    @classmethod
    def draw(cls, seed: int, step: int, *, global_batch: int, channels: int, size: int, vfm_dim: int,
             loss: JointLoss, dropout: float, device: torch.device | str) -> StepNoise:
        """Step ``step``'s draws for the G = ``global_batch`` samples of a C = ``channels`` joint state on
        a ``size``² latent grid with a ``vfm_dim``-wide CLS, made on ``device`` by its own generator."""
        g = seeded_generator(seed, STEP_STREAM, step, device=device)
        t = sample_time(global_batch, loss.time_sampling, loss.path, device=device, generator=g)
        latent_eps = torch.randn(global_batch, 4, size, size, generator=g, device=device)
        noise = torch.randn(global_batch, channels, size, size, generator=g, device=device)
        cls_noise = torch.randn(global_batch, vfm_dim, generator=g, device=device)
        drop = torch.rand(global_batch, generator=g, device=device) < dropout
        return cls(t, latent_eps, noise, cls_noise, drop)

    def rows(self, start: int, stop: int) -> StepNoise:
        """Rows [start, stop) of every draw, as views (no copy)."""
        return StepNoise(*(getattr(self, f.name)[start:stop] for f in fields(self)))
