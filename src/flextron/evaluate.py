"""Held-out perplexity and task scores of the sub-networks that budgets select, as typed rows; the plot."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from flextron.adaptive import AdaptiveLM, AdaptiveRouting
from flextron.budgets import budget_target, select_subnet, uniform_subnet_for
from flextron.config import Budget, Subnet
from flextron.cost import subnet_cost
from flextron.elastic import ElasticModel
from flextron.fsutil import atomic_write
from flextron.precision import autocast
from flextron.routers import decode

_SUBNETS = ("subnet", "uniform_subnet", "static_subnet")


@dataclass
class EvalRow:
    """One budget's result: of `eval_at_budgets`, `adaptive_at_budgets` or `router_report`.

    `budget` is the `Budget` the row answers; its `str` is the label every table prints (50%,
    params=8e+07). Rows with a `metric` (adaptive routing, the router report) hold a fraction of
    the full cost in that metric, the routers'. Fields that do not apply stay None. `to_dict` is
    the JSON every run file holds: unset fields left out, the budget a number where `metric` is
    set and its label elsewhere.
    """

    budget: Budget
    metric: str | None = None
    adaptive: bool = False
    subnet: Subnet | None = None
    cost: dict | None = None  # `Cost.to_dict()`
    params_fraction: float | None = None  # non-embedding parameters / the full model's
    raw_cost_ratio: float | None = None  # the router's argmax before projection: cost / target
    cost_ratio: float | None = None  # realised cost / target
    fraction_of_full: float | None = None  # cost / full cost, in `metric`
    uniform_subnet: Subnet | None = None  # the largest uniform sub-network within the budget
    uniform_fraction_of_full: float | None = None
    ppl: float | None = None
    tokens: int | None = None  # the tokens `ppl` scored
    tasks: dict[str, dict] | None = None  # per task, its scores (`flextron.tasks.score_task`)
    uniform_ppl: float | None = None
    realised_fraction: float | None = None  # adaptive: the average realised cost / full cost
    kept: str | None = None  # what the check on held-out training rows kept (router, uniform, lower budget;
    # adaptive: adaptive or static)
    calib_ppl: dict[str, float] | None = None  # that check's perplexity per candidate
    static_ppl: float | None = None  # adaptive: the static router at the realised cost
    static_fraction_of_full: float | None = None
    static_subnet: Subnet | None = None

    def to_dict(self) -> dict:
        out = {f.name: v.to_dict() if isinstance(v, Subnet) else v for f in fields(self)
               if (v := getattr(self, f.name)) is not None and v is not False}
        out["budget"] = self.budget.fraction if self.metric is not None else str(self.budget)
        if self.adaptive:  # adaptive rows have always ended with the cost ratio and the static router
            for key in ("cost_ratio", "static_ppl", "static_fraction_of_full", "static_subnet"):
                if key in out:
                    out[key] = out.pop(key)
        return out

    @classmethod
    def from_dict(cls, row: dict) -> EvalRow:
        """A row as `to_dict` wrote it (every run file so far)."""
        b = row["budget"]
        budget = Budget.parse(b) if isinstance(b, str) else Budget(fraction=float(b))
        return cls(**{**row, "budget": budget, **{k: Subnet(**row[k]) for k in _SUBNETS if k in row}})


def rows_json(data: object) -> str:
    """`data` as indented JSON, its `EvalRow`s as `to_dict` writes them."""
    def encode(x: object) -> dict:
        if isinstance(x, EvalRow):
            return x.to_dict()
        raise TypeError(f"{type(x).__name__} is not JSON serializable")

    return json.dumps(data, indent=1, default=encode)


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


def _sized_row(em: ElasticModel, budget: Budget, subnet: Subnet, params_full: float, **more: Any) -> EvalRow:
    """A row for `subnet` with its cost and its share of the full model's non-embedding parameters."""
    cost = subnet_cost(em, subnet)
    return EvalRow(budget, subnet=subnet, cost=cost.to_dict(), params_fraction=cost.params_nonembed / params_full,
                   **more)


def eval_at_budgets(em: ElasticModel, windows: Tensor | None, budgets: list[Budget], batch_size: int = 4,
                    autocast_dtype: torch.dtype | None = None, progress: bool = True,
                    tasks: Callable[[nn.Module], dict] | None = None) -> list[EvalRow]:
    """Per budget, the sub-network it selects (router, else largest uniform), its cost, held-out
    perplexity on `windows` (unless None) and `tasks(model)` (unless None)."""
    full = subnet_cost(em).params_nonembed
    rows = []
    for budget in budgets:
        subnet = select_subnet(em, budget)
        row = _sized_row(em, budget, subnet, full)
        with em.subnet(subnet):
            if windows is not None:
                row.ppl = perplexity(em, windows, batch_size, autocast_dtype, progress, desc=f"ppl @ {budget}")
                row.tokens = int(windows[:, 1:].numel())
            if tasks is not None:
                row.tasks = tasks(em)
        rows.append(row)
    return rows


def adaptive_at_budgets(em: ElasticModel, windows: Tensor | None, budgets: list[Budget], batch_size: int = 4,
                        autocast_dtype: torch.dtype | None = None, progress: bool = True,
                        tasks: Callable[[nn.Module], dict] | None = None) -> list[EvalRow]:
    """Per budget (in the routers' metric), input-adaptive routing: each sequence a request, each
    token its MLP width. Rows hold the budget as a fraction, the realised average cost / full cost,
    perplexity and tasks."""
    routing = AdaptiveRouting.for_model(em)
    fractions = [routing.fraction(b) for b in budgets]
    rows = []
    with routing.attached():
        for fraction in fractions:
            lm = AdaptiveLM(routing, fraction)
            row = EvalRow(Budget(fraction=fraction), metric=em.routers.metric, adaptive=True)
            if windows is not None:
                row.ppl = perplexity(lm, windows, batch_size, autocast_dtype, progress,
                                     desc=f"adaptive @ {fraction:.0%}")
            if tasks is not None:
                row.tasks = tasks(lm)
            row.realised_fraction = sum(lm.costs) / max(len(lm.costs), 1)
            row.cost_ratio = row.realised_fraction / fraction
            rows.append(row)
    return rows


@torch.no_grad()
def router_report(em: ElasticModel, windows: Tensor, fractions: list[float], batch_size: int = 4,
                  autocast_dtype: torch.dtype | None = None, progress: bool = True, uniform: bool = True
                  ) -> list[EvalRow]:
    """Per budget: the routed sub-network (raw argmax and projected), its realised cost in the
    routers' metric and its parameters, its held-out perplexity, and (if `uniform`) the same for the
    largest uniform sub-network (not evaluated twice where it is the routed one)."""
    params_full = subnet_cost(em).params_nonembed
    rows = []
    for fraction in fractions:
        budget = Budget(fraction=fraction)
        table, target = budget_target(em, budget)
        full = table.full
        mlp, attn = em.routers.static(fraction)
        raw = decode(em.space, mlp, attn)
        routed = select_subnet(em, budget)
        row = _sized_row(em, budget, routed, params_full, metric=table.metric,
                         raw_cost_ratio=table(em.space, raw) / target, cost_ratio=table(em.space, routed) / target,
                         fraction_of_full=table(em.space, routed) / full, tokens=int(windows[:, 1:].numel()))
        with em.subnet(routed):
            row.ppl = perplexity(em, windows, batch_size, autocast_dtype, progress, desc=f"ppl @ {fraction:.0%}")
        if uniform:
            sub, _ = uniform_subnet_for(em, budget)
            row.uniform_subnet, row.uniform_fraction_of_full = sub, table(em.space, sub) / full
            if sub == routed:
                row.uniform_ppl = row.ppl
            else:
                with em.subnet(sub):
                    row.uniform_ppl = perplexity(em, windows, batch_size, autocast_dtype, progress,
                                                 desc=f"uniform_ppl @ {fraction:.0%}")
        rows.append(row)
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
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120))  # never through a symlink, FIFO or device
    plt.close(fig)
    return out
