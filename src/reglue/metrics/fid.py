"""Fréchet distance between Gaussians fitted to Inception features (FID and sFID, SPEC §10).

The maths follows OpenAI's ADM evaluator so that numbers compare with published ones:
statistics in float64 (``np.cov(rowvar=False)``), ``scipy.linalg.sqrtm`` of σ1·σ2, a retry
with 1e-6 added to both diagonals when that square root is not finite, and its real part.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from reglue.errors import InputError

SQRTM_EPS = 1e-6  # added to the covariance diagonals when sqrtm(σ1·σ2) is not finite (ADM's value)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of ``features`` ``(N, D)``, both float64.

    Raises ValueError for fewer than 2 rows (a covariance needs at least two).
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise InputError(
            f"feature statistics need an (N, D) array with N >= 2, found shape {features.shape}; "
            "evaluate at least two images."
        )
    features = features.astype(np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1−μ2‖² + tr(σ1) + tr(σ2) − 2·tr(√(σ1·σ2)) for means ``(D,)`` and covariances ``(D, D)``."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise InputError(
            f"Fréchet distance needs means (D,) and covariances (D, D) of one D; found means {mu1.shape}, "
            f"{mu2.shape} and covariances {sigma1.shape}, {sigma2.shape}. Were the statistics made from "
            "the same feature (pool 2048 vs spatial 2023)?"
        )
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * SQRTM_EPS
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
