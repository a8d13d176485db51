"""LAVT models: the paper's ``lavt-b`` and the embedded default ``lavt-tiny``."""

from .checkpoint import CheckpointMismatchError, load_checkpoint
from .config import DecoderConfig, LavtConfig, PreprocessConfig, PwamConfig, SwinConfig
from .lavt import LAVT
from .registry import build_model, list_models, model_config, text_encoder_dir

__all__ = [
    "LAVT",
    "CheckpointMismatchError",
    "DecoderConfig",
    "LavtConfig",
    "PreprocessConfig",
    "PwamConfig",
    "SwinConfig",
    "build_model",
    "list_models",
    "load_checkpoint",
    "model_config",
    "text_encoder_dir",
]
