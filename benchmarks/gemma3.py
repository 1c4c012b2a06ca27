"""Gemma-3-270M (the packaged base model) through the pipeline on this machine: convert, skip exactness
against transformers, a short elastic run, held-out perplexity at four budgets before and after it, and
a sub-network in llama.cpp (logits against the elastic model, speed against the full model).

    python benchmarks/gemma3.py [--train-steps 20] [--calib-sequences 32] [--limit 8] [--rounds 5]

Skip exactness: one MLP and one attention skip against transformers' Gemma3 with that sub-layer's
output set to zero by a forward hook (the reference the family tests use). Budgets are fractions of the
non-embedding parameters (the embedding / LM head, 63 % of the model, is not elastic: see the hidden-size
issue). llama.cpp: f32 files with an f32 KV cache for the logits, f16 files for the speed, timed back to
back in each round (`llamacpp.against`), at every core of this machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _results import command_line, publish
from flextron import api, llamacpp
from flextron.assets import GEMMA3, load_hf
from flextron.budgets import select_subnet
from flextron.cost import subnet_cost
from flextron.data import default_splits
from flextron.elastic import ElasticModel
from flextron.gguf import write_gguf
from flextron.options import TrainOptions
from flextron.space import Budget

BUDGETS = ("1.0", "0.75", "0.5", "0.35")


def skip_errors(text: str) -> dict[str, dict[str, float]]:
    """Max |dlogit| and argmax agreement of one MLP and one attention skip (layer 5) against transformers."""
    model, tok, _ = load_hf(GEMMA3)
    ids = tok(text, return_tensors="pt")["input_ids"][:, :128]
    layer = model.model.layers[5]

    def hooked(module) -> torch.Tensor:
        handle = module.register_forward_hook(
            lambda m, args, out: (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else out * 0)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False).logits
        handle.remove()
        return out

    refs = {"mlp": hooked(layer.mlp), "attn": hooked(layer.self_attn)}
    em = ElasticModel(model)
    em.set_space(em.space.with_depth(min_layers=len(em.blocks) - 1))
    out = {}
    for which, ref in refs.items():
        sub = em.space.full()
        getattr(sub, which)[5] = 0
        with torch.no_grad(), em.subnet(sub):
            got = em(input_ids=ids, use_cache=False).logits
        out[which] = {"max_abs_dlogit": (got - ref).abs().max().item(), "logit_scale": ref.abs().max().item(),
                      "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-sequences", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--limit", type=int, default=8, help="held-out windows of --seq-len tokens")
    p.add_argument("--rounds", type=int, default=5, help="llama.cpp timing rounds")
    p.add_argument("--work", default=None, help="where checkpoints go (default: a temporary directory)")
    p.add_argument("--smoke", action="store_true", help="tiny settings; print, write nothing")
    a = p.parse_args()
    t0 = time.time()
    work = Path(a.work or tempfile.mkdtemp(prefix="gemma3-"))
    _, tok, _ = load_hf(GEMMA3)
    heldout = default_splits()["heldout"][:20_000]
    skips = skip_errors(heldout)
    ckpt = api.convert(GEMMA3, work / "ck", calib_sequences=a.calib_sequences, calib_seq_len=a.seq_len,
                       attn_unit="head", device="cpu", overwrite=True, progress=False)
    convert_s = time.time() - t0
    t = time.time()
    summary = api.train(ckpt, work / "run", TrainOptions(max_steps=a.train_steps, seq_len=a.seq_len, micro_batch=2,
                                                         eval_limit=0, save_every=a.train_steps),
                        device="cpu", progress=False)
    train_s = time.time() - t
    trained = Path(summary["final"])
    evals = {name: api.evaluate(path, budgets=BUDGETS, limit=a.limit, seq_len=a.seq_len, device="cpu",
                                progress=False) for name, path in (("prune only", ckpt), ("trained", trained))}
    em, _, _ = api.load(trained, "cpu")
    half = select_subnet(em, Budget.parse("0.5"))
    ids = tok(heldout, return_tensors="pt")["input_ids"][0, :64]
    with torch.no_grad(), em.subnet(half):
        want = em(input_ids=ids[None], use_cache=False).logits[0]
    with tempfile.TemporaryDirectory() as tmp:
        exact = write_gguf(em, tok, half, Path(tmp) / "half-f32.gguf", "f32")
        with llamacpp.opened(exact["path"], n_ctx=128, exact=True, all_logits=True) as llm:
            got = torch.from_numpy(llamacpp.logits(llm, ids.tolist()))
        files = {name: write_gguf(em, tok, s, Path(tmp) / f"{name}.gguf", "f16")
                 for name, s in (("full", em.space.full()), ("half", half))}
        ref, sub, ratio = llamacpp.against(files["full"]["path"], files["half"]["path"], a.rounds)
    full_cost, half_cost = subnet_cost(em), subnet_cost(em, half)
    data = {
        "command": command_line("gemma3.py", p, a), "seconds": round(time.time() - t0),
        "skips": skips, "convert_s": convert_s, "train_s": train_s, "train": summary,
        "eval": {k: [r.to_dict() for r in rows] for k, rows in evals.items()},
        "gguf": {"architecture": exact["architecture"], "subnet": half.to_dict(),
                 "max_abs_dlogit": (got - want).abs().max().item(), "logit_scale": want.abs().max().item(),
                 "argmax_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
                 "full_ms": ref, "half_ms": sub, "half_over_full": ratio, "bytes": {k: v["bytes"] for k, v in
                                                                                    files.items()},
                 "params": {"full": full_cost.params, "half": half_cost.params}},
    }
    g = data["gguf"]
    lines = ["## Gemma-3-270M through the pipeline (sandwich norms; a second real family)", "",
             f"Gemma-3-270M on this CPU (`{data['command']}`, {data['seconds']} s; convert {convert_s:.0f} s, "
             f"{a.train_steps} elastic steps {train_s:.0f} s).", "",
             "| skip (layer 5) | max \\|dlogit\\| vs transformers | logit scale | argmax agreement |",
             "|---|---|---|---|"]
    lines += [f"| {w} | {s['max_abs_dlogit']:.2e} | {s['logit_scale']:.1f} | {s['argmax_agreement']:.0%} |"
              for w, s in skips.items()]
    lines += ["", "| budget (non-embedding params) | params | ppl prune only | ppl after training |",
              "|---|---|---|---|"]
    for before, after in zip(evals["prune only"], evals["trained"]):
        lines.append(f"| {before.budget} | {before.cost['params'] / 1e6:.1f} M | {before.ppl:.1f} | {after.ppl:.1f} |")
    lines += ["", f"llama.cpp, the 50 % sub-network (`{g['architecture']}`, MLP {half.mlp[0]}, "
              f"{em.blocks[0].attn_heads(half.attn[0])[0]} of 4 query heads; {g['params']['half'] / 1e6:.1f} M of "
              f"{g['params']['full'] / 1e6:.1f} M parameters): logits within {g['max_abs_dlogit']:.2e} of the elastic "
              f"model (logit scale {g['logit_scale']:.1f}, argmax agreement {g['argmax_agreement']:.0%}); f16 decode "
              f"{g['half_ms']['decode_ms']:.1f} vs {g['full_ms']['decode_ms']:.1f} ms/token "
              f"({g['half_over_full']['decode_ms']:.2f}x the full model), prefill of 256 tokens "
              f"{g['half_over_full']['prefill_ms']:.2f}x."]
    publish("gemma3", "gemma3", data, lines, a.smoke)


if __name__ == "__main__":
    main()
