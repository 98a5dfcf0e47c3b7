"""The k-NN / linear probes of reglue.metrics.probe and the bounded subsets of reglue.metrics.vfm_probe."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from reglue.metrics import probe, vfm_probe
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


def _blobs(n: int, generator: torch.Generator, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, len(centres), (n,), generator=generator)
    return centres[labels] + torch.randn(n, centres.shape[1], generator=generator), labels


def test_the_linear_probe_separates_separable_classes_and_nears_the_bayes_rule_on_overlapping_ones():
    train = torch.tensor([[3.0, 0.0], [2.5, 0.5], [0.0, 3.0], [0.5, 2.5], [-3.0, -3.0], [-2.0, -2.5]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert probe.linear_probe_accuracy(train, labels, train + 0.1, labels, num_classes=3) == 1.0
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 64, generator=g) * 0.4  # Gaussian classes of unit variance: they overlap
    (train, train_labels), (test, test_labels) = _blobs(5000, g, centres), _blobs(2000, g, centres)
    bayes = ((test @ centres.T - centres.square().sum(1) / 2).argmax(1) == test_labels).double().mean().item()
    accuracy = probe.linear_probe_accuracy(train, train_labels, test, test_labels, num_classes=10)
    assert bayes - 0.03 < accuracy <= bayes + 0.01  # 0.9125 vs the optimal rule's 0.9285 (the former full-batch L-BFGS: 0.913)


def test_the_linear_probe_is_seeded_and_only_ever_sees_minibatches(monkeypatch):
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 8, generator=g)
    features, labels = _blobs(1000, g, centres)
    with torch.no_grad():  # it fits under no_grad too, as the training evaluation calls it
        first = probe.fit_linear_probe(features.double(), labels, num_classes=4, steps=50, seed=3)
    again = probe.fit_linear_probe(features.double(), labels, num_classes=4, steps=50, seed=3)
    other = probe.fit_linear_probe(features.double(), labels, num_classes=4, steps=50, seed=4)
    assert torch.equal(first.weight, again.weight) and not torch.equal(first.weight, other.weight)
    assert first.weight.dtype == torch.float32 and first.weight.shape == (4, 8)
    seen: list[int] = []
    logits = probe.LinearProbe.logits
    monkeypatch.setattr(probe.LinearProbe, "logits", lambda self, x: seen.append(len(x)) or logits(self, x))
    monkeypatch.setattr(probe, "LINEAR_BATCH", 64)
    fitted = probe.fit_linear_probe(features, labels, num_classes=4, steps=40)  # 40 steps of 64 > 15 full blocks
    assert seen == [64] * 40
    seen.clear()
    assert fitted.accuracy(features, labels) > 0.9 and max(seen) == 64 and sum(seen) == 1000


def test_a_saved_linear_probe_loads_and_predicts_the_same(tmp_path):
    g = torch.Generator().manual_seed(2)
    features, labels = _blobs(300, g, torch.randn(3, 5, generator=g) * 3)
    fitted = probe.fit_linear_probe(features, labels, num_classes=3, steps=30)
    loaded = probe.LinearProbe.load(fitted.save(tmp_path / "probe.npz"))
    assert torch.equal(loaded.predict(features), fitted.predict(features))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_linear_probe_fits_on_the_features_device_and_agrees_with_the_cpu():
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(10, 32, generator=g) * 0.5
    (train, train_labels), (test, test_labels) = _blobs(4000, g, centres), _blobs(1000, g, centres)
    on_gpu = probe.fit_linear_probe(train.cuda(), train_labels.cuda(), num_classes=10)
    assert on_gpu.weight.is_cuda
    again = probe.fit_linear_probe(train.cuda(), train_labels.cuda(), num_classes=10)
    assert torch.equal(on_gpu.weight, again.weight)  # deterministic on the GPU too
    on_cpu = probe.linear_probe_accuracy(train, train_labels, test, test_labels, num_classes=10)
    assert abs(on_gpu.accuracy(test.cuda(), test_labels.cuda()) - on_cpu) < 0.01


def test_probe_rows_keep_all_rows_that_fit_and_a_seeded_subset_of_the_rest():
    rows = list(range(10, 1010))
    assert vfm_probe.probe_rows(rows, 1000, seed=0, part=0) is rows
    subset = vfm_probe.probe_rows(rows, 100, seed=0, part=0)
    assert len(subset) == 100 and subset == sorted(subset) and set(subset) <= set(rows)
    assert subset == vfm_probe.probe_rows(rows, 100, seed=0, part=0)
    assert subset != vfm_probe.probe_rows(rows, 100, seed=0, part=1)


def test_the_teacher_probe_extracts_features_of_at_most_its_caps_of_images(monkeypatch):
    """A million-image data set: the probe reads features for the capped subsets only, so its memory is
    bounded by the caps (and the k-NN's similarity blocks by KNN_CHUNK), not by the data."""
    seen: list[int] = []

    def features(extractors, images, rows, spatial=False):  # stands in for the teacher's forward over the rows read
        seen.append(len(rows))
        g = torch.Generator().manual_seed(len(rows))
        labels = torch.tensor(rows) % images.num_classes
        signal = torch.nn.functional.one_hot(labels, 16).float() * 8  # a direction per class
        structure = torch.full((len(rows), 2), 0.5) if spatial else None
        return [vfm_probe.Embedded(torch.randn(len(rows), 16, generator=g) + signal, structure)
                for _ in extractors], labels

    monkeypatch.setattr(vfm_probe, "embed", features)
    settings = teacher_module.TeacherSettings(probe_train_images=2_000, probe_held_out_images=500)
    network = SimpleNamespace(grid_size=4)
    features = teacher_module._probe_features(SimpleNamespace(num_classes=10), list(range(900_000)),
                                              list(range(900_000, 1_000_000)), network, network, settings)
    report = teacher_module._probe(features)
    assert seen == [2_000, 500]
    assert (report.train_images, report.held_out_images) == (2_000, 500)
    assert report.trained.knn > 0.95 and report.trained.linear > 0.95  # the stand-in features carry their label
    assert report.trained.lds == report.trained.cds == 0.5 and report.grid == 4


@pytest.mark.parametrize("name", ["probe_train_images", "probe_held_out_images"])
def test_probe_caps_must_be_positive(name):
    from reglue.errors import InputError

    with pytest.raises(InputError, match=f"{name} must be >= 1"):
        teacher_module.TeacherSettings(**{name: 0})


class _Rows(torch.nn.Module):
    """A stand-in extractor whose CLS feature is the image's row number (its pixels' value)."""

    embed_dim = 1

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images):
        return SimpleNamespace(cls=images[:, :1, 0, 0].float() * self.scale)


class _Images:
    """Images whose pixels hold their row number; remembers which rows were read."""

    def __init__(self):
        self.read: list[int] = []

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.read.append(i)
        return {"images": torch.full((3, 2, 2), i, dtype=torch.uint8), "label": torch.tensor(i % 3)}


def test_each_process_extracts_its_share_of_the_probe_rows(monkeypatch):
    rows = [1, 4, 5, 9, 11, 20, 21, 30, 33, 39, 2]
    images = _Images()
    alone, labels = vfm_probe.embed([_Rows()], images, rows)
    assert alone[0].cls.squeeze(1).tolist() == rows and alone[0].spatial is None
    assert labels.tolist() == [r % 3 for r in rows] and images.read == rows
    monkeypatch.setattr(vfm_probe, "gather_strided", lambda local, total: local)  # the share, not gathered
    for rank in range(3):
        monkeypatch.setattr(vfm_probe, "process_state",
                            lambda rank=rank: SimpleNamespace(process_index=rank, num_processes=3))
        images = _Images()
        share, share_labels = vfm_probe.embed([_Rows()], images, rows)
        assert images.read == rows[rank::3] == share[0].cls.squeeze(1).tolist()  # each image read by one process
        assert share_labels.tolist() == [r % 3 for r in rows[rank::3]]


def test_gathered_shares_come_back_in_row_order(monkeypatch):
    from reglue import distributed

    rows = torch.arange(11, dtype=torch.float32)[:, None] * torch.tensor([[1.0, -1.0]])  # (11, 2)
    shares = [rows[rank::3] for rank in range(3)]  # 4, 4 and 3 rows
    monkeypatch.setattr(distributed, "_several_processes", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 3)

    def all_gather(parts, mine):  # what every process receives: each share padded to 4 rows
        assert mine.shape == (4, 2)
        for part, share in zip(parts, shares, strict=True):
            part.zero_()[: len(share)] = share

    monkeypatch.setattr(distributed.dist, "all_gather", all_gather)
    assert torch.equal(distributed.gather_strided(shares[2], 11), rows)


GATHER_CHILD = r"""
import sys, torch, torch.distributed as dist
from reglue.distributed import gather_strided
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=int(sys.argv[2]), world_size=2)
rows = torch.arange(7.0)[:, None] * torch.tensor([[1.0, 10.0]])  # (7, 2): rank 0 holds 4 rows, rank 1 holds 3
assert torch.equal(gather_strided(rows[dist.get_rank()::2], 7), rows)
dist.barrier()
dist.destroy_process_group()
"""


def test_two_gloo_processes_gather_their_shares_in_row_order(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, "-c", GATHER_CHILD, str(tmp_path / "store"), str(rank)], env=env,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for process in ranks:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
