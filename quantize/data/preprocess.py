"""LAVT's preprocessing: exact resize to the model size (aspect ignored), ImageNet normalisation, uncased WordPiece
ids truncated to ``max_tokens`` *after* the special tokens are added (so a long sentence loses its ``[SEP]``, as in
LAVT), padded with 0, attention mask 1 on real tokens.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..models.config import PreprocessConfig
from ..errors import MissingFileError, UserError

__all__ = [
    "load_image",
    "resize_image",
    "normalize_image",
    "image_to_tensor",
    "resize_mask",
    "Tokenizer",
    "ExpressionError",
]

logger = logging.getLogger(__name__)


class ExpressionError(UserError):
    """An expression the model cannot take (empty, or not a string)."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with an error that names the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"corrupt or unreadable image {path}: {e}; replace the file") from e


def resize_image(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """RGB image (PIL or HWC uint8) -> (size, size, 3) uint8, resized exactly (bilinear, aspect ignored)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"expected an HWC uint8 RGB array, got shape {image.shape} dtype {image.dtype}")
        image = Image.fromarray(image)
    return np.array(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


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

    return AutoTokenizer.from_pretrained(path)


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
        self._check(sentence)
        return self._pad(self._tok.encode(sentence, add_special_tokens=True), sentence)

    def batch(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Many sentences at once (the fast tokenizer's batch path): (S, max_tokens) ids and masks."""
        for s in sentences:
            self._check(s)
        encoded = self._tok(list(sentences), add_special_tokens=True)["input_ids"]
        pairs = [self._pad(ids, s) for ids, s in zip(encoded, sentences)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    @staticmethod
    def _check(sentence: str) -> None:
        if not isinstance(sentence, str):
            raise ExpressionError(f"expected the expression as a string, got {type(sentence).__name__}")
        if not sentence.strip():
            raise ExpressionError("the expression is empty: give a sentence naming the object to segment")

    def _pad(self, ids: list[int], sentence: str) -> tuple[torch.Tensor, torch.Tensor]:
        if len(ids) > self.max_tokens:
            logger.warning(
                "expression has %d tokens, truncated to %d as LAVT does (its [SEP] is dropped): %r",
                len(ids),
                self.max_tokens,
                sentence,
            )
            ids = ids[: self.max_tokens]
        input_ids = torch.zeros(self.max_tokens, dtype=torch.long)
        mask = torch.zeros(self.max_tokens, dtype=torch.long)
        input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[: len(ids)] = 1
        return input_ids, mask
