"""``reglue train``: the joint diffusion model's training loop (SPEC §7, §9).

Plain code over accelerate: one process on a CPU, or DDP under ``accelerate launch`` /
``torchrun``. Every step's randomness is index-addressed: the data order comes from
(seed, epoch) (:mod:`reglue.training.order`), and the step's times, noises and label-dropout
decisions are drawn for the whole global batch from (seed, step), each process taking the rows
of its own samples. A run interrupted at any checkpoint and resumed with ``resume="auto"``
replays bit-identically (tested on CPU), and the samples of a step get the same randomness
whatever the number of processes and accumulation steps.

Checkpoints (``run_dir/checkpoints/step-*.pt``) hold model, EMA, optimiser, grad scaler, step,
RNG states of every rank and the resolved config; they are written atomically every
``checkpoint.every`` steps, at the end, and when SIGINT/SIGTERM arrives. The EMA weights are
exported as ``run_dir/ema`` (``config.json`` + ``model.safetensors``) for sampling.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reglue import checkpoint as ckpt
from reglue.config import ConfigError, OptimConfig, RunConfig, upgrade_recorded
from reglue.data.dataset import training_loader
from reglue.distributed import main_value, on_cpu_only, on_main, process_state
from reglue.ema import EMAUpdate
from reglue.encoders.autoencoder import load_vae
from reglue.errors import ReglueError
from reglue.io import atomic_write
from reglue.models.official import config_values_from_authors_args, load_authors_checkpoint
from reglue.models.sit import SiT, SiTConfig, build_sit
from reglue.precision import ACCELERATE_PRECISION
from reglue.presets import get_preset
from reglue.resolution import LATENT_DOWNSAMPLE
from reglue.sampling import sample_ode, sample_sde
from reglue.state_dict import load_state_dict_strict, strip_module_prefix
from reglue.training.evaluation import Evaluator, eval_due
from reglue.training.inputs import InputBuilder, RunInputs, open_run_inputs
from reglue.training.locations import absolute_paths, moved_inputs
from reglue.training.metrics import MetricsLogger, read_metrics
from reglue.training.order import per_process_batch, process_batches
from reglue.training.run import ResumableRun
from reglue.training.step_noise import StepNoise
from reglue.training.target_stats import measure_target_stats
from reglue.transport import JointLoss

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    skipped_updates: int
    stopped_early: bool  # a signal or stop_after_steps ended the run before max_steps


class TrainingError(ReglueError):
    """The run cannot go on (e.g. too many non-finite updates); the message says what to do."""


@dataclass
class _Update:
    """An optimiser step queued on the device; :meth:`read` brings its outcome to the host.

    On a GPU the status is copied into a pinned host buffer as soon as it is computed, without waiting,
    and an event marks the copy's arrival: reading then waits for this step's work only, not for the work
    of the steps queued after it (a plain ``tolist`` of the device tensor would wait for the whole queue)."""

    step: int  # the step count after this update
    status: torch.Tensor  # (2,) float32, summed over processes: [non-finite losses or gradient norm, stop requests]
    losses: dict[str, torch.Tensor]  # this process's mean loss terms, 0-d on the device
    grad_norm: torch.Tensor  # 0-d, the same on every process
    lambda_sem: float
    host: torch.Tensor  # the status where the host reads it (the status itself off a GPU)
    arrived: torch.cuda.Event | None  # recorded after the copy to ``host`` (GPU only)
    _outcome: tuple[bool, bool] | None = None

    def read(self) -> tuple[bool, bool]:
        """(finite on every process, a process asked to stop); the host sync happens once."""
        if self._outcome is None:
            if self.arrived is not None:
                self.arrived.synchronize()
            nonfinite, stop = self.host.tolist()
            self._outcome = (nonfinite == 0, stop > 0)
        return self._outcome


def _build_model(config: RunConfig, latent_size: int, num_classes: int, vfm_dim: int) -> SiT:
    preset = get_preset(config.model.preset)
    m = config.model
    sizes = {"encoder_depth": m.encoder_depth, "depth": m.depth, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
             "projector_dim": m.projector_dim}
    overrides = {k: v for k, v in sizes.items() if v is not None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        return build_sit(
            config.model.name, input_size=latent_size, num_classes=num_classes, qk_norm=config.model.qk_norm,
            class_dropout_prob=config.model.class_dropout_prob, path=config.loss.path,
            semantic_norm=config.loss.semantic_norm, **preset.model_kwargs(vfm_dim=vfm_dim),
            **overrides,
        ).set_attention(config.model.attention)


def _loss(config: RunConfig) -> JointLoss:
    weights = get_preset(config.model.preset).loss_kwargs()
    for key in weights:
        if getattr(config.loss, key) is not None:
            weights[key] = getattr(config.loss, key)
    return JointLoss(path=config.loss.path, time_sampling=config.loss.time_sampling,
                     lambda_sem_schedule=config.loss.lambda_sem_schedule, **weights)


def build_adamw(params, optim: OptimConfig, fused: bool, device: torch.device) -> torch.optim.AdamW:
    """AdamW with ``optim``'s settings. ``fused``: PyTorch's fused kernel on CUDA and CPU (≈ 6× the
    loop on a 2-core CPU), multi-tensor (foreach) elsewhere; otherwise the authors' per-parameter
    loop (foreach=False). Same maths either way."""
    kernel = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(params, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             weight_decay=optim.weight_decay, **(kernel if fused else {"foreach": False}))


# Settings a resumed run may change; every other one must equal the checkpoint's.
RESUME_FREE = ("run_dir", "data.resolution", "train.max_steps", "train.max_nonfinite_in_row", "train.dist_timeout",
               "train.compile", "data.num_workers",
               "model.init_from", "log.", "checkpoint.", "optim.lr", "optim.grad_clip", "train.precision",
               "model.attention", "train.fused_optimizer", "train.ema", "train.find_unused_parameters",
               "data.pin_memory", "data.verify", "data.vae", "eval.")  # kernels, data movement and measurements only: the maths are unchanged


def _vfm_dim(dataset, encoder) -> int:
    if encoder is not None:
        return encoder.extractor.embed_dim
    for name in ("cls", "repa"):
        if name in dataset.fields:
            return int(dataset[0][name].shape[-1])
    return 768  # presets without VFM targets: no projector or CLS is built (z_dim unused)


class Trainer:
    """Holds the run's objects; :meth:`run` trains until ``max_steps`` or a stop request.

    ``inputs`` come from :func:`~reglue.training.inputs.open_run_inputs` (config checked against the data)."""

    def __init__(self, inputs: RunInputs, accelerator):
        config = self.config = inputs.config
        self.acc = accelerator
        self.preset = get_preset(config.model.preset)
        self.run_dir = Path(config.run_dir)
        # the run's skeleton: settings checks, RNG states, signals, progress bar, metrics
        self.resumable = ResumableRun(self.run_dir, config.to_dict(), accelerator, name="the SiT", error=ConfigError,
                                      free=RESUME_FREE, what="the checkpoint", fix="use the checkpoint's config "
                                      "(RUN_DIR/config.yaml) or start a new run directory.")
        self.per_device = per_process_batch(config.train.global_batch, accelerator.num_processes)
        if self.per_device % config.train.grad_accum:
            raise ConfigError(
                f"train.global_batch {config.train.global_batch} over {accelerator.num_processes} process(es) × "
                f"{config.train.grad_accum} accumulation steps is not a whole per-device batch; choose a "
                f"multiple of {accelerator.num_processes * config.train.grad_accum}."
            )
        self.dataset, self.rows, encoder = inputs.dataset, inputs.rows, inputs.encoder
        self.located = inputs.located
        resolution = self.dataset.manifest["resolution"]
        if encoder is not None:
            encoder.to(accelerator.device)
        num_classes = 0 if config.data.unconditional else self.dataset.num_classes  # 0: the null label only
        self.latent_size = resolution // 8
        self.vfm_dim = _vfm_dim(self.dataset, encoder)
        self.model = _build_model(config, self.latent_size, num_classes, self.vfm_dim)
        self.model.check_inputs = accelerator.device.type == "cpu"  # no host syncs on accelerators
        self.ema = copy.deepcopy(self.model).requires_grad_(False).to(accelerator.device)
        self.inputs = InputBuilder(self.preset, self.dataset, self.latent_size, num_classes,
                                   config.data.unconditional, encoder, norm=self.model.semantic_norm)
        self.loss_fn = _loss(config)
        if config.train.compile:
            for block in self.model.blocks:
                block.compile()
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = build_adamw(params, config.optim, config.train.fused_optimizer, accelerator.device)
        self.in_channels = self.model.in_channels
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        self.core = accelerator.unwrap_model(self.model)  # the SiT inside DDP, looked up once (a per-call cost)
        self._ema_update = EMAUpdate(self.ema, self.core, config.train.ema)
        self._trained = params  # the clipped parameters, listed once
        self._skips_on_device = bool(optimizer.defaults.get("fused")) and accelerator.scaler is None
        self.step = 0
        self.resumed = False
        self.skipped = 0
        self.nonfinite_in_row = 0
        self.stop_requested = False
        self._pending: _Update | None = None  # the last queued update, until _settle reads it
        if accelerator.device.type == "cuda":  # where the steps' statuses reach the host (Trainer._to_host)
            self._status_buffers = [torch.empty(2, pin_memory=True) for _ in range(2)]
        self._writer = ckpt.BackgroundWriter()  # checkpoints are written while training goes on
        self.evaluator = None  # built, and its settings checked, before the run writes a file
        if config.eval.every:
            self.evaluator = Evaluator(config, device=accelerator.device, rank=accelerator.process_index,
                                       world_size=accelerator.num_processes, records=inputs.dataset.records)
            log.info(self.evaluator.describe())

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        rng = self.resumable.rng_states()
        scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else {}
        return {
            "model": self.core.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler,
            "rng": rng,
            "skipped_updates": self.skipped,
            "nonfinite_in_row": self.nonfinite_in_row,
            "config": self.config.to_dict(),
            "sit_config": asdict(self.core.config),
            "inputs": self.located,  # where the run read its data (and online files), and their content
        }

    def restore(self, payload: dict) -> None:
        # Checkpoints from before data.vfm existed: the run adopts the cache's VFM, which open_run_inputs
        # has already checked against the data, so the new key is not a change of settings.
        adopted = ("data.vfm",) if "vfm" not in payload["config"].get("data", {}) else ()
        moved = moved_inputs(payload.get("inputs"), self.located)  # the same content at a new path
        self.resumable.check_settings(absolute_paths(upgrade_recorded(payload["config"])), free=adopted + moved)
        self._check_same_model(payload["sit_config"])
        self.core.load_state_dict(payload["model"])
        self.ema.load_state_dict(payload["ema"])
        self.optimizer.load_state_dict(payload["optimizer"])
        for group in self.optimizer.param_groups:  # a resumed run may lower the learning rate
            group["lr"] = self.config.optim.lr
        if self.acc.scaler is not None and payload["scaler"]:
            self.acc.scaler.load_state_dict(payload["scaler"])
        self.step = int(payload["step"])
        self.resumed = True
        self.skipped = int(payload["skipped_updates"])
        self.nonfinite_in_row = int(payload["nonfinite_in_row"])
        self.resumable.restore_rng(payload["rng"])

    def _check_same_model(self, saved: dict) -> None:
        """The checkpoint's SiT must be the one this run builds from its config and data.dir: the
        config is checked above, so a difference means the data changed (resolution, classes, cache)."""
        built = self.core.config
        fix = "resume on the data it was trained on, or start a new run directory."
        check_trained_resolution(saved["input_size"] * LATENT_DOWNSAMPLE, built, what="the checkpoint's model",
                                 fix=fix)
        changed = [f"{key}: was {saved[key]!r}, now {value!r}" for key, value in asdict(built).items()
                   if key in saved and saved[key] != value]
        if changed:
            raise ConfigError(f"the checkpoint's model is not the one this run builds from data.dir "
                              f"{self.config.data.dir} ({'; '.join(changed)}): the data changed; {fix}")

    def _check_ranks_in_sync(self) -> None:
        """DDP keeps replicas identical; a mismatch (silent divergence) must stop the run."""
        from accelerate.utils import gather_object

        params = self.core.parameters()
        checksum = float(sum(p.detach().double().sum() for p in params))
        sums = gather_object([checksum])
        if len(set(sums)) > 1:
            raise TrainingError(f"model replicas differ across processes (parameter sums {sums}); not saving. "
                                "Resume from the last checkpoint; report this if it happens again.")

    def init_from_authors(self, path: str) -> None:
        """Start from the authors' checkpoint: their model and EMA weights (strict, key-checked).

        Their ``args`` are compared with this run's config and differences are logged; the
        optimiser starts fresh (their AdamW state indexes parameters differently).
        """
        checkpoint = load_authors_checkpoint(path)
        core = self.core
        model, ema = checkpoint.get("model", checkpoint.get("ema")), checkpoint.get("ema", checkpoint.get("model"))
        made_at = trained_image_size(model)
        if made_at is not None:
            check_trained_resolution(made_at, core.config, what=f"model.init_from {path}", fix=(
                f"start from a checkpoint trained at {core.config.image_size}², or train on data prepared at "
                f"{made_at}²."))
        load_state_dict_strict(core, model, f"{path} model weights")
        load_state_dict_strict(self.ema, ema, f"{path} EMA weights")
        config = self.config.to_dict()
        for key, theirs in config_values_from_authors_args(checkpoint.get("args") or {}).items():
            section, name = key.split(".")
            if config[section][name] != theirs:
                log.warning("authors' checkpoint has %s=%r, this run uses %r", key, theirs, config[section][name])
        log.info("initialised model and EMA from %s (their step %s)", path, checkpoint.get("steps"))

    def measure_semantic_norm(self) -> None:
        """A fresh run with ``loss.semantic_norm``: measure the targets' statistics (:func:`~reglue.training.
        target_stats.measure_target_stats`) and write them into the model, whose buffers the inputs read, and
        the EMA; a resumed run restores them from its checkpoint instead.

        After ``accelerator.prepare``: every process computes the same statistics (summed over processes),
        and DDP broadcasts the main process's buffers at every forward besides; the EMA copies the model's
        buffers at every update."""
        norm = self.core.semantic_norm
        if norm is None:
            return
        if norm.widths == (0, 0):
            log.info("loss.semantic_norm: the %s preset models no semantic channels and no CLS; nothing to "
                     "normalise", self.preset.name)
            return
        cfg = self.config
        stats = measure_target_stats(self.inputs, self.dataset, self.rows, widths=norm.widths,
                                     seed=cfg.train.seed, micro_batch=self.per_device // cfg.train.grad_accum,
                                     num_workers=cfg.data.num_workers, device=self.acc.device)
        for module in (norm, self.ema.semantic_norm):
            module.set_statistics(**stats.tensors())
        if self.acc.is_main_process:
            log.info(stats.describe())

    def save(self, *, wait: bool) -> None:
        """Checkpoint this step. The processes compare parameter sums and gather their RNG states; the
        main process copies the state to the host and writes it (checkpoint, then the EMA export) in
        the background while training goes on — or before returning with ``wait`` (the last save of a
        run or a stop). A write still running is waited for first. If it failed, the failure is logged and
        this step's checkpoint is written before training goes on; a second failure in a row stops every
        process with its cause (a full disk stays full; a passing fault costs one checkpoint, not the run)."""
        self._check_ranks_in_sync()
        payload = self.state()
        step, c = self.step, self.config.checkpoint

        def write(snapshot: dict) -> None:
            path = ckpt.save_checkpoint(self.run_dir, step, snapshot, c.keep_last, c.milestones)
            self.ema.save_pretrained(self.run_dir / "ema", state_dict=snapshot["ema"])
            log.info("saved %s", path)

        def start() -> None:
            failed = False
            try:
                waited = self._writer.wait()
            except Exception:  # the previous checkpoint: logged; this one is written at once
                log.exception("the previous checkpoint was not written; writing step %d's before going on", step)
                failed, waited = True, 0.0
            if waited > 1.0:
                log.warning("step %d waited %.1f s for the previous checkpoint's write: writing takes longer than "
                            "checkpoint.every steps; raise it or write to a faster file system", step, waited)
            snapshot = ckpt.host_copy(payload)  # training changes the live tensors: the file holds this step
            self._writer.start(lambda: write(snapshot))
            if wait or failed:
                self._writer.wait()

        on_main("saving a checkpoint", start)

    # ------------------------------------------------------------------ data
    def batches(self):
        """This process's micro-batches from ``self.step`` on, forever: one DataLoader whose batch
        sampler walks epoch after epoch, so its worker processes live as long as the run."""
        yield from training_loader(self.dataset, self._micro_batch_rows(), num_workers=self.config.data.num_workers,
                                   pin_memory=self.config.data.pin_memory and self.acc.device.type == "cuda")

    def _micro_batch_rows(self):
        """Dataset rows of this process's micro-batches from ``self.step`` on, epoch after epoch."""
        G, rows = self.config.train.global_batch, self.rows
        micro = self.per_device // self.config.train.grad_accum
        epoch, start = divmod(self.step, len(rows) // G)
        while True:
            for batch in process_batches(len(rows), G, seed=self.config.train.seed, epoch=epoch,
                                         rank=self.acc.process_index, num_processes=self.acc.num_processes,
                                         start_step=start):
                for i in range(0, len(batch), micro):
                    yield rows[batch[i : i + micro]].tolist()
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------ step
    def train_step(self, batches) -> None:
        """Queue one optimiser step over ``grad_accum`` micro-batches; :meth:`_settle` reads its outcome.

        The step's randomness is drawn on the device (:class:`StepNoise`). The one host sync of a step
        is the previous step's :meth:`_settle`, made once this step's forward and backward are queued,
        so a GPU never waits for the host in between. A non-finite update (any process's loss, or the
        gradient norm) is skipped on the device when the optimiser can (fused AdamW without a grad
        scaler), else after a sync of its own (fp16, ``train.fused_optimizer=false``).
        """
        cfg = self.config.train
        device = self.acc.device
        noise = StepNoise.draw(cfg.seed, self.step, global_batch=cfg.global_batch, channels=self.in_channels,
                               size=self.latent_size, vfm_dim=self.vfm_dim, loss=self.loss_fn,
                               dropout=self.config.model.class_dropout_prob, device=device)
        self.model.train()
        losses: dict[str, torch.Tensor] = {}
        micro_size = self.per_device // cfg.grad_accum
        for micro in range(cfg.grad_accum):
            start = self.acc.process_index * self.per_device + micro * micro_size  # global row of this micro-batch
            n = noise.rows(start, start + micro_size)
            inputs = self.inputs(next(batches), device, n.latent_eps)
            sync = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else self.acc.no_sync(self.model):
                with self.acc.autocast():
                    terms = self.loss_fn(self.model, inputs.x0, inputs.y, inputs.cls_target, inputs.repa_target,
                                         step=self.step, t=n.t, noise=n.noise,
                                         cls_noise=n.cls_noise if inputs.cls_target is not None else None,
                                         force_drop_ids=n.drop)
                self.acc.backward(terms.total / cfg.grad_accum)
            for name, value in terms.detached().items():
                losses[name] = losses.get(name, 0) + value / cfg.grad_accum
        self._settle()  # the previous step, while this one is queued
        grad_norm = self.acc.clip_grad_norm_(self._trained, self.config.optim.grad_clip)
        status = self._status(losses["total"], grad_norm)
        update = _Update(self.step + 1, status, losses, grad_norm, terms.lambda_sem, *self._to_host(status))
        self._apply(update)
        self._pending = update

    def _status(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """(2,) float32 on the device, summed over processes: [processes whose loss or gradient norm
        is non-finite, processes asked to stop]. A collective on the device; nothing is read here."""
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        stop = torch.full((), float(self.resumable.stop.raised), device=self.acc.device)
        status = torch.stack([nonfinite.float(), stop])
        return self.acc.reduce(status, "sum") if self.acc.num_processes > 1 else status

    def _to_host(self, status: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """The status where the host will read it: on a GPU a pinned buffer it is copied into without
        waiting (two buffers, used in turn: a step's status is read before the step after next writes),
        and the event that marks its arrival; elsewhere the status itself."""
        if status.device.type != "cuda":
            return status, None
        host = self._status_buffers[self.step % 2]
        host.copy_(status, non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record()
        return host, arrived

    def _apply(self, update: _Update) -> None:
        """The optimiser step of ``update``, skipped when it is non-finite.

        Without a grad scaler torch's AdamW is called directly: accelerate's wrapper adds nothing
        then but host work (package look-ups and a signature inspection on every call, ≈ 1 ms)."""
        adamw = self.optimizer.optimizer  # accelerate's wrapper holds torch's AdamW
        if self._skips_on_device:  # fused AdamW reads found_inf as in torch's grad-scaler protocol
            adamw.found_inf = (update.status[0] > 0).float()
            try:
                adamw.step()
            finally:
                del adamw.found_inf
        elif update.read()[0]:
            self.optimizer.step()  # through accelerate: the fp16 grad scaler's step and update
        elif self.acc.scaler is not None:  # fp16: the scaler unscaled this step; let it back off
            self.acc.scaler.update()
        adamw.zero_grad(set_to_none=True)

    def _settle(self) -> _Update | None:
        """Read the pending update's outcome (a host sync): move the EMA after a finite one, count a
        skipped one (too many in a row stop the run), note a stop request. Returns it (None if none)."""
        update, self._pending = self._pending, None
        if update is None:
            return None
        finite, stop = update.read()
        self.stop_requested |= stop
        if finite:
            self.nonfinite_in_row = 0
            self._ema_update(self.config.train.ema_decay)
        else:
            self._count_skipped(update.step)
        return update

    def run(self, stop_after_steps: int | None = None) -> TrainResult:
        cfg = self.config
        log_config = cfg.log
        metrics = self.resumable.open_metrics(resume_step=self.step if self.resumed else None,
                                              tensorboard=log_config.tensorboard, wandb=log_config.wandb,
                                              wandb_project=log_config.wandb_project)
        bar = self.resumable.progress_bar(total=cfg.train.max_steps, initial=self.step, desc="train")
        done_here, stopped = 0, False
        with self.resumable.stop.installed(), metrics, bar, contextlib.closing(self.batches()) as batches, \
                self._writes_finished():  # loader workers exit; a checkpoint being written is finished
            if self._evaluation_pending():  # stopped at an evaluation step before evaluating: do it now
                self.evaluate(metrics)
            self._since_log = (self.step, time.perf_counter())
            while self.step < cfg.train.max_steps:
                self.train_step(batches)
                self.step += 1
                done_here += 1
                bar.update(1)
                stop = self.stop_requested or (stop_after_steps is not None and done_here >= stop_after_steps)
                log_due, eval_now = self.step % cfg.log.every == 0, eval_due(self.step, cfg.eval.every, cfg.train.max_steps)
                preview_due = bool(cfg.log.sample_every) and self.step % cfg.log.sample_every == 0
                save_due = self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.max_steps
                if not (stop or log_due or eval_now or preview_due or save_due):
                    continue
                update = self._settle()  # this step's outcome: the EMA is current from here on
                stop = stop or self.stop_requested
                if log_due and update.read()[0]:
                    self._log(metrics, bar, update)
                if preview_due and not stop:
                    self.preview(metrics)
                # Before the checkpoint of the same step: a run killed in between re-evaluates on resume.
                if eval_now and not stop:
                    self.evaluate(metrics)
                if save_due or stop:
                    self.save(wait=stop or self.step == cfg.train.max_steps)
                if stop:
                    stopped = True
                    break
        return TrainResult(self.run_dir, self.step, self.skipped, stopped)

    @contextlib.contextmanager
    def _writes_finished(self):
        """On the way out of a run that fails, the checkpoint being written is finished (its failure logged)."""
        try:
            yield
        except BaseException:
            if self.acc.is_main_process:
                self._writer.finish()
            raise

    def _log(self, metrics: MetricsLogger, bar, update: _Update) -> None:
        """Log a settled update's loss terms (mean over processes) and the throughput since the last log."""
        names = list(update.losses)
        stacked = torch.stack([update.losses[name].float() for name in names] + [update.grad_norm.float()])
        reduced = (self.acc.reduce(stacked, "mean") if self.acc.num_processes > 1 else stacked).tolist()
        steps_before, since = self._since_log
        now = time.perf_counter()
        self._since_log = (update.step, now)
        seconds_per_step = (now - since) / max(update.step - steps_before, 1)
        values = {f"loss/{name}": value for name, value in zip(names, reduced)} | {"grad_norm": reduced[-1]}
        if self.preset.semantic_channels:  # λ_s after the schedule's milestones
            values["lambda/sem"] = update.lambda_sem
        values |= {"lr": self.optimizer.param_groups[0]["lr"], "step_time_s": seconds_per_step,
                   "images_per_s": self.config.train.global_batch / seconds_per_step,
                   "skipped_updates": self.skipped, **_memory()}
        on_main(f"logging step {update.step}", lambda: metrics.log(update.step, values))  # e.g. a full disk
        bar.set_postfix(loss=f"{values['loss/total']:.4f}", img_per_s=f"{values['images_per_s']:.4g}")

    def evaluate(self, metrics) -> None:
        """Score the EMA (every process samples its share) and log ``eval/*`` at this step."""
        if self.evaluator is None:
            return
        with torch.random.fork_rng(devices=[self.acc.device] if self.acc.device.type == "cuda" else []):
            values = self.evaluator(self.ema, self.step)

        def record() -> None:  # values: the main process's scores (None on the others)
            metrics.log(self.step, values)
            summary = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in values.items())
            log.info("step %d evaluation: %s", self.step, summary)

        on_main(f"logging the evaluation of step {self.step}", record)

    def _evaluation_pending(self) -> bool:
        """A resumed run at an evaluation step whose metrics hold no evaluation of it (it stopped first)."""
        if not (self.resumed and eval_due(self.step, self.config.eval.every, self.config.train.max_steps)):
            return False
        missing = on_main("reading metrics.jsonl", lambda: not any(
            row["step"] == self.step and any(k.startswith("eval/") for k in row) for row in read_metrics(self.run_dir)
        ))
        return self.resumable.any_process(bool(missing))

    def preview(self, metrics) -> None:
        """Save an EMA sample grid (fixed noise and labels) as PNG and log it; main process only.

        A failing preview is logged with its traceback and training goes on: it is not worth a run."""

        def write() -> None:
            try:
                self._write_preview(metrics)
            except Exception:
                log.exception("the EMA preview at step %d failed; training goes on without it", self.step)

        on_main(f"writing the EMA preview of step {self.step}", write)  # Ctrl-C in it stops every process

    def _write_preview(self, metrics) -> None:
        grid = preview_grid(self.ema, self.config, self.dataset.manifest, self.latent_size, self.acc.device)
        if grid is not None:
            from PIL import Image

            path = self.run_dir / "samples" / f"step-{self.step:09d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                Image.fromarray(grid).save(tmp, format="PNG")
            metrics.log_image(self.step, "samples/ema", grid)

    def _count_skipped(self, step: int) -> None:
        self.skipped += 1
        self.nonfinite_in_row += 1
        log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row, %d in all)",
                    step, self.nonfinite_in_row, self.skipped)
        if self.nonfinite_in_row >= self.config.train.max_nonfinite_in_row:
            raise TrainingError(
                f"{self.nonfinite_in_row} non-finite updates in a row (train.max_nonfinite_in_row); stopping. "
                f"The last good checkpoint in {self.run_dir / 'checkpoints'} is intact: lower optim.lr or use "
                "train.precision=bf16, then resume with --resume auto."
            )


_PREVIEW_VAES: dict[str, object] = {}


def _preview_vae(vae_id: str, device: torch.device):
    """The dataset's VAE for decoding previews, or None (with one warning) if it cannot load."""
    if vae_id not in _PREVIEW_VAES:
        try:
            _PREVIEW_VAES[vae_id] = load_vae(vae_id).to(device)
        except (OSError, ValueError) as err:
            log.warning("sample previews disabled: the dataset's VAE %s does not load (%s)", vae_id, err)
            _PREVIEW_VAES[vae_id] = None
    return _PREVIEW_VAES[vae_id]


@torch.no_grad()
def preview_grid(ema: SiT, config: RunConfig, manifest: dict, latent_size: int, device: torch.device):
    """uint8 (H, W, 3) grid of ``log.sample_count`` EMA samples, or None without a usable VAE.

    Noise comes from a generator seeded with the run seed and labels cycle through the classes,
    so every preview of a run shows the same noise and labels.
    """
    vae = _preview_vae(config.data.vae or manifest["vae"], device)
    if vae is None:
        return None
    n, c = config.log.sample_count, ema.config
    g = torch.Generator().manual_seed(config.train.seed)
    latents = torch.randn(n, c.in_channels, latent_size, latent_size, generator=g).to(device)
    cls = torch.randn(n, c.z_dim, generator=g).to(device) if ema.use_cls_token else None
    classes = max(manifest["num_classes"], 1)
    y = torch.arange(n, device=device) % classes
    if manifest["num_classes"] == 0 or config.data.unconditional:
        y = torch.full_like(y, ema.num_classes)
    sampler = sample_sde if config.log.sample_mode == "sde" else sample_ode
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.train.seed)  # the model carries its path (SiTConfig.path)
        x = sampler(ema, latents, y, cls, num_steps=config.log.sample_steps, guidance=config.log.guidance())
    images = vae.decode(x[:, :4].float())  # (n, 3, H, W) uint8
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    H, W = images.shape[-2:]
    grid = torch.zeros(3, rows * H, cols * W, dtype=torch.uint8)
    for i, image in enumerate(images.cpu()):
        r, q = divmod(i, cols)
        grid[:, r * H : (r + 1) * H, q * W : (q + 1) * W] = image
    return grid.permute(1, 2, 0).numpy()


def _memory() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {}


def trained_image_size(weights: dict) -> int | None:
    """The image side a SiT's weights were trained at, from its (1, N, D) position table and its
    (D, C, p, p) patch embedding: √N tokens × p latent pixels × 8; None if they lack either."""
    weights = strip_module_prefix(weights)
    table, embed = weights.get("pos_embed"), weights.get("x_embedder.proj.weight")
    if table is None or embed is None or table.ndim != 3 or embed.ndim != 4:
        return None
    return math.isqrt(table.shape[1]) * embed.shape[-1] * LATENT_DOWNSAMPLE


def check_trained_resolution(made_at: int, built: SiTConfig, *, what: str, fix: str) -> None:
    """Refuse weights trained at ``made_at``² images for a SiT built for another resolution."""
    if made_at != built.image_size:
        raise ConfigError(f"{what} was trained on {made_at}² images, but data.dir holds {built.image_size}² images "
                          f"({built.input_size}² latents); {fix}")


def _resume_point(run_dir: str, resume: str | None) -> tuple[Path, dict] | None:
    """The checkpoint every process resumes from (:func:`reglue.checkpoint.resolve_resume`), chosen by the
    main process and loaded by each: processes choosing alone could resume from different steps (a file
    system that shows nodes different files, a file damaged in one node's cache) and split the run."""
    def choose() -> str | None:
        found = ckpt.resolve_resume(run_dir, resume, log.warning)
        return None if found is None else str(found[0])

    chosen = main_value("choosing the checkpoint to resume from", choose)
    return None if chosen is None else (Path(chosen), ckpt.load_checkpoint(chosen))


def train(config: RunConfig, resume: str | None = None, stop_after_steps: int | None = None) -> TrainResult:
    """Train ``config`` (resume: None = fresh run, "auto" = newest valid checkpoint, or a path).

    ``stop_after_steps`` ends the run (with a checkpoint) after that many steps in this call —
    what an interruption does; used by the resume tests.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    process_state(timeout_s=config.train.dist_timeout)  # the process group, with the run's collective timeout
    found = _resume_point(config.run_dir, resume)
    # every check against the data and this machine, before any file
    inputs = open_run_inputs(config, recorded=found[1].get("inputs") if found is not None else None)
    config = inputs.config
    torch.backends.cuda.matmul.allow_tf32 = config.train.tf32
    torch.backends.cudnn.allow_tf32 = config.train.tf32
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.train.find_unused_parameters)
    accelerator = Accelerator(mixed_precision=ACCELERATE_PRECISION[config.train.precision], cpu=on_cpu_only(),
                              kwargs_handlers=[ddp])
    trainer = Trainer(inputs, accelerator)
    if found is not None:
        path, payload = found
        trainer.restore(payload)
        found = payload = None  # its tensors map the checkpoint file: released, a pruned file's space is freed
        log.info("resumed from %s at step %d", path, trainer.step)
    else:
        if config.model.init_from:
            trainer.init_from_authors(config.model.init_from)
        trainer.measure_semantic_norm()  # loss.semantic_norm: a resumed run has them from its checkpoint

    def write_config() -> None:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        config.save(trainer.run_dir / "config.yaml")

    on_main("writing config.yaml", write_config)
    return trainer.run(stop_after_steps)

