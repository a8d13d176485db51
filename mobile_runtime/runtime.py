"""Run an exported ``.pte`` with the ExecuTorch runtime, checking its inputs against the program's own metadata.

A ``.pte`` has fixed input shapes; feeding it other shapes fails deep inside the runtime with an opaque status code.
:class:`PteProgram` reads the shapes and dtypes the program declares and names the mismatch before running.

No file can abort this process: :func:`check_pte_file` refuses from its header a file that is not a complete program,
and :func:`probe_programs` loads a program in a child process before this one does (the runtime aborts its process on
some corrupt files). :func:`load_full_model` also refuses a program with the wrong inputs (another model, a stage).
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from quantize.errors import MissingFileError, UserError

__all__ = [
    "PTE_IDENTIFIER",
    "PteHeader",
    "PteInputError",
    "PteProgram",
    "StagedPrograms",
    "check_pte_file",
    "load_full_model",
    "probe_programs",
    "program_bytes",
    "stage_paths",
]

logger = logging.getLogger(__name__)

# ExecuTorch ScalarType codes (c10 numbering) of the dtypes our programs use.
_DTYPES = {0: torch.uint8, 1: torch.int8, 3: torch.int32, 4: torch.int64, 5: torch.float16, 6: torch.float32}

# The file layout of a .pte (executorch/schema/program.fbs, exir/_serialize/_program.py::_ExtendedHeader, and the
# runtime's schema/extended_header.cpp): bytes 0:4 the flatbuffer's root table offset (uint32 LE), bytes 4:8 the file
# identifier "ET12" (`file_identifier "ET12";` in program.fbs), then at byte 8 the optional extended header: magic
# "eh00", uint32 header length (>= 24; 32 with the segment data size), uint64 program (flatbuffer) size, uint64 segment
# base offset (0: no segments), uint64 segment data size. All little-endian.
PTE_IDENTIFIER = b"ET12"
EXTENDED_HEADER_MAGIC = b"eh00"
_EH_OFFSET = 8
_EH_MIN_LENGTH = 24  # magic, length, program size, segment base offset
_EH_FULL_LENGTH = 32  # + segment data size
_EXPORT_HINT = "export one with `ptq4ris export-pte`"
REEXPORT_HINT = "re-export it with `ptq4ris export-pte`"

# Seconds a probe process may take to load a program (a LAVT-tiny program loads in about 2.5 s, torch import included).
PROBE_TIMEOUT = 300
# PTQ4RIS_PTE_PROBE=0 loads every .pte in-process without the probe process (the header checks still run).
PROBE_ENV = "PTQ4RIS_PTE_PROBE"


class PteInputError(UserError):
    """Inputs that do not match what a ``.pte`` program was exported for (or a file that is no such program)."""


@dataclass(frozen=True)
class PteHeader:
    """What the first bytes of a ``.pte`` declare (segment fields are 0 without an extended header)."""

    file_size: int
    program_size: int
    segment_base_offset: int
    segment_data_size: int


def check_pte_file(path: str | Path) -> PteHeader:
    """Refuse, from its first 64 bytes and its size, a file that is not a complete ExecuTorch program, before any native
    code reads it: missing, a folder, empty or smaller than a header, another file identifier than ``ET12`` (another
    format, or a program of another ExecuTorch schema version), a root table outside the program data, an extended
    header whose sizes do not fit the file (a truncated copy). The ExecuTorch runtime hands its log lines to Python as
    UTF-8 text; the identifier it found, when that is random bytes, aborts the process: this runs first."""
    path = Path(path)
    if path.is_dir():
        raise PteInputError(f"{path} is a folder, not an ExecuTorch program: give the .pte file (or {_EXPORT_HINT})")
    if not path.exists():
        raise MissingFileError(f"no ExecuTorch program at {path}: {_EXPORT_HINT}")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_EH_OFFSET + _EH_FULL_LENGTH)
    except OSError as e:
        raise PteInputError(f"cannot read {path} ({e.strerror or e}): check its permissions") from e
    if size == 0:
        raise PteInputError(f"{path} is empty, not an ExecuTorch program: {REEXPORT_HINT}")
    if size < _EH_OFFSET + _EH_FULL_LENGTH:  # not even a header: no program is that small
        raise PteInputError(
            f"{path} ({size} bytes) is truncated, or too small to be an ExecuTorch program: {REEXPORT_HINT}"
        )
    identifier = head[4:8]
    if identifier != PTE_IDENTIFIER:
        if identifier[:2] == b"ET" and identifier[2:].isdigit():
            raise PteInputError(
                f"{path} is an ExecuTorch program of schema {identifier.decode()}, and this runtime reads "
                f"{PTE_IDENTIFIER.decode()}: {REEXPORT_HINT} (with the installed executorch)"
            )
        raise PteInputError(
            f"{path} is not an ExecuTorch program (bytes 4-8 are {bytes(identifier)!r}, not the file identifier "
            f"{PTE_IDENTIFIER.decode()!r}): give the .pte that `ptq4ris export-pte` wrote (re-export it if this was one)"
        )
    program_size, base, data_size = size, 0, 0
    if head[_EH_OFFSET : _EH_OFFSET + 4] == EXTENDED_HEADER_MAGIC:
        length, program_size, base = struct.unpack_from("<IQQ", head, _EH_OFFSET + 4)
        if length < _EH_MIN_LENGTH:
            raise PteInputError(f"{path} has a corrupt extended header (length {length} < 24): {REEXPORT_HINT}")
        if length > _EH_MIN_LENGTH:
            (data_size,) = struct.unpack_from("<Q", head, _EH_OFFSET + _EH_MIN_LENGTH)
        end = base + data_size if base else program_size
        if program_size > size or end > size:
            raise PteInputError(
                f"{path} is truncated (or its header corrupt): the header declares {max(end, program_size)} bytes, the "
                f"file has {size}; copy it again or {REEXPORT_HINT}"
            )
        if program_size < _EH_OFFSET + length or (base and base < program_size):
            raise PteInputError(
                f"{path} has a corrupt extended header (length {length}, program {program_size} bytes, segments at "
                f"{base}): {REEXPORT_HINT}"
            )
    (root,) = struct.unpack_from("<I", head, 0)
    if not _EH_OFFSET <= root < program_size:
        raise PteInputError(
            f"{path} is corrupt (its root table offset {root} lies outside its {program_size} bytes of program data): "
            f"{REEXPORT_HINT}"
        )
    return PteHeader(size, program_size, base, data_size)


# Files a probe process loaded: (resolved path, size, mtime, inode). A file changed since is probed again.
_PROBED: set[tuple[str, int, int, int]] = set()

_PROBE_SCRIPT = r"""
import sys
import torch  # the quantized kernels link against it
try:
    import executorch.kernels.quantized  # noqa: F401  (registers embedding_byte and the other quantized kernels)
except Exception:
    pass
# The pybindings alone (executorch.runtime would import all of executorch.exir, ~7 s); the same loader and checks.
from executorch.extension.pybindings import _C

for index, path in enumerate(sys.argv[1:]):
    try:
        program = _C._load_program(path, program_verification=_C.Verification.InternalConsistency)
        names = [program.get_method_name(i) for i in range(program.num_methods())]
        if "forward" not in names:
            raise RuntimeError(f"it has no forward method (methods: {names})")
        meta = program.load_method("forward").method_meta()
        for i in range(meta.num_inputs()):
            info = meta.input_tensor_meta(i)
            info.sizes(), info.dtype()
    except Exception as e:
        print(f"PTQ4RIS-PROBE fail {index} {' '.join(str(e).split())}", flush=True)
        sys.exit(3)
    print(f"PTQ4RIS-PROBE ok {index}", flush=True)
"""


def _file_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _runtime_log(stderr: str) -> str:
    """The last line the ExecuTorch runtime logged (``[file.cpp:N] message``), for the error message."""
    lines = [
        line.strip()
        for line in stderr.splitlines()
        if line.startswith("[") and ".cpp:" in line.split("]", 1)[0] and "cpuinfo" not in line
    ]
    lines = [line for line in lines if "terminate called" not in line]
    return lines[-1].split("] ", 1)[-1] if lines else ""


def probe_programs(*paths: str | Path) -> None:
    """Load each program (and its ``forward`` method) in a short-lived child process before this process does.

    The ExecuTorch runtime hands its log lines to Python as UTF-8 text; a line quoting bytes of the file that are not
    UTF-8 (a damaged identifier, a corrupt XNNPACK payload) throws inside native code and aborts the process (SIGABRT,
    exit 134), and no header check can rule that out for a file's body: delegate payloads are opaque to the program
    schema (in a fuzz of a small program, 3 in 40 random edits of its XNNPACK segment aborted the loader while its
    header, and executorch's own Python deserializer, found nothing wrong).
    The child takes that abort instead, and it becomes a :class:`PteInputError`. Each file is probed once per process
    (again if it changes); the cost is one Python start with torch, about 2.5 s, whatever the program's size.
    """
    todo = [Path(p) for p in paths]
    todo = [p for p in todo if _file_key(p) not in _PROBED]
    if not todo or os.environ.get(PROBE_ENV, "1") == "0":
        return
    if not sys.executable:  # an embedded interpreter: nothing to start the probe with
        logger.warning("no Python executable to probe %s with; loading it in-process", todo)
        return
    cmd = [sys.executable, "-c", _PROBE_SCRIPT, *(str(p) for p in todo)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        names = ", ".join(str(p) for p in todo)
        raise PteInputError(
            f"loading {names} did not finish within {PROBE_TIMEOUT} s in a probe process: is it an ExecuTorch "
            f"program? {REEXPORT_HINT}"
        ) from e
    except OSError as e:  # no process could be started: fall back to the header checks alone
        logger.warning("could not start a probe process (%s); loading %s in-process", e, todo)
        return
    ok = set()
    failed: tuple[int, str] | None = None
    for line in done.stdout.splitlines():
        parts = line.split(" ", 3)
        if len(parts) >= 3 and parts[0] == "PTQ4RIS-PROBE" and parts[2].isdigit():
            if parts[1] == "ok":
                ok.add(int(parts[2]))
            elif parts[1] == "fail":
                failed = (int(parts[2]), parts[3] if len(parts) > 3 else "")
    for index, path in enumerate(todo):
        if index in ok:
            _PROBED.add(_file_key(path))
            continue
        if failed is not None and failed[0] == index:
            detail = "; ".join(x for x in (_runtime_log(done.stderr), failed[1]) if x)
            detail = detail if len(detail) <= 240 else detail[:237] + "..."
            raise PteInputError(f"{path} is not a loadable ExecuTorch program ({detail}): {REEXPORT_HINT}")
        if done.returncode < 0:
            try:
                how = signal.Signals(-done.returncode).name
            except ValueError:
                how = f"signal {-done.returncode}"
            raise PteInputError(
                f"{path} is not a loadable ExecuTorch program (the ExecuTorch runtime aborted loading it, {how}): "
                f"{REEXPORT_HINT}"
            )
        # The child failed before loading anything (a broken installation, not the file): say so, with its words.
        tail = " ".join(done.stderr.strip().splitlines()[-1:]) or f"exit {done.returncode}"
        raise RuntimeError(f"the probe process could not check {path}: {tail}")


class PteProgram:
    """A loaded ``.pte`` program (method ``forward``).

    The file is checked before native code sees it (:func:`check_pte_file`), and loaded first in a probe process
    (:func:`probe_programs`), so that no file can abort this process.

    Args:
        path: the ``.pte`` file.
        names: optional input names for error messages (e.g. ``("image", "input_ids", "attention_mask")``).
    """

    def __init__(self, path: str | Path, names: tuple[str, ...] | None = None) -> None:
        self.path = Path(path)
        check_pte_file(self.path)
        probe_programs(self.path)

        import executorch.kernels.quantized  # noqa: F401  (registers embedding_byte)
        from executorch.runtime import Runtime

        try:
            program = Runtime.get().load_program(self.path)
            self.method = program.load_method("forward")
            meta = self.method.metadata
            infos = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
            self.input_shapes = [tuple(info.sizes()) for info in infos]
            self.input_dtypes = [_DTYPES.get(info.dtype()) for info in infos]
        except Exception as e:  # the runtime raises plain RuntimeErrors with a status code; KeyError: no forward
            raise PteInputError(
                f"{self.path} is not a loadable ExecuTorch program ({' '.join(str(e).split())}): {REEXPORT_HINT}"
            ) from e
        self.names = names or tuple(f"input {i}" for i in range(len(self.input_shapes)))

    def _check(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_shapes):
            raise PteInputError(f"{self.path.name} takes {len(self.input_shapes)} inputs, got {len(inputs)}")
        checked = []
        for name, x, shape, dtype in zip(self.names, inputs, self.input_shapes, self.input_dtypes):
            if tuple(x.shape) != shape:
                raise PteInputError(
                    f"{self.path.name} was exported for {name} of shape {list(shape)}, got {list(x.shape)}: "
                    "resize/pad the input (the model's preprocessing does) or export for these shapes"
                )
            if dtype is not None and x.dtype != dtype:
                if x.dtype.is_floating_point != dtype.is_floating_point:
                    raise PteInputError(f"{self.path.name} expects {name} as {dtype}, got {x.dtype}")
                x = x.to(dtype)
            checked.append(x.contiguous())
        return checked

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.method.execute(self._check(inputs))[0]


FULL_INPUTS = ("image", "input_ids", "attention_mask")


def _shapes(program: PteProgram) -> str:
    return ", ".join(str(list(shape)) for shape in program.input_shapes) or "none"


def _is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3]


def _is_tokens(program: PteProgram, first: int) -> bool:
    """Inputs ``first`` and ``first + 1`` are token ids and an attention mask: integer [B, T] of one shape."""
    shapes, dtypes = program.input_shapes[first : first + 2], program.input_dtypes[first : first + 2]
    return (
        len(shapes) == 2
        and len(shapes[0]) == 2
        and shapes[0] == shapes[1]
        and all(d is None or not d.is_floating_point for d in dtypes)
    )


def _check_full(program: PteProgram) -> None:
    """Refuse, before anything runs, a program that is not a full LAVT model: another model, or a stage program."""
    shapes = program.input_shapes
    if len(shapes) != len(FULL_INPUTS) or not _is_image(shapes[0]) or not _is_tokens(program, 1):
        raise PteInputError(
            f"{program.path} takes {len(shapes)} input(s) of shapes {_shapes(program)}, but a full LAVT program takes 3: "
            "image [1, 3, S, S], input_ids and attention_mask [1, T] (integers): give the full-model .pte that "
            "`ptq4ris export-pte` wrote"
        )
    program.names = FULL_INPUTS  # errors then name the inputs


class StagedPrograms:
    """The text and visual stage programs chained as one model, as the Android app runs them: ids → word features
    (``<stem>.text.pte``), then image + word features → mask logits (``<stem>.visual.pte``). It takes and returns
    what a full-model program does, so parity, benchmarks and ``segment`` use it interchangeably."""

    def __init__(self, text: str | Path, visual: str | Path) -> None:
        for path in (text, visual):
            check_pte_file(path)
        probe_programs(text, visual)  # one probe process for both
        self.text = PteProgram(text, names=("input_ids", "attention_mask"))
        self.visual = PteProgram(visual, names=("image", "text_features", "attention_mask"))
        if len(self.text.input_shapes) != 2 or not _is_tokens(self.text, 0):
            raise PteInputError(
                f"{self.text.path} takes inputs of shapes {_shapes(self.text)}, but a text stage program takes "
                "input_ids and attention_mask [1, T]: give the .text.pte that `ptq4ris export-pte` wrote"
            )
        if len(self.visual.input_shapes) != 3 or not _is_image(self.visual.input_shapes[0]):
            raise PteInputError(
                f"{self.visual.path} takes inputs of shapes {_shapes(self.visual)}, but a visual stage program takes "
                "image [1, 3, S, S], text features and attention_mask: give the .visual.pte that `ptq4ris "
                "export-pte` wrote"
            )
        self.path = Path(visual)
        self.input_shapes = [self.visual.input_shapes[0], *self.text.input_shapes]
        self.input_dtypes = [self.visual.input_dtypes[0], *self.text.input_dtypes]

    def __call__(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.visual(image, self.text(input_ids, attention_mask), attention_mask)


def stage_paths(full: str | Path) -> tuple[Path, Path]:
    """Where ``export-pte --out X.pte`` writes the text and visual programs of ``X.pte``."""
    stem = Path(full).with_suffix("")
    return stem.with_name(f"{stem.name}.text.pte"), stem.with_name(f"{stem.name}.visual.pte")


def load_full_model(pte: str | Path) -> PteProgram | StagedPrograms:
    """The program at ``X.pte`` when it exists (for a full-model program, a callable ``(image, input_ids,
    attention_mask) -> logits``), else its text and visual stage programs chained into that callable (an export with
    ``--stages text visual``). Refuses, with a :class:`PteInputError`, a file that is not such a program: not an
    ExecuTorch program at all, truncated, corrupt, or a program of another model (other inputs)."""
    pte = Path(pte)
    if pte.exists():
        program = PteProgram(pte)  # a folder or other non-file is refused there, with its own message
        _check_full(program)
        return program
    text, visual = stage_paths(pte)
    if text.is_file() and visual.is_file():
        return StagedPrograms(text, visual)
    raise MissingFileError(
        f"no ExecuTorch program at {pte} (nor its stage programs {text.name} and {visual.name}): export them with "
        "`ptq4ris export-pte`"
    )


def program_bytes(pte: str | Path) -> int:
    """Size on disk of ``X.pte``, or of its text and visual programs together when only they were exported."""
    pte = Path(pte)
    if pte.is_file():
        return pte.stat().st_size
    return sum(p.stat().st_size for p in stage_paths(pte))
