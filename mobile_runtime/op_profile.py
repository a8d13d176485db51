"""Where a ``.pte`` forward spends its time on the host, by XNNPACK operator kind (from an ETDump run).

Each XNNPACK operator is an ETDump event named like ``Fully Connected (NC, QS8, QC8W) GEMM #12``; without its ``#n``
the name is the operator's kind (operation, layout, data types, variant). :func:`op_time_by_kind` runs a program a
few times with ETDump on and gives, per kind, the operators per forward and their median time per forward;
:data:`OP_GROUPS` folds kinds into the groups the per-op table shows (GEMMs, data movement, converts, ...).
"""

from __future__ import annotations

import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

__all__ = ["OP_GROUPS", "group_of", "op_time_by_kind", "op_time_by_group"]

# Operator name prefixes of each group, first match wins (XNNPACK's operator names, e.g. "Batch Matrix Multiply").
OP_GROUPS: dict[str, tuple[str, ...]] = {
    # QS8/QC8: static int8 activations; QD8/QDU8: activations quantized dynamically inside the operator.
    "int8 GEMM / conv": ("Fully Connected (NC, QS8", "Fully Connected (NC, QD8", "Fully Connected (NC, QDU8",
                         "Convolution (NHWC, QC8", "Convolution (NHWC, QS8", "Convolution (NHWC, QD8",
                         "Convolution (NHWC, QDU8", "Batch Matrix Multiply (NC, QS8", "Batch Matrix Multiply (NC, QD8",
                         "Batch Matrix Multiply (NC, QDU8"),
    "float GEMM / conv": ("Fully Connected", "Convolution", "Batch Matrix Multiply"),
    "transpose / copy / slice": ("Transpose", "Copy", "Slice", "Concatenate", "Even Split", "Static Reshape",
                                 "Static Constant Pad", "Depth To Space", "Space To Depth"),
    "convert (quantize / dequantize)": ("Convert",),
    "softmax / GELU / norm": ("Softmax", "GELU", "Mean", "Sum", "Square Root", "Reciprocal Square Root", "Tanh",
                              "Sigmoid", "Exp"),
    "element-wise": ("Add", "Subtract", "Multiply", "Divide", "Clamp", "Floor", "Ceiling", "Round", "Maximum",
                     "Minimum", "Negate", "Absolute", "Square", "Copy Sign"),
}  # fmt: skip


def group_of(kind: str) -> str:
    for group, prefixes in OP_GROUPS.items():
        if kind.startswith(prefixes):
            return group
    return "other"


def op_time_by_kind(pte: str | Path, inputs: tuple[torch.Tensor, ...], runs: int = 5) -> dict[str, dict[str, float]]:
    """``{kind: {"count": operators per forward, "ms": median time per forward}}`` over ``runs`` forwards after a
    warm-up one, on this machine's ExecuTorch runtime."""
    import executorch.kernels.quantized  # noqa: F401  (registers embedding_byte)
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime, Verification

    from .runtime import check_pte_file, probe_programs

    check_pte_file(pte)
    probe_programs(pte)
    program = Runtime.get().load_program(
        Path(pte).read_bytes(), verification=Verification.Minimal, enable_etdump=True, debug_buffer_size=0
    )
    method = program.load_method("forward")
    args = [x.contiguous() for x in inputs]
    for _ in range(1 + runs):
        method.execute(args)
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * runs)
    count: dict[str, int] = defaultdict(int)
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "run.etdp"
        program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        inspector = Inspector(etdump_path=str(etdump))
        for block in inspector.event_blocks:
            for event in block.events:
                kind = (event.name or "").split(" #")[0]
                if not event.is_delegated_op or event.perf_data is None or "(" not in kind:
                    continue
                raw = list(event.perf_data.raw)[-runs:]  # the warm-up forward (weight packing) left out
                count[kind] += 1
                for r, ms in enumerate(raw):
                    per_run[kind][r] += ms
    return {
        kind: {"count": count[kind], "ms": statistics.median(times)}
        for kind, times in sorted(per_run.items(), key=lambda kv: -statistics.median(kv[1]))
    }


def op_time_by_group(by_kind: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """:func:`op_time_by_kind` folded into :data:`OP_GROUPS` (plus ``other``)."""
    groups: dict[str, dict[str, float]] = {g: {"count": 0, "ms": 0.0} for g in (*OP_GROUPS, "other")}
    for kind, stats in by_kind.items():
        g = groups[group_of(kind)]
        g["count"] += stats["count"]
        g["ms"] += stats["ms"]
    return {g: s for g, s in groups.items() if s["count"]}
