"""Does the phone compute what the host simulated, and how fast? The device harness.

    python tests/device_parity.py [--adb [--serial S] [--runner NDK_RUNNER]] [--pte runs/demo/android/lavt-tiny-w8a8.pte]
                                  [--quantized runs/demo/lavt-tiny-w8a8] [--pairs 4] [--threads 1] [--runs 3]

With ``--adb`` it runs on a phone: finds it, checks it is authorized and arm64-v8a, pushes the runner (the aarch64
glibc build with its loader and libraries, or an NDK-built runner via ``--runner``), the ``.pte`` programs and real
input tensors into ``/data/local/tmp/ptq4ris-<pid>``, pins to the big cores, times every stage program and the full
model int8 vs float, reads the thermal state before and after, pulls the outputs, compares them with the host's x86
results and the simulated model, and removes its folder. Without ``--adb`` the same steps run on an emulated phone:
the aarch64 runner under ``qemu-aarch64 -cpu cortex-a76`` on this machine (latencies then mean nothing as phone
figures; the numerics are ARM's). Prints a table, ``--json FILE`` writes the report; exits 1 if the mask agreement
with the simulated model on the val pairs falls below ``--min-agreement``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from mobile_runtime.export_pte import program_paths
from mobile_runtime.native_runner import RunResult, read_outputs, write_inputs
from mobile_runtime.runtime import check_pte_file, load_full_model, stage_paths
from quantize.deploy.parity_stats import NATURAL_PHOTOS, ParityAccumulator, lsb, natural_photo_pairs
from quantize.deploy.stages import stage_inputs


class EmulatedPhone:
    """The aarch64 runner under qemu on this machine."""

    kind = "emulated arm64 (qemu-aarch64 -cpu cortex-a76)"

    def __init__(self, runner: str | None, timeout: float) -> None:
        from mobile_runtime.native_runner import NativeRunner, build_runner

        binary = runner or build_runner("aarch64", log=lambda *a: print(*a, file=sys.stderr))
        self.runner = NativeRunner(binary, emulate=True, timeout=timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def thermal(self) -> dict:
        return {}

    def run(self, pte: Path, inputs, threads: int, warmup: int, runs: int) -> RunResult:
        return self.runner.run(pte, inputs, warmup=warmup, runs=runs, threads=threads)


class AdbPhone:
    """A phone over adb: one session folder for the whole check, programs pushed once."""

    def __init__(self, adb: str, serial: str | None, runner: str | None, timeout: float) -> None:
        from mobile_runtime.adb import Adb, DeviceSession, glibc_bundle
        from mobile_runtime.native_runner import aarch64_executorch_root, build_runner

        self.device = Adb.connect(adb, serial)
        if runner:
            bundle, ndk = [Path(runner)], True
        else:
            binary = build_runner("aarch64", log=lambda *a: print(*a, file=sys.stderr))
            bundle, ndk = glibc_bundle(binary, aarch64_executorch_root(Path("build")) / "lib"), False
        self.kind = f"adb device {self.device.serial} ({self.device.getprop('ro.product.model') or 'unknown model'})"
        self.session = DeviceSession(self.device, f"ptq4ris-{os.getpid()}", bundle, ndk=ndk)
        self.timeout = timeout
        self.programs: dict[Path, object] = {}

    def __enter__(self):
        self.session.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.session.__exit__(*exc)

    def thermal(self) -> dict:
        return self.device.thermal()

    def run(self, pte: Path, inputs, threads: int, warmup: int, runs: int) -> RunResult:
        if pte not in self.programs:
            check_pte_file(pte)  # a damaged program is named here, not by the phone's loader
            self.programs[pte] = self.session.push(pte)
        with tempfile.TemporaryDirectory(prefix="ptq4ris-io-") as tmp:
            folder = Path(tmp)
            remote_inputs = [self.session.push(p) for p in write_inputs(inputs, folder)]
            report = self.session.run(self.programs[pte], remote_inputs, threads, warmup, runs, self.timeout)
            for i in range(len(report["outputs"])):
                self.device.pull(self.session.root / f"output{i}.bin", folder / f"output{i}.bin")
            return RunResult(read_outputs(report, folder), report["latency_ms"], report["threads"], report["runs"])


def _pairs(model, config, refer_root: str, count: int, photos: int):
    """(set, name, image, ids, mask) for the first ``count`` val pairs and the first ``photos`` natural photographs."""
    from quantize.data import open_split

    calib = config.get("calibration", {})
    data = open_split(refer_root, calib.get("dataset", "shapesref"), calib.get("split_by", "unc"), "val", model.config)
    tokenizer = data.tokenizer
    pairs = []
    for i in range(min(count, len(data))):
        item = data[i]
        pairs.append(("val", i, item["image"][None], item["input_ids"][None], item["attention_mask"][None]))
    shots = [("photos", *p) for p in list(natural_photo_pairs(tokenizer, model.config.swin.img_size))[:photos]]
    return pairs + shots


@torch.no_grad()
def check(
    phone,
    pte: Path,
    quantized: str,
    refer_root: str,
    pairs: int,
    threads: list[int],
    warmup: int,
    runs: int,
    photos: int = len(NATURAL_PHOTOS),
):
    from quantize.calibration.artifact import load_quantized

    model, recipe, config = load_quantized(quantized)
    inputs = _pairs(model, config, refer_root, pairs, photos)
    paths = program_paths(pte)
    report = {"device": phone.kind, "pte": str(pte), "recipe": f"{recipe.method} {recipe.bits}", "programs": {}}
    report["thermal_before"] = phone.thermal()
    _, _, image, ids, mask = inputs[0]
    for name in ("full", "text", "visual", "float"):
        if not paths[name].is_file():
            report["programs"][name] = {"skipped": f"{paths[name].name} not found (export it with export-pte)"}
            continue
        stage = "full" if name == "float" else name
        program_inputs = stage_inputs(model, stage, image, ids, mask)
        timings = {}
        for t in threads:
            result = phone.run(paths[name], program_inputs, threads=t, warmup=warmup, runs=runs)
            timings[str(t)] = result.latency_ms
        report["programs"][name] = {"latency_ms": timings, "bytes": paths[name].stat().st_size}
    host = load_full_model(pte)
    accs = {"val": ParityAccumulator(), "photos": ParityAccumulator()}
    max_lsb = dict.fromkeys(accs, 0.0)

    def on_device(image, ids, mask):
        """Logits on the device: the full program, or the stage programs chained as the Android app runs them."""
        if pte.is_file():
            return phone.run(pte, (image, ids, mask), threads=threads[0], warmup=0, runs=1).outputs[0]
        features = phone.run(paths["text"], (ids, mask), threads=threads[0], warmup=0, runs=1).outputs[0]
        return phone.run(paths["visual"], (image, features, mask), threads=threads[0], warmup=0, runs=1).outputs[0]

    for which, key, image, ids, mask in inputs:
        arm = on_device(image, ids, mask)
        x86 = host(image, ids, mask)
        max_lsb[which] = max(max_lsb[which], float((arm - x86).abs().max()) / lsb(x86))
        accs[which].update(key, model(image, ids, mask)[0], arm[0])
    report["parity"] = {k: acc.summary() | {"device_vs_x86_max_lsb": max_lsb[k]} for k, acc in accs.items()}
    report["thermal_after"] = phone.thermal()
    return report


def format_report(report: dict) -> str:
    lines = [f"device parity: {report['pte']} ({report['recipe']}) on {report['device']}", ""]
    float_ms = report["programs"].get("float", {}).get("latency_ms", {})
    for name, prog in report["programs"].items():
        if "skipped" in prog:
            lines.append(f"  {name:<7} skipped: {prog['skipped']}")
            continue
        cells = []
        for t, ms in prog["latency_ms"].items():
            ratio = f" ({ms['median'] / float_ms[t]['median']:.2f}x float)" if t in float_ms else ""
            cells.append(f"{t} thread(s): median {ms['median']:.1f} ms{ratio}")
        lines.append(f"  {name:<7} " + "; ".join(cells))
    lines.append("")
    for which, p in report["parity"].items():
        lines.append(
            f"  {which}: {p['pairs']} inputs, mask agreement with the simulated model {p['mask_agreement']:.3f}%, "
            f"max |Δlogit| {p['max_abs_logit_diff']:.3f} ({p['max_logit_diff_lsb']:.1f} LSB); device vs host x86 "
            f"{p['device_vs_x86_max_lsb']:.3f} LSB"
        )
    if report.get("thermal_before"):
        hottest = lambda t: max(t.values()) if t else float("nan")
        lines.append(f"  thermal: {hottest(report['thermal_before']):.1f} °C before, "
                     f"{hottest(report['thermal_after']):.1f} °C after (hottest zone)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/device_parity.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--adb", action="store_true", help="run on a phone over adb (default: an emulated arm64 phone)")
    p.add_argument("--serial", default=None, help="with --adb: the device to use when several are attached")
    p.add_argument("--adb-path", default=os.environ.get("ADB", "adb"), help="the adb executable (default: $ADB or adb)")
    p.add_argument("--runner", default=None, help="an NDK-built ptq4ris_runner to push instead of the glibc build")
    p.add_argument("--pte", default="runs/demo/android/lavt-tiny-w8a8.pte", help="full-model program; stage and "
                   "float programs are taken from beside it, and when only the stage programs were exported (as "
                   "`ptq4ris demo` does) parity runs them chained (default: %(default)s, written by `make demo`)")  # fmt: skip
    p.add_argument("--quantized", default="runs/demo/lavt-tiny-w8a8", help="the artifact the programs were exported "
                   "from (default: %(default)s)")  # fmt: skip
    p.add_argument("--refer-root", default="data", help="refer root with the val split (default: %(default)s)")
    p.add_argument(
        "--pairs", type=int, default=8, help="val pairs checked (plus the photographs) (default: %(default)s)"
    )
    p.add_argument(
        "--photos",
        type=int,
        default=len(NATURAL_PHOTOS),
        choices=range(len(NATURAL_PHOTOS) + 1),
        metavar="N",
        help="natural photographs with typed expressions checked, the first N of those `ptq4ris parity` uses "
        "(default: all %(default)s)",
    )
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts timed (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per timing (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per program (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one runner call may take (default: %(default)s)")
    p.add_argument("--min-agreement", type=float, default=99.5, help="fail below this mask agreement %% on the "
                   "val pairs (default: %(default)s)")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    args = p.parse_args(argv)
    pte = Path(args.pte)
    if not pte.is_file() and not all(p.is_file() for p in stage_paths(pte)):
        print(f"error: no program at {pte} (nor its text and visual stage programs): run `make demo` or "
              f"`ptq4ris export-pte --out {pte}`", file=sys.stderr)  # fmt: skip
        return 2
    from mobile_runtime.adb import AdbError
    from mobile_runtime.native_runner import ToolMissing

    try:
        phone = (
            AdbPhone(args.adb_path, args.serial, args.runner, args.timeout)
            if args.adb
            else EmulatedPhone(args.runner, args.timeout)
        )
        with phone:
            report = check(
                phone,
                pte,
                args.quantized,
                args.refer_root,
                args.pairs,
                args.threads,
                args.warmup,
                args.runs,
                args.photos,
            )
    except (AdbError, ToolMissing, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        from quantize.atomic import write_atomic

        write_atomic(args.json, json.dumps(report, indent=2))
    # The bar is on the val pairs: the photographs have no ground truth, and the default model's masks on them are
    # uncertain enough that agreement varies widely from one photograph to the next.
    return 0 if report["parity"]["val"]["mask_agreement"] >= args.min_agreement else 1


if __name__ == "__main__":
    sys.exit(main())
