"""Index-addressed randomness (DESIGN practice 8): one generator per (seed, stream, index).

Every random draw that decides a result comes from :func:`seeded_generator` with the run seed,
one of the named streams below and an index (epoch, step, sample), never from a generator
shared across them. A resumed run therefore replays the same draws, and a sample or a batch
gets the same randomness whatever the number of processes or the batch size. The streams are
listed together so two uses can never collide.
"""

from __future__ import annotations

import numpy as np
import torch

SPLIT_STREAM = 0  # (seed, SPLIT_STREAM): held-out images (reglue.data.split)
SHUFFLE_STREAM = 1  # (seed, SHUFFLE_STREAM, epoch): the order of an epoch
STEP_STREAM = 2  # (seed, STEP_STREAM, step): a training step's times, noises and label dropout
NOISE_STREAM = 3  # (seed, NOISE_STREAM, i): sample i's initial and per-step noise
LABEL_STREAM = 4  # (seed, LABEL_STREAM, i): sample i's random class
PROBE_STREAM = 5  # (seed, PROBE_STREAM, part): the teacher probe's bounded subsets of rows
LINEAR_PROBE_STREAM = 6  # (seed, LINEAR_PROBE_STREAM, epoch): the linear probe's minibatch order


def seeded_generator(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` for one named stream of the run seed (SeedSequence mixing, no collisions).

    The seed is the same on every device, but the numbers drawn are the device's: a CUDA generator
    draws other values than a CPU one from the same seed."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))
