"""ONNX Runtime's own static int8 quantization of the float model: a peer row for ``ptq4ris bench`` outside ExecuTorch.

The flow is the one ONNX Runtime's quantization guide gives, with public APIs only:

1. the float model exported to ONNX by ``torch.onnx.export(..., dynamo=True)`` (opset 18, batch 1, fixed shapes);
2. ``quant_pre_process`` (symbolic shape inference and ORT's graph optimisation, which the guide recommends doing here
   rather than inside quantization);
3. ``quantize_static`` in QDQ format, int8 weights per channel and int8 activations, its calibrator fed the same
   calibration pairs as ours.

:class:`OrtProgram` runs the result (or the float ONNX model) on ORT's CPU execution provider with the call convention
of :class:`mobile_runtime.runtime.PteProgram`; :func:`count_ort_instructions_x86` counts one forward's instructions
under callgrind, as :mod:`mobile_runtime.instruction_count` counts ``.pte`` programs' (x86 only).

ORT's CPU kernels for the x86 and ARM builds differ (MLAS's AVX2/AVX-512/VNNI and NEON/dot-product paths), and no
aarch64 ORT runs here, so only x86 is counted.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from quantize.atomic import atomic_file, write_atomic
from quantize.errors import MissingFileError, UserError

if TYPE_CHECKING:  # torch and onnxruntime load with the flow, not with the module
    import torch
    from torch import nn

__all__ = [
    "CALIBRATORS",
    "DEFAULT_CALIBRATOR",
    "INPUT_NAMES",
    "OPSET",
    "WEIGHTED_OPS",
    "OrtInputError",
    "OrtProgram",
    "build_ort_static",
    "count_ort_instructions_x86",
    "export_onnx",
    "quantize_onnx_static",
]

INPUT_NAMES = ("image", "input_ids", "attention_mask")
OPSET = 18  # the dynamo exporter's own opset; quantize_static needs >= 13 for per-channel QDQ
# With ORT's default settings (128 histogram bins, 128 quantized bins) Entropy has one candidate range, the full one:
# the same model as MinMax, byte for byte. Percentile (99.999%, symmetric) is the default: on lavt-tiny with
# WEIGHTED_OPS it keeps 96.9 mIoU where MinMax keeps 95.1 (float: 97.5); quantizing every op, both lose the object.
CALIBRATORS = ("MinMax", "Entropy", "Percentile")
Calibrator = Literal["MinMax", "Entropy", "Percentile"]
DEFAULT_CALIBRATOR: Calibrator = "Percentile"
# ORT's default quantizes every op its registry knows, LayerNorm's squares and the attention scores with their additive
# -1e4 word mask included: one int8 scale then spans 1e4 and the scores collapse. Quantizing only the ops with weights
# (the embedding table's Gather included) is what a user tries next.
WEIGHTED_OPS = ("Conv", "MatMul", "Gemm", "Gather")
INSTALL_HINT = "pip install onnxruntime onnx onnxscript"

_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{module} is not installed: {INSTALL_HINT}")


class OrtInputError(UserError):
    """A file that is no loadable ONNX model, or inputs that do not match what it was exported for."""


def export_onnx(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: str | Path) -> Path:
    """The float ONNX model of ``model`` (eval) for inputs of ``example_inputs``' shapes, written to ``path``."""
    import torch

    _require("onnxscript")
    # The dynamo exporter (torch's default), not the TorchScript one: both give graphs ORT runs and quantize_static
    # handles, but the dynamo graph comes constant-folded (lavt-tiny: 1.4k nodes against 3.2k, without the
    # Shape/Gather/Constant chains around every reshape). Weights inlined: one self-contained file (< 2 GB).
    names = list(INPUT_NAMES[: len(example_inputs)]) or None
    with torch.no_grad():
        program = torch.onnx.export(
            model.eval(),
            tuple(example_inputs),
            input_names=names,
            output_names=["logits"],
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    write_atomic(path, program.model_proto.SerializeToString())
    return Path(path)


class _Reader:
    """quantize_static's CalibrationDataReader over input tuples (built when onnxruntime is imported)."""

    def __init__(self, calib, names: list[str]) -> None:
        self.feeds = [{n: t.detach().cpu().numpy() for n, t in zip(names, pair)} for pair in calib]
        self.index = 0

    def get_next(self):
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0


def quantize_onnx_static(
    float_onnx: str | Path,
    calib: list[tuple[torch.Tensor, ...]],
    out_path: str | Path,
    calibrate_method: Calibrator = DEFAULT_CALIBRATOR,
    op_types: tuple[str, ...] | None = None,
) -> Path:
    """``float_onnx`` quantized by ORT's ``quantize_static`` (QDQ, per-channel int8 weights, int8 activations) with
    activation ranges calibrated on ``calib`` (input tuples in the model's input order) by ``calibrate_method``;
    written to ``out_path``. ``op_types``: the op types to quantize (None: all that ORT can, its default; or
    :data:`WEIGHTED_OPS`). Raises whatever ORT raises."""
    if calibrate_method not in CALIBRATORS:
        raise UserError(f"unknown calibrator {calibrate_method!r}: choose from {', '.join(CALIBRATORS)}")
    if not calib:
        raise UserError("no calibration pairs: quantize_static needs at least one")
    _require("onnxruntime")
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_onnx = Path(float_onnx)
    names = [i.name for i in ort.InferenceSession(str(float_onnx), providers=["CPUExecutionProvider"]).get_inputs()]
    reader = type("CalibrationReader", (_Reader, CalibrationDataReader), {})(calib, names)
    with tempfile.TemporaryDirectory(prefix="ptq4ris-ort-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_onnx), str(prepared))
        # The histogram calibrators print their settings: not the bench's output.
        with atomic_file(out_path) as tmp_out, contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(prepared),
                str(tmp_out),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                # S8S8: ORT's guide makes int8 activations with int8 weights in QDQ the first choice on CPU (x86 and
                # ARM); U8S8 risks VPMADDUBSW saturation on AVX2/AVX-512 machines without VNNI.
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod[calibrate_method],
                op_types_to_quantize=list(op_types) if op_types else None,
            )
    return Path(out_path)


def build_ort_static(
    model: nn.Module,
    calib: list[tuple[torch.Tensor, ...]],
    out_path: str | Path,
    calibrate_method: Calibrator = DEFAULT_CALIBRATOR,
    op_types: tuple[str, ...] | None = None,
) -> Path:
    """The whole flow: ``model`` (float) exported to ONNX, quantized statically on ``calib`` (input tuples of batch
    1, the program's shapes), written to ``out_path``. Raises whatever fails."""
    if not calib:
        raise UserError("no calibration pairs: quantize_static needs at least one")
    with tempfile.TemporaryDirectory(prefix="ptq4ris-ort-") as tmp:
        float_onnx = export_onnx(model, calib[0], Path(tmp) / "float.onnx")
        return quantize_onnx_static(float_onnx, calib, out_path, calibrate_method, op_types)


def _session_options(threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ORT's default, one thread per physical core
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: no per-session warnings in the bench's output
    # ORT's workers spin on their cores after each run by default, which takes the cores from whatever runs next in the
    # same process (the bench's interleaved rounds time ExecuTorch programs between ORT runs): they sleep instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OrtProgram:
    """An ONNX model in an ORT ``InferenceSession`` on the CPU execution provider, called like a ``PteProgram``:
    ``program(image, input_ids, attention_mask) -> logits`` (the first output, as a torch tensor).

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (None: ORT's default); inter-op parallelism is off (sequential execution).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        _require("onnxruntime")
        import onnxruntime as ort
        import torch

        self.path = Path(path)
        if not self.path.exists():
            raise MissingFileError(f"no ONNX model at {self.path}: build it with mobile_runtime.onnxruntime_flow")
        if not self.path.is_file():
            raise OrtInputError(f"{self.path} is a folder, not an ONNX model: give the .onnx file")
        if threads is not None and threads < 1:
            raise UserError(f"threads must be positive, got {threads}")
        self.threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), _session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/InvalidGraph, all RuntimeErrors
            raise OrtInputError(
                f"{self.path} is not a loadable ONNX model ({' '.join(str(e).split())[:300]}): rebuild it"
            ) from e
        infos = self.session.get_inputs()
        self.names = tuple(i.name for i in infos)
        self.input_shapes = [tuple(d if isinstance(d, int) else -1 for d in i.shape) for i in infos]
        self.input_dtypes = [getattr(torch, _DTYPES[i.type]) if i.type in _DTYPES else None for i in infos]

    def _feed(self, inputs: tuple[torch.Tensor, ...]) -> dict:
        if len(inputs) != len(self.names):
            raise OrtInputError(f"{self.path.name} takes {len(self.names)} inputs, got {len(inputs)}")
        feed = {}
        for name, x, shape, dtype in zip(self.names, inputs, self.input_shapes, self.input_dtypes):
            if len(x.shape) != len(shape) or any(s not in (-1, d) for s, d in zip(shape, x.shape)):
                raise OrtInputError(
                    f"{self.path.name} was exported for {name} of shape {list(shape)}, got {list(x.shape)}"
                )
            if dtype is not None and x.dtype != dtype:
                if x.dtype.is_floating_point != dtype.is_floating_point:
                    raise OrtInputError(f"{self.path.name} expects {name} as {dtype}, got {x.dtype}")
                x = x.to(dtype)
            feed[name] = x.detach().cpu().contiguous().numpy()
        return feed

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.session.run(None, self._feed(inputs))[0])


# ORT's Python module is stripped: no symbol of its own to toggle collection on. The forwards run instead inside a
# ctypes call of a Python callback (ctypes -> libffi's ffi_call -> trampoline -> Python), and callgrind counts from
# entry to exit of ffi_call; nothing else in the child calls through ctypes, and any call that did would be the same in
# both runs and cancel out.
_TOGGLE = "ffi_call"

# Run under callgrind: numpy and onnxruntime only (importing torch under valgrind takes minutes). One thread, one
# warm-up forward outside the counted call, then `runs` forwards inside it.
_CHILD = r"""
import ctypes, gc, sys
import numpy as np
import onnxruntime as ort

model, runs, *arrays = sys.argv[1:]
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
feed = {i.name: np.load(a) for i, a in zip(session.get_inputs(), arrays)}
session.run(None, feed)
gc.collect()
gc.disable()


def forwards():
    for _ in range(int(runs)):
        session.run(None, feed)


ctypes.CFUNCTYPE(None)(forwards)()
"""

# As in instruction_count: the environment lands on the counted process's stack. Python's method cache is keyed on
# object addresses, so the heap must be laid out the same every run: a fixed hash seed, no garbage collection inside
# the counted call, and no OpenBLAS worker threads (numpy's) allocating concurrently, which moved counts by ~2e3.
_FIXED_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LC_ALL": "C",
    "PYTHONHASHSEED": "0",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}


def _read_main_thread_total(count_file: Path) -> int:
    text = count_file.with_name(count_file.name + "-01").read_text()  # the main thread's
    found = re.search(r"^(?:totals|summary): (\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no instruction total in {count_file}: {text[:200]!r}")
    return int(found.group(1))


def count_ort_instructions_x86(onnx_path: str | Path, inputs: tuple[torch.Tensor, ...], timeout: float = 1800) -> int:
    """Instructions (callgrind ``Ir``, main thread) of one steady-state forward of ``onnx_path`` on ``inputs`` at one
    intra-op thread: the count of a run with two forwards minus that of a run with one, both after a warm-up forward.

    Each forward's count includes its Python-side ``session.run`` call (tens of thousands of instructions against the
    model's hundreds of millions). Repeats within about 3e-5 (lavt-tiny: a few thousand instructions in 3e8): ONNX
    Runtime starts a thread of its own at import, whose allocations can still move the heap."""
    import numpy as np

    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise UserError("valgrind is not installed: `make system-tools` (Debian: valgrind)")
    onnx_path = Path(onnx_path).resolve()
    if not onnx_path.is_file():
        raise MissingFileError(f"no ONNX model at {onnx_path}")
    totals = []
    with tempfile.TemporaryDirectory(prefix="ptq4ris-ort-count-") as tmp:
        # Relative names in a working folder, the code on the command line: no random temporary name reaches the
        # child's strings (sys.path, import caches), whose hashes would move its heap layout.
        arrays = [f"input{i}.npy" for i in range(len(inputs))]
        for array, x in zip(arrays, inputs):
            np.save(Path(tmp) / array, x.detach().cpu().contiguous().numpy())
        for runs in (1, 2):
            count_file = Path(tmp) / f"count-{runs}.txt"
            cmd = [
                shutil.which("setarch") or "setarch",
                "-R",  # fixed addresses: alignment-dependent copy paths otherwise move the count between runs
                valgrind,
                "--tool=callgrind",
                "--quiet",
                "--separate-threads=yes",
                "--collect-atstart=no",
                f"--toggle-collect={_TOGGLE}",
                f"--callgrind-out-file={count_file}",
                sys.executable,
                "-c",
                _CHILD,
                str(onnx_path),
                str(runs),
                *arrays,
            ]
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=_FIXED_ENV, cwd=tmp, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"callgrind run of {onnx_path.name} failed ({done.returncode}):\n{done.stderr[-2000:]}"
                )
            totals.append(_read_main_thread_total(count_file))
    if totals[0] == 0:
        raise RuntimeError(f"callgrind counted nothing inside {_TOGGLE}: this Python's ctypes does not call libffi's")
    return totals[1] - totals[0]
