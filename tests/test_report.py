"""`flextron report`: tables and plots from a run's JSON, and the marked-section update."""

from __future__ import annotations

import json

import pytest

from flextron.cli import main
from flextron.errors import FlextronError
from flextron.report import read_run, report, update_section
from flextron.results import EvalRow

ROUTE = {"budget": 0.5, "metric": "params", "subnet": {"mlp": [96, 48], "attn": [4, 2]}, "raw_cost_ratio": 1.02,
         "cost_ratio": 0.99, "fraction_of_full": 0.5, "uniform_subnet": {"mlp": [48, 48], "attn": [2, 2]},
         "uniform_fraction_of_full": 0.45, "ppl": 30.0, "uniform_ppl": 31.0, "kept": "router",
         "calib_ppl": {"router": 29.0, "uniform": 30.0}}


def row(budget: str, fraction: float, ppl: float | None = None, tasks: dict | None = None) -> dict:
    r = {"budget": budget, "subnet": {"mlp": [96, 48], "attn": [4, 2]},
         "cost": {"params_nonembed": fraction * 1e6}, "params_fraction": fraction}
    if ppl is not None:
        r["ppl"] = ppl
    if tasks:
        r["tasks"] = tasks
    return r


def test_report_tables_every_series_and_plots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    arc = {"n": 10, "acc": 0.5, "acc_norm": 0.6}
    data = {"original": row("100%", 1.0, 20.0), "prune_only": [row("100%", 1.0, 20.0), row("50%", 0.5, 900.0)],
            "flextron": [row("100%", 1.0, 21.0, {"arc_easy": arc}), row("50%", 0.45, 80.0, {"arc_easy": arc})],
            "export_eval": row("50%", 0.45, 80.0), "preset": "tiny", "router_metric": "params",
            "routes": [ROUTE, ROUTE | {"budget": 1.0, "kept": "uniform"}]}
    costs = {"cost": {"params_nonembed": 5e5}, "params_fraction": 0.5}  # router rows have held costs since 2026-11-27
    data["routes"] = [r | costs for r in data["routes"]]
    (run / "results.json").write_text(json.dumps(data))
    path, text = report(run, "tiny run")
    assert path == run / "report.md" and path.read_text() == text
    assert (run / "pareto.png").stat().st_size > 0 and (run / "tasks.png").stat().st_size > 0
    lines = text.splitlines()
    assert lines[0] == "# tiny run"
    assert "| flextron | 50% | 48-96 | 2-4 | 0.5 M (45%) | 80.00 | 50.0% (60.0%) |" in lines
    assert sum(line.startswith("| prune only |") for line in lines) == 2
    assert not any(line.startswith("| routes |") for line in lines)  # router rows (with costs) only in their table
    assert "| original | - |" in text and "| export | - |" in text and "![pareto](pareto.png)" in text
    assert "| 50% | 0.990 | 30.00 | 31.00 | router |" in lines and "| 100% | 0.990 | 30.00 | 31.00 | uniform |" in lines


def test_report_reads_files_the_old_code_wrote(tmp_path):
    old = {"original": row("100%", 1.0, 20.0), "prune_only": [row("100%", 1.0, 20.0), row("params=500000", 0.5, 40.0)],
           "routes": [ROUTE], "export_speed": {"hf": None}}
    (tmp_path / "results.json").write_text(json.dumps(old))
    data, folder = read_run(tmp_path)
    assert folder == tmp_path and data["export_speed"] == {"hf": None}
    assert isinstance(data["original"], EvalRow) and all(isinstance(r, EvalRow) for r in data["prune_only"])
    assert data["original"].to_dict() == old["original"]
    assert [r.to_dict() for r in data["prune_only"]] == old["prune_only"]
    assert data["routes"][0].to_dict() == ROUTE and str(data["routes"][0].budget) == "50%"
    _, text = report(tmp_path)
    assert "| prune only | params=500000 | 48-96 | 2-4 | 0.5 M (50%) | 40.00 |" in text


def test_report_into_results_md_replaces_only_its_section(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps([row("100%", 1.0, 20.0), row("50%", 0.5, 30.0)]))
    md = tmp_path / "docs" / "results.md"
    md.parent.mkdir()
    md.write_text("# Results\n\nkept\n\n<!-- demo:start -->\nold\n<!-- demo:end -->\n\ntail\n")
    assert main(["report", str(run), "--into", str(md), "--section", "demo"]) == 0
    text = md.read_text()
    assert "old" not in text and "kept" in text and "tail" in text and "| eval | 50% |" in text
    assert "![demo-pareto](img/demo-pareto.png)" in text and (md.parent / "img" / "demo-pareto.png").is_file()
    update_section(md, "other", "new section")
    assert md.read_text().endswith("<!-- other:start -->\nnew section\n<!-- other:end -->\n")


def test_report_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FlextronError, match="holds no results.json or eval.json"):
        read_run(tmp_path)
    (tmp_path / "results.json").write_text('{"preset": "tiny"}')
    with pytest.raises(FlextronError, match="no evaluation rows"):
        read_run(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(FlextronError, match="cannot read"):
        read_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"eval": [row("fast", 1.0)]}))
    with pytest.raises(FlextronError, match="cannot read the rows of .*cannot read budget 'fast'"):
        read_run(tmp_path)


@pytest.mark.parametrize("plot", ["pareto.png", "tasks.png"])
def test_plots_never_write_through_a_symlink_or_into_a_fifo(tmp_path, plot):
    """A plot's path that is a symlink (here to a file outside the run) or a FIFO is refused in one line;
    the file it points to is untouched."""
    import os

    run = tmp_path / "run"
    run.mkdir()
    arc = {"n": 10, "acc": 0.5, "acc_norm": 0.6}
    data = {"prune_only": [row("100%", 1.0, 20.0, {"arc_easy": arc}), row("50%", 0.5, 900.0, {"arc_easy": arc})]}
    (run / "results.json").write_text(json.dumps(data))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (run / plot).symlink_to(victim)
    with pytest.raises(FlextronError, match=f"{plot} is a symlink, not a regular file"):
        report(run)
    assert victim.read_text() == "keep me"
    (run / plot).unlink()
    os.mkfifo(run / plot)
    with pytest.raises(FlextronError, match="is a device, FIFO or socket"):
        report(run)
