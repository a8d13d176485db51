"""ShapesRef: a deterministic synthetic referring-segmentation benchmark written in the refer layout.

Scenes are coloured shapes on a noisy background, one per cell of a 3x3 grid (with jitter), several sharing shape
or colour, so that most objects need more than one word to be told apart. Each expression is one of four kinds:

- ``attribute``: colour / shape / size words (``the small red circle``);
- ``location``: the object's place in the image (``the shape at the top left``, ``the square on the right``);
- ``relation``: a spatial relation to another, uniquely described object (``the circle left of the blue square``),
  read on the grid: "left of"/"right of" mean in the same row, "above"/"below" in the same column;
- ``ordinal``: a superlative or ordinal among objects of one description (``the leftmost triangle``,
  ``the second shape from the left``, ``the biggest green object``).

Every expression is checked symbolically against the scene: it must select exactly one object, the one it refers
to. Splits: ``train`` and ``val`` with 3-5 objects, ``testA`` sparse scenes (3 objects), ``testB`` crowded scenes
(5 objects). A scene is a pure function of (seed, split, index), so any split can be regenerated bit for bit.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from ..errors import UserError

__all__ = [
    "ShapesRefGenerator",
    "Scene",
    "SceneObject",
    "Expression",
    "EXPRESSION_KINDS",
    "write_shapesref",
    "DEFAULT_SPLIT_SCENES",
]

GENERATOR_VERSION = 1
EXPRESSION_KINDS = ("attribute", "location", "relation", "ordinal")
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 220),
    "yellow": (230, 195, 30),
    "purple": (145, 60, 185),
}
SIZES = ("small", "big")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "middle", "right")
WIDTH, HEIGHT = 160, 120
SPLIT_OBJECTS = {"train": (3, 4, 5), "val": (3, 4, 5), "testA": (3,), "testB": (5,)}
SPLIT_SALT = {"train": 11, "val": 23, "testA": 37, "testB": 41}
DEFAULT_SPLIT_SCENES = {"train": 40000, "val": 800, "testA": 300, "testB": 300}


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int
    mask: np.ndarray  # (HEIGHT, WIDTH) uint8
    segmentation: list | dict  # COCO polygon list or RLE dict

    def matches(self, shape: str | None = None, color: str | None = None, size: str | None = None) -> bool:
        return (shape in (None, self.shape)) and (color in (None, self.color)) and (size in (None, self.size))


@dataclass(frozen=True)
class Expression:
    text: str
    kind: str


@dataclass
class Scene:
    image: np.ndarray  # (HEIGHT, WIDTH, 3) uint8
    objects: list[SceneObject]
    expressions: list[list[Expression]] = field(default_factory=list)  # per object, possibly empty


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_SALT[split], index])


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[float]:
    if shape == "square":
        h = r * 0.89  # same area as the circle of radius r
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif shape == "triangle":
        R = r * 1.3
        pts = [(cx + R * np.sin(a), cy - R * np.cos(a)) for a in (0.0, 2 * np.pi / 3, 4 * np.pi / 3)]
        pts = [(x, y + R * 0.2) for x, y in pts]  # centre the bounding box vertically
    elif shape == "diamond":
        h = r * 1.2
        pts = [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    else:
        raise UserError(f"not a polygon shape: {shape}")
    return [float(round(v, 2)) for p in pts for v in p]


def _rasterize(shape: str, cx: float, cy: float, r: float) -> tuple[np.ndarray, list | dict]:
    """Mask and COCO segmentation; the mask is what pycocotools decodes, so images and annotations agree exactly."""
    if shape == "circle":
        yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
        mask = (((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) <= r * r).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(mask))
        return mask, {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode("ascii")}
    poly = _polygon(shape, cx, cy, r)
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], HEIGHT, WIDTH))
    return mask_utils.decode(rle).astype(np.uint8), [poly]


def _describe(shape: str | None, color: str | None, size: str | None, generic: str) -> str:
    words = [w for w in (size, color, shape or generic) if w]
    return " ".join(words)


class ShapesRefGenerator:
    """Scenes and their expressions as a pure function of ``(seed, split, index)``."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    # ---- scene -------------------------------------------------------------------------------------------------
    def scene(self, split: str, index: int) -> Scene:
        if split not in SPLIT_OBJECTS:
            raise UserError(f"unknown ShapesRef split {split!r}; expected one of {sorted(SPLIT_OBJECTS)}")
        rng = _rng(self.seed, split, index)
        n = int(rng.choice(SPLIT_OBJECTS[split]))
        cells = rng.choice(9, size=n, replace=False)
        background = rng.integers(185, 240, size=3)
        image = background[None, None, :] + rng.normal(0, 6, size=(HEIGHT, WIDTH, 3))
        cw, ch = WIDTH / 3, HEIGHT / 3
        objects = []
        for cell in cells:
            row, col = divmod(int(cell), 3)
            shape = str(rng.choice(SHAPES))
            color = str(rng.choice(list(COLORS)))
            size = str(rng.choice(SIZES))
            r = rng.uniform(15.0, 17.5) if size == "big" else rng.uniform(9.0, 11.0)
            reach = r * 1.3 + 1.0
            jx, jy = max(cw / 2 - reach, 0.0), max(ch / 2 - reach, 0.0)
            cx = (col + 0.5) * cw + rng.uniform(-jx, jx)
            cy = (row + 0.5) * ch + rng.uniform(-jy, jy)
            mask, seg = _rasterize(shape, cx, cy, r)
            tint = np.clip(np.array(COLORS[color]) + rng.integers(-15, 16, size=3), 0, 255)
            image[mask.astype(bool)] = tint + rng.normal(0, 4, size=(int(mask.sum()), 3))
            objects.append(SceneObject(shape, color, size, row, col, mask, seg))
        scene = Scene(np.clip(image, 0, 255).astype(np.uint8), objects)
        scene.expressions = [self._expressions(scene, i, rng) for i in range(n)]
        return scene

    # ---- expressions -------------------------------------------------------------------------------------------
    @staticmethod
    def _select(objects: list[SceneObject], **attrs: str | None) -> list[int]:
        return [i for i, o in enumerate(objects) if o.matches(**attrs)]

    def _attribute_options(self, objs: list[SceneObject], t: int) -> list[tuple[str | None, str | None, str | None]]:
        """Every (shape, colour, size) pattern, any part optional, that selects object t alone."""
        o = objs[t]
        out = []
        for shape in (o.shape, None):
            for color in (o.color, None):
                for size in (None, o.size):
                    if shape is None and color is None and size is None:
                        continue
                    if self._select(objs, shape=shape, color=color, size=size) == [t]:
                        out.append((shape, color, size))
        return out

    def _noun_options(self, objs: list[SceneObject], t: int) -> list[tuple[str | None, str | None]]:
        """Nouns (shape, colour) that the target matches, generic first; each may select several objects."""
        o = objs[t]
        return [(None, None), (o.shape, None), (None, o.color), (o.shape, o.color)]

    def _attribute(self, objs, t, rng) -> str | None:
        options = self._attribute_options(objs, t)
        if not options:
            return None
        shape, color, size = options[int(rng.integers(len(options)))]
        desc = _describe(shape, color, size, "shape" if rng.random() < 0.5 else "one")
        return str(rng.choice(["the {}", "{}", "the {} please"])).format(desc)

    def _location(self, objs, t, rng) -> str | None:
        o = objs[t]
        options = []
        for shape, color in self._noun_options(objs, t):
            cand = self._select(objs, shape=shape, color=color)
            noun = _describe(shape, color, None, str(rng.choice(["shape", "object"])))
            if [i for i in cand if objs[i].row == o.row and objs[i].col == o.col] == [t]:
                if (o.row, o.col) == (1, 1):
                    options.append(f"the {noun} in the center")
                else:
                    options.append(f"the {noun} at the {ROWS[o.row]} {COLS[o.col]}")
            if o.col != 1 and [i for i in cand if objs[i].col == o.col] == [t]:
                options.append(f"the {noun} on the {COLS[o.col]}")
            if o.row != 1 and [i for i in cand if objs[i].row == o.row] == [t]:
                options.append(f"the {noun} at the {ROWS[o.row]}")
        return str(rng.choice(options)) if options else None

    def _relation(self, objs, t, rng) -> str | None:
        o = objs[t]
        relations = {
            "left of": lambda a, b: a.row == b.row and a.col < b.col,
            "right of": lambda a, b: a.row == b.row and a.col > b.col,
            "above": lambda a, b: a.col == b.col and a.row < b.row,
            "below": lambda a, b: a.col == b.col and a.row > b.row,
        }
        options, ambiguous = [], []
        for a, anchor in enumerate(objs):
            if a == t:
                continue
            anchor_opts = self._attribute_options(objs, a)
            if not anchor_opts:
                continue
            for rel, holds in relations.items():
                if not holds(o, anchor):
                    continue
                for shape, color in self._noun_options(objs, t):
                    cand = [i for i in self._select(objs, shape=shape, color=color) if i != a]
                    if [i for i in cand if holds(objs[i], anchor)] != [t]:
                        continue
                    ashape, acolor, asize = anchor_opts[int(rng.integers(len(anchor_opts)))]
                    noun = _describe(shape, color, None, "shape")
                    adesc = _describe(ashape, acolor, asize, "shape")
                    phrase = {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)
                    text = f"the {noun} {phrase if rng.random() < 0.5 else rel} the {adesc}"
                    # Prefer relations that are needed: the noun alone would be ambiguous.
                    (ambiguous if len(cand) > 1 else options).append(text)
        pool = ambiguous or options
        return str(rng.choice(pool)) if pool else None

    def _ordinal(self, objs, t, rng) -> str | None:
        o = objs[t]
        options = []
        for shape, color in self._noun_options(objs, t):
            cand = self._select(objs, shape=shape, color=color)
            if len(cand) < 2:
                continue
            noun = _describe(shape, color, None, str(rng.choice(["shape", "object"])))
            for word, key, sign in (
                ("leftmost", "col", 1),
                ("rightmost", "col", -1),
                ("topmost", "row", 1),
                ("lowest", "row", -1),
            ):
                values = [sign * getattr(objs[i], key) for i in cand]
                best = min(values)
                if values.count(best) == 1 and sign * getattr(o, key) == best:
                    options.append(f"the {word} {noun}")
            sizes = [objs[i].size for i in cand]
            for word, size in (("biggest", "big"), ("smallest", "small")):
                if sizes.count(size) == 1 and o.size == size:
                    options.append(f"the {word} {noun}")
            cols = sorted(objs[i].col for i in cand)
            if len(cand) >= 3 and len(set(cols)) == len(cols):
                rank = cols.index(o.col)
                if rank == 1:
                    options.append(f"the second {noun} from the {'left' if rng.random() < 0.5 else 'right'}")
        return str(rng.choice(options)) if options else None

    def _expressions(self, scene: Scene, t: int, rng: np.random.Generator) -> list[Expression]:
        """Up to two expressions of different kinds for object t, kinds in random order."""
        makers: dict[str, Callable] = {
            "attribute": self._attribute,
            "location": self._location,
            "relation": self._relation,
            "ordinal": self._ordinal,
        }
        out = []
        for kind in rng.permutation(EXPRESSION_KINDS):
            text = makers[str(kind)](scene.objects, t, rng)
            if text is not None:
                out.append(Expression(text, str(kind)))
            if len(out) == 2:
                break
        return out


# ---- refer-layout writer ---------------------------------------------------------------------------------------
def _render_split(args: tuple[int, str, int, int]) -> list[tuple[int, bytes, Scene]]:
    seed, split, start, stop = args
    gen = ShapesRefGenerator(seed)
    out = []
    for index in range(start, stop):
        scene = gen.scene(split, index)
        buf = io.BytesIO()
        Image.fromarray(scene.image).save(buf, format="PNG", optimize=False)
        for o in scene.objects:  # masks are re-decoded from the annotations; keep the pickled chunk small
            o.mask = np.empty(0, np.uint8)
        out.append((index, buf.getvalue(), scene))
    return out


def _iter_scenes(seed: int, split: str, count: int, workers: int) -> Iterator[tuple[int, bytes, Scene]]:
    chunk = 200
    jobs = [(seed, split, s, min(s + chunk, count)) for s in range(0, count, chunk)]
    if workers <= 1:
        for job in jobs:
            yield from _render_split(job)
        return
    # Never more processes than jobs or cores: under fork, the pool starts all of them at once.
    with ProcessPoolExecutor(min(workers, len(jobs), os.cpu_count() or 1)) as pool:
        for result in pool.map(_render_split, jobs):
            yield from result


def _is_shapesref(folder: Path) -> bool:
    """``folder/meta.json`` is the one this generator writes (the folders it may replace carry it)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "generator_version" in meta and "split_scenes" in meta


# ShapesRef is rendered under ``<root>/.shapesref-staging-<pid>-*`` and moved into place when complete.
_STAGING = ".shapesref-staging-"


def _remove_stale_staging(root: Path) -> None:
    """Remove what a killed ``data synth`` left in ``root`` (its process is gone; a live one's work is kept)."""
    from ..outputs import process_alive

    for leftover in root.glob(f"{_STAGING}*"):
        try:
            pid = int(leftover.name[len(_STAGING) :].split("-")[0])
        except ValueError:
            continue
        if not process_alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)


def check_shapesref_root(root: str | Path, flag: str = "--out") -> Path:
    """Refuse, before rendering, a refer root where writing ShapesRef would destroy what it did not write: a file, an
    unwritable folder, or ``shapesref/`` / ``images/shapesref/`` folders without this generator's ``meta.json``
    (a refer root may hold RefCOCO beside them: those are never touched)."""
    from ..outputs import check_output_folder

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"{flag} {root} is a file; give a folder to write ShapesRef into (a refer root)")
    ours = _is_shapesref(root / "shapesref")
    for sub in (root / "shapesref", root / "images" / "shapesref"):
        if sub.exists() and (not sub.is_dir() or (any(sub.iterdir()) and not ours)):
            raise UserError(
                f"{flag} {root}: {sub} exists and was not written by `ptq4ris data synth`; ptq4ris will not replace "
                f"it: move it away or choose another {flag}"
            )
    if root.exists():
        if not os.access(root, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {root}: no permission to write in it; choose a writable folder")
    else:
        check_output_folder(root, flag, "refer root")
    return root


def write_shapesref(
    root: str | Path,
    seed: int = 0,
    split_scenes: dict[str, int] | None = None,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write ShapesRef under ``root`` in the refer layout and return ``root``.

    Creates ``root/shapesref/{instances.json, refs(unc).p, meta.json}`` and ``root/images/shapesref/*.png``.
    Everything is written under a temporary folder and moved into place when complete; an existing ShapesRef with
    the same seed, version and sizes is reused as is.
    """
    root = Path(root)
    split_scenes = dict(DEFAULT_SPLIT_SCENES if split_scenes is None else split_scenes)
    for split, count in split_scenes.items():
        if split not in SPLIT_OBJECTS:
            raise UserError(f"unknown ShapesRef split {split!r}; expected some of {sorted(SPLIT_OBJECTS)}")
        if count <= 0:
            raise UserError(f"scene count for {split} must be positive, got {count}")
    check_shapesref_root(root)
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "split_scenes": split_scenes}
    meta_path = root / "shapesref" / "meta.json"
    if meta_path.is_file():
        try:
            existing = json.loads(meta_path.read_text())
            if {k: existing.get(k) for k in meta} == meta and (root / "images" / "shapesref").is_dir():
                return root
        except json.JSONDecodeError:
            pass
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-", dir=root))
    bar = None
    try:
        ann_dir, img_dir = tmp / "shapesref", tmp / "images" / "shapesref"
        ann_dir.mkdir(parents=True)
        img_dir.mkdir(parents=True)
        images, annotations, refs = [], [], []
        counts = {k: 0 for k in EXPRESSION_KINDS}
        categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
        cat_id = {s: i + 1 for i, s in enumerate(SHAPES)}
        image_id = ann_id = ref_id = sent_id = 0
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(split_scenes.values()), desc="ShapesRef scenes", unit="scene")
        for split, count in split_scenes.items():
            for index, png, scene in _iter_scenes(seed, split, count, workers):
                image_id += 1
                file_name = f"shapesref_{split}_{index:06d}.png"
                (img_dir / file_name).write_bytes(png)
                images.append({"id": image_id, "file_name": file_name, "height": HEIGHT, "width": WIDTH})
                for obj, exprs in zip(scene.objects, scene.expressions):
                    ann_id += 1
                    seg = obj.segmentation
                    rle = (
                        {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
                        if isinstance(seg, dict)
                        else mask_utils.merge(mask_utils.frPyObjects(seg, HEIGHT, WIDTH))
                    )
                    annotations.append(
                        {
                            "id": ann_id,
                            "image_id": image_id,
                            "category_id": cat_id[obj.shape],
                            "segmentation": obj.segmentation,
                            "area": float(mask_utils.area(rle)),
                            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                            "iscrowd": 0,
                            "attributes": {"color": obj.color, "size": obj.size, "row": obj.row, "col": obj.col},
                        }
                    )
                    if not exprs:
                        continue
                    ref_id += 1
                    sentences = []
                    for e in exprs:
                        sent_id += 1
                        counts[e.kind] += 1
                        sentences.append(
                            {
                                "raw": e.text,
                                "sent": e.text,
                                "sent_id": sent_id,
                                "tokens": e.text.split(),
                                "kind": e.kind,
                            }
                        )
                    refs.append(
                        {
                            "ref_id": ref_id,
                            "ann_id": ann_id,
                            "image_id": image_id,
                            "category_id": cat_id[obj.shape],
                            "split": split,
                            "sentences": sentences,
                            "sent_ids": [s["sent_id"] for s in sentences],
                            "file_name": f"shapesref_{split}_{index:06d}_{ann_id}.png",
                        }
                    )
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        (ann_dir / "instances.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories})
        )
        with open(ann_dir / "refs(unc).p", "wb") as f:
            pickle.dump(refs, f, protocol=4)
        meta_out = dict(meta, expressions_per_kind=counts, refs=len(refs))
        (ann_dir / "meta.json").write_text(json.dumps(meta_out, indent=1))
        # Move into place: replace any older ShapesRef folders.
        for sub in (os.path.join("images", "shapesref"), "shapesref"):  # meta.json last: it marks completion
            dest = root / sub
            if dest.exists():  # moved aside, not deleted first: removed with the staging folder once replaced
                os.replace(dest, tmp / f"previous-{sub.replace(os.sep, '-')}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / sub, dest)
    except BaseException:
        if bar is not None:  # erase the bar now, not at exit after the error line: the error is the last line shown
            bar.leave = False
            bar.close()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
