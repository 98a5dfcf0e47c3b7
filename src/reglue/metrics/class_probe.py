"""A small supervised CNN trained on the real labelled images, to ask of each generated sample
"does it show the class it was conditioned on" where colour alone does not tell (the shapes set).

    probe = train_class_probe(images, labels, classes)   # uint8 (N, H, W, 3), (N,) in 0..K-1
    probe.held_out_accuracy                              # on a seeded held-out split: the ceiling
    probe.accuracy(samples, sample_labels)               # the samples' score; chance is 1/K
    probe.save("probe.safetensors"); ClassProbe.load("probe.safetensors")

- **Input**: images of any side are area-resized to ``side`` (default 64); each image is then
  centred per channel and divided by its own standard deviation, so the figure's and the
  background's colours matter less than where the edges are.
- **Network** (:class:`ProbeNet`): a stride-2 stem, three blocks of two conv-BN-ReLU and a
  max-pool, global average pooling, a linear layer; about 290 K weights at the default widths.
- **Training**: AdamW, one-cycle learning rate, ``steps`` batches drawn from the images outside
  the held-out split, augmented by random horizontal and vertical flips and per-channel gains
  in [0.8, 1.2]. No 90° turns: they would swap the shapes set's ``dots_side_by_side`` and
  ``dots_stacked``.
- **Randomness** (:mod:`reglue.seeding`): ``(seed, SPLIT_STREAM)`` draws the held-out split, then
  the initial weights; ``(seed, SHUFFLE_STREAM, epoch)`` an epoch's order; ``(seed, STEP_STREAM,
  step)`` a step's flips and gains. The global generators are not touched. The same seed gives
  the same weights on the same number of threads (float sums are ordered by the threads).
- **File**: one ``.safetensors`` holding the weights, with the classes, side, widths, seed,
  held-out accuracy and the training data's fingerprint (:func:`data_fingerprint`) as JSON in
  its header, so every evaluation of a project can use, and check, the same classifier.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from reglue.errors import InputError
from reglue.io import atomic_write, read_safetensors_metadata
from reglue.seeding import SHUFFLE_STREAM, SPLIT_STREAM, STEP_STREAM, seeded_generator
from reglue.state_dict import load_state_dict_strict

FORMAT = "reglue-class-probe"  # the file header's "format"
WIDTHS = (16, 32, 64, 128)  # the stem's channels, then each block's; every one halves the side
PREDICT_BATCH = 256
SAVE_FIX = "write one with train_class_probe(...).save(path)"


def check_images(images: np.ndarray) -> None:
    """Refuse anything but a non-empty uint8 (N, H, W, 3) array, naming what was found."""
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[-1] == 3):
        found = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise InputError(f"expected uint8 images (N, H, W, 3) with values 0-255, found {found}; "
                         "convert with np.asarray(images, dtype=np.uint8) in NHWC order.")
    if len(images) == 0:
        raise InputError("expected at least one image, found an empty array.")


def check_labels(labels: np.ndarray, count: int, num_classes: int) -> np.ndarray:
    """``labels`` as int64 (count,) in 0..num_classes-1, or a ValueError naming the problem."""
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"expected {count} integer labels, one per image, "
                         f"found {labels.dtype} {labels.shape}.")
    outside = sorted(set(labels[(labels < 0) | (labels >= num_classes)].tolist()))
    if outside:
        raise InputError(f"labels must lie in 0..{num_classes - 1} ({num_classes} classes), "
                         f"found {outside[:5]}.")
    return labels.astype(np.int64)


def data_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """Hex sha256 of uint8 (N, H, W, 3) images and their (N,) labels: names a classifier's training data."""
    digest = hashlib.sha256(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def standardise(images: np.ndarray, side: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, side, side): area-resized, each image centred per channel
    and scaled to unit standard deviation over its own pixels."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    if pixels.shape[-2:] != (side, side):
        pixels = F.interpolate(pixels, size=(side, side), mode="area")
    centred = pixels - pixels.mean(dim=(2, 3), keepdim=True)
    return centred / (centred.flatten(1).std(dim=1)[:, None, None, None] + 1e-3)


def _conv(channels_in: int, channels_out: int, *, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels_out), nn.ReLU()]


class ProbeNet(nn.Module):
    """(B, 3, side, side) standardised images -> (B, K) class logits.

    A stride-2 3×3 stem to ``widths[0]`` channels, then per further width two 3×3 convs and a 2×2
    max-pool (side 64: 32² -> 16² -> 8² -> 4²), every conv followed by batch norm and a ReLU; global
    average pooling and a linear layer. Channels-last: faster on a CPU. The weights are drawn
    from ``generator`` (the layers are built on the meta device, so no global generator is used).
    """

    def __init__(self, num_classes: int, generator: torch.Generator, widths: Sequence[int] = WIDTHS):
        super().__init__()
        self.widths = tuple(widths)
        with torch.device("meta"):
            layers = _conv(3, widths[0], stride=2)
            for width_in, width in pairwise(widths):
                layers += [*_conv(width_in, width), *_conv(width, width), nn.MaxPool2d(2)]
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(widths[-1], num_classes)
        self.to_empty(device="cpu").to(memory_format=torch.channels_last)
        self._initialise(generator)

    def _initialise(self, generator: torch.Generator) -> None:
        """He-normal convolutions, unit batch norms and a small linear head."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
        nn.init.normal_(self.head.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images.contiguous(memory_format=torch.channels_last))  # (B, C, side/16, ·)
        return self.head(features.mean(dim=(2, 3)))  # global average pool (B, C) -> (B, K)


@dataclass(frozen=True)
class ClassProbe:
    """A trained, frozen classifier of ``classes`` at ``side``² input."""

    network: ProbeNet
    classes: tuple[str, ...]
    side: int
    held_out_accuracy: float
    data_fingerprint: str
    seed: int

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3), any side -> int64 (N,) predicted labels."""
        check_images(images)
        return _predict(self.network, images, self.side)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Fraction of uint8 (N, H, W, 3) ``images`` predicted as their (N,) ``labels``."""
        check_images(images)
        labels = check_labels(labels, len(images), len(self.classes))
        return float((self.predict(images) == labels).mean())

    def metadata(self) -> dict:
        """What travels with the weights: enough to rebuild the network and to check its training data."""
        return {"classes": list(self.classes), "side": self.side, "widths": list(self.network.widths),
                "held_out_accuracy": self.held_out_accuracy, "data_fingerprint": self.data_fingerprint,
                "seed": self.seed}

    def save(self, path: str | Path) -> Path:
        """Write the weights and :meth:`metadata` to one ``.safetensors`` file; returns its path."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise InputError(f"a class probe is saved as .safetensors, found {path.name}; "
                             "name it e.g. probe.safetensors.")
        state = {k: v.detach().contiguous() for k, v in self.network.state_dict().items()}
        header = {"format": FORMAT, "class_probe": json.dumps(self.metadata())}
        with atomic_write(path) as tmp:
            safetensors.torch.save_file(state, str(tmp), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ClassProbe:
        """The classifier :meth:`save` wrote to ``path``, frozen."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"class probe file {path} not found; {SAVE_FIX}.")
        header = read_safetensors_metadata(path, "class probe")
        if header.get("format") != FORMAT:
            raise InputError(f"{path} is not a class probe file (no {FORMAT!r} header); {SAVE_FIX}.")
        saved = json.loads(header["class_probe"])
        network = ProbeNet(len(saved["classes"]), torch.Generator(), saved["widths"])  # weights loaded next
        load_state_dict_strict(network, safetensors.torch.load_file(str(path)), f"class probe {path}")
        return cls(_frozen(network), tuple(saved["classes"]), saved["side"], saved["held_out_accuracy"],
                   saved["data_fingerprint"], saved["seed"])


def _frozen(network: ProbeNet) -> ProbeNet:
    return network.eval().requires_grad_(False)


def _predict(network: ProbeNet, images: np.ndarray, side: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> int64 (N,) argmax labels, in batches of PREDICT_BATCH."""
    with torch.inference_mode():
        logits = [network(standardise(images[i:i + PREDICT_BATCH], side))
                  for i in range(0, len(images), PREDICT_BATCH)]
    return torch.cat(logits).argmax(dim=1).numpy()


def held_out_split(labels: np.ndarray, num_classes: int, fraction: float,
                   generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N,) labels -> (train, held-out) sorted indices; ``fraction`` of each class (at least 1) held out."""
    order = torch.randperm(len(labels), generator=generator).numpy()
    held = []
    for k in range(num_classes):
        members = order[labels[order] == k]
        if len(members) < 2:
            raise InputError(f"class {k} has {len(members)} image(s); training needs at least 2 per class "
                             "(one to train on, one to hold out).")
        held.append(members[:max(1, round(fraction * len(members)))])
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held), held


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, s, s) -> (B, 3, s, s): random horizontal/vertical flips and per-channel gains in [0.8, 1.2]."""
    flips = torch.rand(len(batch), 2, generator=generator) < 0.5  # (B, 2): mirror left-right, upside down
    gains = 0.8 + 0.4 * torch.rand(len(batch), 3, 1, 1, generator=generator)
    batch = torch.where(flips[:, 0, None, None, None], batch.flip(3), batch)
    batch = torch.where(flips[:, 1, None, None, None], batch.flip(2), batch)
    return batch * gains


def train_class_probe(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], *, side: int = 64,
                      steps: int = 300, batch_size: int = 64, learning_rate: float = 5e-3,
                      held_out_fraction: float = 0.2, seed: int = 0) -> ClassProbe:
    """Train a :class:`ProbeNet` on uint8 (N, H, W, 3) ``images`` with (N,) ``labels`` in 0..len(classes)-1.

    ``held_out_fraction`` of every class is kept out of training and scored: ``held_out_accuracy``.
    ``steps`` batches of ``batch_size`` (300 × 64: 24 epochs of 800 training images, about a minute
    on one CPU core at side 64).
    """
    check_images(images)
    labels = check_labels(labels, len(images), len(classes))
    _check_settings(classes, side=side, steps=steps, held_out_fraction=held_out_fraction)
    setup = seeded_generator(seed, SPLIT_STREAM)
    train, held = held_out_split(labels, len(classes), held_out_fraction, setup)
    network = ProbeNet(len(classes), setup)
    _fit(network, standardise(images[train], side), torch.from_numpy(labels[train]), steps=steps,
         batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    network = _frozen(network)
    held_out_accuracy = float((_predict(network, images[held], side) == labels[held]).mean())
    return ClassProbe(network, tuple(classes), side, held_out_accuracy, data_fingerprint(images, labels),
                      seed)


def _check_settings(classes: Sequence[str], *, side: int, steps: int, held_out_fraction: float) -> None:
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise InputError(f"expected at least 2 distinct class names, found {list(classes)}.")
    if side < 16 or side % 16:
        raise InputError(f"side must be a multiple of 16 (the network halves it 4 times), found {side}; "
                         "try 64.")
    if steps < 1:
        raise InputError(f"steps must be at least 1, found {steps}.")
    if not 0 < held_out_fraction < 1:
        raise InputError(f"held_out_fraction must lie strictly between 0 and 1, found {held_out_fraction}.")


def _fit(network: ProbeNet, inputs: torch.Tensor, targets: torch.Tensor, *, steps: int, batch_size: int,
         learning_rate: float, seed: int) -> None:
    """``steps`` AdamW steps of cross-entropy on standardised (N, 3, s, s) ``inputs`` and (N,) ``targets``,
    one-cycle learning rate; the batches walk through a fresh order every epoch."""
    steps_per_epoch = math.ceil(len(inputs) / batch_size)
    optimiser = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, learning_rate, total_steps=steps,
                                                   pct_start=0.15)
    network.train()
    for step in range(steps):
        epoch, index = divmod(step, steps_per_epoch)
        if index == 0:
            order = torch.randperm(len(inputs), generator=seeded_generator(seed, SHUFFLE_STREAM, epoch))
        batch = order[index * batch_size:(index + 1) * batch_size]
        augmented = _augment(inputs[batch], seeded_generator(seed, STEP_STREAM, step))
        loss = F.cross_entropy(network(augmented), targets[batch])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
