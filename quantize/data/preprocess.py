"""LAVT's preprocessing: exact resize to the model size (aspect ignored), ImageNet normalisation, uncased WordPiece
ids truncated to ``max_tokens`` *after* the special tokens are added (so a long sentence loses its ``[SEP]``, as in
LAVT), padded with 0, attention mask 1 on real tokens.

Images and sentences arrive as users have them: any mode Pillow opens (16-bit, float, palette, transparent, CMYK,
EXIF-rotated) becomes the 8-bit RGB a viewer shows, a photo far larger than the model needs is decoded reduced, and
invisible characters in a sentence are dropped before the tokenizer sees it (:func:`clean_expression`).
"""

from __future__ import annotations

import logging
import reprlib
import threading
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MissingFileError, UserError
from ..models.config import PreprocessConfig

__all__ = [
    "MAX_PIXELS",
    "KEEP_FACTOR",
    "BACKGROUND",
    "load_image",
    "to_rgb",
    "resize_image",
    "normalize_image",
    "image_to_tensor",
    "resize_mask",
    "clean_expression",
    "Tokenizer",
    "ExpressionError",
]

logger = logging.getLogger(__name__)

# Photos over this many pixels are refused rather than decoded. 250 MP is above every phone and camera sensor and most
# stitched panoramas users hand us, and bounds the full decode of a format that cannot be decoded reduced (PNG, TIFF)
# to about 1 GB (RGBA, 4 bytes a pixel). Pillow's own guard (89 MP warning, 179 MP traceback) is replaced by this one.
MAX_PIXELS = 250_000_000

# A large photo is decoded reduced by an integer factor, but never to less than this many times the model's side: the
# final bilinear resize then still averages at least 4 x 4 decoded pixels into each model pixel, so the model's input
# differs from a resize of the full photo by rounding only; a photo under twice this size is not reduced at all.
KEEP_FACTOR = 4

# Transparent pixels are shown on the ImageNet mean colour: it normalises to zero, the input that carries the least
# signal into the backbone, and it is a mid-grey on which neither a black nor a white object vanishes (as each would
# on a background of its own colour).
BACKGROUND = tuple(round(255 * m) for m in PreprocessConfig().mean)

# Pillow reads its pixel limit from a module global, at open and again at decode (TIFF tiles, GIF frames), so it is
# set for the whole load and restored after; the lock keeps two threads from restoring each other's value. It
# serialises decodes within a process, which costs nothing while the data loaders read one image at a time.
_PILLOW_LIMIT = threading.Lock()

# Pillow raises these (besides OSError) for a file that is corrupt in one way or another.
_CORRUPT = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError)


class ExpressionError(UserError):
    """An expression the model cannot take (empty, invisible, not valid UTF-8, or not a string)."""


def load_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Open an image file as 8-bit RGB, with an error that names the file when it is missing, corrupt or too large.

    Every mode Pillow opens is converted as a viewer shows it (see :func:`to_rgb`), after the EXIF orientation is
    applied.

    Args:
        path: the image file.
        size: the side of the model's square input. When given, a photo larger than ``KEEP_FACTOR * size`` on both
            sides is decoded reduced by the largest integer factor that keeps both sides at least that long (JPEG
            by DCT scaling, so the full photo is never in memory; other formats reduced right after decoding), its
            aspect kept. ``None`` decodes at full size.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image not found: {path}")
    keep = None if size is None else KEEP_FACTOR * int(size)
    try:
        with _PILLOW_LIMIT:
            saved = Image.MAX_IMAGE_PIXELS
            try:
                # Opening reads the header only; the check right after it names the file and its size, which
                # Pillow's warning and traceback do not.
                Image.MAX_IMAGE_PIXELS = None
                with Image.open(path) as im:
                    _check_pixels(path, im.size)
                    # A frame or tile larger than the header says is caught by Pillow's check during the decode.
                    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
                    if keep:
                        im.draft("RGB", (keep, keep))  # JPEG only: decodes at 1/2, 1/4 or 1/8 scale
                    im.load()
                    ImageOps.exif_transpose(im, in_place=True)
                    eight = _eight_bit(im, f"image {path}")
                    if keep:
                        eight = _reduce(eight, keep)
                    rgb = _flatten(eight)
                    # Closing the file invalidates the image it was opened as: hand back a copy instead.
                    return rgb.copy() if rgb is im else rgb
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except UserError:
        raise
    except Image.DecompressionBombError as e:
        raise UserError(f"image {path} holds a frame over {MAX_PIXELS:,} pixels ({e}); downscale it") from e
    except _CORRUPT as e:
        raise UserError(f"corrupt or unreadable image {path}: {e}; replace the file") from e


def _check_pixels(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise UserError(
            f"image {path} is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the limit of "
            f"{MAX_PIXELS / 1e6:.0f} megapixels: downscale it (the model sees it at a few hundred pixels a side)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB as a viewer shows it.

    16-bit greyscale is scaled by its bit depth (value >> 8), not clipped as ``convert("RGB")`` does (which turns it
    white); 32-bit integer greyscale by the depth the TIFF declares (16 bits when it declares none: Pillow stores
    16-bit PGM samples that way); float greyscale in [0, 1] is scaled by 255 and other floats are taken as 0-255;
    transparency is composited on :data:`BACKGROUND`; palette, CMYK, YCbCr, LAB, HSV use Pillow's conversions.
    """
    return _flatten(_eight_bit(image))


def _eight_bit(image: Image.Image, name: str = "the image") -> Image.Image:
    """-> the same pixels in L, LA, RGB or RGBA: modes Pillow reduces, resizes and composites correctly."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_grey_to_uint8(image), "L")
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image.convert("RGBA") if "transparency" in image.info else image
    if mode in ("P", "PA"):
        # Reducing palette indices would average them: expand to colours first.
        return image.convert("RGBA" if image.has_transparency_data else "RGB")
    if mode == "1":
        return image.convert("L")
    if mode in ("La", "RGBa"):  # premultiplied alpha
        return image.convert(mode.upper())
    try:
        return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
    except ValueError as e:
        raise UserError(f"{name} has pixel mode {mode}, which Pillow cannot show as RGB: save it as 8-bit RGB") from e


def _grey_to_uint8(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image)  # I;16/I;16B -> uint16 (numpy takes the byte order from the mode), I -> int32, F -> f32
    if image.mode.startswith("I;16"):
        # >> 8 is exact for 8-bit data stored as 16 bits (v * 257 >> 8 == v) and keeps the array at 2 bytes a pixel.
        return (pixels >> 8).astype(np.uint8)
    if image.mode == "F":
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=255.0, neginf=0.0)
        if pixels.size and pixels.min() >= 0.0 and pixels.max() <= 1.0:
            pixels = pixels * 255.0  # float images in [0, 1] are the normalised convention; others are taken as 0-255
        return np.rint(np.clip(pixels, 0.0, 255.0)).astype(np.uint8)
    full = 2 ** _declared_bits(image) - 1
    return np.rint(np.clip(pixels, 0, full).astype(np.float32) * np.float32(255 / full)).astype(np.uint8)


def _declared_bits(image: Image.Image) -> int:
    """Bits a mode-I sample holds: the TIFF's BitsPerSample, else 16 (16-bit PGM/PPM samples open as mode I)."""
    bits = getattr(image, "tag_v2", {}).get(258)
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return min(int(bits), 31) if bits else 16  # mode I is signed 32-bit: its largest value is 2**31 - 1


def _reduce(image: Image.Image, keep: int) -> Image.Image:
    """Reduce by the largest integer factor that leaves both sides at least ``keep``; a smaller image is untouched."""
    factor = min(image.width, image.height) // keep
    return image.reduce(factor) if factor >= 2 else image


def _flatten(image: Image.Image) -> Image.Image:
    """L/LA/RGB/RGBA -> RGB, alpha composited on :data:`BACKGROUND` (dropping it would show what the file hides)."""
    if image.mode in ("LA", "RGBA"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_image(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """RGB image (PIL or HWC uint8) -> (size, size, 3) uint8, resized exactly (bilinear, aspect ignored).

    A PIL image of any mode is converted by :func:`to_rgb` first.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"expected an HWC uint8 RGB array, got shape {image.shape} dtype {image.dtype}")
        image = Image.fromarray(image)
    return np.array(to_rgb(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def normalize_image(pixels: torch.Tensor, cfg: PreprocessConfig = PreprocessConfig()) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> ImageNet-normalised float32, on the tensor's device."""
    mean = torch.tensor(cfg.mean, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def image_to_tensor(
    image: Image.Image | np.ndarray, size: int, cfg: PreprocessConfig = PreprocessConfig()
) -> torch.Tensor:
    """RGB image (PIL or HWC uint8) -> normalised (3, size, size) float32."""
    return normalize_image(torch.from_numpy(resize_image(image, size)).permute(2, 0, 1), cfg)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary mask (H, W) -> (size, size) uint8 by NEAREST resizing, as the RIS protocol evaluates it."""
    return np.array(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.NEAREST), dtype=np.uint8)


@lru_cache(maxsize=4)
def _hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    # No length limit here: Tokenizer cuts the ids at max_tokens itself and says so; transformers' own warning about
    # BERT's 512 positions ("will result in indexing errors") would only alarm a user beside it.
    return AutoTokenizer.from_pretrained(path, model_max_length=int(1e30))


def clean_expression(sentence: str) -> str:
    """The sentence the tokenizer is given: control and format characters (Cc, Cf: zero-width space and joiner, BOM,
    bidi marks, soft hyphen) removed and every other whitespace character made a space, as BERT's own cleaning does,
    so the ids are unchanged. Refused with :class:`ExpressionError` when it is not a string, is not valid UTF-8, or
    shows nothing once cleaned.

    NFKC is not applied. It would change the ids of full-width letters, ligatures, "…", "™" or circled digits (two
    of the sentences in ``tests/golden/wordpiece.json``), which LAVT's tokenizer and the Kotlin and Swift tokenizers
    on the phones leave as they are, and a phone must give the ids this host gives. Nor would it change what is
    refused: no character that survives the cleaning becomes invisible under NFKC (checked over all of Unicode).
    """
    if not isinstance(sentence, str):
        raise ExpressionError(f"expected the expression as a string, got {type(sentence).__name__}")
    try:
        sentence.encode("utf-8")
    except UnicodeEncodeError as e:
        # Python decodes bytes that are not UTF-8 on a command line into lone surrogates (\udc80-\udcff).
        raise ExpressionError(
            f"the expression is not valid UTF-8 (undecodable character {sentence[e.start]!r} at position "
            f"{e.start}): pass the text as UTF-8"
        ) from None
    if not sentence.strip():
        raise ExpressionError("the expression is empty: give a sentence naming the object to segment")
    text = _visible(sentence)
    if not text.strip():
        raise ExpressionError("the expression has no visible characters: give a sentence naming the object to segment")
    return text


def _visible(text: str) -> str:
    return "".join(
        " " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf")
    )


# The truncation warning shows the start and end of the sentence, not all of it (a pasted page would flood the log).
_SHORT = reprlib.Repr()
_SHORT.maxstring = 60


class Tokenizer:
    """Sentence -> (input_ids, attention_mask), each (max_tokens,) int64, exactly as LAVT builds them.

    Args:
        path: a transformers tokenizer directory (uncased WordPiece). all-MiniLM-L6-v2 ships the same 30522-word
            uncased vocabulary as bert-base-uncased, so its directory serves ``lavt-b`` too.
        max_tokens: ids kept, special tokens included.
    """

    def __init__(self, path: str | Path, max_tokens: int = 20) -> None:
        self.path = str(path)
        self.max_tokens = max_tokens
        self._tok = _hf_tokenizer(self.path)

    def __call__(self, sentence: str) -> tuple[torch.Tensor, torch.Tensor]:
        text = clean_expression(sentence)
        return self._pad(self._tok.encode(text, add_special_tokens=True), text)

    def batch(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Many sentences at once (the fast tokenizer's batch path): (S, max_tokens) ids and masks."""
        texts = [clean_expression(s) for s in sentences]
        encoded = self._tok(texts, add_special_tokens=True)["input_ids"]
        pairs = [self._pad(ids, t) for ids, t in zip(encoded, texts)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _pad(self, ids: list[int], sentence: str) -> tuple[torch.Tensor, torch.Tensor]:
        if len(ids) <= 2:
            # Only [CLS] and [SEP]: WordPiece also drops what the cleaning keeps (accents alone, private-use and
            # replacement characters), and the model would segment something for a sentence it never read.
            raise ExpressionError(
                f"the expression {_SHORT.repr(sentence)} has no characters the tokenizer reads (only accents, "
                "private-use or replacement characters): give a sentence naming the object to segment"
            )
        if len(ids) > self.max_tokens:
            logger.warning(
                "expression has %d tokens, truncated to %d as LAVT does (its [SEP] is dropped): %s (%d characters)",
                len(ids),
                self.max_tokens,
                _SHORT.repr(sentence),
                len(sentence),
            )
            ids = ids[: self.max_tokens]
        input_ids = torch.zeros(self.max_tokens, dtype=torch.long)
        mask = torch.zeros(self.max_tokens, dtype=torch.long)
        input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[: len(ids)] = 1
        return input_ids, mask
