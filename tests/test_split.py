"""The one held-out splitter (reglue.data.split): size, class balance, limits and seeding."""

from __future__ import annotations

import pytest
import torch

from reglue.data.split import held_out_split
from reglue.errors import InputError
from reglue.seeding import SPLIT_STREAM, seeded_generator


def test_unlabelled_rows_hold_out_the_first_count_of_the_seeded_permutation():
    train, held = held_out_split(torch.zeros(50, dtype=torch.int64), 7, seed=3)
    order = torch.randperm(50, generator=seeded_generator(3, SPLIT_STREAM)).tolist()
    assert held == sorted(order[:7]) and train == sorted(order[7:])


def test_the_held_out_rows_are_class_balanced_seeded_and_disjoint_from_training():
    labels = torch.arange(1000) % 10  # 100 images in each of 10 classes
    train, held = held_out_split(labels, 55, seed=0)
    counts = labels[held].bincount(minlength=10)
    assert len(held) == 55 and counts.max() - counts.min() == 1  # 5 or 6 per class
    assert sorted(train + held) == list(range(1000)) and held == sorted(held)
    assert (train, held) == held_out_split(labels, 55, seed=0)
    assert held != held_out_split(labels, 55, seed=1)[1]


def test_a_class_gives_at_most_its_limit_and_the_others_go_on():
    labels = torch.tensor([0] * 8 + [1] * 40 + [2] * 100)
    _, held = held_out_split(labels, 30, seed=0, max_fraction=0.25)
    assert labels[held].bincount().tolist() == [2, 10, 18]  # 2 = ⌊8/4⌋ and 10 = ⌊40/4⌋ reached; class 2 goes on
    _, every = held_out_split(labels, 10**6, seed=0, max_fraction=0.25)
    assert labels[every].bincount().tolist() == [2, 10, 25]  # the count is a cap: the limits decide here
    assert held_out_split(labels, 0, seed=0) == (list(range(148)), [])


def test_bad_counts_and_fractions_are_refused():
    with pytest.raises(InputError, match="count must be >= 0"):
        held_out_split(torch.zeros(4), -1, seed=0)
    with pytest.raises(InputError, match=r"max_fraction in \[0, 1\]"):
        held_out_split(torch.zeros(4), 1, seed=0, max_fraction=1.5)
