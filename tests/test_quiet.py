"""Known third-party chatter is dropped at default verbosity, and nothing else is: lines pass on in order and as they
arrive (a progress bar's carriage-return redraws included)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NATIVE = """
import os, sys
from ptq4ris.quiet import filter_native_stderr
with filter_native_stderr():
    os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file\\n")
    os.write(2, b"progress 1\\r")
    os.write(2, b"[cpu")
    os.write(2, b"info_utils.cpp:125] CPU info and manual query\\nkeep me\\n[c")
    os.write(2, b"at] ok\\n")
    sys.stderr.write("python line\\n")
    os.write(2, b"tail")
"""


def test_native_lines_are_dropped_and_the_rest_kept_in_order():
    run = subprocess.run([sys.executable, "-c", NATIVE], cwd=ROOT, capture_output=True, check=True)
    assert run.stderr == b"progress 1\rkeep me\n[cat] ok\npython line\ntail"


def test_known_library_warnings_are_filtered_and_others_kept(caplog):
    from ptq4ris.quiet import quiet_known_chatter

    quiet_known_chatter()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("coremltools").warning("Failed to load _MLModelProxy: No module named x")
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        logging.getLogger("coremltools").warning("a conversion problem the user must see")
    assert caplog.messages == ["a conversion problem the user must see"]
