"""The stock ExecuTorch XNNPACKQuantizer baseline: lavt-tiny calibrated and checked on ShapesRef scenes (one W8A8
quantization, ~25 s), bit-width ordering and options on a small conv/linear model (seconds).

On lavt-tiny the stock flow keeps >90% of pixels' argmax but loses the foreground (the referred object) even at W8A8:
PWAM's additive -1e4 word mask and its wide products go through per-tensor quantized adds/muls. That is the baseline's
finding, not asserted here, since any model change may move it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantize.calibration.stock_xnnpack import StockQuantSummary, stock_xnnpack_quantize
from quantize.data.preprocess import Tokenizer, image_to_tensor
from quantize.data.shapesref import ShapesRefGenerator
from quantize.models import build_model, text_encoder_dir

SIZE = 128


def _pairs(start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` (image, input_ids, attention_mask) from ShapesRef val scenes: the data lavt-tiny was trained on."""
    gen = ShapesRefGenerator(seed=0)
    images, sentences = [], []
    index = start
    while len(images) < count:
        scene = gen.scene("val", index)
        index += 1
        expressions = [e for per_object in scene.expressions for e in per_object]
        if expressions:
            images.append(image_to_tensor(scene.image, SIZE))
            sentences.append(expressions[0].text)
    ids, mask = Tokenizer(text_encoder_dir()).batch(sentences)
    return torch.stack(images), ids, mask


@pytest.fixture(scope="module")
def model():
    return build_model("lavt-tiny").eval()


@pytest.fixture(scope="module")
def data():
    calib_image, calib_ids, calib_mask = _pairs(0, 3)
    # Pair by pair (batch 1), so the batch-1 path of the dynamic-batch export is exercised too.
    calibration = [(calib_image[i : i + 1], calib_ids[i : i + 1], calib_mask[i : i + 1]) for i in range(3)]
    evaluation = _pairs(100, 6)
    return calibration, evaluation


@pytest.fixture(scope="module")
def float_logits(model, data):
    with torch.no_grad():
        return model(*data[1])


@pytest.fixture(scope="module")
def w8a8(model, data):
    return stock_xnnpack_quantize(model, data[0], weight_bits=8, act_bits=8)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def test_w8a8_close_to_float_but_quantized(w8a8, data, float_logits):
    w8a8.eval()  # evaluation loops call it; exported modules refuse it unless allowed
    with torch.no_grad():
        q = w8a8(*data[1])
    assert q.shape == float_logits.shape
    assert not torch.equal(q, float_logits), "output bit-identical to float: nothing was quantized"
    assert (q - float_logits).abs().max().item() > 1e-4
    assert _agreement(q, float_logits) > 0.9


def test_dynamic_batch(w8a8, data, float_logits):
    assert w8a8.stock_summary.dynamic_batch
    image, ids, mask = data[1]
    with torch.no_grad():
        one = w8a8(image[:1], ids[:1], mask[:1])
        full = w8a8(image, ids, mask)
    assert one.shape == (1, 2, SIZE, SIZE)
    # Conv kernels may pick another algorithm for another batch size, and a float difference of 1e-6 can move a value
    # across a rounding boundary of the next 8-bit grid: the masks, not the last bits of the logits, must match.
    assert (one.argmax(1) == full[:1].argmax(1)).float().mean() > 0.99


def test_summary_counts(w8a8):
    s = w8a8.stock_summary
    assert isinstance(s, StockQuantSummary)
    assert (s.weight_bits, s.act_bits, s.per_channel, s.calibration_batches) == (8, 8, True, 3)
    for op in ("linear", "conv2d", "conv1d"):
        assert s.total(op) > 0 and s.quantized(op) == s.total(op), (op, s.ops.get(op))
    assert s.quantized("add") > 0 and s.quantized("mul") > 0
    # What the stock quantizer leaves in float: attention matmuls, softmax, GELU.
    for op in ("bmm", "softmax", "gelu"):
        assert s.total(op) > 0 and s.quantized(op) == 0, (op, s.ops.get(op))
    assert "softmax" in s.float_ops()
    assert "linear" in s.table()


class _Small(nn.Module):
    """conv -> relu -> tokens -> residual linear -> softmax (left in float) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).relu().flatten(2).transpose(1, 2)
        t = t + self.proj(t)
        return self.head(t.softmax(-1) * 4.0)


def _smooth(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = _Small().eval()
    calibration = [(_smooth(4, seed),) for seed in range(4)]
    x = _smooth(8, 100)
    with torch.no_grad():
        ref = model(x)
    return model, calibration, x, ref


def _rel_err(q: torch.Tensor, ref: torch.Tensor) -> float:
    return ((q - ref).norm() / ref.norm()).item()


def test_w4a4_deviates_more(small):
    model, calibration, x, ref = small
    errors = {}
    for bits in (8, 4):
        q = stock_xnnpack_quantize(model, calibration, weight_bits=bits, act_bits=bits)
        assert (q.stock_summary.weight_bits, q.stock_summary.act_bits) == (bits, bits)
        with torch.no_grad():
            errors[bits] = _rel_err(q(x), ref)
    assert 0 < errors[8] < 0.05
    assert errors[4] > 2 * errors[8]


def test_small_model_summary_and_options(small):
    model, calibration, x, ref = small
    q = stock_xnnpack_quantize(model, calibration, weight_bits=8, act_bits=8, per_channel=False, dynamic_batch=False)
    s = q.stock_summary
    assert not s.per_channel and not s.dynamic_batch and s.calibration_batches == 4
    assert s.ops["linear"] == (2, 2) and s.ops["conv2d"] == (1, 1) and s.ops["add"] == (1, 1)
    assert s.ops["softmax"] == (0, 1)
    targets = {str(n.target) for n in q.graph.nodes if n.op == "call_function"}
    assert not any("per_channel" in t for t in targets)
    with torch.no_grad():
        assert _rel_err(q(x[:4]), ref[:4]) < 0.05  # the fixed batch is the calibration tuples' (4)
    with pytest.raises(ValueError, match="batch 4"):
        stock_xnnpack_quantize(model, [calibration[0], (x,)], weight_bits=8, act_bits=8, dynamic_batch=False)


@pytest.mark.parametrize("bits", [1, 9, 0, -8, 4.0, True, None])
def test_bad_bits_raise(bits):
    example = (torch.zeros(1, 3, SIZE, SIZE), torch.zeros(1, 20, dtype=torch.long), torch.ones(1, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="weight_bits"):
        stock_xnnpack_quantize(torch.nn.Identity(), [example], weight_bits=bits, act_bits=8)
    with pytest.raises(ValueError, match="act_bits"):
        stock_xnnpack_quantize(torch.nn.Identity(), [example], weight_bits=8, act_bits=bits)


def test_bad_calibration_inputs_raise():
    with pytest.raises(ValueError, match="empty"):
        stock_xnnpack_quantize(torch.nn.Identity(), [], weight_bits=8, act_bits=8)
    mismatched = (torch.zeros(2, 3, SIZE, SIZE), torch.zeros(1, 20, dtype=torch.long), torch.ones(1, 20))
    with pytest.raises(ValueError, match="batch"):
        stock_xnnpack_quantize(torch.nn.Identity(), [mismatched], weight_bits=8, act_bits=8)
