"""Index-addressed data order shared by the trainers (DESIGN practice 8).

Epoch e visits the rows in the order of a permutation drawn from (seed, e); its global batch b
is rows [b·G, (b+1)·G) of that permutation, and process r takes the r-th slice of G/world rows.
The order depends only on (seed, epoch, step), so a resumed run continues exactly where the
interrupted one stopped, and changing the number of processes keeps the global batches.
"""

from __future__ import annotations

import torch

from reglue.errors import InputError
from reglue.seeding import SHUFFLE_STREAM, seeded_generator


def per_process_batch(global_batch: int, num_processes: int) -> int:
    """The batch each process trains on: global_batch / num_processes, which must divide."""
    if global_batch <= 0 or global_batch % num_processes:
        raise InputError(
            f"global_batch {global_batch} must be a positive multiple of the {num_processes} "
            f"processes; pick e.g. {num_processes * max(1, global_batch // num_processes)}."
        )
    return global_batch // num_processes


def process_batches(
    num_items: int, global_batch: int, *, seed: int, epoch: int, rank: int, num_processes: int,
    start_step: int = 0,
) -> list[list[int]]:
    """Row indices of this process's batches for steps ``start_step..`` of ``epoch``.

    Step s of the epoch is rows [s·G, (s+1)·G) of the (seed, epoch) permutation; process r
    takes rows [r·P, (r+1)·P) of them, P = G / num_processes. Partial global batches are dropped.
    """
    per = per_process_batch(global_batch, num_processes)
    order = torch.randperm(num_items, generator=seeded_generator(seed, SHUFFLE_STREAM, epoch))
    first_rows = (step * global_batch + rank * per for step in range(start_step, num_items // global_batch))
    return [order[i : i + per].tolist() for i in first_rows]
