"""Query heads trimmed inside KV groups vs whole KV groups only, on the packaged SmolLM2-135M.

SmolLM2 has 9 query heads in 3 KV groups, so whole-group removal gives each layer 3 attention
choices (3, 6, 9 heads). `convert --attn-unit head` adds 1 and 2 query heads per group with all
groups kept (3 or 6 heads reading all 3 KV heads) and, below that, 1-2 groups of one head. Two
elastic checkpoints, converted, trained and routed the same way with the same tokens, over
non-embedding-parameter budgets; held-out perplexity of the routed sub-network at each budget.

    python benchmarks/head_choices.py [--train-steps 20] [--router-steps 60] [--device cpu|cuda]
    python benchmarks/head_choices.py --smoke      # a tiny random model, minutes; writes no results

Parameters, not latency: nothing is timed, so other work may run beside it.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from _results import command_line, publish
from _variants import add_options, build, log, smoke_options
from flextron import api
from flextron.budgets import select_subnet, uniform_subnet_for
from flextron.cost import subnet_cost
from flextron.data import heldout_windows
from flextron.evaluate import perplexity
from flextron.precision import compute_dtype
from flextron.space import Budget

VARIANTS = {"group": "whole KV groups", "head": "query heads in groups"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(p, train_steps=20, router_steps=60, joint_steps=5)
    p.add_argument("--name", default="head_choices", help="results JSON and docs/results.md section")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.7, 1.0],
                   help="non-embedding-parameter budgets the routers train on and are scored at")
    a = p.parse_args()
    if a.smoke:
        smoke_options(a)
    t0 = time.time()
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for unit in VARIANTS:
            ckpt = build(work, unit, a, "params", attn_unit=unit)
            log(f"{unit}: perplexity per budget")
            em, tok, _ = api.load(ckpt, a.device)
            windows = heldout_windows(tok, 64 if a.smoke else 1024, a.limit)
            full = subnet_cost(em).params_nonembed
            rows = []
            for f in a.fractions:
                budget = Budget(metric="params", fraction=f)
                picks = {"routed": select_subnet(em, budget), "uniform": uniform_subnet_for(em, budget)[0]}
                for name, subnet in picks.items():
                    with em.subnet(subnet):
                        ppl = perplexity(em, windows, autocast_dtype=compute_dtype(a.dtype), progress=False)
                    heads = [em.blocks[i].attn_heads(c) for i, c in enumerate(subnet.attn)]
                    rows.append({"budget": f, "kind": name, "ppl": ppl, "subnet": subnet.to_dict(),
                                 "params_fraction": subnet_cost(em, subnet).params_nonembed / full,
                                 "query_heads": sum(h for h, _ in heads), "kv_heads": sum(kv for _, kv in heads)})
            curves[unit] = {"attn_choices": em.space.attn[0], "rows": rows,
                            "full": {"query_heads": sum(b.geometry.n_heads for b in em.blocks),
                                     "kv_heads": sum(b.geometry.n_kv_heads for b in em.blocks)}}
    command = command_line("head_choices.py", p, a)
    data = {"command": command, "device": a.device, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "dtype": a.dtype, "seconds": round(time.time() - t0), "curves": curves}
    g, h = curves["group"], curves["head"]
    lines = [
        "## Attention choices: query heads inside KV groups vs whole groups",
        "",
        f"`{command}` — {'a tiny random Llama (smoke run)' if a.smoke else 'SmolLM2-135M-Instruct (packaged)'}, "
        f"{a.dtype}, {a.device}, {data['seconds']} s. Both checkpoints: {a.train_steps} elastic-training steps, "
        f"{a.router_steps} router steps over non-embedding-parameter budgets {a.fractions}; perplexity on "
        f"{a.limit} held-out windows. Attention choices per layer: whole groups {g['attn_choices']} (KV groups), "
        f"query heads {h['attn_choices']} (heads).",
        "",
        "| params budget | sub-network | whole groups: ppl (params, query/KV heads) | "
        "query heads: ppl (params, query/KV heads) |",
        "|---|---|---|---|",
    ]
    for rg, rh in zip(g["rows"], h["rows"]):
        cells = [f"{r['ppl']:.2f} ({r['params_fraction']:.2f}, {r['query_heads']}/{r['kv_heads']})" for r in (rg, rh)]
        lines.append(f"| {rg['budget']:.2f} | {rg['kind']} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Full model: {g['full']['query_heads']} query / {g['full']['kv_heads']} KV heads over all layers."]
    publish(a.name, a.name, data, lines, a.smoke)


if __name__ == "__main__":
    main()
