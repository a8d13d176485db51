"""Sharding over torchrun's processes (quantize.distributed): every figure of a 2-process gloo run equals one
process's — `evaluate`, a results-grid run (cells spread over ranks) here; `parity` in test_export_pte."""

from __future__ import annotations

import json

import pytest

from ptq4ris.cli import main
from quantize.data.shapesref import write_shapesref
from quantize.distributed import Shard
from quantize.results import main as results_main
from tests.torchrun import torchrun, torchrun_json, without_wall_clock


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    write_shapesref(root, seed=3, split_scenes={"train": 16, "val": 12})
    return root


@pytest.mark.parametrize("n,batch,world", [(0, 4, 2), (7, 4, 2), (40, 8, 3), (33, 16, 2), (5, 8, 4)])
def test_shards_keep_whole_batches_and_cover_every_pair_once(n, batch, world):
    shards = [Shard(rank, world).batch_indices(n, batch) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))  # no pair lost, none padded or repeated
    single_batches = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    for rank, indices in enumerate(shards):
        # The rank's loader cuts the same batches as one process would: every pair is computed in the same batch.
        cut = [indices[i : i + batch] for i in range(0, len(indices), batch)]
        assert cut == single_batches[rank::world]
    items = [Shard(rank, world).items("abcdefg") for rank in range(world)]
    assert sorted(p for part in items for p in part) == list(enumerate("abcdefg"))


def test_evaluate_sharded_by_torchrun_equals_one_process(refer_root, capsys):
    argv = ["evaluate", "--refer-root", str(refer_root), "--batch-size", "8", "--json"]
    assert main(argv) == 0
    single = json.loads(capsys.readouterr().out)
    sharded = torchrun_json(*argv)
    assert single["pairs"] > 16 and sharded["processes"] == 2  # three batches or more: both ranks work
    assert without_wall_clock(sharded) == without_wall_clock(single)


def test_results_cells_spread_over_ranks_equal_one_process(refer_root, tmp_path):
    def run(folder, launch):
        argv = ["--refer-root", str(refer_root), "--cache", str(folder / "cells"), "--out", str(folder / "results.md"),
                "--only", "minmax", "--bits", "w8a8", "w4a8", "--limit", "16"]  # fmt: skip
        launch(argv)
        cells = {}
        for f in sorted((folder / "cells").glob("*.json")):
            cell = json.loads(f.read_text())
            cell.pop("calibration_seconds")
            cells[f.name] = cell
        return cells, (folder / "results.md").read_text()

    def sharded(argv):
        done = torchrun(*argv, module="quantize.results")
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("table written") == 1  # rank 0 renders the table, once

    single_cells, single_table = run(tmp_path / "single", lambda argv: results_main(argv))
    sharded_cells, sharded_table = run(tmp_path / "sharded", sharded)
    assert set(single_cells) == {"minmax-w8a8.json", "minmax-w4a8.json"}
    assert sharded_cells == single_cells
    assert _without_last_column(sharded_table) == _without_last_column(single_table)


def _without_last_column(table: str) -> list[str]:
    """The results table without its last column (calibration seconds: wall clock)."""
    return [line.rsplit("|", 2)[0] if line.startswith("|") else line for line in table.splitlines()]


def test_commands_that_do_not_shard_refuse_torchrun(refer_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "q"
    assert main(["calibrate", "--refer-root", str(refer_root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "runs in one process" in err and "torchrun" in err and "Traceback" not in err
    assert not out.exists()
    argv = ["parity", "--coreml", str(tmp_path / "m.mlpackage"), "--quantized", str(out), "--refer-root", str(refer_root)]
    assert main(argv) == 2
    assert "--coreml parity runs in one process" in capsys.readouterr().err
    # WORLD_SIZE set by hand, without torchrun's rendezvous: one line, not a traceback.
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(["evaluate", "--refer-root", str(refer_root), "--limit", "4"]) == 2
    err = capsys.readouterr().err
    assert "launch with torchrun" in err and "Traceback" not in err
