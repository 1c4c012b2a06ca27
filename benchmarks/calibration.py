"""Which calibration text keeps the narrow sub-networks general? The packaged SmolLM2-135M-Instruct is
converted once per `--calib-data` (default: the packaged prose; self: the model's own text, its unprompted
samples and its answers to the packaged train prompts), then trained as the demo trains (16 steps of
4 x 256 tokens, the defaults' data: prose beside the teacher's chat answers). Each model, before and after
training, is scored at uniform sub-networks of each parameter budget: next-token KL to the original on
held-out chat prompts, perplexity on held-out prose and on off-domain text (instruct.py's docstrings of Python
standard modules), and how much more the off-domain perplexity grows than the prose one (issue 40: at most
1.2x).

    python benchmarks/calibration.py [--calib default,self] [--steps 16] [--budgets 1.0,0.75,0.5] [--prompts 16]
                                     [--windows 4] [--name calibration]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from _results import command_line, publish
from flextron import api
from flextron.behaviour import reference
from flextron.chat import packaged_prompts
from flextron.checkpoint import load_checkpoint
from flextron.data import heldout_windows, tokenize, windows
from flextron.options import TrainOptions
from instruct import docs_text, scores


def arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", default="default,self", help="--calib-data values compared")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps of each training run")
    p.add_argument("--budgets", default="1.0,0.75,0.5", help="parameter budgets (uniform sub-networks)")
    p.add_argument("--prompts", type=int, default=16, help="held-out chat prompts the KL is measured on")
    p.add_argument("--windows", type=int, default=4, help="held-out 1,024-token windows of each text")
    p.add_argument("--name", default="calibration", help="JSON file and docs/results.md section written")
    p.add_argument("--work", default="/tmp/flextron-calibration")
    return p


def main() -> None:
    p = arguments()
    a = p.parse_args()
    work, budgets, t0 = Path(a.work), a.budgets.split(","), time.time()
    results, seconds = {}, {}
    for calib in a.calib.split(","):
        started = time.time()
        ckpt = api.convert(None, work / f"{calib}-ckpt", calib_sequences=128, calib_data=calib, overwrite=True,
                           progress=False)
        seconds[f"convert {calib}"] = time.time() - started
        if not results:  # at full width every converted model is the original's function
            original, tok, _ = load_checkpoint(ckpt)
            ref = reference(original, tok, packaged_prompts("eval", a.prompts), 48)
            prose = heldout_windows(tok, 1024, a.windows)
            docs = windows(tokenize(tok, docs_text()), 1024, a.windows)
        results[f"{calib}, before"] = scores(ckpt, budgets, ref, prose, docs)
        run = work / f"{calib}-train"
        shutil.rmtree(run, ignore_errors=True)
        started = time.time()
        cfg = TrainOptions(max_steps=a.steps, seq_len=256, micro_batch=4, n_random=1, warmup_steps=4, eval_limit=0,
                           save_every=10**9)
        final = api.train(ckpt, run, cfg, progress=False)["final"]
        seconds[f"train {calib}"] = time.time() - started
        results[f"{calib}, trained"] = scores(Path(final), budgets, ref, prose, docs)
    publish(a.name, a.name, {"args": vars(a), "seconds": seconds, "results": results},
            table(a, command_line("calibration.py", p, a), time.time() - t0, results), smoke=False)


def table(a: argparse.Namespace, command: str, seconds: float, results: dict[str, list[dict]]) -> list[str]:
    """One row per calibration, training state and budget; perplexities as ratios to the original's (any
    model's full width before training), and the off-domain ratio over the prose one."""
    full = next(r for r in next(iter(results.values())) if float(r["budget"]) == 1.0)
    lines = [f"Command: `{command}` ({seconds:.0f} s on this machine). Uniform sub-networks; KL to the original "
             f"over its greedy answers to {a.prompts} held-out chat prompts; perplexity on {a.windows} windows of "
             "1,024 tokens of held-out prose and of off-domain text, x: over the original's.", "",
             "| calibration | model | budget | chat KL | prose ppl (x) | off-domain ppl (x) | off-domain x / prose x |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        calib, state = name.split(", ")
        for r in rows:
            prose, docs = r["ppl"] / full["ppl"], r["ppl_docs"] / full["ppl_docs"]
            lines.append(f"| {calib} | {state} | {float(r['budget']):.0%} | {r['kl']:.3f} | {r['ppl']:.1f} "
                         f"({prose:.2f}x) | {r['ppl_docs']:.1f} ({docs:.2f}x) | {docs / prose:.2f} |")
    return lines


if __name__ == "__main__":
    main()
