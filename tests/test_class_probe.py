"""The class probe: a small CNN trained on real labelled images that scores generated samples."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch

from reglue.data.synthetic import class_names, draw_image
from reglue.metrics.class_probe import ClassProbe, data_fingerprint, train_class_probe

# Four shape classes, two of them the same dots in two layouts; side 32 keeps training to seconds.
CLASSES = ("cross", "dots_side_by_side", "dots_stacked", "ring")
FAST = {"side": 32, "steps": 100}
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models stall on two shared threads


def shapes(per_class: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (4·per_class, size, size, 3) images of CLASSES from the shapes set and their labels 0..3."""
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    shape_labels = [class_names("shapes").index(name) for name in CLASSES]
    images = [draw_image(shape_labels[k], np.random.default_rng([seed, shape_labels[k], i]), size,
                         variant="shapes") for i, k in enumerate(labels)]
    return np.stack(images), labels


@pytest.fixture(scope="module")
def trained(one_thread):
    images, labels = shapes(40, seed=0)
    return train_class_probe(images, labels, CLASSES, **FAST), images, labels


def test_probe_tells_shapes_apart_on_held_out_and_fresh_images(trained):
    probe, images, labels = trained
    assert probe.held_out_accuracy >= 0.9
    fresh, fresh_labels = shapes(10, seed=1, size=128)  # another seed, drawn at another side
    assert probe.accuracy(fresh, fresh_labels) >= 0.9
    fingerprint = data_fingerprint(images, labels)
    assert probe.data_fingerprint == fingerprint != data_fingerprint(images, labels[::-1])
    assert not any(p.requires_grad for p in probe.network.parameters()) and not probe.network.training


def test_probe_on_shuffled_labels_is_at_chance():
    images, labels = shapes(40, seed=0)
    shuffled = np.random.default_rng(0).permutation(labels)
    probe = train_class_probe(images, shuffled, CLASSES, **FAST)
    assert probe.held_out_accuracy <= 0.5  # chance 0.25; the real labels give >= 0.9


def test_training_is_deterministic_in_the_seed_and_leaves_the_global_generator_alone():
    images, labels = shapes(4, seed=0)
    global_state = torch.random.get_rng_state()
    first, again, other = (train_class_probe(images, labels, CLASSES, side=16, steps=4, batch_size=8, seed=s)
                           for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), global_state)
    weights = [p.network.state_dict() for p in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_save_and_load_give_the_same_classifier(trained, tmp_path):
    probe, images, _ = trained
    path = probe.save(tmp_path / "probe.safetensors")
    loaded = ClassProbe.load(path)
    assert loaded.metadata() == probe.metadata() and loaded.classes == CLASSES
    assert np.array_equal(loaded.predict(images), probe.predict(images))
    assert not loaded.network.training and not any(p.requires_grad for p in loaded.network.parameters())


def test_files_that_are_not_probes_are_refused(trained, tmp_path):
    probe, _, _ = trained
    with pytest.raises(ValueError, match=r"saved as \.safetensors, found probe\.pt"):
        probe.save(tmp_path / "probe.pt")
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="is not a class probe file"):
        ClassProbe.load(other)
    with pytest.raises(FileNotFoundError, match=r"class probe file .* not found"):
        ClassProbe.load(tmp_path / "missing.safetensors")


def test_bad_input_is_refused_with_its_reason(trained):
    probe, images, labels = trained
    with pytest.raises(ValueError, match=r"expected uint8 images \(N, H, W, 3\).*found float32"):
        probe.predict(images.astype(np.float32))
    with pytest.raises(ValueError, match=r"found uint8 \(160, 3, 64, 64\)"):
        probe.predict(images.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="at least one image"):
        probe.predict(images[:0])
    with pytest.raises(ValueError, match=r"labels must lie in 0..3 \(4 classes\), found \[4\]"):
        probe.accuracy(images[:2], np.array([0, 4]))
    with pytest.raises(ValueError, match="expected 2 integer labels"):
        probe.accuracy(images[:2], np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="class 3 has 1 image"):
        train_class_probe(images[:121], labels[:121], CLASSES)
    with pytest.raises(ValueError, match="side must be a multiple of 16"):
        train_class_probe(images, labels, CLASSES, side=40)
    with pytest.raises(ValueError, match="held_out_fraction must lie strictly between 0 and 1"):
        train_class_probe(images, labels, CLASSES, held_out_fraction=1.0)
    with pytest.raises(ValueError, match="at least 2 distinct class names"):
        train_class_probe(images, labels, ("a", "a", "b", "c"))
