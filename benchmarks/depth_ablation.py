"""Ablation: importance-ordered vs random sub-layer skipping, prune only, on the packaged SmolLM2.

The packaged model is converted once with `--depth` (block importance of every attention and
MLP sub-layer on the calibration set, `flextron.importance`). At full width, the k least
important attention sub-layers and the k least important MLP sub-layers are skipped
(k = 3, 6, 9 of 30 by default) and held-out perplexity (fp32, 1,024-token windows) is compared
with skipping k random sub-layers of each kind (mean and range over `--seeds` random orders).
Also shown: the same k skipped by the default order without importance (the deepest first).

    python benchmarks/depth_ablation.py [--skips 3,6,9] [--seeds 3] [--limit N] [--device cpu|cuda]
    python benchmarks/depth_ablation.py --smoke      # a tiny random model, seconds; writes no results
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from _results import publish
from flextron import api
from flextron.data import heldout_windows
from flextron.elastic import ElasticModel
from flextron.evaluate import perplexity


def tiny_checkpoint(work: Path, n_layers: int = 6) -> Path:
    """--smoke: a tiny random Llama (the tests' model) converted with --depth."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import make_model, make_tokenizer

    src = work / "tiny-hf"
    make_model("llama", n_layers=n_layers).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    return api.convert(str(src), work / "ckpt", multiple=8, depth=True, min_layers=1, device="cpu",
                       calib_sequences=8, calib_seq_len=32, overwrite=True, progress=False)


def skipping_ppl(em: ElasticModel, order: dict[str, list[int]], k: int, windows: torch.Tensor) -> float:
    """Held-out perplexity at full width with the first k layers of `order` skipped, per kind."""
    em.set_space(dataclasses.replace(em.space, skip_order=order))
    last = max(len(c) for c in em.space.mlp + em.space.attn)
    with em.subnet(em.space.uniform(last, last, k, k)):
        return perplexity(em, windows, batch_size=4, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skips", default="3,6,9", help="sub-layers of each kind skipped")
    p.add_argument("--seeds", type=int, default=3, help="random orders")
    p.add_argument("--limit", type=int, default=None, help="held-out windows (default: all)")
    p.add_argument("--calib-sequences", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="tiny random model and few tokens; writes no results")
    a = p.parse_args()
    t0 = time.time()
    skips = [int(k) for k in a.skips.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if a.smoke:
            ckpt, seq_len = tiny_checkpoint(Path(tmp)), 64
        else:
            ckpt = api.convert(None, Path(tmp) / "ckpt", depth=True, min_layers=1, calib_sequences=a.calib_sequences,
                               device=a.device, progress=False)
            seq_len = 1024
        em, tok, manifest = api.load(ckpt, a.device)
        windows = heldout_windows(tok, seq_len, 2 if a.smoke else a.limit)
        n = em.space.n_layers
        importance = em.space.skip_order
        gen = torch.Generator().manual_seed(0)
        randoms = [{k: torch.randperm(n, generator=gen).tolist() for k in ("mlp", "attn")} for _ in range(a.seeds)]
        deepest = {k: list(range(n - 1, -1, -1)) for k in ("mlp", "attn")}
        rows = []
        full = perplexity(em, windows, batch_size=4, progress=False)
        for k in skips:
            rnd = [skipping_ppl(em, order, k, windows) for order in randoms]
            rows.append({"skipped_per_kind": k, "importance": skipping_ppl(em, importance, k, windows),
                         "deepest_first": skipping_ppl(em, deepest, k, windows), "random": rnd,
                         "random_mean": sum(rnd) / len(rnd)})
    command = "python benchmarks/depth_ablation.py" + (f" --limit {a.limit}" if a.limit else "") + (
        f" --device {a.device}" if a.device != "cpu" else "")
    data = {"command": command, "device": a.device, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "seconds": round(time.time() - t0), "layers": n,
            "tokens": int(windows[:, 1:].numel()), "full_ppl": full, "skip_order": importance,
            "block_importance": manifest["importance"]["layers"], "rows": rows}
    lines = [
        "## Ablation: importance-ordered vs random sub-layer skipping (prune only, no training)",
        "",
        f"`{command}` — {'a tiny random Llama (smoke run)' if a.smoke else 'SmolLM2-135M-Instruct (packaged)'}, "
        f"{data['tokens']:,} held-out tokens, fp32, {a.device}, {data['seconds']} s. Full width everywhere; "
        f"k attention and k MLP sub-layers of {n} skipped. Full model: perplexity **{full:.2f}**.",
        "",
        "| skipped per kind | block importance | deepest first | random (mean of "
        f"{a.seeds}) | random (range) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['skipped_per_kind']} | {r['importance']:.2f} | {r['deepest_first']:.2f} | "
                     f"{r['random_mean']:.2f} | {min(r['random']):.2f}-{max(r['random']):.2f} |")
    publish("depth_ablation", "depth-ablation", data, lines, a.smoke)


if __name__ == "__main__":
    main()
