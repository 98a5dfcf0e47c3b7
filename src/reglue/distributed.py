"""Process state for single- and multi-process runs (``accelerate launch``, ``torchrun``, ``srun``).

A section that only the main process runs (writing a shared file, scoring, packing) goes through
:func:`on_main`: when it fails, every process stops with the same one-line cause
(:class:`MainProcessFailed` on the others) instead of waiting in its next collective until the
timeout, whatever started the processes. ``on_main`` catches every exception of the section on the
main process, ``KeyboardInterrupt`` and ``SystemExit`` included, tells the others, then re-raises it
unchanged. What it cannot cover: a main process killed outright (SIGKILL, the OOM killer) or any
process failing outside such a section; the others then learn it from their next collective — gloo
reports the closed connection, NCCL waits for its timeout (docs/training.md, "When one process fails").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from reglue.errors import ReglueError

T = TypeVar("T")


class MainProcessFailed(ReglueError):
    """Raised on every other process when a section of the main process failed; names the cause."""


def on_cpu_only() -> bool:
    """True without a GPU: accelerate must then be told so, or it ignores torchrun's ranks."""
    return not torch.cuda.is_available()


DEFAULT_TIMEOUT_S = 1800  # how long a collective waits (torch's NCCL default, 10 min, is shorter than a
# main process packing 50K samples into a .npz or writing a large checkpoint, while the others wait)


def process_state(timeout_s: float = DEFAULT_TIMEOUT_S):
    """accelerate's ``PartialState``: rank, world size, device, barrier; gloo on CPU-only machines.

    The first call in a process sets up the process group: ``timeout_s`` is then how long a collective
    waits for a missing process before the process fails. Later calls return the same state; their
    ``timeout_s`` does not apply. Every command calls this before anything else starts the group."""
    from accelerate import PartialState

    return PartialState(cpu=on_cpu_only(), timeout=timedelta(seconds=timeout_s))


def end_process_group() -> None:
    """Every process of the group reaches this point, then the group is torn down (a no-op without one).

    A process that exits while another still holds its connections can make that one abort: gloo's
    background thread sees the closed peer and the process dies with "terminate called without an
    active exception" (SIGABRT) after its work is done. Commands call this once they succeeded; after a
    failure the processes stop through the shared failure instead (:func:`on_main`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def main_process_log(log: Callable[[str], None], is_main_process: bool) -> Callable[[str], None]:
    """``log`` on the main process, a no-op on the others: a run's lines are written once."""
    return log if is_main_process else lambda message: None


def _several_processes() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _failure(error: BaseException) -> str:
    """``Type: first line of the message`` (``Type`` alone when the message is empty)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _share(failure: str | None) -> str | None:
    """The main process's outcome (None: done; else the failure) sent to every process, received by all.

    Two small broadcasts (size, bytes). On NCCL, torch stages the bytes on ``torch.cuda.current_device()``,
    which accelerate sets to each process's own GPU; gloo and mixed ``cpu:gloo,cuda:nccl`` groups use the CPU.
    """
    outcome = [failure]
    dist.broadcast_object_list(outcome, src=0)
    return outcome[0]


def on_main(what: str, work: Callable[[], T]) -> T | None:
    """Run ``work`` on the main process (global rank 0) only; then every process learns whether it failed.

    Returns ``work()``'s value on the main process and None on the others. Every process must call it
    at the same point, like any collective. When ``work`` raises (``KeyboardInterrupt`` and ``SystemExit``
    too), the main process re-raises the original exception after telling the others, which raise
    :class:`MainProcessFailed`: "the main process failed while ``what``: Type: first line". Without a
    process group of several processes it just runs ``work``.
    """
    if not _several_processes():
        return work()
    if dist.get_rank() != 0:
        failure = _share(None)
        if failure is not None:
            raise MainProcessFailed(f"the main process failed while {what}: {failure}")
        return None
    try:
        result = work()
    except BaseException as error:
        # the others may be gone already (a second signal, a dead peer): this error is the one to report
        with contextlib.suppress(Exception):
            _share(_failure(error))
        raise
    _share(None)
    return result


def main_value(what: str, work: Callable[[], T]) -> T:
    """:func:`on_main`, with ``work()``'s value given to every process (one more broadcast): one decision
    for all, where each process deciding alone could differ (a file system that shows nodes different
    files). The value must pickle."""
    value = on_main(what, work)
    if not _several_processes():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def on_rank_zero(rank: int, what: str, work: Callable[[], T]) -> T | None:
    """:func:`on_main` for code told its ``rank`` (functions with ``rank=`` / ``world_size=`` parameters):
    the same under a process group, whose global rank 0 runs ``work``; without one, ``work`` runs only when
    ``rank`` is 0, so that one process can play rank ``rank`` of several (as the world-size tests do)."""
    return on_main(what, work if rank == 0 else lambda: None)


def gather_strided(local: torch.Tensor, total: int) -> torch.Tensor:
    """Every process's share of ``total`` rows, gathered on every process in row order.

    Process ``rank`` of ``world`` holds rows ``rank, rank + world, …`` (``rows[rank::world]``) as ``local``
    (n_rank, *row) on its device (its GPU under NCCL); the result is (total, *row), row i from process
    i mod world. The shares are padded to the largest one for one ``all_gather``. Without a process group of
    several processes, ``local`` is returned as it is."""
    if not _several_processes():
        return local
    world = dist.get_world_size()
    share = -(-total // world)  # the largest share: ceil(total / world) rows
    padded = local.new_zeros((share, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = torch.arange(total, device=local.device)
    return torch.cat(parts)[(rows % world) * share + rows // world]  # row i: process i mod world, place i // world


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (on this process's device: its GPU under NCCL) summed over every process, in place, and
    returned; the same values on each (one ``all_reduce``). Without a process group of several processes,
    ``tensor`` as it is."""
    if _several_processes():
        dist.all_reduce(tensor)
    return tensor
