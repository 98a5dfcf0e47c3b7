"""What a demo computes: :class:`DemoSettings`, the fixed model and training choices, and where
each stage writes (:class:`DemoPaths`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from reglue.compare.settings import uses_vfm
from reglue.data.synthetic import SYNTHETIC_SETS, class_names
from reglue.encoders.semantics import VFMSpec
from reglue.errors import InputError
from reglue.presets import PRESETS
from reglue.resolution import check_resolution

TEACHERS = ("trained", "random")  # --random-vfm selects "random": plumbing checks only
RANDOM_VFM = VFMSpec("dinov2_vitb14_reg", "random", None, {"embed_dim": 32, "depth": 4, "num_heads": 2})
RANDOM_VFM_LABEL = "tiny DINOv2-with-registers (embed 32, depth 4, 2 heads), random and untrained"
AUTOENCODER_LABEL = "pixel autoencoder (no weights: 8x8 block means of RGB + luminance)"
MODEL = {"name": "SiT-S/2", "depth": 4, "hidden_size": 64, "num_heads": 4, "encoder_depth": 2,
         "projector_dim": 256}  # patch 2: (R/16)² tokens, the grid of the VFM's REPA targets
TRAIN_BATCH = 8  # on a CPU, more small steps beat fewer large ones at equal cost (tried 16 × 900 vs 8 × 1800)
LEARNING_RATE = 2e-3
EMA_DECAY = 0.995
COMPRESSOR = {"widths": (64, 16), "global_batch": 32, "lr": 1e-3, "val_fraction": 0.125}  # widths after the VFM's
SAMPLER = "sde"


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """What the demo computes; a rerun into the same folder must match."""

    presets: tuple[str, ...] = ("reglue",)
    seeds: int = 1  # training runs per preset, seeds seed, seed+1, ...; data, teacher and evaluation stay fixed
    steps: int = 1500  # training steps per run
    # The built-in synthetic set (reglue.data.synthetic). "colours": on "shapes" a teacher trained for
    # 40 epochs (4 min) does not beat the untrained network (docs/demo.md), on "colours" 15 epochs do.
    data: str = "colours"
    images_per_class: int = 40
    teacher: str = "trained"  # or "random" (plumbing checks)
    teacher_epochs: int = 15
    compressor_epochs: int = 2
    sample_steps: int = 25
    eval_samples: int = 64  # samples per evaluation during training (the same noise and labels every time)
    grid_rows: int = 4  # samples per class in the grid
    cfg_scale: float = 4.0
    seed: int = 0
    # Images are drawn and trained at 128²: 16×16 latents, 8×8 tokens, a 112² VFM input. A step
    # costs about a quarter of 256²'s (docs/demo.md), and at 16×16 the pixel autoencoder still
    # keeps every class's shape; 64² (8×8 latents) blurs triangles into blobs.
    resolution: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "presets", tuple(self.presets))
        unknown = [p for p in self.presets if p not in PRESETS]
        if not self.presets or unknown or len(set(self.presets)) != len(self.presets):
            raise InputError(f"presets must be distinct names from {', '.join(PRESETS)}, found {list(self.presets)}.")
        counts = {"seeds": self.seeds, "steps": self.steps, "teacher_epochs": self.teacher_epochs,
                  "compressor_epochs": self.compressor_epochs, "sample_steps": self.sample_steps,
                  "eval_samples": self.eval_samples, "grid_rows": self.grid_rows}
        for name, value in counts.items():
            if value < 1:
                raise InputError(f"{name} must be >= 1, found {value}.")
        if self.data not in SYNTHETIC_SETS:
            raise InputError(f"data must be one of {', '.join(SYNTHETIC_SETS)}, found {self.data!r}.")
        if self.teacher not in TEACHERS:
            raise InputError(f"teacher must be one of {TEACHERS}, found {self.teacher!r}.")
        if self.images_per_class < 8:
            raise InputError(f"images_per_class must be >= 8 (the teacher and the compressor each hold "
                             f"some out), found {self.images_per_class}.")
        check_resolution(self.resolution)

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names in label order: the prepared data's, i.e. the image folders' sorted names."""
        return tuple(sorted(class_names(self.data)))

    @property
    def num_images(self) -> int:
        return len(self.classes) * self.images_per_class

    @property
    def run_seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + k for k in range(self.seeds))

    @property
    def uses_vfm(self) -> bool:
        return any(map(uses_vfm, self.presets))

    def to_json(self) -> dict:
        return {**asdict(self), "presets": list(self.presets)}


def quick(settings: DemoSettings) -> DemoSettings:
    """``--quick``: the same protocol at about a third of the cost (at most 400 steps, 2 seeds and 32
    evaluation samples); data and teacher stay as they are."""
    return replace(settings, steps=min(settings.steps, 400), seeds=min(settings.seeds, 2),
                   eval_samples=min(settings.eval_samples, 32))


@dataclass(frozen=True)
class DemoPaths:
    """Where each stage writes, under the output folder ``out``."""

    out: Path

    @property
    def images(self) -> Path:
        return self.out / "images"

    @property
    def teacher(self) -> Path:
        return self.out / "teacher"

    @property
    def data(self) -> Path:
        """The prepared data (the comparison's stages link it into ``datasets/<kind>`` for their caches)."""
        return self.out / "data"
