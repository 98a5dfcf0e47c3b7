"""Vision foundation model features (SPEC §4): DINOv2 with registers, and the other teachers of docs/vfm.md.

A :class:`VFMExtractor` is a frozen timm ViT that turns uint8 images (B, 3, res, res) into
the three things REGLUE needs (:class:`VFMFeatures`):

- ``local`` (B, L·D, h, w): patch tokens of each requested block (0-based, strictly increasing)
  after the model's final LayerNorm, concatenated on channels in block order, tokens row-major;
  the input of the semantic compressor (3072×16×16 for DINOv2-B, blocks 8-11, 256²);
- ``cls`` (B, D): the model's own global token of the last block after the final norm (REG/REGLUE's
  cls): the class token where the model has one, else its stand-in (:class:`VFMFamily` ``global_pool``:
  SigLIP's attention-pool head, I-JEPA's mean patch token);
- ``repa`` (B, 1 + h·w, D): [cls; patch tokens] of the last block after the final norm, the
  REPA target. Every prefix token (class token, registers) is left out of the patch tokens.

Every teacher sees an input of side patch·R/16 (:func:`input_side`), so its patch grid is (R/16)²
for any R of :mod:`reglue.resolution`: 224·R/256 for patch 14, R for patch 16. The image is
normalised with its family's mean/std, then resized with ``F.interpolate(mode="bicubic")`` (no
antialias, align_corners False), as the authors' and REPA's pipelines do.

DINOv2 with registers (``dinov2_vit{s,b,l,g}14_reg``, REGLUE's VFM), exactly as the authors' pipeline:

- preprocessing: ImageNet mean/std, bicubic resize to 224·res/256 (16×16 at 256², 8×8 at 128²);
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

The other teachers are timm's own models (``timm_name``), built with ``dynamic_img_size`` so timm
resizes their learned position table to the input grid in every forward (bicubic, antialias, the
class-token slot kept), and the image at their family's side:

- DINOv3 (``dinov3_vit{s,b,l}16``): RoPE positions, nothing resized; timm's layout only;
- OpenAI CLIP ViT-L/14 (``clip_vitl14``, timm's QuickGELU variant, as OpenAI's blocks), CLIP mean/std,
  224·R/256; its ``proj`` to the text space is not used (cls = the final-normed class token, D = 1024);
- SigLIP ViT-B/16 (``siglip_vitb16``), mean/std 0.5, R; no class token: cls = its attention-pool head;
- MAE ViT-B/16, ViT-L/16 (``mae_vitb16``, ``mae_vitl16``), ImageNet mean/std, R (the 14×14 table resized);
- I-JEPA ViT-H/14 (``ijepa_vith14``), ImageNet mean/std, 224·R/256; no class token: cls = the mean of
  the final-normed patch tokens (timm's ``avg`` pool of these weights).

Weights (``weights=``, always explicit): ``None`` (random init, for tests and demos), a state
dict, or a local file (``.safetensors``, or a ``torch.save`` of tensors, read with ``weights_only``).
Each family has one key map (:class:`VFMFamily` ``to_timm``) that turns each layout it accepts into
timm's names — timm's own layout passes unchanged — then a strict load whose failure lists missing,
unexpected and mis-shaped keys: :func:`dinov2_to_timm` (official DINOv2 ``.pth``),
:func:`openai_clip_to_timm` (OpenAI's state dict; its TorchScript ``.pt`` is refused, naming the
one-line conversion), :func:`mae_to_timm` (``{"model": ...}``), :func:`ijepa_to_timm`
(``{"encoder": {"module.…"}}``). :func:`timm_to_dinov2` writes a timm-layout DINOv2 back in the
official layout (how ``reglue train-vfm`` saves its teacher). reglue never downloads: a hub id such
as ``"timm/vit_base_patch14_reg4_dinov2.lvd142m"`` fails at once, saying where to put the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from reglue.encoders.vfm_weights import (
    KeyMap,
    Weights,
    dinov2_to_timm,
    ijepa_to_timm,
    mae_to_timm,
    openai_clip_to_timm,
    read_weights,
    swiglu_hidden_features,
)
from reglue.errors import InputError
from reglue.resolution import check_resolution
from reglue.state_dict import describe_state_dict_mismatch, strip_module_prefix

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's (openai/CLIP clip/clip.py, timm's cfg)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP's mean and std: pixels to [-1, 1]


class VFMFeatures(NamedTuple):
    """What :class:`VFMExtractor` returns, all float32 (h = w = res/16: 16 at 256², 32 at 512²)."""

    local: torch.Tensor  # (B, L·D, h, w): requested blocks' patch tokens after the final norm
    cls: torch.Tensor  # (B, D): last block's CLS (or the family's stand-in) after the final norm
    repa: torch.Tensor  # (B, 1 + h·w, D): last block's [cls; patches] after the final norm


# --------------------------------------------------------------------------------------
# Weights: the strict load (files and key maps: reglue.encoders.vfm_weights)
# --------------------------------------------------------------------------------------


def load_vfm_weights(vit: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Load a timm-layout ``state_dict`` (a family's key map applied) strictly into ``vit``; a mismatch
    lists missing, unexpected and mis-shaped keys and the registered model the weights look like."""
    problem = describe_state_dict_mismatch(vit, state_dict)
    if problem is not None:
        hint = _arch_hint(state_dict)
        raise InputError(f"VFM weights from {what} do not fit the model:\n  {problem}\n{hint}")
    vit.load_state_dict(state_dict, strict=True)


def _arch_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """What architecture the weights describe, to pick the matching registered model(s)."""
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return "The weights have no patch_embed.proj.weight; are they a ViT backbone?"
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    width, registers = proj.shape[0], state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    class_token = "cls_token" in state_dict
    found = (width, depth, registers, proj.shape[-1], class_token)
    registered = [name for name, arch in VFM_MODELS.items() if found == (
        arch.embed_dim, arch.depth, arch.num_register_tokens, VFM_FAMILIES[arch.family].patch_size,
        VFM_FAMILIES[arch.family].global_pool == "token")]
    build = (
        f"build_vfm('{registered[0]}', ...), --vfm {' or --vfm '.join(registered)}" if registered
        else f"a registered name with embed_dim={width}, depth={depth} (--vfm-arch for small models)"
    )
    return (
        f"They describe a ViT of width {width}, patch {proj.shape[-1]}, {depth} blocks, {registers} register "
        f"tokens, {'a' if class_token else 'no'} class token; build that model ({build}) or pass the weights made "
        "for this one."
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

    ``vit`` is a timm model with ``forward_intermediates`` and ``forward_head`` (DINOv2ViT, timm's
    VisionTransformer, or timm's Eva for DINOv3), whose pooling gives ``cls``; ``input_size`` is the side
    the images are resized to before the ViT (patch·res/16: 224·res/256 for patch 14), after ``mean`` /
    ``std`` normalised them.
    ``autocast_dtype`` (torch.bfloat16 / torch.float16) runs the ViT under autocast; the outputs
    are float32 either way. The module stays in eval mode with no trainable parameter.
    """

    def __init__(
        self, vit: nn.Module, *, layers: Sequence[int], resolution: int, input_size: int,
        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
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
        self.mean, self.std = tuple(mean), tuple(std)
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
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        x = (images.float() / 255.0 - mean) / std
        return F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> VFMFeatures:
        """uint8 images (B, 3, res, res) → local (B, L·D, h, w), cls (B, D), repa (B, 1+h·w, D)."""
        x = self.preprocess(images).to(self.vit.patch_embed.proj.weight.dtype)
        autocast = contextlib.nullcontext() if self.autocast_dtype is None else torch.autocast(
            x.device.type, dtype=self.autocast_dtype)  # none asked: nothing entered (a meta device has no autocast)
        with autocast:
            tokens, per_block = self.vit.forward_intermediates(
                x, indices=list(self.layers), norm=True, output_fmt="NCHW"
            )  # tokens (B, P + h·w, D) after the final norm, P prefix tokens; per_block L × (B, D, h, w)
            cls = self.vit.forward_head(tokens, pre_logits=True).float()  # (B, D): class token or stand-in
        local = torch.cat(per_block, dim=1).float()  # (B, L·D, h, w)
        patches = tokens[:, self.vit.num_prefix_tokens:].float()  # (B, h·w, D): no class token, no register
        repa = torch.cat([cls[:, None], patches], dim=1)  # (B, 1 + h·w, D)
        return VFMFeatures(local=local, cls=cls, repa=repa)

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


def input_side(resolution: int, family: str) -> int:
    """The ViT's input side for R² images: patch·R/16, so R/16 patches per side (:class:`VFMFamily`)."""
    return VFM_FAMILIES[family].input_side(resolution)


# --------------------------------------------------------------------------------------
# Families, the registry and the one build path
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VFMArch:
    """A registered VFM: its family (a key of :data:`VFM_FAMILIES`), official size, timm model, and
    DINOv2's switches (the official hub builder's)."""

    family: str
    embed_dim: int
    depth: int
    num_heads: int
    timm_name: str = ""  # timm's registry entry (every family but DINOv2, which is DINOv2ViT)
    num_register_tokens: int = 0  # 4 for DINOv2 *_reg and DINOv3
    swiglu: bool = False  # DINOv2-g's fused SwiGLU MLP
    interpolate_offset: float = 0.0  # DINOv2 position-embedding resize (DINOv2ViT): 0.1 without registers
    interpolate_antialias: bool = True  # ... and no antialias without registers


@dataclass(frozen=True)
class VFMFamily:
    """What the teachers of one family share (docs/vfm.md has them side by side).

    ``patch_size`` sets the input side patch·R/16 (:meth:`input_side`); ``mean`` / ``std`` normalise
    pixels in [0, 1]; ``global_pool`` is timm's pooling that gives ``cls``: ``"token"`` the class token,
    ``"map"`` SigLIP's attention-pool head, ``"avg"`` the mean patch token; ``to_timm`` is the key map of
    the weight layouts it loads (:mod:`reglue.encoders.vfm_weights`), ``accepts`` those files in words
    (for errors); ``build`` makes the ViT of a :class:`VFMArch`.
    """

    label: str
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    global_pool: Literal["token", "map", "avg"]
    to_timm: KeyMap
    accepts: str
    build: Callable[[VFMArch], nn.Module]

    def input_side(self, resolution: int) -> int:
        """patch·R/16 for R² images (224·R/256 for patch 14, R for 16): R/16 patches per side, exact for
        every resolution of :mod:`reglue.resolution` (multiples of 64)."""
        return self.patch_size * check_resolution(resolution) // 16


def _dinov2_vit(arch: VFMArch) -> DINOv2ViT:
    """The official DINOv2 at ``arch``'s size: patch 14, pretrained at 518² (a 37×37 position grid)."""
    return DINOv2ViT(
        img_size=518, patch_size=14, embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads,
        num_register_tokens=arch.num_register_tokens, swiglu=arch.swiglu,
        interpolate_offset=arch.interpolate_offset, interpolate_antialias=arch.interpolate_antialias,
    )


def _timm_vit(arch: VFMArch) -> nn.Module:
    """timm's ``arch.timm_name`` at ``arch``'s size, without classifier, pooled as its family says, with
    ``dynamic_img_size``: a learned position table is resized to each input's grid in the forward
    (timm's ``resample_abs_pos_embed``: bicubic, antialias, class-token slot kept)."""
    return timm.create_model(
        arch.timm_name, pretrained=False, num_classes=0, global_pool=VFM_FAMILIES[arch.family].global_pool,
        dynamic_img_size=True, embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads,
    )


VFM_FAMILIES: dict[str, VFMFamily] = {
    "dinov2": VFMFamily(
        "DINOv2", 14, IMAGENET_MEAN, IMAGENET_STD, "token", dinov2_to_timm,
        "an official DINOv2 .pth (e.g. dinov2_vitb14_reg4_pretrain.pth from "
        "https://dl.fbaipublicfiles.com/dinov2/) or a timm .safetensors/.pth/.bin file", _dinov2_vit,
    ),
    "dinov3": VFMFamily(
        "DINOv3", 16, IMAGENET_MEAN, IMAGENET_STD, "token", strip_module_prefix,
        "timm's model.safetensors (timm/vit_*_patch16_dinov3.lvd1689m; the official layout is not mapped)",
        _timm_vit,
    ),
    "clip": VFMFamily(
        "CLIP", 14, CLIP_MEAN, CLIP_STD, "token", openai_clip_to_timm,
        "OpenAI's CLIP state dict (ViT-L-14.pt converted once, docs/vfm.md) or timm's model.safetensors "
        "(timm/vit_large_patch14_clip_224.openai)", _timm_vit,
    ),
    # cls = the MAP head's output: SigLIP's own image embedding, trained by its loss (docs/vfm.md)
    "siglip": VFMFamily(
        "SigLIP", 16, HALF, HALF, "map", strip_module_prefix,
        "timm's model.safetensors (timm/vit_base_patch16_siglip_256.webli; big_vision's .npz is not mapped)",
        _timm_vit,
    ),
    "mae": VFMFamily(
        "MAE", 16, IMAGENET_MEAN, IMAGENET_STD, "token", mae_to_timm,
        "the official mae_pretrain_vit_{base,large}.pth (https://dl.fbaipublicfiles.com/mae/pretrain/) or "
        "timm's model.safetensors (timm/vit_{base,large}_patch16_224.mae)", _timm_vit,
    ),
    # no class token: cls = the mean of the final-normed patch tokens (timm's "avg" for these weights)
    "ijepa": VFMFamily(
        "I-JEPA", 14, IMAGENET_MEAN, IMAGENET_STD, "avg", ijepa_to_timm,
        "the official IN1K-vit.h.14-300e.pth.tar (https://dl.fbaipublicfiles.com/ijepa/; its context "
        "encoder) or a timm-layout state dict", _timm_vit,
    ),
}

# DINOv2 with registers; without: the official hub builder's defaults (offset 0.1, no antialias).
_REGISTERS = {"num_register_tokens": 4}
_NO_REGISTERS = {"num_register_tokens": 0, "interpolate_offset": 0.1, "interpolate_antialias": False}

VFM_MODELS: dict[str, VFMArch] = {
    "dinov2_vits14_reg": VFMArch("dinov2", 384, 12, 6, **_REGISTERS),
    "dinov2_vitb14_reg": VFMArch("dinov2", 768, 12, 12, **_REGISTERS),
    "dinov2_vitl14_reg": VFMArch("dinov2", 1024, 24, 16, **_REGISTERS),
    "dinov2_vitg14_reg": VFMArch("dinov2", 1536, 40, 24, swiglu=True, **_REGISTERS),
    "dinov2_vits14": VFMArch("dinov2", 384, 12, 6, **_NO_REGISTERS),
    "dinov2_vitb14": VFMArch("dinov2", 768, 12, 12, **_NO_REGISTERS),
    "dinov2_vitl14": VFMArch("dinov2", 1024, 24, 16, **_NO_REGISTERS),  # FD_DINOv2's network
    "dinov2_vitg14": VFMArch("dinov2", 1536, 40, 24, swiglu=True, **_NO_REGISTERS),
    "dinov3_vits16": VFMArch("dinov3", 384, 12, 6, "vit_small_patch16_dinov3", **_REGISTERS),
    "dinov3_vitb16": VFMArch("dinov3", 768, 12, 12, "vit_base_patch16_dinov3", **_REGISTERS),
    "dinov3_vitl16": VFMArch("dinov3", 1024, 24, 16, "vit_large_patch16_dinov3", **_REGISTERS),
    # OpenAI's blocks use QuickGELU, x·σ(1.702x): timm's _quickgelu_ variant, not the GELU one, of the same weights
    "clip_vitl14": VFMArch("clip", 1024, 24, 16, "vit_large_patch14_clip_quickgelu_224.openai"),
    "siglip_vitb16": VFMArch("siglip", 768, 12, 12, "vit_base_patch16_siglip_256.webli"),
    "mae_vitb16": VFMArch("mae", 768, 12, 12, "vit_base_patch16_224.mae"),
    "mae_vitl16": VFMArch("mae", 1024, 24, 16, "vit_large_patch16_224.mae"),
    "ijepa_vith14": VFMArch("ijepa", 1280, 32, 16, "vit_huge_patch14_gap_224.in1k_ijepa"),
}


def vfm_family(name: str) -> VFMFamily:
    """The family of the registered VFM ``name``; an unknown name is an error listing the registered ones."""
    if name not in VFM_MODELS:
        raise InputError(f"unknown VFM {name!r}; choose one of {', '.join(VFM_MODELS)}.")
    return VFM_FAMILIES[VFM_MODELS[name].family]


def default_layers(depth: int) -> tuple[int, ...]:
    """The blocks local semantics come from when none are named: the last four (SPEC §4)."""
    return tuple(range(max(depth - 4, 0), depth))


def build_vfm(
    name: str, *, weights: Weights, layers: Sequence[int] | None = None, resolution: int = 256,
    autocast_dtype: torch.dtype | None = None, **overrides,
) -> VFMExtractor:
    """Build a registered VFM, e.g. ``build_vfm("dinov2_vitb14_reg", weights="dinov2.pth")``.

    ``layers`` defaults to the last four blocks ((8, 9, 10, 11) for S/B, SPEC §4); ``overrides``
    replace :class:`VFMArch` fields (embed_dim, depth, num_heads) for tiny test models.
    """
    family = vfm_family(name)
    arch = replace(VFM_MODELS[name], **overrides)
    layers = default_layers(arch.depth) if layers is None else layers
    input_size = family.input_side(resolution)
    state_dict, what = read_weights(weights, family.to_timm, accepts=family.accepts)
    return _extractor(family.build(arch), family, state_dict, what, layers=layers, resolution=resolution,
                      input_size=input_size, autocast_dtype=autocast_dtype)


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
    family = VFM_FAMILIES["dinov2"]
    input_size = family.input_side(resolution)
    state_dict, what = read_weights(weights, family.to_timm, accepts=family.accepts)
    vit = DINOv2ViT(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, num_register_tokens=num_register_tokens, swiglu=swiglu,
        interpolate_offset=interpolate_offset, interpolate_antialias=interpolate_antialias,
    )
    return _extractor(vit, family, state_dict, what, layers=layers, resolution=resolution,
                      input_size=input_size, autocast_dtype=autocast_dtype)


def _extractor(
    vit: nn.Module, family: VFMFamily, state_dict: Mapping[str, torch.Tensor] | None, what: str, *,
    layers: Sequence[int], resolution: int, input_size: int, autocast_dtype: torch.dtype | None,
) -> VFMExtractor:
    """Wrap ``vit`` as a frozen extractor with its family's normalisation and load ``state_dict`` (strict)."""
    extractor = VFMExtractor(vit, layers=layers, resolution=resolution, input_size=input_size,
                             mean=family.mean, std=family.std, autocast_dtype=autocast_dtype)
    if state_dict is not None:
        load_vfm_weights(extractor.vit, state_dict, what)
    return extractor
