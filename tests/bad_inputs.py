"""Bad inputs to the ``ptq4ris`` command line: a table of hostile cases, the runner that plays them, and the writer of
``docs/reliability.md``.

Each :class:`Case` is a command (argv after ``ptq4ris``), an optional ``setup(tmp)`` that plants the hostile files in
the case's own temporary folder (the command's working directory), and what must happen (:class:`Expect`): the exit
status, a regex that the error line must match (it names the flag or the file), the paths whose bytes must survive.
The runner plays every case in a subprocess, ``python -m ptq4ris ...``, two at a time; the expensive inputs (a small
ShapesRef refer root, a calibrated model folder, a wrong-model ``.pte`` and ``.mlpackage``, large photos) are built once
per run and copied into each case's folder that needs them (copied, never shared: a case may destroy its copy).

    python tests/bad_inputs.py --write docs/reliability.md   # run every case, regenerate the document
    python tests/bad_inputs.py --only segment-out-text-named-png --fixtures /tmp/bi-fixtures   # iterate on a few

``tests/test_bad_inputs.py`` asserts every case under pytest and that the document lists exactly these cases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KLASSES = (
    "data loss",
    "process abort",
    "late failure",
    "silent wrong input",
    "traceback for a user error",
    "resources",
    "flags",
)
COMMANDS = ("data synth", "train", "evaluate", "calibrate", "analyze", "export-pte", "export-coreml", "parity",
            "segment", "demo")  # fmt: skip
# The error line of a user's mistake: "ptq4ris: error: ..." or, from argparse, "ptq4ris <command>: error: ...".
ERROR_LINE = re.compile(r"^ptq4ris[\w -]*: error: ")
FAST = 20.0  # seconds: a refusal that must come before the work (the work itself takes minutes)


# ---- the table's records ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expect:
    code: int = 2
    message: str = ""  # regex searched in the last non-empty stderr line (the error line)
    survives: tuple[str, ...] = ()  # paths (relative to the case folder) whose bytes must be unchanged afterwards
    absent: tuple[str, ...] = ()  # glob patterns that must match nothing afterwards (leftovers, proof of code run)
    max_seconds: float | None = None  # a fail-fast check, not a benchmark
    max_stderr_bytes: int | None = None
    max_rss_mb: float | None = None  # peak resident memory of the child
    stdout: str = ""  # regex searched in stdout (successful cases)
    traceback: bool = False  # the debug switch: a traceback is wanted
    one_line: bool = True  # exit 2: stderr is exactly one non-empty line


@dataclass(frozen=True)
class Case:
    id: str
    klass: str
    command: tuple[str | bytes, ...]
    expect: Expect
    setup: Callable[[Path], None] | None = None
    needs: tuple[str, ...] = ()  # fixtures copied into the case folder (see FIXTURES)
    env: tuple[tuple[str, str], ...] = ()
    xfail: str = ""  # a known bug, reported: the case fails until it is fixed (strict)
    skip: Callable[[], str] | None = None  # returns a reason to skip on this machine, or ""
    interrupt: Callable[[Path, int, str], bool] | None = None  # (folder, pid, stderr so far) -> send SIGINT now
    timeout: float = 150.0
    cost: float = 1.0  # rough relative duration: the costly cases start first

    @property
    def name(self) -> str:
        """The command named in the table: ``data synth`` or the subcommand."""
        words = [a for a in self.command if isinstance(a, str) and not a.startswith("-")]
        if not words:
            return ""
        return "data synth" if words[0] == "data" else words[0]


# ---- fixtures: built once, copied into each case folder --------------------------------------------------------------
FIXTURES = {
    "refer": "d",  # ShapesRef refer root: train 40 scenes, val 20 scenes
    "art": "art",  # calibrated model folder (ptq4ris-deploy w8a8, objective none, 8 pairs)
    "wrong_pte": "wrong.pte",  # a valid ExecuTorch program of a torch.nn.Linear(4, 2)
    "wrong_mlpackage": "wrong.mlpackage",  # a valid Core ML ML program of a torch.nn.Linear(4, 2)
    "photo": "photo.png",  # a ShapesRef val image, 160x120 RGB
    "huge_png": "huge.png",  # 14000x14000 RGB PNG, black, ~600 KB compressed (588 MB decoded)
    "bomb_png": "bomb.png",  # 17500x17500 1-bit PNG: 306 megapixels, over the 250 MP limit
    "big_jpeg": "big.jpg",  # 12000x9000 JPEG photo (108 MP, 324 MB decoded at full size)
}
READY = "fixtures-ready.json"

_PTE_SCRIPT = """
import sys, torch
from executorch.exir import to_edge
m = torch.nn.Linear(4, 2).eval()
program = to_edge(torch.export.export(m, (torch.randn(1, 4),))).to_executorch()
open(sys.argv[1], "wb").write(program.buffer)
"""
_MLPACKAGE_SCRIPT = """
import sys, torch, coremltools as ct
m = torch.nn.Linear(4, 2).eval()
traced = torch.jit.trace(m, torch.randn(1, 4))
ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 4))], convert_to="mlprogram",
           minimum_deployment_target=ct.target.iOS17).save(sys.argv[1])
"""


def _child_env(extra: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PTQ4RIS_DEBUG", None)
    # One intra-op thread: two children share two cores, and spinning thread pools slow every small op down.
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(dict(extra))
    return env


def _check_call(argv: list[str], cwd: Path, what: str) -> float:
    start = time.monotonic()
    done = subprocess.run(argv, cwd=cwd, env=_child_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the {what} fixture failed ({done.returncode}): {done.stderr[-3000:]}")
    return time.monotonic() - start


def build_fixtures(root: str | Path) -> Path:
    """Build the shared inputs under ``root`` (reused when a previous build there completed)."""
    root = Path(root)
    if (root / READY).is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "ptq4ris"]
    timings = {}
    timings["refer"] = _check_call(
        [*py, "data", "synth", "--out", "d", "--splits", "train", "val", "--train-scenes", "40", "--val-scenes", "20"],
        root,
        "ShapesRef",
    )
    shutil.copy(root / "d" / "images" / "shapesref" / "shapesref_val_000000.png", root / "photo.png")

    def calibrate():
        timings["art"] = _check_call(
            [*py, "calibrate", "--method", "ptq4ris-deploy", "--objective", "none", "--refer-root", "d", "--out",
             "art", "--calib-size", "8", "--everyday-expressions", "0"],
            root, "calibrated model",
        )  # fmt: skip

    def programs():
        timings["wrong_pte"] = _check_call([sys.executable, "-c", _PTE_SCRIPT, "wrong.pte"], root, ".pte")
        timings["wrong_mlpackage"] = _check_call(
            [sys.executable, "-c", _MLPACKAGE_SCRIPT, "wrong.mlpackage"], root, ".mlpackage"
        )
        start = time.monotonic()
        _zero_png(root / "huge.png", 14000, 14000, color_type=2, bit_depth=8)
        _zero_png(root / "bomb.png", 17500, 17500, color_type=0, bit_depth=1)
        _big_jpeg(root / "photo.png", root / "big.jpg", (12000, 9000))
        timings["images"] = time.monotonic() - start

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(calibrate), pool.submit(programs)]:
            future.result()
    (root / READY).write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return root


# ---- file builders -----------------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _zero_png(path: Path, width: int, height: int, color_type: int, bit_depth: int) -> None:
    """A valid PNG of ``width`` x ``height`` black pixels, written without ever holding the image: the IDAT is a zlib
    stream of zero rows, fed a block of rows at a time."""
    channels = {0: 1, 2: 3}[color_type]
    row = 1 + (width * channels * bit_depth + 7) // 8  # filter byte + samples
    comp = zlib.compressobj(9)
    block_rows = max(1, (8 << 20) // row)
    block = bytes(row * block_rows)
    idat = []
    left = height
    while left:
        n = min(left, block_rows)
        idat.append(comp.compress(block[: row * n]))
        left -= n
    idat.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(idat))
        + _png_chunk(b"IEND", b"")
    )


def _big_jpeg(source: Path, out: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    with Image.open(source) as im:
        im.convert("RGB").resize(size, Image.BILINEAR).save(out, quality=85)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(path: Path):
    """Content of a path: a file's digest, a folder's digests by relative path, or None when absent."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_file():
        return ("file", _sha256(path))
    if path.is_dir():
        return (
            "dir",
            {str(p.relative_to(path)): _sha256(p) if p.is_file() else "dir" for p in sorted(path.rglob("*"))},
        )
    return None


# ---- setups: small factories returning ``setup(tmp)`` ------------------------------------------------------------------
def _all(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for s in setups:
            s(tmp)

    return setup


def user_file(name: str, content: bytes = b"my notes, not a ptq4ris output\n") -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(content)

    return setup


JPEG_BYTES = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8  # a user's photo (content irrelevant)
ZIP_BYTES = b"PK\x03\x04" + bytes(200)  # a user's zip / spreadsheet


def user_folder(name: str) -> Callable[[Path], None]:
    """A user's folder: a photo and a note, nothing ptq4ris wrote."""

    def setup(tmp: Path) -> None:
        folder = tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "holiday.jpg").write_bytes(JPEG_BYTES)
        (folder / "notes.txt").write_text("do not delete\n")

    return setup


def manifest_folder(name: str, kind: str, written_by: str = "ptq4ris") -> Callable[[Path], None]:
    """A folder carrying a manifest of ``kind`` (another command's output, or a forged one) and a file."""

    def setup(tmp: Path) -> None:
        folder = tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ptq4ris-manifest.json").write_text(json.dumps({"written_by": written_by, "kind": kind}))
        (folder / "result.txt").write_text("an earlier result\n")

    return setup


def empty_folder(name: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).mkdir(parents=True, exist_ok=True)


def symlink(name: str, target: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).symlink_to(target)


def copy_of(source: str, name: str, truncate: int | None = None) -> Callable[[Path], None]:
    """``name`` := a copy of the case folder's ``source`` (a file or folder), optionally truncated to ``truncate``
    bytes (a file)."""

    def setup(tmp: Path) -> None:
        src, dst = tmp / source, tmp / name
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            data = src.read_bytes()
            dst.write_bytes(data if truncate is None else data[:truncate])

    return setup


def random_bytes(name: str, size: int = 5000, head: bytes = b"", seed: int = 1) -> Callable[[Path], None]:
    import random

    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(head + random.Random(seed).randbytes(size))

    return setup


def half_of(name: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        data = (tmp / name).read_bytes()
        (tmp / name).write_bytes(data[: len(data) // 2])

    return setup


def delete(name: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        p = tmp / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return setup


def rehash(folder: str, name: str) -> Callable[[Path], None]:
    """Update the manifest's digest of ``folder/name`` after an edit: a deliberate edit, past the digest check."""

    def setup(tmp: Path) -> None:
        manifest = tmp / folder / "ptq4ris-manifest.json"
        m = json.loads(manifest.read_text())
        m["files"][name] = _sha256(tmp / folder / name)
        manifest.write_text(json.dumps(m))

    return setup


def edit_json(name: str, edit: Callable[[object], object | None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        data = json.loads((tmp / name).read_text())
        new = edit(data)
        (tmp / name).write_text(json.dumps(data if new is None else new))

    return setup


def _set_recipe(**values):
    return lambda c: c["recipe"].update(values)


def edit_refs(edit: Callable[[list], object | None], root: str = "d") -> Callable[[Path], None]:
    """Edit the refs pickle of the refer root ``root`` (our own file: plain pickle is safe here)."""

    def setup(tmp: Path) -> None:
        path = tmp / root / "shapesref" / "refs(unc).p"
        refs = pickle.loads(path.read_bytes())
        new = edit(refs)
        path.write_bytes(pickle.dumps(refs if new is None else new, protocol=4))

    return setup


def _first_val(refs: list) -> dict:
    return next(r for r in refs if r["split"] == "val")


def _del(d: dict, key: str):
    del d[key]


def edit_instances(edit: Callable[[dict], object | None], root: str = "d") -> Callable[[Path], None]:
    return edit_json(f"{root}/shapesref/instances.json", edit)


def _ann_of_first_val(data: dict, refs_path: Path) -> dict:
    ref = _first_val(pickle.loads(refs_path.read_bytes()))
    return next(a for a in data["annotations"] if a["id"] == ref["ann_id"])


def edit_first_val_annotation(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / "d" / "shapesref" / "instances.json"
        data = json.loads(path.read_text())
        edit(_ann_of_first_val(data, tmp / "d" / "shapesref" / "refs(unc).p"))
        path.write_text(json.dumps(data))

    return setup


def first_val_image(tmp: Path) -> Path:
    """The image file of the first val ref (the first pair evaluation reads)."""
    ref = _first_val(pickle.loads((tmp / "d" / "shapesref" / "refs(unc).p").read_bytes()))
    data = json.loads((tmp / "d" / "shapesref" / "instances.json").read_text())
    info = next(i for i in data["images"] if i["id"] == ref["image_id"])
    return tmp / "d" / "images" / "shapesref" / info["file_name"]


# A pickle that would run ``touch pwned`` (os.system) when unpickled by a plain unpickler.
EVIL_PICKLE = b"cposix\nsystem\n(Vtouch pwned\ntR."


def image_variant(name: str, convert: Callable) -> Callable[[Path], None]:
    """``name`` := ``convert(photo)`` saved (convert returns (image, save kwargs))."""

    def setup(tmp: Path) -> None:
        from PIL import Image

        with Image.open(tmp / "photo.png") as im:
            out, kwargs = convert(im.convert("RGB"))
        out.save(tmp / name, **kwargs)

    return setup


def _sixteen_bit(im):
    import numpy as np
    from PIL import Image

    grey = np.asarray(im.convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(grey), {"format": "PNG"}  # uint16 -> mode I;16, a 16-bit greyscale PNG


def _palette_transparent(im):
    from PIL import Image

    return im.convert("P", palette=Image.ADAPTIVE, colors=64), {"format": "PNG", "transparency": 0}


def _cmyk(im):
    return im.convert("CMYK"), {"format": "JPEG", "quality": 90}


def safetensors_file(name: str, truncate: int | None = None) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(64, 64)}, str(tmp / name))
        if truncate is not None:
            (tmp / name).write_bytes((tmp / name).read_bytes()[:truncate])

    return setup


def pth_file(name: str, obj=None, truncate: int | None = None) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        import torch

        torch.save({"model": {"weight": torch.zeros(64, 64)}} if obj is None else obj, tmp / name)
        if truncate is not None:
            (tmp / name).write_bytes((tmp / name).read_bytes()[:truncate])

    return setup


def not_root() -> str:
    return "root ignores file permissions: a read-only folder cannot be made" if os.geteuid() == 0 else ""


def read_only_folder(name: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).mkdir()
        (tmp / name).chmod(0o555)

    return setup


def appears(pattern: str) -> Callable[[Path, int, str], bool]:
    """A path matching ``pattern`` exists in the case folder: the work has started."""
    return lambda tmp, pid, err: next(tmp.glob(pattern), None) is not None


def loaded(library: str) -> Callable[[Path, int, str], bool]:
    """The child has imported ``library`` (a shared object of it is mapped): it is past argument parsing."""

    def ready(tmp: Path, pid: int, err: str) -> bool:
        try:
            return library in Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return False

    return ready


def workers_capped() -> str:
    """``data synth --workers N`` forks N processes at once unless the count is capped: never run it uncapped."""
    sys.path.insert(0, str(REPO))
    import inspect

    from quantize.data import shapesref

    source = inspect.getsource(shapesref._iter_scenes)
    return "" if "cpu_count" in source else "unsafe on this tree: shapesref._iter_scenes does not cap --workers"


# ---- the table ---------------------------------------------------------------------------------------------------------
# The photo (ShapesRef val scene 0) has a big purple circle in the centre: 914 of its 160x120 pixels, 4.8%.
CENTER = "the shape in the center"
CENTER_MASK = r"mask covers [3-6]\.\d% "  # the object found: not empty, not the whole (e.g. all-white) image
SEG = ("segment", "--image", "photo.png", "--text", CENTER)
PAR = ("parity", "--quantized", "art", "--refer-root", "d", "--limit", "2", "--no-photos")
EVAL = ("evaluate", "--refer-root", "d", "--limit", "2")
CAL = ("calibrate", "--method", "ptq4ris-deploy", "--objective", "none", "--refer-root", "d", "--calib-size", "4",
       "--everyday-expressions", "0")  # fmt: skip
ANA = ("analyze", "--refer-root", "d", "--limit", "2", "--sqnr-pairs", "2")
PTE = ("export-pte", "--stages", "text", "visual", "--no-kernels")
CML = ("export-coreml",)
TRAIN = ("train", "--data-root", "d", "--steps", "1", "--batch-size", "2")
SYNTH = ("data", "synth", "--splits", "val", "--val-scenes", "3")
DEMO = ("demo", "--data", "d", "--limit", "2", "--coreml-limit", "1", "--no-arm", "--no-progress")


def _data_loss() -> list[Case]:
    k = "data loss"
    mine = user_folder("mine")
    cases = [
        Case("calibrate-out-user-folder", k, (*CAL, "--out", "mine"),
             Expect(message=r"--out mine .*will not replace", survives=("mine",), max_seconds=FAST),
             mine, ("refer",)),
        Case("calibrate-out-user-file", k, (*CAL, "--out", "notes.txt"),
             Expect(message=r"--out notes\.txt .*file", survives=("notes.txt",)), user_file("notes.txt"), ("refer",)),
        Case("calibrate-out-training-folder", k, (*CAL, "--out", "run"),
             Expect(message=r"--out run .*calibrated-model", survives=("run",)),
             manifest_folder("run", "training"), ("refer",)),
        Case("calibrate-out-is-refer-root", k, (*CAL, "--out", "d"),
             Expect(message=r"--out d ", survives=("d/shapesref", "d/images")), None, ("refer",)),
        Case("train-out-user-folder", k, (*TRAIN, "--out", "mine"),
             Expect(message=r"--out mine .*will not replace", survives=("mine",)), mine, ("refer",)),
        Case("train-out-user-file", k, (*TRAIN, "--out", "notes.txt"),
             Expect(message=r"--out notes\.txt", survives=("notes.txt",)), user_file("notes.txt"), ("refer",)),
        Case("train-out-calibrated-folder", k, (*TRAIN, "--out", "q"),
             Expect(message=r"--out q ", survives=("q",)), manifest_folder("q", "calibrated-model"), ("refer",)),
        Case("analyze-out-png-is-text", k, (*ANA, "--quantized", "q", "--out", "mine"),
             Expect(message=r"mine/sensitivity\.png", survives=("mine",)),
             _all(mine, user_file("mine/sensitivity.png"), manifest_folder("q", "calibrated-model"))),
        Case("analyze-out-json-is-array", k, (*ANA, "--quantized", "q", "--out", "mine"),
             Expect(message=r"mine/sensitivity\.json", survives=("mine",)),
             _all(mine, user_file("mine/sensitivity.json", b"[1, 2, 3]\n"), manifest_folder("q", "calibrated-model"))),
        Case("analyze-default-out-user-png", k, (*ANA, "--quantized", "q"),
             Expect(message=r"--quantized q/sensitivity\.png", survives=("q",)),
             _all(manifest_folder("q", "calibrated-model"), user_file("q/sensitivity.png", JPEG_BYTES))),
        Case("export-pte-out-text-named-pte", k, (*PTE, "--quantized", "art", "--out", "m.pte"),
             Expect(message=r"--out m\.pte exists", survives=("m.pte",), max_seconds=FAST),
             user_file("m.pte"), ("art",)),
        Case("export-pte-text-sibling", k, (*PTE, "--quantized", "art", "--out", "m.pte"),
             Expect(message=r"m\.text\.pte", survives=("m.text.pte",)), user_file("m.text.pte"), ("art",)),
        Case("export-pte-visual-sibling", k, (*PTE, "--quantized", "art", "--out", "m.pte"),
             Expect(message=r"m\.visual\.pte", survives=("m.visual.pte",)), user_file("m.visual.pte"), ("art",)),
        Case("export-pte-float-sibling", k, ("export-pte", "--no-kernels", "--quantized", "art", "--out", "m.pte"),
             Expect(message=r"m\.float\.pte", survives=("m.float.pte",)), user_file("m.float.pte", JPEG_BYTES),
             ("art",)),
        Case("export-pte-lowering-sibling", k, (*PTE, "--quantized", "art", "--out", "m.pte"),
             Expect(message=r"m\.lowering\.json", survives=("m.lowering.json",)), user_file("m.lowering.json"),
             ("art",)),
        Case("export-pte-out-user-folder", k, (*PTE, "--quantized", "art", "--out", "m.pte"),
             Expect(message=r"--out m\.pte is a folder", survives=("m.pte",)), user_folder("m.pte"), ("art",)),
        Case("export-coreml-out-foreign-mlpackage", k, (*CML, "--quantized", "art", "--out", "wrong.mlpackage"),
             Expect(message=r"--out wrong\.mlpackage ", survives=("wrong.mlpackage",), max_seconds=FAST), None,
             ("art", "wrong_mlpackage")),
        Case("export-coreml-out-user-folder", k, (*CML, "--quantized", "art", "--out", "m.mlpackage"),
             Expect(message=r"--out m\.mlpackage ", survives=("m.mlpackage",)), user_folder("m.mlpackage"),
             ("art",)),
        Case("export-coreml-float-sibling", k, (*CML, "--quantized", "art", "--out", "m.mlpackage"),
             Expect(message=r"m\.float\.mlpackage", survives=("m.float.mlpackage",)),
             user_folder("m.float.mlpackage"), ("art",)),
        Case("export-coreml-report-sibling", k, (*CML, "--quantized", "art", "--out", "m.mlpackage", "--no-float"),
             Expect(message=r"m\.coreml\.json", survives=("m.coreml.json",)), user_file("m.coreml.json"), ("art",)),
        Case("segment-out-text-named-png", k, (*SEG, "--out", "notes.png"),
             Expect(message=r"--out notes\.png exists", survives=("notes.png",)), user_file("notes.png"), ("photo",)),
        Case("segment-out-user-jpeg", k, (*SEG, "--out", "holiday.jpg"),
             Expect(message=r"--out holiday\.jpg", survives=("holiday.jpg",)), user_file("holiday.jpg", JPEG_BYTES),
             ("photo",)),
        Case("segment-out-folder-named-png", k, (*SEG, "--out", "out.png"),
             Expect(message=r"--out out\.png is a folder", survives=("out.png",)), user_folder("out.png"), ("photo",)),
        Case("segment-out-is-the-input-photo", k, (*SEG, "--out", "photo.png"),
             Expect(message=r"--out photo\.png", survives=("photo.png",)), None, ("photo",)),
        Case("parity-out-text-named-json", k, ("parity", "--quantized", "q", "--pte", "wrong.pte", "--out", "r.json"),
             Expect(message=r"--out r\.json exists", survives=("r.json",)), user_file("r.json"), ("wrong_pte",)),
        Case("parity-out-user-folder", k, ("parity", "--quantized", "q", "--pte", "wrong.pte", "--out", "r.json"),
             Expect(message=r"--out r\.json is a folder", survives=("r.json",)), user_folder("r.json"),
             ("wrong_pte",)),
        Case("synth-foreign-shapesref-beside-refcoco", k, (*SYNTH, "--out", "root"),
             Expect(message=r"--out root: root/shapesref exists", survives=("root",)),
             _all(user_folder("root/shapesref"), user_folder("root/refcoco"))),
        Case("synth-foreign-images-shapesref", k, (*SYNTH, "--out", "root"),
             Expect(message=r"root/images/shapesref exists", survives=("root",)),
             _all(user_folder("root/images/shapesref"), user_folder("root/images/mscoco"))),
        Case("synth-out-user-file", k, (*SYNTH, "--out", "notes.txt"),
             Expect(message=r"--out notes\.txt is a file", survives=("notes.txt",)), user_file("notes.txt")),
        Case("synth-rewrite-keeps-refcoco", k, (*SYNTH, "--out", "d"),
             Expect(code=0, stdout=r"ShapesRef written to d", survives=("d/refcoco", "d/images/mscoco"),
                    absent=("d/.shapesref-staging-*",)),
             _all(user_folder("d/refcoco"), user_folder("d/images/mscoco")), ("refer",)),
        Case("synth-interrupted-keeps-previous", k,
             ("data", "synth", "--out", "d", "--splits", "train", "val", "--train-scenes", "100000"),
             Expect(code=130, message=r"interrupted", one_line=False,
                    survives=("d/shapesref", "d/images/shapesref"), absent=("d/.shapesref-staging-*",)),
             None, ("refer",), interrupt=appears("d/.shapesref-staging-*/images/shapesref/*.png")),
        Case("calibrate-interrupted-keeps-previous", k, (*CAL, "--out", "art"),
             Expect(code=130, message=r"interrupted", one_line=False, survives=("art",),
                    absent=(".art.ptq4ris-staging-*",)),
             None, ("refer", "art"), interrupt=loaded("pycocotools"), cost=3),
        Case("demo-out-user-folder", k, (*DEMO, "--out", "mine"),
             Expect(message=r"--out mine ", survives=("mine",), max_seconds=FAST), mine, ("refer",)),
        Case("demo-out-user-file", k, (*DEMO, "--out", "notes.txt"),
             Expect(message=r"--out notes\.txt", survives=("notes.txt",)), user_file("notes.txt"), ("refer",)),
        Case("demo-out-calibrated-folder", k, (*DEMO, "--out", "q"),
             Expect(message=r"--out q ", survives=("q",)), manifest_folder("q", "calibrated-model"), ("refer",)),
        Case("demo-data-foreign-shapesref", k,
             ("demo", "--data", "root", "--limit", "2", "--no-arm", "--no-progress", "--out", "new"),
             Expect(message=r"root/shapesref", survives=("root",), max_seconds=FAST),
             _all(user_folder("root/shapesref"), user_folder("root/refcoco"))),
    ]  # fmt: skip
    return cases


def _process_abort() -> list[Case]:
    k = "process abort"
    pte_files = [
        ("random", "x.pte", random_bytes("x.pte"), ""),
        ("truncated", "x.pte", copy_of("wrong.pte", "x.pte", truncate=700), ""),
        ("empty", "x.pte", user_file("x.pte", b""), ""),
        ("text", "x.pte", user_file("x.pte"), ""),
        ("fake-header", "x.pte", random_bytes("x.pte", head=b"\x1c\x00\x00\x00ET12"), ""),
        ("wrong-model", "wrong.pte", None, ""),
        ("stages-random", "x.pte", _all(random_bytes("x.text.pte"), random_bytes("x.visual.pte", seed=2)), ""),
    ]
    mlpackages = [
        ("random", "x.mlpackage",
         _all(random_bytes("x.mlpackage/Manifest.json"),
              random_bytes("x.mlpackage/Data/com.apple.CoreML/model.mlmodel", seed=2)), ""),
        ("truncated", "x.mlpackage", _all(copy_of("wrong.mlpackage", "x.mlpackage"),
                                          half_of("x.mlpackage/Data/com.apple.CoreML/model.mlmodel")), ""),
        ("no-model", "x.mlpackage", _all(copy_of("wrong.mlpackage", "x.mlpackage"),
                                         delete("x.mlpackage/Data")), ""),
        ("empty-folder", "x.mlpackage", empty_folder("x.mlpackage"), ""),
        ("a-file", "x.mlpackage", random_bytes("x.mlpackage"), ""),
        ("wrong-model", "wrong.mlpackage", None, ""),
    ]  # fmt: skip
    # (a Core ML case costs ~20 s of coremltools import: the four the contract names, and a wrong model for parity)
    parity_pte = ("random", "truncated", "empty", "text", "wrong-model")
    segment_pte = ("random", "truncated", "empty", "text", "wrong-model", "fake-header", "stages-random")
    parity_coreml = ("random", "truncated", "wrong-model")
    segment_coreml = ("random", "truncated", "empty-folder")
    cases = []
    for what, path, setup, xfail in pte_files:
        name = path.replace(".", r"\.")
        if what == "stages-random":
            name = r"x\.(text|visual)\.pte"
        if what in parity_pte:
            cases.append(
                Case(
                    f"parity-pte-{what}",
                    k,
                    (*PAR, "--pte", path),
                    Expect(message=name),
                    setup,
                    ("art", "refer", "wrong_pte"),
                    xfail=xfail,
                    cost=3,
                )
            )
        if what in segment_pte:
            cases.append(
                Case(
                    f"segment-pte-{what}",
                    k,
                    (*SEG, "--backend", "pte", "--pte", path),
                    Expect(message=name),
                    setup,
                    ("photo", "wrong_pte"),
                    xfail=xfail,
                    cost=1.5,
                )
            )
    for what, path, setup, xfail in mlpackages:
        name = path.replace(".", r"\.")
        if what in parity_coreml:
            cases.append(
                Case(
                    f"parity-coreml-{what}",
                    k,
                    (*PAR, "--coreml", path),
                    Expect(message=name),
                    setup,
                    ("art", "refer", "wrong_mlpackage"),
                    xfail=xfail,
                    cost=5,
                )
            )
        if what in segment_coreml:
            cases.append(
                Case(
                    f"segment-coreml-{what}",
                    k,
                    (*SEG, "--backend", "coreml-interp", "--coreml", path),
                    Expect(message=name),
                    setup,
                    ("photo", "wrong_mlpackage"),
                    xfail=xfail,
                    cost=4,
                )
            )
    return cases


def _late_failure() -> list[Case]:
    k = "late failure"
    notes = user_file("notes.txt")
    long_name = "a" * 300
    e = lambda message, **kw: Expect(message=message, max_seconds=FAST, **kw)
    under = r"notes\.txt.* (is a file|not a folder)"
    cases = [
        Case("calibrate-out-under-a-file", k, (*CAL, "--out", "notes.txt/art"), e(under, survives=("notes.txt",)),
             notes, ("refer",)),
        Case("train-out-under-a-file", k, (*TRAIN, "--out", "notes.txt/run"), e(under, survives=("notes.txt",)),
             notes, ("refer",)),
        Case("analyze-out-under-a-file", k, (*ANA, "--quantized", "art", "--out", "notes.txt/s"), e(under),
             notes, ("refer", "art"), cost=2),
        Case("export-pte-out-under-a-file", k, (*PTE, "--quantized", "art", "--out", "notes.txt/m.pte"), e(under),
             notes, ("art",)),
        Case("export-coreml-out-under-a-file", k, (*CML, "--quantized", "art", "--out", "notes.txt/m.mlpackage"),
             e(under), notes, ("art",)),
        Case("segment-out-under-a-file", k, (*SEG, "--out", "notes.txt/o.png"), e(under), notes, ("photo",)),
        Case("parity-out-under-a-file", k, (*PAR, "--pte", "wrong.pte", "--out", "notes.txt/r.json"), e(under),
             notes, ("art", "refer", "wrong_pte"), cost=2),
        Case("demo-out-under-a-file", k, (*DEMO, "--out", "notes.txt/demo"), e(under), notes, ("refer",)),
        Case("synth-out-under-a-file", k, (*SYNTH, "--out", "notes.txt/d"), e(under), notes),
        Case("export-pte-wrong-suffix", k, (*PTE, "--quantized", "art", "--out", "m.bin"), e(r"--out m\.bin.*\.pte"),
             None, ("art",)),
        Case("export-coreml-wrong-suffix", k, (*CML, "--quantized", "art", "--out", "m.mlmodel"),
             e(r"--out m\.mlmodel.*\.mlpackage"), None, ("art",)),
        Case("segment-wrong-suffix", k, (*SEG, "--out", "o.jpg"), e(r"--out o\.jpg.*\.png"), None, ("photo",)),
        Case("parity-wrong-suffix", k, (*PAR, "--pte", "wrong.pte", "--out", "r.txt"), e(r"--out r\.txt.*\.json"),
             None, ("art", "refer", "wrong_pte"), cost=2),
        Case("export-pte-out-empty-folder", k, (*PTE, "--quantized", "art", "--out", "m.pte"),
             e(r"--out m\.pte is a folder"), empty_folder("m.pte"), ("art",)),
        Case("segment-out-empty-folder", k, (*SEG, "--out", "o.png"), e(r"--out o\.png is a folder"),
             empty_folder("o.png"), ("photo",)),
        Case("calibrate-out-broken-link", k, (*CAL, "--out", "art2"), e(r"--out art2 is a broken link"),
             symlink("art2", "nowhere"), ("refer",)),
        Case("train-out-parent-broken-link", k, (*TRAIN, "--out", "gone/run"), e(r"--out gone/run: gone is a broken"),
             symlink("gone", "nowhere"), ("refer",)),
        Case("calibrate-out-name-too-long", k, (*CAL, "--out", long_name), e(r"a{20}.*file name too long"), None, ("refer",)),
        Case("segment-out-name-too-long", k, (*SEG, "--out", long_name + ".png"), e(r"a{20}.*file name too long"), None,
             ("photo",)),
        Case("calibrate-out-read-only-parent", k, (*CAL, "--out", "ro/art"), e(r"--out ro/art: no permission"),
             read_only_folder("ro"), ("refer",), skip=not_root),
        Case("export-pte-out-read-only-parent", k, (*PTE, "--quantized", "art", "--out", "ro/m.pte"),
             e(r"--out ro/m\.pte: no permission"), read_only_folder("ro"), ("art",), skip=not_root),
        Case("segment-out-read-only-parent", k, (*SEG, "--out", "ro/o.png"), e(r"--out ro/o\.png: no permission"),
             read_only_folder("ro"), ("photo",), skip=not_root),
        Case("demo-out-read-only-parent", k, (*DEMO, "--out", "ro/demo"), e(r"--out ro/demo: no permission"),
             read_only_folder("ro"), ("refer",), skip=not_root),
        Case("export-pte-quantized-missing", k, (*PTE, "--quantized", "nope", "--out", "m.pte"),
             e(r"--quantized nope")),
        Case("export-coreml-quantized-missing", k, (*CML, "--quantized", "nope", "--out", "m.mlpackage"),
             e(r"--quantized nope")),
        Case("export-pte-quantized-is-refer-root", k, (*PTE, "--quantized", "d", "--out", "m.pte"),
             e(r"\bd is not a calibrated model"), None, ("refer",)),
        Case("parity-pte-missing", k, (*PAR, "--pte", "nope.pte"), e(r"--pte nope\.pte"), None, ("refer",)),
        Case("segment-pte-missing", k, (*SEG, "--backend", "pte", "--pte", "nope.pte"), e(r"--pte nope\.pte"), None,
             ("photo",)),
        Case("train-data-root-missing", k, ("train", "--data-root", "nope", "--out", "run", "--steps", "1"),
             e(r"nope")),
        Case("evaluate-image-dir-missing", k, (*EVAL, "--image-dir", "nope"), e(r"nope.*--image-dir"), None,
             ("refer",)),
    ]  # fmt: skip
    return cases


ART_EDITS: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (setup editing art/, regex the error must match)
    "recipe-bits": (edit_json("art/config.json", _set_recipe(weight_bits=4, act_bits=4)), r"art/config\.json"),
    "method-unknown": (edit_json("art/config.json", _set_recipe(method="banana")), r"art/config\.json"),
    "qparams-edited": (edit_json("art/qparams.json", lambda q: q.update(edited=True)), r"art/qparams\.json"),
    "weights-truncated": (half_of("art/model.safetensors"), r"art/model\.safetensors"),
    "weights-deleted": (delete("art/model.safetensors"), r"model\.safetensors is missing"),
    "qparams-deleted": (delete("art/qparams.json"), r"qparams\.json is missing"),
    "calibration-inputs-deleted": (delete("art/calibration_inputs.safetensors"), r"calibration_inputs\.safetensors"),
    "manifest-deleted": (delete("art/ptq4ris-manifest.json"), r"art is not a calibrated model"),
    "manifest-not-json": (user_file("art/ptq4ris-manifest.json"), r"art is not a calibrated model"),
    "format-version-1": (edit_json("art/ptq4ris-manifest.json", lambda m: m.update(format_version=1)),
                         r"art has format version 1"),
    "method-unknown-rehashed": (_all(edit_json("art/config.json", _set_recipe(method="banana")),
                                     rehash("art", "config.json")), r"art/config\.json"),
    "bits-rehashed": (_all(edit_json("art/config.json", _set_recipe(weight_bits=4, act_bits=4)),
                           rehash("art", "config.json")), r"art/config\.json"),
    "weights-truncated-rehashed": (_all(half_of("art/model.safetensors"), rehash("art", "model.safetensors")),
                                   r"art/model\.safetensors"),
    "weights-other-model-rehashed": (_all(safetensors_file("art/model.safetensors"),
                                          rehash("art", "model.safetensors")), r"art/model\.safetensors"),
    "config-not-json-rehashed": (_all(user_file("art/config.json"), rehash("art", "config.json")),
                                 r"art/config\.json"),
    "config-no-sites-rehashed": (_all(edit_json("art/config.json", lambda c: c.pop("sites")),
                                      rehash("art", "config.json")), r"art/config\.json"),
    "calibration-inputs-truncated-rehashed": (_all(half_of("art/calibration_inputs.safetensors"),
                                                   rehash("art", "calibration_inputs.safetensors")),
                                              r"art/calibration_inputs\.safetensors"),
}  # fmt: skip


def _silent_wrong_input() -> list[Case]:
    k = "silent wrong input"
    consumers = {
        "evaluate": (("evaluate", "--quantized", "art", "--refer-root", "d", "--limit", "2"), ("art", "refer")),
        "segment": ((*SEG, "--quantized", "art"), ("art", "photo")),
        "analyze": ((*ANA, "--quantized", "art", "--out", "s"), ("art", "refer")),
        "export-pte": ((*PTE, "--quantized", "art", "--out", "m.pte"), ("art",)),
        "export-coreml": ((*CML, "--quantized", "art", "--out", "m.mlpackage"), ("art",)),
        "parity": ((*PAR, "--pte", "wrong.pte"), ("art", "refer", "wrong_pte")),
    }
    plan = {
        "evaluate": ["recipe-bits", "weights-truncated", "manifest-deleted", "method-unknown-rehashed",
                     "bits-rehashed", "weights-truncated-rehashed", "weights-other-model-rehashed",
                     "config-not-json-rehashed"],
        "segment": ["method-unknown", "qparams-edited", "qparams-deleted", "format-version-1"],
        "analyze": ["weights-deleted"],
        "export-pte": ["calibration-inputs-deleted", "calibration-inputs-truncated-rehashed"],
        "export-coreml": ["manifest-not-json"],
        "parity": ["recipe-bits"],
    }  # fmt: skip
    cases = []
    for command, edits in plan.items():
        argv, needs = consumers[command]
        for edit in edits:
            setup, message = ART_EDITS[edit]
            cases.append(Case(f"{command}-quantized-{edit}", k, argv, Expect(message=message), setup, needs,
                              cost=2))  # fmt: skip
    sentences = {
        "zero-width-only": "\u200b\u200c\u200d\u2060",
        "control-only": "\x01\x02\x1b\x7f",
        "empty": "",
        "accents-only": "\u0301\u0301\u0301",
    }
    for what, text in sentences.items():
        cases.append(Case(f"segment-text-{what}", k, ("segment", "--image", "photo.png", "--text", text),
                          Expect(message=r"expression|--text"), None, ("photo",)))  # fmt: skip
    images = {
        "16-bit-png": ("grey16.png", _sixteen_bit),
        "palette-transparent-png": ("palette.png", _palette_transparent),
        "cmyk-jpeg": ("cmyk.jpg", _cmyk),
    }
    for what, (name, convert) in images.items():
        cases.append(Case(f"segment-image-{what}", k, ("segment", "--image", name, "--text", CENTER,
                                                       "--out", "o.png"),
                          Expect(code=0, stdout=CENTER_MASK + r".*written o\.png"),
                          image_variant(name, convert), ("photo",), cost=2))  # fmt: skip
    cases += [
        Case(
            "evaluate-refs-annotation-of-another-image",
            k,
            EVAL,
            Expect(message=r"refs\(unc\)\.p: ref \d+ names annotation"),
            edit_refs(lambda refs: _first_val(refs).update(ann_id=1)),
            ("refer",),
        ),
        Case(
            "calibrate-calib-size-over-split",
            k,
            (*CAL[:-4], "--calib-size", "100000", "--out", "c"),
            Expect(message=r"--calib-size"),
            None,
            ("refer",),
        ),
        Case(
            "evaluate-split-by-google-on-shapesref",
            k,
            (*EVAL, "--split-by", "google"),
            Expect(message=r"--split-by"),
            None,
            ("refer",),
        ),
    ]
    return cases


def _tracebacks() -> list[Case]:
    k = "traceback for a user error"
    refs_file = "d/shapesref/refs(unc).p"
    instances = "d/shapesref/instances.json"
    refs_re = r"d/shapesref/refs\(unc\)\.p"
    inst_re = r"d/shapesref/instances\.json"
    cases = []
    checkpoints = {
        "safetensors-truncated": ("w.safetensors", safetensors_file("w.safetensors", truncate=100), r"w\.safetensors"),
        "safetensors-garbage": ("w.safetensors", random_bytes("w.safetensors"), r"w\.safetensors"),
        "safetensors-other-model": ("w.safetensors", safetensors_file("w.safetensors"), r"weight|w\.safetensors"),
        "pth-truncated": ("w.pth", pth_file("w.pth", truncate=300), r"w\.pth"),
        "pth-garbage": ("w.pth", random_bytes("w.pth"), r"w\.pth"),
        "pth-text": ("w.pth", user_file("w.pth"), r"w\.pth"),
        "pth-empty": ("w.pth", user_file("w.pth", b""), r"w\.pth"),
        "pth-list": ("w.pth", pth_file("w.pth", obj=[1, 2, 3]), r"w\.pth|checkpoint"),
        "pth-malicious-pickle": ("w.pth", user_file("w.pth", EVIL_PICKLE), r"w\.pth"),
        "missing": ("nope.pth", None, r"nope\.pth"),
    }
    plan = {
        "evaluate": (EVAL, ("refer",), ["safetensors-truncated", "safetensors-other-model", "pth-truncated",
                                        "pth-garbage", "pth-list", "pth-malicious-pickle", "missing"]),
        "segment": (SEG, ("photo",), ["safetensors-truncated"]),
        "calibrate": ((*CAL, "--out", "c"), ("refer",), ["pth-garbage"]),
    }  # fmt: skip
    for command, (argv, needs, which) in plan.items():
        for what in which:
            path, setup, message = checkpoints[what]
            absent = ("pwned",) if "malicious" in what else ()
            cases.append(Case(f"{command}-checkpoint-{what}", k, (*argv, "--checkpoint", path),
                              Expect(message=message, absent=absent), setup, needs))  # fmt: skip
    data_edits = {
        "instances-binary-garbage": (random_bytes(instances), inst_re),
        "instances-top-level-list": (user_file(instances, b"[]"), inst_re),
        "instances-no-annotations": (edit_instances(lambda d: _del(d, "annotations")), inst_re + r".*annotations"),
        "instances-annotation-without-image-id": (edit_instances(lambda d: _del(d["annotations"][0], "image_id")),
                                                  inst_re + r".*image_id"),
        "instances-image-without-file-name": (edit_instances(lambda d: _del(d["images"][0], "file_name")),
                                              inst_re + r".*file_name"),
        "instances-segmentation-bad-polygon": (edit_first_val_annotation(
            lambda a: a.update(segmentation=[["a", "b", "c"]])), inst_re + r".*annotation \d+"),
        "refs-top-level-dict": (edit_refs(lambda refs: {"refs": refs}), refs_re + r".*list"),
        "refs-ref-without-sentences": (edit_refs(lambda refs: _del(_first_val(refs), "sentences")),
                                       refs_re + r": ref \d+ has no sentences"),
        "refs-ref-with-empty-sentences": (edit_refs(lambda refs: _first_val(refs).update(sentences=[])),
                                          refs_re + r": ref \d+ has no sentences"),
        "refs-sentence-without-text": (edit_refs(lambda refs: _del(_first_val(refs)["sentences"][0], "sent")),
                                       refs_re + r": ref \d+ has a sentence"),
        "refs-ref-without-ann-id": (edit_refs(lambda refs: _del(_first_val(refs), "ann_id")),
                                    refs_re + r": ref \d+ has no 'ann_id'"),
        "refs-dangling-annotation": (edit_refs(lambda refs: _first_val(refs).update(ann_id=10**9)),
                                     refs_re + r": ref \d+ names annotation 1000000000"),
        "refs-dangling-image": (edit_refs(lambda refs: _first_val(refs).update(image_id=10**9)),
                                refs_re + r": ref \d+ names image 1000000000"),
        "refs-text-file": (user_file(refs_file), refs_re),
        "refs-malicious-pickle": (user_file(refs_file, EVIL_PICKLE), refs_re),
        "refs-missing": (delete(refs_file), refs_re),
        "image-file-missing": (lambda tmp: first_val_image(tmp).unlink(), r"d/images/shapesref/shapesref_val_"),
        "image-file-corrupt": (lambda tmp: first_val_image(tmp).write_bytes(b"not a png"),
                               r"d/images/shapesref/shapesref_val_"),
    }  # fmt: skip
    for what, (setup, message) in data_edits.items():
        absent = ("pwned",) if "malicious" in what else ()
        cases.append(Case(f"evaluate-{what}", k, EVAL, Expect(message=message, absent=absent), setup, ("refer",)))
    for what in ("refs-ref-without-sentences",):
        setup, message = data_edits[what]
        cases.append(Case(f"calibrate-{what}", k, (*CAL, "--out", "c"), Expect(message=message), setup, ("refer",)))
    cases += [
        Case("segment-text-not-utf8", k, ("segment", "--image", "photo.png", "--text", b"the \xff\xfe cat"),
             Expect(message=r"--text .*UTF-8"), None, ("photo",)),
        Case("evaluate-device-cuda", k, (*EVAL, "--device", "cuda"), Expect(message=r"--device cuda"), None,
             ("refer",), skip=_cuda_present),
        Case("train-device-cuda", k, (*TRAIN, "--out", "run", "--device", "cuda"), Expect(message=r"--device cuda"),
             None, ("refer",), skip=_cuda_present),
        Case("calibrate-device-banana", k, (*CAL, "--out", "c", "--device", "banana"),
             Expect(message=r"--device 'banana'"), None, ("refer",)),
        Case("segment-image-missing", k, ("segment", "--image", "nope.jpg", "--text", "the cat"),
             Expect(message=r"--image nope\.jpg")),
        Case("segment-image-a-folder", k, ("segment", "--image", "pics", "--text", "the cat"),
             Expect(message=r"--image pics: a folder"), user_folder("pics")),
        Case("segment-image-text-file", k, ("segment", "--image", "notes.jpg", "--text", "the cat"),
             Expect(message=r"notes\.jpg"), user_file("notes.jpg")),
        Case("segment-image-truncated-png", k, ("segment", "--image", "cut.png", "--text", "the cat"),
             Expect(message=r"cut\.png"), copy_of("photo.png", "cut.png", truncate=2000), ("photo",)),
        Case("segment-image-14000-squared", k, ("segment", "--image", "huge.png", "--text", "the cat", "--out", "o.png"),
             Expect(code=0, stdout=r"mask covers", max_rss_mb=1800), None, ("huge_png",), cost=4),
        Case("segment-model-unknown", k, (*SEG, "--model", "lavt-huge"), Expect(message=r"lavt-huge"), None,
             ("photo",)),
        Case("calibrate-model-unknown", k, (*CAL, "--out", "c", "--model", "lavt-huge"),
             Expect(message=r"lavt-huge"), None, ("refer",)),
        Case("evaluate-lavt-b-without-checkpoint", k, (*EVAL, "--model", "lavt-b"),
             Expect(message=r"--checkpoint"), None, ("refer",)),
        Case("calibrate-random-weights-with-checkpoint", k,
             (*CAL, "--out", "c", "--random-weights", "--checkpoint", "w.pth"),
             Expect(message=r"--random-weights and --checkpoint"), pth_file("w.pth"), ("refer",)),
        Case("evaluate-refer-root-missing", k, ("evaluate", "--refer-root", "nope", "--limit", "2"),
             Expect(message=r"nope")),
        Case("calibrate-refer-root-missing", k, (*CAL[:5], "--refer-root", "nope", "--out", "c"),
             Expect(message=r"nope")),
        Case("evaluate-refcoco-without-data", k, (*EVAL, "--dataset", "refcoco"),
             Expect(message=r"refcoco.*--refer-root"), None, ("refer",)),
        Case("evaluate-split-unknown", k, (*EVAL, "--split", "bogus"), Expect(message=r"bogus"), None, ("refer",)),
        Case("calibrate-split-unknown", k, (*CAL, "--out", "c", "--calib-split", "bogus"), Expect(message=r"bogus"),
             None, ("refer",)),
        Case("evaluate-text-encoder-env-missing", k, EVAL, Expect(message=r"PTQ4RIS_TEXT_ENCODER"), None,
             ("refer",), env=(("PTQ4RIS_TEXT_ENCODER", "nope"),)),
        Case("segment-backend-pte-without-pte", k, (*SEG, "--backend", "pte"), Expect(message=r"--pte"), None,
             ("photo",)),
        Case("parity-arm-with-coreml", k, (*PAR, "--coreml", "wrong.mlpackage", "--arm"), Expect(message=r"--arm"),
             None, ("wrong_mlpackage",)),
        Case("parity-first-divergence-with-pte", k, (*PAR, "--pte", "wrong.pte", "--first-divergence"),
             Expect(message=r"--first-divergence"), None, ("wrong_pte",)),
        # the debug switch: a user's mistake shows its traceback when asked for, and only then
        Case("debug-flag-shows-traceback", k, ("--debug", "segment", "--image", "nope.jpg", "--text", "the cat"),
             Expect(message=r"--image nope\.jpg", traceback=True, one_line=False)),
        Case("debug-env-shows-traceback", k, (*EVAL, "--model", "lavt-huge"),
             Expect(message=r"lavt-huge", traceback=True, one_line=False), None, ("refer",),
             env=(("PTQ4RIS_DEBUG", "1"),)),
    ]  # fmt: skip
    return cases


def _cuda_present() -> str:
    try:
        import torch
    except ImportError:
        return ""
    return "this machine has CUDA" if torch.cuda.is_available() else ""


def _resources() -> list[Case]:
    k = "resources"
    long_sentence = ("the small red circle left of the big blue square " * 600)[:28000]
    longer = ("the leftmost green triangle below the yellow diamond " * 2400)[:120000]
    return [
        Case("segment-sentence-28kb", k, ("segment", "--image", "photo.png", "--text", long_sentence, "--out", "o.png"),
             Expect(code=0, stdout=r"mask covers", max_stderr_bytes=500), None, ("photo",), cost=2),
        Case("segment-sentence-120kb", k, ("segment", "--image", "photo.png", "--text", longer, "--out", "o.png"),
             Expect(code=0, stdout=r"mask covers", max_stderr_bytes=500), None, ("photo",), cost=2),
        Case("segment-large-jpeg-photo", k, ("segment", "--image", "big.jpg", "--text", CENTER, "--out", "o.png"),
             Expect(code=0, stdout=CENTER_MASK, max_rss_mb=1500), None, ("big_jpeg",), cost=3),  # 7.8 GB before
        Case("segment-image-over-pixel-limit", k, ("segment", "--image", "bomb.png", "--text", "the cat"),
             Expect(message=r"bomb\.png .*megapixels", max_seconds=FAST), None, ("bomb_png",)),
        Case("evaluate-batch-size-huge", k, (*EVAL, "--batch-size", "1000000", "--json"),
             Expect(code=0, stdout=r'"pairs": 2', max_rss_mb=1000), None, ("refer",), cost=2),
        Case("synth-workers-huge", k, ("data", "synth", "--out", "new", "--splits", "val", "--val-scenes", "3",
                                       "--workers", "100000"),
             Expect(code=0, stdout=r"ShapesRef written", max_seconds=60), skip=workers_capped),
    ]  # fmt: skip


def _flags() -> list[Case]:
    k = "flags"
    zero_or_negative = [
        ("calibrate", (*CAL, "--out", "c"), "--chunk-size", "0"),
        ("calibrate", (*CAL, "--out", "c"), "--calib-size", "0"),
        ("calibrate", (*CAL, "--out", "c"), "--calib-size", "-3"),
        ("calibrate", (*CAL, "--out", "c"), "--text-groups", "-1"),
        ("calibrate", (*CAL, "--out", "c"), "--text-tiers", "-1"),
        ("calibrate", (*CAL, "--out", "c"), "--pwam-groups", "-2"),
        ("calibrate", (*CAL, "--out", "c"), "--everyday-expressions", "-1"),
        ("calibrate", (*CAL, "--out", "c", "--bits", "w4a8"), "--budget-size", "0"),
        ("calibrate", (*CAL, "--out", "c", "--bits", "w4a8"), "--budget-size", "-0.2x"),
        ("analyze", (*ANA, "--quantized", "art"), "--sqnr-pairs", "0"),
        ("analyze", (*ANA, "--quantized", "art"), "--limit", "0"),
        ("train", (*TRAIN, "--out", "run"), "--batch-size", "0"),
        ("train", (*TRAIN, "--out", "run"), "--steps", "0"),
        ("train", (*TRAIN, "--out", "run"), "--steps", "-5"),
        ("train", (*TRAIN, "--out", "run"), "--save-every", "0"),
        ("train", (*TRAIN, "--out", "run"), "--lr", "0"),
        ("train", (*TRAIN, "--out", "run"), "--lr", "nan"),
        ("train", (*TRAIN, "--out", "run"), "--lr", "-1e-3"),
        ("train", (*TRAIN, "--out", "run"), "--lr", "inf"),
        ("train", (*TRAIN, "--out", "run"), "--max-minutes", "0"),
        ("evaluate", EVAL, "--batch-size", "0"),
        ("evaluate", EVAL, "--limit", "0"),
        ("evaluate", EVAL, "--limit", "-1"),
        ("parity", (*PAR, "--pte", "wrong.pte"), "--limit", "0"),
        ("synth", (*SYNTH, "--out", "d"), "--workers", "0"),
        ("synth", (*SYNTH, "--out", "d"), "--train-scenes", "0"),
        ("synth", (*SYNTH, "--out", "d"), "--val-scenes", "-5"),
        ("synth", (*SYNTH, "--out", "d"), "--testA-scenes", "zero"),
        ("demo", (*DEMO, "--out", "demo"), "--limit", "0"),
        ("demo", (*DEMO, "--out", "demo"), "--coreml-limit", "0"),
        ("demo", (*DEMO, "--out", "demo"), "--arm-limit", "0"),
    ]
    cases = []
    for command, argv, flag, value in zero_or_negative:
        cases.append(Case(f"{command}-{flag.lstrip('-')}-{value.lstrip('-')}{'-negative' if value.startswith('-') else ''}",
                          k, (*argv, flag, value), Expect(message=re.escape(flag), max_seconds=5)))  # fmt: skip
    unknown_choices = [
        ("calibrate", (*CAL, "--out", "c"), "--bits", "w3a3"),
        ("calibrate", (*CAL, "--out", "c"), "--method", "banana"),
        ("calibrate", (*CAL, "--out", "c"), "--objective", "speed"),
        ("calibrate", (*CAL, "--out", "c"), "--pwam", "fused"),
        ("calibrate", (*CAL, "--out", "c"), "--refresh", "epoch"),
        ("evaluate", EVAL, "--dataset", "coco"),
        ("evaluate", EVAL, "--split-by", "random"),
        ("segment", SEG, "--backend", "onnx"),
        ("export-pte", ("export-pte", "--quantized", "art", "--out", "m.pte"), "--stages", "all"),
        ("export-pte", ("export-pte", "--quantized", "art", "--out", "m.pte"), "--output-observer", "max"),
        ("export-coreml", ("export-coreml", "--quantized", "art", "--out", "m.mlpackage"), "--target", "iOS16"),
        ("export-coreml", ("export-coreml", "--quantized", "art", "--out", "m.mlpackage"), "--precision", "int8"),
        ("synth", ("data", "synth", "--out", "d"), "--splits", "test"),
    ]
    for command, argv, flag, value in unknown_choices:
        cases.append(Case(f"{command}-{flag.lstrip('-')}-unknown", k, (*argv, flag, value),
                          Expect(message=re.escape(flag) + r".*invalid choice", max_seconds=5)))  # fmt: skip
    cases += [
        Case("demo-bits-unknown", k, (*DEMO, "--out", "demo", "--bits", "w3a3"), Expect(message=r"--bits.*w3a3")),
        Case(
            "demo-compare-bits-unknown",
            k,
            (*DEMO, "--out", "demo", "--compare-bits", "fp8"),
            Expect(message=r"--compare-bits.*fp8"),
        ),
    ]
    # A size budget is checked against the model's smallest program before any data is read.
    cases += [
        Case("calibrate-budget-size-below-smallest-program", k, (*CAL, "--out", "c", "--bits", "w4a8", "--budget-size", "1"),
             Expect(message=r"--budget-size 1\.00 MB: the smallest w4a8 program .* MB", absent=("c",), max_seconds=FAST)),
        Case("calibrate-budget-size-with-8-bit-weights", k, (*CAL, "--out", "c", "--budget-size", "0.2x"),
             Expect(message=r"--budget-size .*--bits w4a8", absent=("c",), max_seconds=FAST)),
        Case("calibrate-budget-size-not-a-size", k, (*CAL, "--out", "c", "--bits", "w4a8", "--budget-size", "16MB"),
             Expect(message=r"--budget-size.*16MB", absent=("c",), max_seconds=5)),
    ]  # fmt: skip
    missing = [
        ("no-command", ()),
        ("data-no-subcommand", ("data",)),
        ("unknown-command", ("frobnicate",)),
        ("evaluate-unknown-flag", (*EVAL, "--frobnicate")),
        ("train-without-out", ("train", "--data-root", "d")),
        ("calibrate-without-out", CAL),
        ("analyze-without-quantized", ANA),
        ("export-pte-without-quantized", ("export-pte", "--out", "m.pte")),
        ("export-pte-without-out", ("export-pte", "--quantized", "art")),
        ("export-coreml-without-out", ("export-coreml", "--quantized", "art")),
        ("parity-without-program", ("parity", "--quantized", "art")),
        ("parity-without-quantized", ("parity", "--pte", "m.pte")),
        ("parity-pte-and-coreml", ("parity", "--quantized", "art", "--pte", "m.pte", "--coreml", "m.mlpackage")),
        ("segment-without-image", ("segment", "--text", "the cat")),
        ("segment-without-text", ("segment", "--image", "photo.png")),
        ("segment-text-without-value", ("segment", "--image", "photo.png", "--text")),
        ("calibrate-seed-not-a-number", (*CAL, "--out", "c", "--seed", "one")),
    ]
    names = {
        "no-command": r"COMMAND", "data-no-subcommand": r"SUBCOMMAND", "unknown-command": r"frobnicate",
        "evaluate-unknown-flag": r"--frobnicate", "train-without-out": r"--out", "calibrate-without-out": r"--out",
        "analyze-without-quantized": r"--quantized", "export-pte-without-quantized": r"--quantized",
        "export-pte-without-out": r"--out", "export-coreml-without-out": r"--out",
        "parity-without-program": r"--pte.*--coreml", "parity-without-quantized": r"--quantized",
        "parity-pte-and-coreml": r"--coreml.*--pte|--pte.*--coreml", "segment-without-image": r"--image",
        "segment-without-text": r"--text", "segment-text-without-value": r"--text",
        "calibrate-seed-not-a-number": r"--seed",
    }  # fmt: skip
    for what, argv in missing:
        cases.append(Case(f"flags-{what}", k, argv, Expect(message=names[what], max_seconds=5)))
    return cases


def all_cases() -> list[Case]:
    cases = _data_loss() + _process_abort() + _late_failure() + _silent_wrong_input() + _tracebacks()
    cases += _resources() + _flags()
    ids = Counter(c.id for c in cases)
    duplicated = [i for i, n in ids.items() if n > 1]
    if duplicated:
        raise ValueError(f"duplicated case ids: {duplicated}")
    return cases


CASES = all_cases()


# ---- the runner --------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    id: str
    code: int | None = None  # None: timed out or not run
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    rss_mb: float = 0.0
    cpu_seconds: float = 0.0  # user + system time of the child
    changed: list[str] = field(default_factory=list)  # survivors whose content changed
    leftovers: list[str] = field(default_factory=list)  # paths matching an ``absent`` pattern
    timed_out: bool = False
    skipped: str = ""
    setup_error: str = ""


def _redact(text: str, tmp: Path, fixtures: Path) -> str:
    for path, name in ((tmp, "TMP"), (fixtures, "FIXTURES"), (REPO, "REPO"), (Path(sys.prefix), "VENV"),
                       (Path(tempfile.gettempdir()), "TMPDIR"), (Path.home(), "HOME")):  # fmt: skip
        text = text.replace(str(path), name)
    return text


def _read(path: Path) -> str:
    """A child's output as written: carriage returns kept (a progress bar redraws its line with them)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return f.read()


def _copy_fixture(fixtures: Path, name: str, tmp: Path) -> None:
    src = fixtures / FIXTURES[name]
    dst = tmp / FIXTURES[name]
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst)


def run_case(case: Case, fixtures: Path, workdir: Path, keep: bool = False) -> Result:
    """Play one case in ``workdir/<id>`` and judge nothing: return what happened."""
    result = Result(case.id)
    reason = case.skip() if case.skip else ""
    if reason:
        result.skipped = reason
        return result
    tmp = workdir / case.id
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for name in case.needs:
            _copy_fixture(fixtures, name, tmp)
        if case.setup:
            case.setup(tmp)
        before = {p: _snapshot(tmp / p) for p in case.expect.survives}
    except Exception as e:  # noqa: BLE001 (a broken case, reported as such)
        result.setup_error = f"{type(e).__name__}: {e}"
        return result
    argv = [sys.executable, "-m", "ptq4ris", *case.command]  # a bytes argument reaches the child as those bytes
    out_path, err_path = workdir / f"{case.id}.stdout", workdir / f"{case.id}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.monotonic()
        child = subprocess.Popen(argv, cwd=tmp, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                 env=_child_env(case.env), start_new_session=True)  # fmt: skip
        interrupted = False
        peak_kb = 0
        while True:
            peak_kb = max(peak_kb, _high_water_kb(child.pid))
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.monotonic() - start
            if not interrupted and case.interrupt and case.interrupt(tmp, child.pid, _read(err_path)):
                time.sleep(0.5)
                os.killpg(child.pid, signal.SIGINT)
                interrupted = True
            if elapsed > case.timeout:
                os.killpg(child.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(child.pid, 0)
                result.timed_out = True
                break
            time.sleep(0.05)
        result.seconds = time.monotonic() - start
        child.returncode = os.waitstatus_to_exitcode(status)
    result.code = None if result.timed_out else child.returncode
    # The child's own high-water mark: ru_maxrss would also count the runner's memory the child inherited at fork
    # (a test process holding models is gigabytes), so it serves only where /proc cannot be read.
    result.rss_mb = (peak_kb or usage.ru_maxrss) / 1024
    result.cpu_seconds = usage.ru_utime + usage.ru_stime
    result.stdout = _redact(_read(out_path), tmp, fixtures)
    result.stderr = _redact(_read(err_path), tmp, fixtures)
    result.changed = [p for p, snap in before.items() if _snapshot(tmp / p) != snap]
    result.leftovers = sorted(str(p.relative_to(tmp)) for pattern in case.expect.absent for p in tmp.glob(pattern))
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in (out_path, err_path):
            p.unlink(missing_ok=True)
    return result


def _high_water_kb(pid: int) -> int:
    """Peak resident memory of the running process ``pid`` since its exec (VmHWM), 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_cases(cases: Iterable[Case], fixtures: Path, workdir: Path, jobs: int = 2,
              progress: Callable[[Case, Result], None] | None = None) -> dict[str, Result]:  # fmt: skip
    """Play ``cases`` ``jobs`` at a time, the costly ones first."""
    ordered = sorted(cases, key=lambda c: -c.cost)
    results: dict[str, Result] = {}
    lock = threading.Lock()

    def one(case: Case) -> None:
        r = run_case(case, fixtures, workdir)
        with lock:
            results[case.id] = r
            if progress:
                progress(case, r)

    # Ctrl-C reaches a child as in a terminal: a runner started as a background job has SIGINT ignored, and an
    # ignored signal stays ignored in its children (a handled one is reset to the default by exec).
    restore = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        restore = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ThreadPoolExecutor(jobs) as pool:
            for future in [pool.submit(one, c) for c in ordered]:
                future.result()
    finally:
        if restore is not None:
            signal.signal(signal.SIGINT, restore)
    return results


def shown_lines(text: str) -> list[str]:
    """The non-empty lines a terminal shows: a progress bar redrawn with carriage returns, then erased, is gone."""
    shown = (line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))
    return [line.strip() for line in shown if line.strip()]


def error_line(result: Result) -> str:
    lines = shown_lines(result.stderr)
    return lines[-1] if lines else ""


def problems(case: Case, r: Result) -> list[str]:
    """What is wrong with ``r`` as an outcome of ``case`` (empty: the case passes)."""
    e = case.expect
    if r.setup_error:
        return [f"the case's setup failed: {r.setup_error}"]
    if r.skipped:
        return []
    out = []
    if r.timed_out:
        out.append(f"still running after {case.timeout:.0f} s (killed)")
    elif r.code != e.code:
        out.append(f"exit {r.code}, expected {e.code}")
    lines = shown_lines(r.stderr)
    last = error_line(r)
    if e.traceback:
        if "Traceback (most recent call last)" not in r.stderr:
            out.append("no traceback although the debug switch is on")
    elif "Traceback" in r.stderr:
        out.append("a traceback on stderr")
    if e.code == 2:
        if not ERROR_LINE.search(last):
            out.append("the last stderr line is not 'ptq4ris...: error: ...'")
        if e.one_line and not e.traceback and len(lines) != 1:
            out.append(f"{len(lines)} non-empty stderr lines, expected 1")
    if e.message and not re.search(e.message, last):
        out.append(f"the error line does not match /{e.message}/")
    if e.stdout and not re.search(e.stdout, r.stdout):
        out.append(f"stdout does not match /{e.stdout}/")
    if r.changed:
        out.append(f"changed although they must survive: {', '.join(r.changed)}")
    if r.leftovers:
        out.append(f"present although they must not exist: {', '.join(r.leftovers)}")
    if e.max_seconds is not None and r.seconds > e.max_seconds:
        out.append(f"took {r.seconds:.1f} s, more than {e.max_seconds:.0f} s: the check must come before the work")
    if e.max_stderr_bytes is not None and len(r.stderr.encode()) > e.max_stderr_bytes:
        out.append(f"stderr is {len(r.stderr.encode())} bytes, over {e.max_stderr_bytes}")
    if e.max_rss_mb is not None and r.rss_mb > e.max_rss_mb:
        out.append(f"peak memory {r.rss_mb:.0f} MB, over {e.max_rss_mb:.0f} MB")
    return out


def status(case: Case, r: Result | None) -> str:
    if r is None:
        return "not run"
    if r.skipped:
        return "skipped"
    failing = bool(problems(case, r))
    if case.xfail:
        return "xfail" if failing else "XPASS"
    return "FAIL" if failing else "pass"


# ---- the document ------------------------------------------------------------------------------------------------------
DOC_INTRO = """# Reliability: bad inputs to the command line

The `ptq4ris` command line promises one behaviour for a user's mistake: it exits with status 2 and prints **one
line** on stderr, `ptq4ris...: error: ...`, that names the flag or the file and says how to fix it; no traceback
unless asked for (`--debug` or `PTQ4RIS_DEBUG=1`). A bug exits 1 with its traceback and a line saying it is a bug in
ptq4ris; Ctrl-C exits 130. Output paths are checked before any work, and nothing ptq4ris did not write (a folder
without its manifest of the same kind, a file of another kind) is ever replaced: the user's files below survive byte
for byte. A calibrated model folder carries a sha256 of each of its files and loading refuses an edited, truncated or
missing one by name.

Each row is one hostile case of `tests/bad_inputs.py`, played in a subprocess in a fresh temporary folder (`TMP`) and
asserted by `tests/test_bad_inputs.py`. Status: `pass`; `xfail` a known bug, reported, expected to fail until fixed;
`FAIL` a regression; `skipped` not playable on the machine that wrote this (e.g. a read-only folder as root).
Regenerate after changing the cases or the code:

    python tests/bad_inputs.py --write docs/reliability.md
"""


def _short_arg(arg: str | bytes) -> str:
    if isinstance(arg, bytes):
        return repr(arg)
    if len(arg) > 40:
        arg = f"{arg[:24]}…({len(arg)} chars)"
    if not arg.isprintable() or arg == "":
        return ascii(arg)
    return shlex.quote(arg)


# The shared leading flags of many cases, shown as "<command> …" in the document (listed under its table).
SHARED = {"calibrate": CAL, "parity": PAR, "analyze": ANA, "export-pte": PTE, "evaluate": EVAL, "segment": SEG,
          "train": TRAIN, "data synth": SYNTH, "demo": DEMO}  # fmt: skip


def short_command(case: Case, width: int = 100) -> str:
    argv = list(case.command)
    head = "ptq4ris"
    for name, prefix in SHARED.items():
        if len(prefix) > 1 and tuple(argv[: len(prefix)]) == prefix:
            head, argv = f"ptq4ris {name} …", argv[len(prefix) :]
            break
    text = " ".join([head, *(_short_arg(a) for a in argv)])
    return text if len(text) <= width else text[: width - 1] + "…"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def outcome(r: Result | None) -> str:
    if r is None:
        return "not run"
    if r.skipped:
        return f"skipped: {r.skipped}"
    if r.setup_error:
        return f"setup failed: {r.setup_error}"[:160]
    if r.timed_out:
        return f"killed after {r.seconds:.0f} s"
    message = (
        error_line(r)
        if r.code != 0
        else next((line.strip() for line in reversed(r.stdout.splitlines()) if line.strip()), "")
    )
    return f"exit {r.code}: {message[:120]}"


def write_doc(path: str | Path, cases: list[Case], results: dict[str, Result]) -> None:
    lines = [DOC_INTRO, "## Summary", "", "| class | cases | pass | xfail (known bug) | FAIL | skipped |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for klass in KLASSES:
        mine = [c for c in cases if c.klass == klass]
        count = Counter(status(c, results.get(c.id)) for c in mine)
        lines.append(f"| {klass} | {len(mine)} | {count['pass']} | {count['xfail']} | "
                     f"{count['FAIL'] + count['XPASS'] + count['not run']} | {count['skipped']} |")  # fmt: skip
    total = Counter(status(c, results.get(c.id)) for c in cases)
    lines.append(f"| **all** | {len(cases)} | {total['pass']} | {total['xfail']} | "
                 f"{total['FAIL'] + total['XPASS'] + total['not run']} | {total['skipped']} |")  # fmt: skip
    known = [c for c in cases if c.xfail]
    if known:
        lines += ["", "## Known bugs (xfail)", ""]
        for c in known:
            lines.append(f"- `{c.id}`: {c.xfail}")
    lines += ["", "## Cases", "", ("Commands are run in the case's folder; `<command> …` stands for the flags most cases of "
              "that command share:"), ""]  # fmt: skip
    lines += [
        f"- `ptq4ris {name} …` = `ptq4ris {' '.join(_short_arg(a) for a in prefix)}`" for name, prefix in SHARED.items()
    ]
    lines += ["", ("Status of a fail-fast case (a check before the work) shows its duration; outcome: exit status and "
              "the first 120 characters of the error line (or of the last line of output on success)."), "",
              "| class | case | command | status | outcome |", "|---|---|---|---|---|"]  # fmt: skip
    for klass in KLASSES:
        for c in (c for c in cases if c.klass == klass):
            r = results.get(c.id)
            seconds = f" ({r.seconds:.0f} s)" if r is not None and c.expect.max_seconds and r.code is not None else ""
            lines.append(f"| {klass} | `{c.id}` | `{_cell(short_command(c))}` | {status(c, r)}{seconds} | "
                         f"{_cell(outcome(r))} |")  # fmt: skip
    Path(path).write_text("\n".join(lines) + "\n")


DOC_ROW = re.compile(r"^\| [^|]+ \| `([^`]+)` \|")


def doc_case_ids(text: str) -> list[str]:
    return [m.group(1) for line in text.splitlines() if (m := DOC_ROW.match(line))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Play the bad-input cases of the ptq4ris command line.")
    p.add_argument("--write", metavar="MD", help="write the reliability document (docs/reliability.md)")
    p.add_argument("--only", nargs="+", metavar="ID", help="play only these cases (regexes on the id)")
    p.add_argument("--fixtures", metavar="DIR", help="build (or reuse) the shared inputs here")
    p.add_argument("--keep", action="store_true", help="keep each case's folder and output (with --only)")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    cases = CASES
    if args.only:
        cases = [c for c in CASES if any(re.search(o, c.id) for o in args.only)]
    if args.write and len(cases) != len(CASES):
        p.error("--write plays every case: drop --only")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ptq4ris-bad-inputs-") as scratch:
        fixtures = build_fixtures(args.fixtures or Path(scratch) / "fixtures")
        print(f"fixtures ready in {time.monotonic() - start:.0f} s", file=sys.stderr)
        workdir = Path(scratch) / "cases"
        workdir.mkdir()

        def report(case: Case, r: Result) -> None:
            print(f"{status(case, r):>7}  {case.id:<50} {outcome(r)[:110]}", file=sys.stderr)
            for problem in problems(case, r):
                print(f"         - {problem}", file=sys.stderr)
            if status(case, r) in ("FAIL", "XPASS"):
                tail = "\n".join(r.stderr.splitlines()[-6:])
                print("           | " + tail.replace("\n", "\n           | "), file=sys.stderr)

        if args.keep:
            results = {}
            for c in cases:
                results[c.id] = run_case(c, fixtures, workdir, keep=True)
                report(c, results[c.id])
            print(f"kept in {workdir}", file=sys.stderr)
            input("press Enter to remove them ")
        else:
            results = run_cases(cases, fixtures, workdir, jobs=args.jobs, progress=report)
    count = Counter(status(c, results.get(c.id)) for c in cases)
    print(f"{len(cases)} cases in {time.monotonic() - start:.0f} s: {dict(count)}", file=sys.stderr)
    if args.write:
        write_doc(args.write, cases, results)
        print(f"written {args.write}", file=sys.stderr)
    return 1 if count["FAIL"] or count["XPASS"] else 0


if __name__ == "__main__":
    sys.exit(main())
