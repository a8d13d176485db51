"""The numpy MIL interpreter, op by op, against torch: each case builds a one-op MIL program with coremltools' builder
and compares the interpreter's output with the torch function the converter maps to that op."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from ios_export.mil_interpreter import OPS, MilInterpreter, UnsupportedOpError

RNG = np.random.default_rng(0)


def _program(fn, **inputs: np.ndarray):
    """A MIL program whose inputs are ``fn``'s parameters (coremltools names them so), fed from ``inputs``."""
    dtypes = {np.dtype(np.float32): types.fp32, np.dtype(np.int32): types.int32}
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    specs = [mb.TensorSpec(shape=inputs[n].shape, dtype=dtypes[inputs[n].dtype]) for n in names]
    return mb.program(input_specs=specs, opset_version=ct.target.iOS18)(fn)


def _run(fn, **inputs: np.ndarray) -> np.ndarray:
    program = _program(fn, **inputs)
    out = MilInterpreter(program)(**inputs)
    return next(iter(out.values()))


def _x(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _close(a, b, atol=1e-5):
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=1e-5)


def test_linear_and_matmul():
    x, w, b = _x(2, 5, 8), _x(6, 8), _x(6)
    _close(_run(lambda x: mb.linear(x=x, weight=w, bias=b), x=x), F.linear(*map(torch.from_numpy, (x, w, b))))
    y = _x(2, 7, 8)
    got = _run(lambda x, y: mb.matmul(x=x, y=y, transpose_y=True), x=x, y=y)
    _close(got, torch.from_numpy(x) @ torch.from_numpy(y).transpose(-1, -2))


@pytest.mark.parametrize("groups,stride,dilation,pad", [(1, 1, 1, 1), (2, 2, 1, 0), (1, 1, 2, 2), (4, 1, 1, 1)])
def test_conv2d(groups, stride, dilation, pad):
    x, w, b = _x(1, 4, 9, 11), _x(8, 4 // groups, 3, 3), _x(8)
    got = _run(
        lambda x: mb.conv(
            x=x,
            weight=w,
            bias=b,
            strides=[stride] * 2,
            pad_type="custom",
            pad=[pad] * 4,
            dilations=[dilation] * 2,
            groups=groups,
        ),
        x=x,
    )
    want = F.conv2d(*map(torch.from_numpy, (x, w, b)), stride=stride, padding=pad, dilation=dilation, groups=groups)
    _close(got, want, atol=1e-4)


def test_conv1d_and_same_padding():
    x, w = _x(1, 3, 10), _x(5, 3, 3)
    _close(
        _run(lambda x: mb.conv(x=x, weight=w, pad_type="valid"), x=x),
        F.conv1d(torch.from_numpy(x), torch.from_numpy(w)),
    )
    x2, w2 = _x(1, 2, 7, 7), _x(3, 2, 3, 3)
    got = _run(lambda x: mb.conv(x=x, weight=w2, pad_type="same"), x=x2)
    _close(got, F.conv2d(torch.from_numpy(x2), torch.from_numpy(w2), padding="same"), atol=1e-4)


def test_quantize_dequantize_match_torch():
    x = (_x(2, 50) * 3).astype(np.float32)
    x[0, :4] = [0.5, 1.5, -0.5, 2.5]  # ties: half to even, as torch
    scale, zp = 0.5, 3
    q = _run(lambda x: mb.quantize(input=x, scale=np.float32(scale), zero_point=np.int8(zp), output_dtype="int8"), x=x)
    want = torch.quantize_per_tensor(torch.from_numpy(x), scale, zp, torch.qint8)
    np.testing.assert_array_equal(q, want.int_repr().numpy())
    deq = _run(
        lambda x: mb.dequantize(
            input=mb.quantize(input=x, scale=np.float32(scale), zero_point=np.int8(zp), output_dtype="int8"),
            scale=np.float32(scale),
            zero_point=np.int8(zp),
        ),
        x=x,
    )
    _close(deq, want.dequantize())


def test_constexpr_blockwise_int8_per_channel_and_int4_per_block():
    data = RNG.integers(-128, 128, (6, 8)).astype(np.int8)
    scale = RNG.uniform(0.01, 0.1, (6, 1)).astype(np.float32)
    x = _x(1, 8)
    got = _run(lambda x: mb.linear(x=x, weight=mb.constexpr_blockwise_shift_scale(data=data, scale=scale)), x=x)
    _close(got, F.linear(torch.from_numpy(x), torch.from_numpy(data.astype(np.float32) * scale)))
    data4 = RNG.integers(-8, 8, (6, 8)).astype(np.int8)
    scale4 = RNG.uniform(0.01, 0.1, (6, 2)).astype(np.float32)  # blocks of 4 input channels
    offset4 = RNG.integers(-2, 3, (6, 2)).astype(np.int8)
    got = _run(
        lambda x: mb.linear(
            x=x,
            weight=mb.constexpr_blockwise_shift_scale(
                data=data4.astype(types.np_int4_dtype), scale=scale4, offset=offset4.astype(types.np_int4_dtype)
            ),
        ),
        x=x,
    )
    dense = (data4.astype(np.float32) - np.repeat(offset4, 4, axis=1)) * np.repeat(scale4, 4, axis=1)
    _close(got, F.linear(torch.from_numpy(x), torch.from_numpy(dense)))


@pytest.mark.parametrize("mode,approx", [("EXACT", "none"), ("TANH_APPROXIMATION", "tanh")])
def test_gelu(mode, approx):
    x = _x(3, 17) * 4
    _close(_run(lambda x: mb.gelu(x=x, mode=mode), x=x), F.gelu(torch.from_numpy(x), approximate=approx), atol=1e-5)


def test_softmax_layer_norm_reductions():
    x = _x(2, 3, 16) * 5
    t = torch.from_numpy(x)
    _close(_run(lambda x: mb.softmax(x=x, axis=-1), x=x), torch.softmax(t, -1), atol=1e-6)
    g, b = _x(16), _x(16)
    got = _run(lambda x: mb.layer_norm(x=x, axes=[-1], gamma=g, beta=b, epsilon=1e-5), x=x)
    _close(got, F.layer_norm(t, (16,), torch.from_numpy(g), torch.from_numpy(b)), atol=1e-5)
    _close(_run(lambda x: mb.reduce_mean(x=x, axes=[-2, -1], keep_dims=True), x=x), t.mean((-2, -1), keepdim=True))
    _close(_run(lambda x: mb.reduce_sum(x=x, axes=[1], keep_dims=False), x=x), t.sum(1), atol=1e-5)
    y = np.abs(x) + 0.1
    _close(_run(lambda x: mb.rsqrt(x=x, epsilon=1e-6), x=y), torch.rsqrt(torch.from_numpy(y) + 1e-6), atol=1e-4)


@pytest.mark.parametrize("align_corners", [True, False])
def test_upsample_bilinear(align_corners):
    x = _x(1, 3, 4, 5)
    got = _run(
        lambda x: mb.upsample_bilinear(
            x=x, scale_factor_height=2.0, scale_factor_width=4.0, align_corners=align_corners
        ),
        x=x,
    )
    want = F.interpolate(torch.from_numpy(x), scale_factor=(2, 4), mode="bilinear", align_corners=align_corners)
    _close(got, want, atol=1e-5)


def test_resize_bilinear_half_pixel():
    x = _x(1, 2, 5, 6)
    got = _run(
        lambda x: mb.resize_bilinear(x=x, target_size_height=8, target_size_width=9, sampling_mode="UNALIGN_CORNERS"),
        x=x,
    )
    _close(got, F.interpolate(torch.from_numpy(x), size=(8, 9), mode="bilinear", align_corners=False), atol=1e-5)


def test_shape_ops():
    x = _x(2, 3, 4, 5)
    t = torch.from_numpy(x)
    _close(_run(lambda x: mb.transpose(x=x, perm=[0, 2, 1, 3]), x=x), t.permute(0, 2, 1, 3))
    _close(_run(lambda x: mb.reshape(x=x, shape=[2, -1, 5]), x=x), t.reshape(2, -1, 5))
    _close(_run(lambda x: mb.expand_dims(x=x, axes=[-1]), x=x), t.unsqueeze(-1))
    _close(_run(lambda x: mb.squeeze(x=mb.expand_dims(x=x, axes=[1]), axes=[1]), x=x), t)
    _close(_run(lambda x: mb.concat(values=[x, x], axis=1), x=x), torch.cat([t, t], 1))
    got = _run(lambda x: mb.slice_by_index(x=x, begin=[0, 1, 0, 1], end=[2, 3, 4, 5], stride=[1, 1, 2, 2]), x=x)
    _close(got, t[:, 1:3, ::2, 1::2])
    got = _run(
        lambda x: mb.slice_by_index(
            x=x,
            begin=[1, 0, 0, 0],
            end=[2, 3, 4, 2],
            end_mask=[False, True, True, False],
            squeeze_mask=[True, False, False, False],
        ),
        x=x,
    )
    _close(got, t[1, :, :, :2])
    _close(
        _run(lambda x: mb.pad(x=x, pad=[1, 2, 0, 3], mode="constant", constant_val=0.5), x=x),
        F.pad(t, (0, 3, 1, 2), value=0.5),
    )


def _binary(op):
    return lambda x, y: op(x=x, y=y)


def _unary(op):
    return lambda x: op(x=x)


def test_elementwise_ops():
    x, y = _x(4, 6) * 3, _x(4, 6)
    t, u = torch.from_numpy(x), torch.from_numpy(y)
    for op, want in (
        (mb.add, t + u),
        (mb.sub, t - u),
        (mb.mul, t * u),
        (mb.real_div, t / u),
        (mb.maximum, torch.maximum(t, u)),
    ):
        _close(_run(_binary(op), x=x, y=y), want, atol=1e-5)
    for op, want in ((mb.floor, t.floor()), (mb.relu, t.relu()), (mb.tanh, t.tanh()), (mb.sigmoid, t.sigmoid())):
        _close(_run(_unary(op), x=x), want, atol=1e-6)
    _close(_run(lambda x: mb.clip(x=x, alpha=-1.0, beta=2.0), x=x), t.clamp(-1, 2))
    got = _run(lambda x, y: mb.select(cond=mb.greater_equal(x=x, y=y), a=x, b=y), x=x, y=y)
    _close(got, torch.where(t >= u, t, u))


def test_gather_and_casts():
    table = _x(10, 4)
    ids = np.array([[3, -1, 0, 9]], dtype=np.int32)
    got = _run(lambda ids: mb.gather(x=table, indices=ids, axis=0), ids=ids)
    _close(got, torch.from_numpy(table)[torch.from_numpy(ids).long() % 10])
    got = _run(lambda ids: mb.mul(x=mb.cast(x=ids, dtype="fp32"), y=np.float32(0.5)), ids=ids)
    _close(got, ids.astype(np.float32) * 0.5)


def test_fp16_storage_is_emulated():
    """A value cast to fp16 is stored in fp16, as on the device: 1 + 2^-12 is not representable there."""
    x = np.full((1, 4), 1.0 + 2.0**-12, dtype=np.float32)
    got = _run(lambda x: mb.cast(x=mb.add(x=mb.cast(x=x, dtype="fp16"), y=np.float16(0.0)), dtype="fp32"), x=x)
    assert got.dtype == np.float32 and np.all(got == 1.0)
    _close(got, torch.from_numpy(x).half().float())


def test_unknown_op_is_refused_by_name():
    assert "sin" not in OPS
    program = _program(lambda x: mb.sin(x=x), x=_x(2, 2))
    with pytest.raises(UnsupportedOpError, match="sin"):
        MilInterpreter(program)


def test_wrong_input_shape_is_named():
    program = _program(lambda x: mb.relu(x=x), x=_x(2, 3))
    with pytest.raises(ValueError, match=r"input x must have shape \[2, 3\]"):
        MilInterpreter(program)(x=_x(3, 3))
