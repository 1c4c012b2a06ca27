"""Held-out perplexity and task scores of the sub-networks that budgets select; the plot."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from flextron.adaptive import AdaptiveLM, AdaptiveRouting
from flextron.config import Budget
from flextron.cost import budget_target, subnet_cost, uniform_subnet_for
from flextron.elastic import ElasticModel
from flextron.precision import autocast
from flextron.routers import decode, select_subnet


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 8,
               autocast_dtype: torch.dtype | None = None, progress: bool = True,
               desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over all windows [N, T]; each window scored independently."""
    device = next(model.parameters()).device
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        with autocast(device, autocast_dtype):
            logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def eval_at_budgets(em: ElasticModel, windows: Tensor | None, budgets: list[Budget], batch_size: int = 4,
                    autocast_dtype: torch.dtype | None = None, progress: bool = True,
                    tasks: Callable[[nn.Module], dict] | None = None) -> list[dict]:
    """Per budget, the sub-network it selects (router, else largest uniform), its cost, held-out
    perplexity on `windows` (unless None) and `tasks(model)` (unless None)."""
    full = subnet_cost(em).params_nonembed
    rows = []
    for budget in budgets:
        subnet = select_subnet(em, budget)
        cost = subnet_cost(em, subnet)
        em.set_subnet(subnet)
        row = {"budget": str(budget), "subnet": subnet.to_dict(), "cost": cost.to_dict(),
               "params_fraction": cost.params_nonembed / full}
        if windows is not None:
            row["ppl"] = perplexity(em, windows, batch_size, autocast_dtype, progress, desc=f"ppl @ {budget}")
            row["tokens"] = int(windows[:, 1:].numel())
        if tasks is not None:
            row["tasks"] = tasks(em)
        rows.append(row)
    em.set_subnet(None)
    return rows


def adaptive_at_budgets(em: ElasticModel, windows: Tensor | None, budgets: list[Budget], batch_size: int = 4,
                        autocast_dtype: torch.dtype | None = None, progress: bool = True,
                        tasks: Callable[[nn.Module], dict] | None = None) -> list[dict]:
    """Per budget (in the routers' metric), input-adaptive routing: each sequence a request, each
    token its MLP width. Rows hold the budget as a fraction, the realised average cost / full cost,
    perplexity and tasks."""
    routing = AdaptiveRouting.for_model(em)
    fractions = [routing.fraction(b) for b in budgets]
    routing.attach()
    rows = []
    try:
        for fraction in fractions:
            lm = AdaptiveLM(routing, fraction)
            row = {"budget": fraction, "metric": em.routers.metric, "adaptive": True}
            if windows is not None:
                row["ppl"] = perplexity(lm, windows, batch_size, autocast_dtype, progress,
                                        desc=f"adaptive @ {fraction:.0%}")
            if tasks is not None:
                row["tasks"] = tasks(lm)
            row["realised_fraction"] = sum(lm.costs) / max(len(lm.costs), 1)
            row["cost_ratio"] = row["realised_fraction"] / fraction
            rows.append(row)
    finally:
        routing.detach()
    return rows


@torch.no_grad()
def router_report(em: ElasticModel, windows: Tensor, fractions: list[float], batch_size: int = 4,
                  autocast_dtype: torch.dtype | None = None, progress: bool = True, uniform: bool = True
                  ) -> list[dict]:
    """Per budget: the routed sub-network (raw argmax and projected) and its realised cost in the
    routers' metric, its held-out perplexity, and (if `uniform`) the same for the largest uniform
    sub-network."""
    rows = []
    for fraction in fractions:
        budget = Budget(fraction=fraction)
        table, target = budget_target(em, budget)
        full = table(em.space, em.space.full())
        mlp, attn = em.routers.static(fraction)
        raw = decode(em.space, mlp, attn)
        routed = select_subnet(em, budget)
        row = {"budget": fraction, "metric": table.metric, "subnet": routed.to_dict(),
               "raw_cost_ratio": table(em.space, raw) / target, "cost_ratio": table(em.space, routed) / target,
               "fraction_of_full": table(em.space, routed) / full}
        evaluated = [("ppl", routed)]
        if uniform:
            sub, _ = uniform_subnet_for(em, budget)
            row |= {"uniform_subnet": sub.to_dict(), "uniform_fraction_of_full": table(em.space, sub) / full}
            evaluated.append(("uniform_ppl", sub))
        for key, sub in evaluated:
            em.set_subnet(sub)
            row[key] = perplexity(em, windows, batch_size, autocast_dtype, progress, desc=f"{key} @ {fraction:.0%}")
        rows.append(row)
    em.set_subnet(None)
    return rows


def plot_ppl_vs_size(series: dict[str, tuple[list[float], list[float]]], out: Path, title: str,
                     original: float | None = None, points: dict[str, tuple[list[float], list[float]]] | None = None,
                     xlabel: str = "fraction of non-embedding parameters") -> Path:
    """Held-out perplexity (log scale) against model size (a fraction of the full model), as a PNG.

    `series` are drawn as lines, `points` as separate markers; `original` as a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (label, (xs, ys)), marker in zip(series.items(), "osD^v"):
        ax.plot(xs, ys, marker=marker, label=label)
    for label, (xs, ys) in (points or {}).items():
        ax.scatter(xs, ys, marker="*", s=150, color="k", label=label, zorder=5)
    if original is not None:
        ax.axhline(original, color="gray", ls="--", label="original")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
