"""The calibrated model on disk: a self-contained folder that evaluation and both exporters reload without
recalibrating.

Layout of ``DIR``:
    config.json       format version, the LAVT config, the recipe, the calibration data used, the quantizer spec of
                      every site (kind, bits, shape): everything needed to rebuild the module tree.
    model.safetensors the state dict of the quantized model: float weights (BatchNorms and channel permutations
                      already folded in) and every quantizer's buffers (its qparams).
    qparams.json      the same qparams in readable form, per site and slot, for people and other tools.

The folder is written under a temporary name and renamed when complete, so a crash never leaves a half artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_folder
from ..models.config import LavtConfig
from ..models.lavt import LAVT
from .placement import place_quantizers, quantized_sites, quantizers_of, rebuild_quantizers
from .recipe import Recipe
from ..errors import UserError

__all__ = ["FORMAT_VERSION", "QuantizedArtifactError", "load_quantized", "save_quantized"]

FORMAT_VERSION = 1


class QuantizedArtifactError(UserError):
    """A quantized-model folder is missing, incomplete, or from an incompatible version."""


def _site_specs(model: nn.Module) -> dict[str, dict[str, dict[str, Any]]]:
    return {s.info.name: {slot: q.spec() for slot, q in quantizers_of(s).items()} for s in quantized_sites(model)}


def _readable_qparams(model: nn.Module) -> dict[str, Any]:
    out = {}
    for site in quantized_sites(model):
        slots = {}
        for slot, q in quantizers_of(site).items():
            entry = q.spec()
            for name, buf in q.named_buffers():
                entry[name] = buf.detach().cpu().reshape(-1).tolist() if buf.numel() != 1 else buf.item()
            slots[slot] = entry
        out[site.info.name] = {"op": site.info.op, "modality": site.info.modality, "role": site.info.role, **slots}
    return out


def save_quantized(
    model: nn.Module, recipe: Recipe, out_dir: str | Path, model_name: str, extra: dict[str, Any] | None = None
) -> Path:
    """Write the artifact of a calibrated model (see the module docstring). Replaces an existing ``out_dir``."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        tmp.mkdir()
        config = {
            "format_version": FORMAT_VERSION,
            "model": model_name,
            "lavt_config": model.config.to_dict(),
            "recipe": recipe.to_dict(),
            "sites": _site_specs(model),
            **(extra or {}),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "qparams.json").write_text(json.dumps(_readable_qparams(model), indent=1))
    return out_dir


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> tuple[LAVT, Recipe, dict[str, Any]]:
    """Rebuild a calibrated model from its folder. Returns (fake-quantized model in eval mode, recipe, config)."""
    path = Path(path)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    if not path.is_dir():
        raise QuantizedArtifactError(f"no quantized model at {path}: create one with `ptq4ris calibrate --out {path}`")
    for f in (config_file, weights_file):
        if not f.is_file():
            raise QuantizedArtifactError(f"{path} is not a complete quantized model: {f.name} is missing")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise QuantizedArtifactError(f"corrupt {config_file}: {e}") from e
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise QuantizedArtifactError(
            f"{path} has format version {version}, this ptq4ris reads {FORMAT_VERSION}: recalibrate it"
        )
    recipe = Recipe.from_dict(config["recipe"])
    model = LAVT(LavtConfig.from_dict(config["lavt_config"])).eval()
    place_quantizers(model, recipe)
    rebuild_quantizers(model, config["sites"])
    state = load_file(weights_file)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise QuantizedArtifactError(
            f"{weights_file} does not match its config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(device).eval(), recipe, config
