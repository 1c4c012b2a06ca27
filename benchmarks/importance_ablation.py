"""Ablation: importance-sorted vs randomly ordered units on the packaged SmolLM2 model.

Held-out perplexity (fp32, 1,024-token windows of the held-out split) of the original model,
of the converted elastic model at full width, and of uniform sub-networks at 75% and 50%
non-embedding-parameter budgets, for importance order and for a random order.

    python benchmarks/importance_ablation.py [--limit N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from _results import IMG_DIR, update_section, write_json
from flextron import api
from flextron.report import plot_ppl_vs_size

BUDGETS = ["1.0", "0.75", "0.5"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="held-out windows (default: all)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    t0 = time.time()
    kw = {"limit": a.limit, "device": a.device}
    original = api.evaluate(None, budgets=["1.0"], **kw)[0].to_dict()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for order in ("importance", "random"):
            ckpt = api.convert(None, f"{tmp}/{order}", order=order, device=a.device)
            runs[order] = [r.to_dict() for r in api.evaluate(ckpt, budgets=BUDGETS, **kw)]
    data = {
        "command": "python benchmarks/importance_ablation.py" + (f" --limit {a.limit}" if a.limit else ""),
        "device": a.device, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "seconds": round(time.time() - t0),
        "original_ppl": original["ppl"], "tokens": original["tokens"], "runs": runs,
    }
    write_json("importance_ablation", data)

    rel = runs["importance"][0]["ppl"] / original["ppl"] - 1
    lines = [
        "## Ablation 1: importance order vs random order (prune only, no training)",
        "",
        f"`{data['command']}` — SmolLM2-135M-Instruct (packaged), {original['tokens']:,} held-out tokens, "
        f"fp32, {a.device}, {data['seconds']} s.",
        "",
        f"Original model: perplexity **{original['ppl']:.3f}**. Converted (permuted) model at full width: "
        f"**{runs['importance'][0]['ppl']:.3f}** ({rel:+.4%}).",
        "",
        "| budget (non-emb params) | sub-network (MLP width, KV groups) | importance order | random order |",
        "|---|---|---|---|",
    ]
    for imp, rnd in zip(runs["importance"], runs["random"]):
        sub = f"{imp['subnet']['mlp'][0]}, {imp['subnet']['attn'][0]} ({imp['params_fraction']:.1%})"
        lines.append(f"| {imp['budget']} | {sub} | {imp['ppl']:.2f} | {rnd['ppl']:.2f} |")
    lines += ["", "![importance vs random](img/importance_ablation.png)"]
    update_section("importance-ablation", "\n".join(lines))

    xs = [r["params_fraction"] for r in runs["importance"]]
    plot_ppl_vs_size({f"{order} order": (xs, [r["ppl"] for r in runs[order]]) for order in ("importance", "random")},
                     IMG_DIR / "importance_ablation.png", "Prune-only sub-networks of SmolLM2-135M", original["ppl"])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
