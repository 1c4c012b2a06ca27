"""Depth elasticity on the packaged SmolLM2-135M: width + depth vs width only, at measured latency.

Two elastic checkpoints of the same model, trained the same way with the same tokens: width only
(MLP neurons, KV groups) and width + depth (`convert --depth`: each attention and MLP may also be
skipped, least important first, down to `--min-layers`). Each is profiled on this machine
(decode-latency table), routed over latency budgets, and evaluated:

1. held-out perplexity per latency budget (fractions of the full model's decode latency; the
   width + depth grid reaches lower budgets) next to the sub-network's *measured* decode latency;
2. the smallest sub-network's measured decode latency as a fraction of the full model's;
3. decode tokens/s (exported models, batch 1, greedy with a KV cache) of the width + depth
   export at ~50% latency vs a width-only export of the same parameter count (the largest
   uniform one within it) and vs the full model.

    python benchmarks/depth.py [--train-steps 100] [--deploy-steps 0] [--router-steps 200] [--min-layers 10]
                               [--device cpu|cuda]
    python benchmarks/depth.py --smoke      # a tiny random model, minutes; writes no results

Both variants route on one latency table, the width + depth variant's (measured on its random
sub-networks, skips included), so a budget names the same latency for both. `--runtime llama.cpp`
measures that table, each budget's latency and the exports' speed on GGUF exports in llama.cpp
(`--threads`) instead of the elastic model in HF eager. Latency is measured as a fraction of the
full model timed back to back with it. Nothing else may run meanwhile.
`--deploy-steps N` trains the last N of the `--train-steps` after routing, on the sub-networks the
routers deploy and the full model (`train --sampling budgets`): deployment-aware training.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from _results import command_line, publish
from _variants import add_options, build, log, smoke_options
from flextron import api, llamacpp
from flextron.budgets import select_subnet, uniform_subnet_for
from flextron.cost import subnet_cost
from flextron.data import heldout_windows
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.evaluate import perplexity
from flextron.latency import measure
from flextron.precision import compute_dtype
from flextron.space import Budget, Subnet
from speed import decode_tps

LLAMACPP_DECODE_STEPS = 32  # tokens decoded per llama.cpp timing, as benchmarks/llamacpp_budgets.py

def fraction_timer(ckpt: Path, em: ElasticModel, a: argparse.Namespace, work: Path) -> Callable[[Subnet], float]:
    """A function giving a sub-network's decode latency over the full model's, the two timed back to
    back: in HF eager as the latency table measures it, or as GGUF exports in llama.cpp (median
    per-round ratio; the full model's file is written once)."""
    if a.runtime == "llama.cpp":
        full = api.export(ckpt, None, work / "full.gguf", overwrite=True, subnet=em.space.full(), format="gguf")

        def in_llamacpp(subnet: Subnet) -> float:
            path = api.export(ckpt, None, work / "subnet.gguf", overwrite=True, subnet=subnet, format="gguf")
            return llamacpp.against(full, path, a.rounds, a.context, LLAMACPP_DECODE_STEPS, a.threads)[2]["decode_ms"]

        return in_llamacpp
    dtype = torch.bfloat16 if a.dtype == "bf16" else None

    def in_hf(subnet: Subnet) -> float:
        ms = [measure(em, s, context=a.context, repeats=a.repeats, autocast_dtype=dtype)["decode_ms"]
              for s in (em.space.full(), subnet)]
        return ms[1] / ms[0]

    return in_hf


def export_speed(dirs: dict[str, Path], a: argparse.Namespace, vocab: int, context: int, new_tokens: int
                 ) -> dict[str, float]:
    """Decode tokens/s of exported models at batch 1 after a `context`-token prompt: HF exports
    greedily with a KV cache (HF eager), or GGUF files timed in turn in `a.rounds` rounds (llama.cpp)."""
    if a.runtime == "llama.cpp":
        runs = llamacpp.measure_rounds(list(dirs.values()), a.rounds, context, new_tokens, a.threads)
        return {name: 1e3 / llamacpp.medians(rs)["decode_ms"] for name, rs in zip(dirs, runs)}
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    prompt = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    return {name: decode_tps(AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval(), prompt, new_tokens,
                             a.repeats, lambda: None) for name, d in dirs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(p, train_steps=100, router_steps=200, joint_steps=20)
    p.add_argument("--min-layers", type=int, default=10, help="depth floor: layers keeping each kind of sub-layer")
    p.add_argument("--budgets", type=int, default=7, help="latency budgets of each variant's router grid")
    p.add_argument("--context", type=int, default=256, help="prompt tokens before timed decoding")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile-samples", type=int, default=24)
    p.add_argument("--runtime", default="hf", choices=["hf", "llama.cpp"],
                   help="where latency is measured: the elastic model in HF eager, or GGUF exports in llama.cpp")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    p.add_argument("--rounds", type=int, default=7, help="llama.cpp: back-to-back timing rounds per comparison")
    p.add_argument("--name", default=None,
                   help="results JSON and docs/results.md section (default: by --runtime and --deploy-steps)")
    a = p.parse_args()
    if a.smoke:
        smoke_options(a)
        a.min_layers, a.context, a.repeats, a.profile_samples, a.budgets, a.rounds = 2, 16, 1, 8, 5, 1
    profile = ({"runtime": "llama.cpp", "threads": a.threads, "context": a.context, "rounds": 3, "repeats": 1,
                "decode_steps": LLAMACPP_DECODE_STEPS} if a.runtime == "llama.cpp" else
               {"dtype": a.dtype, "context": a.context, "repeats": a.repeats})
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        # One latency table for both: the depth variant's (its choices include every width-only
        # choice), so a budget is the same latency for both; two profiles would differ by noise.
        depth = build(work, "depth", a, "latency_ms", profile=profile, depth=True, min_layers=a.min_layers)
        ckpts = {"width": build(work, "width", a, "latency_ms", table=depth, depth=False), "depth": depth}
        seq_len = 64 if a.smoke else 1024
        # Every budget of either grid, for both variants (below the width-only minimum: infeasible).
        fractions = sorted({r for c in ckpts.values() for r in api.load(c, "cpu")[0].routers.config.budgets})
        curves = {}
        for name, ckpt in ckpts.items():
            log(f"{name}: perplexity and measured latency per budget")
            em, tok, _ = api.load(ckpt, a.device)
            windows = heldout_windows(tok, seq_len, a.limit)
            fraction = fraction_timer(ckpt, em, a, work)
            rows = []
            for f in fractions:
                try:
                    subnet = select_subnet(em, Budget(fraction=f))
                except FlextronError as e:  # below this variant's smallest sub-network
                    rows.append({"budget": f, "infeasible": str(e)})
                    continue
                with em.subnet(subnet):
                    ppl = perplexity(em, windows, autocast_dtype=compute_dtype(a.dtype), progress=False)
                rows.append({"budget": f, "ppl": ppl, "measured_fraction": fraction(subnet),
                             "skipped": [subnet.mlp.count(0), subnet.attn.count(0)], "subnet": subnet.to_dict()})
            curves[name] = {"smallest_fraction": fraction(em.space.smallest()), "rows": rows}
        log("exports: decode speed")
        # Exports: width + depth at ~50% latency vs width only at the same parameter count.
        em_d, em_w = api.load(ckpts["depth"], "cpu")[0], api.load(ckpts["width"], "cpu")[0]
        deep = select_subnet(em_d, Budget(fraction=0.5))
        params = subnet_cost(em_d, deep).params_nonembed
        # The same non-embedding parameter count (what a params budget counts), or width only's smallest.
        floor = subnet_cost(em_w, em_w.space.smallest()).params_nonembed
        wide = uniform_subnet_for(em_w, Budget(metric="params", value=max(params, floor)))[0]
        fmt = {"format": "gguf"} if a.runtime == "llama.cpp" else {}
        suffix = ".gguf" if fmt else ""
        dirs = {"full": api.export(ckpts["width"], None, work / f"export-full{suffix}", subnet=em_w.space.full(),
                                   **fmt),
                "depth+width": api.export(ckpts["depth"], None, work / f"export-depth{suffix}", subnet=deep, **fmt),
                "width only": api.export(ckpts["width"], None, work / f"export-width{suffix}", subnet=wide, **fmt)}
        new_tokens = 8 if a.smoke else 64
        speed = export_speed(dirs, a, em_d.config.vocab_size, a.context, new_tokens)
        exports = {"depth+width": {"subnet": deep.to_dict(), "params_nonembed": params},
                   "width only": {"subnet": wide.to_dict(), "params_nonembed": subnet_cost(em_w, wide).params_nonembed},
                   "decode_tokens_per_s": speed}
    command = command_line("depth.py", p, a)
    where = (f"{llamacpp.runtime_version()}, f32 GGUF, {a.threads} thread(s), {a.rounds} back-to-back rounds"
             if a.runtime == "llama.cpp" else "HF eager")
    data = {"command": command, "device": a.device, "cpu": platform.processor() or platform.machine(),
            "runtime": where, "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": a.dtype,
            "seconds": round(time.time() - t0), "curves": curves, "exports": exports}
    deployed = (f" ({a.train_steps - a.deploy_steps} sandwich before routing, the last {a.deploy_steps} on the "
                "routed sub-networks and the full model, `--sampling budgets`)" if a.deploy_steps else "")
    lines = [
        "## Depth: routers over width + depth vs width only, at measured decode latency"
        + (" in llama.cpp" if a.runtime == "llama.cpp" else "")
        + (", deployment-aware training" if a.deploy_steps else ""),
        "",
        f"`{command}` — {'a tiny random Llama (smoke run)' if a.smoke else 'SmolLM2-135M-Instruct (packaged)'}, "
        f"{a.dtype}, {a.device} ({data['cpu']}, {data['threads']} threads), latency in {where}, "
        f"{data['seconds']} s. Both "
        f"variants: {a.train_steps} elastic-training steps{deployed}, {a.router_steps} router steps, budgets in "
        "measured decode latency (batch 1, the width + depth variant's table for both) as fractions of the full "
        "model's; ppl on held-out windows.",
        "",
        "| latency budget | width only: ppl (measured fraction) | width + depth: ppl (measured fraction, "
        "skipped MLP/attn) |",
        "|---|---|---|",
    ]
    for i, f in enumerate(fractions):
        cells = []
        for name in ("width", "depth"):
            r = curves[name]["rows"][i]
            extra = f", {r['skipped'][0]}/{r['skipped'][1]}" if name == "depth" and "ppl" in r else ""
            cells.append("infeasible" if "ppl" not in r else f"{r['ppl']:.2f} ({r['measured_fraction']:.2f}{extra})")
        lines.append(f"| {f:.2f} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "Smallest sub-network, measured decode latency / full: width only "
        f"**{curves['width']['smallest_fraction']:.2f}**, "
        f"width + depth **{curves['depth']['smallest_fraction']:.2f}**.",
        "",
        f"Exports (decode tokens/s in {'llama.cpp' if a.runtime == 'llama.cpp' else 'HF eager'}, {new_tokens} "
        f"greedy tokens after a {a.context}-token prompt): full "
        f"{speed['full']:.1f}; width + depth at 50% latency ({params / 1e6:.1f}M non-embedding params) "
        f"{speed['depth+width']:.1f} (x{speed['depth+width'] / speed['full']:.2f}); width only, the largest uniform "
        "within those params (or its smallest) "
        f"({exports['width only']['params_nonembed'] / 1e6:.1f}M) {speed['width only']:.1f} "
        f"(x{speed['width only'] / speed['full']:.2f}).",
    ]
    name = a.name or (("depth_routed_llamacpp" if a.runtime == "llama.cpp" else "depth")
                      + ("_deployed" if a.deploy_steps else ""))
    publish(name, name, data, lines, a.smoke)


if __name__ == "__main__":
    main()
