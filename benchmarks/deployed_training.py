"""Deployment-aware elastic training at the token count of benchmarks/elastic_training.py.

Column (e) of that comparison: the same T tokens, settings and held-out windows, spent in two
halves. The first half is sandwich sampling (as column (c)). Then static routers are trained on
it (LLM frozen, as benchmarks/routed_training.py). The second half trains only what deploys:
`train --sampling budgets` over the routers' budgets, the full model a quarter of the time, the
routers kept. Reported: held-out perplexity of the routed sub-network at each parameter budget,
beside columns (b) uniform sampling, (c) sandwich routed and (d) trained alone. Each run with
other second-half settings (`--second-lr`, `--full-prob`, `--budget-probs`) adds an (e) column;
`--reuse-first` starts from the routed first half that an earlier run left in `--work`.

    python benchmarks/deployed_training.py [--tokens 100000] [--router-steps 200] [--device cpu|cuda]
    python benchmarks/deployed_training.py --smoke   # a tiny random model, a minute; writes no results
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from _results import RESULTS_DIR, command_line, publish
from _variants import source
from flextron import api
from flextron.options import RouteOptions, TrainOptions


def budget(fraction: float) -> str:
    return f"params={fraction:.4%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100_000, help="T: training tokens in all (half before routing)")
    p.add_argument("--router-steps", type=int, default=200)
    p.add_argument("--full-prob", type=float, default=0.25, help="second half: chance a draw is the full model")
    p.add_argument("--second-lr", type=float, default=None, help="second half's peak lr (default: the table's)")
    p.add_argument("--budget-probs", default=None,
                   help="second half: comma-separated probability of each budget, smallest first (default: equal)")
    p.add_argument("--reuse-first", action="store_true",
                   help="reuse the routed first half of an earlier run with the same settings in --work")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                   help="autocast dtype (default: the elastic-training table's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="/tmp/flextron-deployed-training")
    p.add_argument("--smoke", action="store_true", help="tiny random model, few tokens; writes no results")
    a = p.parse_args()
    t0 = time.time()
    previous = json.loads((RESULTS_DIR / "elastic_training.json").read_text())
    routed_c = json.loads((RESULTS_DIR / "routed_training.json").read_text())
    settings = {**previous["settings"], "dtype": a.dtype or previous["settings"]["dtype"]}
    fractions = sorted({round(r["params_fraction"], 4) for r in previous["results"]["uniform sampling"]})
    probs = None if a.budget_probs is None else tuple(float(x) for x in a.budget_probs.split(","))
    if probs is not None and len(probs) != len(fractions):
        raise SystemExit(f"--budget-probs: {len(probs)} values for {len(fractions)} budgets {fractions}; "
                         "give one per budget, smallest first")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model, convert = source(work, a.smoke)
    seq_len, micro, limit = (32, 2, 1) if a.smoke else (settings["seq_len"], settings["micro_batch"],
                                                       previous["eval_tokens"] // 1023)
    tokens = 2 * seq_len * micro * 2 if a.smoke else a.tokens
    a.router_steps = 4 if a.smoke else a.router_steps
    base = dict(seq_len=seq_len, micro_batch=micro, tokens=tokens // 2, dtype=settings["dtype"],
                save_every=10**9, eval_limit=0)
    stamp = {"smoke": a.smoke, "router_steps": a.router_steps, "lr": settings["lr"], **base}
    if a.reuse_first:
        found = json.loads((work / "first.json").read_text()) if (work / "first.json").is_file() else None
        if found != stamp:
            raise SystemExit(f"--reuse-first: {work} holds no routed first half with these settings "
                             f"({found} != {stamp}); run once without --reuse-first")
    else:
        (work / "first.json").unlink(missing_ok=True)  # a scratch directory: an earlier run's is replaced
        shutil.rmtree(work / "run-first", ignore_errors=True)
        ckpt = api.convert(model, work / "ckpt", device=a.device, dtype=settings["dtype"], overwrite=True, **convert)
        first = api.train(ckpt, work / "run-first", TrainOptions(sampling="sandwich", lr=settings["lr"], **base),
                          device=a.device)
        cfg = RouteOptions(budgets=tuple(fractions), metric="params", steps=a.router_steps, joint_steps=0,
                           surrogate=False, dtype=settings["dtype"], seq_len=seq_len, eval_limit=limit,
                           check_budgets=tuple(fractions))
        api.route(first["final"], cfg, out=work / "routed", overwrite=True, device=a.device)
        (work / "first.json").write_text(json.dumps(stamp))
    shutil.rmtree(work / "run-second", ignore_errors=True)
    lr = settings["lr"] if a.second_lr is None else a.second_lr
    second = api.train(work / "routed", work / "run-second",
                       TrainOptions(sampling="budgets", budgets=tuple(fractions), budget_probs=probs,
                                    full_prob=a.full_prob, warmup_steps=5, seed=1, lr=lr, **base), device=a.device)
    rows = [r.to_dict() for r in api.evaluate(second["final"], budgets=[budget(f) for f in fractions], limit=limit,
                                              seq_len=1024 if not a.smoke else 64, device=a.device,
                                              dtype=settings["dtype"])]
    run = {"command": command_line("deployed_training.py", p, a), "device": a.device,
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "settings": {**settings, "tokens": tokens, "full_prob": a.full_prob, "router_steps": a.router_steps,
                        "second_lr": lr, "budget_probs": probs, "reused_first": a.reuse_first},
           "eval_tokens": rows[0]["tokens"], "seconds": round(time.time() - t0), "rows": rows}
    path = RESULTS_DIR / "deployed_training.json"
    old = json.loads(path.read_text()) if path.is_file() and not a.smoke else {"runs": []}
    runs = [r for r in old["runs"] if r["command"] != run["command"]] + [run]
    prev = previous["results"]

    def at(fraction: float, rows: list[dict]) -> str:
        hit = [r for r in rows if abs(r["params_fraction"] - fraction) < 2e-3]
        return f"{hit[0]['ppl']:.2f}" if hit else "-"

    def label(r: dict) -> str:
        s = r["settings"]
        probs = "" if not s.get("budget_probs") else ", budgets " + ":".join(f"{x:g}" for x in s["budget_probs"])
        return f"(e) lr {s.get('second_lr', s['lr']):g}, full {s['full_prob']:.0%}{probs}"

    c_rows = [{**r, "params_fraction": r["budget"]} for r in routed_c["rows"]]
    lines = ["## Deployment-aware elastic training at equal tokens", "",
             f"{settings['dtype']}, T = {tokens:,} tokens: {tokens // 2:,} sandwich, routers ({a.router_steps} steps, "
             f"LLM frozen), then {tokens // 2:,} on the routed sub-networks and the full model (its share of "
             "draws, peak lr and budget weights in each (e) column's head). Held-out perplexity on "
             f"{run['eval_tokens']:,} tokens, the windows of the elastic-training table. Columns (b)-(d) repeat the "
             "two tables above; (c) and (e) are routed sub-networks. Commands:", ""]
    lines += [f"- {label(r)}: `{r['command']}` — {r['seconds'] / 60:.0f} min"
              + (" (second half only: the first half reused)" if r["settings"].get("reused_first") else "")
              for r in runs]
    lines += ["", "| params budget | (b) uniform sampling | (c) sandwich, routed | "
              + " | ".join(label(r) for r in runs) + " | (d) alone, 2x tokens |",
              "|---|---|---|" + "---|" * len(runs) + "---|"]
    for i, f in enumerate(fractions):  # each run's rows follow `fractions`
        lines.append(f"| {f:.1%} | {at(f, prev['uniform sampling'])} | {at(f, c_rows)} | "
                     + " | ".join(f"{r['rows'][i]['ppl']:.2f}" for r in runs) + f" | {at(f, prev['trained alone'])} |")
    lines += ["", f"Original model: {prev['original']['ppl']:.2f}."]
    publish("deployed_training", "deployed-training", {"runs": runs}, lines, a.smoke)


if __name__ == "__main__":
    main()
