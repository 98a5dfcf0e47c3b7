"""Models: the SiT backbone with REGLUE heads and the semantic compressors."""

from reglue.models.compressor import PCAProjection, SemanticCompressor
from reglue.models.official import load_authors_checkpoint
from reglue.models.sit import SIT_MODELS, SiT, SiTConfig, build_sit, sit_config, unwrap_model
from reglue.state_dict import load_state_dict_strict, strip_module_prefix

__all__ = [
    "SIT_MODELS",
    "PCAProjection",
    "SemanticCompressor",
    "SiT",
    "SiTConfig",
    "build_sit",
    "load_authors_checkpoint",
    "load_state_dict_strict",
    "sit_config",
    "strip_module_prefix",
    "unwrap_model",
]
