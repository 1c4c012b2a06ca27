"""Depth in llama.cpp: the smallest sub-network and the routed ones of a width + depth checkpoint
(and of a width-only one) exported as GGUF files and timed in llama.cpp, each back to back with
its full model in every round (`llamacpp.measure_rounds`), as fractions of the full model's
decode and prefill time — beside the fraction the checkpoint's own (HF eager) table predicts.

    python benchmarks/depth_llamacpp.py DEPTH_CKPT [--width WIDTH_CKPT] [--budgets 0.5,0.7,0.9]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _results import publish
from flextron import api, llamacpp
from flextron.budgets import cost_table, select_subnet, smallest_fraction
from flextron.cost import subnet_cost
from flextron.space import Budget, Subnet


def rows(ckpt: Path, budgets: list[float], work: Path, threads: int, rounds: int, timing: dict) -> list[dict]:
    em, _, _ = api.load(ckpt, "cpu")
    table, full_params = cost_table(em, "latency_ms"), subnet_cost(em).params_nonembed
    full_gguf = api.export(ckpt, None, work / "full.gguf", overwrite=True, subnet=em.space.full(), format="gguf")
    picks: list[tuple[str, Subnet]] = [("smallest", em.space.smallest())]
    lowest = smallest_fraction(em, "latency_ms")
    picks += [(f"{b:.0%}", select_subnet(em, Budget(fraction=b))) for b in budgets if b >= lowest]
    out = [{"sub-network": f"{b:.0%}", "infeasible": lowest} for b in budgets if b < lowest]
    for name, subnet in picks:
        path = api.export(ckpt, None, work / "subnet.gguf", overwrite=True, subnet=subnet, format="gguf")
        full, _, ratio = llamacpp.against(full_gguf, path, rounds, threads=threads, **timing)
        row = {"sub-network": name, "subnet": subnet.to_dict(),
               "hf_table_fraction": table(subnet) / table.full,
               "params_fraction": subnet_cost(em, subnet).params_nonembed / full_params,
               "skipped": sum(w == 0 for w in subnet.mlp + subnet.attn)}
        for k in ratio:
            row[f"{k}_fraction"], row[f"full_{k}"] = ratio[k], full[k]
        out.append(row)
        print(f"{ckpt.name} {name}: llama.cpp decode x{row['decode_ms_fraction']:.3f} of full (HF table "
              f"x{row['hf_table_fraction']:.3f}), prefill x{row['prefill_ms_fraction']:.3f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("depth")
    p.add_argument("--width", default=None, help="a width-only checkpoint to time the same way")
    p.add_argument("--budgets", default="0.5,0.7,0.9", help="router budgets (fractions of the HF-eager latency)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    timing = {"context": 256, "decode_steps": 32}
    budgets = [float(x) for x in a.budgets.split(",")]
    t0 = time.time()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, ckpt in (("width + depth", a.depth), ("width only", a.width)):
            if ckpt:
                results[label] = rows(Path(ckpt), budgets, Path(tmp), a.threads, a.rounds, timing)
    lines = [
        "## Depth in llama.cpp",
        "",
        f"`python benchmarks/depth_llamacpp.py {a.depth}{f' --width {a.width}' if a.width else ''}` — "
        f"{llamacpp.runtime_version()}, f32 GGUF, {a.threads} thread(s), {round(time.time() - t0)} s. Each "
        f"sub-network and its full model timed back to back in {a.rounds} rounds (decode ms/token after "
        f"{timing['context']} tokens, prefill ms of them); fractions are medians of the per-round ratios. "
        "Budgets are the checkpoint's (HF-eager latency table); its prediction is in the last column.",
        "",
        "| checkpoint | sub-network | skipped sub-layers | non-emb params | llama.cpp decode | llama.cpp prefill "
        "| HF-eager table |",
        "|---|---|---|---|---|---|---|",
        *(f"| {label} | {r['sub-network']} | infeasible (smallest: {r['infeasible']:.2f}) | | | | |"
          if "infeasible" in r else
          f"| {label} | {r['sub-network']} | {r['skipped']} | {r['params_fraction']:.0%} | "
          f"{r['decode_ms_fraction']:.3f} | {r['prefill_ms_fraction']:.3f} | {r['hf_table_fraction']:.3f} |"
          for label, rs in results.items() for r in rs),
    ]
    publish("depth_llamacpp", "depth_llamacpp", {"threads": a.threads, "rounds": a.rounds, "timing": timing,
                                                 "runtime": llamacpp.runtime_version(), "results": results},
            lines, smoke=False)


if __name__ == "__main__":
    main()
