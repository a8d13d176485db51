"""Images and sentences as users have them: every pixel mode Pillow opens, EXIF rotation, photos far larger than the
model needs or over the pixel limit, invisible or undecodable characters, sentences far over the token limit."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.TiffImagePlugin import TiffImageFile

import demo.segment as segment_module
from quantize.data import preprocess
from quantize.data.preprocess import (
    BACKGROUND,
    KEEP_FACTOR,
    ExpressionError,
    Tokenizer,
    clean_expression,
    load_image,
    resize_image,
    to_rgb,
)
from quantize.errors import MissingFileError, UserError
from quantize.models.registry import text_encoder_dir

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "wordpiece.json"
SIZE = 128  # lavt-tiny's input side


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(text_encoder_dir(), 20)


def _saved(image: Image.Image, path: Path, **kw) -> Path:
    image.save(path, **kw)
    return path


def _rgb(path: Path, xy=(0, 0)) -> tuple[int, int, int]:
    image = load_image(path)
    assert image.mode == "RGB"
    return image.getpixel(xy)


def _close(got, want, tol: int) -> bool:
    return all(abs(int(g) - int(w)) <= tol for g, w in zip(got, want))


# ---- pixel modes ---------------------------------------------------------------------------------------------------
def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    image.putpixel((1, 0), 0)
    if transparent:
        image.info["transparency"] = 0
    return image


def _pgm16(path: Path, value: int) -> Path:
    """A 16-bit PGM: Pillow opens it as mode I (no bit depth recorded), samples scaled to 16 bits."""
    path.write_bytes(b"P5 4 4 65535\n" + struct.pack(">H", value) * 16)
    return path


# name: (image, format, expected RGB at (0, 0), tolerance)
OPAQUE = {
    "1": (Image.new("1", (4, 4), 1), "png", (255, 255, 255), 0),
    "L": (Image.new("L", (4, 4), 100), "png", (100, 100, 100), 0),
    "L-jpeg": (Image.new("L", (8, 8), 100), "jpeg", (100, 100, 100), 2),
    "P": (_palette(False), "png", (200, 30, 40), 0),
    "RGB-tiff": (Image.new("RGB", (4, 4), (10, 20, 30)), "tiff", (10, 20, 30), 0),
    "CMYK-tiff": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "tiff", (255, 0, 0), 0),
    "CMYK-jpeg": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "jpeg", (255, 0, 0), 4),
    "YCbCr-tiff": (Image.new("YCbCr", (4, 4), (128, 128, 128)), "tiff", (128, 128, 128), 1),
    "LAB-tiff": (Image.new("LAB", (4, 4), (128, 128, 128)), "tiff", (119, 119, 119), 3),  # L* 50: sRGB 119
    # 16-bit greyscale: Pillow's convert("RGB") clips these to white
    "I;16-mid": (Image.fromarray(np.full((4, 4), 32768, np.uint16)), "png", (128, 128, 128), 0),
    "I;16-white": (Image.fromarray(np.full((4, 4), 65535, np.uint16)), "png", (255, 255, 255), 0),
    "I;16-8bit": (Image.fromarray(np.full((4, 4), 77 * 257, np.uint16)), "png", (77, 77, 77), 0),
    "I;16-tiff": (Image.fromarray(np.full((4, 4), 32768, np.uint16)), "tiff", (128, 128, 128), 0),
    "I;16B-tiff": (Image.frombytes("I;16B", (4, 4), struct.pack(">H", 32768) * 16), "tiff", (128, 128, 128), 0),
    # a 32-bit TIFF declares its depth: 3/4 of 2**31 is 3/4 of white
    "I-tiff": (Image.fromarray(np.full((4, 4), 3 * 2**29, np.int32)), "tiff", (191, 191, 191), 0),
    "F-unit": (Image.fromarray(np.full((4, 4), 0.25, np.float32)), "tiff", (64, 64, 64), 0),
    "F-255": (Image.fromarray(np.array([[200.0, 0.0], [50.0, 300.0]], np.float32)), "tiff", (200, 200, 200), 0),
}


@pytest.mark.parametrize("name", list(OPAQUE))
def test_every_mode_opens_as_the_rgb_a_viewer_shows(name, tmp_path):
    image, fmt, want, tol = OPAQUE[name]
    path = _saved(image, tmp_path / f"image.{fmt}")
    if name.startswith(("I;16", "I-", "F-")):
        assert Image.open(path).mode == image.mode  # the mode under test is what the file opens as
    got = _rgb(path)
    assert _close(got, want, tol), f"{name}: {got} != {want}"


def test_sixteen_bit_png_is_not_white(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    path = _saved(Image.fromarray(ramp), tmp_path / "ramp16.png")
    assert Image.open(path).convert("RGB").getpixel((128, 0)) == (255, 255, 255)  # what Pillow alone gives
    grey = np.asarray(load_image(path))[..., 0].astype(int)
    assert np.abs(grey - np.round(ramp / 257)).max() <= 1
    assert (np.diff(grey[0]) >= 0).all() and grey[0, 0] == 0 and grey[0, -1] == 255


def test_sixteen_bit_pgm_opened_as_mode_i_is_scaled_by_sixteen_bits(tmp_path):
    path = _pgm16(tmp_path / "grey.pgm", 32768)
    assert Image.open(path).mode == "I"
    assert _rgb(path) == (128, 128, 128)


def test_float_image_over_one_is_taken_as_0_255(tmp_path):
    path = _saved(OPAQUE["F-255"][0], tmp_path / "float.tiff")
    assert np.asarray(load_image(path))[..., 0].tolist() == [[200, 0], [50, 255]]


def _blend(colour, alpha):
    return tuple(round((c * alpha + b * (255 - alpha)) / 255) for c, b in zip(colour, BACKGROUND))


def test_background_is_the_imagenet_mean():
    assert BACKGROUND == (124, 116, 104)


def test_rgba_is_composited_on_the_background(tmp_path):
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (255, 0, 0, 128)])
    rgb = load_image(_saved(image, tmp_path / "rgba.png"))
    assert rgb.getpixel((0, 0)) == (255, 0, 0)
    assert rgb.getpixel((1, 0)) == BACKGROUND  # dropping alpha would show the hidden red
    assert _close(rgb.getpixel((2, 0)), _blend((255, 0, 0), 128), 1)


def test_la_is_composited_on_the_background(tmp_path):
    image = Image.new("LA", (2, 1))
    image.putdata([(255, 0), (0, 255)])
    rgb = load_image(_saved(image, tmp_path / "la.png"))
    assert rgb.getpixel((0, 0)) == BACKGROUND and rgb.getpixel((1, 0)) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["P", "L", "RGB"])
def test_transparency_key_is_composited_on_the_background(mode, tmp_path):
    if mode == "P":
        image = _palette(True)
        visible, hidden = (200, 30, 40), (1, 0)
    else:
        image = Image.new(mode, (4, 4), 200 if mode == "L" else (200, 30, 40))
        image.putpixel((1, 0), 0 if mode == "L" else (0, 0, 0))
        image.info["transparency"] = 0 if mode == "L" else (0, 0, 0)
        visible, hidden = ((200,) * 3 if mode == "L" else (200, 30, 40)), (1, 0)
    rgb = load_image(_saved(image, tmp_path / "key.png"))
    assert rgb.getpixel((0, 0)) == visible
    assert rgb.getpixel(hidden) == BACKGROUND


@pytest.mark.parametrize(
    ("image", "want"),
    [
        (Image.new("HSV", (2, 2), (0, 255, 255)), (255, 0, 0)),
        (Image.new("RGBX", (2, 2), (1, 2, 3, 0)), (1, 2, 3)),
        (Image.new("RGBa", (2, 2), (0, 0, 0, 0)), BACKGROUND),
        (Image.new("La", (2, 2), (0, 0)), BACKGROUND),
        (Image.new("PA", (2, 2), (0, 0)), BACKGROUND),
        (Image.fromarray(np.full((2, 2), 32768, np.uint16)), (128, 128, 128)),
    ],
    ids=["HSV", "RGBX", "RGBa", "La", "PA", "I;16"],
)
def test_in_memory_images_of_any_mode(image, want):
    assert to_rgb(image).mode == "RGB"
    assert to_rgb(image).getpixel((0, 0)) == want
    # resize_image goes through the same conversion (a 16-bit image handed to it must not turn white)
    assert tuple(resize_image(image, 4)[0, 0]) == want


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown after a quarter turn clockwise
    path = _saved(image, tmp_path / "rotated.jpg", exif=exif, quality=95)
    rgb = load_image(path)
    assert rgb.size == (20, 40)
    assert _close(rgb.getpixel((10, 5)), (255, 0, 0), 8)  # the stored left is now the top
    assert _close(rgb.getpixel((10, 35)), (0, 0, 255), 8)
    # and it survives the reduced decode of a large photo
    big = _saved(image.resize((4000, 2000)), tmp_path / "rotated-big.jpg", exif=exif, quality=95)
    reduced = load_image(big, SIZE)
    assert reduced.height > reduced.width >= KEEP_FACTOR * SIZE
    assert _close(reduced.getpixel((reduced.width // 2, 10)), (255, 0, 0), 8)


def test_unconvertible_mode_names_the_file(tmp_path, monkeypatch):
    path = _saved(Image.new("CMYK", (4, 4)), tmp_path / "odd.tiff")

    def refuse(self, *a, **k):
        raise ValueError("conversion not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    with pytest.raises(UserError, match="odd.tiff has pixel mode CMYK.*save it as 8-bit RGB"):
        load_image(path)


# ---- large photos --------------------------------------------------------------------------------------------------
def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth shading, hard-edged shapes and sensor-like noise: what a resize has to get right."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack(
        [
            127 + 100 * np.sin(x / 97) * np.cos(y / 131),
            255 * (x + y) / (width + height),
            80 + 60 * ((x // 150 + y // 110) % 2),
        ],
        axis=-1,
    )
    pixels += 6 * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def moderate(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("moderate")
    photo = _photo(2400, 1800)
    return {
        "jpeg": _saved(photo, folder / "photo.jpg", quality=92),
        "png": _saved(photo, folder / "photo.png", compress_level=1),
    }


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_reduced_decode_gives_the_model_the_same_input(moderate, fmt):
    path = moderate[fmt]
    full, reduced = load_image(path), load_image(path, SIZE)
    assert full.size == (2400, 1800)
    assert reduced.width < full.width and min(reduced.size) >= KEEP_FACTOR * SIZE  # reduced, not below the margin
    assert abs(reduced.width / reduced.height - 4 / 3) < 0.01  # aspect kept
    a = resize_image(full, SIZE).astype(int)
    b = resize_image(reduced, SIZE).astype(int)
    diff = np.abs(a - b)
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_small_photo_is_decoded_as_before(tmp_path, fmt):
    path = _saved(_photo(640, 480), tmp_path / f"coco-sized.{fmt}")  # under 2 x KEEP_FACTOR x SIZE
    assert np.array_equal(np.asarray(load_image(path, SIZE)), np.asarray(load_image(path)))
    assert load_image(path, SIZE).size == (640, 480)


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` pixels and holds none: a huge image at no cost."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    return path


def test_image_over_the_limit_is_refused_by_name(tmp_path):
    path = _png_header(tmp_path / "panorama.png", 20000, 20000)
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning on the way
        with pytest.raises(UserError) as e:
            load_image(path, SIZE)
    message = str(e.value)
    assert "panorama.png" in message and "20000x20000" in message and "250 megapixels" in message
    assert "downscale" in message and "\n" not in message
    assert not isinstance(e.value, Image.DecompressionBombError)
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's limit is left as it was


def test_limit_is_ours_not_pillows(tmp_path, monkeypatch):
    path = _saved(_photo(100, 80), tmp_path / "photo.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would raise at 2000 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (100, 80)
    assert Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 5000)
    with pytest.raises(UserError, match=r"photo\.png is 100x80 .*over the limit.*downscale it"):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_decode_time_bomb_is_a_user_error(tmp_path, monkeypatch):
    path = _saved(_photo(100, 80), tmp_path / "photo.tiff")

    def bomb(self):
        raise Image.DecompressionBombError("Image size (9 pixels) exceeds limit")

    monkeypatch.setattr(TiffImageFile, "load", bomb)
    with pytest.raises(UserError, match=r"photo\.tiff holds a frame over .*downscale it"):
        load_image(path)


def test_corrupt_and_missing_files_are_named(tmp_path):
    with pytest.raises(MissingFileError, match="none.png"):
        load_image(tmp_path / "none.png")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_saved(_photo(300, 200), tmp_path / "whole.jpg").read_bytes()[:600])
    for size in (None, 16):
        with pytest.raises(UserError, match="corrupt or unreadable image .*truncated.jpg"):
            load_image(truncated, size)


def test_large_jpeg_decodes_in_bounded_memory(tmp_path):
    # 144 MB of pixels decoded in full (upscaled from a smaller photo to keep the test's own memory low)
    path = _saved(_photo(1500, 1000).resize((8000, 6000)), tmp_path / "large.jpg", quality=85)
    script = (
        "import resource, sys\n"
        "from quantize.data.preprocess import load_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"image = load_image(sys.argv[1], {SIZE})\n"
        "print(image.width, image.height, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    width, height, grown_kib = map(int, out.stdout.split())
    assert (width, height) == (1000, 750)  # DCT scaling 1/8: both sides still >= KEEP_FACTOR x SIZE
    # The peak before the load is the imports' (torch's); a full decode raises it by over 100 MiB.
    assert grown_kib < 20 * 1024, f"peak RSS grew {grown_kib // 1024} MiB for a reduced decode"


# ---- the demo ------------------------------------------------------------------------------------------------------
def test_segment_refuses_bad_input_before_loading_a_model(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(segment_module, "_runner", no_model)
    with pytest.raises(MissingFileError, match="nothing.jpg"):
        segment_module.segment(tmp_path / "nothing.jpg", "the cat")
    photo = _saved(_photo(64, 48), tmp_path / "photo.png")
    with pytest.raises(ExpressionError, match="no visible characters"):
        segment_module.segment(photo, "\u200b\u200d")


def test_segment_decodes_a_large_photo_reduced(moderate):
    result = segment_module.segment(moderate["jpeg"], "the red shape")
    assert result.image.size == (1200, 900)  # DCT scaling 1/2 of 2400 x 1800; >= KEEP_FACTOR x 128
    assert result.mask.shape == (900, 1200)


def test_segment_reads_a_sixteen_bit_photo(tmp_path):
    path = _saved(Image.fromarray(np.full((48, 64), 32768, np.uint16)), tmp_path / "grey16.png")
    result = segment_module.segment(path, "the grey wall")
    assert np.asarray(result.image)[0, 0].tolist() == [128, 128, 128]


# ---- sentences -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sentence",
    ["\u200b", "\u200b\u200c\u200d\ufeff", "\u200e\u200f\u202e\u2066\u2069", "\x07\x1b\x7f", "\x00", "\u00ad"],
    ids=["zero-width-space", "zero-width-mix", "bidi-marks", "controls", "nul", "soft-hyphen"],
)
def test_invisible_sentence_is_refused(tokenizer, sentence):
    for call in (lambda: tokenizer(sentence), lambda: tokenizer.batch(["the red circle", sentence])):
        with pytest.raises(ExpressionError, match="no visible characters: give a sentence naming the object"):
            call()


@pytest.mark.parametrize("sentence", ["\u3000", "\u00a0 \u2007", "\u2028"])
def test_unicode_whitespace_only_sentence_is_empty(tokenizer, sentence):
    with pytest.raises(ExpressionError, match="expression is empty"):
        tokenizer(sentence)


@pytest.mark.parametrize("sentence", ["\ue000\uf8ff", "\u0301", "\ufffd\ufffd"])
def test_sentence_the_tokenizer_reads_as_nothing_is_refused(tokenizer, sentence):
    with pytest.raises(ExpressionError, match="no characters the tokenizer reads"):
        tokenizer(sentence)


def test_invisible_characters_are_dropped_and_whitespace_is_a_space(tokenizer):
    assert clean_expression("zero\u200bwidth\u00a0dog\u2028left\ufeff") == "zerowidth dog left"
    assert clean_expression("\u202ethe\tcat\r\n") == "the cat  "
    ids, mask = tokenizer("the\u200d red\u00a0circle\u200b")
    want, want_mask = tokenizer("the red circle")
    assert ids.tolist() == want.tolist() and mask.tolist() == want_mask.tolist()


def test_ids_stay_those_the_phones_give(tokenizer):
    """NFKC would turn these into other words; the golden file the Kotlin and Swift tokenizers follow keeps them."""
    cases = {c["sentence"]: c["input_ids"] for c in json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]}
    for sentence in ["Ｆｕｌｌ\u3000ｗｉｄｔｈ letters", "ﬁne ligature", "zero\u200bwidth space", "soft\u00adhyphen"]:
        assert tokenizer(sentence)[0].tolist() == cases[sentence], sentence
        assert tokenizer.batch([sentence])[0][0].tolist() == cases[sentence], sentence


def test_surrogates_are_refused_as_not_utf8(tokenizer):
    undecodable = os.fsdecode(b"the caf\xe9 sign")  # Latin-1 bytes on a UTF-8 command line
    assert "\udce9" in undecodable
    for call in (lambda: tokenizer(undecodable), lambda: tokenizer.batch([undecodable])):
        with pytest.raises(UserError, match=r"not valid UTF-8 .*position 7.*pass the text as UTF-8") as e:
            call()
        assert "\n" not in str(e.value)


def test_truncation_warning_is_short(tokenizer, caplog):
    sentence = "the big brown dog " * 1600  # 28,800 characters
    with caplog.at_level(logging.WARNING, logger="quantize.data.preprocess"):
        ids, mask = tokenizer(sentence)
    assert int(mask.sum()) == 20
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert "6402 tokens, truncated to 20" in message and "28800 characters" in message
    assert len(message) < 200, message
    assert "'the big brown dog the big" in message and "..." in message
