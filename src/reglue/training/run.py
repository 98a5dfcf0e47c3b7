"""One resumable run: the skeleton every trainer (SiT, semantic compressor, DINOv2 teacher) plugs into.

A trainer brings its model, data and step; :class:`ResumableRun` owns the rest of a run's life:

- the run directory and the settings that decide its results (``config``, a JSON-able dict): a
  resume with other settings is refused, naming every differing key
  (:func:`reglue.settings.check_same_settings`), and a finished run is found by its record
  (:meth:`ResumableRun.finished`) instead of being trained again;
- the train state: one ``train_state.pt`` written atomically in the checkpoint format
  (:func:`reglue.checkpoint.save_state_file`: format, version, completion marker, plain values),
  holding the trainer's parts, its kind, the settings and every process's RNG states, gathered
  (:meth:`ResumableRun.rng_states`) and restored on as many processes (:meth:`ResumableRun.restore_rng`).
  The SiT trainer keeps a pruned history of such files instead (``checkpoints/step-*.pt``) and
  uses the rest of the base as is;
- where the run stands (:class:`Position`: epoch, step within it, global step), the progress bar,
  the metrics log (opened by the main process, a silent logger on the others);
- SIGINT/SIGTERM: :class:`StopFlag` notes the request; the trainer checkpoints at the next step
  every process agrees on (:meth:`ResumableRun.stop_requested`) and stops; the epoch-based trainers
  then raise :class:`RunStopped`, whose message says how to resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from reglue.checkpoint import capture_rng_state, load_state_file, restore_process_rng_state, save_state_file
from reglue.distributed import on_main
from reglue.errors import InputError, ReglueError
from reglue.progress import progress_bar
from reglue.settings import SettingsError, check_same_settings
from reglue.training.metrics import MetricsLogger
from reglue.training.order import process_batches

TRAIN_STATE = "train_state.pt"

log = logging.getLogger(__name__)


class RunStopped(ReglueError):
    """A stop signal ended the run after a checkpoint; the message says where it stands and how to resume."""


class StopFlag:
    """Set by SIGINT/SIGTERM: the run checkpoints and stops within a step or two, every process at the
    same step (each trainer says when it reads the flag).

    A second Ctrl-C aborts at once; checkpoints are written atomically, so the last one stays whole."""

    def __init__(self) -> None:
        self.raised = False

    def __call__(self, signum, frame) -> None:
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: stopped without a checkpoint (the last one is intact)")
        self.raised = True
        log.warning("stop requested: checkpointing before stopping (press Ctrl-C again to abort without one)")

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@dataclass
class Position:
    """Where an epoch-based run stands; a resume restores it with the weights."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps finished in the current epoch
    global_step: int = 0

    def advance(self) -> None:
        self.step_in_epoch += 1
        self.global_step += 1

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0


class ResumableRun:
    """The run directory, resume, train state, signals, progress bar and metrics of one training run.

    ``config``: the settings that decide the results (JSON-able), recorded in every state and record
    and compared on resume outside the ``free`` keys (prefixes; :func:`check_same_settings`).
    ``name`` ("the compressor") speaks in messages, ``fix`` says how to start over; ``kind`` is the
    ``"kind"`` entry of the train state (whose state it is) and ``owner`` names it in the refusal of
    another kind. ``error``: the class of a settings refusal; ``what``: its subject (default
    "{name} run in {out_dir}"). Every process builds one; every method but :meth:`finished` and
    :meth:`load_state` is a collective or reads only this process's state.
    """

    def __init__(self, out_dir: str | Path, config: dict, accelerator, *, name: str, fix: str,
                 kind: str | None = None, owner: str | None = None, free: Sequence[str] = (),
                 error: type[InputError] = SettingsError, what: str | None = None):
        self.out_dir, self.config, self.acc = Path(out_dir), config, accelerator
        self.name, self.fix, self.kind, self.owner, self.free, self.error = name, fix, kind, owner, tuple(free), error
        self.what = what or f"{name} run in {self.out_dir}"
        self.stop = StopFlag()

    @property
    def state_path(self) -> Path:
        return self.out_dir / TRAIN_STATE

    # ------------------------------------------------------------------ settings and records
    def check_settings(self, recorded: dict, *, free: Sequence[str] = ()) -> None:
        """Refuse ``recorded`` settings that differ from this run's outside the free keys (and ``free``)."""
        check_same_settings(recorded, self.config, what=self.what, fix=self.fix, free=self.free + tuple(free),
                            error=self.error)

    def finished(self, record: str, *, outputs: Sequence[str] = ()) -> dict | None:
        """The JSON ``record`` a finished run leaves in ``out_dir`` (with its ``outputs`` beside it), or None
        when there is none; its ``"config"`` must be this run's settings (else refused)."""
        path = self.out_dir / record
        if not path.is_file() or not all((self.out_dir / name).is_file() for name in outputs):
            return None
        saved = json.loads(path.read_text())
        self.check_settings(saved["config"])
        return saved

    def start_over(self, files: Sequence[str]) -> None:
        """Main process: create ``out_dir`` and delete ``files`` of an earlier run, none of which may pass
        for this one's."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name in files:
            (self.out_dir / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ train state
    def load_state(self) -> dict | None:
        """``train_state.pt`` if there is one, checked to be this kind's with these settings; an invalid
        one is refused, not ignored (restarting would throw away what it holds)."""
        state = load_state_file(self.state_path, kind=self.kind, resuming=self.name, owner=self.owner, fix=self.fix)
        if state is not None:
            self.check_settings(state["config"])
        return state

    def rng_states(self) -> list[dict]:
        """Every process's RNG states (:func:`capture_rng_state`), in process order; a collective."""
        from accelerate.utils import gather_object

        return gather_object([capture_rng_state()])

    def restore_rng(self, states: list[dict]) -> None:
        """This process's entry of gathered ``states`` when the run resumes on as many processes."""
        restore_process_rng_state(states, self.acc.process_index, self.acc.num_processes)

    def save_state(self, step: int, parts: dict) -> None:
        """Write ``train_state.pt``: ``parts`` with the kind, the settings and every process's RNG states,
        atomically, by the main process; every process must call it."""
        rng = self.rng_states()
        payload = {"kind": self.kind, "config": self.config, **parts, "rng": rng}
        on_main(f"saving {self.state_path}", lambda: save_state_file(self.state_path, step, payload))

    # ------------------------------------------------------------------ stopping
    def any_process(self, raised: bool) -> bool:
        """Whether ``raised`` holds on any process (every process must call it at the same point)."""
        if self.acc.num_processes == 1:
            return raised
        return bool(self.acc.reduce(torch.tensor(float(raised), device=self.acc.device), "sum") > 0)

    def epoch_batches(self, position: Position, num_rows: int, global_batch: int, seed: int) -> list[list[int]]:
        """This process's batches (indices into ``num_rows`` rows) for the rest of ``position``'s epoch, in the
        index-addressed order of :func:`reglue.training.order.process_batches`: a resumed epoch skips the
        batches it finished."""
        return process_batches(num_rows, global_batch, seed=seed, epoch=position.epoch, rank=self.acc.process_index,
                               num_processes=self.acc.num_processes, start_step=position.step_in_epoch)

    def stop_requested(self) -> bool:
        """Whether a process got SIGINT/SIGTERM (a collective: every process at the same step)."""
        return self.any_process(self.stop.raised)

    def after_step(self, position: Position, loss: float, bar, *, checkpoint_every: int,
                   checkpoint: Callable[[], None]) -> None:
        """Once a step is counted: the bar, then ``checkpoint`` every ``checkpoint_every`` steps and on a
        stop request, which then ends the run with :class:`RunStopped`."""
        bar.update(1)
        bar.set_postfix(epoch=position.epoch + 1, loss=f"{loss:.4f}")
        stop = self.stop_requested()
        if stop or position.global_step % checkpoint_every == 0:
            checkpoint()
        if stop:
            raise RunStopped(f"{self.name} stopped at step {position.global_step} on a stop signal; its state is "
                             f"in {self.state_path}: run the same command again to resume.")

    # ------------------------------------------------------------------ progress and metrics
    def progress_bar(self, *, total: int, initial: int, desc: str, enabled: bool = True):
        """The run's progress bar in steps (the main process's only)."""
        return progress_bar(total=total, initial=initial, unit="step", desc=desc,
                            enabled=enabled and self.acc.is_main_process)

    def open_metrics(self, *, resume_step: int | None, **options) -> MetricsLogger:
        """The run's metrics logger (``options``: tensorboard, wandb, wandb_project), opened by the main
        process (its failure stops every process with the cause); one that writes nothing on the others."""
        opened = on_main(f"opening the metrics log in {self.out_dir}", lambda: MetricsLogger(
            self.out_dir, config=self.config, resume_step=resume_step, **options))
        return opened or MetricsLogger(self.out_dir, enabled=False)
