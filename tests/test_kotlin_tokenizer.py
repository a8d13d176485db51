"""The Android demo's WordPiece tokenizer (plain Kotlin) against the transformers tokenizer: compiled with Debian's
kotlinc and run on a desktop JVM over every sentence of tests/golden/wordpiece.json (identical ids and masks,
truncation to 20 included)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from quantize.models.registry import text_encoder_dir

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "android_demo/app/src/main/java/org/ptq4ris/demo/WordPieceTokenizer.kt"
CHECK = ROOT / "android_demo/tokenizer-check/GoldenCheck.kt"
GOLDEN = ROOT / "tests/golden/wordpiece.json"


@pytest.fixture(scope="module")
def check_jar(tmp_path_factory):
    if not (shutil.which("kotlinc") and shutil.which("java")):
        pytest.skip("kotlinc/java not installed: `make system-tools` (Debian packages kotlin, default-jre)")
    jar = tmp_path_factory.mktemp("kotlin") / "check.jar"
    done = subprocess.run(
        ["kotlinc", str(TOKENIZER), str(CHECK), "-include-runtime", "-d", str(jar)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return jar


def _cases_tsv(path: Path, cases: list[dict]) -> None:
    # Sentences carry tabs, newlines and any Unicode: hex of their UTF-8 bytes survives every line-based reader.
    lines = [
        f"{','.join(map(str, c['input_ids']))}\t{','.join(map(str, c['attention_mask']))}\t"
        f"{c['sentence'].encode('utf-8').hex()}"
        for c in cases
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _run(jar: Path, cases: Path) -> subprocess.CompletedProcess:
    vocab = Path(text_encoder_dir()) / "vocab.txt"
    return subprocess.run(
        ["java", "-jar", str(jar), str(vocab), str(cases)], capture_output=True, text=True, check=False
    )


def test_kotlin_tokenizer_matches_transformers_on_every_golden_sentence(check_jar, tmp_path):
    cases = json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]
    tsv = tmp_path / "cases.tsv"
    _cases_tsv(tsv, cases)
    done = _run(check_jar, tsv)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
    assert f"cases={len(cases)} failures=0" in done.stdout


def test_kotlin_check_reports_a_wrong_id(check_jar, tmp_path):
    """The checker itself can fail: one altered golden id must be reported."""
    case = dict(json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"][0])
    case["input_ids"] = [case["input_ids"][0] + 1, *case["input_ids"][1:]]
    tsv = tmp_path / "bad.tsv"
    _cases_tsv(tsv, [case])
    done = _run(check_jar, tsv)
    assert done.returncode == 1 and "MISMATCH" in done.stdout and "failures=1" in done.stdout
