"""Typed settings: dataclasses, loaded from YAML, overridden from the command line.

One mechanism for every command that has settings (docs/configuration.md):
``load_settings(TeacherSettings, "configs/teacher/vitb.yaml", ["lr=1e-3"])`` reads the file, applies the
command's flag shortcuts and the ``KEY=VALUE`` overrides, and builds the dataclass, refusing unknown keys,
wrong types and renamed keys with an error naming the key and the fix. ``load_config`` does the same for a
training run's :class:`RunConfig` and checks its cross-field rules; the run directory stores the resolved
config (``config.yaml``), every other command its resolved settings (:func:`save_settings`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reglue.distributed import DEFAULT_TIMEOUT_S
from reglue.ema import EMA_UPDATES
from reglue.encoders.semantics import VFMSpec
from reglue.errors import InputError
from reglue.io import atomic_write
from reglue.models.sit import ATTENTION_KERNELS, SIT_MODELS
from reglue.precision import PRECISIONS
from reglue.presets import PRESETS
from reglue.resolution import RESOLUTIONS
from reglue.sampling import Guidance
from reglue.settings import flatten_settings
from reglue.transport import lambda_sem_milestones

# keys of older configs -> (the key now, how the values changed); an old key is refused naming the new one
RENAMED_KEYS = {"train.mixed_precision": ("train.precision", "no is now fp32"),
                "data.vfm_autocast": ("data.vfm_precision", "no is now fp32")}
# keys added later whose default is not None -> what a run recorded before them did (upgrade_recorded)
ADDED_KEYS = {"loss.semantic_norm": False}
# fd: Fréchet distance in eval.vfm's feature space (eval/fd_dinov2 for DINOv2 ViT-L/14, else eval/fd_<network>);
# pr: precision / recall in that space; fid: Inception FID (needs eval.inception);
# class_accuracy: share of samples a linear probe on that space's CLS features, fitted on the (labelled) reference
# images, assigns their label.
EVAL_METRICS = ("fd", "pr", "fid", "class_accuracy")
# keys of older configs that nothing reads any more: null is dropped, a value refused with the reason
RETIRED_KEYS = {"eval.classifier": "class_accuracy is a linear probe on eval.vfm's CLS features now, fitted on the "
                                   "reference images and cached beside their features; no classifier file is needed"}
SEMANTICS_SOURCES = ("cached", "online")
SAMPLE_MODES = ("sde", "ode")
# option -> (the package it needs, the install that brings it); checked when a config is validated
OPTIONAL_PACKAGES = {"log.wandb": ("wandb", 'pip install "reglue[wandb]"'),
                     "log.tensorboard": ("tensorboard", "pip install tensorboard")}


class ConfigError(InputError):
    """A configuration value that cannot work; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str = "SiT-B/2"  # a registered size, see `reglue models`
    preset: str = "reglue"  # sit | repa | redi | reg | reglue
    encoder_depth: int | None = None  # REPA alignment block; None: the size's default (4 B, 8 L/XL)
    qk_norm: bool = False
    attention: str = "sdpa"  # sdpa (fused kernels) | math (explicit softmax(q·kᵀ)·v, the authors'); same weights
    class_dropout_prob: float = 0.1
    init_from: str | None = None  # the authors' .pt checkpoint: start a fresh run from its model/EMA weights
    depth: int | None = None  # size overrides for small demo/test models; None: the size's value
    hidden_size: int | None = None
    num_heads: int | None = None
    projector_dim: int | None = None  # REPA projector width; None: the paper's 2048 (smaller for CPU demos)


@dataclass
class DataConfig:
    dir: str = ""  # a `reglue prepare` directory
    resolution: int | None = None  # a check: the side DIR was prepared at (null: whatever its manifest says)
    semantics: str = "cached"  # cached (from `reglue cache-semantics`) | online (VFM every step)
    norm_stats: str | None = None  # online: default DIR/norm_stats.safetensors (records the VFM)
    compressor: str | None = None  # online REGLUE: compressor weights
    pca: str | None = None  # online ReDi: PCA file
    vfm_precision: str = "bf16"  # precision of the frozen VFM in online mode (fp32 | bf16 | fp16)
    vfm: dict | None = None  # the VFM the run expects ({name, weights, layers, arch}); null: the one that made the data
    vae: str | None = None  # the VAE previews and evaluations decode with; null: the manifest's (the data's own VAE)
    images_per_class: int | None = None  # class-balanced subset: at most this many per class
    fraction: float | None = None  # class-balanced subset: this share of every class
    unconditional: bool = False  # ignore labels: every sample gets the null label
    num_workers: int = 4
    pin_memory: bool = True  # page-locked host batches (GPU runs only): faster, asynchronous copies
    verify: bool = False  # check every file's checksum before training (`reglue verify`; sizes are always checked)


@dataclass
class LossConfig:
    path: str = "linear"  # linear | cosine
    time_sampling: str = "uniform"  # uniform | lognormal
    lambda_sem: float | None = None  # None: the preset's weight
    lambda_cls: float | None = None
    lambda_rep: float | None = None
    lambda_sem_schedule: list = field(default_factory=list)  # [[step, factor], ...]
    # standardise the semantic channels and CLS targets per channel with statistics measured at the start of a
    # fresh run and saved with the model (reglue.models.semantic_norm); false: the authors' targets
    semantic_norm: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    global_batch: int = 256  # = per-device batch × devices × grad_accum
    grad_accum: int = 1
    max_steps: int = 400_000
    precision: str = "bf16"  # autocast of the SiT step: fp32 | bf16 | fp16 (fp16 adds a grad scaler)
    tf32: bool = True
    compile: bool = False  # torch.compile each SiT block
    fused_optimizer: bool = True  # fused AdamW kernel; false: the authors' per-parameter loop
    ema: str = "foreach"  # foreach (one fused lerp) | loop (the authors' per-parameter update)
    find_unused_parameters: bool = False  # DDP's per-step search for unused parameters (the authors': true)
    ema_decay: float = 0.9999
    seed: int = 0
    max_nonfinite_in_row: int = 20  # stop after this many skipped updates in a row
    dist_timeout: int = DEFAULT_TIMEOUT_S  # seconds a collective waits for a missing process (docs/cluster.md)


@dataclass
class CheckpointConfig:
    every: int = 10_000
    keep_last: int = 3
    milestones: list = field(default_factory=list)  # steps whose checkpoints are always kept


@dataclass
class LogConfig:
    every: int = 100
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str | None = None
    sample_every: int = 10_000  # EMA sample grid; 0 disables
    sample_mode: str = "sde"  # sde | ode
    sample_steps: int = 50
    sample_cfg: float = 1.0  # guidance scale of the preview (1 = none); see reglue.sampling.Guidance
    sample_cls_cfg: float | None = None  # CLS guidance scale; null = sample_cfg, 0 = conditional CLS drift
    sample_guidance_interval: list = field(default_factory=lambda: [0.0, 1.0])  # [low, high] in t
    sample_count: int = 16

    def guidance(self) -> Guidance:
        """The previews' :class:`~reglue.sampling.Guidance` (validated)."""
        return _guidance(self.sample_cfg, self.sample_cls_cfg, self.sample_guidance_interval)


@dataclass
class EvalSamplerConfig:
    mode: str = "sde"  # sde | ode
    steps: int = 50
    cfg: float = 1.0  # guidance scale (1 = none); see reglue.sampling.Guidance
    cls_cfg: float | None = None  # CLS guidance scale; null = cfg, 0 = conditional CLS drift
    guidance_interval: list = field(default_factory=lambda: [0.0, 1.0])  # [low, high] in t

    def guidance(self) -> Guidance:
        return _guidance(self.cfg, self.cls_cfg, self.guidance_interval)


@dataclass
class EvalConfig:
    """Quality during training (docs/training.md): EMA samples scored every ``every`` steps."""

    every: int = 0  # steps between evaluations (and the final step); 0 = off
    num_samples: int = 10_000  # samples per evaluation, the same per-index noise and labels every time
    metrics: list = field(default_factory=lambda: ["fd"])  # fd | pr | fid | class_accuracy, see EVAL_METRICS
    vfm: dict | None = None  # feature network of fd/pr (VFMSpec fields); null: DINOv2 ViT-L/14 (FD_DINOv2)
    inception: str | None = None  # Inception-v3 weights file for fid
    reference: str | None = None  # ADM .npz reference batch; null: the training set (statistics cached in DATA/eval)
    reference_images: int = 50_000  # training-set images behind the reference statistics (all if fewer)
    sampler: EvalSamplerConfig = field(default_factory=EvalSamplerConfig)
    batch: int = 32  # samples advanced together per process (memory only)
    micro_batch: int = 32  # rows per SiT / VAE / feature-network call (fixes the float kernels)
    seed: int = 0  # the samples' noise and labels


@dataclass
class RunConfig:
    run_dir: str = "runs/reglue"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> RunConfig:
        """Cross-field rules; raises :class:`ConfigError` naming the key and the fix."""
        online = self.data.semantics == "online" and self.model.preset in PRESETS
        local_semantics = PRESETS[self.model.preset].semantics if online else None  # compressor | pca | None
        rules = [
            (self.model.name in SIT_MODELS, "model.name", f"one of {', '.join(SIT_MODELS)}"),
            (self.model.preset in PRESETS, "model.preset", f"one of {', '.join(PRESETS)}"),
            (bool(self.data.dir), "data.dir", "the `reglue prepare` directory (data.dir=PATH)"),
            (self.data.resolution is None or self.data.resolution in RESOLUTIONS, "data.resolution",
             "null (the prepared data's, read from its manifest) or a multiple of 64 from 64 to 512"),
            (self.data.semantics in SEMANTICS_SOURCES, "data.semantics", f"one of {SEMANTICS_SOURCES}"),
            (self.data.vfm_precision in PRECISIONS, "data.vfm_precision", f"one of {PRECISIONS}"),
            (self.train.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}"),
            (self.model.attention in ATTENTION_KERNELS, "model.attention", f"one of {ATTENTION_KERNELS}"),
            (self.train.ema in EMA_UPDATES, "train.ema", f"one of {tuple(EMA_UPDATES)}"),
            (self.log.sample_mode in SAMPLE_MODES, "log.sample_mode", f"one of {SAMPLE_MODES}"),
            (self.loss.path in ("linear", "cosine"), "loss.path", "linear or cosine"),
            (self.loss.time_sampling in ("uniform", "lognormal"), "loss.time_sampling", "uniform or lognormal"),
            (self.train.global_batch >= 1, "train.global_batch", "a positive integer"),
            (self.train.grad_accum >= 1, "train.grad_accum", "a positive integer"),
            (self.train.global_batch % self.train.grad_accum == 0, "train.global_batch",
             f"a multiple of train.grad_accum ({self.train.grad_accum})"),
            (self.train.max_steps >= 1, "train.max_steps", "a positive integer"),
            (0.0 <= self.train.ema_decay < 1.0, "train.ema_decay", "a value in [0, 1)"),
            (self.checkpoint.every >= 1 and self.checkpoint.keep_last >= 1, "checkpoint.every/keep_last",
             "positive integers"),
            (self.log.every >= 1 and self.log.sample_every >= 0, "log.every/sample_every",
             "log.every >= 1 and log.sample_every >= 0"),
            (self.data.images_per_class is None or self.data.fraction is None, "data.images_per_class",
             "null when data.fraction is set (choose one way to subsample)"),
            (self.data.fraction is None or 0 < self.data.fraction <= 1, "data.fraction", "a value in (0, 1]"),
            (self.data.images_per_class is None or self.data.images_per_class >= 1, "data.images_per_class",
             "a positive integer"),
            (self.optim.grad_clip > 0, "optim.grad_clip", "a positive value"),
            (0 <= self.model.class_dropout_prob < 1, "model.class_dropout_prob", "a value in [0, 1)"),
            (self.train.max_nonfinite_in_row >= 1, "train.max_nonfinite_in_row", "a positive integer"),
            (self.train.dist_timeout >= 1, "train.dist_timeout",
             "seconds >= 1 (longer than the slowest checkpoint write or evaluation, see docs/cluster.md)"),
            (self.log.sample_steps >= 1 and self.log.sample_count >= 1, "log.sample_steps/sample_count",
             "positive integers"),
            (local_semantics != "compressor" or bool(self.data.compressor), "data.compressor",
             ("the compressor weights for the reglue preset with data.semantics=online "
              "(data.compressor=DATA/compressor/compressor_best.safetensors)")),
            (local_semantics != "pca" or bool(self.data.pca), "data.pca",
             ("the file of `reglue fit-pca` for the redi preset with data.semantics=online "
              "(data.pca=DATA/pca.safetensors)")),
            (_is_vfm_spec(self.data.vfm), "data.vfm",
             ("null (the VFM that made the data) or a mapping of name, weights, layers (list of blocks) and arch "
              "({embed_dim, depth, num_heads}), e.g. {name: dinov2_vitb14_reg, weights: path/to/dinov2.pth}")),
        ]
        self._refuse_first_broken(rules)
        if self.loss.semantic_norm and self.model.init_from:
            raise ConfigError(
                "loss.semantic_norm=true with model.init_from: the authors' model was trained on "
                "un-normalised semantics and CLS; set loss.semantic_norm=false to start from it, or drop "
                "model.init_from to train a normalised model from scratch.")
        try:
            lambda_sem_milestones(self.loss.lambda_sem_schedule)
        except ValueError as err:
            raise ConfigError(f"loss.lambda_sem_schedule: {err}") from None
        for prefix, options in (("log.sample_cfg/sample_cls_cfg/sample_guidance_interval", self.log),
                                ("eval.sampler.cfg/cls_cfg/guidance_interval", self.eval.sampler)):
            try:
                options.guidance()
            except ValueError as err:
                raise ConfigError(f"{prefix}: {err}") from None
        self._validate_eval()
        self._check_optional_packages()
        return self

    def _validate_eval(self) -> None:
        e = self.eval
        last_possible = self.train.max_steps
        rules = [
            (e.every >= 0, "eval.every", "a step count >= 0 (0 turns evaluation off)"),
            (e.every == 0 or e.every <= last_possible, "eval.every",
             f"at most train.max_steps ({last_possible}), or evaluation never fires before the end"),
            (e.num_samples >= 2, "eval.num_samples", "at least 2 samples (a covariance needs two)"),
            (bool(e.metrics) and all(m in EVAL_METRICS for m in e.metrics), "eval.metrics",
             f"a non-empty list from {EVAL_METRICS}"),
            (e.every == 0 or "fid" not in e.metrics or bool(e.inception), "eval.inception",
             "the Inception-v3 weights file for the fid metric (eval.inception=PATH)"),
            (_is_vfm_spec(e.vfm), "eval.vfm", "null (DINOv2 ViT-L/14) or a mapping of VFM fields"),
            (e.reference_images >= 2, "eval.reference_images", "at least 2 images"),
            (e.sampler.mode in SAMPLE_MODES, "eval.sampler.mode", f"one of {SAMPLE_MODES}"),
            (e.sampler.steps >= 1, "eval.sampler.steps", "a positive integer"),
            (e.batch >= 1 and e.micro_batch >= 1, "eval.batch/micro_batch", "positive integers"),
        ]
        self._refuse_first_broken(rules)

    def _check_optional_packages(self) -> None:
        """Each switched-on option's package is installed; found by ``find_spec``, not imported (stays cheap)."""
        for key, (package, install) in OPTIONAL_PACKAGES.items():
            if _lookup(self, key) and importlib.util.find_spec(package) is None:
                raise ConfigError(f"{key}=true needs the {package} package, which is not installed; "
                                  f"`{install}`, or set {key}=false.")

    def _refuse_first_broken(self, rules: list[tuple[bool, str, str]]) -> None:
        """ConfigError for the first (ok, key, expected) rule that does not hold."""
        for ok, key, expected in rules:
            if not ok:
                raise ConfigError(f"{key}: invalid value {_lookup(self, key)!r}; expected {expected}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        save_settings(self, path)


def _guidance(scale: float, cls_scale: float | None, interval: list) -> Guidance:
    """A validated :class:`Guidance` from a config's scale, CLS scale and [low, high] interval."""
    if not (isinstance(interval, list) and len(interval) == 2 and all(isinstance(v, (int, float)) for v in interval)):
        raise InputError(f"the guidance interval must be [low, high], found {interval!r}.")
    low, high = interval
    return Guidance(scale=scale, cls_scale=cls_scale, low=low, high=high)


def _lookup(config, dotted: str):
    value = config
    for part in dotted.split("/")[0].split("."):
        value = getattr(value, part)
    return value


def _is_vfm_spec(value) -> bool:
    """None, or a mapping of :class:`~reglue.encoders.semantics.VFMSpec` fields with fitting types."""
    if value is None:
        return True
    if not isinstance(value, dict) or not set(value) <= {f.name for f in dataclasses.fields(VFMSpec)}:
        return False
    layers, arch = value.get("layers"), value.get("arch", {})
    return (isinstance(value.get("name", ""), str)
            and (value.get("weights") is None or isinstance(value["weights"], str))
            and (layers is None or isinstance(layers, list) and all(_is_int(b) for b in layers))
            and isinstance(arch, dict) and all(isinstance(k, str) and _is_int(v) for k, v in arch.items()))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_type(key: str, value, hint) -> object:
    """``value`` if it fits the field's type ``hint`` (ints accepted for floats), else ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {hint}, found {value!r} ({type(value).__name__}).")
    if hint is type(None):
        if value is None:
            return None
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is float and isinstance(value, str) and _is_number(value):  # YAML 1.1 reads 1e-4 as text
        return float(value)
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint in (bool, str) and isinstance(value, hint):
        return value
    elif hint is str and isinstance(value, bool):  # YAML 1.1 reads `no` (e.g. an old mixed_precision=no) as false
        return "yes" if value else "no"
    elif (origin or hint) in (list, dict) and isinstance(value, origin or hint):
        return value
    elif origin is tuple and isinstance(value, (list, tuple)):
        return _check_tuple(key, value, typing.get_args(hint))
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, found {value!r} ({type(value).__name__}).")


def _check_tuple(key: str, value: list | tuple, items: tuple) -> tuple:
    """``value`` as a tuple whose items fit ``tuple[items]`` (``(int, ...)`` or one hint per place)."""
    hints = [items[0]] * len(value) if len(items) == 2 and items[1] is Ellipsis else list(items)
    if len(hints) != len(value):
        raise ConfigError(f"{key}: expected {len(hints)} values, found {list(value)!r}.")
    return tuple(_check_type(f"{key}[{i}]", item, hint) for i, (item, hint) in enumerate(zip(value, hints)))


def from_dict(cls, raw: dict, prefix: str = ""):
    """Build the dataclass ``cls`` from a nested dict, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, found {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(raw) - names):
        if prefix + key in RETIRED_KEYS:
            if raw[key] is not None:
                raise ConfigError(f"{prefix + key} is no longer needed: {RETIRED_KEYS[prefix + key]}. "
                                  f"Remove {prefix + key} from the config.")
            raw = {k: v for k, v in raw.items() if k != key}  # an older run's saved config: nothing to refuse
    unknown = sorted(set(raw) - names)
    for key in unknown:
        if prefix + key in RENAMED_KEYS:
            new, change = RENAMED_KEYS[prefix + key]
            raise ConfigError(f"{prefix}{key} was renamed {new} ({change}); write {new} instead.")
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid: {sorted(names)}.")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _check_type(prefix + name, value, hint)
    return cls(**values)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section.")
    tree[parts[-1]] = value


def load_settings(cls, path: str | Path | None = None, overrides: Sequence[str] = (), *,
                  values: Mapping[str, object] | None = None, base=None):
    """The dataclass ``cls`` from ``base`` (an instance whose values start; None: the defaults), a YAML file
    (optional), ``values`` (dotted key -> value: a command's flag shortcuts, None = not given), then
    ``key.sub=value`` overrides (values parsed as YAML); later ones win."""
    raw: dict = settings_dict(base) if base is not None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; see configs/ for the shipped ones.")
        written = yaml.safe_load(path.read_text()) or {}
        if not isinstance(written, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings, found {type(written).__name__}.")
        for key, value in flatten_settings(written).items():
            _set_dotted(raw, key, value)
    for key, value in (values or {}).items():
        if value is not None:
            _set_dotted(raw, key, value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.global_batch=64).")
        _set_dotted(raw, key.strip(), yaml.safe_load(text) if text.strip() else None)
    return from_dict(cls, raw)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                values: Mapping[str, object] | None = None) -> RunConfig:
    """A training run's validated :class:`RunConfig` (:func:`load_settings`, then the cross-field rules)."""
    return load_settings(RunConfig, path, overrides, values=values).validate()


def settings_dict(settings) -> dict:
    """A settings dataclass as plain YAML/JSON values (tuples as lists)."""
    return _plain(dataclasses.asdict(settings))


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def save_settings(settings, path: str | Path) -> Path:
    """Write the resolved ``settings`` (a dataclass) as YAML, atomically: what a command ran with,
    loadable again with ``--config``."""
    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(settings_dict(settings), sort_keys=False))
    return Path(path)


def upgrade_recorded(raw: Mapping) -> dict:
    """A run config recorded by an older reglue, in today's keys and words (:data:`RENAMED_KEYS`, and the
    :data:`ADDED_KEYS` it lacks as it ran without them), so a run started before a rename or a new key
    resumes."""
    upgraded = copy.deepcopy(dict(raw))
    for key, value in ADDED_KEYS.items():
        section, _, name = key.partition(".")
        if section in upgraded:
            upgraded[section].setdefault(name, value)
    for old, (new, _) in RENAMED_KEYS.items():
        section, _, key = old.partition(".")
        if key in upgraded.get(section, {}):
            value = upgraded[section].pop(key)
            upgraded[section][new.partition(".")[2]] = "fp32" if value in ("no", False) else value
    return upgraded
