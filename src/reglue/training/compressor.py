"""Training the semantic compressor (SPEC §5; paper §3.2).

Loss: MSE(compressor(x), x) with x = norm_stats.normalize(extractor(images).local), the z-scored
multi-layer VFM map (B, C, 16, 16) at 256² (C = 3072 for DINOv2-B, blocks 8-11). The VFM runs
online on uint8 images (no feature cache), frozen, at the precision it was built with
(``build_vfm(..., autocast_dtype=torch.bfloat16)``); the compressor, its loss and Adam stay
float32. Official recipe (the defaults): Adam lr 1e-3, global batch 4096, 25 epochs,
CosineAnnealingLR(T_max=100, eta_min=1e-4) stepped once per epoch, so 25 epochs walk only the
first quarter of the cosine.

Data order is index-addressed: epoch e visits a permutation drawn from (seed, e); its global
batch b is rows [b·G, (b+1)·G), of which process r takes the r-th slice of G/world rows; the last
partial global batch is dropped. A run resumed mid-epoch therefore skips exactly the finished
batches and ends bit-identical to an uninterrupted one (on CPU; some GPU kernels are not
deterministic). Validation MSE is the mean over every element of the held-out maps, computed in
eval mode (BatchNorm running statistics). Without held-out images (no ``val_data``,
``val_fraction=0``) the best epoch is the one with the lowest training MSE.

Files in ``out_dir`` (only the main process writes):

- ``compressor_final.safetensors``: weights after the last epoch;
- ``compressor_best.safetensors``: weights of the epoch with the lowest validation MSE;
- ``history.json``: the run config, per-epoch train/val MSE and lr, the best epoch;
- ``loss_curve.png``: train and val MSE per epoch (drawn by :func:`reglue.training.plot.plot_series`);
- ``train_state.pt``: the resume state, a training checkpoint of :mod:`reglue.checkpoint`
  (format, version, step, completion marker; tensors and plain values, ``weights_only``
  loadable; written atomically by :class:`reglue.training.run.ResumableRun`) kept under one name,
  every ``checkpoint_every`` steps, at each epoch end and on SIGINT/SIGTERM (the run then stops with
  :class:`~reglue.training.run.RunStopped`): weights, Adam, the cosine, the epoch and step within
  it, the running epoch loss, best-so-far, history and every process's RNG states (:func:`capture_rng_state`; restored
  when the number of processes is unchanged). Resuming refuses a state whose run settings differ
  (channels, batch, lr, schedule, seed, data sizes, VFM: :func:`reglue.settings.check_same_settings`);
  the number of processes may change. A ``train_state.pt`` that is not a valid checkpoint, e.g.
  one written before this format (``reglue-compressor-train-state-v1``), is refused rather than
  ignored: restarting silently would throw away the epochs it holds, which the user may want to
  finish with the reglue version that wrote it; ``resume=False`` (``--restart``) starts over.

The DataLoaders are built once per run and keep their workers across epochs
(``persistent_workers``); each epoch only swaps the index lists their batch sampler yields, so
the order stays index-addressed.

Weights files hold plain ``encoder.model.*`` / ``decoder.model.*`` state dicts with metadata
(channels, epoch, MSEs, VFM layers); load them with
``SemanticCompressor.from_state_dict(safetensors.torch.load_file(path))``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Subset

from reglue.data.dataset import PreparedDataset, ignore_stop_signals
from reglue.data.split import held_out_split
from reglue.distributed import main_process_log, on_cpu_only, on_main, process_state
from reglue.encoders.norm_stats import NormStats
from reglue.encoders.vfm import VFMExtractor
from reglue.errors import InputError
from reglue.io import atomic_write, write_json
from reglue.models.compressor import SemanticCompressor
from reglue.precision import check as check_precision
from reglue.training.order import per_process_batch
from reglue.training.plot import plot_series
from reglue.training.run import TRAIN_STATE, Position, ResumableRun

FINAL_WEIGHTS = "compressor_final.safetensors"
BEST_WEIGHTS = "compressor_best.safetensors"
HISTORY = "history.json"
LOSS_CURVE = "loss_curve.png"
STATE_KIND = "semantic-compressor"  # the "kind" entry of train_state.pt: whose training state it is
RESTART_FIX = "use a new out_dir, or start over in this one (resume=False; `--restart` on the command line)."
_RUN_FILES = (FINAL_WEIGHTS, BEST_WEIGHTS, HISTORY, LOSS_CURVE, TRAIN_STATE)

_logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CompressorSettings:
    """What ``reglue train-compressor`` trains with (``--config`` / ``KEY=VALUE``; the paper's defaults).

    ``vfm_precision``: autocast of the frozen VFM that makes the features (fp32 | bf16 | fp16 | auto);
    the compressor itself trains in float32. ``vfm``: VFMSpec fields of that VFM (``--vfm-weights`` ...);
    None: the one the norm stats record.
    """

    epochs: int = 25
    global_batch: int = 4096  # images per step over all processes
    lr: float = 1e-3
    cosine_t_max: int = 100
    cosine_eta_min: float = 1e-4
    val_fraction: float = 0.0  # hold out this seeded share of the data (0: none, or a separate val dataset)
    seed: int = 0
    num_workers: int = 0
    checkpoint_every: int = 100  # steps between resume states
    vfm_precision: str = "auto"
    vfm: dict | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "global_batch", "cosine_t_max", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, found {getattr(self, name)}.")
        if not 0.0 <= self.val_fraction < 1.0 or self.lr <= 0 or self.num_workers < 0:
            raise InputError(f"val_fraction must lie in [0, 1), lr be > 0 and num_workers >= 0; found "
                             f"{self.val_fraction}, {self.lr} and {self.num_workers}.")
        check_precision(self.vfm_precision, key="vfm_precision")

    def training_options(self) -> dict[str, object]:
        """The keyword arguments of :func:`train_compressor` these settings give."""
        return {key: value for key, value in asdict(self).items() if key not in ("vfm_precision", "vfm")}


@dataclass
class CompressorRun:
    """What :func:`train_compressor` leaves in ``out_dir``, and how it got there.

    ``history``: one dict per epoch {"epoch" (1-based), "train_mse", "val_mse" (None without
    held-out images), "lr" (the rate used during that epoch)}. ``trained`` is False when
    ``out_dir`` already held this finished run; ``resumed_from`` is (epoch, step within it),
    0-based, when training continued from ``train_state.pt``.
    """

    out_dir: Path
    history: list[dict]
    best_epoch: int
    trained: bool = True
    resumed_from: tuple[int, int] | None = None

    final_path: Path = field(init=False)
    best_path: Path = field(init=False)
    history_path: Path = field(init=False)
    curve_path: Path = field(init=False)
    state_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.final_path = self.out_dir / FINAL_WEIGHTS
        self.best_path = self.out_dir / BEST_WEIGHTS
        self.history_path = self.out_dir / HISTORY
        self.curve_path = self.out_dir / LOSS_CURVE
        self.state_path = self.out_dir / TRAIN_STATE


# --------------------------------------------------------------------------------------
# Checks, splits and the index-addressed batch order
# --------------------------------------------------------------------------------------


def check_channels(
    channels: Sequence[int] | None, extractor: VFMExtractor, norm_stats: NormStats
) -> tuple[int, ...]:
    """The compressor's channel list, (L·D, 256, 16) by default; its first entry must be the
    extractor's feature width L·D and the norm stats' channel count."""
    width = extractor.feature_width
    channels = (width, 256, 16) if channels is None else tuple(int(c) for c in channels)
    if channels[0] != width:
        raise InputError(
            f"channels {list(channels)} start at {channels[0]}, but the VFM gives {width} = "
            f"{len(extractor.layers)} layers × {extractor.embed_dim} channels; start the list at {width}."
        )
    if norm_stats.channels != width:
        raise InputError(
            f"norm stats cover {norm_stats.channels} channels, the VFM gives {width} "
            f"({len(extractor.layers)} layers × {extractor.embed_dim}); recompute them with "
            "`reglue norm-stats` for the same VFM and layers."
        )
    return channels


def split_for_validation(dataset: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, val): a seeded random round(N·val_fraction) rows held out (:func:`reglue.data.split.held_out_split`,
    unlabelled: validation needs no class balance); val None at 0."""
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must lie in [0, 1), found {val_fraction}.")
    if val_fraction == 0.0:
        return dataset, None
    total = len(dataset)
    num_val = round(total * val_fraction)
    if not 0 < num_val < total:
        raise InputError(
            f"val_fraction {val_fraction} of {total} images leaves {num_val} for validation and "
            f"{total - num_val} for training; both must be non-empty: choose a fraction between "
            f"{1 / total:.3g} and {(total - 1) / total:.3g}, or pass val_data."
        )
    train_rows, val_rows = held_out_split(torch.zeros(total, dtype=torch.int64), num_val, seed=seed)
    return Subset(dataset, train_rows), Subset(dataset, val_rows)


def _open(data: Dataset | str | Path, resolution: int) -> Dataset:
    if isinstance(data, (str, Path)):
        return PreparedDataset(data, fields=("images",), resolution=resolution)
    return data


def _datasets(
    data, val_data, val_fraction: float, seed: int, resolution: int
) -> tuple[Dataset, Dataset | None]:
    if val_data is not None and val_fraction:
        raise InputError(
            f"both val_data and val_fraction={val_fraction} were given; hold out images one way only."
        )
    train = _open(data, resolution)
    if val_data is not None:
        val = _open(val_data, resolution)
        if len(val) == 0:
            raise InputError("val_data holds no images; pass a non-empty dataset or use val_fraction.")
        return train, val
    return split_for_validation(train, val_fraction, seed)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _save_weights(path: Path, model: SemanticCompressor, metadata: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        safetensors.torch.save_file(state, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


def _plot_loss_curve(path: Path, history: list[dict]) -> None:
    """Train and val MSE per epoch (val left out without held-out images)."""
    epochs = [h["epoch"] for h in history]
    series = {"train": (epochs, [h["train_mse"] for h in history]),
              "validation": (epochs, [h["val_mse"] for h in history])}
    plot_series(series, path, title="semantic compressor", panel="MSE (normalised features)", xlabel="epoch",
                log_y=True)


def _finished_run(run: ResumableRun, epochs: int) -> CompressorRun | None:
    """The run already in ``out_dir`` if it finished with these settings and ``epochs``."""
    saved = run.finished(HISTORY, outputs=(FINAL_WEIGHTS,))
    if saved is None or not saved["finished"] or saved["epochs_done"] != epochs:
        return None
    return CompressorRun(run.out_dir, saved["history"], saved["best_epoch"], trained=False)


def _load_train_state(run: ResumableRun, epochs: int) -> dict | None:
    """``train_state.pt`` if there is one; refuses an invalid one (see the module doc)."""
    state = run.load_state()
    if state is not None and (done := state["progress"]["epoch"]) > epochs:
        raise InputError(
            f"{run.state_path} has already trained {done} epochs, more than the {epochs} asked for; "
            f"ask for epochs >= {done} or use a new out_dir."
        )
    return state


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


@dataclass
class _Progress(Position):
    """Everything about where the run stands that a resume must restore besides the weights."""

    epoch_loss_sum: float = 0.0  # sum of this epoch's per-step train MSEs so far
    best_epoch: int = 0  # 1-based, 0 before the first epoch ends
    best_mse: float = math.inf
    history: list[dict] = field(default_factory=list)


class _CompressorTrainer:
    """One training run: builds the model, optimizer and schedule, then runs epochs."""

    def __init__(self, run: ResumableRun, extractor, norm_stats, train_set, val_set, *, num_workers: int,
                 checkpoint_every: int, log: Callable[[str], object]):
        self.run, self.accelerator, self.extractor, self.norm_stats = run, run.acc, extractor, norm_stats
        accelerator, config = run.acc, run.config
        self.train_set, self.val_set, self.out_dir, self.config = train_set, val_set, run.out_dir, config
        self.num_workers, self.checkpoint_every, self.log = num_workers, checkpoint_every, log
        self.batch = per_process_batch(config["global_batch"], accelerator.num_processes)
        self.steps_per_epoch = len(train_set) // config["global_batch"]
        self.progress = _Progress()
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
            torch.manual_seed(config["seed"])
            model = SemanticCompressor(config["channels"]).to(accelerator.device)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=config["cosine_t_max"], eta_min=config["cosine_eta_min"]
        )
        self.extractor.to(accelerator.device)
        self.model = model
        self.train_batches: list[list[int]] = []  # each epoch's order, set in place by train_epoch
        self.train_loader = self._loader(train_set, self.train_batches)
        self.val_loader = None
        if val_set is not None:  # every process its strided share of the held-out rows, in batches
            mine = list(range(accelerator.process_index, len(val_set), accelerator.num_processes))
            self.val_loader = self._loader(val_set, [mine[i : i + self.batch] for i in range(0, len(mine), self.batch)])

    @property
    def compressor(self) -> SemanticCompressor:
        return self.accelerator.unwrap_model(self.model)

    def restore(self, state: dict) -> None:
        """Load a train_state.pt dict (before :meth:`prepare`)."""
        self.model.load_state_dict(state["compressor"])
        self.optimizer.load_state_dict(state["optimizer"])  # after the scheduler set its lr
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = _Progress(**state["progress"])
        self.run.restore_rng(state["rng"])

    def prepare(self) -> None:
        """Hand model and optimizer to accelerate (DDP on several GPUs). The loaders are ours:
        they shard each global batch by rank themselves, so accelerate must not re-shard them."""
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)

    def checkpoint(self) -> None:
        """Write ``train_state.pt`` (:meth:`ResumableRun.save_state`); every process must call it."""
        self.run.save_state(self.progress.global_step, {
            "compressor": {k: v.detach().cpu() for k, v in self.compressor.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "progress": dict(vars(self.progress)),
        })

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, R, R) -> normalised VFM maps (B, C, h, w), float32."""
        images = images.to(self.accelerator.device, non_blocking=True)
        return self.norm_stats.normalize(self.extractor(images).local)

    def _loader(self, dataset: Dataset, batches: list[list[int]]) -> DataLoader:
        """One loader for the whole run; its workers persist, and it iterates ``batches`` afresh at
        every pass, so replacing the list's contents in place decides the next pass's order.
        Its own generator: worker seeds never draw from (or shift) the global RNG."""
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=torch.Generator(),
                          pin_memory=self.accelerator.device.type == "cuda", worker_init_fn=ignore_stop_signals)

    def train_epoch(self, bar) -> None:
        p, acc = self.progress, self.accelerator
        self.train_batches[:] = self.run.epoch_batches(p, len(self.train_set), self.config["global_batch"],
                                                       self.config["seed"])
        self.model.train()
        for batch in self.train_loader:
            target = self.features(batch["images"])  # (B, C, h, w)
            loss = F.mse_loss(self.model(target), target)
            self.optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            self.optimizer.step()
            loss = acc.reduce(loss.detach(), "mean").item()
            p.advance()
            p.epoch_loss_sum += loss
            self.run.after_step(p, loss, bar, checkpoint_every=self.checkpoint_every, checkpoint=self.checkpoint)

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean squared error over every element of the held-out maps, in eval mode."""
        if self.val_set is None:
            return None
        acc, model = self.accelerator, self.compressor.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=acc.device)  # (squared error, elements)
        for batch in self.val_loader:
            target = self.features(batch["images"])
            totals += torch.stack([(model(target) - target).double().square().sum(),
                                   torch.tensor(target.numel(), dtype=torch.float64, device=acc.device)])
        model.train()
        squared_error, count = acc.reduce(totals, "sum").tolist()
        return squared_error / count

    def end_epoch(self) -> None:
        """Validate, record, step the cosine, keep the best weights, checkpoint, report."""
        p = self.progress
        record = {"epoch": p.epoch + 1, "train_mse": p.epoch_loss_sum / self.steps_per_epoch,
                  "val_mse": self.validate(), "lr": self.scheduler.get_last_lr()[0]}
        self.scheduler.step()
        p.history.append(record)
        p.next_epoch()
        p.epoch_loss_sum = 0.0
        score = record["train_mse"] if record["val_mse"] is None else record["val_mse"]
        if score < p.best_mse:
            p.best_epoch, p.best_mse = p.epoch, score
            path = self.out_dir / BEST_WEIGHTS
            on_main(f"saving {path}", lambda: _save_weights(path, self.compressor, self.metadata(record)))
        self.checkpoint()
        self.write_reports(finished=False)
        val = "" if record["val_mse"] is None else f", val MSE {record['val_mse']:.5f}"
        self.log(f"compressor epoch {p.epoch}: train MSE {record['train_mse']:.5f}{val}, "
                 f"lr {record['lr']:.3g}")

    def metadata(self, record: dict) -> dict:
        return {"format": "reglue-semantic-compressor", "channels": json.dumps(self.config["channels"]),
                **{k: json.dumps(v) for k, v in record.items()},
                "vfm_layers": json.dumps(self.config["vfm_layers"]),
                "vfm_embed_dim": self.config["vfm_embed_dim"], "resolution": self.config["resolution"],
                "norm_stats": json.dumps(self.norm_stats.metadata)}

    def write_reports(self, finished: bool) -> None:
        p = self.progress
        if not p.history:
            return

        def write() -> None:
            write_json(self.out_dir / HISTORY, {
                "config": self.config, "epochs_done": p.epoch, "finished": finished,
                "num_processes": self.accelerator.num_processes, "best_epoch": p.best_epoch,
                "best_mse": p.best_mse, "history": p.history,
            })
            _plot_loss_curve(self.out_dir / LOSS_CURVE, p.history)

        on_main(f"writing {HISTORY} and {LOSS_CURVE} in {self.out_dir}", write)

    def finish(self) -> None:
        path, last = self.out_dir / FINAL_WEIGHTS, self.metadata(self.progress.history[-1])
        on_main(f"saving {path}", lambda: _save_weights(path, self.compressor, last))
        self.write_reports(finished=True)


def train_compressor(
    data: Dataset | str | Path,
    out_dir: str | Path,
    extractor: VFMExtractor,
    norm_stats: NormStats,
    *,
    channels: Sequence[int] | None = None,
    epochs: int = 25,
    global_batch: int = 4096,
    lr: float = 1e-3,
    cosine_t_max: int = 100,
    cosine_eta_min: float = 1e-4,
    val_data: Dataset | str | Path | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    num_workers: int = 0,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], object] = _logger.info,
    inputs: dict | None = None,
) -> CompressorRun:
    """Train a :class:`SemanticCompressor` on online VFM features (SPEC §5); see the module doc.

    ``data`` / ``val_data``: a prepared-dataset directory or a dataset of dicts with "images"
    uint8 (3, R, R). ``channels`` defaults to (L·D, 256, 16). ``val_fraction`` holds out a seeded
    random share of ``data`` instead of ``val_data``. ``resume`` continues from
    ``out_dir/train_state.pt`` (a larger ``epochs`` extends a finished run), or returns a finished
    run unchanged; ``resume=False`` deletes this run's files in ``out_dir`` and starts over.
    ``log`` receives one line per epoch (main process only); the progress bar shows the step loss.
    ``inputs`` (JSON-able, e.g. the VFM spec and the norm stats' checksum) joins the run config,
    so resuming with other inputs is refused.
    Works alone or under ``accelerate launch``.
    """
    process_state()  # the process group, with the collective timeout every command uses
    accelerator = Accelerator(mixed_precision="no", cpu=on_cpu_only())  # the compressor trains in float32
    per_process_batch(global_batch, accelerator.num_processes)
    if epochs < 1 or checkpoint_every < 1:
        raise InputError(f"epochs and checkpoint_every must be >= 1, found {epochs} and {checkpoint_every}.")
    channels = check_channels(channels, extractor, norm_stats)
    train_set, val_set = _datasets(data, val_data, val_fraction, seed, extractor.resolution)
    if len(train_set) < global_batch:
        raise InputError(
            f"{len(train_set)} training images make no full global batch of {global_batch}; "
            f"lower global_batch to at most {len(train_set)} (a multiple of {accelerator.num_processes})."
        )
    config = {
        "channels": list(channels), "global_batch": global_batch, "lr": lr, "cosine_t_max": cosine_t_max,
        "cosine_eta_min": cosine_eta_min, "seed": seed, "train_images": len(train_set),
        "val_images": 0 if val_set is None else len(val_set),
        "val_source": "val_data" if val_data is not None else f"val_fraction={val_fraction}",
        "vfm_layers": list(extractor.layers), "vfm_embed_dim": extractor.embed_dim,
        "resolution": extractor.resolution, "vfm_autocast": str(extractor.autocast_dtype),
        **(inputs or {}),
    }
    run = ResumableRun(out_dir, config, accelerator, name="the compressor", owner="the semantic compressor",
                       kind=STATE_KIND, fix=RESTART_FIX)
    log = main_process_log(log, accelerator.is_main_process)
    if resume and (done := _finished_run(run, epochs)) is not None:
        log(f"{run.out_dir} already holds this compressor run ({epochs} epochs); not retraining.")
        return done
    return _run(run, extractor, norm_stats, train_set, val_set, epochs=epochs, num_workers=num_workers,
                checkpoint_every=checkpoint_every, resume=resume, progress=progress, log=log)


def _run(run: ResumableRun, extractor, norm_stats, train_set, val_set, *, epochs: int, num_workers: int,
         checkpoint_every: int, resume: bool, progress: bool, log) -> CompressorRun:
    out_dir, config, accelerator = run.out_dir, run.config, run.acc
    trainer = _CompressorTrainer(run, extractor, norm_stats, train_set, val_set, num_workers=num_workers,
                                 checkpoint_every=checkpoint_every, log=log)
    state = _load_train_state(run, epochs) if resume else None
    resumed_from = None
    if state is not None:
        trainer.restore(state)
        resumed_from = (trainer.progress.epoch, trainer.progress.step_in_epoch)
        log(f"resuming the compressor run in {out_dir} at epoch {resumed_from[0] + 1}, "
            f"step {resumed_from[1]}")
    trainer.prepare()

    fresh = state is None  # starting over: no file of an earlier run may pass for this one's
    on_main(f"preparing {out_dir}", lambda: run.start_over(_RUN_FILES if fresh else ()))
    log(f"training compressor {config['channels']} on {config['train_images']} images "
        f"({config['val_images']} held out), {epochs} epochs × {trainer.steps_per_epoch} steps of "
        f"{config['global_batch']} ({trainer.batch} per process × {accelerator.num_processes})")
    bar = run.progress_bar(total=epochs * trainer.steps_per_epoch, initial=trainer.progress.global_step,
                           desc="compressor", enabled=progress)
    with run.stop.installed(), bar:
        while trainer.progress.epoch < epochs:
            trainer.train_epoch(bar)
            trainer.end_epoch()
    trainer.finish()  # its last step on the main process, which every process waits for
    p = trainer.progress
    log(f"compressor done: best epoch {p.best_epoch} (MSE {p.best_mse:.5f}); weights in {out_dir}")
    return CompressorRun(out_dir, p.history, p.best_epoch, resumed_from=resumed_from)
