"""Data: the refer-layout reader (RefCOCO family), LAVT preprocessing, the ShapesRef generator, and
:func:`open_split`, which every command opens a split with."""

from .preprocess import ExpressionError, Tokenizer, image_to_tensor, load_image, resize_mask
from .refer import DATASET_SPLITS, ReferDataset, load_refs
from .shapesref import EXPRESSION_KINDS, ShapesRefGenerator, write_shapesref
from .splits import open_split

__all__ = [
    "ExpressionError",
    "Tokenizer",
    "image_to_tensor",
    "load_image",
    "resize_mask",
    "DATASET_SPLITS",
    "ReferDataset",
    "load_refs",
    "EXPRESSION_KINDS",
    "ShapesRefGenerator",
    "write_shapesref",
    "open_split",
]
