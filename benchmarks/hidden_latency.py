"""The lowest feasible latency budget with and without the hidden-size choice, in llama.cpp.

For the packaged SmolLM2-135M and Gemma-3-270M: the smallest sub-network of the default width space
(MLP a quarter, the fewest attention units, every layer kept), and of the width + depth space (also
two thirds of the layers skipped, the same layers for attention and MLP, so whole layers go), at the
full hidden size and at the smallest hidden size (`--hidden-fractions`), exported as f16 GGUF (the
family's own architecture, or per-layer `deci` where llama.cpp needs it; a sub-network llama.cpp cannot
hold is listed as such),
decode and prefill timed back to back with the full model in each round (`llamacpp.against`, the
median of the per-round ratios) at `--threads` threads. The smallest sub-network's decode time over the
full model's is the lowest latency budget a router can meet. Weights are in random order (timing does not
depend on it), so no calibration runs.

    python benchmarks/hidden_latency.py [--threads 2] [--rounds 7] [--fraction 0.5] [--hidden-multiple 64]
    python benchmarks/hidden_latency.py --smoke      # a tiny random model; writes no results
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from _results import command_line, publish
from flextron import api, llamacpp
from flextron.assets import GEMMA3
from flextron.cost import subnet_cost
from flextron.errors import FlextronError
from flextron.gguf import write_gguf


def tiny_source(work: Path) -> str:
    """--smoke: a tiny random Llama with a byte-level BPE llama.cpp can run."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import make_bpe_tokenizer, make_model

    src = work / "tiny-hf"
    make_model("llama").save_pretrained(src)
    make_bpe_tokenizer().save_pretrained(src)
    return str(src)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--fraction", type=float, default=0.5, help="the smallest hidden size, a fraction of the model's")
    p.add_argument("--hidden-multiple", type=int, default=64, help="hidden sizes are multiples of this")
    p.add_argument("--smoke", action="store_true", help="tiny random model; print, write nothing")
    a = p.parse_args()
    t0 = time.time()
    models = {"tiny": None} if a.smoke else {"SmolLM2-135M": None, "Gemma-3-270M": GEMMA3}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, source in models.items():
            source = tiny_source(work) if a.smoke else source
            ckpt = api.convert(source, work / f"{name}-ckpt", order="random", hidden_fractions=(a.fraction, 1.0),
                               hidden_multiple=8 if a.smoke else a.hidden_multiple, multiple=8 if a.smoke else 64,
                               depth=True, device="cpu", progress=False)
            em, tok, _ = api.load(ckpt, "cpu")
            deepest = list(range(em.space.n_layers - 1, -1, -1))  # one order for both kinds: whole layers go
            em.set_space(dataclasses.replace(em.space, skip_order={"mlp": deepest, "attn": deepest}))
            n = em.space.n_layers
            subnets = {"full": em.space.full(), "width only": em.space.uniform(0, 0),
                       "width + hidden": em.space.uniform(0, 0, hidden_index=0),
                       "width + depth": em.space.uniform(0, 0, n, n),
                       "width + depth + hidden": em.space.uniform(0, 0, n, n, hidden_index=0)}
            files, refused = {}, {}
            for k, s in subnets.items():
                try:
                    files[k] = write_gguf(em, tok, s, work / f"{name}-{k.replace(' ', '')}.gguf", "f16")
                except FlextronError as e:
                    refused[k] = str(e)
            row = {"hidden_sizes": em.space.hidden, "subnets": {k: s.to_dict() for k, s in subnets.items()},
                   "params": {k: subnet_cost(em, s).params for k, s in subnets.items()},
                   "bytes": {k: f["bytes"] for k, f in files.items()}, "refused": refused,
                   "architecture": {k: f["architecture"] for k, f in files.items()}}
            for k in files:
                if k != "full":
                    ref, got, ratio = llamacpp.against(files["full"]["path"], files[k]["path"], a.rounds,
                                                       threads=a.threads)
                    row[k] = {"full_ms": ref, "ms": got, "over_full": ratio}
            results[name] = row
            print(name, row, flush=True)
    data = {"command": command_line("hidden_latency.py", p, a), "seconds": round(time.time() - t0),
            "threads": a.threads, "models": results}
    lines = [f"## Hidden size: the lowest feasible latency budget in llama.cpp (smallest hidden size {a.fraction:g} of "
             f"the model's, multiples of {a.hidden_multiple})", "",
             f"`{data['command']}` ({data['seconds']} s): the smallest sub-network of each space (MLP a quarter, "
             "fewest attention units; with depth, the floor of a third of the layers) over the full model, f16 "
             f"GGUF, {a.threads} threads, median of {a.rounds} back-to-back rounds; weights in random order "
             "(timing does not depend on it).", "",
             "| model | space | hidden | layers | params | file | GGUF arch | decode / full | prefill (256) / full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        for k, sub in row["subnets"].items():
            if k == "full":
                continue
            head = (f"| {name} | {k} | {sub.get('hidden', row['hidden_sizes'][-1])} | "
                    f"{sum(1 for m, t in zip(sub['mlp'], sub['attn']) if m or t)} | "
                    f"{row['params'][k] / row['params']['full']:.1%} | ")
            if k in row["refused"]:
                lines.append(head + f"- | not in llama.cpp: {row['refused'][k]} | - | - |")
                continue
            lines.append(head + f"{row['bytes'][k] / row['bytes']['full']:.1%} | {row['architecture'][k]} | "
                         f"{row[k]['over_full']['decode_ms']:.3f} | {row[k]['over_full']['prefill_ms']:.3f} |")
    tag = "" if (a.fraction, a.hidden_multiple) == (0.5, 64) else f"_{a.fraction:g}_{a.hidden_multiple}"
    publish(f"hidden_latency{tag}", f"hidden-latency{tag.replace('_', '-')}", data, lines, a.smoke)


if __name__ == "__main__":
    main()
