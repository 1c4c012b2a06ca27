"""Do memory budgets hold in llama.cpp? For each weight type (`--outtypes`), `--points` budgets
`memory_mb=N` spread between the smallest sub-network's memory and the full model's at that type (and
the full model), each exported with `flextron export --format gguf --outtype T` at the deployment
(`--context` tokens x `--batch` sequences at `--kv-type`); the GGUF loaded in llama.cpp at the same
settings, and what it reports allocating (its model size, KV cache, output and compute buffers) set
against what the export predicted (weights, KV cache, buffers: `flextron.memory` in the GGUF). The
checkpoint: `--ckpt`, else the packaged SmolLM2 (or `--model`) converted prune-only. No timing.

    python benchmarks/memory_budgets.py [--ckpt CKPT | --model HF_DIR] [--outtypes q4_k_m,q8_0,f16] [--context 4096]
    python benchmarks/memory_budgets.py --smoke [--out smoke.json]   # a tiny random model, seconds; writes no results
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import gguf

from _results import command_line, publish
from _variants import log, workspace
from flextron import api, llamacpp
from flextron.cost import MB, analytic_table
from flextron.deployment import Deployment
from flextron.elastic import ElasticModel
from flextron.fsutil import atomic_write
from flextron.report import widths_cell

# llama.cpp logs the KV, output and compute buffers in MiB to 2 decimals: a total within this of the budget fits.
LOG_ROUNDING = 3 * 0.005 * 2**20


def budgets(em: ElasticModel, deployment: Deployment, points: int) -> list[tuple[str, float]]:
    """(budget, N in MB): `points` budgets `memory_mb=N` evenly inside (smallest, full) memory at `deployment`
    (rounded down to 10 kB), and `memory_mb=100%`, the full model's."""
    table = analytic_table(em, "memory_mb", deployment=deployment)
    low, full = table.smallest, table.full
    inside = [math.floor((low + (full - low) * k / (points + 1)) * 100) / 100 for k in range(1, points + 1)]
    return [*((f"memory_mb={n}", n) for n in inside), ("memory_mb=100%", full)]


def measure(ckpt: Path, budget: str, n: float, deployment: Deployment, path: Path) -> dict:
    """Export the sub-network of `budget` (N = `n` MB) at `deployment`; what it predicted and what llama.cpp
    allocates."""
    api.export(ckpt, budget, path, overwrite=True, format="gguf", outtype=deployment.weight_type,
               context=deployment.context, batch=deployment.batch, kv_type=deployment.kv_type)
    fields = gguf.GGUFReader(path).fields
    predicted = json.loads(fields["flextron.memory"].contents())
    got = llamacpp.allocated(path, deployment)
    got["buffers"] = got["output"] + got["compute"]
    got["total"] = got["weights"] + got["kv"] + got["buffers"]
    file_bytes = path.stat().st_size
    path.unlink()
    return {"outtype": deployment.weight_type, "budget": budget, "budget_mb": n,
            "subnet": json.loads(fields["flextron.subnet"].contents()),
            "architecture": fields["general.architecture"].contents(), "file_bytes": file_bytes,
            "predicted": {k: predicted[k] for k in ("weights", "kv", "buffers", "total")}, "llama_cpp": got,
            "error_pct": 100 * (predicted["total"] / got["total"] - 1),
            "file_error_pct": 100 * ((predicted["total"] - predicted["weights"] + file_bytes) / got["total"] - 1),
            "margin_bytes": n * MB - got["total"], "fits": got["total"] <= n * MB + LOG_ROUNDING}


def pair(r: dict, key: str) -> str:
    return f"{r['predicted'][key] / MB:.2f} / {r['llama_cpp'][key] / MB:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="an elastic checkpoint (default: convert --model)")
    p.add_argument("--model", default=None, help="HF model dir to convert (default: the packaged SmolLM2)")
    p.add_argument("--outtypes", default="q4_k_m,q8_0,f16", help="GGUF weight types")
    p.add_argument("--points", type=int, default=4, help="budgets per type below the full model")
    p.add_argument("--context", type=int, default=4096, help="KV cache tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences, each with its own KV cache")
    p.add_argument("--kv-type", default="f16", help="KV cache type")
    p.add_argument("--work", default=None, help="keep the checkpoint here (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny random model; print, write no results")
    a = p.parse_args()
    t0 = time.time()
    with workspace(a) as (work, ckpt):
        em, rows = api.load(ckpt, "cpu")[0], []
        for t in a.outtypes.split(","):
            deployment = Deployment(t, a.context, a.batch, a.kv_type)
            for budget, n in budgets(em, deployment, a.points):
                rows.append(measure(Path(ckpt), budget, n, deployment, work / f"{t}.gguf"))
                r = rows[-1]
                log(f"{t} {budget}: predicted {r['predicted']['total'] / MB:.2f} MB, llama.cpp "
                    f"{r['llama_cpp']['total'] / MB:.2f} MB ({r['error_pct']:+.2f}%), fits: {r['fits']}")
    data = {"command": command_line("memory_budgets.py", p, a), "seconds": round(time.time() - t0),
            "runtime": llamacpp.runtime_version(), "checkpoint": str(a.ckpt) if a.ckpt else None,
            "model": a.model or ("tiny random llama" if a.smoke else "SmolLM2-135M-Instruct (packaged)"),
            "deployment": {"context": a.context, "batch": a.batch, "kv_type": a.kv_type},
            "max_abs_error_pct": max(abs(r["error_pct"]) for r in rows),
            "max_abs_file_error_pct": max(abs(r["file_error_pct"]) for r in rows),
            "all_fit": all(r["fits"] for r in rows), "rows": rows}
    sequences = f" x {a.batch} sequences" if a.batch > 1 else ""
    buffers = [r["predicted"]["buffers"] / r["llama_cpp"]["buffers"] for r in rows]
    lines = [
        "## Memory budgets in llama.cpp", "",
        f"`{data['command']}` — {data['model']}{', checkpoint ' + data['checkpoint'] if a.ckpt else ', prune-only'}, "
        f"{data['runtime']}, {data['seconds']} s. Each budget's sub-network exported with `flextron export --budget "
        f"memory_mb=N --format gguf --outtype T` (deployment: a {a.context}-token {a.kv_type} KV cache{sequences}; "
        "the last budget of each type `memory_mb=100%`, the full model's predicted memory), then loaded in "
        "llama.cpp at the same settings (flash attention, its 512-token micro-batch): predicted / what llama.cpp "
        "reports allocating, in MB (10^6 bytes) — weights (its model size), KV cache, buffers (output + compute), "
        "total. Error: predicted total / llama.cpp's - 1; with the file size for the weights (the whole file is "
        "memory-mapped): the same with the GGUF's metadata (the tokenizer) counted. llama.cpp <= N: its total "
        "within the budget (\"rounding\": above it by less than its log's rounding of the buffers to 0.01 MiB).", "",
        f"Largest |error|: {data['max_abs_error_pct']:.2f}% ({data['max_abs_file_error_pct']:.2f}% with the file "
        f"size); llama.cpp's total within the budget: {sum(r['fits'] for r in rows)} of {len(rows)}. Buffers, "
        f"predicted / llama.cpp's: {min(buffers):.3f} to {max(buffers):.3f}.", "",
        "| type | budget N (MB) | MLP, attention widths | file (MB) | weights | KV cache | buffers | total | error | "
        "error, file size | llama.cpp <= N |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["subnet"]
        within = "yes" if r["margin_bytes"] >= 0 else "rounding" if r["fits"] else "**no**"
        n = ("100% = " if r["budget"].endswith("%") else "") + f"{r['budget_mb']:.2f}"
        lines.append(f"| {r['outtype']} | {n} | {widths_cell(s['mlp'])}, {widths_cell(s['attn'])} | "
                     f"{r['file_bytes'] / MB:.2f} | {pair(r, 'weights')} | {pair(r, 'kv')} | {pair(r, 'buffers')} | "
                     f"{pair(r, 'total')} | {r['error_pct']:+.2f}% | {r['file_error_pct']:+.2f}% | "
                     f"{within} |")
    if a.out:
        atomic_write(Path(a.out), lambda t: t.write_text(json.dumps(data, indent=1)))
    publish("memory_budgets", "memory-budgets", data, lines, a.smoke)


if __name__ == "__main__":
    main()
