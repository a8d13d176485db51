"""Data pipeline: ShapesRef generator and writer, refer-layout reader, LAVT tokenizer, RIS metrics."""

from __future__ import annotations

import collections
import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quantize.data.preprocess import ExpressionError, Tokenizer, resize_mask
from quantize.data.refer import ReferDataset, load_refs
from quantize.data.shapesref import (
    COLORS,
    EXPRESSION_KINDS,
    HEIGHT,
    SHAPES,
    SIZES,
    WIDTH,
    ShapesRefGenerator,
    write_shapesref,
)
from quantize.metrics import RisMetrics
from quantize.models.registry import text_encoder_dir

# pycocotools 2.0.11 + numpy 2 warn on every decode; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPLITS = {"val": 12, "testA": 4, "testB": 4}
SIZE = 64  # model resolution used by the reader tests
CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(text_encoder_dir(), 20)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    """A small ShapesRef written once for the reader tests; tests that damage it work on a copy."""
    return write_shapesref(tmp_path_factory.mktemp("refer"), seed=0, split_scenes=SPLITS, workers=1)


@pytest.fixture
def shapes_copy(shapes_root, tmp_path) -> Path:
    root = tmp_path / "refer"
    shutil.copytree(shapes_root, root)
    return root


def _dataset(root, tokenizer, split="val", **kw) -> ReferDataset:
    return ReferDataset(root, "shapesref", "unc", split, tokenizer, SIZE, **kw)


def _refs(root: Path) -> list[dict]:
    with open(root / "shapesref" / "refs(unc).p", "rb") as f:
        return pickle.load(f)


# ---- ShapesRef determinism -------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "val", "testA", "testB"])
def test_scene_is_a_pure_function_of_seed_split_index(split):
    a, b = ShapesRefGenerator(7).scene(split, 3), ShapesRefGenerator(7).scene(split, 3)
    assert np.array_equal(a.image, b.image)
    assert a.expressions == b.expressions
    assert [(o.shape, o.color, o.size, o.row, o.col) for o in a.objects] == [
        (o.shape, o.color, o.size, o.row, o.col) for o in b.objects
    ]
    for oa, ob in zip(a.objects, b.objects):
        assert np.array_equal(oa.mask, ob.mask)


def test_different_seeds_give_different_scenes():
    a, b = ShapesRefGenerator(0), ShapesRefGenerator(1)
    for i in range(5):
        assert not np.array_equal(a.scene("val", i).image, b.scene("val", i).image)
    texts = lambda g: [e.text for i in range(5) for exprs in g.scene("val", i).expressions for e in exprs]  # noqa: E731
    assert texts(a) != texts(b)


def test_write_is_byte_identical_and_records_seed(tmp_path):
    a = write_shapesref(tmp_path / "a", seed=0, split_scenes=SPLITS, workers=1)
    b = write_shapesref(tmp_path / "b", seed=0, split_scenes=SPLITS, workers=1)
    for name in ("instances.json", "refs(unc).p", "meta.json"):
        assert (a / "shapesref" / name).read_bytes() == (b / "shapesref" / name).read_bytes(), name
    images_a = sorted(p.name for p in (a / "images" / "shapesref").iterdir())
    assert len(images_a) == sum(SPLITS.values())
    assert images_a == sorted(p.name for p in (b / "images" / "shapesref").iterdir())
    for name in images_a:
        assert (a / "images" / "shapesref" / name).read_bytes() == (b / "images" / "shapesref" / name).read_bytes()
    meta = json.loads((a / "shapesref" / "meta.json").read_text())
    assert meta["seed"] == 0
    assert meta["split_scenes"] == SPLITS
    assert meta["refs"] == len(_refs(a))
    # no temporary folder is left behind
    assert sorted(p.name for p in a.iterdir()) == ["images", "shapesref"]


def test_write_with_workers_matches_serial(tmp_path):
    """201 scenes make two chunks, so the process pool really runs two jobs."""
    serial = write_shapesref(tmp_path / "serial", seed=3, split_scenes={"testA": 201}, workers=1)
    pooled = write_shapesref(tmp_path / "pooled", seed=3, split_scenes={"testA": 201}, workers=2)
    for name in ("instances.json", "refs(unc).p"):
        assert (serial / "shapesref" / name).read_bytes() == (pooled / "shapesref" / name).read_bytes()


def test_write_reuses_existing_data_with_same_settings(tmp_path):
    root = write_shapesref(tmp_path, seed=0, split_scenes={"testA": 2}, workers=1)
    instances = root / "shapesref" / "instances.json"
    before = instances.stat().st_mtime_ns
    refs_before = (root / "shapesref" / "refs(unc).p").read_bytes()
    assert write_shapesref(tmp_path, seed=0, split_scenes={"testA": 2}, workers=1) == root
    assert instances.stat().st_mtime_ns == before
    # other settings do rewrite it
    write_shapesref(tmp_path, seed=5, split_scenes={"testA": 2}, workers=1)
    assert json.loads((root / "shapesref" / "meta.json").read_text())["seed"] == 5
    assert (root / "shapesref" / "refs(unc).p").read_bytes() != refs_before


@pytest.mark.parametrize(
    "split_scenes, words",
    [({"test": 3}, "unknown ShapesRef split 'test'"), ({"val": 0}, "must be positive"), ({"val": -2}, "must be positive")],
)
def test_write_rejects_bad_split_scenes(tmp_path, split_scenes, words):
    with pytest.raises(ValueError, match=words):
        write_shapesref(tmp_path, seed=0, split_scenes=split_scenes)
    assert not (tmp_path / "shapesref").exists()


def test_scene_rejects_unknown_split():
    with pytest.raises(ValueError, match="unknown ShapesRef split 'test'"):
        ShapesRefGenerator(0).scene("test", 0)


# ---- ShapesRef symbolic correctness ------------------------------------------------------------------------------
def _described(objects, phrase: str) -> list[int]:
    """Objects matching every shape / colour / size word of the phrase ("shape", "object", "one" match anything)."""
    words = phrase.split()
    want = {
        "shape": [w for w in words if w in SHAPES],
        "color": [w for w in words if w in COLORS],
        "size": [w for w in words if w in SIZES],
    }
    return [i for i, o in enumerate(objects) if all(getattr(o, k) == w for k, ws in want.items() for w in ws)]


# Relations are read on ShapesRef's 3x3 grid: left/right of within a row, above/below within a column.
_RELATIONS = {
    "to the left of": lambda a, b: a.row == b.row and a.col < b.col,
    "to the right of": lambda a, b: a.row == b.row and a.col > b.col,
    "left of": lambda a, b: a.row == b.row and a.col < b.col,
    "right of": lambda a, b: a.row == b.row and a.col > b.col,
    "above": lambda a, b: a.col == b.col and a.row < b.row,
    "below": lambda a, b: a.col == b.col and a.row > b.row,
}
_ROW = {"top": 0, "middle": 1, "bottom": 2}
_COL = {"left": 0, "middle": 1, "right": 2}


def _resolve(objects, text: str, kind: str) -> list[int]:
    """The objects an expression selects, interpreted from its words alone."""
    t = text.removeprefix("the ").removesuffix(" please")
    if kind == "attribute":
        assert any(w in SHAPES or w in COLORS or w in SIZES for w in t.split()), text
        return _described(objects, t)
    if kind == "location":
        sep = next(s for s in (" in the ", " at the ", " on the ") if s in t)
        noun, where = t.split(sep)
        w = where.split()
        if where == "center":
            ok = lambda o: (o.row, o.col) == (1, 1)  # noqa: E731
        elif len(w) == 2:
            ok = lambda o: (o.row, o.col) == (_ROW[w[0]], _COL[w[1]])  # noqa: E731
        elif sep == " on the ":
            ok = lambda o: o.col == _COL[where]  # noqa: E731
        else:
            ok = lambda o: o.row == _ROW[where]  # noqa: E731
        return [i for i in _described(objects, noun) if ok(objects[i])]
    if kind == "relation":
        rel = next(r for r in _RELATIONS if f" {r} the " in t)
        noun, anchor_text = t.split(f" {rel} the ")
        anchors = _described(objects, anchor_text)
        assert len(anchors) == 1, f"anchor of {text!r} is ambiguous: {anchors}"
        a = anchors[0]
        return [i for i in _described(objects, noun) if i != a and _RELATIONS[rel](objects[i], objects[a])]
    if kind == "ordinal":
        words = t.split()
        if words[0] == "second":  # "second NOUN from the left/right"
            cand = _described(objects, " ".join(words[1:-3]))
            sign = 1 if words[-1] == "left" else -1
            order = sorted(cand, key=lambda i: sign * objects[i].col)
            assert len({objects[i].col for i in cand}) == len(cand) >= 3, text
            return [order[1]]
        # biggest / smallest by drawn area, so that the size words are checked against the pixels too
        key = {
            "leftmost": lambda o: o.col,
            "rightmost": lambda o: -o.col,
            "topmost": lambda o: o.row,
            "lowest": lambda o: -o.row,
            "biggest": lambda o: -int(o.mask.sum()),
            "smallest": lambda o: int(o.mask.sum()),
        }[words[0]]
        cand = _described(objects, " ".join(words[1:]))
        best = min(key(objects[i]) for i in cand)
        return [i for i in cand if key(objects[i]) == best]
    raise AssertionError(f"unknown kind {kind!r}")


def _scenes():
    gen = ShapesRefGenerator(0)
    return [(split, i, gen.scene(split, i)) for split in ("val", "testA", "testB") for i in range(10)]


@pytest.fixture(scope="module")
def scenes():
    return _scenes()


def test_every_expression_selects_exactly_its_object(scenes):
    kinds = collections.Counter()
    for split, index, scene in scenes:
        assert len(scene.expressions) == len(scene.objects)
        for t, exprs in enumerate(scene.expressions):
            assert len(exprs) <= 2
            assert len({e.kind for e in exprs}) == len(exprs), "two expressions of one kind"
            for e in exprs:
                assert e.kind in EXPRESSION_KINDS
                kinds[e.kind] += 1
                assert _resolve(scene.objects, e.text, e.kind) == [t], (split, index, t, e)
    assert set(kinds) == set(EXPRESSION_KINDS), kinds  # the sample exercises every kind


def test_masks_are_non_empty_and_disjoint(scenes):
    for split, index, scene in scenes:
        cover = np.zeros((HEIGHT, WIDTH), int)
        for o in scene.objects:
            assert o.mask.shape == (HEIGHT, WIDTH)
            assert set(np.unique(o.mask)) <= {0, 1}
            assert o.mask.sum() > 0, (split, index)
            cover += o.mask
        assert cover.max() == 1, f"objects overlap in {split} {index}"


def _drawn_shape(mask: np.ndarray) -> str:
    """Shape from the pixels: fill ratio of the bounding box, then where the widest row lies."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = box.sum() / box.size
    if fill > 0.9:
        return "square"
    if fill > 0.7:
        return "circle"
    widest = np.argmax(box.sum(1)) / (box.shape[0] - 1)
    return "triangle" if widest > 0.75 else "diamond"


def test_objects_are_drawn_where_and_as_annotated(scenes):
    small, big = [], []
    for split, index, scene in scenes:
        image = scene.image.astype(int)
        background = np.ones((HEIGHT, WIDTH), bool)
        for o in scene.objects:
            on = o.mask.astype(bool)
            background &= ~on
            pixels = image[on]
            # not the (light grey-ish) background: every colour has a dark channel
            assert (pixels.min(1) < 120).all(), (split, index, o.color)
            palette = np.array(list(COLORS.values()))
            nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
            assert (nearest == list(COLORS).index(o.color)).all(), (split, index, o.color)
            ys, xs = np.nonzero(o.mask)
            assert (int(ys.mean() // (HEIGHT / 3)), int(xs.mean() // (WIDTH / 3))) == (o.row, o.col)
            assert _drawn_shape(o.mask) == o.shape, (split, index, o.shape)
            (big if o.size == "big" else small).append(int(o.mask.sum()))
        assert (image[background].min(1) > 140).all()
    assert max(small) < min(big)


def test_test_splits_have_fixed_object_counts():
    gen = ShapesRefGenerator(0)
    assert {len(gen.scene("testA", i).objects) for i in range(15)} == {3}
    assert {len(gen.scene("testB", i).objects) for i in range(15)} == {5}
    assert {len(gen.scene("val", i).objects) for i in range(30)} == {3, 4, 5}


# ---- refer reader ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", list(SPLITS))
def test_reader_length_is_number_of_sentences(shapes_root, tokenizer, split):
    ds = _dataset(shapes_root, tokenizer, split)
    refs = [r for r in _refs(shapes_root) if r["split"] == split]
    assert len(refs) > 0
    assert len(ds) == sum(len(r["sentences"]) for r in refs)
    assert [(s.ref_id, s.sentence, s.kind) for s in ds.samples] == [
        (r["ref_id"], s["sent"], s["kind"]) for r in refs for s in r["sentences"]
    ]


def test_reader_sample(shapes_root, tokenizer):
    ds = _dataset(shapes_root, tokenizer)
    for index in (0, len(ds) - 1):
        sample, s = ds[index], ds.samples[index]
        assert sample["index"] == index
        expected = resize_mask(ds.coco.annToMask(ds.coco.anns[s.ann_id]), SIZE)
        target = sample["target"].numpy()
        assert target.shape == (SIZE, SIZE)
        assert np.array_equal(target, expected)
        assert set(np.unique(target)) == {0, 1}
        # and it is the full-resolution mask sampled at pixel centres (up to rounding at a few pixels)
        full = ds.coco.annToMask(ds.coco.anns[s.ann_id])
        ys = ((np.arange(SIZE) + 0.5) * full.shape[0] / SIZE).astype(int)
        xs = ((np.arange(SIZE) + 0.5) * full.shape[1] / SIZE).astype(int)
        assert (target == full[ys][:, xs]).mean() > 0.99

        image = sample["image"]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        # the referred object is drawn under its mask: dark channel there, light background elsewhere
        mean, std = torch.tensor(ds.preprocess.mean).view(3, 1, 1), torch.tensor(ds.preprocess.std).view(3, 1, 1)
        darkest = (image * std + mean).min(0).values
        on = torch.from_numpy(target).bool()
        assert darkest[on].mean() < 0.5 < darkest[~on].mean()

        ids, mask = sample["input_ids"], sample["attention_mask"]
        assert ids.shape == mask.shape == (20,)
        n = int(mask.sum())
        assert torch.equal(mask, torch.tensor([1] * n + [0] * (20 - n)))
        assert ids[0] == CLS and ids[n - 1] == SEP and (ids[n:] == 0).all()


def test_reader_annotations_match_generator(shapes_root, tokenizer):
    """What was written (PNG, masks re-decoded from the COCO segmentation) is the generated scene."""
    ds = _dataset(shapes_root, tokenizer, "testB")
    scene = ShapesRefGenerator(0).scene("testB", 2)
    info = next(i for i in ds.coco.imgs.values() if i["file_name"] == "shapesref_testB_000002.png")
    png = np.array(Image.open(shapes_root / "images" / "shapesref" / info["file_name"]))
    assert np.array_equal(png, scene.image)
    anns = sorted(ds.coco.imgToAnns[info["id"]], key=lambda a: a["id"])
    assert len(anns) == len(scene.objects) == 5
    for ann, obj in zip(anns, scene.objects):
        assert np.array_equal(ds.coco.annToMask(ann), obj.mask)
        assert ann["attributes"] == {"color": obj.color, "size": obj.size, "row": obj.row, "col": obj.col}


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_reader_rejects_unknown_dataset(shapes_root, tokenizer):
    with pytest.raises(ValueError, match="unknown dataset 'refclef'"):
        ReferDataset(shapes_root, "refclef", "unc", "val", tokenizer, SIZE)


def test_reader_rejects_unavailable_split_by(shapes_root, tokenizer):
    with pytest.raises(ValueError, match=r"shapesref has no 'google' split.*\['unc'\]"):
        ReferDataset(shapes_root, "shapesref", "google", "val", tokenizer, SIZE)
    with pytest.raises(ValueError, match="refcocog has no 'unc' split"):
        ReferDataset(shapes_root, "refcocog", "unc", "val", tokenizer, SIZE)


def test_reader_rejects_unknown_split_listing_available(shapes_root, tokenizer):
    with pytest.raises(ValueError, match=r"unknown split 'train'.*available: \['testA', 'testB', 'val'\]"):
        _dataset(shapes_root, tokenizer, "train")


def test_reader_missing_data_dir(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"shapesref is missing.*ptq4ris data synth"):
        _dataset(tmp_path, tokenizer)
    (tmp_path / "refcoco").mkdir()
    with pytest.raises(FileNotFoundError, match=r"refs file not found: .*refs\(unc\)\.p"):
        ReferDataset(tmp_path, "refcoco", "unc", "val", tokenizer, SIZE)


def _leave_marker(path: str) -> dict:
    Path(path).write_text("the pickle ran code")
    return {}


class _Payload:
    """Unpickling this calls _leave_marker: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return _leave_marker, (self.path,)


def test_load_refs_refuses_non_builtin_objects_without_running_them(tmp_path):
    marker = tmp_path / "unpickled.txt"
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps([_Payload(marker)], protocol=4))
    with pytest.raises(ValueError, match=r"cannot read refs file.*_leave_marker"):
        load_refs(refs)
    assert not marker.exists()
    pickle.loads(refs.read_bytes())  # a plain unpickler would have run it
    assert marker.exists()

    refs.write_bytes(pickle.dumps(collections.OrderedDict(a=1)))
    with pytest.raises(ValueError, match=r"collections\.OrderedDict"):
        load_refs(refs)


def test_load_refs_rejects_wrong_content(tmp_path):
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps({"ref_id": 1}))
    with pytest.raises(ValueError, match="must hold a list of dicts, got dict"):
        load_refs(refs)
    refs.write_bytes(pickle.dumps([{"ref_id": 1}])[:-4])  # truncated
    with pytest.raises(ValueError, match="cannot read refs file"):
        load_refs(refs)
    with pytest.raises(FileNotFoundError):
        load_refs(tmp_path / "nope.p")


def test_load_refs_huge_length_field_is_a_value_error(tmp_path):
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(b"\x8e" + (2**63).to_bytes(8, "little"))  # BINBYTES8 claiming 2**63 bytes
    with pytest.raises(ValueError, match="cannot read refs file"):
        load_refs(refs)


def test_reader_rejects_corrupt_instances(shapes_copy, tokenizer):
    (shapes_copy / "shapesref" / "instances.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="corrupt annotation file"):
        _dataset(shapes_copy, tokenizer)


def _image_of(ds: ReferDataset, index: int) -> Path:
    return ds.image_dir / ds.coco.imgs[ds.samples[index].image_id]["file_name"]


def test_reader_corrupt_image(shapes_copy, tokenizer):
    ds = _dataset(shapes_copy, tokenizer)
    path = _image_of(ds, 0)
    path.write_bytes(b"\x89PNG garbage, not an image" * 10)
    with pytest.raises(ValueError, match="corrupt") as e:
        ds[0]
    assert path.name in str(e.value)
    # a truncated PNG is corrupt too
    other = _image_of(ds, len(ds) - 1)
    other.write_bytes(other.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt"):
        ds[len(ds) - 1]


def test_reader_missing_image(shapes_copy, tokenizer):
    ds = _dataset(shapes_copy, tokenizer)
    path = _image_of(ds, 0)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=path.name):
        ds[0]


# ---- tokenizer ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sentence", ["", "   ", "\t\n"])
def test_tokenizer_rejects_empty_expression(tokenizer, sentence):
    with pytest.raises(ExpressionError, match="empty"):
        tokenizer(sentence)
    with pytest.raises(ExpressionError):
        tokenizer.batch(["the red circle", sentence])


def test_tokenizer_rejects_non_string(tokenizer):
    with pytest.raises(ExpressionError, match="string"):
        tokenizer(None)


def test_tokenizer_truncates_long_expression_like_lavt(tokenizer, caplog):
    sentence = " ".join(["circle"] * 40)
    with caplog.at_level(logging.WARNING, logger="quantize.data.preprocess"):
        ids, mask = tokenizer(sentence)
    assert ids.shape == mask.shape == (20,)
    assert ids.dtype == mask.dtype == torch.long
    assert (mask == 1).all()
    assert ids[0] == CLS
    assert ids[-1] != SEP and SEP not in ids.tolist()  # [SEP] is cut off, as in LAVT
    assert any("truncated to 20" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_tokenizer_short_sentence(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="quantize.data.preprocess"):
        ids, mask = tokenizer("the red circle")
    assert not caplog.records
    n = int(mask.sum())
    assert n == 5  # [CLS] the red circle [SEP]
    assert ids[0] == CLS and ids[n - 1] == SEP
    assert (ids[1 : n - 1] != 0).all() and (ids[n:] == 0).all() and (mask[n:] == 0).all()
    # exactly 20 tokens with special ones: nothing dropped
    ids, mask = tokenizer(" ".join(["circle"] * 18))
    assert mask.all() and ids[-1] == SEP


def test_tokenizer_batch_equals_single_calls(tokenizer):
    sentences = ["the red circle", "the big blue square to the left of the small green triangle", "one", " ".join(["x"] * 30)]
    ids, mask = tokenizer.batch(sentences)
    assert ids.shape == mask.shape == (len(sentences), 20)
    for k, s in enumerate(sentences):
        i, m = tokenizer(s)
        assert torch.equal(ids[k], i) and torch.equal(mask[k], m), s


# ---- metrics -----------------------------------------------------------------------------------------------------
def _grid(cells: str) -> torch.Tensor:
    """4x4 binary mask from 16 characters, '#' = 1."""
    return torch.tensor([c == "#" for c in cells.replace(" ", "")]).view(4, 4)


def test_metrics_hand_computed():
    empty = _grid("." * 16)
    rows = lambda k: _grid("#" * 4 * k + "." * (16 - 4 * k))  # noqa: E731  first k rows
    pairs = [
        # pred, target, kind                                                               I   U   IoU
        (_grid("##.. ##.. .... ...."), _grid(".##. .##. .... ...."), "attribute"),  #   2   6   1/3
        (rows(2), rows(2), "location"),  #                                                8   8   1
        (rows(2), rows(1), "attribute"),  #                                               4   8   0.5
        (empty, empty, "relation"),  #                                                    0   0   0 (U = 0)
        (_grid("#" * 15 + "."), rows(3), "ordinal"),  #                                  12  15   0.8
    ]
    m = RisMetrics()
    first = m.update(torch.stack([p for p, _, _ in pairs[:2]]), torch.stack([t for _, t, _ in pairs[:2]]), ["attribute", "location"])
    assert torch.allclose(first, torch.tensor([1 / 3, 1.0], dtype=torch.float64))
    rest = m.update(torch.stack([p for p, _, _ in pairs[2:]]), torch.stack([t for _, t, _ in pairs[2:]]), [k for _, _, k in pairs[2:]])
    assert torch.allclose(rest, torch.tensor([0.5, 0.0, 0.8], dtype=torch.float64))
    assert m.intersections == [2, 8, 4, 0, 12] and m.unions == [6, 8, 8, 0, 15]

    s = m.summary()
    assert s["pairs"] == 5
    assert s["mIoU"] == pytest.approx(100 * (1 / 3 + 1 + 0.5 + 0 + 0.8) / 5)  # 52.67
    assert s["oIoU"] == pytest.approx(100 * 26 / 37)  # 70.27: ΣI/ΣU, not the mean
    assert s["oIoU"] != pytest.approx(s["mIoU"])
    # Prec@X counts IoU >= X (0.5 and 0.8 sit exactly on thresholds)
    expected_prec = {0.5: 60.0, 0.6: 40.0, 0.7: 40.0, 0.8: 40.0, 0.9: 20.0}
    for x, p in expected_prec.items():
        assert s[f"Prec@{x}"] == pytest.approx(p), x
    assert s["mIoU_by_kind"] == pytest.approx(
        {"attribute": 100 * (1 / 3 + 0.5) / 2, "location": 100.0, "ordinal": 80.0, "relation": 0.0}
    )
    assert s["pairs_by_kind"] == {"attribute": 2, "location": 1, "ordinal": 1, "relation": 1}

    # a perfect empty prediction of an empty target still counts as IoU 0
    only_empty = RisMetrics()
    only_empty.update(empty[None], empty[None])
    assert only_empty.summary()["mIoU"] == 0.0
    assert "mIoU_by_kind" not in only_empty.summary()


def test_metrics_rejects_bad_input():
    m = RisMetrics()
    with pytest.raises(ValueError, match="differ in shape"):
        m.update(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="no pairs"):
        m.summary()
