"""Training a DINOv2-with-registers teacher from scratch, self-supervised (``reglue train-vfm``).

The images come from a ``reglue prepare`` directory or straight from an image folder or ``.zip``
(:func:`reglue.data.image_rows.open_images`; :class:`reglue.data.source_dataset.ImageSourceDataset` crops them on
access exactly as prepare does, so both give the same pixels and the same teacher).

The backbone is :class:`reglue.encoders.vfm.DINOv2ViT` (patch 14, 4 registers, the official
37×37 pretraining position grid, resized per input), any width/depth/heads from a CPU-sized toy to
ViT-B. The recipe is DINOv2's (Oquab et al. 2023), assembled from lightly's parts:

- multi-crop views (``lightly.transforms.DINOTransform``): 2 global crops at the VFM input side of
  the data (224·R/256: 56 at R = 64, 112 at R = 128) and ``local_crops`` smaller ones (a multiple of
  14, 3R/8 rounded: 28 at 64, 42 at 128), with colour jitter, grey, blur and solarisation;
- a student and an EMA teacher, each a ``MaskedVisionTransformerTIMM`` around the ViT plus one
  ``DINOProjectionHead`` (weight-normalised prototypes) shared by the CLS and the patch tokens
  (DINOv2's default); the teacher follows the student with a momentum rising to 1 (cosine);
- the loss ``DINOLoss`` on the CLS tokens (student: every crop; teacher: the global ones; the
  teacher's output centred, its temperature warmed up) + ``ibot_weight`` · ``IBOTPatchLoss`` on the
  masked patch tokens of the global crops (the student sees mask tokens, the teacher the image) +
  ``koleo_weight`` · ``KoLeoLoss`` on the student's global CLS features, one crop at a time;
- AdamW (no weight decay on 1-D parameters), linear warmup then cosine learning rate, gradient
  clipping, the prototypes frozen for the first ``freeze_last_layer_fraction`` of the steps.

Where this differs from DINOv2 at scale: the teacher is centred by a running mean (lightly's
DINO centring), not Sinkhorn-Knopp; weight decay is constant; masks are random tokens (10-50 % of
one of the two global crops of every image, which is DINOv2's share of masked crops) rather than
blocks, which degenerate on 4×4 to 8×8 token grids; and :class:`TeacherSettings`' defaults are made
for a run of about a hundred steps (LayerScale starting at 1, a fast EMA, larger crops, more KoLeo:
each comment names DINOv2's value; docs/teacher.md has what was measured).

Randomness is index-addressed (DESIGN practice 8): epoch e visits the training rows in the order
of (seed, SHUFFLE_STREAM, e) (:mod:`reglue.training.order`); a row's crops and mask come from
(seed, STEP_STREAM, e, row): lightly's transforms draw from the global generators, so they run with
those seeded from that stream and restored afterwards. Weights start from ``seed``. A run killed
and resumed from its ``train_state.pt`` therefore ends bit-identical to an uninterrupted one (on
CPU, same number of processes and threads).

Files in ``out_dir`` (written by the main process):

- ``teacher.pth``: the teacher backbone in the official DINOv2 layout (``cls_token``, ``pos_embed``
  (1, 1 + 37², D), ``register_tokens``, ``mask_token``, ``patch_embed.*``, ``blocks.*``, ``norm.*``;
  :func:`reglue.encoders.vfm.timm_to_dinov2`), plain tensors: it loads wherever a VFM weights file
  does (``--vfm-weights``, ``build_vfm("dinov2_vitb14_reg", weights=..., embed_dim=..., depth=...,
  num_heads=...)``); :func:`teacher_spec` gives the matching :class:`VFMSpec`;
- ``teacher.json``: {"vfm", "arch", "resolution", "weights", "settings", "data", "train_seconds", ...};
- ``train_state.pt``: the resume state (student, teacher, head centres, AdamW, position, RNG), a
  training checkpoint of :mod:`reglue.checkpoint`, every ``checkpoint_every`` steps, at the end and on
  SIGINT/SIGTERM, after which the run stops (:class:`reglue.training.run.RunStopped`);
- ``skipped.tsv`` (image folders only): the files left out as unreadable, with prepare's reasons;
- ``metrics.jsonl`` (+ ``tensorboard/`` when asked): the loss terms, lr, momentum and teacher
  temperature of every step; ``loss_curves.png`` drawn from it;
- ``report.json`` / ``report.md``: k-NN and linear-probe accuracy of the teacher's CLS features on
  held-out images and the spatial structure (LDS, CDS) of its patch tokens on the same images, against
  the same network untrained, and the PASSED/FAILED verdict (:mod:`reglue.metrics.probe`,
  :mod:`reglue.metrics.vfm_probe`). The held-out images are never trained on: a class-balanced, seeded
  set of ``probe_held_out_images`` (10,000), at most ``max_held_out_fraction`` (a quarter) of each
  class (:func:`split_rows`, :mod:`reglue.data.split`); every other image is trained on. Every
  process extracts the features of its share of the probe's images; the main process fits and
  scores the probes on the gathered features.

Resuming refuses other settings (:func:`reglue.settings.check_same_settings`; only
``checkpoint_every``, ``num_workers`` and ``tensorboard`` may change); ``resume=False`` deletes
this run's files and starts over. Works alone or under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from timm.layers import DropPath
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_pil_image

from reglue.data import store
from reglue.data.dataset import ignore_stop_signals
from reglue.data.image_rows import Images, image_labels, open_images
from reglue.data.source_dataset import ImageSourceDataset
from reglue.data.split import held_out_split
from reglue.distributed import main_process_log, on_cpu_only, on_main, process_state
from reglue.encoders.semantics import TEACHER_INFO, VFMSpec
from reglue.encoders.vfm import (
    VFM_MODELS,
    DINOv2ViT,
    VFMExtractor,
    build_vfm,
    input_side,
)
from reglue.encoders.vfm_weights import timm_to_dinov2
from reglue.errors import InputError, MissingExtraError
from reglue.io import atomic_write, write_json
from reglue.metrics.probe import REPORT_JSON, REPORT_MD, ProbeReport, write_report
from reglue.metrics.vfm_probe import (
    MAX_HELD_OUT_FRACTION,
    PROBE_HELD_OUT_IMAGES,
    PROBE_TRAIN_IMAGES,
    ProbeFeatures,
    probe_features,
    score,
)
from reglue.precision import AUTO, autocast_dtype
from reglue.precision import check as check_precision
from reglue.seeding import STEP_STREAM, seeded_generator
from reglue.training.metrics import METRICS_FILE, MetricsLogger, read_metrics
from reglue.training.order import per_process_batch
from reglue.training.plot import PLOT_FILE, plot_run
from reglue.training.run import TRAIN_STATE, Position, ResumableRun

INSTALL_HINT = 'pip install "reglue[teacher]"'
try:  # the optional extra "teacher"
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
    from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule, linear_warmup_schedule
except ImportError as err:
    raise MissingExtraError(f"training a teacher needs lightly ({err}); install it with {INSTALL_HINT}") from err

VFM_NAME = "dinov2_vitb14_reg"  # the registry entry whose layout the teacher has (4 registers, patch 14)
WEIGHTS_FILE = "teacher.pth"
INFO_FILE = TEACHER_INFO  # {"vfm", "weights", "arch", ...}: what VFMSpec.from_teacher reads
SKIPPED_FILE = store.SKIPPED  # the skip report of an image folder, as prepare's
STATE_KIND = "dinov2-teacher"  # the "kind" entry of train_state.pt
RESTART_FIX = "use a new out_dir, or start over in this one (resume=False; `--restart` on the command line)."
FREE_SETTINGS = ("settings.checkpoint_every", "settings.num_workers", "settings.tensorboard", "settings.precision",
                 "settings.probe_train_images")  # the training is the same (probe_held_out_images decides the split)
PATCH = 14
TEACHER_PRECISIONS = ("fp32", "bf16", AUTO)
LR_SCALING = (None, "sqrt_wrt_1024", "linear_wrt_1024")  # DINOv2's scaling rules (optim.scaling_rule)
REPORT_TITLE = "DINOv2 teacher trained by reglue train-vfm"  # of report.md, by train-vfm and probe-vfm
_RUN_FILES = (WEIGHTS_FILE, INFO_FILE, TRAIN_STATE, METRICS_FILE, PLOT_FILE, REPORT_JSON, REPORT_MD, SKIPPED_FILE)
SHOWN_SKIPS = 3  # skipped files named in the log line (all of them are in skipped.tsv)

_logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TeacherSettings:
    """Everything that decides a teacher run. The defaults are tuned for a one-to-two-minute CPU run on
    a few hundred 128² images (docs/teacher.md has the measurements); where they depart from DINOv2's
    ViT-B recipe, the DINOv2 value is in the comment. Fractions are of the run's total steps
    (epochs × (training images // global_batch)).
    """

    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    layerscale_init: float = 1.0  # LayerScale γ at init (DINOv2: 1e-5, which stalls a run of a few hundred steps)
    epochs: int = 15
    global_batch: int = 32
    lr: float = 2e-3  # AdamW peak after warmup, scaled by lr_scaling (DINOv2: 4e-3 at batch 1024, sqrt rule)
    lr_scaling: str | None = None  # None: lr as given; sqrt_wrt_1024 / linear_wrt_1024: lr × (batch/1024)^½ or ^1
    min_lr: float = 1e-5
    warmup_fraction: float = 0.1
    weight_decay: float = 0.04
    weight_decay_end: float | None = None  # cosine schedule to this value; None: constant (DINOv2: 0.04 → 0.4)
    drop_path_rate: float | None = None  # stochastic depth of the student; None: none (DINOv2 ViT-B: 0.1-0.3)
    precision: str = "auto"  # autocast of the training step: fp32 | bf16 | auto (bf16 on a GPU with it)
    clip_grad: float = 3.0
    head_hidden_dim: int = 256  # (DINOv2: 2048)
    head_bottleneck_dim: int = 64  # (256)
    head_prototypes: int = 256  # (65536)
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # (0.07 after warmup)
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup_fraction: float = 0.3
    center_momentum: float = 0.9
    momentum_start: float = 0.9  # teacher EMA momentum, cosine to 1 (DINOv2: 0.992)
    ibot_weight: float = 1.0
    koleo_weight: float = 0.3  # (0.1)
    freeze_last_layer_fraction: float = 0.0
    local_crops: int = 2  # (8)
    local_crop_size: int | None = None  # None: 14·round(3R/8 / 14), at least 14
    global_crop_scale: tuple[float, float] = (0.6, 1.0)  # (0.32, 1): a toy figure must stay in the crop
    local_crop_scale: tuple[float, float] = (0.25, 0.6)  # (0.05, 0.32)
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    probe: bool = True  # hold out labelled images and report k-NN / linear-probe accuracy
    probe_train_images: int = PROBE_TRAIN_IMAGES  # the probe fits on at most this many training images (a subset)
    probe_held_out_images: int = PROBE_HELD_OUT_IMAGES  # held out (class-balanced, never trained on) and scored
    max_held_out_fraction: float = MAX_HELD_OUT_FRACTION  # on small data: at most this share of each class held out
    seed: int = 0
    checkpoint_every: int = 50
    num_workers: int = 0
    tensorboard: bool = False

    def __post_init__(self) -> None:
        positive = ("embed_dim", "depth", "num_heads", "epochs", "global_batch", "head_hidden_dim",
                    "head_bottleneck_dim", "head_prototypes", "checkpoint_every", "probe_train_images",
                    "probe_held_out_images")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, found {getattr(self, name)}.")
        for name in ("layerscale_init", "lr", "student_temp", "clip_grad"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be > 0, found {getattr(self, name)}.")
        if self.embed_dim % self.num_heads:
            raise InputError(f"embed_dim {self.embed_dim} must be a multiple of num_heads {self.num_heads}.")
        for name in ("warmup_fraction", "teacher_temp_warmup_fraction", "freeze_last_layer_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InputError(f"{name} must lie in [0, 1), found {getattr(self, name)}.")
        if not 0.0 < self.max_held_out_fraction < 1.0:
            raise InputError(f"max_held_out_fraction must lie in (0, 1), found {self.max_held_out_fraction}; "
                             "to train on every image, train without the probe (probe=False, `--no-probe`).")
        for name in ("global_crop_scale", "local_crop_scale", "mask_ratio"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise InputError(f"{name} must be (low, high) with 0 < low <= high <= 1, found {getattr(self, name)}.")
        if self.local_crops < 0 or (self.local_crop_size is not None and
                                    (self.local_crop_size < PATCH or self.local_crop_size % PATCH)):
            raise InputError(f"local_crops must be >= 0 and local_crop_size a multiple of {PATCH} (or None); "
                             f"found {self.local_crops} and {self.local_crop_size}.")
        if self.lr_scaling not in LR_SCALING:
            raise InputError(f"lr_scaling must be one of {', '.join(map(str, LR_SCALING))}, found {self.lr_scaling!r}.")
        if not 0.0 <= (self.drop_path_rate or 0.0) < 1.0 or (self.weight_decay_end or 0.0) < 0.0:
            raise InputError(f"drop_path_rate must lie in [0, 1) and weight_decay_end be >= 0 (or None); found "
                             f"{self.drop_path_rate} and {self.weight_decay_end}.")
        check_precision(self.precision, allowed=TEACHER_PRECISIONS, why=" (fp16 would need a loss scaler)")
        if not 0.0 < self.momentum_start <= 1.0 or not 0.0 < self.warmup_teacher_temp <= self.teacher_temp:
            raise InputError("momentum_start must lie in (0, 1] and 0 < warmup_teacher_temp <= teacher_temp; found "
                             f"{self.momentum_start}, {self.warmup_teacher_temp}, {self.teacher_temp}.")

    @property
    def peak_lr(self) -> float:
        """The AdamW peak: ``lr`` scaled to ``global_batch`` by ``lr_scaling`` (DINOv2's rule)."""
        ratio = self.global_batch / 1024
        return self.lr * {None: 1.0, "sqrt_wrt_1024": ratio ** 0.5, "linear_wrt_1024": ratio}[self.lr_scaling]

    @property
    def arch(self) -> dict[str, int]:
        """The architecture overrides of ``dinov2_vitb14_reg`` (VFMSpec.arch, ``--vfm-arch``)."""
        return {"embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads}


@dataclass(frozen=True)
class TeacherResult:
    """What :func:`train_teacher` left in ``out_dir``.

    ``spec`` builds the trained teacher as a VFM (``spec.build(resolution)``); ``report`` is None when
    the run had no probe; ``trained`` is False when ``out_dir`` already held this finished run;
    ``resumed_from_step`` is the step training continued from, if it did.
    """

    out_dir: Path
    weights: Path
    spec: VFMSpec
    report: ProbeReport | None
    train_seconds: float
    trained: bool = True
    resumed_from_step: int | None = None


def teacher_spec(out_dir: str | Path) -> VFMSpec:
    """The :class:`VFMSpec` of the teacher in ``out_dir`` (read from its ``teacher.json``)."""
    return VFMSpec.from_teacher(out_dir)


def _teacher_spec(out_dir: Path, settings: TeacherSettings) -> VFMSpec:
    return VFMSpec(VFM_NAME, str(out_dir / WEIGHTS_FILE), None, settings.arch)


# --------------------------------------------------------------------------------------
# The networks
# --------------------------------------------------------------------------------------


def build_backbone(settings: TeacherSettings) -> MaskedVisionTransformerTIMM:
    """The DINOv2 ViT the teacher trains, seeded by ``settings.seed``, in lightly's masked wrapper,
    with stochastic depth ``drop_path_rate`` in every block (training only; the saved weights are the same).

    ``.vit`` is a :class:`DINOv2ViT` of ``dinov2_vitb14_reg``'s layout with ``settings.arch``
    (timm's initialisation, as DINOv2's); ``.mask_token`` (1, 1, D) starts at zero.
    """
    arch = replace(VFM_MODELS[VFM_NAME], **settings.arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        vit = DINOv2ViT(
            img_size=518, patch_size=PATCH, embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads,
            num_register_tokens=arch.num_register_tokens, swiglu=arch.swiglu,
            interpolate_offset=arch.interpolate_offset, interpolate_antialias=arch.interpolate_antialias,
        )
    if settings.drop_path_rate:  # DINOv2's drop_path_uniform: the same rate in every block (timm's rises)
        for block in vit.blocks:
            block.drop_path1, block.drop_path2 = DropPath(settings.drop_path_rate), DropPath(settings.drop_path_rate)
    with torch.no_grad():
        for block in vit.blocks:
            block.ls1.gamma.fill_(settings.layerscale_init)
            block.ls2.gamma.fill_(settings.layerscale_init)
    # skip lightly's MAE re-initialisation and sin-cos positions: keep DINOv2's init and learnt positions
    return MaskedVisionTransformerTIMM(vit, weight_initialization="skip", pos_embed_initialization="skip",
                                       antialias=arch.interpolate_antialias)


class SelfDistillation(nn.Module):
    """Backbone + DINO head, the student's or the teacher's: crops → CLS features and head logits."""

    def __init__(self, settings: TeacherSettings, *, freeze_last_layer_steps: int = 0):
        super().__init__()
        self.backbone = build_backbone(settings)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(settings.seed + 1)
            warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)  # lightly's head
            self.head = DINOProjectionHead(
                settings.embed_dim, settings.head_hidden_dim, settings.head_bottleneck_dim, settings.head_prototypes,
                freeze_last_layer=freeze_last_layer_steps,  # lightly counts "epochs"; we pass steps
            )

    def forward(self, global_crops: torch.Tensor, masks: torch.Tensor, local_crops: torch.Tensor | None = None,
                *, mask_input: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """global (2B, 3, G, G), masks (2B, g, g) bool, local (L·B, 3, l, l) →
        cls (2B, D) backbone CLS of the global crops, cls_logits (2B + L·B, K) of every crop's CLS,
        masked_logits (M, K) of the masked patch tokens (M = masks.sum()).

        ``mask_input``: replace the masked patches by the mask token (the student) or not (the teacher).
        """
        prefix = self.backbone.vit.num_prefix_tokens  # CLS + registers
        patch_mask = masks.flatten(1)  # (2B, g²)
        token_mask = torch.cat([patch_mask.new_zeros(len(masks), prefix), patch_mask], dim=1) if mask_input else None
        tokens = self.backbone.encode(global_crops, mask=token_mask)  # (2B, prefix + g², D)
        cls = tokens[:, 0]
        crops_cls = [cls]
        if local_crops is not None and len(local_crops):
            crops_cls.append(self.backbone.encode(local_crops)[:, 0])  # (L·B, D)
        masked = tokens[:, prefix:][patch_mask]  # (M, D)
        logits = self.head(torch.cat([*crops_cls, masked]))  # (2B + L·B + M, K)
        return cls, logits[: len(logits) - len(masked)], logits[len(logits) - len(masked):]


# --------------------------------------------------------------------------------------
# Crops and masks, index-addressed
# --------------------------------------------------------------------------------------


def crop_sizes(resolution: int, settings: TeacherSettings) -> tuple[int, int]:
    """(global, local) crop sides for R² images: the VFM input 224·R/256, and 14·round(3R/8 / 14)."""
    global_side = input_side(resolution, "dinov2")
    local_side = settings.local_crop_size or PATCH * max(1, round(3 * resolution / 8 / PATCH))
    return global_side, local_side


@contextlib.contextmanager
def _global_rngs_seeded(generator: torch.Generator) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global CPU generators from ``generator``; restore them after."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed CUDA too
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)


class CropViews(Dataset):
    """Item (epoch, row) → that row's multi-crop views and iBOT mask, from (seed, STEP_STREAM, epoch, row).

    Returns {"global": (2, 3, G, G), "local": (L, 3, l, l) float (ImageNet-normalised),
    "masks": (2, g, g) bool: one of the two global crops has round(U(mask_ratio)·g²) ≥ 1 random
    tokens masked, the other none}.
    """

    def __init__(self, images: Dataset, settings: TeacherSettings, resolution: int):
        self.images, self.seed, self.mask_ratio = images, settings.seed, settings.mask_ratio
        global_side, local_side = crop_sizes(resolution, settings)
        self.grid = global_side // PATCH
        self.local_side = local_side
        self.transform = DINOTransform(
            global_crop_size=global_side, global_crop_scale=settings.global_crop_scale,
            local_crop_size=local_side, local_crop_scale=settings.local_crop_scale, n_local_views=settings.local_crops,
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, row = key
        generator = seeded_generator(self.seed, STEP_STREAM, epoch, row)
        image = to_pil_image(self.images[row]["images"])  # uint8 (3, R, R) → PIL
        with _global_rngs_seeded(generator):
            views = self.transform(image)
        local = torch.stack(views[2:]) if len(views) > 2 else torch.zeros(0, 3, self.local_side, self.local_side)
        return {"global": torch.stack(views[:2]), "local": local, "masks": self._masks(generator)}

    def _masks(self, generator: torch.Generator) -> torch.Tensor:
        tokens = self.grid * self.grid
        low, high = self.mask_ratio
        ratio = low + (high - low) * torch.rand((), generator=generator).item()
        masked = torch.randperm(tokens, generator=generator)[: max(1, round(ratio * tokens))]
        masks = torch.zeros(2, tokens, dtype=torch.bool)
        masks[int(torch.randint(2, (), generator=generator)), masked] = True
        return masks.view(2, self.grid, self.grid)


def _view_major(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collated (B, V, ...) → (V·B, ...) with crop v of every image in rows [v·B, (v+1)·B): the chunks
    lightly's DINO loss compares. Returns global (2B, 3, G, G), masks (2B, g, g), local (L·B, 3, l, l)."""
    return tuple(batch[key].transpose(0, 1).flatten(0, 1) for key in ("global", "masks", "local"))


def split_rows(images: Images, settings: TeacherSettings) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows), each sorted. With the probe: ``probe_held_out_images`` rows held out,
    class-balanced and drawn from (seed, SPLIT_STREAM), at most ``max_held_out_fraction`` of each class
    (:func:`reglue.data.split.held_out_split`); without: every row is trained on."""
    if not settings.probe:
        return list(range(len(images))), []
    return held_out_split(image_labels(images), settings.probe_held_out_images, seed=settings.seed,
                          max_fraction=settings.max_held_out_fraction)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


class _TeacherTrainer:
    """One run: student, EMA teacher, losses, AdamW, the index-addressed loader; then steps."""

    def __init__(self, run: ResumableRun, images: Dataset, rows: list[int], settings: TeacherSettings,
                 resolution: int):
        self.run, self.accelerator, self.rows, self.settings = run, run.acc, rows, settings
        self.out_dir, self.config = run.out_dir, run.config
        self.steps_per_epoch = len(rows) // settings.global_batch
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.freeze_steps = math.floor(settings.freeze_last_layer_fraction * self.total_steps)
        self.progress = Position()
        device = run.acc.device
        self.autocast_dtype = autocast_dtype(settings.precision, device)  # None: fp32
        self.student = SelfDistillation(settings, freeze_last_layer_steps=self.freeze_steps).to(device)
        self.teacher = SelfDistillation(settings).to(device).requires_grad_(False)
        self.teacher.load_state_dict(self.student.state_dict())
        self.dino_loss = DINOLoss(settings.head_prototypes, teacher_temp=settings.teacher_temp,
                                  student_temp=settings.student_temp, center_momentum=settings.center_momentum).to(device)
        self.ibot_loss = IBOTPatchLoss(settings.head_prototypes, teacher_temp=settings.teacher_temp,
                                       student_temp=settings.student_temp,
                                       center_momentum=settings.center_momentum).to(device)
        self.koleo_loss = KoLeoLoss()
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([
            {"params": [p for p in trainable if p.ndim > 1], "weight_decay": settings.weight_decay},
            {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
        ], lr=settings.peak_lr)
        self.batches: list[list[tuple[int, int]]] = []  # each epoch's order, replaced in place
        self.loader = DataLoader(CropViews(images, settings, resolution), batch_sampler=self.batches,
                                 num_workers=settings.num_workers, persistent_workers=settings.num_workers > 0,
                                 generator=torch.Generator(), pin_memory=device.type == "cuda",
                                 worker_init_fn=ignore_stop_signals)

    @property
    def student_module(self) -> SelfDistillation:
        return self.accelerator.unwrap_model(self.student)

    def restore(self, state: dict) -> None:
        """Load a train_state.pt dict (before :meth:`prepare`)."""
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.dino_loss.load_state_dict(state["dino_loss"])
        self.ibot_loss.load_state_dict(state["ibot_loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Position(**state["progress"])
        self.run.restore_rng(state["rng"])

    def prepare(self) -> None:
        """DDP for the student on several processes; the loader shards its batches itself."""
        self.student, self.optimizer = self.accelerator.prepare(self.student, self.optimizer)

    def checkpoint(self) -> None:
        """Write train_state.pt (:meth:`ResumableRun.save_state`); every process must call it."""
        self.run.save_state(self.progress.global_step, {
            "student": _cpu_state(self.student_module), "teacher": _cpu_state(self.teacher),
            "dino_loss": _cpu_state(self.dino_loss), "ibot_loss": _cpu_state(self.ibot_loss),
            "optimizer": self.optimizer.state_dict(), "progress": dict(vars(self.progress)),
        })

    def schedules(self, step: int) -> dict[str, float]:
        """lr (warmup + cosine to the peak of ``lr_scaling``), weight decay (cosine to ``weight_decay_end``,
        if set), teacher EMA momentum (cosine to 1), teacher temperature (linear warmup)."""
        s = self.settings
        warmup = math.floor(s.warmup_fraction * self.total_steps)
        decay = {} if s.weight_decay_end is None else {
            "weight_decay": cosine_schedule(step, self.total_steps, s.weight_decay, s.weight_decay_end)}
        return {
            "lr": cosine_warmup_schedule(step, self.total_steps, s.peak_lr, s.min_lr, warmup, 0.0), **decay,
            "momentum": cosine_schedule(step, self.total_steps, s.momentum_start, 1.0),
            "teacher_temp": linear_warmup_schedule(step, math.floor(s.teacher_temp_warmup_fraction * self.total_steps),
                                                   s.warmup_teacher_temp, s.teacher_temp),
        }

    def autocast(self) -> torch.autocast:
        """The forward passes' autocast at ``settings.precision`` (``auto`` decided for the device once, when
        the trainer is built). Not accelerate's mixed precision: its state is one per process, and the demo
        trains other networks in float32 in the same process."""
        dtype = self.autocast_dtype
        return torch.autocast(self.accelerator.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def losses(self, batch: dict[str, torch.Tensor], teacher_temp: float) -> dict[str, torch.Tensor]:
        """The DINOv2 loss terms of one batch (module doc); "total" is their weighted sum."""
        device = self.accelerator.device
        global_crops, masks, local_crops = (t.to(device, non_blocking=True) for t in _view_major(batch))
        crops = 2 + len(local_crops) // (len(global_crops) // 2)
        with torch.no_grad(), self.autocast():
            _, teacher_cls, teacher_masked = (t.float() for t in self.teacher(global_crops, masks, mask_input=False))
        with self.autocast():
            cls, student_cls, student_masked = (t.float() for t in self.student(global_crops, masks, local_crops))
        dino = self.dino_loss(teacher_cls.chunk(2), student_cls.chunk(crops), teacher_temp=teacher_temp)
        ibot = self.ibot_loss(teacher_masked, student_masked, masks, teacher_temp=teacher_temp)
        koleo = sum(self.koleo_loss(crop) for crop in cls.chunk(2))
        s = self.settings
        return {"total": dino + s.ibot_weight * ibot + s.koleo_weight * koleo, "dino": dino, "ibot": ibot,
                "koleo": koleo}

    def train_step(self, batch: dict[str, torch.Tensor], metrics: MetricsLogger) -> float:
        p, acc = self.progress, self.accelerator
        schedule = self.schedules(p.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = schedule["lr"]
        if "weight_decay" in schedule:
            self.optimizer.param_groups[0]["weight_decay"] = schedule["weight_decay"]  # the >= 2-D parameters
        terms = self.losses(batch, schedule["teacher_temp"])
        self.optimizer.zero_grad(set_to_none=True)
        acc.backward(terms["total"])
        self.student_module.head.cancel_last_layer_gradients(p.global_step)
        acc.clip_grad_norm_(self.student.parameters(), self.settings.clip_grad)
        self.optimizer.step()
        with torch.no_grad():
            update_momentum(self.student_module, self.teacher, schedule["momentum"])
        values = acc.reduce(torch.stack([t.detach() for t in terms.values()]), "mean").tolist()
        p.advance()
        metrics.log(p.global_step, {**{f"loss/{k}": v for k, v in zip(terms, values)}, **schedule})
        return values[0]

    def train_epoch(self, bar, metrics: MetricsLogger) -> None:
        p = self.progress
        rows = self.run.epoch_batches(p, len(self.rows), self.settings.global_batch, self.settings.seed)
        self.batches[:] = [[(p.epoch, self.rows[i]) for i in batch] for batch in rows]
        self.student.train()
        for batch in self.loader:
            loss = self.train_step(batch, metrics)
            self.run.after_step(p, loss, bar, checkpoint_every=self.settings.checkpoint_every,
                                checkpoint=self.checkpoint)
        p.next_epoch()


# --------------------------------------------------------------------------------------
# Files: weights, the record, the report
# --------------------------------------------------------------------------------------


def save_teacher_weights(path: Path, backbone: MaskedVisionTransformerTIMM) -> None:
    """The backbone in the official DINOv2 layout (plain tensors, ``torch.load(weights_only=True)``)."""
    timm_layout = {k: v.detach().cpu().contiguous() for k, v in backbone.vit.state_dict().items()}
    official = timm_to_dinov2(timm_layout, mask_token=backbone.mask_token.detach().cpu())
    with atomic_write(path) as tmp:
        torch.save(official, tmp)


def _probe_features(images: Images, train_rows: list[int], held_out: list[int], trained: VFMExtractor,
                    untrained: VFMExtractor, settings: TeacherSettings) -> ProbeFeatures:
    """The probe's features of the trained and the untrained network, capped by ``settings``
    (:func:`reglue.metrics.vfm_probe.probe_features`; every process calls this, as a collective)."""
    return probe_features(images, train_rows, held_out, {"trained": trained, "untrained": untrained},
                          train_images=settings.probe_train_images, held_out_images=settings.probe_held_out_images,
                          seed=settings.seed)


def _probe(features: ProbeFeatures) -> ProbeReport:
    """k-NN / linear-probe accuracy and LDS / CDS of the trained and untrained networks (on their device)."""
    scores = score(features)
    return ProbeReport(scores["trained"], scores["untrained"], features.num_classes, len(features.train_labels),
                       len(features.held_out_labels), grid=features.grid)


def _untrained_extractor(settings: TeacherSettings, resolution: int) -> VFMExtractor:
    """The teacher's architecture with its initial weights (the same seed), as a VFM."""
    weights = {k: v.detach() for k, v in build_backbone(settings).vit.state_dict().items()}
    return build_vfm(VFM_NAME, weights=weights, resolution=resolution, **settings.arch)


def _report_details(config: dict, train_seconds: float, steps: int, global_side: int) -> dict[str, object]:
    s, data = config["settings"], config["data"]
    images_per_s = steps * s["global_batch"] / train_seconds if train_seconds > 0 else float("nan")
    return {
        "architecture": f"DINOv2 ViT, patch 14, 4 registers, embed_dim {s['embed_dim']}, depth {s['depth']}, "
                        f"{s['num_heads']} heads",
        "data": f"{data['images']} images at {data['resolution']}² ({data['train_images']} trained on)",
        "crops": f"2 global {global_side}² + {s['local_crops']} local (scales {s['global_crop_scale']} / "
                 f"{s['local_crop_scale']})",
        "budget": f"{s['epochs']} epochs, {steps} steps of {s['global_batch']} images",
        "training time": f"{train_seconds:.1f} s ({images_per_s:.1f} images/s, {steps / train_seconds:.2f} steps/s)"
                         if train_seconds > 0 else "n/a",
        "losses": f"DINO + {s['ibot_weight']}·iBOT + {s['koleo_weight']}·KoLeo; lr {s['lr']}, "
                  f"{s['head_prototypes']} prototypes, teacher temp {s['warmup_teacher_temp']} → {s['teacher_temp']}",
        "seed": s["seed"],
    }


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------


def _check_data(images: Images, train_rows: list[int], held_out: list[int], settings: TeacherSettings,
                num_processes: int) -> None:
    if settings.probe and images.num_classes < 2:
        raise InputError(
            f"{images.root} has {images.num_classes} class(es) of labels; the quality probe needs at least two. "
            "Use labelled data (class sub-folders), or train without the probe (probe=False, `--no-probe`)."
        )
    if settings.probe and not held_out:
        raise InputError(
            f"max_held_out_fraction {settings.max_held_out_fraction} of each class of the {len(images)} images "
            f"holds none out for the probe (a class needs at least {math.ceil(1 / settings.max_held_out_fraction)} "
            "images when the fraction is above 0); raise it (`--max-held-out-fraction`), use more images, or train "
            "without the probe (probe=False, `--no-probe`)."
        )
    if len(train_rows) < settings.global_batch:
        raise InputError(
            f"{len(train_rows)} training images ({len(images)} in {images.root}, {len(held_out)} held out for the "
            f"probe) make no full batch of {settings.global_batch}; lower global_batch (`--batch-size`) to at most "
            f"{len(train_rows) // num_processes * num_processes}, or use more images."
        )


def _finished_run(run: ResumableRun) -> TeacherResult | None:
    """The run in ``out_dir`` if it finished (its teacher.json exists); refuses other settings."""
    out_dir, saved = run.out_dir, run.finished(INFO_FILE)
    if saved is None:
        return None
    report_path = out_dir / REPORT_JSON
    report = ProbeReport.from_json(json.loads(report_path.read_text())) if report_path.is_file() else None
    return TeacherResult(out_dir, out_dir / saved["weights"], VFMSpec.from_teacher(out_dir), report,
                         saved["train_seconds"], trained=False)


def probe_teacher(out_dir: str | Path, data: str | Path, *, out: str | Path | None = None,
                  probe_train_images: int | None = None, probe_held_out_images: int | None = None,
                  device: str | torch.device = "cpu") -> ProbeReport:
    """Run the quality probe of the finished teacher in ``out_dir`` again, on ``data``: the images it was
    trained on (the same count and source files, so the seeded held-out split is the same one), with its
    own settings or other caps. Writes ``report.json`` / ``report.md`` into ``out`` (default ``out_dir``)."""
    out_dir = Path(out_dir)
    path = out_dir / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {out_dir} holds no finished teacher (`reglue train-vfm DATA "
                                f"--out {out_dir}` makes one).")
    info = json.loads(path.read_text())
    recorded = info["config"]["settings"]
    if "held_out_fraction" in recorded:
        raise InputError(f"the teacher in {out_dir} was trained by an older reglue, which held out "
                         f"held_out_fraction {recorded['held_out_fraction']} of the images by another split; this "
                         "version cannot tell which images it was trained on. Train it again (`reglue train-vfm "
                         "--restart`) to probe it.")
    trained_with = TeacherSettings(**{f.name: recorded[f.name] for f in fields(TeacherSettings) if f.name in recorded})
    caps = {"probe_train_images": probe_train_images, "probe_held_out_images": probe_held_out_images}
    settings = replace(trained_with, **{k: v for k, v in caps.items() if v is not None})
    images, resolution = open_images(data, info["resolution"], command="train-vfm")
    trained_on = {key: info["config"]["data"].get(key) for key in ("images", "source_files", "source_sha256")}
    found = {"images": len(images), **_source_record(images)}
    if found != trained_on:
        raise InputError(f"{data} is not the data the teacher in {out_dir} was trained on ({trained_on['images']} "
                         f"images, recorded in its {INFO_FILE}; found {len(images)}): its held-out split would differ. "
                         "Pass the dataset or image folder it was trained on.")
    train_rows, held_out = split_rows(images, trained_with)  # the split it was trained with; the caps subset it
    if not held_out:
        raise InputError(f"the teacher in {out_dir} was trained on every image (--no-probe): no image is left to "
                         "score it on. Train it with the probe to probe it.")
    device = torch.device(device)
    trained = VFMSpec.from_teacher(out_dir).build(resolution).to(device)
    report = _probe(_probe_features(images, train_rows, held_out, trained,
                                    _untrained_extractor(settings, resolution).to(device), settings))
    out = Path(out) if out is not None else out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, report, title=REPORT_TITLE,
                 details=_report_details(info["config"], info["train_seconds"], info["steps"], info["input_size"]))
    return report


def _source_record(images: Images) -> dict:
    """Which source files the images come from (``source_files``, ``source_sha256``), the same for an image
    folder and the dataset prepared from it, so a resume over other files of the same count is refused."""
    if isinstance(images, ImageSourceDataset):
        return images.fingerprint
    recorded = images.records.settings  # read when the dataset was opened
    return {key: recorded.get(key) for key in ("source_files", "source_sha256")}


def _describe_source(images: ImageSourceDataset) -> str:
    """The log line of an image folder: what was read, skipped (with the first few names) and ignored."""
    shown = "; ".join(f"{s['path']} ({s['reason']})" for s in images.skipped[:SHOWN_SKIPS])
    more = "; …" if len(images.skipped) > SHOWN_SKIPS else ""
    return (f"{images.root}: {len(images)} images cropped to {images.resolution}² on access, {images.num_classes} "
            f"classes; skipped {len(images.skipped)} unreadable or too-small file(s)"
            f"{f': {shown}{more}' if shown else ''}; ignored {images.ignored} file(s) without an image extension")


def train_teacher(
    data_dir: str | Path,
    out_dir: str | Path,
    settings: TeacherSettings,
    *,
    resolution: int | None = None,
    progress: bool = True,
    resume: bool = True,
    log: Callable[[str], object] = _logger.info,
) -> TeacherResult:
    """Train a DINOv2-with-registers teacher on a ``reglue prepare`` directory or an image folder or zip
    (see the module doc; ``resolution`` as in :func:`reglue.data.image_rows.open_images`).

    ``resume`` continues from ``out_dir/train_state.pt`` or returns a finished run unchanged (other
    settings are refused); ``resume=False`` deletes this run's files in ``out_dir`` and starts over.
    ``log`` gets a few lines (main process only); the progress bar shows the step loss.
    """
    process_state()  # the process group, with the collective timeout every command uses
    accelerator = Accelerator(mixed_precision="no", cpu=on_cpu_only())  # autocast: TeacherSettings.precision
    per_process_batch(settings.global_batch, accelerator.num_processes)
    log = main_process_log(log, accelerator.is_main_process)
    images, resolution = open_images(data_dir, resolution, command="train-vfm")  # a folder's files: checked once
    if isinstance(images, ImageSourceDataset):
        log(_describe_source(images))
    train_rows, held_out = split_rows(images, settings)
    _check_data(images, train_rows, held_out, settings, accelerator.num_processes)
    config = {"settings": asdict(settings), "data": {
        "resolution": resolution, "images": len(images), "train_images": len(train_rows),
        "held_out_images": len(held_out), "num_classes": images.num_classes, **_source_record(images)}}
    run = ResumableRun(out_dir, config, accelerator, name="the teacher", owner="a teacher", kind=STATE_KIND,
                       fix=RESTART_FIX, free=FREE_SETTINGS)
    out_dir = run.out_dir
    if resume and (done := _finished_run(run)) is not None:
        log(f"{out_dir} already holds this teacher; not retraining.")
        return done
    state = run.load_state() if resume else None
    trainer = _TeacherTrainer(run, images, train_rows, settings, resolution)
    resumed_from = None
    if state is not None:
        trainer.restore(state)
        resumed_from = trainer.progress.global_step
        log(f"resuming the teacher run in {out_dir} at step {resumed_from}")

    def make_room() -> None:
        run.start_over(_RUN_FILES if state is None else ())  # starting over: no earlier file may pass for ours
        if isinstance(images, ImageSourceDataset):
            store.write_skipped(out_dir / SKIPPED_FILE, images.skipped)
            if images.skipped:
                log(f"the {len(images.skipped)} skipped file(s) and why: {out_dir / SKIPPED_FILE}")

    on_main(f"preparing {out_dir}", make_room)
    trainer.prepare()
    _train(trainer, progress=progress, resumed_from=resumed_from, log=log)
    on_main(f"exporting the teacher to {out_dir / WEIGHTS_FILE}",
            lambda: save_teacher_weights(out_dir / WEIGHTS_FILE, trainer.teacher.backbone))
    features = None
    if settings.probe:  # every process extracts its share of the probe's features from the exported weights
        device = accelerator.device
        features = _probe_features(images, train_rows, held_out, _teacher_spec(out_dir, settings).build(resolution)
                                   .to(device), _untrained_extractor(settings, resolution).to(device), settings)
    # the report and the training time are known to the main process, which writes the files
    report, train_seconds = on_main(f"exporting and probing the teacher in {out_dir}", lambda: _finish(
        trainer, features, resolution, log)) or (None, 0.0)
    return TeacherResult(out_dir, out_dir / WEIGHTS_FILE, _teacher_spec(out_dir, settings), report, train_seconds,
                         resumed_from_step=resumed_from)


def _train(trainer: _TeacherTrainer, *, progress: bool, resumed_from: int | None, log) -> None:
    run, s, p = trainer.run, trainer.settings, trainer.progress
    log(f"training a DINOv2 teacher (embed {s.embed_dim}, depth {s.depth}, {s.num_heads} heads) on "
        f"{len(trainer.rows)} images: {s.epochs} epochs × {trainer.steps_per_epoch} steps of {s.global_batch}")
    metrics = run.open_metrics(resume_step=resumed_from, tensorboard=s.tensorboard)
    bar = run.progress_bar(total=trainer.total_steps, initial=p.global_step, desc="teacher", enabled=progress)
    with run.stop.installed(), metrics, bar:
        while p.epoch < s.epochs:
            trainer.train_epoch(bar, metrics)
    if p.global_step % s.checkpoint_every:
        trainer.checkpoint()


def _finish(trainer: _TeacherTrainer, features: ProbeFeatures | None, resolution: int, log
            ) -> tuple[ProbeReport | None, float]:
    """Loss curves, the probe report (from the gathered ``features``, None without a probe), then teacher.json
    (written last: the run is finished).

    Returns the report (None without a probe) and the training time in seconds."""
    out_dir, settings = trainer.out_dir, trainer.settings
    global_side, _ = crop_sizes(resolution, settings)
    records = read_metrics(out_dir)
    train_seconds = records[-1]["wall_time_s"] if records else 0.0
    plot_run(out_dir, smoothing=max(1, trainer.total_steps // 50))
    report = None
    if features is not None:
        report = _probe(features)
        write_report(out_dir, report, title=REPORT_TITLE,
                     details=_report_details(trainer.config, train_seconds, trainer.total_steps, global_side))
        (log if report.passed else _logger.warning)(f"teacher probe {report.verdict}")
    write_json(out_dir / INFO_FILE, {
        "vfm": VFM_NAME, "arch": settings.arch, "resolution": resolution, "weights": WEIGHTS_FILE,
        "input_size": global_side, "steps": trainer.total_steps,
        "train_seconds": train_seconds, "config": trainer.config,
    })
    log(f"teacher written to {out_dir / WEIGHTS_FILE} ({train_seconds:.0f} s of training)")
    return report, train_seconds
