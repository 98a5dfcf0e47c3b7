"""How much a frozen backbone's features know about the classes: k-NN and linear-probe accuracy.

Both probes fit on the features of labelled training images and score held-out ones; features
are (N, D) float tensors (e.g. a ViT's final-normed CLS token), labels (N,) int64 in 0..K-1.

- **k-NN** (DINO's protocol, Caron et al. 2021): features are L2-normalised; every held-out image
  takes its k most cosine-similar training images (k = min(:data:`KNN_K`, N_train)), each voting
  for its class with weight exp(similarity / :data:`KNN_TEMPERATURE`); the class with the largest
  summed weight wins (a tie goes to the lower class index). Similarities are computed for
  :data:`KNN_CHUNK` held-out images at a time.
- **Linear probe**: multinomial logistic regression on features standardised with the training
  images' mean and std, weights and biases starting at zero, fitted by Adam (learning rate
  :data:`LINEAR_LR`, cosine decay to zero over :data:`LINEAR_STEPS` steps) on
  cross-entropy + ``weight_decay``·‖W‖² over minibatches of :data:`LINEAR_BATCH` training rows, in
  float32 on the features' device. Rows are visited in epochs, each a fresh permutation drawn from
  (seed, LINEAR_PROBE_STREAM); standardising happens per minibatch, so memory beyond the caller's
  features is one (LINEAR_BATCH, D) block and the (K, D) weights, whatever N. The same features and
  seed give the same probe (on the same device). :func:`fit_linear_probe` returns the fitted
  :class:`LinearProbe` (saved and loaded as ``.npz``: the training evaluation caches one per
  feature space); :func:`linear_probe_accuracy` fits one and scores the held-out features.

:class:`ProbeScores` holds one backbone's two accuracies and, beside them, the spatial structure of
its patch tokens on the same held-out images (LDS and CDS, :mod:`reglue.metrics.spatial`).
:class:`ProbeReport` compares a trained backbone with the same architecture untrained (same
initialisation) and gives the verdict: PASSED when the trained k-NN accuracy beats the untrained
one by at least ``margin`` (:data:`PASS_MARGIN`, 0.05 absolute), else FAILED; :class:`VFMReport`
holds one VFM's scores alone. :func:`write_report` writes either as ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from reglue.errors import InputError
from reglue.io import atomic_write, write_json
from reglue.metrics.spatial import decay_distance, far_distance
from reglue.seeding import LINEAR_PROBE_STREAM, seeded_generator

KNN_K = 20
KNN_TEMPERATURE = 0.07
KNN_CHUNK = 1024  # held-out rows per similarity block: (KNN_CHUNK, N_train) float64 at a time
LINEAR_STEPS = 1000  # Adam steps of LINEAR_BATCH rows (20 epochs of 50,000 training images)
LINEAR_BATCH = 1024  # training rows per step: the probe's memory beyond the features is one such block
LINEAR_LR = 1e-2  # Adam's starting rate, cosine-decayed to zero
LINEAR_WEIGHT_DECAY = 1e-4
PASS_MARGIN = 0.05  # trained k-NN accuracy − untrained, absolute, for a PASSED verdict
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def _check(features: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if features.ndim != 2 or labels.shape != (len(features),) or len(features) == 0:
        raise InputError(
            f"{what} features must be (N, D) with N >= 1 and labels (N,); found {tuple(features.shape)} "
            f"and {tuple(labels.shape)}."
        )


def knn_accuracy(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
    test_labels: torch.Tensor, *, num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
) -> float:
    """Share of held-out images whose weighted k-NN vote is their label (see the module doc)."""
    _check(train_features, train_labels, "training")
    _check(test_features, test_labels, "held-out")
    k = min(k, len(train_features))
    device = train_features.device  # the similarities are computed where the features are
    train = F.normalize(train_features.double(), dim=1)
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    correct = 0
    for start in range(0, len(test_features), KNN_CHUNK):  # memory: one (chunk, N_train) block, not (M, N_train)
        test = F.normalize(test_features[start : start + KNN_CHUNK].to(device).double(), dim=1)
        similarity, nearest = (test @ train.T).topk(k, dim=1)  # (chunk, k) each
        votes = torch.zeros(len(test), num_classes, dtype=torch.float64, device=device)
        votes.scatter_add_(1, train_labels[nearest], (similarity / temperature).exp())  # (chunk, K)
        correct += int((votes.argmax(dim=1) == test_labels[start : start + KNN_CHUNK]).sum())
    return correct / len(test_features)


@dataclass(frozen=True)
class LinearProbe:
    """A fitted linear probe: logits = ((features − mean) / std) @ weight.T + bias.

    ``mean``, ``std`` (D,), ``weight`` (K, D), ``bias`` (K,), all float32 on the device it was fitted on."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) any float dtype → (B, K) float32 on the probe's device."""
        x = (features.to(self.weight.device, torch.float32) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) → (N,) int64 classes on the probe's device, LINEAR_BATCH rows at a time."""
        return torch.cat([self.logits(features[i : i + LINEAR_BATCH]).argmax(dim=1)
                          for i in range(0, len(features), LINEAR_BATCH)])

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Share of the (N, D) features whose predicted class is their (N,) label."""
        _check(features, labels, "scored")
        return (self.predict(features).cpu() == labels.cpu()).double().mean().item()

    def save(self, path: str | Path) -> Path:
        """The four arrays as an ``.npz`` at ``path`` (written atomically)."""
        path = Path(path)
        with atomic_write(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **{name: value.cpu().numpy() for name, value in asdict(self).items()})
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> LinearProbe:
        with np.load(path) as saved:
            return cls(**{f.name: torch.from_numpy(saved[f.name]).to(device) for f in fields(cls)})


def _standardisation(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D,) mean and std of (N, D) features, float32, summed in float64 over LINEAR_BATCH rows at a time."""
    blocks = [features[i : i + LINEAR_BATCH].double() for i in range(0, len(features), LINEAR_BATCH)]
    mean = sum(block.sum(0) for block in blocks) / len(features)
    var = sum((block - mean).square().sum(0) for block in blocks) / len(features)
    return mean.float(), var.sqrt().float() + 1e-6


def _minibatches(num_rows: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` (≤ LINEAR_BATCH,) int64 row blocks, epoch after epoch of seeded permutations (CPU)."""
    batch, epoch, done = min(LINEAR_BATCH, num_rows), 0, 0
    while done < steps:
        order = torch.randperm(num_rows, generator=seeded_generator(seed, LINEAR_PROBE_STREAM, epoch))
        for start in range(0, num_rows - batch + 1, batch):  # full blocks only: every step sees `batch` rows
            if done == steps:
                return
            yield order[start : start + batch]
            done += 1
        epoch += 1


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, steps: int = LINEAR_STEPS,
    weight_decay: float = LINEAR_WEIGHT_DECAY, seed: int = 0,
) -> LinearProbe:
    """The logistic regression of the module doc, fitted on (N, D) features and their (N,) labels on the
    features' device; the optimiser only ever sees (≤ LINEAR_BATCH, D) blocks."""
    _check(features, labels, "training")
    if steps < 1:
        raise InputError(f"steps must be >= 1, found {steps}.")
    device = features.device
    mean, std = _standardisation(features)
    probe = LinearProbe(mean, std, torch.zeros(num_classes, features.shape[1], device=device, requires_grad=True),
                        torch.zeros(num_classes, device=device, requires_grad=True))
    optimizer = torch.optim.Adam([probe.weight, probe.bias], lr=LINEAR_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    labels = labels.to(device)
    with torch.enable_grad():  # also when called under no_grad (the training evaluation)
        for rows in _minibatches(len(features), steps, seed):
            rows = rows.to(device)
            loss = (F.cross_entropy(probe.logits(features[rows]), labels[rows])
                    + weight_decay * probe.weight.square().sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return LinearProbe(mean, std, probe.weight.detach(), probe.bias.detach())


def linear_probe_accuracy(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
    test_labels: torch.Tensor, *, num_classes: int, steps: int = LINEAR_STEPS,
    weight_decay: float = LINEAR_WEIGHT_DECAY, seed: int = 0,
) -> float:
    """Held-out accuracy of a logistic regression fitted on the training features (module doc)."""
    _check(test_features, test_labels, "held-out")
    probe = fit_linear_probe(train_features, train_labels, num_classes=num_classes, steps=steps,
                             weight_decay=weight_decay, seed=seed)
    return probe.accuracy(test_features, test_labels)


@dataclass(frozen=True)
class ProbeScores:
    """Held-out accuracies of one backbone's CLS features, and the mean LDS / CDS of its patch tokens on the
    same images (None in reports of versions without them)."""

    knn: float
    linear: float
    lds: float | None = None
    cds: float | None = None


def probe_scores(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
    test_labels: torch.Tensor, *, num_classes: int,
) -> ProbeScores:
    """k-NN and linear-probe accuracy of the same features (defaults of the module doc)."""
    args = (train_features, train_labels, test_features, test_labels)
    return ProbeScores(knn=knn_accuracy(*args, num_classes=num_classes),
                       linear=linear_probe_accuracy(*args, num_classes=num_classes))


def _methods(grid: int | None) -> dict:
    """How the numbers were made, for report.json."""
    methods = {"knn": {"k": KNN_K, "temperature": KNN_TEMPERATURE, "votes": "exp(cosine / T), summed per class"},
               "linear": {"steps": LINEAR_STEPS, "batch": LINEAR_BATCH, "lr": LINEAR_LR,
                          "weight_decay": LINEAR_WEIGHT_DECAY,
                          "optimizer": "minibatch Adam, cosine schedule, zero init, float32"}}
    if grid is not None:
        methods["spatial"] = {
            "grid": grid, "d_far": far_distance(grid), "d_max": decay_distance(grid),
            "definition": "iREPA (arXiv 2512.10794): LDS = mean cosine of 4-neighbour patch tokens - mean cosine at "
                          "Manhattan distance >= d_far; CDS = -slope of mean cosine vs distance (in 1/16 of the "
                          "image side) over d = 1..d_max; means over the held-out images"}
    return methods


@dataclass(frozen=True)
class ProbeReport:
    """A trained backbone's probe scores next to the untrained one's, and the verdict; ``grid`` is the side
    of the patch grid LDS / CDS were measured on (None in reports of versions without them)."""

    trained: ProbeScores
    untrained: ProbeScores
    num_classes: int
    train_images: int
    held_out_images: int
    margin: float = PASS_MARGIN
    grid: int | None = None

    @property
    def knn_gain(self) -> float:
        return self.trained.knn - self.untrained.knn

    @property
    def passed(self) -> bool:
        return self.knn_gain >= self.margin

    @property
    def verdict(self) -> str:
        """One line: PASSED/FAILED, the k-NN gain and the margin it is held to."""
        word = "PASSED" if self.passed else "FAILED"
        return (f"{word}: k-NN accuracy {self.trained.knn:.3f} trained vs {self.untrained.knn:.3f} untrained "
                f"({self.knn_gain:+.3f}; a pass needs at least +{self.margin:.2f})")

    @property
    def headline(self) -> str:
        """report.md's first line: the verdict."""
        return self.verdict

    @property
    def rows(self) -> dict[str, ProbeScores]:
        return {"trained": self.trained, "untrained (same init)": self.untrained}

    @classmethod
    def from_json(cls, raw: Mapping) -> ProbeReport:
        """The report :meth:`to_json` wrote (extra keys ignored)."""
        return cls(ProbeScores(**raw["trained"]), ProbeScores(**raw["untrained"]), raw["num_classes"],
                   raw["train_images"], raw["held_out_images"], raw["margin"], raw.get("grid"))

    def to_json(self) -> dict:
        return {**asdict(self), "knn_gain": self.knn_gain, "passed": self.passed, "verdict": self.verdict,
                **_methods(self.grid)}


@dataclass(frozen=True)
class VFMReport:
    """One VFM's probe scores (``reglue probe-vfm DATA --vfm-weights ...``): no verdict, numbers to rank by."""

    vfm: str  # the VFM as the report names it: registry name and weights
    scores: ProbeScores
    num_classes: int
    train_images: int
    held_out_images: int
    grid: int

    @property
    def headline(self) -> str:
        """One line: the four numbers and what they were measured on."""
        s = self.scores
        return (f"{self.vfm}: k-NN {s.knn:.3f}, linear probe {s.linear:.3f} ({self.num_classes} classes, chance "
                f"{1 / self.num_classes:.3f}); LDS {s.lds:.3f}, CDS {s.cds:.3f} ({self.grid}×{self.grid} patches); "
                f"{self.held_out_images} held-out images")

    @property
    def rows(self) -> dict[str, ProbeScores]:
        return {self.vfm: self.scores}

    def to_json(self) -> dict:
        return {**asdict(self), "headline": self.headline, **_methods(self.grid)}


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_report(out_dir: str | Path, report: ProbeReport | VFMReport, *, title: str,
                 details: Mapping[str, object]) -> Path:
    """``out_dir/report.json`` (the report and ``details``) and ``out_dir/report.md``; returns the .md path."""
    out_dir = Path(out_dir)
    write_json(out_dir / REPORT_JSON, {**report.to_json(), "details": dict(details)})
    chance = 1 / report.num_classes
    grid = report.grid
    spatial = "" if grid is None else (
        f" LDS / CDS (iREPA, arXiv 2512.10794; higher = more spatial structure): the held-out images' {grid}×{grid} "
        f"final-normed patch tokens, mean cosine of 4-neighbours minus that of pairs at Manhattan distance ≥ "
        f"{far_distance(grid)}; minus the slope of mean cosine against distance (in sixteenths of the image side) "
        f"over distances 1 to {decay_distance(grid)} (reglue.metrics.spatial).")
    lines = [
        f"# {title}", "", f"**{report.headline}**", "",
        (f"Held-out accuracy on {report.held_out_images} images ({report.num_classes} classes, chance "
         f"{chance:.3f}); the probes fit on {report.train_images} training images' CLS features."), "",
        "| backbone | k-NN | linear probe | LDS | CDS |", "|---|---|---|---|---|",
        *(f"| {name} | {scores.knn:.3f} | {scores.linear:.3f} | {_number(scores.lds)} | {_number(scores.cds)} |"
          for name, scores in report.rows.items()), "",
        (f"k-NN: k = {KNN_K}, cosine similarity, votes weighted exp(sim / {KNN_TEMPERATURE}) (DINO). Linear probe: "
         f"logistic regression on standardised features, {LINEAR_STEPS} Adam steps of {LINEAR_BATCH} images "
         f"(lr {LINEAR_LR}, cosine), L2 {LINEAR_WEIGHT_DECAY}.{spatial}"), "",
        "| detail | value |", "|---|---|",
        *(f"| {key} | {value} |" for key, value in details.items()), "",
    ]
    path = out_dir / REPORT_MD
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path
