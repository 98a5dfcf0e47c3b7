"""``loss.semantic_norm``: per-channel standardisation of the semantic and CLS targets.

A SiT built with ``SiTConfig.semantic_norm`` carries a :class:`SemanticNorm` (``SiT.semantic_norm``) whose
persistent buffers hold the statistics a fresh run measured on its training targets: the semantic
channels' mean and std (S,) and the CLS token's (D,). The trainer's inputs divide the targets by them, so
the model learns, and samples, semantics and CLS in that standardised space. The buffers travel in the
model's and the EMA's state dicts (a resumed run restores them instead of measuring again) and in the
exported ``model.safetensors``. The SiT's forward does not read them, and sampling needs nothing new: images
decode from the latent channels alone, which are never normalised (nor are the REPA targets).

A preset without semantic channels or CLS has width 0 for that part (``sit``: nothing is normalised).
The authors' models have no such module, and their weights load as before.
"""

from __future__ import annotations

import torch
from torch import nn

LATENT_CHANNELS = 4  # the VAE latent's channels, which precede the semantic ones in the SiT's input
# A channel that never varies in the measured images (a compressor output stuck at a constant, a PCA
# component beyond the features' rank) has std 0: dividing by it would make every target inf or NaN. The
# floor keeps such a channel finite. It changes no channel that carries information: a spread below 1e-6
# is under the resolution of the float16 semantic cache for any value of magnitude 1e-3 or more.
STD_FLOOR = 1e-6


class SemanticNorm(nn.Module):
    """Targets → (target − mean) / std per channel; identity (mean 0, std 1) until statistics are set.

    Buffers: ``semantic_mean``, ``semantic_std`` (S,) and ``cls_mean``, ``cls_std`` (D,), float32.
    """

    def __init__(self, semantic_channels: int, cls_dim: int):
        super().__init__()
        self.register_buffer("semantic_mean", torch.zeros(semantic_channels))
        self.register_buffer("semantic_std", torch.ones(semantic_channels))
        self.register_buffer("cls_mean", torch.zeros(cls_dim))
        self.register_buffer("cls_std", torch.ones(cls_dim))

    @property
    def widths(self) -> tuple[int, int]:
        """(S, D): the semantic channels and the CLS width it normalises (0 where the model has none)."""
        return self.semantic_mean.numel(), self.cls_mean.numel()

    @torch.no_grad()
    def set_statistics(self, semantic_mean: torch.Tensor, semantic_std: torch.Tensor, cls_mean: torch.Tensor,
                       cls_std: torch.Tensor) -> None:
        """Write measured statistics (any float dtype, any device) into the buffers; stds floored at
        :data:`STD_FLOOR`."""
        self.semantic_mean.copy_(semantic_mean)
        self.semantic_std.copy_(semantic_std.clamp(min=STD_FLOOR))
        self.cls_mean.copy_(cls_mean)
        self.cls_std.copy_(cls_std.clamp(min=STD_FLOOR))

    def forward(self, semantics: torch.Tensor | None, cls: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """semantics (B, S, h, w) and cls (B, D), each None where the model has none, standardised."""
        if semantics is not None:
            mean, std = self.semantic_mean.view(1, -1, 1, 1), self.semantic_std.view(1, -1, 1, 1)
            semantics = (semantics - mean) / std
        if cls is not None:
            cls = (cls - self.cls_mean) / self.cls_std
        return semantics, cls
