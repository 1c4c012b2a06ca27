"""The size-quality front of elastic width x quantization in llama.cpp: does a narrower sub-network at a
lighter weight type beat the full model at a stronger quantization, at equal bytes or equal latency?

The largest uniform sub-network within each parameter budget (`--budgets`, fractions of the non-embedding
parameters; the same for every type; with `--routed`, what a routed checkpoint serves there, as
`flextron export --budget params=B` picks it) of a checkpoint (`--ckpt`, e.g. an elastic-trained one; else the
packaged SmolLM2, or `--model`, converted prune-only) is exported to a GGUF at each weight type
(`--outtypes`; the k-quants through llama.cpp's own quantizer, whose fallbacks for rows that are not whole
256-blocks are counted) and at f32 for `--f32` budgets. Each file's size, its held-out perplexity scored
in llama.cpp (`--windows` packaged held-out windows of `--seq-len` tokens, every next token scored, as
`flextron eval` does, llama.cpp's default f16 KV cache and flash attention) and, unless `--no-timing`, its
batch-1 decode latency: every file timed in the same run, in interleaved rounds, as the median of its
per-round ratios to the full model at f16 (`llamacpp.measure_rounds`). Then the Pareto fronts
(perplexity vs bytes, vs decode latency) and where width beats stronger quantization.

    python benchmarks/quant_front.py [--ckpt CKPT | --model HF_DIR] [--windows 4] [--seq-len 1024] [--no-timing]
                                     [--name NAME]   # NAME: its own JSON, results section and plots
    python benchmarks/quant_front.py --smoke [--out smoke.json]   # a tiny random model, seconds; writes no results
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import gguf
import torch
import torch.nn.functional as F

from _results import IMG_DIR, command_line, publish
from _variants import log, workspace
from flextron import api, llamacpp
from flextron.budgets import select_subnet, uniform_subnet_for
from flextron.data import heldout_windows
from flextron.evaluate import counted_params
from flextron.fsutil import atomic_write
from flextron.gguf import write_gguf
from flextron.report import plot_ppl_vs_size, widths_cell
from flextron.space import Budget

EQUAL_BYTES = 0.10  # two files within this fraction of each other's size count as "equal bytes"
BASELINE = (1.0, "f16")  # every latency is a ratio to the full model at f16


def llamacpp_ppl(path: Path, windows: torch.Tensor, threads: int | None) -> float:
    """exp(mean next-token NLL) over `windows` [N, T] in llama.cpp, each window scored from a fresh context."""
    nll, tokens = 0.0, 0
    with llamacpp.opened(path, n_ctx=windows.shape[1], threads=threads, all_logits=True) as llm:
        for w in windows:
            logits = torch.from_numpy(llamacpp.logits(llm, w.tolist()))
            nll += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            tokens += len(w) - 1
    return float(torch.tensor(nll / tokens).exp())


def tensor_types(path: Path) -> dict[str, int]:
    """How many weight matrices (tensors of 2 or more dimensions) the GGUF stores at each type."""
    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) >= 2))


def front(rows: list[dict], x: str) -> list[dict]:
    """The rows no other row beats on both `x` and perplexity (lower is better on both), in order of `x`."""
    def dominated(r: dict) -> bool:
        return any(o[x] <= r[x] and o["ppl"] <= r["ppl"] and (o[x], o["ppl"]) != (r[x], r["ppl"]) for o in rows)

    return sorted((r for r in rows if not dominated(r)), key=lambda r: r[x])


def name(r: dict) -> str:
    return f"{r['budget']:.0%} at {r['outtype']}"


def mb(r: dict) -> str:
    return f"{r['bytes'] / 1e6:.1f} MB"


def equal_bytes_pairs(rows: list[dict], strength: dict[str, int]) -> list[tuple[dict, dict]]:
    """(narrower at a lighter type, wider at a stronger type) pairs whose files are within EQUAL_BYTES of
    each other's size; a type is stronger when the full model's file at it is smaller (`strength`)."""
    return [(n, w) for n in rows for w in rows
            if n["budget"] < w["budget"] and strength[n["outtype"]] < strength[w["outtype"]]
            and abs(n["bytes"] / w["bytes"] - 1) <= EQUAL_BYTES]


def front_sentence(rows: list[dict], on: list[dict], x: str, what: str, show: Callable[[dict], str]) -> str:
    """Where narrower sub-networks sit on the front `on` of `x`: at or above the full model's lowest `x`
    they beat its stronger quantization; below it nothing at full width reaches."""
    least = min((r for r in rows if r["budget"] == 1.0), key=lambda r: r[x])
    above = [r for r in on if r[x] >= least[x]]
    narrow = [name(r) for r in above if r["budget"] < 1]
    below = [name(r) for r in on if r[x] < least[x]]
    if narrow:
        verdict = (f"from there up, narrower sub-networks are on the front ({', '.join(narrow)}): there elastic "
                   "width beats stronger quantization of the full model")
    elif above:
        verdict = (f"from there up the front holds only the full model ({', '.join(map(name, above))}): there "
                   "stronger quantization beats elastic width")
    else:
        verdict = "nothing from there up is on the front (a smaller one has lower perplexity)"
    return (f"{what}: the full model's lowest is {name(least)} ({show(least)}); {verdict}. "
            + (f"Below it only narrower sub-networks reach: {', '.join(below)}." if below else
               "No narrower sub-network is on the front below it."))


def findings(rows: list[dict], fronts: dict[str, list[dict]], pairs: list[tuple[dict, dict]]) -> list[str]:
    """Sentences read off the data: where narrower sub-networks sit on the fronts, and who wins at equal bytes."""
    out = [front_sentence(rows, fronts["bytes"], "bytes", "File size", mb)]
    if fronts["latency"]:
        out.append(front_sentence(rows, fronts["latency"], "decode_ms_over_full_f16", "Decode latency",
                                  lambda r: f"{r['decode_ms_over_full_f16']:.3f} of the full model's at f16"))
    if pairs:
        wins = sum(n["ppl"] < w["ppl"] for n, w in pairs)
        out.append(f"Of {len(pairs)} pairs within {EQUAL_BYTES:.0%} of each other's size (a narrower sub-network "
                   f"at a lighter type vs a wider one at a stronger type; table below), width wins {wins}.")
    pick = {(r["budget"], r["outtype"]): r for r in rows}
    n, w = pick.get((0.65, "q8_0")), pick.get((1.0, "q4_k_m"))
    if n and w:
        out.append(f"For example, 65% at q8_0 is {mb(n)} with perplexity {n['ppl']:.2f}; 100% at q4_k_m is {mb(w)} "
                   f"with {w['ppl']:.2f}: {'width' if n['ppl'] < w['ppl'] else 'quantization'} wins, at "
                   f"{n['bytes'] / w['bytes']:.2f}x the bytes.")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="an elastic checkpoint (default: convert --model)")
    p.add_argument("--model", default=None, help="HF model dir to convert (default: the packaged SmolLM2)")
    p.add_argument("--budgets", default="0.35,0.5,0.65,0.75,1.0", help="fractions of the non-embedding parameters")
    p.add_argument("--outtypes", default="f16,q8_0,q6_k,q5_k_m,q4_k_m")
    p.add_argument("--routed", action="store_true", help="each budget's routed sub-network (select_subnet), "
                   "not the largest uniform one")
    p.add_argument("--f32", default="0.65,1.0", help="budgets also exported at f32 ('' for none)")
    p.add_argument("--windows", type=int, default=4, help="held-out windows perplexity is scored on")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="default: every core")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--context", type=int, default=256, help="tokens before the timed decode steps")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--no-timing", action="store_true", help="sizes and perplexity only")
    p.add_argument("--work", default=None, help="keep the checkpoint and GGUFs here (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--name", default="quant_front", help="results name (JSON, docs/results.md section, plots): "
                   "one per model or checkpoint, so a run on another leaves the others' results in place")
    p.add_argument("--smoke", action="store_true", help="tiny random model; print, write no results")
    a = p.parse_args()
    if a.smoke:
        a.windows, a.seq_len, a.rounds, a.context, a.decode_steps, a.threads = 1, 32, 1, 16, 2, 1
    budgets = [float(b) for b in a.budgets.split(",")]
    outtypes = a.outtypes.split(",")
    if BASELINE[1] not in outtypes or BASELINE[0] not in budgets:
        p.error("the full model at f16 is every latency's reference: keep 1.0 in --budgets and f16 in --outtypes")
    configs = [(b, t) for b in budgets for t in outtypes] + [(float(b), "f32") for b in a.f32.split(",") if b]
    if any(t == "f32" for _, t in configs) and (1.0, "f32") not in configs:
        p.error("--f32 needs 1.0 among its budgets: types are ranked by the full model's file at each")
    t0 = time.time()
    with workspace(a) as (work, ckpt):
        em, tok, _ = api.load(ckpt, "cpu")
        windows = heldout_windows(tok, a.seq_len, a.windows)
        params_full = counted_params(em)
        rows, paths = [], []
        for b, t in configs:
            budget = Budget(metric="params", fraction=b)
            subnet = select_subnet(em, budget) if a.routed else uniform_subnet_for(em, budget)[0]
            path = work / f"{b:g}-{t}.gguf"
            written = write_gguf(em, tok, subnet, path, t, overwrite=True)
            row = {"budget": b, "outtype": t, "subnet": subnet.to_dict(), "architecture": written["architecture"],
                   "params_fraction": counted_params(em, subnet) / params_full,
                   "bytes": written["bytes"], "tensor_types": tensor_types(path),
                   "fallback": dict(Counter(written["fallback"].values())),
                   "ppl": llamacpp_ppl(path, windows, a.threads)}
            rows.append(row)
            log(f"{name(row)}: {mb(row)}, perplexity {row['ppl']:.3f}, fallback {row['fallback']}")
            if a.no_timing:
                path.unlink()
            else:
                paths.append(path)
        if not a.no_timing:
            log(f"timing {len(paths)} files in {a.rounds} interleaved rounds")
            runs = llamacpp.measure_rounds(paths, a.rounds, a.context, a.decode_steps, a.threads)
            base = runs[configs.index(BASELINE)]
            for row, run in zip(rows, runs):
                row.update({f"{k}_over_full_f16": v for k, v in llamacpp.median_ratios(run, base).items()},
                           **{f"median_{k}": v for k, v in llamacpp.medians(run).items()})
    full = {r["outtype"]: r for r in rows if r["budget"] == 1.0}
    strength = {t: -full[t]["bytes"] for t in full}  # a type is stronger where the full model's file is smaller
    rows.sort(key=lambda r: (-r["budget"], strength[r["outtype"]]))
    fronts = {"bytes": front(rows, "bytes"), "latency": [] if a.no_timing else front(rows, "decode_ms_over_full_f16")}
    for r in rows:
        r["on_bytes_front"], r["on_latency_front"] = r in fronts["bytes"], r in fronts["latency"]
    pairs = equal_bytes_pairs(rows, strength)
    data = {"command": command_line("quant_front.py", p, a), "seconds": round(time.time() - t0),
            "runtime": llamacpp.runtime_version(), "checkpoint": str(a.ckpt) if a.ckpt else None,
            "model": a.model or ("tiny random llama" if a.smoke else "SmolLM2-135M-Instruct (packaged)"),
            "params_counted": "all" if em.space.hidden else "non-embedding",
            "tokens": int(windows[:, 1:].numel()), "windows": a.windows, "seq_len": a.seq_len,
            "timing": None if a.no_timing else {"rounds": a.rounds, "context": a.context,
                                                "decode_steps": a.decode_steps,
                                                "threads": a.threads or llamacpp.default_threads()},
            "equal_bytes": EQUAL_BYTES, "rows": rows,
            **{f"{k}_front": [name(r) for r in on] for k, on in fronts.items()},
            "equal_bytes_pairs": [{"narrower": name(n), "wider": name(w), "width_wins": n["ppl"] < w["ppl"]}
                                  for n, w in pairs]}
    data["findings"] = findings(rows, fronts, pairs)
    timed = not a.no_timing
    chosen = "The routed sub-network the checkpoint serves at" if a.routed else "The largest uniform sub-network within"
    lines = [
        "## The size-quality front: elastic width x quantization in llama.cpp", "",
        f"`{data['command']}` — {data['model']}{', checkpoint ' + data['checkpoint'] if a.ckpt else ', prune-only'}, "
        f"{data['runtime']}, {data['seconds']} s. {chosen} each budget (a fraction of the "
        f"{data['params_counted']} parameters) as a GGUF at each type; perplexity scored in llama.cpp on "
        f"{a.windows} packaged held-out windows of {a.seq_len} tokens ({data['tokens']:,} tokens, every next token, "
        "f16 KV cache)"
        + (f"; decode ms/token after {a.context} tokens at batch 1, every file timed in the same run in {a.rounds} "
           f"interleaved rounds, the median of the per-round ratios to the full model at f16" if timed else
           "; not timed (`--no-timing`)")
        + ". Fallback: weight matrices whose rows are not whole blocks of the type, stored as llama.cpp's quantizer "
          "decided. ◆ bytes front, ◇ latency front.", "",
        "| budget | MLP, attention widths | params | type | file | ppl |" + (" decode / full f16 |" if timed else "")
        + " fallback | front |",
        "|---|---|---|---|---|---|" + ("---|" if timed else "") + "---|---|",
    ]
    for r in rows:
        s = r["subnet"]
        lines.append(f"| {r['budget']:.0%} | {widths_cell(s['mlp'])}, {widths_cell(s['attn'])} | "
                     f"{r['params_fraction']:.1%} | {r['outtype']} | {mb(r)} | {r['ppl']:.3f} | "
                     + (f"{r['decode_ms_over_full_f16']:.3f} | " if timed else "")
                     + (", ".join(f"{n} {k}" for k, n in r["fallback"].items()) or "-") + " | "
                     + ("◆" if r["on_bytes_front"] else "") + ("◇" if r["on_latency_front"] else "") + " |")
    lines += ["", *data["findings"]]
    if pairs:
        lines += ["", "| narrower, lighter type | file | ppl | wider, stronger type | file | ppl | lower ppl |",
                  "|---|---|---|---|---|---|---|",
                  *(f"| {name(n)} | {mb(n)} | {n['ppl']:.3f} | {name(w)} | {mb(w)} | {w['ppl']:.3f} | "
                    f"{'width' if n['ppl'] < w['ppl'] else 'quantization'} |" for n, w in pairs)]
    lines += ["", f"![perplexity vs file size](img/{a.name}_bytes.png)"]
    if timed:
        lines += ["", f"![perplexity vs decode latency](img/{a.name}_latency.png)"]
    if not a.smoke:
        plots = [("bytes", lambda r: r["bytes"] / 1e6, "GGUF file size (MB)")]
        if timed:
            plots.append(("latency", lambda r: r["decode_ms_over_full_f16"], "decode ms / full model's at f16"))
        for key, x, xlabel in plots:
            series = {t: ([x(r) for r in rows if r["outtype"] == t], [r["ppl"] for r in rows if r["outtype"] == t])
                      for t in outtypes}
            on = fronts[key]
            plot_ppl_vs_size(series, IMG_DIR / f"{a.name}_{key}.png", f"{data['model']}: width x weight type",
                             full["f16"]["ppl"], {"Pareto front": ([x(r) for r in on], [r["ppl"] for r in on])},
                             xlabel=xlabel)
    if a.out:
        atomic_write(Path(a.out), lambda t: t.write_text(json.dumps(data, indent=1)))
    # The first results' section kept its name when --name came: a rerun of the default replaces it in place.
    publish(a.name, "quant-front" if a.name == "quant_front" else a.name, data, lines, a.smoke)


if __name__ == "__main__":
    main()
