"""Inception Score (Salimans et al. 2016) the way ADM computes it (SPEC §10).

Class probabilities are softmax(pool·W) with W the 2015 Inception's 1008-way logits matrix and
no bias (torch-fidelity's ``logits_unbiased``). The N images are cut into ``splits`` consecutive
parts of ⌊N/splits⌋ (10 parts of 5000 for 50K, as ADM); a remainder of fewer than ``splits``
images is left out, as torch-fidelity does. The score of a part is exp(E_x KL(p(y|x) ‖ p(y))).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, xlogy


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` parts of the score of ``logits`` ``(N, C)``.

    Raises ValueError when there are fewer images than splits.
    """
    if logits.ndim != 2 or logits.shape[0] < splits or splits < 1:
        raise ValueError(
            f"Inception Score with {splits} splits needs logits (N, C) with N >= {splits}, found shape "
            f"{logits.shape}; evaluate more images or request fewer splits."
        )
    probs = np.exp(log_softmax(logits.astype(np.float64), axis=1))  # (N, C)
    part_size = logits.shape[0] // splits
    scores = [_part_score(probs[i * part_size : (i + 1) * part_size]) for i in range(splits)]
    return float(np.mean(scores)), float(np.std(scores))


def _part_score(probs: np.ndarray) -> float:
    """exp of the mean KL divergence between each row of ``probs`` ``(n, C)`` and their mean."""
    marginal = probs.mean(axis=0, keepdims=True)  # (1, C)
    kl = (xlogy(probs, probs) - xlogy(probs, marginal)).sum(axis=1)  # (n,), 0·log 0 = 0
    return float(np.exp(kl.mean()))
