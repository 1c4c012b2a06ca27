"""Result rows read back from the run files every flextron version wrote, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

from flextron.results import EvalRow
from flextron.space import Budget, Subnet

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_rows_of_files_written_before_round_trip_byte_for_byte():
    files = {"adaptive.json": lambda d: d["rows"], "routers.json": lambda d: [*d["routes"].values()][0],
             "elastic_training.json": lambda d: [d["results"]["original"], *d["results"]["prune-only"]]}
    for name, rows_of in files.items():
        rows = rows_of(json.loads((RESULTS / name).read_text()))
        assert rows
        for row in rows:
            assert json.dumps(EvalRow.from_dict(row).to_dict()) == json.dumps(row), name
    static = json.loads((RESULTS / "adaptive.json").read_text())["rows"][0]
    row = EvalRow.from_dict(static)
    assert row.adaptive and isinstance(row.static_subnet, Subnet) and row.budget == Budget(fraction=static["budget"])
