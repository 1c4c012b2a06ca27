"""Which attention units to keep (prune only): scored by what each adds through the output
projection, by Minitron's norm of its slice entering that projection, or at random.

On the packaged SmolLM2-135M (9 query heads in 3 KV groups per layer), every layer keeps the same
number of query heads and its whole MLP: 3 or 6 heads as whole KV groups (1 or 2 groups, as
`convert` ranks them by default) or inside every group (1 or 2 heads in each of the 3 groups, as
`convert --attn-unit head` ranks them). Calibration as `convert`'s default (256 x 256 tokens of the
train split); held-out perplexity, fp32.

    python benchmarks/head_importance.py [--limit 8] [--seeds 2] [--device cpu|cuda]

Nothing is timed, so other work may run beside it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from _results import command_line, publish
from flextron.assets import load_hf
from flextron.data import default_splits, heldout_windows, sample_sequences, tokenize
from flextron.elastic import ElasticModel
from flextron.evaluate import perplexity
from flextron.importance import measure_importance, random_importance, sort_by_importance
from flextron.options import ConvertOptions
from flextron.space import Subnet

# (attention unit, choice per layer, what a layer keeps)
KEEPS = [("group", 2, "6 heads: 2 whole KV groups"), ("head", 6, "6 heads: 2 in each KV group"),
         ("group", 1, "3 heads: 1 whole KV group"), ("head", 3, "3 heads: 1 in each KV group")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=8, help="held-out windows of 1,024 tokens")
    p.add_argument("--seeds", type=int, default=2, help="random orders averaged")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    t0 = time.time()
    o = ConvertOptions()
    _, tok, _ = load_hf(None)
    calib = sample_sequences(tokenize(tok, default_splits()["train"]), o.calib_sequences, o.calib_seq_len, o.seed)
    windows = heldout_windows(tok, 1024, a.limit)
    rules = {"output (flextron)": "output", "input (Minitron)": "input",
             **{f"random {s}": s for s in range(a.seeds)}}
    ppl: dict[str, dict[str, float]] = {k: {} for _, _, k in KEEPS}
    full = None
    for unit in ("group", "head"):
        for name, rule in rules.items():
            em = ElasticModel(load_hf(None, device=a.device)[0], attn_unit=unit)
            imp = (random_importance(em, rule) if isinstance(rule, int) else
                   measure_importance(em, calib, o.batch_size, attn_score=rule))
            sort_by_importance(em, imp)
            if full is None:
                full = perplexity(em, windows, desc="full")
            for kind, choice, keep in KEEPS:
                if kind == unit:
                    n = em.space.n_layers
                    with em.subnet(Subnet(mlp=[em.blocks[0].mlp.n_units] * n, attn=[choice] * n)):
                        ppl[keep][name] = perplexity(em, windows, desc=f"{keep}, {name}")
    data = {"command": command_line("head_importance.py", p, a), "device": a.device,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "seconds": round(time.time() - t0), "tokens": windows.numel(), "full_ppl": full, "ppl": ppl}
    lines = ["## Which heads to keep: attention importance rules (prune only)", "",
             f"`{data['command']}` — SmolLM2-135M-Instruct (packaged), fp32, {a.device}, {data['seconds']} s; "
             f"held-out perplexity on {data['tokens']:,} tokens; every layer keeps its whole MLP and the heads "
             "each rule ranks first (inside every KV group: `convert --attn-unit head`'s order; whole groups: "
             "by their summed score, the default). output: the norm of what a unit adds through the output "
             "projection (flextron's rule for heads inside groups); input: the norm of its slice entering that "
             "projection (Minitron's, flextron's for whole groups); "
             f"random: mean of {a.seeds} random orders.", "",
             "| heads kept per layer | output (flextron) | input (Minitron) | random |", "|---|---|---|---|"]
    for _, _, keep in KEEPS:
        r = ppl[keep]
        rnd = statistics.mean(r[f"random {s}"] for s in range(a.seeds))
        lines.append(f"| {keep} | {r['output (flextron)']:.1f} | {r['input (Minitron)']:.1f} | {rnd:.1f} |")
    lines += ["", f"All 9 heads: {full:.2f}."]
    publish("head_importance", "head-importance", data, lines, smoke=False)


if __name__ == "__main__":
    main()
