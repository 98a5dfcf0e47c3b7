"""What ``reglue compare`` computes (:class:`CompareSettings`) and where each stage writes
(:class:`ComparePaths`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from reglue.errors import InputError
from reglue.pipeline import OFFICIAL_NORM_STATS_IMAGES
from reglue.precision import check as check_precision
from reglue.presets import PRESETS, get_preset

ALL_PRESETS = ("sit", "repa", "redi", "reg", "reglue")  # the paper's Table 1 order
EVALUATIONS = 4  # per run by default: at a quarter, half, three quarters and the end of its steps
# RunConfig keys each run's config takes from the comparison itself, never from ``run``
OWNED_KEYS = ("run_dir", "model.preset", "data.dir", "data.semantics", "train.seed", "eval")
# the kinds of data copy, in the order they are made: which VFM arrays their cache holds
COPY_KINDS = ("compressor", "targets", "pca", "plain")


@dataclass(frozen=True, kw_only=True)
class CompareSettings:
    """What a comparison computes; a rerun into the same folder must match.

    ``run``: :class:`~reglue.config.RunConfig` keys shared by every run (model size, steps, batch, lr,
    loss weights, checkpointing, ...; nested as in a run config). ``eval``: :class:`~reglue.config.EvalConfig`
    keys over the comparison's defaults (:func:`reglue.compare.stages.eval_config`). ``compressor``:
    :class:`~reglue.training.compressor.CompressorSettings` keys of REGLUE's compressor. ``vfm``: the
    VFM's :class:`~reglue.encoders.semantics.VFMSpec` fields, or ``{"weights": TEACHER_DIR}`` for a
    ``reglue train-vfm`` folder; it makes every semantic cache and, unless ``eval.vfm`` says otherwise,
    the evaluation space."""

    presets: tuple[str, ...] = ALL_PRESETS
    seeds: int = 3  # training runs per preset: seeds seed, seed+1, ...
    seed: int = 0  # the first training seed; also the seed of the compressor, evaluations and grids
    vfm: dict | None = None
    run: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    compressor: dict = field(default_factory=dict)
    vfm_precision: str = "auto"  # autocast of the frozen VFM in the cache stages (fp32 on CPUs)
    norm_stats_images: int = OFFICIAL_NORM_STATS_IMAGES  # the authors' 300 × 256 (all images if fewer)
    pca_images: int = 10_000  # images behind ReDi's PCA (all if fewer)
    grid_rows: int = 4  # samples per class in each preset's grid
    grid_classes: int = 8  # the first classes shown in the grids
    grid_steps: int = 25  # sampler steps of the grids (SDE)
    grid_cfg: float = 4.0  # guidance scale of the grids

    def __post_init__(self) -> None:
        object.__setattr__(self, "presets", tuple(self.presets))
        unknown = [p for p in self.presets if p not in PRESETS]
        if not self.presets or unknown or len(set(self.presets)) != len(self.presets):
            raise InputError(f"presets must be distinct names from {', '.join(PRESETS)}, found {list(self.presets)}.")
        for name in ("seeds", "norm_stats_images", "pca_images", "grid_rows", "grid_classes", "grid_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, found {getattr(self, name)}.")
        check_precision(self.vfm_precision, key="vfm_precision")
        owned = [key for key in OWNED_KEYS if _has_key(self.run, key)]
        if owned:
            raise InputError(f"run.{owned[0]} is set by the comparison itself (each run's folder, preset, data copy, "
                             "seed and evaluation); remove it from run (evaluation settings go under eval).")
        if self.uses_vfm and self.vfm is None:
            raise InputError(f"presets {', '.join(p for p in self.presets if uses_vfm(p))} read the VFM: give its "
                             "weights (--vfm-weights FILE, or a `reglue train-vfm` folder) or set vfm.")

    @property
    def run_seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + k for k in range(self.seeds))

    @property
    def uses_vfm(self) -> bool:
        return any(map(uses_vfm, self.presets))

    @property
    def copies(self) -> tuple[str, ...]:
        """The data copies the presets train on (:data:`COPY_KINDS`, :func:`copy_of`), in that order."""
        needed = {copy_of(p, self.presets) for p in self.presets}
        return tuple(kind for kind in COPY_KINDS if kind in needed)

    def to_json(self) -> dict:
        return {**asdict(self), "presets": list(self.presets)}


def uses_vfm(preset: str) -> bool:
    """Whether ``preset`` reads anything from the VFM (semantics, CLS or REPA targets)."""
    p = get_preset(preset)
    return bool(p.semantics or p.cls_token or p.repa)


def copy_of(preset: str, presets: tuple[str, ...]) -> str:
    """The data copy ``preset`` trains on among those of ``presets``: its semantics' own (``compressor``,
    ``pca``); for CLS / REPA targets alone the compressor's copy when there is one (its cache holds them),
    else ``targets``; a preset without the VFM shares the first copy with VFM arrays (evaluation caches
    are kept per copy), or ``plain`` when no preset uses the VFM."""
    p = get_preset(preset)
    if p.semantics is not None:
        return p.semantics
    kinds = {get_preset(q).semantics for q in presets if uses_vfm(q)}
    if uses_vfm(preset) or kinds:
        if "compressor" in kinds:
            return "compressor"
        if uses_vfm(preset) or None in kinds:
            return "targets"
        return "pca"
    return "plain"


def evaluation_every(steps: int) -> int:
    """The default ``eval.every`` of a run of ``steps`` steps: EVALUATIONS evaluations when 4 divides
    ``steps`` (the trainer also evaluates at the last step)."""
    return max(1, steps // EVALUATIONS)


def _has_key(tree: dict, dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    if head not in tree:
        return False
    return not rest or (isinstance(tree[head], dict) and _has_key(tree[head], rest))


@dataclass(frozen=True)
class ComparePaths:
    """Where each stage writes, under the output folder ``out``."""

    out: Path

    @property
    def semantics(self) -> Path:
        """Norm stats, the compressor's folder and the PCA file, fitted on the data once."""
        return self.out / "semantics"

    def norm_stats(self, kind: str) -> Path:
        """The norm stats behind the copy ``kind``'s cache: ReDi's (``pca``) are of its own VFM blocks."""
        return self.semantics / ("norm_stats-pca.safetensors" if kind == "pca" else "norm_stats.safetensors")

    @property
    def compressor(self) -> Path:
        return self.semantics / "compressor"

    @property
    def pca(self) -> Path:
        return self.semantics / "pca.safetensors"

    def copy(self, kind: str) -> Path:
        """The data copy of ``kind`` (:data:`COPY_KINDS`): the data's files linked, its own cache."""
        return self.out / "datasets" / kind

    def run(self, preset: str, seed: int) -> Path:
        return self.out / "runs" / preset / f"seed-{seed}"

    def grid(self, preset: str) -> Path:
        return self.out / f"grid_{preset}.png"
