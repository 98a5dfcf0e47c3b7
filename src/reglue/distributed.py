"""Process state for single- and multi-process runs (``accelerate launch``, ``torchrun``)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def on_cpu_only() -> bool:
    """True without a GPU: accelerate must then be told so, or it ignores torchrun's ranks."""
    return not torch.cuda.is_available()


def process_state():
    """accelerate's ``PartialState``: rank, world size, device, barrier; gloo on CPU-only machines."""
    from accelerate import PartialState

    return PartialState(cpu=on_cpu_only())


def main_process_log(log: Callable[[str], None], is_main_process: bool) -> Callable[[str], None]:
    """``log`` on the main process, a no-op on the others: a run's lines are written once."""
    return log if is_main_process else lambda message: None
