"""LAVT models: the paper's ``lavt-b`` and the embedded default ``lavt-tiny``."""

from .checkpoint import CheckpointMismatchError, load_checkpoint
from .config import DecoderConfig, LavtConfig, PreprocessConfig, PwamConfig, SwinConfig
from .lavt import LAVT
from .registry import ModelCard, build_model, list_models, model_card, model_config, text_encoder_dir
from .roles import LAVT_ROLES, LayerRoles, layer_roles

__all__ = [
    "LAVT",
    "LAVT_ROLES",
    "CheckpointMismatchError",
    "DecoderConfig",
    "LavtConfig",
    "LayerRoles",
    "ModelCard",
    "PreprocessConfig",
    "PwamConfig",
    "SwinConfig",
    "build_model",
    "layer_roles",
    "list_models",
    "load_checkpoint",
    "model_card",
    "model_config",
    "text_encoder_dir",
]
