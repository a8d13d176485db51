"""``ptq4ris demo``: from the embedded default model to phone-ready files and a report, in one resumable run.

Steps (each cached in ``OUT/steps/``; a second run reuses what finished):

1. ShapesRef val and the train scenes calibration draws from;
2. the float model on the first ``limit`` val pairs;
3. PTQ4RIS calibration (deployable form) at ``bits`` and, for the gallery and the activation figures, at
   ``compare_bits``, evaluated on the same pairs (the ``bits`` model's simulated scores come from the ``.pte``
   parity step, which runs it on those pairs anyway);
4. the ``.pte`` programs (full model, and the float one for size and speed) and the ``.mlpackage``, converted from the
   same calibrated graph. Android gets the stage programs its app loads (text: ids → word features; visual: image +
   features → mask), lowered in two child processes beside the Core ML conversion and the second calibration (the
   lowering is single-threaded Python for most of its time), each writing its own lowering report, merged here;
5. parity against the simulated model: the ``.pte`` on the host runtime, the package in the MIL interpreter, and the
   ``.pte`` on emulated ARM (qemu) when the cross tools are installed;
6. host latency (float vs int8 ``.pte``, interleaved), sensitivity by modality, activation figures, the gallery;
7. ``report.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantize.errors import UserError

from .cache import StepCache, digest

__all__ = ["DemoConfig", "run_demo"]

MODEL = "lavt-tiny"
METHOD = "ptq4ris-deploy"


# The settings that decide results (the cache keys draw from these).
SETTINGS = (
    "data",
    "bits",
    "compare_bits",
    "limit",
    "coreml_limit",
    "arm_limit",
    "calib_size",
    "everyday_expressions",
    "seed",
    "train_scenes",
    "val_scenes",
    "recipe_overrides",
)


@dataclass
class DemoConfig:
    """Settings of one demo run (all of them enter the step cache keys)."""

    out: Path = Path("runs/demo")
    data: Path = Path("data")
    bits: str = "w8a8"
    compare_bits: str = "w4a4"
    limit: int = 1000  # val pairs for float, simulated and .pte
    coreml_limit: int = 100  # the MIL interpreter runs numpy op by op: ~8x slower than the .pte
    arm: bool = True
    build_arm: bool = False  # build the aarch64 runner when it is missing (downloads the aarch64 wheel, ~2 min)
    arm_limit: int = 8  # qemu runs a forward in ~3 s
    calib_size: int = 32
    everyday_expressions: int | None = None  # typed-language coverage for the text encoder; None: by bits
    seed: int = 0
    progress: bool = True
    train_scenes: int = 64  # calibration reads the first 32 refs of train
    val_scenes: int | None = None  # None: ShapesRef's standard val
    # Builds the float model; None is the embedded lavt-tiny. Tests pass a smaller LAVT here.
    model_factory: Callable[[], torch.nn.Module] | None = field(default=None, repr=False)
    recipe_overrides: dict = field(default_factory=dict)  # e.g. {"search": "none"} for a quick check
    # A `ptq4ris bench` output folder whose last result the report shows (the bench itself takes longer than the demo).
    bench: Path | None = Path("runs/bench")

    def float_model(self) -> torch.nn.Module:
        from quantize.models.registry import build_model

        return self.model_factory() if self.model_factory else build_model(MODEL)

    def paths(self) -> dict[str, Path]:
        out = Path(self.out)
        name = f"{MODEL}-{self.bits}"
        return {
            "artifact": out / name,
            "compare": out / f"{MODEL}-{self.compare_bits}",
            # The Android app loads the two stage programs; "pte" names the model they form together.
            "pte": out / "android" / f"{name}.pte",
            "pte_text": out / "android" / f"{name}.text.pte",
            "pte_visual": out / "android" / f"{name}.visual.pte",
            "pte_float": out / "android" / f"{name}.float.pte",
            "lowering": out / "android" / f"{name}.lowering.json",
            "coreml": out / "ios" / f"{name}.mlpackage",
            "figures": out / "figures",
            "steps": out / "steps",
            "log": out / "logs",
        }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Elapsed:
    """A progress bar for a step with no natural unit of work: it shows the elapsed time until the step ends."""

    def __init__(self, desc: str, enabled: bool = True) -> None:
        self.desc, self.enabled = desc, enabled

    def __enter__(self):
        import threading

        from tqdm import tqdm

        self.bar = tqdm(desc=self.desc, bar_format="{desc}: {elapsed}", disable=not self.enabled)
        self.stop = threading.Event()

        def tick() -> None:
            while not self.stop.wait(1.0):
                self.bar.refresh()

        self.thread = threading.Thread(target=tick, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.bar.close()


def _write_data(cfg: DemoConfig) -> dict:
    """ShapesRef train (the scenes calibration draws from) and val, reusing a ShapesRef already at ``cfg.data`` that
    holds them: scenes are a function of (seed, split, index), so a larger train split starts with the same ones."""
    from quantize.data.shapesref import DEFAULT_SPLIT_SCENES, GENERATOR_VERSION, write_shapesref

    scenes = {"train": cfg.train_scenes, "val": cfg.val_scenes or DEFAULT_SPLIT_SCENES["val"]}
    meta_path = Path(cfg.data) / "shapesref" / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        have = meta.get("split_scenes", {})
        if (
            meta.get("seed") == cfg.seed
            and meta.get("generator_version") == GENERATOR_VERSION
            and have.get("val") == scenes["val"]
            and have.get("train", 0) >= scenes["train"]
        ):
            return {"root": str(cfg.data), "scenes": have, "reused": True}
    write_shapesref(cfg.data, seed=cfg.seed, split_scenes=scenes, progress=cfg.progress)
    return {"root": str(cfg.data), "scenes": scenes}


def _evaluate(model, cfg: DemoConfig, label: str) -> dict:
    from quantize.data import open_split
    from quantize.evaluate import evaluate

    val = open_split(cfg.data, "shapesref", "unc", "val", model.config)
    result = evaluate(model, val, limit=cfg.limit, progress=cfg.progress)
    _log(f"  {label}: mIoU {result['mIoU']:.2f}, oIoU {result['oIoU']:.2f} on {result['pairs']} val pairs")
    return result


def _calibrate(cfg: DemoConfig, bits: str, out: Path) -> dict:
    from quantize.calibration.artifact import save_quantized
    from quantize.calibration.calibrate import calibrate, calibration_batch, calibration_record, default_everyday
    from quantize.calibration.recipe import make_recipe
    from quantize.data import open_split

    recipe = make_recipe(METHOD, bits, **{"seed": cfg.seed, **cfg.recipe_overrides})
    model = cfg.float_model()
    train = open_split(cfg.data, "shapesref", "unc", "train", model.config)
    batch = calibration_batch(train, cfg.calib_size, default_everyday(recipe, cfg.everyday_expressions))
    quantized, report = calibrate(model, recipe, batch, progress=cfg.progress)
    record = {"calibration": calibration_record(train, batch, report)}
    save_quantized(quantized.cpu(), recipe, out, MODEL, record, calibration_inputs=batch)
    return {"artifact": str(out), "method": METHOD, "bits": bits, "sites": report.sites, "seconds": report.seconds}


class PteExport:
    """The ``.pte`` programs lowered in two child processes (:mod:`demo.lower_pte`), one per stage program (the visual
    one, and the text one followed by the float one), so that the slowest step of the demo uses both cores while the
    main process converts the Core ML package and runs the second calibration. Each child writes the lowering report
    of its own programs; :meth:`wait` merges them into ``<name>.lowering.json``."""

    JOBS = (("visual", ("--stages", "visual", "--no-float")), ("text", ("--stages", "text")))

    def __init__(self, cfg: DemoConfig, paths: dict[str, Path]) -> None:
        self.paths = paths
        paths["log"].mkdir(parents=True, exist_ok=True)
        self.children: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.reports = {name: paths["log"] / f"export-pte-{name}.lowering.json" for name, _ in self.JOBS}
        # One intra-op thread each: the lowering is Python-bound and the main process needs the other core.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for name, flags in self.JOBS:
            self.reports[name].unlink(missing_ok=True)  # an earlier run's report must not pass for this one's
            log = paths["log"] / f"export-pte-{name}.log"
            cmd = [
                sys.executable, "-m", "demo.lower_pte", "--quantized", str(paths["artifact"]),
                "--out", str(paths["pte"]), "--report", str(self.reports[name]), *flags,
            ]  # fmt: skip
            with open(log, "w") as stream:
                self.children[name] = subprocess.Popen(cmd, stdout=stream, stderr=subprocess.STDOUT, env=env), log

    def wait(self, progress: bool) -> dict:
        with _Elapsed("lowering the .pte programs (XNNPACK)", progress):
            codes = {name: process.wait() for name, (process, _) in self.children.items()}
        for name, code in codes.items():
            if code != 0:
                log = self.children[name][1]
                raise RuntimeError(
                    f"lowering the {name} .pte failed (exit {code}); its log: {log}\n{log.read_text()[-3000:]}"
                )
        from mobile_runtime.export_pte import merge_reports, program_paths
        from mobile_runtime.runtime import program_bytes
        from quantize.atomic import write_atomic

        programs = program_paths(self.paths["pte"])
        lowering = None
        for name, _ in self.JOBS:
            report = json.loads(self.reports[name].read_text())
            lowering = report if lowering is None else merge_reports(lowering, report, programs)
        write_atomic(self.paths["lowering"], json.dumps(lowering, indent=2).encode())
        return {
            "lowering": lowering,
            "bytes": {"int8": program_bytes(self.paths["pte"]), "float": program_bytes(self.paths["pte_float"])},
        }

    def kill(self) -> None:
        for process, _ in self.children.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def _export_coreml(cfg: DemoConfig, paths: dict[str, Path]) -> dict:
    from ios_export.export_coreml import export_artifact

    with _Elapsed("converting the Core ML package", cfg.progress):
        # No float package: its conversion costs a minute and only its size is reported, which the parameter count
        # gives (fp16 weights, 2 bytes each).
        report = export_artifact(
            paths["artifact"], paths["coreml"], float_package=False, log=lambda *a: None
        )
    return report


def _parity(cfg: DemoConfig, paths: dict[str, Path], backend: str) -> dict:
    from quantize.calibration.artifact import load_quantized
    from quantize.data import open_split

    model = load_quantized(paths["artifact"])[0]
    val = open_split(cfg.data, "shapesref", "unc", "val", model.config)
    if backend == "pte":
        from mobile_runtime.parity import run_parity

        report = run_parity(model, str(paths["pte"]), val, limit=cfg.limit, progress=cfg.progress)
    elif backend == "coreml":
        from ios_export.parity import run_parity

        report = run_parity(model, paths["coreml"], val, limit=cfg.coreml_limit, progress=cfg.progress)
    else:
        from mobile_runtime.arm_parity import arm_parity
        from mobile_runtime.native_runner import NativeRunner, build_runner

        with _Elapsed("building the aarch64 runner", cfg.progress):
            runner = build_runner("aarch64", log=lambda *a: None)
        report = arm_parity(
            model, paths["pte"], val, NativeRunner(runner, emulate=True), limit=cfg.arm_limit, progress=cfg.progress
        )
    return report


def arm_unavailable(build: bool) -> str | None:
    """Why emulated ARM does not run in this demo (None when it does): the cross tools are missing, or the aarch64
    runner is not built and ``build`` is off."""
    from mobile_runtime.native_runner import DEFAULT_BUILD

    missing = [t for t in ("qemu-aarch64", "aarch64-linux-gnu-g++", "cmake") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (`make system-tools` installs them)"
    if not build and not (DEFAULT_BUILD / "native-aarch64" / "ptq4ris_runner").is_file():
        return (
            "the aarch64 runner is not built: `python -m mobile_runtime.native_runner build --target aarch64` "
            "(or `ptq4ris demo --build-arm`) sets it up"
        )
    return None


def _benchmark(paths: dict[str, Path]) -> dict:
    from mobile_runtime.benchmark import benchmark

    # "int8" is the stage programs chained (the file paths["pte"] is never written): what the app runs.
    return benchmark({"float": paths["pte_float"], "int8": paths["pte"]}, threads=[1, 2], runs=20, warmup=3)


def _sensitivity(cfg: DemoConfig, artifact: Path) -> dict:
    from quantize.calibration.artifact import load_quantized
    from quantize.calibration.calibrate import calibration_batch
    from quantize.calibration.sensitivity import analyze
    from quantize.data import open_split

    model = load_quantized(artifact)[0]
    pairs = calibration_batch(open_split(cfg.data, "shapesref", "unc", "train", model.config), 4)
    val = open_split(cfg.data, "shapesref", "unc", "val", model.config)
    return analyze(
        model, (pairs.images, pairs.input_ids, pairs.attention_mask), val, limit=min(cfg.limit, 100),
        progress=cfg.progress,
    )  # fmt: skip


DEMO_KIND = "demo"


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or resume) the demo; returns the report and writes ``report.json`` / ``report.html`` under ``cfg.out``."""
    from quantize.calibration.recipe import BIT_SETTINGS

    for bits in (cfg.bits, cfg.compare_bits):
        if bits not in BIT_SETTINGS:
            raise UserError(f"--bits/--compare-bits {bits!r}: choose one of {', '.join(BIT_SETTINGS)}")
    if cfg.limit < 1 or cfg.coreml_limit < 1 or cfg.arm_limit < 1:
        raise UserError("--limit, --coreml-limit and --arm-limit must be positive")
    from quantize.data.shapesref import check_shapesref_root
    from quantize.outputs import MANIFEST, check_output_folder, write_manifest

    # Checked before any step runs: a demo folder is resumed or replaced only if the demo wrote it.
    check_output_folder(cfg.out, "--out", DEMO_KIND)
    check_shapesref_root(cfg.data, "--data")
    start = time.perf_counter()
    paths = cfg.paths()
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    if not (Path(cfg.out) / MANIFEST).exists():
        write_manifest(Path(cfg.out), DEMO_KIND)
    cache = StepCache(paths["steps"], log=_log)
    torch.manual_seed(cfg.seed)
    settings = {k: str(getattr(cfg, k)) for k in SETTINGS}
    results: dict[str, dict] = {}

    def step(name: str, fn, deps: tuple[str, ...] = (), outputs: tuple[Path, ...] = (), keys=()) -> dict:
        key = {"settings": {k: settings[k] for k in keys}, "after": [digest(results[d]) for d in deps]}
        _log(f"[{name}]")
        results[name] = cache.run(name, key, fn, outputs)
        return results[name]

    from quantize.calibration.artifact import load_quantized

    step("data", lambda: _write_data(cfg), keys=("data", "seed", "train_scenes", "val_scenes"))
    step("float", lambda: _evaluate(cfg.float_model(), cfg, "float"), ("data",), keys=("limit",))
    step(
        "calibrate", lambda: _calibrate(cfg, cfg.bits, paths["artifact"]), ("data",),
        (paths["artifact"] / "model.safetensors",), keys=("bits", "calib_size", "everyday_expressions", "seed", "recipe_overrides"),
    )  # fmt: skip

    # The .pte lowering is the longest step: start it now and do the rest beside it.
    pte_key = {"settings": {}, "after": [digest(results["calibrate"])]}
    pte_outputs = (paths["pte_text"], paths["pte_visual"], paths["pte_float"], paths["lowering"])
    exporting = None
    threads = torch.get_num_threads()
    if cache.cached("export_pte", pte_key, pte_outputs) is None:
        _log("[export_pte] started in two child processes")
        exporting = PteExport(cfg, paths)
        # Three processes share the cores now: intra-op threads would spin-wait against the children.
        torch.set_num_threads(1)
    try:
        step("export_coreml", lambda: _export_coreml(cfg, paths), ("calibrate",), (paths["coreml"],))
        step(
            "calibrate_compare", lambda: _calibrate(cfg, cfg.compare_bits, paths["compare"]), ("data",),
            (paths["compare"] / "model.safetensors",), keys=("compare_bits", "calib_size", "everyday_expressions", "seed", "recipe_overrides"),
        )  # fmt: skip
        step(
            "simulated_compare",
            lambda: _evaluate(load_quantized(paths["compare"])[0], cfg, f"simulated {cfg.compare_bits}"),
            ("calibrate_compare",), keys=("limit",),
        )  # fmt: skip
        step("parity_coreml", lambda: _parity(cfg, paths, "coreml"), ("export_coreml",), keys=("coreml_limit",))
        step("sensitivity", lambda: _sensitivity(cfg, paths["compare"]), ("calibrate_compare",), keys=("limit",))
        step("export_pte", lambda: (exporting or PteExport(cfg, paths)).wait(cfg.progress), ("calibrate",), pte_outputs)
        exporting = None
    finally:
        torch.set_num_threads(threads)
        if exporting is not None:  # a step failed while the children were lowering: do not leave them running
            exporting.kill()
    step("parity_pte", lambda: _parity(cfg, paths, "pte"), ("export_pte",), keys=("limit",))
    missing = arm_unavailable(cfg.build_arm) if cfg.arm else "--no-arm was given"
    if missing is None:
        step("parity_arm", lambda: _parity(cfg, paths, "arm"), ("export_pte",), keys=("arm_limit",))
    else:
        results["parity_arm"] = {"skipped": missing}
        _log(f"[parity_arm] {missing}")
    step("benchmark", lambda: _benchmark(paths), ("export_pte",))

    from .report import write_report

    with _Elapsed("writing the report (figures, gallery)", cfg.progress):
        report = write_report(cfg, paths, results, seconds=time.perf_counter() - start, reused=cache.reused)
    return report
