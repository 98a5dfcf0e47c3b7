"""SiT backbone with the REGLUE heads (SPEC §6; paper §3, Eq. 5-6).

One transformer models the joint state: the VAE latent stacked with the semantic
channels, ``x`` of shape (B, C_in, H, W) with C_in = 4 + S, and, when the CLS token
is modelled (REG / REGLUE), the noisy DINOv2 [CLS] vector ``cls_token`` (B, z_dim)
prepended as token 0. At depth ``encoder_depth`` a projector maps every token to the
VFM width for the REPA alignment loss.

Parameter names equal the authors' so their checkpoints load with ``strict=True``;
two odd names are kept for that reason and mean:

- ``cls_projectors2``: the CLS input embedding (Linear z_dim -> D),
- ``wg_norm``: the LayerNorm applied to that embedding before it is prepended.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reglue.errors import DamagedFileError, InputError
from reglue.io import atomic_write, read_tensor_file
from reglue.models.semantic_norm import LATENT_CHANNELS, SemanticNorm
from reglue.resolution import LATENT_DOWNSAMPLE
from reglue.state_dict import load_state_dict_strict
from reglue.transport import PATHS

EXPORT_FIX = ("copy config.json and model.safetensors again, together, from the run that exported them "
              "(RUN_DIR/ema of `reglue train`)")


@dataclass(frozen=True)
class SiTConfig:
    """Everything needed to rebuild a :class:`SiT` (stored as ``config.json``).

    ``path`` is not used by the network; it travels with the weights so samplers compute the
    score of the interpolant the model was trained on (configs without it: linear). Nor is
    ``semantic_norm``: it adds the :class:`~reglue.models.semantic_norm.SemanticNorm` whose statistics
    standardised the semantic and CLS targets the model was trained on (``loss.semantic_norm``).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 20
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    encoder_depth: int = 8
    z_dim: int | None = 768
    projector_dim: int = 2048
    use_cls_token: bool = True
    qk_norm: bool = False
    path: str = "linear"  # the interpolant it was trained on (linear | cosine); the SDE's score needs it
    semantic_norm: bool = False  # carries the statistics its semantic and CLS targets were standardised with

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise InputError(f"path must be one of {PATHS} (the interpolant the model was trained on), "
                             f"found {self.path!r}.")
        if self.input_size % self.patch_size:
            raise InputError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}; "
                "use a latent size that is a multiple of the patch size (32 for 256² images)."
            )
        if self.hidden_size % self.num_heads:
            raise InputError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}."
            )
        if self.hidden_size % 4:
            raise InputError(f"hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos).")
        if self.z_dim is not None and not 1 <= self.encoder_depth <= self.depth:
            raise InputError(
                f"encoder_depth {self.encoder_depth} must lie in 1..depth ({self.depth}): it names "
                "the block whose output feeds the REPA projector."
            )
        if self.use_cls_token and self.z_dim is None:
            raise InputError(
                "use_cls_token=True needs z_dim (the CLS vector has the VFM width z_dim); "
                "set z_dim=768 for DINOv2-B or use_cls_token=False."
            )

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def image_size(self) -> int:
        """Side of the images it generates: the latent side × 8 (SD-VAE, the pixel autoencoder)."""
        return self.input_size * LATENT_DOWNSAMPLE


# --------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_slot: bool) -> torch.Tensor:
    """2-D sin-cos position embedding, (1 + N, dim) with a zero CLS row, or (N, dim).

    Token (r, c) in row-major order: dims [0, dim/2) encode the column c and
    [dim/2, dim) the row r, each as [sin(p·ω) | cos(p·ω)], ω_i = 10000^(-i/(dim/4)).
    Computed in float64 (as the MAE reference) and returned as float32.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, dim/2)
        angles = p.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(col), encode(row)], dim=1)  # (N, dim)
    if cls_slot:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) tokens in row-major order (timm naming: ``proj``)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): 256-d [cos | sin] frequency embedding, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def frequency_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequency_embedding(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Labels (B,) in 0..K (K = null label) -> (B, D); drops labels to K in training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``force_drop_ids`` (B,) bool, when given, decides the drops instead of a random draw."""
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids, self.num_classes, labels)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, D) * (1 + scale (B, D)) + shift (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


ATTENTION_KERNELS = ("sdpa", "math")


class Attention(nn.Module):
    """Multi-head self-attention (timm naming); ``kernel`` picks how it is computed, not what.

    ``sdpa``: ``F.scaled_dot_product_attention`` (fused kernels); ``math``: the explicit
    softmax(q·kᵀ/√d)·v of timm's ``Attention`` with ``fused_attn`` off, as the authors ran it.
    Both have the same parameters and agree within float tolerance.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.kernel = "sdpa"
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D/H)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kernel == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, T, T)
            out = weights @ v
        return self.proj(out.transpose(1, 2).reshape(B, T, D))  # out (B, H, T, D/H)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block conditioned on c (B, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then ``linear`` on patch tokens and ``linear_cls`` on token 0."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, cls_dim: int | None):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.linear_cls = nn.Linear(dim, cls_dim) if cls_dim is not None else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) -> patch outputs (B, N, p²·C_out) and CLS velocity (B, z_dim) or None."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        if self.linear_cls is None:
            return self.linear(x), None
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])


def build_projector(dim: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: Linear-SiLU-Linear-SiLU-Linear, applied token-wise."""
    return nn.Sequential(
        nn.Linear(dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class SiT(nn.Module):
    """Scalable interpolant transformer over the joint (latent ‖ semantics, CLS) state.

    ``forward(x, t, y, cls_token)`` returns ``(velocity, repa_tokens, cls_velocity)``:
    velocity (B, C_in, H, W); repa_tokens (B, T, z_dim) with T = 1 + N when the CLS
    token is modelled, else N (None without a projector); cls_velocity (B, z_dim) or None.
    """

    def __init__(self, config: SiTConfig | None = None, **kwargs):
        super().__init__()
        config = replace(config, **kwargs) if config is not None else SiTConfig(**kwargs)
        self.config = config
        D = config.hidden_size
        self.in_channels = config.in_channels
        self.num_classes = config.num_classes
        self.use_cls_token = config.use_cls_token
        self.encoder_depth = config.encoder_depth
        # Validating inputs needs host syncs; fast GPU paths may switch it off.
        self.check_inputs = True

        self.x_embedder = PatchEmbed(config.in_channels, D, config.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        num_tokens = config.num_patches + int(config.use_cls_token)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, D), requires_grad=False)
        self.blocks = nn.ModuleList(
            SiTBlock(D, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth)
        )
        if config.z_dim is not None:
            self.projectors = nn.ModuleList([build_projector(D, config.projector_dim, config.z_dim)])
        cls_dim = config.z_dim if config.use_cls_token else None
        self.final_layer = FinalLayer(D, config.patch_size, config.in_channels, cls_dim)
        if config.use_cls_token:
            self.cls_projectors2 = nn.Linear(config.z_dim, D)  # CLS input embedding
            self.wg_norm = nn.LayerNorm(D, eps=1e-6)  # its LayerNorm
        # the statistics its semantic and CLS targets were standardised with; forward does not use them
        widths = (config.in_channels - LATENT_CHANNELS, config.z_dim if config.use_cls_token else 0)
        self.semantic_norm = SemanticNorm(*widths) if config.semantic_norm else None
        self.initialize_weights()

    # ---------------------------------------------------------------- construction
    def initialize_weights(self) -> None:
        """SPEC §6 initialisation (xavier Linear, sin-cos pos_embed, zeroed adaLN and heads)."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic_init)
        grid = self.config.input_size // self.config.patch_size
        self.pos_embed.data.copy_(
            sincos_pos_embed_2d(self.config.hidden_size, grid, self.use_cls_token).unsqueeze(0)
        )
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [block.adaLN_modulation[-1] for block in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.final_layer.linear_cls is not None:
            zero.append(self.final_layer.linear_cls)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def set_attention(self, kernel: str) -> SiT:
        """Compute attention with ``kernel`` (one of :data:`ATTENTION_KERNELS`); weights unchanged."""
        if kernel not in ATTENTION_KERNELS:
            raise InputError(f"unknown attention kernel {kernel!r}; choose one of {ATTENTION_KERNELS}.")
        for block in self.blocks:
            block.attn.kernel = kernel
        return self

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cls_token: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
        *,
        repa: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x (B, C_in, H, W), t (B,) in [0, 1] (1 = noise), y (B,) in 0..K, cls_token (B, z_dim).

        ``force_drop_ids`` (B,) bool replaces label dropout's random draw (the trainer draws it
        per sample so that results do not depend on how the batch is split over processes).
        ``repa=False`` skips the REPA projector (None in place of its tokens; the velocities are
        unchanged): samplers do not use it, and it costs about one block's compute.
        """
        if self.check_inputs:
            self._check_inputs(x, t, y, cls_token)
        h = self.x_embedder(x)  # (B, N, D)
        if self.use_cls_token:
            cls_embed = self.wg_norm(self.cls_projectors2(cls_token)).unsqueeze(1)  # (B, 1, D)
            h = torch.cat([cls_embed, h], dim=1)  # (B, 1 + N, D), CLS is token 0
        h = h + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)  # (B, D)

        repa_tokens = None
        for depth, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if repa and depth == self.encoder_depth and hasattr(self, "projectors"):
                repa_tokens = self.projectors[0](h)  # (B, T, z_dim)
        patches, cls_velocity = self.final_layer(h, c)  # (B, N, p²·C), (B, z_dim)
        return self.unpatchify(patches), repa_tokens, cls_velocity

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p²·C) -> (B, C, H, W)."""
        B, N, _ = patches.shape
        p, C, g = self.config.patch_size, self.in_channels, int(N**0.5)
        x = patches.reshape(B, g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, g * p, g * p)

    def _check_inputs(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cls_token: torch.Tensor | None
    ) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise InputError(
                f"SiT expects x of shape (B, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}) "
                f"(C_in = 4 latent + semantic channels), found {tuple(x.shape)}; build the model "
                "with in_channels/input_size matching the data."
            )
        B = x.shape[0]
        if tuple(t.shape) != (B,):
            raise InputError(f"t must be a per-sample vector of shape ({B},), found {tuple(t.shape)}.")
        if tuple(y.shape) != (B,) or y.dtype not in (torch.int32, torch.int64):
            raise InputError(f"y must be integer labels of shape ({B},), found {tuple(y.shape)} {y.dtype}.")
        if bool((t < 0).any() | (t > 1).any()):
            raise InputError(
                f"t must lie in [0, 1] (1 = noise, 0 = data), found min {t.min().item():.4g} "
                f"max {t.max().item():.4g}."
            )
        if bool((y < 0).any() | (y > cfg.num_classes).any()):
            raise InputError(
                f"labels must lie in 0..{cfg.num_classes - 1} (or {cfg.num_classes} = null label), "
                f"found min {y.min().item()} max {y.max().item()}; check num_classes={cfg.num_classes}."
            )
        if self.use_cls_token:
            if cls_token is None or tuple(cls_token.shape) != (B, cfg.z_dim):
                found = None if cls_token is None else tuple(cls_token.shape)
                raise InputError(
                    f"this model jointly models the CLS token: pass cls_token of shape "
                    f"({B}, {cfg.z_dim}), found {found}."
                )
        elif cls_token is not None:
            raise InputError("this model has no CLS slot (use_cls_token=False); pass cls_token=None.")

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (weights only, no pickle). ``state_dict``: the
        weights to write instead of the module's own (a snapshot, written while the module changes)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        with atomic_write(directory / "model.safetensors") as tmp:
            save_file(state, str(tmp))
        with atomic_write(directory / "config.json") as tmp:
            tmp.write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides) -> SiT:
        """The SiT :meth:`save_pretrained` wrote to ``directory``; a damaged or mismatched pair of files is
        an error naming the file and the fix."""
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} not found: a pretrained SiT directory holds config.json "
                    "and model.safetensors (written by SiT.save_pretrained)."
                )
        try:
            raw = json.loads((directory / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise DamagedFileError(f"{directory / 'config.json'} does not parse as JSON ({err}); {EXPORT_FIX}.") from None
        known = {f.name for f in fields(SiTConfig)}
        model = cls(SiTConfig(**{k: v for k, v in raw.items() if k in known}), **overrides)
        weights = directory / "model.safetensors"
        load_state_dict_strict(model, read_tensor_file(weights, "SiT weights", fix=EXPORT_FIX), str(weights),
                               fix=f"its config.json describes another model: {EXPORT_FIX}")
        return model


# --------------------------------------------------------------------------------------
# Registry: SiT-{S,B,L,XL}/{2,4,8}
# --------------------------------------------------------------------------------------

# name -> (depth, hidden_size, num_heads, encoder_depth used for REPA alignment)
SIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "S": (12, 384, 6, 4),
    "B": (12, 768, 12, 4),
    "L": (24, 1024, 16, 8),
    "XL": (28, 1152, 16, 8),
}
PATCH_SIZES = (2, 4, 8)
SIT_MODELS = tuple(f"SiT-{s}/{p}" for s in SIT_SIZES for p in PATCH_SIZES)


def sit_config(name: str, **overrides) -> SiTConfig:
    """The :class:`SiTConfig` of a registered size, e.g. ``"SiT-XL/2"``, with overrides."""
    if name not in SIT_MODELS:
        raise InputError(f"unknown model {name!r}; choose one of {', '.join(SIT_MODELS)}.")
    size, patch = name[len("SiT-"):].split("/")
    depth, hidden, heads, encoder_depth = SIT_SIZES[size]
    base = SiTConfig(
        patch_size=int(patch), depth=depth, hidden_size=hidden, num_heads=heads,
        encoder_depth=encoder_depth,
    )
    known = {f.name for f in fields(SiTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown SiT option(s) {unknown}; valid options: {sorted(known)}.")
    return replace(base, **overrides)


def build_sit(name: str, **overrides) -> SiT:
    """Build a registered SiT. Defaults are REGLUE's: 20 input channels, z_dim 768, CLS slot.

    ``overrides`` are :class:`SiTConfig` fields (input_size, in_channels, z_dim, ...).
    """
    return SiT(sit_config(name, **overrides))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
