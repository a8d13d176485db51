"""Write ``wordpiece.json``: sentences and the ids LAVT's tokenizer gives them, the golden file the on-device
tokenizers (Swift in ``ios_export/swift``, Kotlin in ``android_demo``) must reproduce id for id.

Run from the repository root: ``python tests/golden/make_wordpiece_golden.py``. The sentences are seeded, so the file
only changes when the tokenizer or this script does; ``tests/test_wordpiece_golden.py`` checks both.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

GOLDEN = Path(__file__).with_name("wordpiece.json")

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "pink", "brown", "beige"]
THINGS = [
    "man",
    "woman",
    "kid",
    "dog",
    "cat",
    "horse",
    "zebra",
    "giraffe",
    "elephant",
    "umbrella",
    "bus",
    "car",
    "truck",
    "chair",
    "couch",
    "sandwich",
    "pizza",
    "donut",
    "broccoli",
    "banana",
    "laptop",
    "keyboard",
    "surfboard",
    "skis",
    "teddy bear",
    "frisbee",
    "motorcycle",
    "bicycle",
    "suitcase",
    "toothbrush",
    "hydrant",
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "cross",
]
PLACES = [
    "on the left",
    "on the right",
    "in the middle",
    "at the top",
    "at the bottom",
    "closest to us",
    "in the back",
    "far right",
    "far left",
    "second from left",
    "top left corner",
    "next to the door",
    "behind the table",
]
ATTRIBUTES = ["big", "small", "tall", "short", "striped", "blurry", "dark", "bright", "wooden", "half eaten", "empty"]
# What users type besides clean lowercase words: case, accents, punctuation, digits, contractions, symbols, CJK,
# emoji, control characters, runs of spaces, words too long for WordPiece, and sentences over 20 tokens.
EDGE_CASES = [
    "The MAN on the LEFT",
    "café chair near the naïve façade",
    "Ångström-sized résumé of Zoë",
    "guy's hat, left-most one!!!",
    "2nd person from the right (in blue)",
    "the 3 dogs & 1 cat @ home #pets",
    "person w/ umbrella; not the one @ back",
    "日本 の 猫 cat",
    "中文字符和English混合",
    "dog 🐶 on the couch 🛋️",
    "tab\tseparated\twords",
    "  leading and trailing spaces  ",
    "many     spaces     between",
    "line\nbreak in the middle",
    "zero\u200bwidth space",
    "soft\u00adhyphen",
    "control\x07char",
    "supercalifragilisticexpialidocious umbrella",
    "a" * 120 + " dog",
    "antidisestablishmentarianism",
    "the woman in the red dress standing next to the man holding a black umbrella on the rainy street corner",
    "left left left left left left left left left left left left left left left left left left left left left",
    "unaffable ungovernable unquestionably",
    "don't pick the one that isn't there",
    "\"quoted\" thing and 'single quoted' thing",
    "price $5.99 or €4,50?",
    "e-mail: someone@example.com",
    "1/2 of the pizza",
    "x",
    "?",
    "Straße Größe",
    "ÉLÉPHANT À GAUCHE",
    "Ｆｕｌｌ　ｗｉｄｔｈ letters",
    "ﬁne ligature",
]


def sentences(count: int = 1200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(EDGE_CASES)
    while len(out) < count:
        parts = []
        if rng.random() < 0.5:
            parts.append(rng.choice(["the", "a", "this", "that"]))
        if rng.random() < 0.4:
            parts.append(rng.choice(ATTRIBUTES))
        if rng.random() < 0.7:
            parts.append(rng.choice(COLOURS))
        parts.append(rng.choice(THINGS))
        if rng.random() < 0.6:
            parts.append(rng.choice(PLACES))
        if rng.random() < 0.2:
            parts += ["next to the", rng.choice(COLOURS), rng.choice(THINGS)]
        sentence = " ".join(parts)
        if rng.random() < 0.15:
            sentence = sentence.capitalize() + rng.choice([".", "!", "?", ","])
        out.append(sentence)
    return out


def golden(max_tokens: int = 20) -> dict:
    from quantize.data.preprocess import Tokenizer
    from quantize.models.registry import text_encoder_dir

    tokenizer = Tokenizer(text_encoder_dir(), max_tokens)
    cases = []
    for sentence in sentences():
        ids, mask = tokenizer(sentence)
        cases.append({"sentence": sentence, "input_ids": ids.tolist(), "attention_mask": mask.tolist()})
    return {
        "tokenizer": "uncased WordPiece, vocab 30522 (bert-base-uncased / all-MiniLM-L6-v2)",
        "max_tokens": max_tokens,
        "rule": "[CLS] + wordpieces + [SEP], cut to max_tokens ([SEP] dropped when cut, as LAVT does), padded with 0",
        "cases": cases,
    }


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)  # over-long sentences are meant to be here
    data = golden()
    head = {k: v for k, v in data.items() if k != "cases"}
    # One case per line: diffs stay readable when the tokenizer changes.
    lines = [json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in data["cases"]]
    text = json.dumps(head, ensure_ascii=False, indent=1)[:-2] + ',\n "cases": [\n' + ",\n".join(lines) + "\n ]\n}\n"
    GOLDEN.write_text(text, encoding="utf-8")
    print(f"wrote {len(lines)} cases to {GOLDEN}", file=sys.stderr)
