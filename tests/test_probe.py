"""The k-NN / linear probes of reglue.metrics.probe and the teacher probe's bounded subsets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from reglue.metrics import probe
from reglue.training import teacher as teacher_module


def test_knn_votes_for_the_class_of_the_most_similar_training_images():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert probe.knn_accuracy(train, labels, test, torch.tensor([0, 1]), num_classes=2) == 1.0
    assert probe.knn_accuracy(train, labels, test, torch.tensor([1, 1]), num_classes=2) == 0.5


def test_knn_in_chunks_equals_one_similarity_block(monkeypatch):
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(500, 16, generator=g), torch.randn(3000, 16, generator=g)
    train_labels, test_labels = torch.randint(0, 7, (500,), generator=g), torch.randint(0, 7, (3000,), generator=g)
    args = (train, train_labels, test, test_labels)
    monkeypatch.setattr(probe, "KNN_CHUNK", 10**6)
    whole = probe.knn_accuracy(*args, num_classes=7)
    monkeypatch.setattr(probe, "KNN_CHUNK", 7)
    assert probe.knn_accuracy(*args, num_classes=7) == whole and 0 < whole < 1


def test_probe_rows_keep_all_rows_that_fit_and_a_seeded_subset_of_the_rest():
    rows = list(range(10, 1010))
    assert teacher_module.probe_rows(rows, 1000, seed=0, part=0) is rows
    subset = teacher_module.probe_rows(rows, 100, seed=0, part=0)
    assert len(subset) == 100 and subset == sorted(subset) and set(subset) <= set(rows)
    assert subset == teacher_module.probe_rows(rows, 100, seed=0, part=0)
    assert subset != teacher_module.probe_rows(rows, 100, seed=0, part=1)


def test_the_teacher_probe_extracts_features_of_at_most_its_caps_of_images(monkeypatch):
    """A million-image data set: the probe reads features for the capped subsets only, so its memory is
    bounded by the caps (and the k-NN's similarity blocks by KNN_CHUNK), not by the data."""
    seen: list[int] = []

    def features(extractors, images, rows):  # stands in for the teacher's forward over the rows read
        seen.append(len(rows))
        g = torch.Generator().manual_seed(len(rows))
        labels = torch.tensor(rows) % images.num_classes
        signal = torch.nn.functional.one_hot(labels, 16).float() * 8  # a direction per class
        return [torch.randn(len(rows), 16, generator=g) + signal for _ in extractors], labels

    monkeypatch.setattr(teacher_module, "_cls_features", features)
    settings = teacher_module.TeacherSettings(probe_train_images=2_000, probe_held_out_images=500)
    report = teacher_module._probe(SimpleNamespace(num_classes=10), list(range(900_000)),
                                   list(range(900_000, 1_000_000)), None, None, settings)
    assert seen == [2_000, 500]
    assert (report.train_images, report.held_out_images) == (2_000, 500)
    assert report.trained.knn > 0.95 and report.trained.linear > 0.95  # the stand-in features carry their label


@pytest.mark.parametrize("name", ["probe_train_images", "probe_held_out_images"])
def test_probe_caps_must_be_positive(name):
    from reglue.errors import InputError

    with pytest.raises(InputError, match=f"{name} must be >= 1"):
        teacher_module.TeacherSettings(**{name: 0})
