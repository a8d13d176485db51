"""Loading foreign and own checkpoints into :class:`~quantize.models.lavt.LAVT`, strictly.

Official LAVT files (github ``yz93/LAVT-RIS``) are ``torch.save`` pickles: ``{'model': state_dict, 'args':
argparse.Namespace, ...}`` for ``lavt_one``; the older ``lavt`` layout keeps BERT apart under ``bert_model``,
unprefixed. They are opened with ``weights_only=True`` and ``argparse.Namespace`` allow-listed, never by trusting
arbitrary pickles. Every key renamed or dropped is logged at WARNING; anything still missing, unexpected or
mis-shaped raises :class:`CheckpointMismatchError` listing all of them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_file
from ..errors import MissingFileError, UserError
from ..safe_files import read_safetensors, read_torch_file

__all__ = [
    "EMBEDDED_WEIGHTS",
    "CheckpointMismatchError",
    "checkpoint_filter_fn",
    "load_checkpoint",
    "load_embedded_weights",
    "load_state_dict_checked",
    "load_text_encoder_weights",
    "save_state_dict",
]

logger = logging.getLogger(__name__)

EMBEDDED_WEIGHTS = "lavt-tiny.safetensors"

# Keys that official or transformers files may carry but the model derives or does not have.
_DROPPABLE_SUFFIXES = ("embeddings.position_ids", ".attn_mask")
_DROPPABLE_PREFIXES = ("text_encoder.pooler.", "pooler.")


class CheckpointMismatchError(UserError):
    """The checkpoint does not fit the architecture: lists missing, unexpected and mis-shaped keys."""


def _read_file(path: Path) -> Mapping[str, object]:
    """The checkpoint's contents; every way the file can be broken is a one-line :class:`UserError` naming it."""
    if not path.exists():
        raise MissingFileError(f"checkpoint not found: {path} (pass the path of a .pth or .safetensors file)")
    if path.suffix == ".safetensors":
        return read_safetensors(path, fix="re-download or re-save it")
    return read_torch_file(
        path,
        allowed_globals=[argparse.Namespace],
        fix="only state dicts and the argparse.Namespace of official LAVT files are accepted; re-save other "
        "pickles as a state dict or a .safetensors file",
    )


def checkpoint_filter_fn(checkpoint: Mapping[str, object], model: nn.Module) -> dict[str, torch.Tensor]:
    """Turn an official (``lavt_one`` or ``lavt``) or plain checkpoint into ``model``'s state-dict layout."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(
            f"the checkpoint holds a {type(checkpoint).__name__}, not a state dict (a mapping of names to tensors): "
            "give the .pth or .safetensors of a LAVT model"
        )
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        state = dict(checkpoint["model"])
        bert = checkpoint.get("bert_model")
        if isinstance(bert, Mapping):
            logger.warning("older 'lavt' layout: %d BERT keys moved from 'bert_model' under 'text_encoder.'", len(bert))
            state.update({f"text_encoder.{k}": v for k, v in bert.items()})
    elif "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        state = dict(checkpoint["state_dict"])
    else:
        state = dict(checkpoint)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointMismatchError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
        new_key = key.removeprefix("module.")
        if new_key != key:
            logger.warning("renamed %s -> %s", key, new_key)
        if new_key.endswith(_DROPPABLE_SUFFIXES) or new_key.startswith(_DROPPABLE_PREFIXES):
            logger.info("dropped %s (derived or unused by this model)", key)  # expected: e.g. BERT's unused pooler
            continue
        out[new_key] = value
    return out


def load_state_dict_checked(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: str, ignore_missing: str = ""
) -> None:
    """``load_state_dict`` that lists every missing, unexpected and mis-shaped key before loading anything; keys under
    ``ignore_missing`` may be absent."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not (ignore_missing and k.startswith(ignore_missing))]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit {type(module).__name__}: is it a checkpoint of another architecture?"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"{len(items)} {title} keys:\n  " + "\n  ".join(shown))
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict(state, strict=not ignore_missing)


def load_checkpoint(model: nn.Module, path: str | Path, optional_prefix: str = "") -> None:
    """Load an official LAVT ``.pth`` or a ``.safetensors`` state dict into ``model`` (strict; see module doc).

    ``optional_prefix``: keys under it may be absent (``text_encoder.`` for models whose text encoder comes from its
    own package); every other key must match.
    """
    path = Path(path)
    try:
        state = checkpoint_filter_fn(_read_file(path), model)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{path}: {e}") from e
    load_state_dict_checked(model, state, str(path), ignore_missing=optional_prefix)


def load_text_encoder_weights(text_encoder: nn.Module, model_dir: str | Path) -> None:
    """Load a transformers ``BertModel`` directory (``model.safetensors``) into our own BERT module."""
    path = Path(model_dir) / "model.safetensors"
    load_state_dict_checked(text_encoder, checkpoint_filter_fn(_read_file(path), text_encoder), str(path))


def load_embedded_weights(model: nn.Module, path: str | Path | None = None) -> None:
    """Load the non-text weights of ``lavt-tiny`` embedded in the package; the text encoder comes from its own
    package."""
    if path is None:
        path = Path(str(resources.files("quantize.models") / "weights" / EMBEDDED_WEIGHTS))
    load_checkpoint(model, path, optional_prefix="text_encoder.")


def save_state_dict(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (temporary name in the same folder, then rename)."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata=metadata)
