"""Compressing VFM semantics to a few channels (SPEC §5; paper §3.2).

- :class:`SemanticCompressor`: the REGLUE convolutional autoencoder that squeezes the
  z-scored, concatenated multi-layer DINOv2 maps (B, 3072, 16, 16) into (B, 16, 16, 16).
- :class:`PCAProjection`: the linear ReDi alternative, the first r principal components
  of the normalised last-layer features.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from reglue.errors import InputError
from reglue.io import atomic_write, read_tensor_file
from reglue.state_dict import load_state_dict_strict, strip_module_prefix

COMPRESSOR_FIX = ("train it again with `reglue train-compressor {data} --restart`, or copy it again from where it "
                  "was made")
PCA_FIX = "fit it again with `reglue fit-pca {data}`, or copy it again from where it was made"


class ResidualBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + x), 3×3 convolutions, channels kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


class ConvStack(nn.Module):
    """A 3×3 conv between consecutive channel counts, a ResidualBlock after all but the last."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            if i < len(channels) - 2:
                layers.append(ResidualBlock(c_out))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class SemanticCompressor(nn.Module):
    """Convolutional autoencoder over normalised VFM feature maps.

    ``channels`` = [c0, ..., cn], e.g. (3072, 256, 16): ``encode`` maps (B, c0, h, w) to
    (B, cn, h, w), ``decode`` maps it back, ``forward`` returns the reconstruction.
    """

    def __init__(self, channels: Sequence[int] = (3072, 256, 16)):
        super().__init__()
        if len(channels) < 2:
            raise InputError(f"channels needs at least two entries (in, latent), found {list(channels)}.")
        self.channels = tuple(int(c) for c in channels)
        self.encoder = ConvStack(self.channels)
        self.decoder = ConvStack(self.channels[::-1])

    @property
    def latent_channels(self) -> int:
        return self.channels[-1]

    @property
    def widths(self) -> tuple[int, int]:
        """(VFM channels it takes, semantic channels it gives)."""
        return self.channels[0], self.latent_channels

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(B, c0, h, w) normalised features -> (B, cn, h, w) semantic latent."""
        if features.ndim != 4 or features.shape[1] != self.channels[0]:
            raise InputError(
                f"compressor expects (B, {self.channels[0]}, h, w) features, found "
                f"{tuple(features.shape)}; check the VFM layers/width it was trained for."
            )
        return self.encoder(features)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, cn, h, w) -> (B, c0, h, w)."""
        return self.decoder(latent)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(features))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], what: str = "the semantic-compressor weights",
                        fix: str = "") -> SemanticCompressor:
        """Build with the channel list read off the weights, then load strictly.

        Accepts the authors' state dicts with or without a ``module.`` prefix. Errors name the
        weights as ``what`` (e.g. their file) and end in ``fix``.
        """
        state_dict = strip_module_prefix(state_dict)
        convs = sorted(
            (int(m.group(1)), w.shape)
            for key, w in state_dict.items()
            if (m := re.fullmatch(r"encoder\.model\.(\d+)\.weight", key)) and w.ndim == 4
        )
        if not convs:
            raise InputError(
                f"{what}: not a semantic-compressor state dict: no 'encoder.model.<i>.weight' conv keys "
                f"(found e.g. {list(state_dict)[:3]})."
            )
        channels = [convs[0][1][1]] + [shape[0] for _, shape in convs]
        model = cls(channels)
        load_state_dict_strict(model, state_dict, what, fix=fix)
        return model


class PCAProjection(nn.Module):
    """Linear projection onto the first r principal components (ReDi's semantic channels).

    Buffers: ``mean`` (C,), ``components`` (r, C), rows orthonormal, ordered by explained
    variance, each with its largest-magnitude entry positive (a deterministic sign).
    """

    def __init__(self, in_channels: int, rank: int):
        super().__init__()
        if not 1 <= rank <= in_channels:
            raise InputError(f"PCA rank must lie in 1..{in_channels}, found {rank}.")
        self.register_buffer("mean", torch.zeros(in_channels))
        self.register_buffer("components", torch.eye(rank, in_channels))
        self.register_buffer("explained_variance", torch.zeros(rank))

    @property
    def rank(self) -> int:
        return self.components.shape[0]

    @property
    def widths(self) -> tuple[int, int]:
        """(VFM channels it takes, semantic channels it gives), as :attr:`SemanticCompressor.widths`."""
        return self.mean.shape[0], self.rank

    @classmethod
    def fit(cls, batches: torch.Tensor | Iterable[torch.Tensor], rank: int) -> PCAProjection:
        """Fit on features (N, C), or stream batches of (N_i, C) (accumulated in float64)."""
        if isinstance(batches, torch.Tensor):
            batches = [batches]
        count, total, outer = 0, None, None
        for x in batches:
            x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
            total = x.sum(0) if total is None else total + x.sum(0)
            outer = x.T @ x if outer is None else outer + x.T @ x
            count += x.shape[0]
        if count < 2:
            raise InputError(f"PCA needs at least 2 feature vectors, found {count}.")
        mean = total / count
        cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(eigvals, descending=True)[:rank]
        components = eigvecs[:, order].T  # (r, C)
        sign = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
        pca = cls(mean.shape[0], rank)
        pca.mean.copy_(mean.float())
        pca.components.copy_((components * sign).float())
        pca.explained_variance.copy_(eigvals[order].float())
        return pca

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, r, h, w)."""
        if features.ndim != 4 or features.shape[1] != self.mean.shape[0]:
            raise InputError(
                f"PCA expects (B, {self.mean.shape[0]}, h, w) features, found {tuple(features.shape)}."
            )
        centred = features - self.mean.to(features.dtype)[None, :, None, None]
        return torch.einsum("bchw,rc->brhw", centred, self.components.to(features.dtype))

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Write the projection atomically; ``metadata`` (e.g. the resolution and VFM it was fitted
        at) goes into the file's header as strings."""
        from safetensors.torch import save_file

        with atomic_write(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp),
                      metadata={k: str(v) for k, v in (metadata or {}).items()})

    @classmethod
    def load(cls, path: str | Path) -> PCAProjection:
        """A PCA file of :meth:`save`; a damaged file or a wrong shape is an error naming it and the fix."""
        fix = PCA_FIX.format(data="DATA")
        state = read_tensor_file(path, "PCA", fix=fix)
        if "components" not in state or state["components"].ndim != 2:
            raise InputError(f"{path} is not a PCA file (no 'components' matrix); write one with `reglue fit-pca`.")
        rank, channels = state["components"].shape
        pca = cls(channels, rank)
        load_state_dict_strict(pca, state, str(path), fix=fix)
        return pca
