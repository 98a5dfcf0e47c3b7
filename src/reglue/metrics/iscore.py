"""Inception Score (Salimans et al. 2016) the way ADM computes it (SPEC §10).

Class probabilities are softmax(pool·W) with W the 2015 Inception's 1008-way logits matrix and
no bias (torch-fidelity's ``logits_unbiased``). As in ADM's ``compute_inception_score``, the N
images are cut into consecutive parts of ``split_size`` = 5000 images, the last part holding
whatever is left: 10 parts at 50K, parts of 5000, 5000 and 2000 at 12K, a single part below
5000. The score of a part is exp(E_x KL(p(y|x) ‖ p(y))); the Inception Score is the plain mean
over the parts (a short last part weighs as much as a full one, as in ADM). The standard
deviation over the parts is returned beside it; ADM reports only the mean.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, xlogy

from reglue.errors import InputError

SPLIT_SIZE = 5000  # ADM's split_size


def inception_score(logits: np.ndarray, *, split_size: int = SPLIT_SIZE) -> tuple[float, float]:
    """Mean and standard deviation over parts of ``split_size`` images of the score of ``logits`` ``(N, C)``.

    The maths is float64. Raises ValueError on an empty or non-2-D ``logits`` or a ``split_size`` < 1.
    """
    if logits.ndim != 2 or logits.shape[0] < 1 or split_size < 1:
        raise InputError(
            f"Inception Score needs logits (N, C) with N >= 1 and split_size >= 1, found shape "
            f"{logits.shape} and split_size {split_size}; evaluate at least one image."
        )
    probs = np.exp(log_softmax(logits.astype(np.float64), axis=1))  # (N, C)
    scores = [_part_score(probs[start : start + split_size]) for start in range(0, len(probs), split_size)]
    return float(np.mean(scores)), float(np.std(scores))


def _part_score(probs: np.ndarray) -> float:
    """exp of the mean KL divergence between each row of ``probs`` ``(n, C)`` and their mean."""
    marginal = probs.mean(axis=0, keepdims=True)  # (1, C)
    kl = (xlogy(probs, probs) - xlogy(probs, marginal)).sum(axis=1)  # (n,), 0·log 0 = 0
    return float(np.exp(kl.mean()))
