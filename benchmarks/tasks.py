"""Zero-shot task accuracy per budget (the paper's evidence), through `flextron eval --tasks`:
the packaged model converted (prune-only; at 100 % it computes the original's function, the
reference row) and any elastic checkpoints named, at parameter budgets, on the packaged task files
(ARC-Easy, PIQA, HellaSwag, WinoGrande: accuracy normalised by the answer's length, as lm-eval's
acc_norm; LAMBADA: greedy last-word accuracy). A routed checkpoint is scored at the sub-networks
its routers serve; others at the largest uniform sub-network within each budget. Beside them, the
perplexity on held-out prose and on off-domain text (`eval --ppl-data`: the docstrings of
`instruct.DOC_MODULES`, technical documentation never trained on), each as a ratio to the original's.
With `--lm-eval`, each row is scored again by lm-evaluation-harness itself (`flextron.harness`: the
same sub-network as an lm_eval model, the same documents as lm_eval task configs; WinoGrande, whose
choices have different contexts, has no plain lm_eval form), a second scorer beside ours.

    python benchmarks/tasks.py [--ckpt NAME=PATH,...] [--budgets params=100%,params=75%,...] [--limit 200]
                               [--lm-eval] [--name tasks]
    python benchmarks/tasks.py --smoke      # 8 documents per task, 2 budgets; writes no results
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time
from pathlib import Path

from _results import accuracy, command_line, publish
from flextron import api
from flextron.space import Budget
from instruct import docs_text

TASKS = ("arc_easy", "piqa", "hellaswag", "winogrande", "lambada")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="", help="NAME=PATH of an elastic checkpoint, comma-separated for more")
    p.add_argument("--budgets", default="params=100%,params=75%,params=50%,params=35%",
                   help="parameter budgets by default: the same sub-network sizes whatever metric a checkpoint's "
                        "routers were trained on")
    p.add_argument("--prune-budgets", default=None, help="budgets of the prune-only rows (default: --budgets; "
                                                          "params=100%% alone: the original only)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, default=200, help="documents per task (the first of each packaged file)")
    p.add_argument("--windows", type=int, default=8, help="1,024-token windows of each perplexity")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lm-eval", action="store_true", help="also score each row through lm-evaluation-harness")
    p.add_argument("--name", default="tasks", help="JSON file and docs/results.md section written")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--work", default="/tmp/flextron-tasks")
    a = p.parse_args()
    budgets, tasks = a.budgets.split(","), a.tasks.split(",")
    pruned = a.prune_budgets.split(",") if a.prune_budgets else budgets
    if Budget.parse(pruned[0]).fraction != 1.0:
        p.error("the prune-only budgets must start at 1.0: the original's row, which the perplexities are compared "
                "with")
    limit = 8 if a.smoke else a.limit
    if a.smoke:
        budgets, pruned = budgets[:2], pruned[:2]
    t0 = time.time()
    converted, docs = Path(a.work) / "converted", Path(a.work) / "docs.txt"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(docs_text(), encoding="utf-8")
    if not converted.is_dir():
        api.convert(None, converted, calib_sequences=128, progress=False)
    runs = {"prune-only": str(converted), **dict(c.split("=", 1) for c in a.ckpt.split(",") if c)}
    results = {}
    for name, path in runs.items():
        at = pruned if name == "prune-only" else budgets
        rows = api.evaluate(path, budgets=at, tasks=tasks, limit=limit, device=a.device, progress=False)
        ppl = api.evaluate(path, budgets=at, limit=2 if a.smoke else a.windows, ppl_data=str(docs),
                           device=a.device, progress=False)
        results[name] = [{**r.to_dict(), "ppl": q.ppl, "ppl_data": q.ppl_data} for r, q in zip(rows, ppl)]
        if a.lm_eval:
            for r, scores in zip(results[name], harness_scores(path, at, tasks, limit, a.device, Path(a.work))):
                r["lm_eval"] = scores
        for r in results[name]:
            print(name, r["budget"], {t: round(accuracy(s), 3) for t, s in r["tasks"].items()}, r["ppl"],
                  r["ppl_data"], r.get("lm_eval"), flush=True)
    original = results["prune-only"][0]  # budgets start at the full model
    lines = [f"`{command_line('tasks.py', p, a)}` — {a.device}, {time.time() - t0:.0f} s. The first {limit} "
             "documents of each packaged task file; accuracy (length-normalised for multiple choice, acc_norm; "
             "greedy last word for LAMBADA). Prune-only at 100 % is the original model. Chance: ARC-Easy 25 %, "
             "PIQA 50 %, HellaSwag 25 %, WinoGrande 50 %. Perplexity on "
             f"{2 if a.smoke else a.windows} windows of 1,024 tokens of each text; x: over the original's.", "",
             "| checkpoint | budget | params | " + " | ".join(tasks) + " | mean | prose ppl | off-domain ppl |",
             "|---|---|---|" + "---|" * (len(tasks) + 3)]
    if a.lm_eval:
        lines[0] += (" Rows marked lm-eval: the same sub-network and documents scored by lm-evaluation-harness "
                     f"{importlib.metadata.version('lm_eval')} (acc_norm; acc for LAMBADA); no mean or perplexities.")
    for name, rows in results.items():
        for r in rows:
            accs = [accuracy(r["tasks"][t]) for t in tasks]
            lines.append(f"| {name} | {r['budget']} | {r['params_fraction']:.0%} | "
                         + " | ".join(f"{x:.1%}" for x in accs) + f" | {sum(accs) / len(accs):.1%} | "
                         f"{r['ppl']:.2f} ({r['ppl'] / original['ppl']:.2f}x) | "
                         f"{r['ppl_data']:.2f} ({r['ppl_data'] / original['ppl_data']:.2f}x) |")
            if "lm_eval" in r:
                lines.append(f"| {name}, lm-eval | {r['budget']} | {r['params_fraction']:.0%} | "
                             + " | ".join(f"{r['lm_eval'][t]:.1%}" if t in r["lm_eval"] else "-" for t in tasks)
                             + " | - | - | - |")
    publish(a.name, a.name, {"command": command_line("tasks.py", p, a), "limit": limit, "results": results},
            lines, smoke=a.smoke)


def harness_scores(path: str, budgets: list[str], tasks: list[str], limit: int, device: str,
                   work: Path) -> list[dict]:
    """Per budget, each task's accuracy as lm_eval scores it (acc_norm, else acc), through one FlextronLM
    moved from budget to budget; tasks without a plain lm_eval form are left out."""
    import lm_eval

    from flextron.errors import FlextronError
    from flextron.harness import FlextronLM, task_config

    configs = {}
    for t in tasks:
        try:
            configs[t] = task_config(t, work / "lm_eval", limit)
        except FlextronError:  # winogrande: its choices differ in context
            continue
    lm = FlextronLM(path, budget=budgets[0], device=device)
    out = []
    for b in budgets:
        lm.set_budget(b)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(configs.values()), log_samples=False)["results"]
        out.append({t: res[c["task"]].get("acc_norm,none", res[c["task"]]["acc,none"]) for t, c in configs.items()})
    return out


if __name__ == "__main__":
    main()
