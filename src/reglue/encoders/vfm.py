"""Vision foundation model features (SPEC §4): DINOv2 with registers, DINOv3 as an option.

A :class:`VFMExtractor` is a frozen timm ViT that turns uint8 images (B, 3, res, res) into
the three things REGLUE needs (:class:`VFMFeatures`):

- ``local`` (B, L·D, h, w): patch tokens of each requested block (0-based, strictly increasing)
  after the model's final LayerNorm, concatenated on channels in block order, tokens row-major;
  the input of the semantic compressor (3072×16×16 for DINOv2-B, blocks 8-11, 256²);
- ``cls`` (B, D): the CLS token of the last block after the final norm (REG/REGLUE's cls);
- ``repa`` (B, 1 + h·w, D): [CLS; patch tokens] of the last block after the final norm, the
  REPA target. Register tokens are always dropped.

DINOv2 with registers (``dinov2_vit{s,b,l,g}14_reg``, REGLUE's VFM), exactly as the authors' pipeline:

- preprocessing: uint8 → float/255 → ImageNet mean/std → ``F.interpolate(size=224·res/256,
  mode="bicubic")`` (no antialias, align_corners False), i.e. res/16 patch tokens per side
  (16×16 at 256², 8×8 at 128²; any res of :mod:`reglue.resolution`);
- position embeddings: the pretraining grid (37×37 for img_size 518) is resized to the input
  grid with bicubic interpolation, antialias=True, output size given; computed once per grid and
  cached (recomputed only when the grid, device or weights change);
- token order [CLS, registers, patches]; the CLS keeps its position embedding, registers get none.

DINOv2 without registers (``dinov2_vit{s,b,l,g}14``, the network of FD_DINOv2,
:mod:`reglue.metrics.feature_space`): the same ViT with no register tokens, whose official hub
builder resizes the position embeddings differently: ``interpolate_offset=0.1`` (a scale factor
(g_new + 0.1) / g_old is given instead of the output size, so the bicubic taps sit slightly off
the reg models' ones) and ``interpolate_antialias=False``. :class:`VFMArch` records both.
  timm stores the CLS position pre-added to ``cls_token`` (its ``no_embed_class`` layout), which
  is the same fp32 sum the official model computes in its forward.
- ViT-g's fused SwiGLU MLP (official ``mlp.w12``/``mlp.w3``) is timm's ``SwiGLUPacked``
  (``mlp.fc1``/``mlp.fc2``, act(first half)·second half), hidden width (⌊8D/3⌋+7)//8·8.

DINOv3 (``dinov3_vit{s,b,l}16``, timm's ``vit_*_patch16_dinov3``, an option): the same
normalisation, but the image is not resized (input side res), so patch 16 gives the same
res/16 grid; positions are RoPE, so nothing is resized. Weights must be in timm's layout
(the ``timm/vit_*_patch16_dinov3.lvd1689m`` files); the official DINOv3 layout is not mapped.

Weights (``weights=``, always explicit): ``None`` (random init, for tests and demos), a state
dict, or a local file: official DINOv2 ``.pth`` or timm ``.safetensors``/``.pth``/``.bin``.
Every state dict goes through :func:`dinov2_to_timm` and a strict load whose failure lists
missing, unexpected and mis-shaped keys; :func:`timm_to_dinov2` writes a timm-layout backbone back
in the official layout (how ``reglue train-vfm`` saves its teacher). reglue never downloads: a hub id such as
``"timm/vit_base_patch14_reg4_dinov2.lvd142m"`` fails at once, saying where to put the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from reglue.encoders.vfm_weights import Weights, dinov2_to_timm, read_weights, swiglu_hidden_features
from reglue.errors import InputError
from reglue.resolution import check_resolution
from reglue.state_dict import describe_state_dict_mismatch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Network input side per 256 image pixels: 224 (16 tokens of 14 px) for DINOv2, 256 for DINOv3
# (exact for every resolution of reglue.resolution: multiples of 64).
INPUT_SIDE_PER_256 = {"dinov2": 224, "dinov3": 256}


class VFMFeatures(NamedTuple):
    """What :class:`VFMExtractor` returns, all float32 (h = w = res/16: 16 at 256², 32 at 512²)."""

    local: torch.Tensor  # (B, L·D, h, w): requested blocks' patch tokens after the final norm
    cls: torch.Tensor  # (B, D): last block's CLS after the final norm
    repa: torch.Tensor  # (B, 1 + h·w, D): last block's [CLS; patches] after the final norm


# --------------------------------------------------------------------------------------
# Weights: the strict load (files and key maps: reglue.encoders.vfm_weights)
# --------------------------------------------------------------------------------------


def load_vfm_weights(vit: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Key-map ``state_dict`` with :func:`dinov2_to_timm`, then load it strictly into ``vit``."""
    state_dict = dinov2_to_timm(state_dict)
    problem = describe_state_dict_mismatch(vit, state_dict)
    if problem is not None:
        hint = _arch_hint(state_dict)
        raise InputError(f"VFM weights from {what} do not fit the model:\n  {problem}\n{hint}")
    vit.load_state_dict(state_dict, strict=True)


def _arch_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """What architecture the weights describe, to pick the matching builder arguments."""
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return "The weights have no patch_embed.proj.weight; are they a ViT backbone?"
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    width, registers = proj.shape[0], state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    registered = [
        name for name, arch in VFM_MODELS.items()
        if (arch.embed_dim, arch.depth, arch.num_register_tokens) == (width, depth, registers)
    ]
    build = (
        f"build_vfm('{registered[0]}', ...), --vfm {registered[0]}" if registered
        else f"a registered name with embed_dim={width}, depth={depth} (--vfm-arch for small models)"
    )
    return (
        f"They describe a ViT of width {width}, patch {proj.shape[-1]}, {depth} blocks, {registers} register "
        f"tokens; build that model ({build}) or pass the weights made for this one."
    )


# --------------------------------------------------------------------------------------
# DINOv2 as a timm VisionTransformer with the official position-embedding resize
# --------------------------------------------------------------------------------------


class DINOv2ViT(VisionTransformer):
    """timm's VisionTransformer in DINOv2's layout: tokens [CLS, R registers, h·w patches].

    ``pos_embed`` (1, g², D) keeps the pretraining grid (g = img_size / patch, 37 for 518) and
    covers the patches only; the CLS position is folded into ``cls_token``. For an h×w input grid
    it is resized once (bicubic) and cached, with the official model's two switches (their names):
    ``interpolate_offset`` 0 gives the output size; > 0 gives the scale factor
    ((h + offset) / g, (w + offset) / g) instead, as the no-register models do with 0.1;
    ``interpolate_antialias`` (True for the register models, False for the others).
    """

    def __init__(
        self, *, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
        num_register_tokens: int, swiglu: bool, interpolate_offset: float = 0.0,
        interpolate_antialias: bool = True,
    ):
        mlp = {}
        if swiglu:  # SwiGLUPacked's fc1 is twice the official hidden width
            hidden = swiglu_hidden_features(embed_dim)
            mlp_ratio = (2 * hidden + 0.5) / embed_dim  # int(D · ratio) = 2·hidden exactly
            mlp = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, "mlp_ratio": mlp_ratio}
        super().__init__(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, reg_tokens=num_register_tokens, num_classes=0, init_values=1e-5,
            no_embed_class=True, dynamic_img_size=True, **mlp,
        )
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self._grid_pos_cache: tuple[tuple, torch.Tensor] | None = None

    def grid_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Patch position embedding resized to ``grid`` (h, w): (1, h·w, D), cached."""
        pos = self.pos_embed
        key = (grid, pos.device, pos.dtype, pos.data_ptr(), pos._version)  # new weights → new key
        if self._grid_pos_cache is None or self._grid_pos_cache[0] != key:
            old_grid = tuple(self.patch_embed.grid_size)
            if self.interpolate_offset:
                resized = _resize_pos_embed_by_scale(
                    pos.detach(), grid, old_grid, offset=self.interpolate_offset,
                    antialias=self.interpolate_antialias,
                )
            else:
                resized = resample_abs_pos_embed(
                    pos.detach(), new_size=list(grid), old_size=list(old_grid), num_prefix_tokens=0,
                    interpolation="bicubic", antialias=self.interpolate_antialias,
                )
            self._grid_pos_cache = (key, resized)
        return self._grid_pos_cache[1]

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, h, w, D) → (B, 1 + R + h·w, D) with positions added.

        Overrides timm's hook, which ``forward_intermediates`` calls right after the patch embed.
        """
        batch, h, w, dim = x.shape
        patches = x.reshape(batch, h * w, dim) + self.grid_pos_embed((h, w))
        prefix = [self.cls_token.expand(batch, -1, -1)]  # (B, 1, D), CLS position included
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(batch, -1, -1))  # (B, R, D), no position
        return torch.cat(prefix + [patches], dim=1)


def _resize_pos_embed_by_scale(
    pos: torch.Tensor, grid: tuple[int, int], old_grid: tuple[int, int], *, offset: float, antialias: bool,
) -> torch.Tensor:
    """(1, g_h·g_w, D) → (1, h·w, D), bicubic with the scale factor ((h + offset) / g_h, …) given.

    The official no-register DINOv2 resize: F.interpolate computes the output size as
    floor(g · scale) = h and samples at (i + 0.5) / scale − 0.5, not at (i + 0.5) · g / h − 0.5.
    """
    (h, w), (old_h, old_w) = grid, old_grid
    dim = pos.shape[-1]
    image = pos.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)  # (1, D, g_h, g_w)
    scale = ((h + offset) / old_h, (w + offset) / old_w)
    resized = F.interpolate(image, scale_factor=scale, mode="bicubic", antialias=antialias)  # (1, D, h, w)
    if tuple(resized.shape[-2:]) != (h, w):
        raise InputError(
            f"position embedding resize by scale {scale} gave a {tuple(resized.shape[-2:])} grid, expected "
            f"{(h, w)}; use interpolate_offset 0 (output size given) for this input size."
        )
    return resized.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos.dtype)


# --------------------------------------------------------------------------------------
# The extractor
# --------------------------------------------------------------------------------------


class VFMExtractor(nn.Module):
    """Frozen ViT: uint8 images (B, 3, res, res) → :class:`VFMFeatures` (SPEC §4).

    ``vit`` is a timm model with ``forward_intermediates`` (DINOv2ViT, or timm's Eva for DINOv3);
    ``input_size`` is the side the images are resized to before the ViT (224·res/256 for DINOv2).
    ``autocast_dtype`` (torch.bfloat16 / torch.float16) runs the ViT under autocast; the outputs
    are float32 either way. The module stays in eval mode with no trainable parameter.
    """

    def __init__(
        self, vit: nn.Module, *, layers: Sequence[int], resolution: int, input_size: int,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        patch = vit.patch_embed.patch_size[0]
        if input_size % patch:
            raise InputError(
                f"network input {input_size}² is not a multiple of the patch size {patch}; "
                f"use a patch size dividing {input_size} (14 for DINOv2, 16 for DINOv3)."
            )
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise InputError(
                f"autocast_dtype must be None, torch.bfloat16 or torch.float16; found {autocast_dtype}."
            )
        self.vit = vit
        self.layers = _check_layers(layers, len(vit.blocks))
        self.resolution = resolution
        self.input_size = input_size
        self.grid_size = input_size // patch
        self.embed_dim = vit.embed_dim
        self.feature_width = len(self.layers) * self.embed_dim  # L·D channels of the local maps
        self.autocast_dtype = autocast_dtype
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VFMExtractor:
        """Always eval: the VFM is a frozen feature extractor, whatever its parent does."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, res, res) → normalised float32 (B, 3, input_size, input_size)."""
        self._check_images(images)
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        x = (images.float() / 255.0 - mean) / std
        return F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> VFMFeatures:
        """uint8 images (B, 3, res, res) → local (B, L·D, h, w), cls (B, D), repa (B, 1+h·w, D)."""
        x = self.preprocess(images).to(self.vit.patch_embed.proj.weight.dtype)
        autocast = self.autocast_dtype is not None
        with torch.autocast(x.device.type, dtype=self.autocast_dtype, enabled=autocast):
            tokens, per_block = self.vit.forward_intermediates(
                x, indices=list(self.layers), norm=True, output_fmt="NCHW"
            )  # tokens (B, 1 + R + h·w, D) after the final norm; per_block L × (B, D, h, w)
        tokens = tokens.float()
        local = torch.cat(per_block, dim=1).float()  # (B, L·D, h, w)
        patches = tokens[:, self.vit.num_prefix_tokens:]  # registers dropped: (B, h·w, D)
        repa = torch.cat([tokens[:, :1], patches], dim=1)  # (B, 1 + h·w, D)
        return VFMFeatures(local=local, cls=tokens[:, 0], repa=repa)

    def _check_images(self, images: torch.Tensor) -> None:
        expected = f"uint8 (B, 3, {self.resolution}, {self.resolution})"
        found = f"{images.dtype} {tuple(images.shape)}"
        if images.dtype != torch.uint8:
            raise InputError(f"VFM input must be {expected} images; found {found}. Pass raw uint8 pixels.")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (self.resolution, self.resolution):
            raise InputError(
                f"VFM input must be {expected} images; found {found}. Centre-crop RGB images to "
                f"{self.resolution}² or build the extractor with resolution={images.shape[-1]}."
            )


def _check_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    layers = tuple(int(i) for i in layers)
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= depth:
        raise InputError(
            f"layers must be strictly increasing 0-based block indices in 0..{depth - 1}, at least "
            f"one; found {layers}. REGLUE uses the last four blocks, e.g. (8, 9, 10, 11) for 12 blocks."
        )
    return layers


def input_side(resolution: int, family: Literal["dinov2", "dinov3"]) -> int:
    """The ViT's input side for R² images: 224·R/256 (DINOv2), R (DINOv3); R/16 patches per side."""
    return INPUT_SIDE_PER_256[family] * check_resolution(resolution) // 256


# --------------------------------------------------------------------------------------
# Builders and the registry
# --------------------------------------------------------------------------------------


def build_dinov2(
    embed_dim: int, depth: int, num_heads: int, *, weights: Weights, patch_size: int = 14,
    num_register_tokens: int = 4, swiglu: bool = False, img_size: int = 518,
    interpolate_offset: float = 0.0, interpolate_antialias: bool = True,
    layers: Sequence[int] = (8, 9, 10, 11), resolution: int = 256,
    autocast_dtype: torch.dtype | None = None,
) -> VFMExtractor:
    """A DINOv2 extractor of any size. ``img_size`` is the pretraining size (its grid is
    ``pos_embed``'s); ``swiglu`` selects ViT-g's MLP; ``interpolate_*`` the position-embedding
    resize (:class:`DINOv2ViT`); ``weights`` see the module docstring."""
    input_size = input_side(resolution, "dinov2")
    state_dict, what = read_weights(weights)
    vit = DINOv2ViT(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, num_register_tokens=num_register_tokens, swiglu=swiglu,
        interpolate_offset=interpolate_offset, interpolate_antialias=interpolate_antialias,
    )
    return _extractor(vit, state_dict, what, layers, resolution, input_size, autocast_dtype)


def build_dinov3(
    timm_name: str, *, weights: Weights, layers: Sequence[int], resolution: int = 256,
    autocast_dtype: torch.dtype | None = None, **timm_kwargs,
) -> VFMExtractor:
    """A DINOv3 extractor from timm's registry (``vit_base_patch16_dinov3`` ...), weights in
    timm's layout; ``timm_kwargs`` go to ``timm.create_model`` (embed_dim, depth, ...)."""
    input_size = input_side(resolution, "dinov3")
    state_dict, what = read_weights(weights)
    vit = timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs)
    return _extractor(vit, state_dict, what, layers, resolution, input_size, autocast_dtype)


def _extractor(vit, state_dict, what, layers, resolution, input_size, autocast_dtype) -> VFMExtractor:
    """Wrap ``vit`` as a frozen extractor and load ``state_dict`` into it (strict) when given."""
    extractor = VFMExtractor(vit, layers=layers, resolution=resolution, input_size=input_size,
                             autocast_dtype=autocast_dtype)
    if state_dict is not None:
        load_vfm_weights(extractor.vit, state_dict, what)
    return extractor


@dataclass(frozen=True)
class VFMArch:
    """A registered VFM's architecture (official sizes and the official hub builder's switches)."""

    family: Literal["dinov2", "dinov3"]
    embed_dim: int
    depth: int
    num_heads: int
    swiglu: bool = False  # DINOv2-g's fused SwiGLU MLP
    timm_name: str = ""  # DINOv3: timm's registry entry
    num_register_tokens: int = 4  # DINOv2: 4 for the *_reg models, 0 for the others
    interpolate_offset: float = 0.0  # DINOv2 position-embedding resize (DINOv2ViT): 0.1 without registers
    interpolate_antialias: bool = True  # ... and no antialias without registers


# DINOv2 without registers: the official hub builder's defaults (no registers, offset 0.1, no antialias).
_NO_REGISTERS = {"num_register_tokens": 0, "interpolate_offset": 0.1, "interpolate_antialias": False}

VFM_MODELS: dict[str, VFMArch] = {
    "dinov2_vits14_reg": VFMArch("dinov2", 384, 12, 6),
    "dinov2_vitb14_reg": VFMArch("dinov2", 768, 12, 12),
    "dinov2_vitl14_reg": VFMArch("dinov2", 1024, 24, 16),
    "dinov2_vitg14_reg": VFMArch("dinov2", 1536, 40, 24, swiglu=True),
    "dinov2_vits14": VFMArch("dinov2", 384, 12, 6, **_NO_REGISTERS),
    "dinov2_vitb14": VFMArch("dinov2", 768, 12, 12, **_NO_REGISTERS),
    "dinov2_vitl14": VFMArch("dinov2", 1024, 24, 16, **_NO_REGISTERS),  # FD_DINOv2's network
    "dinov2_vitg14": VFMArch("dinov2", 1536, 40, 24, swiglu=True, **_NO_REGISTERS),
    "dinov3_vits16": VFMArch("dinov3", 384, 12, 6, timm_name="vit_small_patch16_dinov3"),
    "dinov3_vitb16": VFMArch("dinov3", 768, 12, 12, timm_name="vit_base_patch16_dinov3"),
    "dinov3_vitl16": VFMArch("dinov3", 1024, 24, 16, timm_name="vit_large_patch16_dinov3"),
}


def build_vfm(
    name: str, *, weights: Weights, layers: Sequence[int] | None = None, resolution: int = 256,
    autocast_dtype: torch.dtype | None = None, **overrides,
) -> VFMExtractor:
    """Build a registered VFM, e.g. ``build_vfm("dinov2_vitb14_reg", weights="dinov2.pth")``.

    ``layers`` defaults to the last four blocks ((8, 9, 10, 11) for S/B, SPEC §4); ``overrides``
    replace :class:`VFMArch` fields (embed_dim, depth, num_heads) for tiny test models.
    """
    if name not in VFM_MODELS:
        raise InputError(f"unknown VFM {name!r}; choose one of {', '.join(VFM_MODELS)}.")
    arch = replace(VFM_MODELS[name], **overrides)
    layers = tuple(range(max(arch.depth - 4, 0), arch.depth)) if layers is None else layers
    common = {
        "weights": weights, "layers": layers, "resolution": resolution, "autocast_dtype": autocast_dtype,
    }
    dims = {"embed_dim": arch.embed_dim, "depth": arch.depth, "num_heads": arch.num_heads}
    if arch.family == "dinov3":
        return build_dinov3(arch.timm_name, **dims, **common)
    return build_dinov2(
        **dims, swiglu=arch.swiglu, num_register_tokens=arch.num_register_tokens,
        interpolate_offset=arch.interpolate_offset, interpolate_antialias=arch.interpolate_antialias, **common,
    )
