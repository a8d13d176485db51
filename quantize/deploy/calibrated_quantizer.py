"""A torchao PT2E ``Quantizer`` that annotates the exported deploy form with the *calibrated* grids.

Standard PT2E quantizers observe ranges themselves; this one fixes them: every GEMM/conv of a
:class:`~quantize.deploy.deploy_form.QuantStream` gets its input grid and per-channel weight grid from calibration,
and every ``bmm`` of a :class:`~quantize.deploy.deploy_form.DeployMatMul` its operand grids. The only observed ranges
are those of the GEMM outputs: XNNPACK delegates a quantized GEMM only with a quantized output, so each GEMM output
is re-quantized to int8 with a range observed on the calibration pairs (the one step the simulation does not
have; parity measures its cost, and :mod:`~quantize.deploy.output_split` gives massive output channels their own
range). One annotated graph serves both backends: the XNNPACK lowering and the Core ML
conversion consume the same converted program.
"""

from __future__ import annotations

import torch
from torch import fx
from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver, ObserverBase
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

from quantize.models.roles import LayerRoles

from .deploy_form import ActGrid, DeployMatMul, QuantStream, WeightGrid

__all__ = ["CalibratedQuantizer", "FixedGridObserver"]

_GEMMS = {torch.ops.aten.linear.default, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default}
_BMM = torch.ops.aten.bmm.default
_EMBEDDING = torch.ops.aten.embedding.default


class FixedGridObserver(ObserverBase):
    """An "observer" that reports a fixed grid, per tensor or per channel (axis 0); it never looks at data."""

    def __init__(
        self,
        scale,
        zero_point,
        dtype=torch.int8,
        qscheme=torch.per_tensor_affine,
        quant_min=-128,
        quant_max=127,
        ch_axis=0,
        is_dynamic=False,
        zero_point_dtype=torch.int32,
        **kwargs,
    ) -> None:
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        self.qscheme, self.quant_min, self.quant_max, self.ch_axis = qscheme, quant_min, quant_max, ch_axis
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(-1))
        self.register_buffer("zero_point", torch.as_tensor(zero_point, dtype=zero_point_dtype).reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_qparams(self):
        return self.scale, self.zero_point


def act_spec(grid: ActGrid) -> QuantizationSpec:
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=grid.qmin,
        quant_max=grid.qmax,
        qscheme=torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=FixedGridObserver.with_args(
            scale=grid.scale, zero_point=grid.zero_point, quant_min=grid.qmin, quant_max=grid.qmax
        ),
    )


def weight_spec(grid: WeightGrid) -> QuantizationSpec:
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=grid.qmin,
        quant_max=grid.qmax,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=FixedGridObserver.with_args(
            scale=grid.scale,
            zero_point=torch.zeros_like(grid.scale, dtype=torch.int32),
            qscheme=torch.per_channel_symmetric,
            quant_min=grid.qmin,
            quant_max=grid.qmax,
        ),
    )


def table_spec(scale: torch.Tensor) -> QuantizationSpec:
    """An embedding table, one scale per row, as uint8 around 128: the form ExecuTorch fuses into
    ``embedding_byte`` (a lookup that dequantizes only the rows it reads)."""
    # Float zero points: the fused lookup kernel takes them in the scales' dtype.
    zero_point = torch.full_like(scale, 128.0)
    return QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_channel_affine,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=FixedGridObserver.with_args(
            scale=scale,
            zero_point=zero_point,
            dtype=torch.uint8,
            qscheme=torch.per_channel_affine,
            quant_min=0,
            quant_max=255,
            zero_point_dtype=torch.float32,
        ),
    )


# How GEMM output ranges are observed. The histogram observer picks the range that minimises the int8 rounding +
# clipping error; on lavt-tiny W8A8 (100 val pairs) it beats min-max: 99.961% vs 99.931% mask agreement, max logit
# difference 13.4 vs 25.1.
OUTPUT_OBSERVERS = {"histogram": HistogramObserver, "minmax": MinMaxObserver}


def output_spec(observer: str = "histogram") -> QuantizationSpec:
    if observer not in OUTPUT_OBSERVERS:
        raise ValueError(f"unknown output observer {observer!r}: choose one of {', '.join(OUTPUT_OBSERVERS)}")
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=OUTPUT_OBSERVERS[observer].with_args(eps=2**-12),
    )


def _owner(node: fx.Node) -> str | None:
    """Fully qualified name of the innermost module that called ``node`` (from torch.export's metadata)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].")


def _word_tables(model: torch.nn.Module) -> list[str]:
    """The word table of every module of ``model`` whose class declares layer roles, as names in ``model``."""
    return [
        f"{prefix}.{roles.word_table}" if prefix else roles.word_table
        for prefix, m in model.named_modules()
        if isinstance(roles := getattr(type(m), "layer_roles", None), LayerRoles) and roles.word_table
    ]


class CalibratedQuantizer(Quantizer):
    """Annotates the GEMMs and attention matmuls of an exported deploy-form model with their calibrated grids.

    Args:
        deploy_model: the module returned by :func:`~quantize.deploy.deploy_form.to_deploy_form` that was exported.
        required: names of the sites the exported program must contain (default: all of them); validation fails
            if one was not found, so a renamed module cannot silently leave a layer in float.
        output_observer: how the int8 ranges of GEMM outputs are observed: ``histogram`` or ``minmax``.
        tables: names of the embedding tables stored in 8 bits (default: the ``word_table`` of every model inside
            ``deploy_model`` that declares its layer roles).
    """

    def __init__(
        self, deploy_model: torch.nn.Module, required=None, output_observer: str = "histogram", tables=None
    ) -> None:
        super().__init__()
        self.output_spec = output_spec(output_observer)
        self.required = None if required is None else set(required)
        self.streams = {n: m for n, m in deploy_model.named_modules() if isinstance(m, QuantStream)}
        self.matmuls = {n: m for n, m in deploy_model.named_modules() if isinstance(m, DeployMatMul)}
        self.tables = set(_word_tables(deploy_model) if tables is None else tables)
        self.annotated: dict[str, int] = {}
        self.embeddings: list[str] = []

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        seen: dict[str, int] = {}
        for node in model.graph.nodes:
            if node.op != "call_function":
                continue
            owner = _owner(node)
            if node.target in _GEMMS and owner in self.streams:
                stream = self.streams[owner]
                x, w = node.args[0], node.args[1]
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={x: act_spec(stream.grid), w: weight_spec(stream.weight_grid)},
                    output_qspec=self.output_spec,
                    _annotated=True,
                )
                seen[owner] = seen.get(owner, 0) + 1
            elif node.target == _BMM and owner in self.matmuls:
                mm = self.matmuls[owner]
                a, b = node.args[0], node.args[1]
                qmap = {b: act_spec(mm.b_grid)}
                if mm.a_grid is not None:
                    qmap[a] = act_spec(mm.a_grid)
                node.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=qmap, _annotated=True)
                seen[owner] = seen.get(owner, 0) + 1
            elif node.target == _EMBEDDING and owner in self.tables and self._annotate_table(model, node):
                self.embeddings.append(owner.removeprefix("model."))
        self.annotated = seen
        return model

    @staticmethod
    def _annotate_table(model: fx.GraphModule, node: fx.Node) -> bool:
        """The word table in 8 bits, one scale per row (ExecuTorch fuses it into ``embedding_byte``). Not part of the
        PTQ4RIS recipe: a lookup costs no compute, only size, and a row keeps half a step of its own range (the
        parity figures include it). The position and token-type tables are read at constant indices and fold
        into one constant at export. A table already quantized (4-bit, by torchao before export) is left alone."""
        weight = node.args[0]
        if weight.op != "get_attr":
            return False
        table = model
        for part in weight.target.split("."):
            table = getattr(table, part)
        scale = (table.detach().abs().amax(dim=1) / 127).clamp(min=2**-20)
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={weight: table_spec(scale)}, _annotated=True
        )
        return True

    def validate(self, model: fx.GraphModule) -> None:
        required = self.required if self.required is not None else set(self.streams) | set(self.matmuls)
        missing = sorted(required - set(self.annotated))
        if missing:
            raise RuntimeError(
                f"{len(missing)} calibrated sites were not found in the exported graph (first: {missing[:3]}): "
                "the model was exported from another module than the deploy form this quantizer was built for"
            )
