"""``ptq4ris demo`` end to end on the small LAVT of the export tests (the pipeline, its cache, the report rendered by
a real headless Chromium) and ``ptq4ris segment`` on every backend.

The default demo on lavt-tiny takes minutes (its figures are in the README); here the same pipeline runs on the small
model with a handful of pairs so that every step, the report and the browser check fit in CI time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.pipeline import DemoConfig, run_demo
from ptq4ris.cli import main

from .test_export_pte import small_model

QUICK = {"search": "none", "text_groups": 4, "pwam_groups": 2}


def _config(root: Path, out: Path, **changes) -> DemoConfig:
    settings = {
        "out": out, "data": root, "limit": 6, "coreml_limit": 2, "arm_limit": 2, "calib_size": 4, "train_scenes": 8,
        "val_scenes": 3, "model_factory": small_model, "recipe_overrides": QUICK, "progress": False,
        "build_arm": True,
    }  # fmt: skip
    settings.update(changes)
    return DemoConfig(**settings)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    cfg = _config(folder / "refer", folder / "out")
    start = time.perf_counter()
    report = run_demo(cfg)
    return cfg, report, time.perf_counter() - start


def test_demo_writes_phone_files_and_a_report(demo_run):
    cfg, report, _ = demo_run
    out = Path(cfg.out)
    # What the Android app loads: the text and visual stage programs, and the float program for comparison.
    for stage in ("text", "visual", "float"):
        assert (out / "android" / f"lavt-tiny-w8a8.{stage}.pte").stat().st_size > 1e5, stage
    assert (out / "ios" / "lavt-tiny-w8a8.mlpackage" / "Manifest.json").is_file()
    assert json.loads((out / "report.json").read_text())["accuracy"] == report["accuracy"]
    rows = {r["backend"].split(" (")[0].split(",")[0]: r for r in report["accuracy"]}
    assert rows["float"]["pairs"] == rows["simulated W8A8"]["pairs"] == 6
    pte = next(r for r in report["accuracy"] if "ExecuTorch XNNPACK (x86" in r["backend"])
    # The stage programs chained agree with the simulated model (the small model's masks are tiny, so a few pixels
    # swing its mIoU on six pairs: agreement per pixel is the parity measure here).
    assert pte["pairs"] == 6 and pte["mask_agreement"] > 99.0, pte
    coreml = next(r for r in report["accuracy"] if "Core ML" in r["backend"])
    assert coreml["pairs"] == 2 and coreml["mask_agreement"] > 99.0, coreml
    arm = next(r for r in report["accuracy"] if "emulated ARM" in r["backend"])
    if shutil.which("qemu-aarch64") and shutil.which("aarch64-linux-gnu-g++"):
        assert arm["pairs"] == 2 and arm["mask_agreement"] > 99.0 and arm["arm_vs_x86_lsb"] < 8, arm
    else:
        assert "make system-tools" in arm["skipped"]
    assert 0.1 < report["sizes"]["pte_ratio"] < 0.5
    assert report["latency"]["threads=1"]["int8_ms"] > 0
    # DRQ from A5 up; below A8 the text inputs get magnitude tier slices besides their channel groups.
    assert set(report["activations"]) >= {"post_softmax-w8a8", "post_gelu-w8a8", "text_channels-w8a8"}
    assert report["activations"]["text_channels-w4a4"]["tier_slices"] >= 1
    assert report["activations"]["text_channels-w8a8"]["tier_slices"] == 0
    assert len(report["gallery"]) >= 3 and len(report["gallery"][0]["cells"]) == 5
    assert set(report["sensitivity"]["modalities"]) == {"vision", "text", "fusion", "decoder"}


def test_second_run_reuses_every_step_and_a_new_limit_reruns_only_what_depends_on_it(demo_run):
    cfg, first, _ = demo_run
    again = run_demo(cfg)
    assert {"data", "float", "calibrate", "export_pte", "export_coreml", "parity_pte"} <= set(
        again["run"]["reused_steps"]
    )
    assert again["accuracy"] == first["accuracy"]
    wider = run_demo(_config(cfg.data, cfg.out, limit=9))
    reused = set(wider["run"]["reused_steps"])
    assert {"calibrate", "export_pte", "export_coreml", "calibrate_compare"} <= reused
    assert not {"float", "simulated", "parity_pte"} & reused
    assert wider["accuracy"][0]["pairs"] == 9


def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="'w3a3': choose one of"):
        run_demo(_config(tmp_path / "refer", tmp_path / "out", bits="w3a3"))
    with pytest.raises(ValueError, match="must be positive"):
        run_demo(_config(tmp_path / "refer", tmp_path / "out", limit=0))
    assert not (tmp_path / "out").exists()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("needs Chromium for the report check: `make system-tools` (Debian package chromium)")


# Appended to a copy of the report: after the page's load event, every <img> must have decoded with a real size.
_CHECK = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  const out = document.createElement('pre');
  out.id = 'render-check';
  out.textContent = JSON.stringify({images: images.length, loaded: loaded,
    width: document.documentElement.scrollWidth, title: document.title,
    firstScreen: document.querySelector('.cards') ? document.querySelector('.cards').innerText : ''});
  document.body.appendChild(out);
});
</script>"""


def test_report_renders_in_headless_chromium(demo_run, tmp_path):
    chromium = _chromium()
    cfg, report, _ = demo_run
    page = tmp_path / "checked.html"
    page.write_text((Path(cfg.out) / "report.html").read_text().replace("</body>", _CHECK + "</body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"]
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    marker = dom.stdout.split('<pre id="render-check">', 1)
    assert len(marker) == 2, "the page did not finish loading: " + dom.stdout[-500:]
    check = json.loads(marker[1].split("</pre>", 1)[0].replace("&quot;", '"').replace("&amp;", "&"))
    assert check["images"] >= 20 and check["loaded"] == check["images"], check
    assert check["title"] == report["title"]
    # The first screen states accuracy, agreement, size and speed.
    first = check["firstScreen"].lower()  # the cards' headings are upper-cased by CSS
    for words in ("accuracy", "miou", "size", "speed", "× float", "core ml"):
        assert words in first, first
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [*flags, "--window-size=1280,1600", f"--screenshot={shot}", (Path(cfg.out) / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1600, 1280) and pixels.std() > 10  # not a blank page


@pytest.mark.parametrize("backend", ["torch", "pte", "coreml-interp"])
def test_segment_writes_an_overlay_at_the_photo_size(demo_run, backend, tmp_path, capsys):
    cfg, report, _ = demo_run
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 140, 3), dtype=np.uint8)).save(photo)
    scene = next((Path(cfg.data) / "images" / "shapesref").glob("*.png"))
    out = tmp_path / "mask.png"
    flags = {"torch": ["--quantized", report["files"]["artifact"]], "pte": ["--pte", report["files"]["pte"]],
             "coreml-interp": ["--coreml", report["files"]["coreml"]]}[backend]  # fmt: skip
    assert main(["segment", "--image", str(scene), "--text", "the red shape", "--backend", backend, *flags,
                 "--out", str(out)]) == 0  # fmt: skip
    written = Image.open(out)
    assert written.size == Image.open(scene).size
    assert not np.array_equal(np.asarray(written), np.asarray(Image.open(scene).convert("RGB")))  # a mask is drawn
    assert "mask covers" in capsys.readouterr().out
    assert main(["segment", "--image", str(photo), "--text", "the cat", "--backend", backend, *flags,
                 "--out", str(tmp_path / "photo-mask.png")]) == 0  # fmt: skip
    assert Image.open(tmp_path / "photo-mask.png").size == (140, 90)


def test_segment_bad_input_is_named(demo_run, tmp_path, capsys):
    cfg = demo_run[0]
    scene = str(next((Path(cfg.data) / "images" / "shapesref").glob("*.png")))
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"not an image")
    cases = [
        (["--image", scene, "--text", "x", "--backend", "pte"], "add --pte"),
        (["--image", scene, "--text", "   "], "expression is empty"),
        (["--image", str(corrupt), "--text", "the cat"], "corrupt or unreadable image"),
        (["--image", str(tmp_path / "none.png"), "--text", "the cat"], "none.png: not found"),
        (["--image", scene, "--text", "x", "--out", str(tmp_path / "mask.jpg")], "name a .png file"),
    ]
    for argv, message in cases:
        assert main(["segment", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
