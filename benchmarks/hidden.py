"""Hidden-size elasticity, prune only, on the packaged SmolLM2: importance-ordered vs random channels, and
hidden + width vs width only at equal parameters.

The packaged model is converted once with hidden sizes (`--hidden-fractions`, channels sorted by Minitron's
rule: the magnitude of every norm's output over the residual stream, `flextron.importance`). At each budget
(a fraction of ALL parameters, the tied embedding / LM head included: in a space with hidden sizes the
`params` metric counts them, since the hidden size shrinks them) every maximal uniform sub-network within
it is scored (`budgets.uniform_candidates`: for each hidden size, the widest MLP / attention pairs that
fit): held-out perplexity, fp32, 1,024-token windows. The full hidden size's best is the width-only
answer; the best over all hidden sizes the hidden + width one. The same sub-networks at a smaller hidden
size (the best of each size) are scored again with the channels in a random order (MLP and attention
orders untouched), which isolates the channel ranking.

    python benchmarks/hidden.py [--budgets 0.5,0.75] [--fractions 0.5,0.625,0.75,0.875,1.0] [--multiple 32]
                                [--limit N] [--device cpu|cuda]
    python benchmarks/hidden.py --smoke      # a tiny random model, seconds; writes no results
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from _results import IMG_DIR, command_line, publish
from flextron import api
from flextron.budgets import cost_table, uniform_candidates
from flextron.data import heldout_windows
from flextron.evaluate import perplexity
from flextron.report import plot_ppl_vs_size, widths_cell
from flextron.space import Subnet


def tiny_checkpoint(work: Path, fractions: tuple[float, ...], multiple: int) -> Path:
    """--smoke: a tiny random Llama (the tests' model) converted with hidden sizes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import make_model, make_tokenizer

    src = work / "tiny-hf"
    make_model("llama").save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    return api.convert(str(src), work / "ckpt", multiple=8, hidden_fractions=fractions, hidden_multiple=multiple,
                       device="cpu", calib_sequences=8, calib_seq_len=32, overwrite=True, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="0.5,0.75", help="fractions of all parameters")
    p.add_argument("--fractions", default="0.5,0.625,0.75,0.875,1.0", help="hidden sizes, fractions of the model's")
    p.add_argument("--multiple", type=int, default=32, help="hidden sizes are multiples of this")
    p.add_argument("--limit", type=int, default=None, help="held-out windows (default: all)")
    p.add_argument("--seed", type=int, default=0, help="the random channel order")
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="tiny random model and few tokens; writes no results")
    a = p.parse_args()
    t0 = time.time()
    budgets = [float(b) for b in a.budgets.split(",")]
    fractions = tuple(float(f) for f in a.fractions.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        if a.smoke:
            ckpt, seq_len = tiny_checkpoint(Path(tmp), fractions, 16), 64
        else:
            ckpt = api.convert(None, Path(tmp) / "ckpt", hidden_fractions=fractions, hidden_multiple=a.multiple,
                               device=a.device, progress=False)
            seq_len = 1024
        em, tok, _ = api.load(ckpt, a.device)
        shuffled, _, _ = api.load(ckpt, a.device)
        shuffled.permute_hidden_(torch.randperm(em.hidden_size, generator=torch.Generator().manual_seed(a.seed)))
    windows = heldout_windows(tok, seq_len, 2 if a.smoke else a.limit)
    table = cost_table(em, "params")

    def ppl(model, subnet) -> float:
        with model.subnet(subnet):
            return perplexity(model, windows, batch_size=4, progress=False)

    full_ppl = ppl(em, None)
    rows = []
    for budget in budgets:
        for sub in sorted(uniform_candidates(em, table, budget * table.full),
                          key=lambda s: (-(s.hidden or em.hidden_size), -s.mlp[0])):
            rows.append({"budget": budget, "hidden": sub.hidden or em.hidden_size, "subnet": sub.to_dict(),
                         "params_fraction": table(sub) / table.full, "ppl": ppl(em, sub)})
            print(rows[-1], flush=True)
    best, per_size = {}, {}
    for r in rows:
        kind = "width only" if r["hidden"] == em.hidden_size else "hidden + width"
        for key, into in (((r["budget"], kind), best), ((r["budget"], r["hidden"]), per_size)):
            if key not in into or r["ppl"] < into[key]["ppl"]:
                into[key] = r
    for r in per_size.values():  # the random channel order, at each smaller size's best sub-network
        if r["hidden"] != em.hidden_size:
            r["random_channels_ppl"] = ppl(shuffled, Subnet(**r["subnet"]))
            print(r, flush=True)
    data = {"command": command_line("hidden.py", p, a), "device": a.device,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "seconds": round(time.time() - t0), "hidden_sizes": em.space.hidden, "tokens": int(windows[:, 1:].numel()),
            "full_ppl": full_ppl, "params_full": table.full, "rows": rows}

    lines = [
        "## Hidden size: prune only, importance vs random channels, hidden + width vs width only",
        "",
        f"`{data['command']}` — SmolLM2-135M-Instruct (packaged), hidden sizes {em.space.hidden}, "
        f"{data['tokens']:,} held-out tokens, fp32, {a.device}, {data['seconds']} s. Budgets are fractions of all "
        f"{table.full / 1e6:.1f} M parameters (the tied embedding / LM head included). Full model: perplexity "
        f"**{full_ppl:.2f}**. Every maximal uniform sub-network within each budget:",
        "",
        "| budget | hidden size | MLP width, KV groups | params | ppl (importance-ordered channels) | "
        "ppl (random channel order) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["subnet"]
        rnd = f"{r['random_channels_ppl']:.2f}" if "random_channels_ppl" in r else "-"
        lines.append(f"| {r['budget']:.0%} | {r['hidden']} | {widths_cell(s['mlp'])}, {widths_cell(s['attn'])} | "
                     f"{r['params_fraction']:.1%} | {r['ppl']:.2f} | {rnd} |")
    lines += ["", "Best per budget:", "", "| budget | width only | hidden + width |", "|---|---|---|"]
    for budget in budgets:
        cells = []
        for kind in ("width only", "hidden + width"):
            r = best.get((budget, kind))
            cells.append("-" if r is None else f"{r['ppl']:.2f} (hidden {r['hidden']}, {r['params_fraction']:.1%})")
        lines.append(f"| {budget:.0%} | {cells[0]} | {cells[1]} |")
    lines += ["", "![hidden size, prune only](img/hidden_prune.png)"]
    if not a.smoke:
        series = {}
        for r in rows:
            series.setdefault(f"hidden {r['hidden']}", ([], []))
            series[f"hidden {r['hidden']}"][0].append(r["params_fraction"])
            series[f"hidden {r['hidden']}"][1].append(r["ppl"])
        plot_ppl_vs_size(series, IMG_DIR / "hidden_prune.png", "Prune-only uniform sub-networks of SmolLM2-135M",
                         full_ppl)
    publish("hidden_prune", "hidden-prune", data, lines, a.smoke)


if __name__ == "__main__":
    main()
