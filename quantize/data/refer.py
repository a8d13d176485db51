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

from ..errors import MissingFileError, UserError
from ..models.config import PreprocessConfig
from .preprocess import Tokenizer, load_image, normalize_image, resize_image, resize_mask

__all__ = [
    "DATASET_SPLITS",
    "RefSample",
    "ReferDataset",
    "check_refs",
    "default_image_dir",
    "load_instances",
    "load_refs",
]

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


# What malformed pickle bytes raise besides UnpicklingError: a corrupt length field (OverflowError, MemoryError), opcodes
# applied to the wrong objects (TypeError, AttributeError, IndexError, KeyError), undecodable strings (ValueError),
# nesting deeper than the stack allows (RecursionError).
_CORRUPT_PICKLE = (
    pickle.UnpicklingError, EOFError, ValueError, OverflowError, MemoryError, TypeError, AttributeError, IndexError,
    KeyError, RecursionError,
)  # fmt: skip
_FIX = "regenerate or fix the file"


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    """The refs of a ``refs(*).p`` file: a list of dicts, unpickled without building any object but plain containers,
    strings and numbers (a pickle that asks for anything else is refused without running it)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise MissingFileError(f"refs file {what}: {path}")
    try:
        with open(path, "rb") as f:
            refs = _PlainUnpickler(f).load()
    except _CORRUPT_PICKLE as e:
        raise UserError(f"cannot read refs file {path}: not a refs pickle ({type(e).__name__}: {e}); {_FIX}") from e
    if not isinstance(refs, list):
        raise UserError(f"refs file {path} must hold a list of dicts, got {type(refs).__name__}; {_FIX}")
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise UserError(f"refs file {path} must hold a list of dicts, got {type(ref).__name__} at #{i}; {_FIX}")
    return refs


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_refs(path: Path, refs: list[dict[str, Any]]) -> None:
    """Refuse, naming the file and the ref, refs the reader cannot use: a missing or mistyped key, no sentences."""
    for i, ref in enumerate(refs):
        name = f"ref {ref['ref_id']}" if _is_id(ref.get("ref_id")) else f"ref #{i}"
        for key in ("ref_id", "image_id", "ann_id"):
            if key not in ref:
                raise UserError(f"{path}: {name} has no {key!r}; {_FIX}")
            if not _is_id(ref[key]):
                raise UserError(f"{path}: {name} has {key} {ref[key]!r}, not a whole number; {_FIX}")
        if not isinstance(ref.get("split"), str):
            raise UserError(f"{path}: {name} has no split name ('split'); {_FIX}")
        sentences = ref.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise UserError(f"{path}: {name} has no sentences; {_FIX}")
        for sent in sentences:
            if not isinstance(sent, dict) or not isinstance(sent.get("sent"), str) or not _is_id(sent.get("sent_id")):
                raise UserError(
                    f"{path}: {name} has a sentence without 'sent' text or a whole-number 'sent_id'; {_FIX}"
                )


def load_instances(path: Path) -> dict[str, Any]:
    """``instances.json``, checked for what the reader and pycocotools use: ``images`` (``id``, ``file_name``,
    ``height``, ``width``) and ``annotations`` (``id``, ``image_id``, a polygon or RLE ``segmentation``)."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise MissingFileError(f"annotation file {what}: {path}")
    try:
        data = json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are no text
        raise UserError(f"corrupt annotation file {path}: not JSON ({e}); {_FIX}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object with 'images' and 'annotations', got a {type(data).__name__}; "
                        f"{_FIX}")  # fmt: skip
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path} has no {key!r} list; {_FIX}")
    if "categories" in data and not isinstance(data["categories"], list):
        raise UserError(f"{path}: 'categories' is not a list; {_FIX}")
    for image in data["images"]:
        if not isinstance(image, dict) or not _is_id(image.get("id")):
            raise UserError(f"{path}: an image entry has no whole-number 'id'; {_FIX}")
        if (
            not isinstance(image.get("file_name"), str)
            or not _is_id(image.get("height"))
            or not _is_id(image.get("width"))
        ):
            raise UserError(f"{path}: image {image['id']} lacks 'file_name', 'height' or 'width'; {_FIX}")
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or not _is_id(ann.get("id")):
            raise UserError(f"{path}: an annotation has no whole-number 'id'; {_FIX}")
        if not _is_id(ann.get("image_id")):
            raise UserError(f"{path}: annotation {ann['id']} has no whole-number 'image_id'; {_FIX}")
        if "categories" in data and "category_id" not in ann:
            raise UserError(f"{path}: annotation {ann['id']} has no 'category_id'; {_FIX}")
        if not isinstance(ann.get("segmentation"), (list, dict)):
            raise UserError(f"{path}: annotation {ann['id']} has no polygon or RLE 'segmentation'; {_FIX}")
    for cat in data.get("categories", []):
        if not isinstance(cat, dict) or "id" not in cat:
            raise UserError(f"{path}: a category has no 'id'; {_FIX}")
    return data


def check_links(refs_path: Path, refs: list[dict[str, Any]], instances: Path, coco: COCO) -> None:
    """Every ref names an annotation and an image of ``instances.json``, and the annotation is on that image."""
    for ref in refs:
        ann = coco.anns.get(ref["ann_id"])
        if ann is None:
            raise UserError(f"{refs_path}: ref {ref['ref_id']} names annotation {ref['ann_id']}, which {instances} "
                            f"lacks; {_FIX}")  # fmt: skip
        if ref["image_id"] not in coco.imgs:
            raise UserError(f"{refs_path}: ref {ref['ref_id']} names image {ref['image_id']}, which {instances} "
                            f"lacks; {_FIX}")  # fmt: skip
        if ann["image_id"] != ref["image_id"]:
            raise UserError(f"{refs_path}: ref {ref['ref_id']} names annotation {ref['ann_id']} of image "
                            f"{ann['image_id']} for image {ref['image_id']}; {_FIX}")  # fmt: skip


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
        refs_path = data_dir / f"refs({split_by}).p"
        refs = load_refs(refs_path)
        check_refs(refs_path, refs)
        available = sorted({r["split"] for r in refs})
        if split not in available:
            raise UserError(f"unknown split {split!r} for {dataset} ({split_by}); available: {available}")
        instances = data_dir / "instances.json"
        data = load_instances(instances)
        with contextlib.redirect_stdout(io.StringIO()):  # COCO prints progress
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        split_refs = [r for r in refs if r["split"] == split]
        check_links(refs_path, split_refs, instances, self.coco)
        self.instances = instances
        self.image_dir = Path(image_dir) if image_dir is not None else default_image_dir(self.refer_root, dataset)
        if not self.image_dir.is_dir():
            flag = "--image-dir" if image_dir is not None else "--refer-root"
            raise MissingFileError(f"image folder not found: {self.image_dir} (check {flag})")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.preprocess = preprocess
        self.samples: list[RefSample] = []
        for ref in split_refs:
            for sent in ref["sentences"]:
                self.samples.append(
                    RefSample(
                        ref["ref_id"],
                        ref["image_id"],
                        ref["ann_id"],
                        sent["sent_id"],
                        sent["sent"],
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
        try:
            mask = self.coco.annToMask(self.coco.anns[ann_id])
        except Exception as e:  # pycocotools raises whatever its C code or numpy hits on a malformed segmentation
            raise UserError(
                f"{self.instances}: annotation {ann_id} has a segmentation pycocotools cannot decode "
                f"({type(e).__name__}: {e}); {_FIX}"
            ) from e
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
