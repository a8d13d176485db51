"""Data: the refer-layout reader (RefCOCO family), LAVT preprocessing, and the ShapesRef generator."""

from .preprocess import ExpressionError, Tokenizer, image_to_tensor, load_image, resize_mask
from .refer import DATASET_SPLITS, ReferDataset, load_refs
from .shapesref import EXPRESSION_KINDS, ShapesRefGenerator, write_shapesref

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
]
