"""Peak memory of the distillation loss: full-vocabulary logits vs the chunked loss.

Student and teacher output layers of a Llama-3-sized vocabulary (128256 x 2048, fp32) read
final hidden states of one micro-batch; forward and backward of KL + CE, once on full logits
(the loss before chunking: `kd_loss` + cross-entropy) and once by `chunked_distill_loss`.
Each runs in a fresh process; the number is the growth of its peak RSS over the set-up.

    python benchmarks/loss_memory.py [--tokens 2048] [--vocab 128256] [--hidden 2048] [--chunk 128]
    python benchmarks/loss_memory.py --smoke     # small shapes, seconds; writes no results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

from _results import update_section, write_json
from flextron.train.losses import chunked_distill_loss, kd_loss
from flextron.train.memory import peak_rss_bytes


def _peak_mb() -> float:
    return peak_rss_bytes() / 2**20


def child(mode: str, tokens: int, vocab: int, hidden: int, chunk: int) -> dict:
    torch.manual_seed(0)
    s_head, t_head = nn.Linear(hidden, vocab, bias=False), nn.Linear(hidden, vocab, bias=False)
    t_head.requires_grad_(False)
    s_hidden = torch.randn(1, tokens, hidden, requires_grad=True)
    t_hidden = torch.randn(1, tokens, hidden)
    ids = torch.randint(0, vocab, (1, tokens))
    before = _peak_mb()
    if mode == "full":
        logits = s_head(s_hidden)
        with torch.no_grad():
            t_logits = t_head(t_hidden)
        loss = kd_loss(logits, t_logits) + F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    else:
        loss = chunked_distill_loss(s_hidden, t_hidden, ids, s_head, t_head, lm_weight=1.0, chunk=chunk)[0]
    loss.backward()
    return {"mode": mode, "loss": loss.item(), "peak_growth_mb": round(_peak_mb() - before, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.smoke:
        a.tokens, a.vocab, a.hidden, a.chunk = 64, 4096, 64, 16
    shape = (a.tokens, a.vocab, a.hidden, a.chunk)
    if a.child:
        print(json.dumps(child(a.child, *shape)))
        return
    rows = {}
    for mode in ("full", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--tokens", str(a.tokens), "--vocab",
                              str(a.vocab), "--hidden", str(a.hidden), "--chunk", str(a.chunk)],
                             capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[mode])
    ratio = rows["full"]["peak_growth_mb"] / max(rows["chunked"]["peak_growth_mb"], 1e-9)
    result = {"tokens": a.tokens, "vocab": a.vocab, "hidden": a.hidden, "chunk": a.chunk, **rows,
              "ratio": round(ratio, 2)}
    print(f"peak memory of the loss: full {rows['full']['peak_growth_mb']:.0f} MB, chunked "
          f"{rows['chunked']['peak_growth_mb']:.0f} MB ({ratio:.1f}x lower)")
    if a.smoke:
        return
    write_json("loss_memory", result)
    update_section("loss-memory", (
        f"Distillation loss (KL + CE, forward and backward) of one micro-batch of {a.tokens} tokens, vocabulary "
        f"{a.vocab}, hidden {a.hidden}, fp32, CPU; growth of peak RSS in a fresh process "
        "(`python benchmarks/loss_memory.py`):\n\n"
        "| loss | peak memory (MB) |\n|---|---:|\n"
        f"| full-vocabulary logits | {rows['full']['peak_growth_mb']:.0f} |\n"
        f"| chunked, {a.chunk} tokens a chunk | {rows['chunked']['peak_growth_mb']:.0f} |\n\n"
        f"{ratio:.1f}x lower; both losses agree ({rows['full']['loss']:.5f} vs {rows['chunked']['loss']:.5f}).\n"))


if __name__ == "__main__":
    main()
