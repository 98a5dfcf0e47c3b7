"""ADM-compatible evaluation (SPEC §10): FID, sFID, Inception Score, precision/recall, in PyTorch;
and the Fréchet distance / precision-recall in a VFM's feature space (FD_DINOv2)."""

from reglue.metrics.evaluate import (
    evaluate,
    format_table,
    read_images,
    reference_features,
    space_reference,
    write_results,
)
from reglue.metrics.feature_space import FD_DINOV2, FeatureSpace, fd_key, load_feature_space
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
    "FD_DINOV2",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "FeatureSpace",
    "InceptionFeatures",
    "evaluate",
    "extract_features",
    "fd_key",
    "feature_statistics",
    "format_table",
    "frechet_distance",
    "inception_score",
    "knn_radii",
    "load_feature_space",
    "load_inception",
    "precision_recall",
    "read_images",
    "reference_features",
    "space_reference",
    "write_results",
]
