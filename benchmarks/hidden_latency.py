"""The lowest feasible latency budget with and without the hidden-size choice, in llama.cpp.

For the packaged SmolLM2-135M and Gemma-3-270M: the smallest sub-network of the default width space
(MLP a quarter, the fewest attention units, every layer kept) at the full hidden size and at the
smallest hidden size (`--hidden-fractions`), exported as f16 GGUF in the family's own architecture,
decode and prefill timed back to back with the full model in each round (`llamacpp.against`, the
median of the per-round ratios) at `--threads` threads. The smallest sub-network's decode time over the
full model's is the lowest latency budget a router can meet. Weights are in random order (timing does not
depend on it), so no calibration runs.

    python benchmarks/hidden_latency.py [--threads 2] [--rounds 7] [--fraction 0.5]
    python benchmarks/hidden_latency.py --smoke      # a tiny random model; writes no results
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _results import command_line, publish
from flextron import api, llamacpp
from flextron.assets import GEMMA3
from flextron.cost import subnet_cost
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
                               hidden_multiple=8 if a.smoke else 32, multiple=8 if a.smoke else 64,
                               device="cpu", progress=False)
            em, tok, _ = api.load(ckpt, "cpu")
            subnets = {"full": em.space.full(), "width only": em.space.uniform(0, 0),
                       "width + hidden": em.space.uniform(0, 0, hidden_index=0)}
            files = {k: write_gguf(em, tok, s, work / f"{name}-{k.replace(' ', '')}.gguf", "f16")
                     for k, s in subnets.items()}
            row = {"hidden_sizes": em.space.hidden, "subnets": {k: s.to_dict() for k, s in subnets.items()},
                   "params": {k: subnet_cost(em, s).params for k, s in subnets.items()},
                   "bytes": {k: f["bytes"] for k, f in files.items()},
                   "architecture": {k: f["architecture"] for k, f in files.items()}}
            for k in ("width only", "width + hidden"):
                ref, got, ratio = llamacpp.against(files["full"]["path"], files[k]["path"], a.rounds,
                                                   threads=a.threads)
                row[k] = {"full_ms": ref, "ms": got, "over_full": ratio}
            results[name] = row
            print(name, row, flush=True)
    data = {"command": command_line("hidden_latency.py", p, a), "seconds": round(time.time() - t0),
            "threads": a.threads, "models": results}
    lines = ["## Hidden size: the lowest feasible latency budget in llama.cpp", "",
             f"`{data['command']}` ({data['seconds']} s): the smallest sub-network (MLP a quarter, fewest attention "
             f"units, every layer) over the full model, f16 GGUF, {a.threads} threads, median of {a.rounds} "
             "back-to-back rounds; weights in random order (timing does not depend on it).", "",
             "| model | sub-network | hidden | params | file | decode / full | prefill (256) / full |",
             "|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        for k in ("width only", "width + hidden"):
            sub = row["subnets"][k]
            lines.append(f"| {name} | {k} | {sub.get('hidden', row['hidden_sizes'][-1])} | "
                         f"{row['params'][k] / row['params']['full']:.1%} | "
                         f"{row['bytes'][k] / row['bytes']['full']:.1%} | {row[k]['over_full']['decode_ms']:.3f} | "
                         f"{row[k]['over_full']['prefill_ms']:.3f} |")
    publish("hidden_latency", "hidden-latency", data, lines, a.smoke)


if __name__ == "__main__":
    main()
