"""One child process of the demo's ``.pte`` lowering (:class:`demo.pipeline.PteExport`)::

    python -m demo.lower_pte --quantized DIR --out MODEL.pte --report REPORT.json \\
        --stages visual [--no-float]

It lowers as ``ptq4ris export-pte`` does, with the same defaults, but writes the lowering report of its own programs
to ``--report``: the children run side by side, and the demo merges their reports into the one
``<name>.lowering.json``, so no two processes write the same file.
"""

from __future__ import annotations

import argparse
import sys

from quantize.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.lower_pte", description=__doc__.split("\n\n")[0])
    p.add_argument("--quantized", required=True, help="folder written by `ptq4ris calibrate`")
    p.add_argument("--out", required=True, help="the full model's .pte; the programs are written beside it")
    p.add_argument("--report", required=True, help="where this child writes the report of its programs")
    p.add_argument("--stages", nargs="+", required=True, choices=["full", "text", "visual"])
    p.add_argument("--no-float", action="store_true", help="skip the float program")
    args = p.parse_args(argv)
    from mobile_runtime.export_pte import export_artifact

    try:
        export_artifact(
            args.quantized,
            args.out,
            stages=tuple(args.stages),
            float_program=not args.no_float,
            report_path=args.report,
            log=lambda *a: print(*a, file=sys.stderr, flush=True),
        )
    except UserError as e:  # one line in the child's log, as the command line prints it
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
