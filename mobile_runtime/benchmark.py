"""Host latency and size of ``.pte`` programs, as ratios measured in one run.

Usage::

    python -m mobile_runtime.benchmark float=model.float.pte int8=model.pte w4=w4.pte --threads 1 2

A program is a ``.pte`` (the ExecuTorch runtime, its XNNPACK thread pool at the thread count) or an ``.onnx`` model (ONNX
Runtime's CPU provider with that many intra-op threads), so ONNX Runtime peers are timed in the same rounds.

For each thread count every program is loaded, warmed up, then timed in interleaved rounds (one run of each program
per round, the order rotating), so that the machine's drift hits all of them alike; the table gives the median,
min and mean per program and each median's ratio to the first program's. Absolute times on a shared machine mean
little; the ratios are the result.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from quantize.errors import UserError

__all__ = ["benchmark", "format_benchmark", "main", "program_inputs", "program_size"]


def program_inputs(program) -> list[torch.Tensor]:
    """Inputs of the declared shapes: a random image-like tensor for float inputs; for the integer ones, real-looking
    token ids ([CLS] the red circle left [SEP], then padding) and, for the second, their attention mask."""
    g = torch.Generator().manual_seed(0)
    sentence = [101, 1996, 2417, 4418, 2187, 102]
    inputs, integers = [], 0
    for shape, dtype in zip(program.input_shapes, program.input_dtypes):
        if dtype is not None and not dtype.is_floating_point:
            ids = torch.zeros(shape, dtype=dtype)
            n = min(len(sentence), shape[-1])
            ids[..., :n] = torch.tensor(sentence[:n], dtype=dtype)
            inputs.append(ids if integers == 0 else (ids != 0).to(dtype))
            integers += 1
        else:
            inputs.append(torch.randn(shape, generator=g))
    return inputs


def program_size(path: str | Path) -> int:
    """Bytes a program ships as: a ``.pte`` (or its stage programs), an ``.onnx`` file, or a package folder's files."""
    from .runtime import program_bytes

    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    if path.suffix == ".onnx":
        return path.stat().st_size
    return program_bytes(path)


def _load(path: str | Path, threads: int):
    if Path(path).suffix == ".onnx":
        from .onnxruntime_flow import OrtProgram

        return OrtProgram(path, threads)
    from .runtime import load_full_model

    return load_full_model(path)


def benchmark(programs: dict[str, str | Path], threads: list[int], runs: int = 20, warmup: int = 3) -> dict:
    """Time ``programs`` (name → path) interleaved at each thread count; returns per-thread-count statistics."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    if runs < 1 or warmup < 0:
        raise UserError("runs must be positive and warmup non-negative")
    report = {"runs": runs, "warmup": warmup, "sizes": {n: program_size(p) for n, p in programs.items()}}
    names = list(programs)
    for n_threads in threads:
        # Reset the pool before loading: an XNNPACK runtime keeps the pool it was created with, and resetting it under
        # loaded programs frees that pool beneath them (heap corruption, about one run in two).
        loaded = None
        gc.collect()
        _unsafe_reset_threadpool(n_threads)
        loaded = {name: _load(path, n_threads) for name, path in programs.items()}
        inputs = {name: program_inputs(p) for name, p in loaded.items()}
        for name in names:
            for _ in range(warmup):
                loaded[name](*inputs[name])
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(runs):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                loaded[name](*inputs[name])
                times[name].append(1000 * (time.perf_counter() - start))
        base = statistics.median(times[names[0]])
        report[f"threads={n_threads}"] = {
            name: {
                "median_ms": statistics.median(t),
                "min_ms": min(t),
                "mean_ms": statistics.fmean(t),
                "ratio_to_" + names[0]: statistics.median(t) / base,
            }
            for name, t in times.items()
        }
    return report


def format_benchmark(report: dict) -> str:
    sizes = report["sizes"]
    first = next(iter(sizes))
    lines = [f"{report['runs']} interleaved runs after {report['warmup']} warm-up runs per program", ""]
    lines.append(f"{'program':<14} {'size MB':>8} {'size ratio':>10}")
    for name, size in sizes.items():
        lines.append(f"{name:<14} {size / 1e6:8.2f} {size / sizes[first]:10.3f}")
    for key, stats in report.items():
        if not key.startswith("threads="):
            continue
        lines += ["", f"{key}", f"{'program':<14} {'median ms':>10} {'min ms':>8} {'mean ms':>8} {'ratio':>7}"]
        for name, s in stats.items():
            ratio = next(v for k, v in s.items() if k.startswith("ratio_to_"))
            lines.append(f"{name:<14} {s['median_ms']:10.2f} {s['min_ms']:8.2f} {s['mean_ms']:8.2f} {ratio:7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mobile_runtime.benchmark",
        description="Latency and size of .pte programs, interleaved in one run; ratios are to the first program.",
    )
    p.add_argument("programs", nargs="+", metavar="NAME=PATH", help="programs to compare, the baseline first")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts (default: 1 2)")
    p.add_argument("--runs", type=int, default=20, help="timed rounds (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per program first (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    args = p.parse_args(argv)
    programs = {}
    for item in args.programs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"expected NAME=PATH, got {item!r}")
        programs[name] = path
    report = benchmark(programs, args.threads, args.runs, args.warmup)
    if args.json:
        from quantize.atomic import write_atomic

        write_atomic(Path(args.json), json.dumps(report, indent=2).encode())
    print(format_benchmark(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
