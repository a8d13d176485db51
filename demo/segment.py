"""One image and one sentence in, the mask overlaid on the image out: the way users try a model first.

Every backend is fed exactly what the refer loader feeds evaluation (exact resize to the model size, ImageNet
normalisation, WordPiece ids cut at 20), and its mask logits are resized back to the photo's size before the argmax,
so the overlay sits on the photo's pixels. A photo given as a file is decoded reduced when it is far larger than the
model's input (to no less than ``KEEP_FACTOR`` times its side, aspect kept): the mask holds no detail beyond that, and
a 144-megapixel photo would otherwise take gigabytes for logits, mask and overlay at full size.

- ``torch``: the float model (``--model``/``--checkpoint``) or the simulated quantized one (``--quantized DIR``);
- ``pte``: a full-model ExecuTorch program on the host runtime (XNNPACK, the kernels a phone runs);
- ``coreml-interp``: a Core ML package executed by the numpy MIL interpreter (Core ML itself runs on Apple devices
  only).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from quantize.atomic import write_atomic
from quantize.data.preprocess import Tokenizer, clean_expression, image_to_tensor, load_image, to_rgb
from quantize.errors import MissingFileError, UserError
from quantize.models.config import PreprocessConfig
from quantize.models.registry import text_encoder_dir

__all__ = ["BACKENDS", "Segmentation", "overlay", "segment"]

BACKENDS = ("torch", "pte", "coreml-interp")

# The mask is shown by dimming everything outside it and outlining it: a tint would vanish on objects of its colour.
OUTLINE = (0, 255, 255)
DIM = 0.35


@dataclass
class Segmentation:
    """The result of :func:`segment`: the mask at the photo's size and how it was obtained."""

    mask: np.ndarray  # (H, W) bool
    image: Image.Image
    sentence: str
    backend: str
    tokens: int
    seconds: float

    @property
    def area(self) -> float:
        """Fraction of the photo the mask covers."""
        return float(self.mask.mean())


def _runner(backend: str, model: str, checkpoint, quantized, pte, coreml):
    """(callable(image, ids, mask) -> logits, input size, preprocessing) for a backend."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        if quantized:
            from quantize.calibration.artifact import load_quantized

            net = load_quantized(quantized)[0]
        else:
            from quantize.models.registry import build_model

            net = build_model(model, checkpoint=checkpoint)
        net.eval()
        return net, net.config.swin.img_size, net.config.preprocess
    if backend == "pte":
        if not pte:
            raise UserError("--backend pte needs --pte MODEL.pte (a full-model program from `ptq4ris export-pte`)")
        from mobile_runtime.runtime import load_full_model

        program = load_full_model(pte)
        return program, program.input_shapes[0][-1], PreprocessConfig()
    if not coreml:
        raise UserError(
            "--backend coreml-interp needs --coreml MODEL.mlpackage (a full-model package from `ptq4ris export-coreml`)"
        )
    from ios_export.parity import CoreMLProgram

    package = CoreMLProgram(coreml, stage="full")  # a stage package or another model's is refused before it runs
    return package, package.input_shapes[0][-1], PreprocessConfig()


@torch.no_grad()
def segment(
    image: str | Path | Image.Image,
    sentence: str,
    backend: str = "torch",
    model: str = "lavt-tiny",
    checkpoint: str | Path | None = None,
    quantized: str | Path | None = None,
    pte: str | Path | None = None,
    coreml: str | Path | None = None,
) -> Segmentation:
    """Segment the object ``sentence`` names in ``image`` with one backend (see the module docstring)."""
    import time

    # The photo is decoded once the runner gives the model's input side; a mistyped path or sentence is refused first,
    # before a model loads.
    if not isinstance(image, Image.Image) and not Path(image).is_file():
        raise MissingFileError(f"image not found: {image}")
    clean_expression(sentence)
    run, size, preprocess = _runner(backend, model, checkpoint, quantized, pte, coreml)
    photo = to_rgb(image) if isinstance(image, Image.Image) else load_image(image, size)
    ids, attention = Tokenizer(text_encoder_dir(), preprocess.max_tokens)(sentence)
    pixels = image_to_tensor(photo, size, preprocess)[None]
    start = time.perf_counter()
    logits = run(pixels, ids[None], attention[None])
    seconds = time.perf_counter() - start
    # Bilinear on the logits, then the argmax: a smoother outline than resizing the low-resolution mask.
    full = F.interpolate(logits.float(), size=(photo.height, photo.width), mode="bilinear", align_corners=False)
    mask = (full.argmax(1)[0] == 1).numpy()
    return Segmentation(mask, photo, sentence, backend, int(attention.sum()), seconds)


def overlay(photo: Image.Image, mask: np.ndarray, outline=OUTLINE, dim: float = DIM) -> Image.Image:
    """``photo`` with everything outside ``mask`` dimmed and the mask's edge drawn in ``outline``."""
    from scipy import ndimage

    base = np.asarray(photo.convert("RGB"), dtype=np.float32)
    if mask.shape != base.shape[:2]:
        raise UserError(f"mask {mask.shape} does not match the photo {base.shape[:2]}")
    out = base * dim
    out[mask] = base[mask]
    edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(mask.shape) // 128))
    out[edge] = outline
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def png_path(out: str | Path) -> Path:
    """``out`` when it names a PNG file, else a clear error (checked before the model runs, too)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {out}")
    return out


def save_overlay(result: Segmentation, out: str | Path) -> Path:
    """Write the overlay as a PNG (atomically)."""
    out = png_path(out)
    buffer = io.BytesIO()
    overlay(result.image, result.mask).save(buffer, format="PNG")
    write_atomic(out, buffer.getvalue())
    return out
