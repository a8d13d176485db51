"""Reader for the refer layout of RefCOCO / RefCOCO+ / RefCOCOg (and ShapesRef, which writes the same layout).

Layout (github ``lichengunc/refer``, as LAVT reads it)::

    <refer_root>/<dataset>/instances.json        COCO format; masks as polygons or RLE
    <refer_root>/<dataset>/refs(<split_by>).p    pickled list of refs
    <image_dir>/<file_name>                      COCO train2014 images (or ShapesRef's)

One sample is one (referred object, sentence) pair: every sentence of every ref is evaluated. Masks are decoded with
pycocotools; the refs pickle is opened with an unpickler that builds only plain containers and scalars.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO

from ..models.config import PreprocessConfig
from .preprocess import Tokenizer, load_image, normalize_image, resize_image, resize_mask
from ..errors import MissingFileError, UserError

__all__ = ["load_refs", "ReferDataset", "RefSample", "DATASET_SPLITS", "default_image_dir"]

# Which split_by each dataset has, and the splits of each (lichengunc/refer).
DATASET_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "refcoco": {"unc": ("train", "val", "testA", "testB"), "google": ("train", "val", "test")},
    "refcoco+": {"unc": ("train", "val", "testA", "testB")},
    "refcocog": {"umd": ("train", "val", "test"), "google": ("train", "val")},
    "shapesref": {"unc": ("train", "val", "testA", "testB")},
}


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every global: lists, dicts, strings and numbers need none, anything else is not a refs file."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refs file wants to build {module}.{name}; only plain lists, dicts, strings and numbers are accepted "
            "(is this really a refs(*).p file from the refer API?)"
        )


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"refs file not found: {path}")
    try:
        with open(path, "rb") as f:
            refs = _PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, OverflowError, MemoryError) as e:
        # Corrupt length fields surface as OverflowError / MemoryError rather than UnpicklingError.
        raise UserError(f"cannot read refs file {path}: {e}") from e
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise UserError(f"refs file {path} must hold a list of dicts, got {type(refs).__name__}")
    return refs


def default_image_dir(refer_root: Path, dataset: str) -> Path:
    if dataset == "shapesref":
        return refer_root / "images" / "shapesref"
    return refer_root / "images" / "mscoco" / "images" / "train2014"


@dataclass(frozen=True)
class RefSample:
    ref_id: int
    image_id: int
    ann_id: int
    sent_id: int
    sentence: str
    kind: str  # expression kind where the data set records one (ShapesRef), else ""


class ReferDataset(torch.utils.data.Dataset):
    """(image, input_ids, attention_mask, target mask) per (ref, sentence) of one split.

    Args:
        refer_root: folder holding ``<dataset>/instances.json`` and ``<dataset>/refs(<split_by>).p``.
        dataset: refcoco, refcoco+, refcocog or shapesref.
        split_by: unc, umd or google (see ``DATASET_SPLITS``).
        split: e.g. train, val, testA, testB, test.
        tokenizer: a :class:`~quantize.data.preprocess.Tokenizer`.
        image_size: side the image and the target mask are resized to (the model's ``img_size``).
        image_dir: image folder; defaults to LAVT's ``images/mscoco/images/train2014`` under ``refer_root``.
    """

    def __init__(
        self,
        refer_root: str | Path,
        dataset: str,
        split_by: str,
        split: str,
        tokenizer: Tokenizer,
        image_size: int,
        image_dir: str | Path | None = None,
        preprocess: PreprocessConfig = PreprocessConfig(),
    ) -> None:
        if dataset not in DATASET_SPLITS:
            raise UserError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASET_SPLITS)}")
        if split_by not in DATASET_SPLITS[dataset]:
            raise UserError(
                f"{dataset} has no {split_by!r} split; expected --split-by one of {sorted(DATASET_SPLITS[dataset])}"
            )
        self.refer_root = Path(refer_root)
        self.dataset, self.split_by, self.split = dataset, split_by, split
        data_dir = self.refer_root / dataset
        if not data_dir.is_dir():
            hint = " (create it with `ptq4ris data synth`)" if dataset == "shapesref" else ""
            raise MissingFileError(f"no {dataset} data under {self.refer_root}: {data_dir} is missing{hint}")
        refs = load_refs(data_dir / f"refs({split_by}).p")
        available = sorted({r.get("split") for r in refs if isinstance(r.get("split"), str)})
        if split not in available:
            raise UserError(f"unknown split {split!r} for {dataset} ({split_by}); available: {available}")
        instances = data_dir / "instances.json"
        if not instances.is_file():
            raise MissingFileError(f"annotation file not found: {instances}")
        try:
            data = json.loads(instances.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"corrupt annotation file {instances}: {e}") from e
        with contextlib.redirect_stdout(io.StringIO()):  # COCO prints progress
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.image_dir = Path(image_dir) if image_dir is not None else default_image_dir(self.refer_root, dataset)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.preprocess = preprocess
        self.samples: list[RefSample] = []
        for ref in refs:
            if ref.get("split") != split:
                continue
            for sent in ref["sentences"]:
                self.samples.append(
                    RefSample(
                        int(ref["ref_id"]),
                        int(ref["image_id"]),
                        int(ref["ann_id"]),
                        int(sent["sent_id"]),
                        str(sent["sent"]),
                        str(sent.get("kind", "")),
                    )
                )
        self._pixels = lru_cache(maxsize=8)(self.pixels)
        self._target = lru_cache(maxsize=32)(self.target)

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, image_id: int) -> torch.Tensor:
        """The image resized to the model size, (3, S, S) uint8."""
        info = self.coco.imgs[image_id]
        pixels = resize_image(load_image(self.image_dir / info["file_name"]), self.image_size)
        return torch.from_numpy(pixels).permute(2, 0, 1)

    def target(self, ann_id: int) -> torch.Tensor:
        """The referred object's mask, NEAREST-resized to the model size, (S, S) uint8 in {0, 1}."""
        mask = self.coco.annToMask(self.coco.anns[ann_id])
        return torch.from_numpy(resize_mask(mask, self.image_size))

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        input_ids, attention_mask = self.tokenizer(s.sentence)
        return {
            "image": normalize_image(self._pixels(s.image_id), self.preprocess),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target": self._target(s.ann_id),
            "index": index,
        }
