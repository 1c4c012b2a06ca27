"""Routed width + depth + hidden against width + depth at equal measured llama.cpp decode latency. Each
checkpoint (elastic-trained the same way, profiled in llama.cpp, routed) serves its budgets; every served
sub-network is timed in llama.cpp in one session with its full model (`llamacpp_budgets.run`) and scored
on held-out perplexity (`flextron eval`). Then, at each of the other checkpoint's measured decode fractions,
the first one's perplexity interpolated (log perplexity linear in the measured fraction, inside its own
measured range only), so the two are compared at equal measured latency, not at equal nominal budget.

    python benchmarks/hidden_routed.py --ckpts "width + depth=CKPT_A" "width + depth + hidden=CKPT_B"
                                       [--budgets 0.4,0.5,...] [--limit 8]
    python benchmarks/hidden_routed.py --render    # the section again from the last run's JSON (no timing)
    python benchmarks/hidden_routed.py --smoke     # tiny random models, seconds; writes no results
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from _results import IMG_DIR, RESULTS_DIR, command_line, publish
from flextron import api, llamacpp
from flextron.errors import FlextronError
from flextron.report import plot_ppl_vs_size, widths_cell
from llamacpp_budgets import TIMING, run, smoke_checkpoint


def measured(ckpt: Path, budgets: list[float] | None, work: Path, timing: dict, ppl: dict) -> dict:
    """One checkpoint's served sub-networks: measured decode fraction of its full model and perplexity."""
    meta, rows = run(ckpt, budgets, work, None, timing)
    evals = api.evaluate(ckpt, budgets=[str(r["budget"]) for r in rows], progress=False, **ppl)
    out = []
    for r, e in zip(rows, evals):
        if e.subnet is None or e.subnet.to_dict() != r["subnet"]:
            raise FlextronError(f"{ckpt}: eval and the llama.cpp timing served different choices at {r['budget']}")
        out.append({"budget": r["budget"], "subnet": r["subnet"], "graph": r["graph"],
                    "decode_fraction": r["budget"] * r["decode_ms_ratio"],
                    "prefill_fraction": r["budget"] * r["prefill_ms_ratio"], "ppl": e.ppl, "tokens": e.tokens})
    return {"meta": meta, "rows": out}


def served(subnet: dict) -> str:
    """The choices of a served sub-network: each kind's kept widths (and how many sub-layers it skips),
    and its hidden size ("full" where the space has none or it keeps all)."""
    def kind(values: list[int]) -> str:
        kept = [v for v in values if v] or [0]
        skipped = len(values) - sum(map(bool, values))
        return widths_cell(kept) + (f" ({skipped} skipped)" if skipped else "")

    return f"{kind(subnet['mlp'])}; {kind(subnet['attn'])}; {subnet.get('hidden') or 'full'}"


def interpolate(rows: list[dict], x: float) -> float | None:
    """log perplexity of `rows` linear in the measured decode fraction, at `x`; None outside their range."""
    pts = sorted((r["decode_fraction"], math.log(r["ppl"])) for r in rows)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return math.exp(y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return None


def render(data: dict) -> tuple[list[str], dict]:
    """The docs/results.md section and the comparison rows of a run's JSON."""
    timing, ppl, results = data["timing"], data["ppl"], data["results"]
    (base, base_run), *others = results.items()
    lines = ["## Routed hidden size vs none, at equal measured llama.cpp decode latency", "",
             f"`{data['command']}` — {data['runtime']}, {base_run['meta']['outtype']}, "
             f"{base_run['meta']['threads']} threads, {data['seconds']} s. Each served sub-network is "
             f"timed in one llama.cpp session with its full model (decode ms/token after {timing['context']} tokens, "
             f"batch 1; the median of {timing['rounds']} per-round ratios): the measured fraction of the full model. "
             f"Perplexity: held-out, {ppl['limit']} windows of {ppl['seq_len']} tokens. \"{base} at equal latency\": "
             f"{base}'s log perplexity interpolated at the row's measured fraction (blank outside its measured range). "
             "A budget between checked ones is served the checked one below it, so some rows repeat a sub-network."]
    comparisons = {}
    for label, r in others:
        lines += ["", f"### {label} against {base}", "",
                  f"| budget | served (MLP, attention, hidden) | measured decode / full | {label} ppl | "
                  f"{base} at equal latency | ratio |", "|---|---|---|---|---|---|"]
        rows = []
        for row in r["rows"]:
            ref = interpolate(base_run["rows"], row["decode_fraction"])
            rows.append({**row, "baseline_ppl": ref, "ratio": None if ref is None else row["ppl"] / ref})
            lines.append(f"| {row['budget']:.0%} | {served(row['subnet'])} | "
                         f"{row['decode_fraction']:.3f} | {row['ppl']:.2f} | "
                         + (f"{ref:.2f} | {row['ppl'] / ref:.3f} |" if ref is not None else " | |"))
        comparisons[label] = rows
        distinct = list({json.dumps(x["subnet"], sort_keys=True): x for x in rows}.values())
        inside = [x for x in distinct if x["ratio"] is not None]
        smaller = [x for x in inside if x["subnet"].get("hidden")]
        lines.append(f"\nOf {label}'s {len(distinct)} distinct served sub-networks, {len(inside)} measured inside "
                     f"{base}'s range; {label} has the lower perplexity at {sum(x['ratio'] < 1 for x in inside)} of "
                     f"them. {len(smaller)} of those {len(inside)} keep a smaller hidden size (lower perplexity at "
                     f"{sum(x['ratio'] < 1 for x in smaller)}); the others keep the full one, where the two differ "
                     f"only by their runs. Lowest measured decode fraction: {label} "
                     f"{min(x['decode_fraction'] for x in rows):.3f}, {base} "
                     f"{min(x['decode_fraction'] for x in base_run['rows']):.3f}.")
    lines += ["", f"### {base} (baseline)", "",
              "| budget | served (MLP, attention, hidden) | measured decode / full | ppl |", "|---|---|---|---|",
              *(f"| {x['budget']:.0%} | {served(x['subnet'])} | {x['decode_fraction']:.3f} | "
                f"{x['ppl']:.2f} |" for x in base_run["rows"])]
    return lines, comparisons


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpts", nargs="*", default=[], help='two or more "LABEL=CKPT", the first the baseline')
    p.add_argument("--budgets", default=None, help="default: each checkpoint's grid and the points halfway")
    p.add_argument("--limit", type=int, default=8, help="held-out windows of 1,024 tokens")
    p.add_argument("--render", action="store_true", help="rewrite the results section from the last run's JSON")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    if a.render:
        data = json.loads((RESULTS_DIR / "hidden_routed.json").read_text())
    else:
        data = run_all(p, a)
    lines, data["comparisons"] = render(data)
    if not a.smoke:
        series = {label: ([x["decode_fraction"] for x in r["rows"]], [x["ppl"] for x in r["rows"]])
                  for label, r in data["results"].items()}
        png = plot_ppl_vs_size(series, IMG_DIR / "hidden_routed.png", "routed, at measured llama.cpp decode latency",
                               xlabel="measured decode time / the full model's (llama.cpp)")
        lines += ["", f"![routed, at measured latency](img/{png.name})"]
    publish("hidden_routed", "hidden-routed", data, lines, a.smoke)


def run_all(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    """Time and score every checkpoint (--smoke: two tiny ones); the run's JSON but its comparisons."""
    timing = {"context": 16, "decode_steps": 2, "rounds": 1} if a.smoke else TIMING
    ppl = {"limit": 1, "seq_len": 16} if a.smoke else {"limit": a.limit, "seq_len": 1024}
    budgets = [float(b) for b in a.budgets.split(",")] if a.budgets else None
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if a.smoke:
            ckpts = {"width": smoke_checkpoint(work / "a"), "width + hidden": smoke_checkpoint(work / "b", hidden=True)}
            budgets = [1.0]
        else:
            if len(a.ckpts) < 2 or not all("=" in c for c in a.ckpts):
                p.error('name two or more checkpoints as "LABEL=CKPT"')
            ckpts = {c.split("=", 1)[0]: Path(c.split("=", 1)[1]) for c in a.ckpts}
        results = {}
        for i, (label, ckpt) in enumerate(ckpts.items()):
            (work / f"run{i}").mkdir()
            results[label] = measured(ckpt, budgets, work / f"run{i}", timing, ppl)
    cmd = command_line("hidden_routed.py", p, argparse.Namespace(**{**vars(a), "ckpts": " ".join(
        f'"{c}"' for c in a.ckpts) or p.get_default("ckpts")}))
    return {"command": cmd, "runtime": llamacpp.runtime_version(), "seconds": round(time.time() - t0),
            "results": results, "timing": timing, "ppl": ppl}


if __name__ == "__main__":
    main()
