"""Every bad-input case of ``tests/bad_inputs.py`` against the command line's error policy, and the document that lists
them (``docs/reliability.md``) kept in step with the table.

The cases run once per session, two subprocesses at a time, in a session fixture (only the ones selected, with ``-k``);
each parametrized test reads its result. Set ``PTQ4RIS_BAD_INPUTS_FIXTURES=DIR`` to build the shared inputs there once
and reuse them across sessions (they take about a minute).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.bad_inputs import CASES, COMMANDS, KLASSES, REPO, build_fixtures, doc_case_ids, problems, run_cases

FIXTURES_ENV = "PTQ4RIS_BAD_INPUTS_FIXTURES"


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="session")
def results(request, tmp_path_factory):
    selected = {
        item.callspec.params["case"].id
        for item in request.session.items
        if hasattr(item, "callspec") and "case" in item.callspec.params
    }
    start = time.monotonic()
    fixtures = build_fixtures(os.environ.get(FIXTURES_ENV) or tmp_path_factory.mktemp("bad-inputs-fixtures"))
    built = time.monotonic() - start
    workdir = tmp_path_factory.mktemp("bad-inputs-cases")
    played = run_cases([c for c in CASES if c.id in selected], fixtures, workdir, jobs=2)
    print(f"\nbad inputs: fixtures {built:.0f} s, {len(played)} cases {time.monotonic() - start - built:.0f} s")
    return played


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(case, results):
    r = results[case.id]
    if r.skipped:
        pytest.skip(r.skipped)
    found = problems(case, r)
    assert not found, (
        f"ptq4ris {' '.join(map(str, case.command))}\n"
        + "\n".join(f"- {p}" for p in found)
        + f"\nexit {r.code} after {r.seconds:.1f} s; stderr (last 1500 chars):\n{r.stderr[-1500:]}"
    )


def test_table_covers_every_class_and_command():
    assert len(CASES) >= 150
    klasses = Counter(c.klass for c in CASES)
    assert set(klasses) == set(KLASSES), klasses
    commands = {c.name for c in CASES}
    assert set(COMMANDS) <= commands, set(COMMANDS) - commands
    for c in CASES:
        if c.expect.code == 2:
            assert c.expect.message, f"{c.id}: an error case must say which flag or file its message names"


def test_document_lists_exactly_the_cases():
    doc = REPO / "docs" / "reliability.md"
    assert doc.is_file(), "regenerate it: python tests/bad_inputs.py --write docs/reliability.md"
    text = doc.read_text()
    listed = doc_case_ids(text)
    assert Counter(listed) == Counter(c.id for c in CASES), (
        "docs/reliability.md lists other cases than tests/bad_inputs.py; regenerate it: "
        "python tests/bad_inputs.py --write docs/reliability.md"
    )
    assert str(Path.home()) not in text and str(REPO) not in text and "/tmp/" not in text
