"""Execute a saved Core ML package on Linux: its MIL program, op by op, in numpy.

Nothing runs a Core ML model outside macOS, so the package's numerics are checked here by reading the saved
``.mlpackage`` back into its MIL program and interpreting every op with numpy. Each op's result is cast to the dtype
the program declares for it, so a package with fp16 compute precision stores every intermediate in fp16 as the device
does (the arithmetic inside one op is done in fp32: a device's fp16 kernels accumulate in at least that). Quantize,
dequantize and the constexpr weight ops are exact. An op the interpreter does not know is refused with an error that
names it; nothing is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from quantize.errors import MissingFileError, UserError

__all__ = ["OPS", "MilInterpreter", "UnsupportedOpError", "check_package", "load_program"]


class UnsupportedOpError(NotImplementedError):
    """The program holds an op the interpreter cannot execute."""


_EXPORT_HINT = "export one with `ptq4ris export-coreml`"
_REEXPORT_HINT = "copy the whole .mlpackage folder again or re-export it with `ptq4ris export-coreml`"


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_package(package: str | Path) -> Path:
    """Refuse, before coremltools reads it, a path that is not a complete ``.mlpackage``: missing, a file instead of
    the package folder, a folder without ``Manifest.json``, a manifest that is not valid JSON or lacks its root model,
    an item the manifest names that is missing, an empty model spec. Returns the root model's spec file."""
    package = Path(package)
    if not package.exists():
        raise MissingFileError(f"no Core ML package at {package}: {_EXPORT_HINT}")
    if not package.is_dir():
        raise UserError(f"{package} is a file, not a Core ML package (an .mlpackage folder): {_EXPORT_HINT}")
    manifest = package / "Manifest.json"
    if not manifest.is_file():
        raise MissingFileError(
            f"no Core ML package at {package} (no Manifest.json in that folder): give the .mlpackage folder, or "
            f"{_EXPORT_HINT}"
        )
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{manifest} is not a readable package manifest ({_one_line(e)}): {_REEXPORT_HINT}") from e
    entries = info.get("itemInfoEntries") if isinstance(info, dict) else None
    root = info.get("rootModelIdentifier") if isinstance(info, dict) else None
    if not isinstance(entries, dict) or not isinstance(root, str) or not isinstance(entries.get(root), dict):
        raise UserError(
            f"{manifest} names no root model (itemInfoEntries / rootModelIdentifier missing): {_REEXPORT_HINT}"
        )
    data = package / "Data"
    for key, entry in entries.items():
        item = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(item, str) or not item:
            raise UserError(f"{manifest} has an item without a path ({key}): {_REEXPORT_HINT}")
        target = data / item
        if Path(item).is_absolute() or ".." in Path(item).parts:
            raise UserError(f"{manifest} names {item!r}, outside the package: {_REEXPORT_HINT}")
        if not target.exists():
            raise UserError(
                f"{package} is incomplete: {target} (named in its Manifest.json) is missing; {_REEXPORT_HINT}"
            )
    spec_file = data / entries[root]["path"]
    if not spec_file.is_file() or spec_file.stat().st_size == 0:
        raise UserError(f"{spec_file} is empty or not a file, so {package} holds no model: {_REEXPORT_HINT}")
    return spec_file


def load_program(package: str | Path):
    """The MIL program of a saved ``.mlpackage`` (read from its spec and weight file, no macOS needed).

    A package that is not complete (:func:`check_package`) or whose spec or weights coremltools cannot read (a
    truncated or damaged ``model.mlmodel``: protobuf's ``DecodeError``; a truncated ``weight.bin``; a wrong blob
    header) is refused with a one-line :class:`UserError` naming the package."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    package = Path(package)
    spec_file = check_package(package)
    try:
        model = ct.models.MLModel(str(package), skip_model_load=True)
        spec = model.get_spec()
        kind = spec.WhichOneof("Type")
    except Exception as e:  # google.protobuf DecodeError, RuntimeError from the package reader, ...
        raise UserError(
            f"{package} is not a readable Core ML package ({spec_file.name}: {type(e).__name__}: {_one_line(e)}): "
            f"{_REEXPORT_HINT}"
        ) from e
    if kind is None:
        raise UserError(f"{spec_file} holds no model: {_REEXPORT_HINT}")
    if kind != "mlProgram":
        raise UserError(f"{package} is a {kind} model, not an ML program; re-export it with `ptq4ris export-coreml`")
    try:
        return load(
            model_spec=spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir
        )
    except Exception as e:  # weights: "index out of bounds", "Storage Reader expects file format version 2", ...
        raise UserError(
            f"{package} has unreadable weights or program ({type(e).__name__}: {_one_line(e)}): {_REEXPORT_HINT}"
        ) from e


# ---------------------------------------------------------------------------------------------------------------------
# Ops. Each takes the op's inputs by name (numpy values; absent optional inputs are missing) and returns its outputs.

OPS: dict[str, Callable[..., Any]] = {}


def _op(*names: str):
    def register(fn):
        for name in names:
            OPS[name] = fn
        return fn

    return register


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) if np.asarray(x).dtype != np.float32 else np.asarray(x)


def _broadcast_along(param: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
    """A per-channel parameter (1-D) shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    param = np.asarray(param)
    if param.ndim != 1 or axis is None:
        return param
    shape = [1] * rank
    shape[axis] = param.shape[0]
    return param.reshape(shape)


_INT_RANGES = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int16": (-32768, 32767),
    "uint16": (0, 65535),
    "int4": (-8, 7),
    "uint4": (0, 15),
}


@_op("quantize")
def _quantize(input, scale, output_dtype, zero_point=None, axis=None):
    x = _f32(input)
    axis = None if axis is None else int(axis) % x.ndim
    scale = _broadcast_along(_f32(scale), axis, x.ndim)
    zp = 0 if zero_point is None else _broadcast_along(np.asarray(zero_point, np.int32), axis, x.ndim)
    lo, hi = _INT_RANGES[str(output_dtype)]
    # Core ML rounds half to even, as torch's quantize_per_tensor does.
    q = np.rint(x / scale).astype(np.int64) + zp
    return np.clip(q, lo, hi).astype(np.uint8 if str(output_dtype).startswith("u") else np.int8)


@_op("dequantize")
def _dequantize(input, scale, zero_point=None, axis=None):
    x = np.asarray(input)
    axis = None if axis is None else int(axis) % x.ndim
    scale = _broadcast_along(_f32(scale), axis, x.ndim)
    zp = 0 if zero_point is None else _broadcast_along(np.asarray(zero_point, np.int32), axis, x.ndim)
    return ((x.astype(np.int32) - zp) * scale).astype(np.float32)


def _expand_blocks(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a blockwise parameter (same rank as the data, each dim dividing it) up to the data's shape."""
    for axis, (n, m) in enumerate(zip(shape, param.shape)):
        if n % m:
            raise UserError(f"block parameter of shape {param.shape} does not tile data of shape {shape}")
        if m != n:
            param = np.repeat(param, n // m, axis=axis)
    return param


@_op("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(data, scale, offset=None):
    data = np.asarray(data).astype(np.int32) if np.asarray(data).dtype.kind in "iu" else _f32(data)
    if offset is not None:
        data = data - _expand_blocks(np.asarray(offset), data.shape)
    return (data * _expand_blocks(np.asarray(scale), data.shape)).astype(np.asarray(scale).dtype)


@_op("constexpr_affine_dequantize")
def _affine_dequantize(quantized_data, zero_point, scale, axis):
    data = np.asarray(quantized_data).astype(np.int32)
    axis = int(axis)
    zp = _broadcast_along(np.asarray(zero_point).astype(np.int32), axis, data.ndim)
    scale = np.asarray(scale)
    return ((data - zp) * _broadcast_along(scale, axis, data.ndim)).astype(scale.dtype)


@_op("cast")
def _cast(x, dtype):
    target = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "bool": np.bool_}
    if str(dtype) not in target:
        raise UnsupportedOpError(f"cast to {dtype}")
    x = np.asarray(x)
    if x.dtype.kind == "f" and np.dtype(target[str(dtype)]).kind == "i":
        x = np.trunc(x)  # Core ML's float → int cast truncates toward zero
    return x.astype(target[str(dtype)])


@_op("reshape")
def _reshape(x, shape):
    x = np.asarray(x)
    shape = [int(s) for s in np.asarray(shape)]
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]  # 0 copies the input's dimension
    return x.reshape(shape)


_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.divide,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "pow": np.power,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "equal": np.equal,
    "not_equal": np.not_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
}


def _binary(fn):
    def run(x, y):
        x, y = np.asarray(x), np.asarray(y)
        out = fn(x, y)
        if fn in (np.add, np.subtract, np.multiply, np.maximum, np.minimum) and x.dtype.kind in "iu":
            return out.astype(np.result_type(x.dtype, y.dtype))
        return out

    return run


for _name, _fn in _BINARY.items():
    OPS[_name] = _binary(_fn)


@_op("floor_div")
def _floor_div(x, y):
    return np.floor_divide(np.asarray(x), np.asarray(y))


_UNARY = {
    "floor": np.floor,
    "ceil": np.ceil,
    "round": np.rint,
    "relu": lambda x: np.maximum(x, 0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "exp": np.exp,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "sign": np.sign,
    "square": np.square,
    "logical_not": np.logical_not,
    "identity": lambda x: x,
}


def _unary(fn):
    return lambda x: fn(np.asarray(x))


for _name, _fn in _UNARY.items():
    OPS[_name] = _unary(_fn)


@_op("rsqrt")
def _rsqrt(x, epsilon=1e-12):
    return 1.0 / np.sqrt(np.asarray(x) + np.float32(epsilon))


@_op("inverse")
def _inverse(x, epsilon=1e-4):
    return 1.0 / (np.asarray(x) + np.float32(epsilon))


@_op("erf")
def _erf(x):
    from scipy.special import erf

    return erf(np.asarray(x))


@_op("gelu")
def _gelu(x, mode="EXACT"):
    x = _f32(x)
    if mode == "EXACT":
        from scipy.special import erf

        return 0.5 * x * (1.0 + erf(x / np.sqrt(np.float32(2.0))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    raise UnsupportedOpError(f"gelu mode {mode}")


@_op("silu")
def _silu(x):
    x = _f32(x)
    return x / (1.0 + np.exp(-x))


@_op("clip")
def _clip(x, alpha, beta):
    return np.clip(np.asarray(x), alpha, beta)


@_op("select")
def _select(cond, a, b):
    return np.where(np.asarray(cond), a, b)


@_op("gather")
def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims) != 0:
        raise UnsupportedOpError("gather with batch_dims")
    x, indices, axis = np.asarray(x), np.asarray(indices), int(axis)
    if validate_indices and ((indices >= x.shape[axis]) | (indices < -x.shape[axis])).any():
        raise IndexError("gather: index out of range")
    return np.take(x, indices, axis=axis)


def _axes(axes, rank: int) -> tuple[int, ...] | None:
    return None if axes is None else tuple(int(a) % rank for a in np.atleast_1d(axes))


def _reduce(fn):
    def run(x, axes=None, keep_dims=False):
        x = np.asarray(x)
        return fn(x, axis=_axes(axes, x.ndim), keepdims=bool(keep_dims))

    return run


for _name, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min}.items():
    OPS[_name] = _reduce(_fn)


@_op("softmax")
def _softmax(x, axis=-1):
    x = _f32(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


@_op("layer_norm")
def _layer_norm(x, axes, gamma=None, beta=None, epsilon=1e-5):
    x = _f32(x)
    axes = _axes(axes, x.ndim)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(epsilon))
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


@_op("slice_by_index")
def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = np.asarray(x)
    rank = x.ndim
    stride = np.ones(rank, int) if stride is None else np.asarray(stride)
    begin_mask = np.zeros(rank, bool) if begin_mask is None else np.asarray(begin_mask)
    end_mask = np.zeros(rank, bool) if end_mask is None else np.asarray(end_mask)
    squeeze_mask = np.zeros(rank, bool) if squeeze_mask is None else np.asarray(squeeze_mask)
    index = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(int(begin[i]))
            continue
        b = None if begin_mask[i] else int(begin[i])
        e = None if end_mask[i] else int(end[i])
        index.append(slice(b, e, int(stride[i])))
    return x[tuple(index)]


@_op("linear")
def _linear(x, weight, bias=None):
    y = np.matmul(_f32(x), _f32(weight).T)
    return y if bias is None else y + bias


@_op("matmul")
def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = np.asarray(x), np.asarray(y)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@_op("transpose")
def _transpose(x, perm):
    return np.transpose(np.asarray(x), [int(p) for p in perm])


@_op("expand_dims")
def _expand_dims(x, axes):
    x = np.asarray(x)
    rank = x.ndim + len(np.atleast_1d(axes))
    return np.expand_dims(x, tuple(int(a) % rank for a in np.atleast_1d(axes)))


@_op("squeeze")
def _squeeze(x, axes=None):
    x = np.asarray(x)
    return np.squeeze(x, axis=_axes(axes, x.ndim))


@_op("concat")
def _concat(values, axis, interleave=False):
    if interleave:
        raise UnsupportedOpError("concat with interleave")
    return np.concatenate([np.asarray(v) for v in values], axis=int(axis))


@_op("split")
def _split(x, axis, num_splits=None, split_sizes=None):
    x, axis = np.asarray(x), int(axis)
    if split_sizes is None:
        return tuple(np.split(x, int(num_splits), axis=axis))
    return tuple(np.split(x, np.cumsum(split_sizes)[:-1], axis=axis))


@_op("tile")
def _tile(x, reps):
    return np.tile(np.asarray(x), [int(r) for r in reps])


@_op("pad")
def _pad(x, pad, mode="constant", constant_val=0.0):
    x = np.asarray(x)
    pad = [int(p) for p in np.asarray(pad)]
    widths = [(0, 0)] * (x.ndim - len(pad) // 2) + [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=constant_val)
    if mode in ("reflect", "replicate"):
        return np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")
    raise UnsupportedOpError(f"pad mode {mode}")


def _conv_padding(pad_type: str, pad, spatial, kernel, strides, dilations) -> list[tuple[int, int]]:
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    if pad_type == "custom":
        pad = [int(p) for p in np.asarray(pad)]
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(spatial))]
    if pad_type in ("same", "same_lower"):
        widths = []
        for n, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-n // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
            small, big = total // 2, total - total // 2
            widths.append((small, big) if pad_type == "same" else (big, small))
        return widths
    raise UnsupportedOpError(f"conv pad_type {pad_type}")


@_op("conv")
def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    x, w = _f32(x), _f32(weight)
    dims = x.ndim - 2
    if dims != 2:
        x, w = x[..., None], w[..., None]  # a 1-D conv is a 2-D conv over a unit width
    strides = [int(s) for s in (strides if strides is not None else [1] * dims)] + [1] * (2 - dims)
    dilations = [int(d) for d in (dilations if dilations is not None else [1] * dims)] + [1] * (2 - dims)
    widths = _conv_padding(str(pad_type), pad, x.shape[2 : 2 + dims], w.shape[2 : 2 + dims], strides, dilations)
    widths += [(0, 0)] * (2 - dims)
    x = np.pad(x, [(0, 0), (0, 0), *widths])
    groups = int(groups)
    out_c, in_per_group, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilations
    windows = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # (N, C, Ho, Wo, kh, kw)
    per_group = out_c // groups
    outs = [
        np.einsum(
            "nchwij,ocij->nohw",
            windows[:, g * in_per_group : (g + 1) * in_per_group],
            w[g * per_group : (g + 1) * per_group],
            optimize=True,
        )
        for g in range(groups)
    ]
    y = np.concatenate(outs, axis=1) if groups > 1 else outs[0]
    if bias is not None:
        y = y + np.asarray(bias).reshape(1, -1, 1, 1)
    return y if dims == 2 else y[..., 0]


def _bilinear_sources(n_in: int, n_out: int, scale: float, align_corners: bool, half_pixel: bool):
    if align_corners:
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    elif half_pixel:
        src = np.clip((np.arange(n_out) + 0.5) / scale - 0.5, 0, None)
    else:
        src = np.arange(n_out) / scale
    src = np.clip(src, 0, n_in - 1)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, (src - low).astype(np.float32)


def _bilinear(x: np.ndarray, out_h: int, out_w: int, scale_h, scale_w, align_corners, half_pixel) -> np.ndarray:
    x = _f32(x)
    h0, h1, fh = _bilinear_sources(x.shape[-2], out_h, scale_h, align_corners, half_pixel)
    w0, w1, fw = _bilinear_sources(x.shape[-1], out_w, scale_w, align_corners, half_pixel)
    rows = x[..., h0, :] * (1 - fh)[:, None] + x[..., h1, :] * fh[:, None]
    return rows[..., w0] * (1 - fw) + rows[..., w1] * fw


@_op("upsample_bilinear")
def _upsample_bilinear(
    x, scale_factor_height=1.0, scale_factor_width=1.0, align_corners=False, half_pixel_centers=None
):
    x = np.asarray(x)
    sh, sw = float(scale_factor_height), float(scale_factor_width)
    half_pixel = (not align_corners) if half_pixel_centers is None else bool(half_pixel_centers)
    out_h, out_w = int(np.floor(x.shape[-2] * sh)), int(np.floor(x.shape[-1] * sw))
    return _bilinear(x, out_h, out_w, sh, sw, bool(align_corners), half_pixel)


@_op("resize_bilinear")
def _resize_bilinear(x, target_size_height=1, target_size_width=1, sampling_mode="DEFAULT"):
    x = np.asarray(x)
    out_h, out_w = int(target_size_height), int(target_size_width)
    mode = str(sampling_mode)
    # UNALIGN_CORNERS is torch's align_corners=False (half-pixel centres); DEFAULT scales the index without offset.
    if mode not in ("ALIGN_CORNERS", "STRICT_ALIGN_CORNERS", "UNALIGN_CORNERS", "DEFAULT"):
        raise UnsupportedOpError(f"resize_bilinear sampling_mode {mode}")
    align = mode in ("ALIGN_CORNERS", "STRICT_ALIGN_CORNERS")
    return _bilinear(x, out_h, out_w, out_h / x.shape[-2], out_w / x.shape[-1], align, mode == "UNALIGN_CORNERS")


@_op("upsample_nearest_neighbor")
def _upsample_nearest(x, scale_factor_height=1, scale_factor_width=1):
    x = np.asarray(x)
    return np.repeat(np.repeat(x, int(scale_factor_height), axis=-2), int(scale_factor_width), axis=-1)


# ---------------------------------------------------------------------------------------------------------------------


def _np_dtype(mil_type) -> np.dtype | None:
    from coremltools.converters.mil.mil import types

    if types.is_tensor(mil_type):
        mil_type = mil_type.get_primitive()
    if mil_type in (types.str,) or mil_type is None:
        return None
    if mil_type in (types.int4, types.uint4):  # sub-byte values live in int8/uint8 containers
        return np.dtype(np.int8 if mil_type == types.int4 else np.uint8)
    return np.dtype(types.nptype_from_builtin(mil_type))


def _const_value(var) -> Any:
    val = var.val
    if isinstance(val, np.ndarray) and val.dtype.metadata:  # int4/uint4 storage dtypes: plain int8/uint8 values
        val = val.astype(val.dtype.base)
    return val


class MilInterpreter:
    """Runs the ``main`` function of a MIL program on numpy inputs.

    Args:
        program: a MIL program (e.g. from :func:`load_program`).
    """

    def __init__(self, program) -> None:
        self.program = program
        if "main" not in program.functions:
            raise UserError(
                f"the package's program has no main function (functions: {', '.join(program.functions) or 'none'}): "
                "give a package that `ptq4ris export-coreml` wrote"
            )
        self.function = program.functions["main"]
        unknown = sorted(
            {op.op_type for op in self.function.operations if op.op_type not in OPS and op.op_type != "const"}
        )
        if unknown:
            raise UnsupportedOpError(
                f"the MIL interpreter has no implementation of {', '.join(unknown)}: add them to "
                "ios_export.mil_interpreter.OPS (with a test against torch) before checking this package"
            )
        self.input_names = list(self.function.inputs)
        self.output_names = [v.name for v in self.function.outputs]
        self._consts: dict[str, Any] = {}

    def _value(self, var, env: dict[str, Any]) -> Any:
        if var.name in env:
            return env[var.name]
        if var.val is None:
            raise KeyError(f"MIL variable {var.name} used before it is computed")
        if var.name not in self._consts:
            self._consts[var.name] = _const_value(var)
        return self._consts[var.name]

    def run(self, inputs: dict[str, np.ndarray], on_op: Callable | None = None) -> dict[str, np.ndarray]:
        """Execute the program; ``on_op(op, outputs)`` is called after each op (first-divergence reports use it).
        Returns every variable computed, by name."""
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise UserError(f"missing program inputs: {', '.join(missing)} (the program takes {self.input_names})")
        env: dict[str, Any] = {}
        for name, var in self.function.inputs.items():
            value = np.asarray(inputs[name])
            if tuple(value.shape) != tuple(var.shape):
                raise UserError(f"input {name} must have shape {list(var.shape)}, got {list(value.shape)}")
            env[name] = value.astype(_np_dtype(var.sym_type))
        for op in self.function.operations:
            if op.op_type == "const":
                continue
            first = op.outputs[0].name
            if first in self._consts:  # a constexpr weight decompressed on an earlier run
                env[first] = self._consts[first]
                continue
            kwargs = {
                key: [self._value(v, env) for v in var] if isinstance(var, (list, tuple)) else self._value(var, env)
                for key, var in op.inputs.items()
            }
            result = OPS[op.op_type](**kwargs)
            outputs = []
            for var, value in zip(op.outputs, result if isinstance(result, tuple) else (result,)):
                dtype, value = _np_dtype(var.sym_type), np.asarray(value)
                outputs.append(value.astype(dtype) if dtype is not None and value.dtype != dtype else value)
                env[var.name] = outputs[-1]
                if op.op_type.startswith("constexpr_"):
                    self._consts[var.name] = outputs[-1]
            if on_op is not None:
                on_op(op, tuple(outputs))
        return env

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        env = self.run(inputs)
        return {name: env[name] for name in self.output_names}
