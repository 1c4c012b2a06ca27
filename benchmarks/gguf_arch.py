"""The same uniform sub-networks written as the family's own llama.cpp architecture (`llama` for
SmolLM2) and as the per-layer `deci` one, timed back to back in llama.cpp (`llamacpp.against`:
both files loaded, timed in turn in each round, ratio = median of the per-round ratios).

Why it matters: a per-layer sub-network can only be `deci`, while a uniform one (the full model
included) can be either, so a latency table fitted on both kinds of file carries any speed
difference between the two graphs. `flextron export --format gguf` writes a uniform sub-network in
the graph the checkpoint's llama.cpp table prices faster (`--graph auto`); the "table picks"
column says which that is, at the table's thread count, beside the measured ratio.

    python benchmarks/gguf_arch.py --ckpt CKPT [--threads 1,2] [--rounds 9] [--decode-steps 32] [--name gguf_arch]

The spread column is the range of the per-round ratios: what one round alone could have said.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _results import command_line, publish
from flextron import api, llamacpp
from flextron.gguf import gguf_arch, write_gguf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="an elastic checkpoint (width choices)")
    p.add_argument("--threads", default="1,2", help="llama.cpp thread counts, comma-separated")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--decode-steps", type=int, default=32, help="tokens decoded per timing")
    p.add_argument("--name", default="gguf_arch", help="results JSON and docs/results.md section")
    a = p.parse_args()
    t0 = time.time()
    em, tok, _ = api.load(a.ckpt, "cpu")
    space = em.space
    # Width indices (a skip choice, width 0, is never taken): full; narrower MLP; narrower both; smallest.
    m, at = (len(c) - 1 for c in (space.mlp[0], space.attn[0]))
    lo_m, lo_a = (int(c[0] == 0) for c in (space.mlp[0], space.attn[0]))
    picks = [(m, at), (m - 1, at), (max(lo_m, m - 2), max(lo_a, at - 1)), (lo_m, lo_a)]
    timing = {"context": 256, "decode_steps": a.decode_steps}
    table_threads = em.latency.threads if em.latency is not None and em.latency.stock is not None else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mi, ai in picks:
            subnet = space.uniform(mi, ai)
            mlp, attn = subnet.mlp[0], subnet.attn[0]
            files = [write_gguf(em, tok, subnet, Path(tmp) / f"{kind}.gguf", overwrite=True,
                                per_layer=kind == "deci")["path"] for kind in ("own", "deci")]
            for threads in (int(t) for t in a.threads.split(",")):
                own, deci = llamacpp.measure_rounds(files, a.rounds, threads=threads, **timing)
                ratio = llamacpp.median_ratios(deci, own)
                per_round = [d["decode_ms"] / o["decode_ms"] for o, d in zip(own, deci)]
                rows.append({"mlp": mlp, "attn": attn, "threads": threads, "own": llamacpp.medians(own),
                             "deci": llamacpp.medians(deci), "deci_over_own": ratio,
                             "decode_ratio_range": [min(per_round), max(per_round)], "subnet": subnet.to_dict(),
                             "table_picks": (("deci" if em.latency.deci_faster(subnet) else "own")
                                             if threads == table_threads else None)})
                print(f"MLP {mlp}, {attn} KV groups, {threads} thread(s): deci / own decode "
                      f"{ratio['decode_ms']:.3f}, prefill {ratio['prefill_ms']:.3f}", flush=True)
    lines = [
        "## llama.cpp: the family's own architecture vs per-layer `deci`, same weights",
        "",
        f"`{command_line('gguf_arch.py', p, a)}` — {llamacpp.runtime_version()}, f32 GGUF, decode ms/token after "
        f"{timing['context']} tokens and prefill ms of them, {a.rounds} back-to-back rounds, "
        f"{round(time.time() - t0)} s. Uniform sub-networks of {Path(a.ckpt).name} written as "
        f"`{gguf_arch(em, space.full())}` (own) and as `deci`; "
        "ratio = deci / own (below 1: deci is faster). Table picks: the graph `export --graph auto` writes, by the "
        f"checkpoint's llama.cpp table ({table_threads or '-'} thread(s); - where it has none for these threads).",
        "",
        "| MLP width | KV groups | threads | own decode ms | deci / own decode | spread over rounds | own prefill ms | "
        "deci / own prefill | table picks |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---|",
        *(f"| {r['mlp']} | {r['attn']} | {r['threads']} | {r['own']['decode_ms']:.2f} | "
          f"{r['deci_over_own']['decode_ms']:.3f} | {'-'.join(f'{x:.2f}' for x in r['decode_ratio_range'])} | "
          f"{r['own']['prefill_ms']:.0f} | "
          f"{r['deci_over_own']['prefill_ms']:.3f} | {r['table_picks'] or '-'} |" for r in rows),
    ]
    publish(a.name, a.name, {"command": command_line("gguf_arch.py", p, a), "timing": timing,
                                       "rounds": a.rounds, "runtime": llamacpp.runtime_version(), "rows": rows},
            lines, smoke=False)


if __name__ == "__main__":
    main()
