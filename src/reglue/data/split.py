"""Held-out rows: the one splitter behind the teacher's probe and the compressor's validation images.

:func:`held_out_split` visits the rows in a seeded permutation ((seed, SPLIT_STREAM),
:mod:`reglue.seeding`) and ranks each row within its class in that order. The held-out rows are
the first ``count`` by (rank, class): the classes take turns, so their held-out counts differ by
at most one (class-balanced), until a class reaches its limit, ⌊``max_fraction`` · its size⌋;
it then gives no more and the others go on. Unlabelled rows (one label for all) make this the
first ``count`` rows of the permutation. Which rows are held out depends on the labels, the count,
the limit and the seed only, never on the number of processes.
"""

from __future__ import annotations

import torch

from reglue.errors import InputError
from reglue.seeding import SPLIT_STREAM, seeded_generator


def held_out_split(labels: torch.Tensor, count: int, *, seed: int, max_fraction: float = 1.0
                   ) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows), each sorted, of the N rows with (N,) int ``labels`` (see the module
    doc): at most ``count`` rows held out, at most ⌊max_fraction · size⌋ of each class; fewer when the
    limits are reached."""
    if count < 0 or not 0.0 <= max_fraction <= 1.0:
        raise InputError(f"count must be >= 0 and max_fraction in [0, 1]; found {count} and {max_fraction}.")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    num_rows = len(labels)
    order = torch.randperm(num_rows, generator=seeded_generator(seed, SPLIT_STREAM))  # (N,) rows
    _, klass, sizes = torch.unique(labels[order], return_inverse=True, return_counts=True)  # (N,), (K,)
    grouped = torch.argsort(klass, stable=True)  # positions class by class, each in permutation order
    rank = torch.empty(num_rows, dtype=torch.int64)
    rank[grouped] = torch.arange(num_rows) - (sizes.cumsum(0) - sizes).repeat_interleave(sizes)
    eligible = (rank < (sizes * max_fraction).floor().long()[klass]).nonzero().squeeze(1)  # within the limits
    turns = rank[eligible] * len(sizes) + klass[eligible]  # (rank, class): the classes take turns
    held = order[eligible[torch.argsort(turns)][:count]]
    is_held = torch.zeros(num_rows, dtype=torch.bool)
    is_held[held] = True
    return (~is_held).nonzero().squeeze(1).tolist(), is_held.nonzero().squeeze(1).tolist()
