"""The tokenizer golden file that the Swift (iOS sample) and Kotlin (Android demo) tokenizers must reproduce: it must
be what LAVT's transformers tokenizer gives today, over the same seeded sentences."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN_DIR))

from make_wordpiece_golden import GOLDEN, golden, sentences


def test_golden_file_matches_the_transformers_tokenizer():
    logging.disable(logging.WARNING)
    try:
        fresh = golden()
    finally:
        logging.disable(logging.NOTSET)
    stored = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert stored["max_tokens"] == 20
    assert [c["sentence"] for c in stored["cases"]] == sentences(), "rerun tests/golden/make_wordpiece_golden.py"
    mismatched = [c["sentence"] for c, f in zip(stored["cases"], fresh["cases"]) if c != f]
    assert not mismatched, f"tokenizer changed for {mismatched[:5]}: rerun tests/golden/make_wordpiece_golden.py"


def test_golden_file_covers_what_users_type():
    cases = json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]
    assert len(cases) >= 1000
    ids = [c["input_ids"] for c in cases]
    assert any(100 in i for i in ids), "no [UNK] case"
    assert any(i[-1] not in (0, 102) for i in ids), "no sentence cut at 20 tokens"
    assert any(not s["sentence"].isascii() for s in cases), "no accented or CJK case"
    assert all(len(i) == 20 and i[0] == 101 for i in ids)
