"""Training checkpoints (SPEC §9): atomic save, exact resume, pruning, the newest valid file.

A run directory keeps its training state as ``checkpoints/step-{step:09d}.pt``, one
``torch.save`` dict per file::

    {"format": "reglue-train-state", "version": 1, "step": step, **payload, "complete": True}

``payload`` is the caller's: model/EMA/optimiser/grad-scaler state dicts, the resolved config
as a plain dict, one :func:`capture_rng_state` per rank, the data-order position. Only the main
process should save; gathering the other ranks' RNG states is the caller's job. A trainer that
keeps one state file under a fixed name (the semantic compressor's ``train_state.pt``) writes
it with :func:`save_state_file` and reads it with :func:`load_checkpoint`: same format, same
rules, no pruning. To write while training goes on, a trainer saves :func:`host_copy` of its
payload in a :class:`BackgroundWriter`.

Rules this module keeps:

- A checkpoint counts only once it is complete. It is written to a temporary file beside its
  final name, fsynced and renamed (:func:`reglue.io.atomic_write`), and carries
  ``"complete": True``; a process killed while writing leaves at most a hidden
  ``.step-*.pt.tmp-*`` file, which :func:`list_checkpoints` ignores and the next save removes.
- Nothing is unpickled but tensors and plain values: files load with
  ``torch.load(weights_only=True)`` onto the CPU. To keep that true, :func:`save_checkpoint`
  walks the payload before writing and refuses anything else (a dataclass, a NumPy array, a
  ``Path``), naming the entry. The walk costs nothing next to serialising the tensors, unlike a
  trial save-and-load round trip, which would double the time and memory of every save.
- Pruning after each save keeps the newest ``keep_last`` checkpoints by step, every milestone
  step, and always the file just written (even when files with higher steps exist, e.g. after
  resuming from an explicit older checkpoint: those are kept too, and ``--resume auto`` would
  pick them).
- Resuming takes the newest checkpoint that loads and carries the format, version and completion
  marker; a truncated or otherwise unreadable one is reported and skipped. Silent bit flips in
  tensor data are not detected: ``torch.save`` stores a CRC-32 per record, but checking it means
  reading every byte, which neither ``torch.load`` nor this module does.
- Files load memory-mapped (``torch.load(mmap=True)``): the returned tensors are views of a
  private (copy-on-write) mapping of the file, so loading reads only the pickled structure and
  the zip records' headers, not the tensor data; pages are read when a tensor is first used
  (e.g. copied by ``load_state_dict``) and live in the page cache, which every process on a
  machine that maps the same file shares. Writing into a loaded tensor (an optimiser on the CPU
  keeps the loaded moments and updates them in place) copies the page it writes into private
  memory and never changes the file. Checking a candidate for ``--resume auto`` therefore costs
  a few reads, whatever the checkpoint's size.
- Consequences of the mapping: an unlinked file (pruned, or replaced by a rename) stays readable
  through it until its tensors are freed, and its disk space is released only then; on NFS the
  client that unlinks a file it still maps keeps it as a hidden ``.nfs<hex digits>`` file beside it
  until then, while a process on *another* machine that still reads it fails. Release the
  loaded state once it is copied into the model and optimiser. A medium error in tensor data
  (EIO) or a file truncated in place while mapped surfaces as SIGBUS when the page is touched,
  not as an exception; the writers here never truncate in place (they rename a finished file).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from reglue.errors import InputError
from reglue.io import atomic_write

FORMAT = "reglue-train-state"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_RESERVED_KEYS = ("format", "version", "step", "complete")
_CHECKPOINT_NAME = re.compile(r"step-(\d+)\.pt")
_STALE_TEMP_GLOB = ".step-*.pt.tmp-*"  # what atomic_write leaves behind a killed process
# Exact types a weights_only load rebuilds without allow-listing (tested in test_checkpoint.py).
_PLAIN_LEAVES = (type(None), bool, int, float, str, torch.dtype, torch.Tensor, torch.nn.Parameter)
_PLAIN_MAPPINGS = (dict, OrderedDict)
_PLAIN_SEQUENCES = (list, tuple, torch.Size)

_logger = logging.getLogger(__name__)


class CheckpointError(InputError):
    """A checkpoint (or run directory) training cannot resume from; says where and why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# ----------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict:
    """Every global random generator of this process, as tensors and plain values.

    Keys: ``python`` (``random.getstate()``: ints and the cached Gaussian), ``numpy`` (NumPy's
    global MT19937: ``key`` as an int64 tensor of 624 words, ``pos``, ``has_gauss``,
    ``cached_gaussian``), ``torch`` (the CPU generator, uint8 tensor) and ``cuda`` (one uint8
    tensor per visible CUDA device, empty without CUDA). Loads with ``weights_only=True``.
    """
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": name,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Undo draws since :func:`capture_rng_state`: the next draws repeat those that followed it.

    CUDA state ``i`` goes to device ``i`` for the devices this machine has; states beyond them
    (a checkpoint from a machine with more GPUs) or without CUDA at all are ignored.
    """
    missing = [k for k in ("python", "numpy", "torch", "cuda") if k not in state]
    if missing:
        raise InputError(
            f"RNG state lacks {missing}; expected the dict capture_rng_state() returns "
            f"(keys python, numpy, torch, cuda), found keys {sorted(state)}."
        )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["bit_generator"],
        numpy_state["key"].cpu().numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def restore_process_rng_state(states: list[dict], process_index: int, num_processes: int) -> None:
    """Restore this process's entry of ``states`` (one :func:`capture_rng_state` per process, gathered at
    a checkpoint) when the run resumes on as many processes; on another count the states do not map
    onto the processes and the generators are left as seeded."""
    if len(states) == num_processes:
        restore_rng_state(states[process_index])


# ----------------------------------------------------------------------------- saving


def host_copy(value: object) -> object:
    """``value`` (a payload of dicts, lists and tuples) with every tensor copied to the host: a snapshot
    that a checkpoint written in the background can hold while training changes the live tensors."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((key, host_copy(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(item) for item in value)
    return value


class BackgroundWriter:
    """Runs one write at a time in a thread, so that training goes on while a checkpoint is written.

    :meth:`wait` joins the write in progress and raises its error, if any. The thread is not a daemon: an
    interpreter that exits normally waits for it; a run ending in an error calls :meth:`finish` to wait
    for it and log its failure. A file cut short by a kill is a hidden temporary file, never a checkpoint."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, write: Callable[[], None]) -> None:
        """Run ``write`` in the background, once the write before it (:meth:`wait`, which may raise) is done."""
        self.wait()

        def run() -> None:
            try:
                write()
            except BaseException as err:  # reported by the next wait(), in the training thread
                self._error = err

        self._thread = threading.Thread(target=run, name="reglue-checkpoint-writer")
        self._thread.start()

    def wait(self) -> float:
        """Seconds spent waiting for the write in progress (0 when none); raises the error of the last write."""
        start = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return time.perf_counter() - start

    def finish(self, log: Callable[..., None] = _logger.error) -> None:
        """Wait for the write in progress and report its failure through ``log`` instead of raising it (a run
        that is already ending in another error)."""
        try:
            self.wait()
        except Exception as err:  # reported, not raised: the run's own error is the one to raise
            log("the checkpoint being written when the run failed was not written: %s: %s", type(err).__name__, err)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``run_dir/checkpoints/step-{step:09d}.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:09d}.pt"


def _check_plain(value: object, where: str) -> None:
    """Raise ValueError unless ``value`` is made of tensors and plain Python values only."""
    kind = type(value)
    if kind in _PLAIN_LEAVES:
        return
    if kind in _PLAIN_MAPPINGS:
        for key, item in value.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if kind in _PLAIN_SEQUENCES:
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise InputError(
        f"checkpoint {where} is a {kind.__module__}.{kind.__qualname__}; a checkpoint holds only "
        "tensors and plain values (dict, list, tuple, str, int, float, bool, None) so that it "
        "loads with weights_only=True. Convert it first (dataclasses.asdict(config), "
        "torch.from_numpy(array), str(path), float(numpy_scalar))."
    )


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    payload: dict,
    keep_last: int = 3,
    milestones: Iterable[int] = (),
) -> Path:
    """Write ``payload`` as the checkpoint of ``step`` atomically, then prune older ones.

    Returns the path written. Raises ValueError before writing anything if ``payload`` holds
    something other than tensors and plain values, or uses a key the format reserves.
    """
    if keep_last < 1:
        raise InputError(f"keep_last must be at least 1 (the newest checkpoint is what resumes), found {keep_last}.")
    path = save_state_file(checkpoint_path(run_dir, step), step, payload)
    for stale in path.parent.glob(_STALE_TEMP_GLOB):
        stale.unlink(missing_ok=True)
    _prune(run_dir, keep_last, set(milestones), just_written=path)
    return path


def save_state_file(path: str | Path, step: int, payload: dict) -> Path:
    """Write ``payload`` as one training-state file at ``path``, in the checkpoint format.

    The same guarantees as :func:`save_checkpoint` (format, version, ``step``, completion
    marker, plain values only, atomic write; :func:`load_checkpoint` reads it back) for a
    state kept under one fixed name, e.g. the compressor's ``train_state.pt``; no pruning.
    Returns ``path``.
    """
    if type(step) is not int or step < 0:
        raise InputError(f"step must be a non-negative int, found {step!r}.")
    if type(payload) is not dict:
        raise InputError(f"checkpoint payload must be a dict, found {type(payload).__name__}.")
    reserved = [k for k in _RESERVED_KEYS if k in payload]
    if reserved:
        raise InputError(
            f"checkpoint payload uses reserved key(s) {reserved}; the checkpoint format sets "
            f"{list(_RESERVED_KEYS)} itself. Rename those entries."
        )
    _check_plain(payload, "payload")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, "step": step, **payload, "complete": True}
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a writer killed mid-save
        stale.unlink(missing_ok=True)
    return path


def load_state_file(path: str | Path, *, kind: str, resuming: str, owner: str, fix: str) -> dict | None:
    """The training-state file at ``path`` (:func:`save_state_file`) if there is one, else None.

    Its ``"kind"`` entry must be ``kind``. Raises :class:`CheckpointError`
    ``"cannot resume {resuming} from it: {reason} To train afresh, {fix}"`` when it does not load, and
    ``"holds the training state of {its kind!r}, not of {owner} ({kind!r}); {fix}"`` for another kind.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(path, f"cannot resume {resuming} from it: {err.reason} To train afresh, {fix}") from err
    if state.get("kind") != kind:
        raise CheckpointError(path, f"holds the training state of {state.get('kind', 'another trainer')!r}, not of "
                              f"{owner} ({kind!r}); {fix}")
    return state


def _prune(run_dir: str | Path, keep_last: int, milestones: set[int], just_written: Path) -> None:
    """Delete checkpoints outside the newest ``keep_last``, the milestones and ``just_written``."""
    checkpoints = list_checkpoints(run_dir)
    newest = {path.name for _, path in checkpoints[-keep_last:]}
    for step, path in checkpoints:
        if path.name not in newest and step not in milestones and path.name != just_written.name:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- loading


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoints/step-*.pt`` file, by step ascending."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match[1]), path))
    return sorted(found)


def _load_mapped(path: Path) -> object:
    """``torch.load`` of ``path`` onto the CPU, ``weights_only``, its tensors memory-mapped.

    A plain load reads every record through the zip reader, which refuses a record whose local
    header is damaged; a mapped load only reads the length fields of those headers to find the
    data, so a block of garbage over a header would shift a tensor silently. Opening each record
    with :mod:`zipfile` restores that check (signature and name of every header, no data read).
    """
    with zipfile.ZipFile(path) as archive:
        for record in archive.infolist():
            archive.open(record).close()
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU (``weights_only``, memory-mapped) and check it is ours and complete.

    Tensors are views of the file's mapping (see the module doc); the data is read when used.
    Raises :class:`CheckpointError` if the file is missing, truncated or corrupt, holds pickled
    objects, is not a reglue training checkpoint (e.g. an older reglue's format), has another
    format version, or lacks the completion marker.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            path, "not found; pass an existing checkpoints/step-*.pt file, or --resume auto for the newest valid one."
        )
    try:
        state = _load_mapped(path)
    # Damage surfaces as almost any exception: BadZipFile (truncated: no central directory;
    # a damaged record header), UnpicklingError (also for pickled objects), RuntimeError from
    # torch's zip reader, EOFError, OSError/ValueError, IndexError/KeyError/UnicodeDecodeError
    # from garbage fed to the unpickler. Whatever is raised, this file cannot be resumed from.
    except Exception as err:
        message = str(err).strip()
        reason = f"{type(err).__name__}: {message.splitlines()[0][:200]}" if message else type(err).__name__
        raise CheckpointError(
            path,
            f"cannot be loaded ({reason}); the file is truncated or corrupt, or holds pickled "
            "objects other than tensors. Resume from another checkpoint.",
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        if isinstance(state, dict) and isinstance(state.get("format"), str):  # e.g. an older reglue's format
            found = f"format={state['format']!r}"
            hint = "a file an older reglue wrote resumes only with that version."
        else:
            found = type(state).__name__
            if isinstance(state, dict):
                found = f"a dict with keys {sorted(map(str, state))[:6]}"
            hint = "the authors' checkpoints load with reglue.models.official.load_authors_checkpoint."
        raise CheckpointError(
            path, f"not a reglue training checkpoint (expected a dict with format={FORMAT!r}, found {found}); "
            + hint,
        )
    if state.get("version") != VERSION:
        raise CheckpointError(
            path,
            f"checkpoint format version {state.get('version')!r}, but this reglue reads version {VERSION}; "
            "resume with the reglue version that wrote it.",
        )
    if state.get("complete") is not True:
        raise CheckpointError(
            path, "lacks the completion marker ('complete': True), so it was never finished; resume from another checkpoint."
        )
    return state


def latest_valid_checkpoint(
    run_dir: str | Path, log: Callable[[str], None] = _logger.warning
) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, as ``(path, state)``; None if there are none at all.

    Each invalid file on the way is reported through ``log`` as ``"skipping <path>: <reason>"``.
    Raises :class:`CheckpointError` listing every file when checkpoints exist but none is valid.
    """
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return None
    problems = []
    for _, path in reversed(checkpoints):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            log(f"skipping {path}: {err.reason}")
            problems.append(f"{path.name}: {err.reason}")
    raise CheckpointError(
        Path(run_dir) / CHECKPOINT_DIR,
        f"none of the {len(checkpoints)} checkpoint(s) is valid:\n  " + "\n  ".join(problems)
        + "\nMove them away to start afresh, or choose a new run directory.",
    )


def resolve_resume(
    run_dir: str | Path, resume: str | None, log: Callable[[str], None] = _logger.warning
) -> tuple[Path, dict] | None:
    """What training starts from: None (fresh) or ``(path, state)`` of a checkpoint.

    ``resume``: None or "" starts fresh and refuses a ``run_dir`` that already holds
    checkpoints; "auto" takes :func:`latest_valid_checkpoint` (None when there is none); any
    other value is the path of one checkpoint file, which must load.
    """
    if not resume:
        checkpoints = list_checkpoints(run_dir)
        if checkpoints:
            raise CheckpointError(
                Path(run_dir),
                f"already holds {len(checkpoints)} checkpoint(s) up to step {checkpoints[-1][0]}; "
                "pass --resume auto to continue that run, or choose a new run directory.",
            )
        return None
    if resume == "auto":
        return latest_valid_checkpoint(run_dir, log)
    path = Path(resume)
    return path, load_checkpoint(path)
