"""The elastic-training comparison with Flextron's own evaluation: the flextron-trained checkpoint
of benchmarks/elastic_training.py, with static routers trained on it (LLM frozen: no joint phase,
so no extra LLM training tokens), at the parameter fractions of the uniform sub-networks the other
methods are evaluated at; same held-out windows and dtype as that benchmark.

    python benchmarks/routed_training.py --ckpt FLEXTRON_RUN_FINAL [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from _results import RESULTS_DIR, update_section, write_json
from flextron import api
from flextron.options import RouteOptions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="the flextron run's final checkpoint")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="/tmp/flextron-routed-training")
    a = p.parse_args()
    t0 = time.time()
    previous = json.loads((RESULTS_DIR / "elastic_training.json").read_text())
    fractions = sorted({round(r["params_fraction"], 4) for r in previous["results"]["uniform sampling"]})
    base = Path(a.work) / "routed"
    if base.exists():
        shutil.rmtree(base)
    shutil.copytree(a.ckpt, base, ignore=shutil.ignore_patterns("training_state.pt"))
    cfg = RouteOptions(budgets=tuple(fractions), metric="params", steps=a.steps, joint_steps=0, surrogate=False,
                       dtype="bf16", eval_limit=previous["eval_tokens"] // 1023, check_budgets=tuple(fractions))
    routed = api.route(base, cfg, device=a.device)
    data = {"command": f"python benchmarks/routed_training.py --ckpt {a.ckpt} --steps {a.steps}",
            "source": a.ckpt, "steps": a.steps, "rows": [r.to_dict() for r in routed["budgets"]],
            "previous": previous["results"],
            "eval_tokens": previous["eval_tokens"], "total_seconds": round(time.time() - t0)}
    write_json("routed_training", data)
    report(data)


def report(data: dict) -> None:
    prev = data["previous"]

    def at(method: str, fraction: float) -> str:
        rows = [r for r in prev.get(method, []) if abs(r["params_fraction"] - fraction) < 1e-3]
        return f"{rows[0]['ppl']:.2f}" if rows else "-"

    lines = ["## Elastic training, evaluated the Flextron way (routed sub-networks)", "",
             f"`{data['command']}` — {data['total_seconds'] / 60:.0f} min; held-out perplexity on the same "
             f"{data['eval_tokens']:,} tokens as the elastic-training table. (c) routed: static routers "
             f"({data['steps']} straight-through steps, LLM frozen, no joint phase) choose per-layer widths within "
             "each budget on the flextron-trained checkpoint; the other columns repeat that table.", "",
             "| params budget | (b) uniform sampling | (c) flextron, uniform slice | (c) flextron, routed (cost) "
             "| (d) alone, 2x tokens |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        f = r["budget"]
        lines.append(f"| {f:.1%} | {at('uniform sampling', f)} | {at('flextron', f)} | {r['ppl']:.2f} "
                     f"({r['fraction_of_full']:.1%}) | {at('trained alone', f)} |")
    update_section("elastic-training-routed", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
