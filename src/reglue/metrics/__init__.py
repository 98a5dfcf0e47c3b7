"""ADM-compatible evaluation (SPEC §10): FID, sFID, Inception Score, precision/recall, in PyTorch."""

from reglue.metrics.evaluate import evaluate, format_table, read_images, reference_features, write_results
from reglue.metrics.fid import feature_statistics, frechet_distance
from reglue.metrics.inception import (
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    InceptionFeatures,
    extract_features,
    load_inception,
)
from reglue.metrics.iscore import inception_score
from reglue.metrics.manifold import knn_radii, precision_recall

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "InceptionFeatures",
    "evaluate",
    "extract_features",
    "feature_statistics",
    "format_table",
    "frechet_distance",
    "inception_score",
    "knn_radii",
    "load_inception",
    "precision_recall",
    "read_images",
    "reference_features",
    "write_results",
]
