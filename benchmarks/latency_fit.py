"""How well a latency table's fit rule prices sub-networks: each checkpoint's stored measurements refitted
by least squares on milliseconds (the rule before) and on the relative error (`latency_table.fit`, now
the default), without timing anything again. Scored three ways per rule and quantity: on the profile's
own unseen sub-networks, by 5-fold cross-validation over every measured one, and, where a budget
benchmark's JSON is named, on the routed sub-networks it timed in turn with the full model as `deci`
(|table ratio / measured ratio - 1|; how many within 3 %).

    python benchmarks/latency_fit.py CKPT[=benchmarks/results/llamacpp_budgets_X.json] ...
    python benchmarks/latency_fit.py --smoke     # a tiny model's synthetic table, seconds; writes no results
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from _results import publish
from flextron import api
from flextron.latency import relative_errors
from flextron.latency_table import QUANTITY, fit
from flextron.space import ElasticSpace, Subnet
from llamacpp_budgets import smoke_checkpoint

RULES = {"ms": False, "relative": True}  # rule name -> `fit(relative=...)`


def score(space: ElasticSpace, rows: list[dict], routed: list[dict], key: str, relative: bool) -> dict:
    """One rule on one quantity: unseen, cross-validated and routed errors."""
    def part(role: str) -> tuple[list[Subnet], list[float]]:
        picked = [r for r in rows if r["role"] == role]
        return [Subnet(**r["subnet"]) for r in picked], [r[key] for r in picked]

    (fit_nets, fit_y), (val_nets, val_y) = part("fit"), part("validate")
    price = fit(space, fit_nets, fit_y, relative).costs(space, "latency_ms")
    nets, ys = fit_nets + val_nets, fit_y + val_y
    order = np.random.default_rng(0).permutation(len(nets))
    pred, meas = [], []
    for k in range(5):
        held = order[k::5].tolist()
        train = [i for i in range(len(nets)) if i not in held]
        fold = fit(space, [nets[i] for i in train], [ys[i] for i in train], relative).costs(space, "latency_ms")
        pred += [fold(nets[i]) for i in held]
        meas += [ys[i] for i in held]
    # Errors by the rule the profile reports its own (`relative_errors`: the upper median of an even count).
    out = {"unseen": relative_errors([price(s) for s in val_nets], val_y),
           "cross_validated": relative_errors(pred, meas)}
    if routed:
        off = [(price(Subnet(**r["subnet"])) / price.full / r["measured"][key] - 1) * 100 for r in routed]
        out["routed"] = {"budgets": [r["budget"] for r in routed], "error_pct": off,
                         "median_abs_pct": statistics.median(map(abs, off)),
                         "within_3pct": sum(abs(e) <= 3 for e in off)}
    return out


def routed_rows(bench: Path | None) -> list[dict]:
    """The budget benchmark's rows served in `deci`, with each quantity's measured ratio to the full model
    as `deci` (timed in the same rounds)."""
    if bench is None:
        return []
    rows = json.loads(bench.read_text())["rows"]
    return [{"budget": r["budget"], "subnet": r["subnet"],
             "measured": {k: r["budget"] * r[f"{k}_ratio_to_deci_full"] for k in QUANTITY.values()}}
            for r in rows if r["graph"] == "deci"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="CKPT or CKPT=BENCH_JSON (a llamacpp_budgets.py result of that checkpoint)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(str(smoke_checkpoint(Path(tmp))), None)] if a.smoke else \
            [(r.split("=", 1)[0], Path(r.split("=", 1)[1]) if "=" in r else None) for r in a.runs]
        if not runs:
            p.error("name at least one profiled checkpoint (or --smoke)")
        results = []
        for ckpt, bench in runs:
            em, _, _ = api.load(ckpt, "cpu")
            if em.latency is None:
                p.error(f"{ckpt} has no latency table; run flextron profile {ckpt} first")
            rows, routed = em.latency.measurements, routed_rows(bench)
            results.append({"checkpoint": ckpt, "bench": str(bench) if bench else None,
                            "runtime": em.latency.runtime, "threads": em.latency.threads,
                            "scores": {key: {rule: score(em.space, rows, routed, key, relative)
                                             for rule, relative in RULES.items()} for key in QUANTITY.values()}})
    cmd = " ".join(["python benchmarks/latency_fit.py", *(["--smoke"] if a.smoke else a.runs)])
    lines = ["## The latency table's fit: least squares on milliseconds vs on the relative error", "",
             f"`{cmd}` — each checkpoint's stored measurements refitted by both rules, nothing timed again. "
             "Errors are |predicted / measured - 1|, median (max). Unseen: the profile's validation sub-networks. "
             "Cross-validated: 5 folds over every measured sub-network. Routed: the budget benchmark's routed "
             "`deci` sub-networks, their table ratio against their ratio to the full model timed in the same rounds.",
             "", "| checkpoint | quantity | rule | unseen | cross-validated | routed: median | routed: within ±3 % |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for key, by_rule in r["scores"].items():
            for rule, s in by_rule.items():
                u, c, rt = s["unseen"], s["cross_validated"], s.get("routed")
                cells = [f"{u['median_pct']:.1f}% ({u['max_pct']:.1f}%)",
                         f"{c['median_pct']:.1f}% ({c['max_pct']:.1f}%)",
                         f"{rt['median_abs_pct']:.1f}%" if rt else "-",
                         f"{rt['within_3pct']} of {len(rt['budgets'])}" if rt else "-"]
                lines.append(f"| {r['checkpoint']} | {key.removesuffix('_ms')} | {rule} | " + " | ".join(cells) + " |")
    publish("latency_fit", "latency-fit", {"runs": results}, lines, a.smoke)


if __name__ == "__main__":
    main()
