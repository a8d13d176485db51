"""The calibrated model on disk: a self-contained folder that evaluation and both exporters reload without
recalibrating and without the data set.

Layout of ``DIR``:
    config.json                    format version, the LAVT config, the recipe, what calibration used, the quantizer
                                   spec of every site (kind, bits, shape): everything needed to rebuild the modules.
    model.safetensors              the state dict of the quantized model: float weights (BatchNorms and channel
                                   permutations folded in) and every quantizer's buffers (its qparams).
    qparams.json                   the same qparams in readable form, per site and slot, for people and other tools.
    calibration_inputs.safetensors the calibration pairs, compact (images as uint8 pixels, ids as int32): export
                                   observes its GEMM output ranges on them, so it needs no data set.
    ptq4ris-manifest.json          written by ptq4ris (kind ``calibrated-model``), the versions of the packages that
                                   wrote it, a sha256 of every file above and a digest of the qparams alone (two
                                   machines compare calibrations with it). Loading refuses a file whose digest differs.

The folder is built under a staging name and swapped in when complete (:mod:`quantize.outputs`): a crash never
leaves a half artifact, and only a folder ptq4ris wrote as a calibrated model is ever replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..models.config import LavtConfig
from ..models.lavt import LAVT
from ..outputs import check_output_folder, folder_manifest, replace_folder
from .placement import place_quantizers, quantized_sites, quantizers_of, rebuild_quantizers
from .recipe import METHODS, Recipe

__all__ = [
    "ARTIFACT_KIND",
    "FORMAT_VERSION",
    "QuantizedArtifactError",
    "check_artifact_output",
    "load_calibration_inputs",
    "load_quantized",
    "save_quantized",
]

FORMAT_VERSION = 2
ARTIFACT_KIND = "calibrated-model"
FILES = ("config.json", "model.safetensors", "qparams.json", "calibration_inputs.safetensors")
# Recorded so that a result can be traced to the code that produced it; read from the installed distributions'
# metadata so that recording them imports none of them.
VERSIONED_PACKAGES = ("ptq4ris", "torch", "executorch", "torchao", "coremltools", "transformers")

logger = logging.getLogger(__name__)


class QuantizedArtifactError(UserError):
    """A quantized-model folder is missing, incomplete, edited, or from an incompatible version."""


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


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_artifact_output(out_dir: str | Path, flag: str = "--out") -> Path:
    """Refuse, before calibrating, an ``--out`` that is not new, empty or an earlier calibrated model."""
    return check_output_folder(out_dir, flag, ARTIFACT_KIND)


def _compact_inputs(batch, cfg: LavtConfig) -> dict[str, torch.Tensor]:
    """The calibration pairs in a compact, exact form: the split pairs' images as the uint8 pixels they were
    normalised from (the everyday expressions reuse those images: an index per pair says which), ids as int32."""
    from ..data.preprocess import normalize_image

    pairs = len(batch)
    split_pairs = pairs - batch.everyday
    image_index = torch.cat([torch.arange(split_pairs), torch.arange(batch.everyday) % split_pairs]).to(torch.int32)
    images = batch.images[:split_pairs]
    mean = torch.tensor(cfg.preprocess.mean).view(3, 1, 1)
    std = torch.tensor(cfg.preprocess.std).view(3, 1, 1)
    pixels = ((images * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
    # Exact only if the images came from uint8 pixels (they do for every refer split); keep float32 otherwise.
    stored = pixels if torch.equal(normalize_image(pixels, cfg.preprocess), images) else images.float()
    if not torch.equal(batch.images, stored_images(stored, image_index, cfg)):
        stored, image_index = batch.images.float(), torch.arange(pairs, dtype=torch.int32)
    return {
        "images": stored.contiguous(),
        "image_index": image_index,
        "input_ids": batch.input_ids.to(torch.int32).contiguous(),
        "attention_mask": batch.attention_mask.to(torch.uint8).contiguous(),
    }


def stored_images(images: torch.Tensor, image_index: torch.Tensor, cfg: LavtConfig) -> torch.Tensor:
    from ..data.preprocess import normalize_image

    full = normalize_image(images, cfg.preprocess) if images.dtype == torch.uint8 else images
    return full[image_index.long()]


def save_quantized(
    model: nn.Module,
    recipe: Recipe,
    out_dir: str | Path,
    model_name: str,
    extra: dict[str, Any] | None = None,
    calibration_inputs=None,
) -> Path:
    """Write the artifact of a calibrated model (see the module docstring). ``calibration_inputs``: the
    :class:`~.calibrate.CalibrationBatch` calibration used, stored so export needs no data set. Replaces an existing
    ``out_dir`` only if ptq4ris wrote it as a calibrated model."""
    from safetensors.torch import save_file

    from .qparams_digest import qparams_digest

    out_dir = Path(out_dir)
    with replace_folder(out_dir, ARTIFACT_KIND) as tmp:
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
        files = FILES if calibration_inputs is not None else FILES[:3]
        if calibration_inputs is not None:
            save_file(_compact_inputs(calibration_inputs, model.config), tmp / "calibration_inputs.safetensors")
        from ..outputs import write_manifest

        write_manifest(
            tmp,
            ARTIFACT_KIND,
            format_version=FORMAT_VERSION,
            versions=package_versions(),
            files={name: _sha256(tmp / name) for name in files},
            qparams_digest=qparams_digest(model),
        )
    return out_dir


def _verified_manifest(path: Path) -> dict[str, Any]:
    """The artifact's manifest, after checking that every file it lists is there and unchanged."""
    manifest = folder_manifest(path)
    if manifest is None or manifest.get("kind") != ARTIFACT_KIND:
        raise QuantizedArtifactError(
            f"{path} is not a calibrated model written by this ptq4ris (no ptq4ris-manifest.json of a calibrated "
            f"model): create one with `ptq4ris calibrate --out {path}`"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QuantizedArtifactError(
            f"{path} has format version {manifest.get('format_version')}, this ptq4ris reads {FORMAT_VERSION}: "
            "recalibrate it"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not set(FILES[:3]) <= set(files):
        raise QuantizedArtifactError(f"{path / 'ptq4ris-manifest.json'} lists no file digests: recalibrate {path}")
    for name, digest in files.items():
        if name not in FILES:
            raise QuantizedArtifactError(
                f"{path / 'ptq4ris-manifest.json'} lists an unknown file {name!r}: recalibrate"
            )
        f = path / name
        if not f.is_file():
            raise QuantizedArtifactError(f"{path} is not a complete calibrated model: {name} is missing; recalibrate")
        if _sha256(f) != digest:
            raise QuantizedArtifactError(
                f"{f} was changed after calibration (its sha256 differs from the manifest's): restore it or recalibrate"
            )
    written = manifest.get("versions", {})
    for name, version in package_versions().items():
        if written.get(name) not in (None, version):
            logger.warning("%s was calibrated with %s %s; this is %s", path, name, written.get(name), version)
    return manifest


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from ..safe_files import read_safetensors

    return read_safetensors(path, fix="recalibrate", error=QuantizedArtifactError)


def check_quantized(path: str | Path, flag: str = "--quantized") -> Path:
    """Cheap check, before any heavy step, that ``path`` is a complete, unedited calibrated model."""
    path = Path(path)
    if not path.is_dir():
        raise QuantizedArtifactError(
            f"{flag} {path}: no calibrated model there; create one with `ptq4ris calibrate --out {path}`"
        )
    _verified_manifest(path)
    return path


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> tuple[LAVT, Recipe, dict[str, Any]]:
    """Rebuild a calibrated model from its folder. Returns (fake-quantized model in eval mode, recipe, config).
    Refuses a folder that is incomplete, edited after calibration, or of another format version."""
    path = check_quantized(path)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    try:
        config = json.loads(config_file.read_text())
        recipe = Recipe.from_dict(config["recipe"])
        lavt_config = LavtConfig.from_dict(config["lavt_config"])
        sites = config["sites"]
    except (ValueError, KeyError, TypeError) as e:  # ValueError: not JSON, not UTF-8, or a recipe Recipe refuses
        raise QuantizedArtifactError(f"corrupt {config_file} ({type(e).__name__}: {e}); recalibrate") from e
    if recipe.method not in METHODS:
        raise QuantizedArtifactError(f"corrupt {config_file}: unknown method {recipe.method!r}; recalibrate")
    model = LAVT(lavt_config).eval()
    try:
        place_quantizers(model, recipe)
    except UserError as e:  # a recipe naming layers the model lacks
        raise QuantizedArtifactError(f"corrupt {config_file}: {e}; recalibrate") from e
    _check_recipe_matches_sites(model, recipe, sites, config_file)
    rebuild_quantizers(model, sites)
    state = _read_weights(weights_file)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise QuantizedArtifactError(
            f"{weights_file} does not match its config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(device).eval(), recipe, config


def _check_recipe_matches_sites(model: nn.Module, recipe: Recipe, sites: dict, config_file: Path) -> None:
    """The recipe must be the one the stored quantizers were placed by (same kind and bits at every site and slot):
    an edited recipe would otherwise label the results of another setting."""
    for site in quantized_sites(model):
        stored = sites.get(site.info.name)
        if not isinstance(stored, dict):
            raise QuantizedArtifactError(f"{config_file} has no quantizers for {site.info.name}: recalibrate")
        for slot, quantizer in quantizers_of(site).items():
            placed, kept = quantizer.spec(), stored.get(slot) or {}
            if (placed.get("kind"), placed.get("bits")) != (kept.get("kind"), kept.get("bits")):
                raise QuantizedArtifactError(
                    f"{config_file}: its recipe ({recipe.method} {recipe.bits}) places a {placed.get('bits')}-bit "
                    f"{placed.get('kind')} quantizer at {site.info.name} ({slot}), but the calibrated one is "
                    f"{kept.get('bits')}-bit {kept.get('kind')}: the file was edited; recalibrate"
                )
    if set(sites) != {s.info.name for s in quantized_sites(model)}:
        raise QuantizedArtifactError(f"{config_file} lists quantized sites its recipe does not place: recalibrate")


def load_calibration_inputs(path: str | Path, model_config: LavtConfig) -> dict[str, torch.Tensor] | None:
    """The calibration pairs stored in a calibrated folder, as model inputs: images (P, 3, S, S) float32, input_ids
    and attention_mask (P, T) int64; ``None`` for a folder calibrated without them."""
    f = Path(path) / "calibration_inputs.safetensors"
    if not f.is_file():
        return None
    stored = _read_weights(f)
    try:
        return {
            "images": stored_images(stored["images"], stored["image_index"], model_config),
            "input_ids": stored["input_ids"].long(),
            "attention_mask": stored["attention_mask"].long(),
        }
    except KeyError as e:
        raise QuantizedArtifactError(f"{f} lacks {e}; recalibrate") from e
