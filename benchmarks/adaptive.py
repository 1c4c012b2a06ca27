"""Input-adaptive Flextron on the packaged SmolLM2-135M:

1. speed: one layer's MLP over a batch of tokens, routed per token (grouped execution) at 50%
   average MLP cost vs the full MLP, fp32 and bf16 (median of repeats, side by side);
2. quality: adaptive routers trained on a checkpoint that has static routers; held-out
   perplexity of adaptive routing vs the static router at the same realised average cost;
3. the widths the routers pick, per layer and per kind of token (a plot).

    python benchmarks/adaptive.py --ckpt ROUTED_CKPT [--steps 150] [--device cpu|cuda]

ROUTED_CKPT is an elastic checkpoint with static routers (e.g. benchmarks/routers.py's output).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import string
import time
from dataclasses import replace
from pathlib import Path

import torch

from _results import IMG_DIR, command_line, update_section, write_json
from flextron import api
from flextron.adaptive import AdaptiveRouting, grouped_forward
from flextron.data import heldout_windows
from flextron.precision import autocast

FUNCTION_WORDS = set("the a an of to and in that it is was he she his her i you for with as on at by but not had be "
                     "have they we this from or which were all one there their so".split())


def time_it(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def mlp_speed(routing: AdaptiveRouting, tokens: int, repeats: int, device: str) -> dict:
    """One layer's MLP over `tokens` tokens: full width vs routed at 50% average width (half the
    tokens at the width nearest 25%, half at the one nearest 75%; the token router runs on every
    token, grouped execution) vs the whole batch hard-sliced to 50% (the ideal)."""
    em = routing.em
    layer = len(em.blocks) // 2
    part, choices = em.blocks[layer].mlp, em.space.mlp[layer]
    module, full_w = part.module, part.n_units
    x = torch.randn(tokens, em.config.hidden_size, device=device)
    lo, hi = (min(choices, key=lambda c, f=f: abs(c - f * full_w)) for f in (0.25, 0.75))
    choice = torch.where(torch.arange(tokens, device=device) % 2 == 0, choices.index(lo), choices.index(hi))
    budget = routing.routers.budget(0.5)

    def full() -> None:
        type(module).forward(module, x)

    def sliced() -> None:
        part.set_hard(full_w // 2)
        type(module).forward(module, x)
        part.set_hard(full_w)

    def routed() -> None:
        routing.routers.token_logits(layer, x, budget)  # its cost counts; its choice is fixed
        grouped_forward(part, module, choices, x, choice)

    results = {"layer": layer, "tokens": tokens, "widths": [lo, hi], "mean_width_fraction": (lo + hi) / 2 / full_w}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with autocast(torch.device(device), dtype):
            t_full, t_sliced, t_routed = (time_it(f, repeats) for f in (full, sliced, routed))
        results[name] = {"full_ms": 1e3 * t_full, "sliced_50_ms": 1e3 * t_sliced, "routed_ms": 1e3 * t_routed,
                         "routed_speedup": t_full / t_routed, "sliced_speedup": t_full / t_sliced}
    return results


def token_kind(piece: str) -> str:
    word = piece.strip().lower()
    if not word:
        return "whitespace"
    if all(c in string.punctuation for c in word):
        return "punctuation"
    if word.isdigit():
        return "number"
    return "function word" if word in FUNCTION_WORDS else "content word"


@torch.inference_mode()
def widths_by_kind(routing: AdaptiveRouting, tok, windows: torch.Tensor, fraction: float) -> dict:
    """Mean routed MLP width (fraction of the layer's) per layer and per kind of token."""
    em = routing.em
    kinds = [token_kind(tok.decode([int(t)])) for t in windows.flatten()]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for w in range(len(windows)):
        routing.start(fraction, windows[w : w + 1].to(em.model.device))
        em(input_ids=windows[w : w + 1], use_cache=False)
        widths = torch.stack([torch.tensor(em.space.mlp[i], dtype=torch.float)[c.cpu()] / em.space.mlp[i][-1]
                              for i, c in enumerate(routing.token_choices)])  # [L, T]
        for t, kind in enumerate(kinds[w * windows.shape[1] : (w + 1) * windows.shape[1]]):
            sums[kind] = sums.get(kind, torch.zeros(len(em.blocks))) + widths[:, t]
            counts[kind] = counts.get(kind, 0) + 1
    return {k: {"tokens": counts[k], "mean_width": (sums[k] / counts[k]).tolist()} for k in sorted(counts)}


def plot_widths(by_kind: dict, fraction: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, v in by_kind.items():
        ax.plot(range(len(v["mean_width"])), v["mean_width"], marker="o", ms=3, label=f"{kind} ({v['tokens']})")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean routed MLP width (fraction)")
    ax.set_title(f"Per-token MLP widths at a {fraction:.0%} budget, by kind of token")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="elastic checkpoint with static routers")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--joint-steps", type=int, default=10)
    p.add_argument("--eval-limit", type=int, default=16)
    p.add_argument("--balance-weight", type=float, default=0.01)
    p.add_argument("--router-lr", type=float, default=None,
                   help="adaptive routers' learning rate (default: the static routers')")
    p.add_argument("--check-sequences", type=int, default=16,
                   help="held-out rows adaptive routing is checked on against static (0: off)")
    p.add_argument("--tokens", type=int, default=4096, help="MLP speed test batch (tokens)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="/tmp/flextron-adaptive")
    p.add_argument("--name", default="adaptive", help="results JSON, docs/results.md section and plot name")
    a = p.parse_args()
    t0 = time.time()
    work = Path(a.work)
    base = work / "base"
    if base.exists():
        shutil.rmtree(base)
    shutil.copytree(a.ckpt, base)
    em, _, _ = api.load(base, a.device)
    cfg = replace(em.routers.config, steps=a.steps, joint_steps=a.joint_steps, eval_limit=a.eval_limit,
                  balance_weight=a.balance_weight, router_lr=a.router_lr or em.routers.config.router_lr,
                  check_sequences=a.check_sequences)
    result = api.route(base, cfg, adaptive=True, device=a.device)
    em, tok, _ = api.load(base, a.device)
    mid = sorted(cfg.budgets)[len(cfg.budgets) // 2]
    with AdaptiveRouting.for_model(em).attached() as routing:
        speed = mlp_speed(routing, a.tokens, a.repeats, a.device)
        by_kind = widths_by_kind(routing, tok, heldout_windows(tok, 256, 4), mid)
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    plot_widths(by_kind, mid, IMG_DIR / f"{a.name}-widths.png")
    log = [r for r in result["log"] if r["stage"] in ("router", "joint")]
    data = {"command": command_line("adaptive.py", p, a), "name": a.name,
            "balance": {"first_20": statistics.mean(r["balance"] for r in log[:20]),
                        "last_20": statistics.mean(r["balance"] for r in log[-20:])},
            "device": a.device, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "metric": result["metric"], "rows": [r.to_dict() for r in result["budgets"]], "mlp_speed": speed,
            "widths_by_kind": by_kind,
            "widths_budget": mid, "check_sequences": cfg.check_sequences,
            "check": [r for r in result["log"] if r["stage"] == "check"],
            "total_seconds": round(time.time() - t0),
            "train_seconds": next(r for r in reversed(result["log"]) if "elapsed_s" in r)["elapsed_s"]}
    write_json(a.name, data)
    report(data)


def report(data: dict) -> None:
    sp = data["mlp_speed"]
    lines = [
        "## Input-adaptive routing (adaptive vs static)",
        "",
        f"`{data['command']}` — {data['cpu']}, torch {data['torch']}; {data['total_seconds'] / 60:.0f} min in all. "
        f"Budgets in {data['metric']}. Adaptive: each token picks its MLP width, each request (held-out window) "
        "its attention widths; static: the static router's sub-network at the *realised* average cost of the "
        "adaptive routing, so both columns cost the same. Kept: what the check on held-out training rows "
        "kept at each grid budget (adaptive routing, or the static router's sub-network served instead); "
        "a budget between grid budgets routes as the grid budget below it.",
        "",
        "| budget | adaptive realised cost | cost/target | adaptive ppl | static ppl (same cost) | kept |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['budget']:.0%} | {r['realised_fraction']:.1%} | {r['cost_ratio']:.3f} | {r['ppl']:.2f} | "
                     f"{r['static_ppl']:.2f} | {r.get('kept', '-')} |")
    if data.get("check"):
        lines += ["", f"The check, on {data['check_sequences']} held-out training rows: perplexity of adaptive "
                  "routing vs the static sub-network per grid budget (realised cost):",
                  "", "| budget | adaptive | static | kept |", "|---|---|---|---|"]
        lines += [f"| {c['budget']:.0%} | {c['calib_ppl']['adaptive']:.2f} ({c['realised']['adaptive']:.1%}) | "
                  f"{c['calib_ppl']['static']:.2f} ({c['realised']['static']:.1%}) | {c['kept']} |"
                  for c in data["check"]]
    if "balance" in data:
        lines += ["", f"Token-router balance (1 = even use of a layer's widths, 4 = every token on one width), mean "
                  f"over layers: first 20 steps {data['balance']['first_20']:.2f}, last 20 "
                  f"{data['balance']['last_20']:.2f}."]
    lines += [
        "",
        f"MLP speed (layer {sp['layer']}, {sp['tokens']} tokens; routed = half the tokens at width "
        f"{sp['widths'][0]}, half at {sp['widths'][1]}, mean {sp['mean_width_fraction']:.0%} of the full width, "
        "token router included, grouped execution):",
        "",
        "| dtype | full MLP | routed (50% avg) | speed-up | whole batch sliced to 50% | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for dt in ("fp32", "bf16"):
        s = sp[dt]
        lines.append(f"| {dt} | {s['full_ms']:.2f} ms | {s['routed_ms']:.2f} ms | {s['routed_speedup']:.2f}x | "
                     f"{s['sliced_50_ms']:.2f} ms | {s['sliced_speedup']:.2f}x |")
    lines += ["", f"Routed MLP widths per layer and kind of token at the {data['widths_budget']:.0%} budget:", "",
              f"![adaptive widths](img/{data['name']}-widths.png)"]
    update_section(data["name"], "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
