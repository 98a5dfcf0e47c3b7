"""Training metrics: one JSON-lines history per run, mirrored to TensorBoard and Weights & Biases.

``run_dir/metrics.jsonl`` holds one line per :meth:`MetricsLogger.log` call,
``{"step": 1200, "loss/total": 0.53, "lr": 0.0001, ...}``, flushed as it is written. It is strict
JSON: a non-finite value (NaN, ±inf) is written as ``null`` and :func:`read_metrics` gives it
back as ``float("nan")``. The file always holds a single history: a logger opened with
``resume_step=S`` first removes (atomically) every line with step > S, logged after the
checkpoint the run resumes from, and TensorBoard gets ``purge_step=S + 1`` to hide the same
events; a logger opened without ``resume_step`` starts a new history (an existing file is
replaced, older TensorBoard events are hidden).

Every line also holds ``wall_time_s``: seconds of training since the run started, counted from
when the logger was opened and continued across resumes: a resumed logger starts from the last
``wall_time_s`` it keeps, so time spent after that line by the interrupted process (steps that
are replayed) is not counted. ``reglue plot --x time`` draws against it. It is written to
metrics.jsonl only: TensorBoard and W&B keep their own wall clocks.

TensorBoard events go to ``run_dir/tensorboard`` under the keys given ("loss/latent" is tag
"loss/latent"). Weights & Biases (optional) keeps one W&B run per run directory, its id in
``run_dir/wandb_run_id``; W&B cannot rewind, so after a resume it ignores the replayed steps it
already has (their values are the same when the resume is exact) and continues after them.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import time
import uuid
from pathlib import Path
from types import ModuleType

import numpy as np

from reglue.errors import InputError, MissingExtraError
from reglue.io import atomic_write

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
WALL_TIME_KEY = "wall_time_s"

_logger = logging.getLogger(__name__)


def _require(module: str, purpose: str, fix: str) -> ModuleType:
    """Import ``module`` or raise a MissingExtraError saying what needed it and how to proceed."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"{purpose} needs the {module.split('.')[0]} package, which is not installed; "
                                f"{fix}.") from err


def _parse_record(line: str) -> dict | None:
    """The record a metrics line holds, or None when it holds none."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _parse_lines(path: Path) -> tuple[list[dict], int]:
    """The records of a metrics file as written (non-finite values as None) and how many trailing
    lines were skipped: only the last line may be unreadable (a crash mid-write)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        record = _parse_record(line)
        if record is None:
            if number == len(lines):
                return records, 1
            raise InputError(
                f"{path} line {number} is not a metrics record (a JSON object with an integer "
                f"'step'), found {line[:80]!r}; only the last line may be cut short by a crash. "
                "Delete or repair that line."
            )
        records.append(record)
    return records, 0


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl`` in order: {"step": int, key: float, ...}.

    Non-finite values come back as NaN. A cut-short last line (a crash while writing) is skipped
    with a logged warning; an unreadable line elsewhere is a ValueError naming it.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {METRICS_FILE} in {run_dir}; expected the directory of a run made by `reglue train`."
        )
    records, skipped = _parse_lines(path)
    if skipped:
        _logger.warning("%s: skipped %d cut-short last line (the run was interrupted while writing)",
                        path, skipped)
    return [{k: math.nan if v is None else v for k, v in record.items()} for record in records]


def _truncate_history(path: Path, first_new_step: int) -> list[dict]:
    """Rewrite ``path`` (atomically) keeping only well-formed records with step < first_new_step;
    returns the kept records."""
    kept = []
    if first_new_step > 0 and path.is_file():
        kept = [r for r in _parse_lines(path)[0] if r["step"] < first_new_step]
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept), encoding="utf-8")
    return kept


def _last_wall_time(records: list[dict]) -> float:
    """The last ``wall_time_s`` among ``records`` (0.0 when none holds one: a new run, or a history
    written before the key existed)."""
    times = [r[WALL_TIME_KEY] for r in records if isinstance(r.get(WALL_TIME_KEY), int | float)]
    return float(times[-1]) if times else 0.0


def _as_float(key: object, value: object) -> float:
    if not isinstance(key, str) or key in ("step", WALL_TIME_KEY):
        raise InputError(f"metric names must be strings other than 'step' and '{WALL_TIME_KEY}' (the logger "
                         f"writes those), found {key!r}; rename it.")
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"metric {key!r} must be a number (a float, or a one-element tensor), found "
            f"{type(value).__name__}; log .item() of it."
        ) from err


def _check_image(tag: str, image: object) -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        found = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"image {tag!r} must be a uint8 numpy array (H, W, 3), found {found}.")
    return image


def _wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id of this run directory: kept across resumes, new for a new history."""
    path = run_dir / WANDB_ID_FILE
    if resuming and path.is_file():
        return path.read_text(encoding="utf-8").strip()
    run_id = uuid.uuid4().hex[:12]
    with atomic_write(path) as tmp:
        tmp.write_text(run_id + "\n", encoding="utf-8")
    return run_id


class MetricsLogger:
    """Scalars and images of one training run to metrics.jsonl, TensorBoard and W&B; see the module doc.

    ``resume_step``: the step of the checkpoint a resumed run starts from (None for a new run).
    ``config`` (JSON-able) is handed to W&B. ``enabled=False`` (every process but the main one)
    makes every call a no-op and touches no file. A missing ``tensorboard`` or ``wandb`` package
    is reported when the logger is built, before any file is written.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str | None = None,
        config: dict | None = None,
        resume_step: int | None = None,
        enabled: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._file = self._tensorboard = self._wandb = self._wandb_run = None
        if not enabled:
            return
        if resume_step is not None and resume_step < 0:
            raise InputError(f"resume_step must be a step >= 0 or None for a new run, found {resume_step}.")
        first_new_step = 0 if resume_step is None else resume_step + 1
        tensorboard_module = wandb_module = None
        if tensorboard:
            tensorboard_module = _require("torch.utils.tensorboard", "TensorBoard logging",
                                          "`pip install tensorboard`, or set log.tensorboard=false")
        if wandb:
            wandb_module = _require("wandb", "Weights & Biases logging",
                                    "`pip install wandb`, or set log.wandb=false")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        self._time_before = _last_wall_time(_truncate_history(path, first_new_step))
        self._started = time.monotonic()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open until close())
        if tensorboard_module is not None:
            self._tensorboard = tensorboard_module.SummaryWriter(
                str(self.run_dir / TENSORBOARD_DIR), purge_step=first_new_step)
        if wandb_module is not None:
            self._wandb = wandb_module
            self._wandb_run = wandb_module.init(
                project=wandb_project, name=self.run_dir.name, dir=str(self.run_dir), config=config,
                id=_wandb_run_id(self.run_dir, resuming=resume_step is not None), resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        """Append {"step": step, **values, "wall_time_s": ...} to metrics.jsonl and send each value to
        TensorBoard/W&B."""
        if not self.enabled:
            return
        self._check_open()
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
            raise InputError(f"step must be an integer >= 0, found {step!r}.")
        step = int(step)
        floats = {key: _as_float(key, value) for key, value in values.items()}
        record = {"step": step, **{k: v if math.isfinite(v) else None for k, v in floats.items()},
                  WALL_TIME_KEY: round(self._time_before + time.monotonic() - self._started, 3)}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in floats.items():
                self._tensorboard.add_scalar(key, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(floats, step=step)

    def log_image(self, step: int, tag: str, image_uint8_hwc: np.ndarray) -> None:
        """Send a uint8 (H, W, 3) image (e.g. a sample grid) to TensorBoard and W&B."""
        if not self.enabled:
            return
        self._check_open()
        image = _check_image(tag, image_uint8_hwc)
        if self._tensorboard is not None:
            self._tensorboard.add_image(tag, image, global_step=step, dataformats="HWC")
        if self._wandb_run is not None:
            self._wandb_run.log({tag: self._wandb.Image(image)}, step=step)

    def _check_open(self) -> None:
        if self._file is None:
            raise RuntimeError(f"the metrics logger of {self.run_dir} is closed; open a new MetricsLogger "
                               "(with resume_step) to log more.")

    def close(self) -> None:
        """Flush and close every sink; later calls to close do nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
