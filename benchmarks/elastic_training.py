"""Elastic training on the packaged SmolLM2-135M, one run, same data, same token count T:

(a) prune only (convert, no training); (b) uniform-width sampling (MatFormer style);
(c) flextron sandwich sampling (full + smallest + 2 random heterogeneous sub-networks);
(d) Minitron-style: for 75% and 50%, the sliced sub-network distilled alone with T tokens each.
Held-out perplexity of uniform sub-networks at each budget, plus the elastic overhead: the
speed of a forward/backward pass of a sub-network through the elastic model vs the same
sub-network exported as a standalone model.

    python benchmarks/elastic_training.py [--tokens 100000] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from _results import IMG_DIR, update_section, write_json
from flextron import api
from flextron.assets import load_hf
from flextron.budgets import select_subnet
from flextron.checkpoint import load_checkpoint
from flextron.options import TrainOptions
from flextron.precision import autocast, compute_dtype
from flextron.report import plot_ppl_vs_size
from flextron.space import Budget

BUDGETS = ["1.0", "0.75", "0.5", "0.35"]
ALONE = ["0.75", "0.5"]


def step_time(model: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype | None, n: int) -> float:
    """Median seconds of a forward + backward pass (the student's share of a training step)."""
    times = []
    for i in range(n + 2):
        t = time.perf_counter()
        with autocast(ids.device, dtype):
            loss = model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def overhead(ckpt: Path, work: Path, cfg: TrainOptions, device: str) -> dict:
    """Elastic model at a sub-network vs the exported standalone model, same input."""
    out = {}
    dtype = compute_dtype(cfg.dtype)
    for budget in ALONE:
        export_dir = api.export(ckpt, budget, work / f"export-{budget}", overwrite=True)
        em, tok, _ = load_checkpoint(ckpt, device=device)
        em.set_subnet(select_subnet(em, Budget.parse(budget)))
        em.train()
        standalone, _, _ = load_hf(str(export_dir), device=device)
        standalone.train()
        ids = torch.randint(0, em.config.vocab_size, (cfg.micro_batch, cfg.seq_len), device=device)
        elastic_s = step_time(em, ids, dtype, 5)
        alone_s = step_time(standalone, ids, dtype, 5)
        out[budget] = {"elastic_s": elastic_s, "standalone_s": alone_s, "slowdown": elastic_s / alone_s - 1}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100_000, help="T: training tokens per method (per budget for d)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-limit", type=int, default=24, help="held-out 1,024-token windows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="/tmp/flextron-bench", help="scratch directory for checkpoints and runs")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = dict(seq_len=a.seq_len, micro_batch=a.micro_batch, tokens=a.tokens, lr=a.lr, dtype="bf16",
                save_every=10**9, eval_limit=0)
    ev = {"limit": a.eval_limit, "device": a.device, "dtype": "bf16"}

    ckpt = api.convert(None, work / "ckpt", device=a.device, dtype="bf16", overwrite=True)

    def evaluate(path: Path | None, budgets: list[str]) -> list[dict]:
        return [r.to_dict() for r in api.evaluate(path, budgets=budgets, **ev)]

    results = {"original": evaluate(None, ["1.0"])[0], "prune-only": evaluate(ckpt, BUDGETS)}
    seconds = {}
    for name, sampling in (("uniform sampling", "uniform"), ("flextron", "sandwich")):
        t = time.time()
        run = api.train(ckpt, work / f"run-{sampling}", TrainOptions(sampling=sampling, **base), device=a.device)
        seconds[name] = time.time() - t
        results[name] = evaluate(run["final"], BUDGETS)
    results["trained alone"] = []
    for budget in ALONE:
        t = time.time()
        run = api.train(ckpt, work / f"run-alone-{budget}",
                        TrainOptions(sampling="fixed", budgets=(float(budget),), **base), device=a.device)
        seconds[f"alone {budget}"] = time.time() - t
        results["trained alone"] += evaluate(run["final"], [budget])
    cfg = TrainOptions(**base)
    data = {
        "command": f"python benchmarks/elastic_training.py --tokens {a.tokens} --device {a.device}",
        "device": a.device, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "settings": {k: v for k, v in base.items() if k not in ("save_every", "eval_limit")},
        "eval_tokens": results["original"]["tokens"], "train_seconds": seconds,
        "total_seconds": round(time.time() - t0), "results": results,
        "overhead": overhead(ckpt, work, cfg, a.device),
    }
    write_json("elastic_training", data)
    report(data)


def report(data: dict) -> None:
    res = data["results"]
    orig = res["original"]["ppl"]
    methods = ["prune-only", "uniform sampling", "flextron"]
    lines = [
        "## Elastic continued training: flextron vs baselines",
        "",
        f"`{data['command']}` — {data['device']} ({data['cpu']}), torch {data['torch']}, bf16 autocast, "
        f"T = {data['settings']['tokens']:,} tokens per method ({data['settings']['micro_batch']} x "
        f"{data['settings']['seq_len']} tokens per step), lr {data['settings']['lr']}; held-out perplexity on "
        f"{data['eval_tokens']:,} tokens; {data['total_seconds'] / 60:.0f} min in all.",
        "",
        f"Original model: **{orig:.2f}**. Columns (b) and (c) train one model for all budgets with T tokens; "
        "(d) trains a separate sliced model per budget with T tokens each (2T for the two).",
        "",
        "| budget | sub-network (MLP, KV groups) | (a) prune only | (b) uniform sampling | (c) flextron | "
        "(d) trained alone |",
        "|---|---|---|---|---|---|",
    ]
    alone = {r["budget"]: r["ppl"] for r in res["trained alone"]}
    for i, r in enumerate(res["prune-only"]):
        sub = f"{r['subnet']['mlp'][0]}, {r['subnet']['attn'][0]} ({r['params_fraction']:.0%})"
        cells = [f"{res[m][i]['ppl']:.2f}" for m in methods]
        cells.append(f"{alone[r['budget']]:.2f}" if r["budget"] in alone else "-")
        lines.append(f"| {r['budget']} | {sub} | " + " | ".join(cells) + " |")
    full = res["flextron"][0]["ppl"]
    lines += ["", f"Flextron at full budget: {full:.2f}, {full / orig - 1:+.1%} vs the original (target: within 2%).",
              "", "Elastic overhead (forward + backward of one sub-network, elastic model vs exported standalone):", "",
              "| budget | elastic (s) | standalone (s) | slowdown |", "|---|---|---|---|"]
    for b, o in data["overhead"].items():
        lines.append(f"| {b} | {o['elastic_s']:.3f} | {o['standalone_s']:.3f} | {o['slowdown']:+.1%} |")
    lines += ["", "![Pareto](img/elastic_training.png)"]
    update_section("elastic-training", "\n".join(lines))

    curves = {m: ([r["params_fraction"] for r in res[m]], [r["ppl"] for r in res[m]]) for m in methods}
    alone_pts = {"trained alone (T each)": ([r["params_fraction"] for r in res["trained alone"]],
                                            [r["ppl"] for r in res["trained alone"]])}
    plot_ppl_vs_size(curves, IMG_DIR / "elastic_training.png",
                     f"SmolLM2-135M, T = {data['settings']['tokens']:,} tokens", orig, alone_pts)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
