"""Open one split of a refer-layout data set the way every command does: the model's tokenizer and image size."""

from __future__ import annotations

from pathlib import Path

from ..errors import MissingFileError, UserError
from .preprocess import Tokenizer
from .refer import DATASET_SPLITS, ReferDataset

__all__ = ["open_split"]


def open_split(
    refer_root: str | Path,
    dataset: str,
    split_by: str,
    split: str,
    model_config,
    image_dir: str | Path | None = None,
) -> ReferDataset:
    """The ``split`` of ``dataset`` (``split_by`` refs) under ``refer_root``, tokenised and resized for the model
    whose :class:`~quantize.models.config.LavtConfig` is ``model_config``.

    Raises:
        UserError: the data set, ``split_by`` or split name does not exist (the message lists the valid ones), or the
            split cannot be read under ``refer_root``: the message names the folder and how to write the split
            (ShapesRef) or where to point ``--refer-root``.
    """
    from quantize.models.registry import text_encoder_dir

    tokenizer = Tokenizer(text_encoder_dir(), model_config.preprocess.max_tokens)
    try:
        return ReferDataset(
            refer_root,
            dataset,
            split_by,
            split,
            tokenizer,
            model_config.swin.img_size,
            image_dir,
            model_config.preprocess,
        )
    except UserError as e:
        if split not in DATASET_SPLITS.get(dataset, {}).get(split_by, ()):
            raise  # a name that exists nowhere: the message already lists the valid ones
        if "--image-dir" in str(e):
            raise  # the annotations were found; the message names the image folder and the flag
        kind = MissingFileError if isinstance(e, FileNotFoundError) else UserError
        where = f"{dataset} {split_by} {split} under {Path(refer_root)}"
        raise kind(f"cannot read {where}: {e}; {_fix(refer_root, dataset, split)}") from e


def _fix(refer_root: str | Path, dataset: str, split: str) -> str:
    if dataset != "shapesref":
        return f"point --refer-root at the folder holding {dataset}/refs(*).p and {dataset}/instances.json"
    # ShapesRef is rewritten as a whole: keep val, which every later step evaluates on.
    splits = " ".join(dict.fromkeys((split, "val")))
    if split != "train":
        return f"write it with `ptq4ris data synth --out {refer_root} --splits {splits}`"
    # Calibration reads 32 train pairs; the default 40000 train scenes are for training a model.
    return (
        f"write it with `ptq4ris data synth --out {refer_root} --splits {splits} --train-scenes 64` (enough to "
        "calibrate; drop --train-scenes to train a model)"
    )
