"""How much of the surrogate's target is the batch rather than the architecture?

The router's surrogate (`flextron.train.surrogate`) learns the distillation loss of a sampled
architecture measured on a fresh training batch. This measures that loss for a fixed set of
architectures (the centroid, full, smallest, uniform/spread design draws, independent random ones)
on the same batches, and reports, as a share of the loss's spread over architectures (the scale of
the surrogate's running error and its `--surrogate-threshold`):

- the error floor of a perfect per-architecture predictor of the raw target (batch noise alone);
- the floor left once an additive batch effect is known;
- the floors of two normalised targets: the loss minus, or over, the centroid's loss on the same batch.

    python benchmarks/surrogate_noise.py --ckpt CKPT [--batches 8]
    python benchmarks/surrogate_noise.py --smoke      # a tiny random model, seconds; writes no results
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from _results import command_line, publish
from flextron.checkpoint import load_checkpoint, save_checkpoint
from flextron.data import PackedSequences, load_corpus, tokenize
from flextron.latency import design_subnets, random_subnets
from flextron.train.routers import subnet_loss


def floors(losses: torch.Tensor) -> dict[str, float]:
    """[architectures, batches] losses (row 0: the reference) -> mean absolute errors over the
    spread (mean |loss - mean|) of each target."""
    def share(y: torch.Tensor, fitted: torch.Tensor) -> float:
        return ((y - fitted).abs().mean() / (y - y.mean()).abs().mean()).item()

    batch_effect = losses.mean(1, keepdim=True) + losses.mean(0, keepdim=True) - losses.mean()
    minus, over = (losses - losses[:1])[1:], (losses / losses[:1])[1:]
    return {"raw": share(losses, losses.mean(1, keepdim=True)),
            "additive_batch_effect": share(losses, batch_effect),
            "minus_reference": share(minus, minus.mean(1, keepdim=True)),
            "over_reference": share(over, over.mean(1, keepdim=True))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rows", type=int, default=4, help="sequences per batch (the router's micro-batch)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    if a.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from helpers import make_bpe_tokenizer, make_elastic

        ckpt = save_checkpoint(make_elastic("llama"), make_bpe_tokenizer(), Path(tempfile.mkdtemp()) / "ckpt", {})
        a.batches = 3
    elif a.ckpt is None:
        p.error("--ckpt is required (or --smoke)")
    else:
        ckpt = Path(a.ckpt)
    t0 = time.time()
    em, tok, _ = load_checkpoint(ckpt, device="cpu")
    teacher, _, _ = load_checkpoint(ckpt, device="cpu")
    em.requires_grad_(False)
    teacher.requires_grad_(False)
    data = PackedSequences(tokenize(tok, load_corpus(None)), a.seq_len, 0)
    space = em.space
    archs = [space.centroid(), space.full(), space.smallest(), *design_subnets(em, 4, 3), *random_subnets(em, 3, 5)]
    losses = torch.zeros(len(archs), a.batches, dtype=torch.float64)
    for b in range(a.batches):
        ids = data.rows(b * a.rows, a.rows)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        for i, s in enumerate(archs):
            losses[i, b] = subnet_loss(em, s, ids, t_logits, None)
        print(f"batch {b + 1}/{a.batches}: {time.time() - t0:.0f} s", flush=True)
    got = floors(losses)
    command = command_line("surrogate_noise.py", p, a)
    lines = [
        "## The surrogate's target: batch noise vs architecture",
        "",
        f"`{command}` — CPU, {len(archs)} architectures x {a.batches} batches of {a.rows} x {a.seq_len} tokens, "
        f"{time.time() - t0:.0f} s. Distillation loss of each architecture on each batch; the error of a perfect "
        "predictor of each target, as a share of the target's spread over architectures (the scale of the "
        "surrogate's running error, threshold 0.25 by default).",
        "",
        "| target | error floor / spread |",
        "|---|---|",
        f"| loss (what the surrogate learns) | {got['raw']:.3f} |",
        f"| loss, an additive batch effect known | {got['additive_batch_effect']:.3f} |",
        f"| loss minus the centroid's on the same batch | {got['minus_reference']:.3f} |",
        f"| loss over the centroid's on the same batch | {got['over_reference']:.3f} |",
    ]
    publish("surrogate_noise", "surrogate_noise", {"command": command, "floors": got, "losses": losses.tolist(),
                                                   "architectures": [s.to_dict() for s in archs]}, lines, a.smoke)


if __name__ == "__main__":
    main()
