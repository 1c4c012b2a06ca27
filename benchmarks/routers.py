"""Budgets that mean something, on the packaged SmolLM2-135M:

1. the latency lookup table: median / max |predicted - measured| / measured on unseen random
   sub-networks, decode and prefill;
2. static routers trained through the surrogate model vs routers trained directly through the
   LLM (straight-through Gumbel), same number of router steps: realised cost / target and
   held-out perplexity per budget (trained grid and two unseen budgets), next to the largest
   uniform sub-network of the same budget.

    python benchmarks/routers.py [--ckpt CKPT] [--steps 200] [--metric params|latency_ms] [--device cpu|cuda]
        [--surrogate-warmup 64] [--surrogate-threshold 0.25] [--check-sequences 0]

The surrogate's warm-up (forward passes only) is part of its wall time. `--check-sequences`
(default 0 here) turns on route's check against the uniform baseline; it is off so the table
compares the routers themselves.

Budgets: 0.4, 0.5, ..., 1.0 of non-embedding params by default (plus the two unseen midpoints);
with `--metric latency_ms`, a grid over the range of decode latency this machine allows.
Nothing else may run meanwhile: the latency table is measured first.

CKPT is an elastic checkpoint, ideally trained (e.g. the flextron run of
benchmarks/elastic_training.py); without it the packaged model is converted.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

import torch

from _results import IMG_DIR, command_line, update_section, write_json
from flextron import api
from flextron.budgets import budget_grid
from flextron.options import DTYPE_NAMES, RouteOptions
from flextron.report import plot_ppl_vs_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--joint-steps", type=int, default=20)
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--eval-limit", type=int, default=16)
    p.add_argument("--metric", default="params", choices=["params", "latency_ms"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="/tmp/flextron-routers")
    p.add_argument("--surrogate-warmup", type=int, default=RouteOptions.surrogate_warmup)
    p.add_argument("--surrogate-threshold", type=float, default=RouteOptions.surrogate_threshold)
    p.add_argument("--check-sequences", type=int, default=0)
    p.add_argument("--profile-samples", type=int, default=24, help="random sub-networks the latency table is fitted on")
    p.add_argument("--profile-context", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=RouteOptions.seq_len, help="router training rows (tokens)")
    p.add_argument("--micro-batch", type=int, default=RouteOptions.micro_batch)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = work / "base"
    if a.ckpt:
        if base.exists():
            shutil.rmtree(base)
        shutil.copytree(a.ckpt, base, ignore=shutil.ignore_patterns("training_state.pt"))
    else:
        api.convert(None, base, device=a.device, dtype="bf16", overwrite=True)
    table = api.profile(base, device=a.device, dtype=a.dtype, context=a.profile_context, samples=a.profile_samples,
                        validate=max(1, a.profile_samples * 10 // 24))
    if a.metric == "params":
        grid = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    else:  # what latency budgets this machine allows
        grid = budget_grid(api.load(base, "cpu")[0], a.metric, points=7)
    runs, seconds = {}, {}
    for name, surrogate in (("surrogate", True), ("straight-through", False)):
        cfg = RouteOptions(budgets=grid, metric=a.metric, steps=a.steps, joint_steps=a.joint_steps,
                           surrogate=surrogate, dtype=a.dtype, eval_limit=a.eval_limit,
                           surrogate_warmup=a.surrogate_warmup, surrogate_threshold=a.surrogate_threshold,
                           check_sequences=a.check_sequences, seq_len=a.seq_len, micro_batch=a.micro_batch)
        t = time.time()
        runs[name] = api.route(base, cfg, out=work / f"routed-{name}", device=a.device)
        seconds[name] = time.time() - t
    data = {
        "command": command_line("routers.py", p, a),
        "source": a.ckpt or "packaged model, converted", "device": table.device,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "latency": {"validation": table.main.validation, "decode_ms": table.main.decode_ms.to_dict(),
                    "prefill_ms": table.main.prefill_ms.to_dict(), "dtype": table.dtype, "batch": table.batch,
                    "context": table.context},
        "seconds": seconds, "total_seconds": round(time.time() - t0),
        "surrogate_steps": [sum(r.get("surrogate_used", False) for r in runs["surrogate"]["log"]), a.steps],
        "surrogate_warmup": a.surrogate_warmup,
        "routes": {k: [r.to_dict() for r in v["budgets"]] for k, v in runs.items()},
        "metric": runs["surrogate"]["metric"],
    }
    write_json("routers", data)
    report(data)


def report(data: dict) -> None:
    v = data["latency"]["validation"]
    sm, st = data["routes"]["surrogate"], data["routes"]["straight-through"]
    lines = [
        "## Latency lookup table",
        "",
        f"`{data['command']}` — {data['device']}, {data['latency']['dtype']}, batch {data['latency']['batch']}, "
        f"context {data['latency']['context']}. Error of the additive table on {v['decode_ms']['n']} random "
        "sub-networks it was not fitted on:",
        "",
        "| | median abs. error | max abs. error |",
        "|---|---|---|",
        f"| decode (ms/token) | {v['decode_ms']['median_pct']:.1f}% | {v['decode_ms']['max_pct']:.1f}% |",
        f"| prefill (ms) | {v['prefill_ms']['median_pct']:.1f}% | {v['prefill_ms']['max_pct']:.1f}% |",
        "",
        "## Routers: surrogate-guided vs straight-through (surrogate ablation)",
        "",
        f"Budgets in {data['metric']}; source checkpoint: {data['source']}. Same router steps for both; wall "
        f"time: surrogate {data['seconds']['surrogate'] / 60:.1f} min, straight-through "
        f"{data['seconds']['straight-through'] / 60:.1f} min (surrogate: after a warm-up on "
        f"{data.get('surrogate_warmup', 0)} random architectures); the surrogate was accurate enough to guide "
        f"{data['surrogate_steps'][0]} of the {data['surrogate_steps'][1]} router steps (the others went straight "
        "through the LLM). Cost/target is after projection (raw argmax in "
        "brackets); uniform = the largest uniform sub-network within the same budget.",
        "",
        "| budget | cost/target surrogate | ppl surrogate | cost/target straight-through | ppl straight-through | "
        "ppl uniform |",
        "|---|---|---|---|---|---|",
    ]
    for a, b in zip(sm, st):
        lines.append(f"| {a['budget']:.0%} | {a['cost_ratio']:.3f} ({a['raw_cost_ratio']:.3f}) | {a['ppl']:.2f} | "
                     f"{b['cost_ratio']:.3f} ({b['raw_cost_ratio']:.3f}) | {b['ppl']:.2f} | {a['uniform_ppl']:.2f} |")
    lines += ["", "![routers](img/routers.png)"]
    update_section("routers", "\n".join(lines))
    plot_ppl_vs_size({
        "routers (surrogate)": ([r["fraction_of_full"] for r in sm], [r["ppl"] for r in sm]),
        "routers (straight-through)": ([r["fraction_of_full"] for r in st], [r["ppl"] for r in st]),
        "uniform": ([r["uniform_fraction_of_full"] for r in sm], [r["uniform_ppl"] for r in sm]),
    }, IMG_DIR / "routers.png", "Routed vs uniform sub-networks",
        xlabel=f"fraction of the full model's {data['metric']}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
