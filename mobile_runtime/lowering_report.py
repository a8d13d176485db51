"""The lowering report: for every program, how each calibrated quantizer was lowered, what XNNPACK took and what it
left, and (from an ETDump run) the XNNPACK kernels that actually executed — the proof that int8 kernels run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

__all__ = ["REPORT_VERSION", "delegation_summary", "format_report", "kernel_names", "program_report"]

REPORT_VERSION = 1
# Fallbacks that the model rewrites exist to avoid; any of them left in a program is a defect, not a detail.
FORBIDDEN_FALLBACKS = ("native_layer_norm", "roll", "select", "expand_copy")
# Graph plumbing that is not computation.
_PLUMBING = {"alloc", "getitem", "output", "placeholder", "get_attr"}


def delegation_summary(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """Partitions, delegated and non-delegated node counts, and every non-delegated op with its count."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    left = {
        op: b.non_delegated
        for op, b in sorted(info.delegation_by_operator.items())
        if b.non_delegated and op not in _PLUMBING
    }
    return {
        "partitions": info.num_delegated_subgraphs,
        "delegated_nodes": info.num_delegated_nodes,
        "non_delegated_nodes": sum(left.values()),
        "non_delegated_ops": left,
        "forbidden_fallbacks": sorted(op for op in left if any(f in op for f in FORBIDDEN_FALLBACKS)),
    }


def kernel_names(pte: bytes | str | Path, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Run ``pte`` once with ETDump on and count the XNNPACK operator events by name (e.g. ``Fully Connected (NC,
    QS8, QC8W)``)."""
    import tempfile

    import executorch.kernels.quantized  # noqa: F401  (registers embedding_byte)
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime, Verification

    data = Path(pte).read_bytes() if not isinstance(pte, bytes) else pte
    runtime = Runtime.get()
    program = runtime.load_program(data, verification=Verification.Minimal, enable_etdump=True, debug_buffer_size=0)
    method = program.load_method("forward")
    method.execute([x.contiguous() for x in inputs])
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "run.etdp"
        program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        inspector = Inspector(etdump_path=str(etdump))
        counts: Counter[str] = Counter()
        for block in inspector.event_blocks:
            for event in block.events:
                name = (event.name or "").split(" #")[0]  # "Fully Connected (NC, QS8, QC8W) GEMM #12"
                if "(" in name and "," in name:  # XNNPACK operator events: "Kind (layout, types) variant"
                    counts[name] += 1
    return dict(sorted(counts.items()))


def program_report(result, kernels: dict[str, int] | None = None) -> dict[str, Any]:
    """The report entry of one :class:`~mobile_runtime.export_pte.ExportResult`."""
    ways = Counter(s.lowered_as for s in result.sites)
    storage = Counter(s.weight_storage for s in result.sites if s.weight_storage)
    return {
        "stage": result.stage,
        "quantized": result.quantized,
        "bytes": len(result.buffer),
        "input_shapes": result.input_shapes,
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
        "delegation": result.delegation,
        "lowered_as": dict(sorted(ways.items())),
        "weight_storage": dict(sorted(storage.items())),
        "kernels": kernels or {},
        "sites": [s.to_dict() for s in result.sites],
    }


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of a report written by ``ptq4ris export-pte``."""
    recipe = report.get("recipe", {})
    lines = [f"lowering report: {report.get('artifact', '?')} ({recipe.get('method', '?')} {recipe.get('bits', '')})"]
    for name, prog in report["programs"].items():
        d = prog["delegation"]
        lines.append("")
        lines.append(
            f"{name}: {prog['bytes'] / 1e6:.2f} MB, {d['partitions']} XNNPACK partition(s), "
            f"{d['delegated_nodes']} nodes delegated, {d['non_delegated_nodes']} not"
        )
        for op, n in d["non_delegated_ops"].items():
            lines.append(f"    not delegated: {op} x{n}")
        if d["forbidden_fallbacks"]:
            lines.append(f"    FALLBACKS THAT SHOULD NOT BE THERE: {', '.join(d['forbidden_fallbacks'])}")
        for way, n in prog["lowered_as"].items():
            lines.append(f"    {n:4d} sites lowered as {way}")
        for storage, n in prog["weight_storage"].items():
            lines.append(f"    {n:4d} weight tensors stored as {storage}")
        for kernel, n in prog["kernels"].items():
            lines.append(f"    kernel {kernel} x{n}")
    return "\n".join(lines)
