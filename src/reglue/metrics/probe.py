"""How much a frozen backbone's features know about the classes: k-NN and linear-probe accuracy.

Both probes fit on the features of labelled training images and score held-out ones; features
are (N, D) float tensors (e.g. a ViT's final-normed CLS token), labels (N,) int64 in 0..K-1.

- **k-NN** (DINO's protocol, Caron et al. 2021): features are L2-normalised; every held-out image
  takes its k most cosine-similar training images (k = min(:data:`KNN_K`, N_train)), each voting
  for its class with weight exp(similarity / :data:`KNN_TEMPERATURE`); the class with the largest
  summed weight wins (a tie goes to the lower class index). Similarities are computed for
  :data:`KNN_CHUNK` held-out images at a time.
- **Linear probe**: multinomial logistic regression on features standardised with the training
  images' mean and std, weights and biases starting at zero, fitted full-batch with L-BFGS (strong
  Wolfe line search, ``steps`` iterations) on cross-entropy + ``weight_decay``·‖W‖², in float64.
  Nothing is random, so no seed is needed: the same features give the same accuracy.

:class:`ProbeReport` compares a trained backbone with the same architecture untrained (same
initialisation) and gives the verdict: PASSED when the trained k-NN accuracy beats the untrained
one by at least ``margin`` (:data:`PASS_MARGIN`, 0.05 absolute), else FAILED.
:func:`write_report` writes it as ``report.json`` and ``report.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from reglue.errors import InputError
from reglue.io import atomic_write, write_json

KNN_K = 20
KNN_TEMPERATURE = 0.07
KNN_CHUNK = 1024  # held-out rows per similarity block: (KNN_CHUNK, N_train) float64 at a time
LINEAR_STEPS = 300
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
    train = F.normalize(train_features.double(), dim=1)
    correct = 0
    for start in range(0, len(test_features), KNN_CHUNK):  # memory: one (chunk, N_train) block, not (M, N_train)
        test = F.normalize(test_features[start : start + KNN_CHUNK].double(), dim=1)
        similarity, nearest = (test @ train.T).topk(k, dim=1)  # (chunk, k) each
        votes = torch.zeros(len(test), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, train_labels[nearest], (similarity / temperature).exp())  # (chunk, K)
        correct += int((votes.argmax(dim=1) == test_labels[start : start + KNN_CHUNK]).sum())
    return correct / len(test_features)


def linear_probe_accuracy(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
    test_labels: torch.Tensor, *, num_classes: int, steps: int = LINEAR_STEPS,
    weight_decay: float = LINEAR_WEIGHT_DECAY,
) -> float:
    """Held-out accuracy of a logistic regression fitted on the training features (module doc)."""
    _check(train_features, train_labels, "training")
    _check(test_features, test_labels, "held-out")
    mean, std = train_features.double().mean(0), train_features.double().std(0, unbiased=False) + 1e-6
    train = (train_features.double() - mean) / std  # (N, D)
    test = (test_features.double() - mean) / std  # (M, D)
    weight = torch.zeros(num_classes, train.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train @ weight.T + bias, train_labels) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return ((test @ weight.T + bias).argmax(dim=1) == test_labels).double().mean().item()


@dataclass(frozen=True)
class ProbeScores:
    """Held-out accuracies of one backbone's features."""

    knn: float
    linear: float


def probe_scores(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
    test_labels: torch.Tensor, *, num_classes: int,
) -> ProbeScores:
    """k-NN and linear-probe accuracy of the same features (defaults of the module doc)."""
    args = (train_features, train_labels, test_features, test_labels)
    return ProbeScores(knn=knn_accuracy(*args, num_classes=num_classes),
                       linear=linear_probe_accuracy(*args, num_classes=num_classes))


@dataclass(frozen=True)
class ProbeReport:
    """A trained backbone's probe scores next to the untrained one's, and the verdict."""

    trained: ProbeScores
    untrained: ProbeScores
    num_classes: int
    train_images: int
    held_out_images: int
    margin: float = PASS_MARGIN

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

    @classmethod
    def from_json(cls, raw: Mapping) -> ProbeReport:
        """The report :meth:`to_json` wrote (extra keys ignored)."""
        return cls(ProbeScores(**raw["trained"]), ProbeScores(**raw["untrained"]), raw["num_classes"],
                   raw["train_images"], raw["held_out_images"], raw["margin"])

    def to_json(self) -> dict:
        return {**asdict(self), "knn_gain": self.knn_gain, "passed": self.passed, "verdict": self.verdict,
                "knn": {"k": KNN_K, "temperature": KNN_TEMPERATURE, "votes": "exp(cosine / T), summed per class"},
                "linear": {"steps": LINEAR_STEPS, "weight_decay": LINEAR_WEIGHT_DECAY,
                           "optimizer": "full-batch L-BFGS, zero init"}}


def write_report(out_dir: str | Path, report: ProbeReport, *, title: str, details: Mapping[str, object]) -> Path:
    """``out_dir/report.json`` (the report and ``details``) and ``out_dir/report.md``; returns the .md path."""
    out_dir = Path(out_dir)
    write_json(out_dir / REPORT_JSON, {**report.to_json(), "details": dict(details)})
    chance = 1 / report.num_classes
    lines = [
        f"# {title}", "", f"**{report.verdict}**", "",
        (f"Held-out accuracy on {report.held_out_images} images ({report.num_classes} classes, chance "
         f"{chance:.3f}); the probes fit on {report.train_images} training images' CLS features."), "",
        "| backbone | k-NN | linear probe |", "|---|---|---|",
        f"| trained | {report.trained.knn:.3f} | {report.trained.linear:.3f} |",
        f"| untrained (same init) | {report.untrained.knn:.3f} | {report.untrained.linear:.3f} |", "",
        (f"k-NN: k = {KNN_K}, cosine similarity, votes weighted exp(sim / {KNN_TEMPERATURE}) (DINO). Linear probe: "
         f"logistic regression on standardised features, {LINEAR_STEPS} full-batch L-BFGS iterations, "
         f"L2 {LINEAR_WEIGHT_DECAY}."), "",
        "| detail | value |", "|---|---|",
        *(f"| {key} | {value} |" for key, value in details.items()), "",
    ]
    path = out_dir / REPORT_MD
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path
