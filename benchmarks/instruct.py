"""Does an instruct model stay an instruct model? The packaged SmolLM2-135M-Instruct, converted once,
then elastic training at the demo's size (16 steps of 4 x 256 tokens, sandwich) with each kind of data
at equal tokens:

  prose       the packaged text only (--chat none, what training read before chat data existed);
  chat        half the rows the teacher's own greedy answers to the packaged train prompts (--chat self,
              the default for a model with a chat template), the loss on every token;
  assistant   the same rows, the loss on the assistant's tokens only (--chat-loss assistant);
  NAME:K=V;K=V  a variant with other training options (e.g. chat:full_weight=1;lr=1e-5): which schedule
              keeps the full budget the original.

Each model (and the converted one, before training) is compared with the original on held-out chat
prompts at uniform sub-networks of each parameter budget (`flextron.behaviour`: greedy agreement of the
first N tokens and of the first sentence, KL to the original over its own answers), and scored on the
held-out prose and on off-domain text (the docstrings of a fixed list of Python standard modules:
technical documentation, never trained on).

With --route STEPS:JOINT[:K=V;K=V][,...], each trained model is also routed once per entry (`flextron route`,
params budgets, its router and joint steps and any other route options, e.g. 20:40:full_weight=1; the chat data
as its training's) and scored again at the budgets the routers serve: whether the joint fine-tuning keeps the
full budget where training left it.

With --gguf, each model's full budget is also exported to GGUF at each weight type and compared as llama.cpp
runs it (`flextron.behaviour.compare_gguf`): the "before" rows are then the original model as a user deploys
it, so they show how far from the original's answers deployment alone already is.

    python benchmarks/instruct.py [--steps 16] [--prompts 64] [--variants prose,chat,assistant,chat:lr=1e-5]
                                  [--route 20:0,20:40] [--gguf f32,q8_0,q4_k_m] [--name instruct]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import shutil
import time
from pathlib import Path

import torch

from _results import command_line, publish
from flextron import api
from flextron.behaviour import compare, compare_gguf, reference
from flextron.budgets import select_subnet
from flextron.chat import packaged_prompts
from flextron.checkpoint import load_checkpoint
from flextron.data import heldout_windows, tokenize, windows
from flextron.evaluate import perplexity
from flextron.generation import stop_token_ids
from flextron.options import RouteOptions, TrainOptions
from flextron.space import Budget

VARIANTS = {"prose": {"chat": "none"}, "chat": {"chat": "self"},
            "assistant": {"chat": "self", "chat_loss": "assistant"}}
DOC_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "csv", "dataclasses", "datetime", "email",
               "functools", "http.client", "itertools", "json", "logging", "os", "pathlib", "pickle", "re",
               "shutil", "socket", "sqlite3", "subprocess", "tarfile", "threading", "typing", "unittest",
               "urllib.request", "xml.etree.ElementTree", "zipfile")


def docs_text() -> str:
    """Technical documentation: the docstrings of DOC_MODULES and of their public classes and functions."""
    parts = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(v for k, v in sorted(vars(module).items()) if not k.startswith("_"))]:
            doc = inspect.getdoc(obj) if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj) \
                else None
            if doc and len(doc) > 200 and doc not in parts:
                parts.append(doc)
    return "\n\n".join(parts)


def overrides(text: str) -> dict:
    """K=V;K=V options, each value read as JSON where it is (1e-5, 16, true) and as text otherwise; the
    options dataclass checks them as it checks a config."""
    options = {}
    for item in filter(None, text.split(";")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def variant(spec: str) -> dict:
    """The training options of a --variants entry: a named variant, then any K=V overrides."""
    name, _, rest = spec.partition(":")
    return {**VARIANTS[name], **overrides(rest)}


def routing(spec: str) -> dict:
    """The route options of a --route entry: STEPS:JOINT, then any K=V overrides."""
    steps, joint, rest = (spec.split(":", 2) + [""])[:3]
    return {"steps": int(steps), "joint_steps": int(joint), **overrides(rest)}


def scores(ckpt: Path, budgets: list[str], ref, prose: torch.Tensor, docs: torch.Tensor) -> list[dict]:
    em, tok, _ = load_checkpoint(ckpt)
    rows = []
    for b in budgets:
        sub = select_subnet(em, Budget.parse(b))
        with em.subnet(sub):
            row = {"budget": b, "runtime": "transformers fp32", **compare(em, tok, ref)}
            row["ppl"] = perplexity(em, prose, progress=False)
            row["ppl_docs"] = perplexity(em, docs, progress=False)
        rows.append(row)
        print(f"  {ckpt.parent.name if ckpt.name.startswith('step') else ckpt.name} {b}: {row}", flush=True)
    return rows


def gguf_scores(ckpt: Path, outtypes: list[str], ref, work: Path, threads: int | None) -> list[dict]:
    """The full budget exported at each of `outtypes` and compared as llama.cpp runs it (no perplexity)."""
    if not outtypes:  # without --gguf, no checkpoint to load
        return []
    em, tok, _ = load_checkpoint(ckpt)
    stops = stop_token_ids(em.model, tok)
    rows = []
    for outtype in outtypes:
        path = work / f"full-{outtype}.gguf"
        api.export(ckpt, "1.0", path, format="gguf", outtype=outtype, overwrite=True)
        scored = compare_gguf(path, tok, ref, stops, threads)
        rows.append({"budget": "1.0", "runtime": f"llama.cpp {outtype}", **scored})
        path.unlink()
        print(f"  {ckpt} llama.cpp {outtype}: {rows[-1]}", flush=True)
    return rows


def arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16, help="optimizer steps of every training run")
    p.add_argument("--prompts", type=int, default=64, help="held-out chat prompts compared")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens of each greedy answer compared")
    p.add_argument("--budgets", default="1.0,0.75,0.5", help="parameter budgets (uniform sub-networks)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--windows", type=int, default=8, help="held-out 1,024-token windows of each text")
    p.add_argument("--route", default="", help="STEPS:JOINT[:K=V;K=V][,...]: also route each trained model (once "
                                               "per entry) and score it again")
    p.add_argument("--gguf", default="", help="weight types the full budget is also compared at in llama.cpp")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: its own choice)")
    p.add_argument("--name", default="instruct", help="JSON file and docs/results.md section written")
    p.add_argument("--work", default="/tmp/flextron-instruct")
    return p


def main() -> None:
    p = arguments()
    a = p.parse_args()
    work, budgets = Path(a.work), a.budgets.split(",")
    t0 = time.time()
    ckpt = work / "ckpt"
    if not ckpt.is_dir():
        api.convert(None, ckpt, calib_sequences=128, progress=False)
    original, tok, _ = load_checkpoint(ckpt)  # at full width the converted model is the original's function
    ref = reference(original, tok, packaged_prompts("eval", a.prompts), a.new_tokens)
    prose = heldout_windows(tok, 1024, a.windows)
    docs = windows(tokenize(tok, docs_text()), 1024, a.windows)
    outtypes = [t for t in a.gguf.split(",") if t]
    results = {"before": scores(ckpt, budgets, ref, prose, docs) + gguf_scores(ckpt, outtypes, ref, work, a.threads)}
    for name in a.variants.split(","):
        cfg = TrainOptions(max_steps=a.steps, seq_len=256, micro_batch=4, n_random=1, warmup_steps=4, eval_limit=0,
                           save_every=10**9, **variant(name))
        started = time.time()
        run = work / name.replace(":", "-").replace(";", "-")
        shutil.rmtree(run, ignore_errors=True)
        final = api.train(ckpt, run, cfg, progress=False)["final"]
        print(f"{name}: trained in {time.time() - started:.0f} s", flush=True)
        results[name] = scores(Path(final), budgets, ref, prose, docs) + gguf_scores(Path(final), outtypes, ref, run,
                                                                                     a.threads)
        for spec in filter(None, a.route.split(",")):
            started = time.time()
            rcfg = RouteOptions(metric="params", eval_limit=1, check_sequences=8, chat=cfg.chat, **routing(spec))
            api.route(final, rcfg, out=run / "routed", overwrite=True, device="cpu", progress=False)
            print(f"{name}: routed ({spec}) in {time.time() - started:.0f} s", flush=True)
            results[f"{name} +route {spec}"] = scores(run / "routed", budgets, ref, prose, docs)
    publish(a.name, a.name, {"args": vars(a), "results": results}, table(a, command_line("instruct.py", p, a),
                                                                          time.time() - t0, results), smoke=False)


def table(a: argparse.Namespace, command: str, seconds: float, results: dict[str, list[dict]]) -> list[str]:
    """The markdown of a run: one row per model, budget and runtime; perplexity ratios to the original's, the
    converted model's at 100 % in transformers (GGUF rows have no perplexity)."""
    lines = [f"Command: `{command}` ({seconds:.0f} s on this machine). "
             f"{a.prompts} held-out chat prompts, greedy answers of {a.new_tokens} tokens; the original's own "
             "answers agree with themselves (1.00) at KL 0. Perplexity ratios are to the original (the converted "
             "model at 100 %).", "",
             "| data | budget | runs in | first sentence = original's | first N tokens = original's | KL to original | "
             "prose ppl (x original) | docs ppl (x original) |", "|---|---|---|---|---|---|---|---|"]
    measured = [r for r in results["before"] if "ppl" in r]
    full = next((r for r in measured if r["budget"] == "1.0"), measured[0])
    for name, rows in results.items():
        for r in rows:
            ppl = (f"{r['ppl']:.2f} ({r['ppl'] / full['ppl']:.2f}x) | "
                   f"{r['ppl_docs']:.2f} ({r['ppl_docs'] / full['ppl_docs']:.2f}x)") if "ppl" in r else "- | -"
            lines.append(f"| {name} | {float(r['budget']):.0%} | {r['runtime']} | {r['agree_sentence']:.2f} | "
                         f"{r['agree_tokens']:.2f} | {r['kl']:.4f} | {ppl} |")
    return lines

if __name__ == "__main__":
    main()
