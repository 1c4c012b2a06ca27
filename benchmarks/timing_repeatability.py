"""How far a sub-network's llama.cpp time over the full model's moves from one session to the next, timed
two ways: each file alone in its own load, the full model in another (as `flextron profile` timed them
before it kept a reference), and each file in turn with the full model in the same rounds (as `profile`
does now, `llamacpp.Reference`, and as the budget benchmarks judge a budget). Every session loads the
files afresh; the spread of each way's ratios over the sessions is what a table fitted on it inherits.

    python benchmarks/timing_repeatability.py CKPT [--budgets 0.5,0.7] [--sessions 4] [--threads 2]
    python benchmarks/timing_repeatability.py --smoke     # a tiny random model, seconds; writes no results
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _results import command_line, publish
from flextron import api, llamacpp
from flextron.budgets import select_subnet
from flextron.space import Budget
from llamacpp_budgets import gguf, smoke_checkpoint

KEY = "decode_ms"


def session(full: Path, subs: list[Path], rounds: int, timing: dict) -> dict:
    """One session: the full model and each sub-network alone (each its own load), then all in turn."""
    alone = [llamacpp.medians(llamacpp.measure_rounds([p], rounds, **timing)[0])[KEY] for p in (full, *subs)]
    together = llamacpp.measure_rounds([full, *subs], rounds, **timing)
    return {"full_alone": alone[0], "alone": [a / alone[0] for a in alone[1:]],
            "full_together": llamacpp.medians(together[0])[KEY],
            "together": [llamacpp.median_ratios(t, together[0])[KEY] for t in together[1:]]}


def timing_of(smoke: bool, threads: int) -> dict:
    """llama.cpp timing settings: the tiny smoke model's, else 256 tokens of context and 32 decode steps."""
    return {"context": 16, "decode_steps": 2, "threads": 1} if smoke else \
        {"context": 256, "decode_steps": 32, "threads": threads}


def spread(xs: list[float]) -> float:
    """Largest over smallest - 1, in %."""
    return (max(xs) / min(xs) - 1) * 100


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", nargs="?")
    p.add_argument("--budgets", default="0.5,0.7", help="the sub-networks the checkpoint serves at these budgets")
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="timing rounds per load (after a warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    timing = timing_of(a.smoke, a.threads)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = smoke_checkpoint(work) if a.smoke else Path(a.ckpt)
        em, _, _ = api.load(ckpt, "cpu")
        # Smoke: the tiny model's forced table may price every lower budget infeasible.
        budgets = [1.0] if a.smoke else [float(b) for b in a.budgets.split(",")]
        subnets = [select_subnet(em, Budget(fraction=b)) for b in budgets]
        outtype = em.latency.outtype if em.latency is not None and em.latency.outtype else "f32"
        full = api.export(ckpt, None, work / "full.gguf", overwrite=True, subnet=em.space.full(), format="gguf",
                          outtype=outtype, graph="deci")  # the graph the routed sub-networks run in
        subs = [gguf(ckpt, s, work / f"sub{i}.gguf", outtype) for i, s in enumerate(subnets)]
        runs = [session(full, subs, a.rounds, timing) for _ in range(a.sessions)]
    cmd = command_line("timing_repeatability.py", p, a).replace("--ckpt ", "")
    lines = ["## llama.cpp timings from one load to the next: alone vs in turn with the full model", "",
             f"`{cmd}` — {llamacpp.runtime_version()}, {outtype}, {timing['threads']} thread(s), "
             f"{time.time() - t0:.0f} s. Decode ms/token after {timing['context']} tokens, batch 1, the median of "
             f"{a.rounds} rounds per load; {a.sessions} sessions, each loading every file afresh. Alone: each file "
             "in its own load, the ratio of two such medians. In turn: the files loaded together and timed one "
             "after the other in each round, the median of the per-round ratios. The full model is written as deci.",
             "", "| session | full alone (ms) | full in turn (ms) | "
             + " | ".join(f"{b:.0%}: alone | {b:.0%}: in turn" for b in budgets) + " |",
             "|---|---|---|" + "---|---|" * len(budgets)]
    for i, r in enumerate(runs):
        cells = [f"{x:.3f} | {y:.3f}" for x, y in zip(r["alone"], r["together"])]
        lines.append(f"| {i + 1} | {r['full_alone']:.2f} | {r['full_together']:.2f} | " + " | ".join(cells) + " |")
    summary = []
    for j, b in enumerate(budgets):
        alone, together = [r["alone"][j] for r in runs], [r["together"][j] for r in runs]
        summary.append({"budget": b, "alone_spread_pct": spread(alone), "together_spread_pct": spread(together),
                        "alone_median": statistics.median(alone), "together_median": statistics.median(together)})
        lines.append(f"\n{b:.0%}: over the sessions the ratio spread {spread(alone):.1f}% timed alone "
                     f"({min(alone):.3f}-{max(alone):.3f}), {spread(together):.1f}% timed in turn "
                     f"({min(together):.3f}-{max(together):.3f}).")
    full_alone = [r["full_alone"] for r in runs]
    lines.append(f"\nThe full model alone: {min(full_alone):.2f}-{max(full_alone):.2f} ms/token "
                 f"(spread {spread(full_alone):.1f}%).")
    data = {"checkpoint": str(a.ckpt), "timing": timing, "rounds": a.rounds, "outtype": outtype,
            "subnets": [s.to_dict() for s in subnets], "sessions": runs, "summary": summary}
    publish("timing_repeatability", "timing-repeatability", data, lines, a.smoke)


if __name__ == "__main__":
    main()
