"""Budgets: which metric a budget is in, its cost table and target, and the sub-network it selects.

A budget (`0.5`, `latency_ms=25`, `memory_mb=60`, ...) resolves in one place: `budget_metric` (an `auto` budget
follows the routers, else a measured latency table, else params), `cost_table`, `budget_target`
(checked against the smallest sub-network), then `select_subnet`: what the check against uniform
kept at the largest checked budget within the target (the static router's choice projected onto
it where the routers carry no checks), or without routers the largest uniform sub-network within it
(in a space with hidden sizes, at any of them: a small budget may only be met at a smaller hidden size).
`AdaptiveRouting.fraction` reads budgets through `budget_target` too. A memory budget is priced at
the model's deployment (`em.deployment`, from the command's --weight-type / --outtype, --context,
--batch, --kv-type); routers of another metric serve it as any budget in another metric.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from flextron.cost import MEASURED, CostTable, analytic_table, fits
from flextron.deployment import Deployment
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.routers import decode, project
from flextron.space import KINDS, Budget, ElasticSpace, Subnet


def budget_metric(em: ElasticModel, budget: Budget) -> str:
    """The metric a budget refers to: its own; for `auto`, the routers' metric where routers were
    trained, else decode latency where measured, else params."""
    if budget.metric != "auto":
        return budget.metric
    if em.routers is not None:
        return em.routers.metric
    return "latency_ms" if em.latency is not None else "params"


def cost_table(em: ElasticModel, metric: str) -> CostTable:
    """The table of `metric`: measured (the checkpoint's latency table) or analytic."""
    if metric not in MEASURED:
        return analytic_table(em, metric)
    if em.latency is None:
        raise FlextronError(f"budget metric {metric} needs a latency table; run `flextron profile CKPT` first")
    return em.latency.table(metric)


def smallest_fraction(em: ElasticModel, metric: str) -> float:
    """The smallest sub-network's cost (smallest hidden size included) as a fraction of the full model's,
    in `metric` ("auto" allowed)."""
    table = cost_table(em, budget_metric(em, Budget(metric=metric, fraction=1.0)))
    return table.smallest / table.full


def budget_grid(em: ElasticModel, metric: str = "auto", points: int = 5) -> tuple[float, ...]:
    """`points` budgets from the smallest feasible fraction (rounded up to 5%) to 1.0: how low a
    latency budget can go depends on the machine."""
    # Timing noise can put the smallest sub-network above the full one: cap at 1.
    lowest = min(1.0, math.ceil(smallest_fraction(em, metric) * 20) / 20)
    return tuple(sorted({round(lowest + (1 - lowest) * i / (points - 1), 2) for i in range(points)}))


def budget_target(em: ElasticModel, budget: Budget) -> tuple[CostTable, float]:
    """The cost table of the budget's metric and the target value, checked against what is feasible."""
    table = cost_table(em, budget_metric(em, budget))
    full, smallest = table.full, table.smallest
    target = budget.fraction * full if budget.fraction is not None else budget.value
    if not fits(smallest, target):
        at = f" at {em.deployment or Deployment()}" if table.metric == "memory_mb" else ""
        least = f" (or {table.metric}={smallest:.4g} or more)" if budget.value is not None else ""
        raise FlextronError(
            f"budget {budget} is below the smallest sub-network ({smallest / full:.1%} of the full model's "
            f"{table.metric}{at}, {smallest:.4g}); choose a budget between {smallest / full:.2f} and 1.0{least}"
        )
    return table, target


def _uniform_parts(space: ElasticSpace, table: CostTable) -> dict[str, dict[tuple[int, ...], float]]:
    """Per kind, every uniform choice of its layers (one width index, in a depth space a skip count)
    and its summed terms in `table`: the cost separates into an MLP part and an attention part."""
    n = space.n_layers
    skips = range(n - space.min_layers + 1) if space.depth else range(1)
    parts: dict[str, dict[tuple[int, ...], float]] = {}
    for kind in KINDS:
        rows, lists = getattr(table, kind), getattr(space, kind)
        parts[kind] = {}
        for i in range(max(len(space.widths(kind, layer)) for layer in range(n))):
            for skip in skips:
                chosen = getattr(space.uniform(i, i, skip, skip), kind)
                parts[kind][tuple(chosen)] = sum(rows[layer][lists[layer].index(c)] for layer, c in enumerate(chosen))
    return parts


def uniform_subnet_for(em: ElasticModel, budget: Budget) -> tuple[Subnet, float]:
    """The largest uniform sub-network within the budget: the same width index in every layer and,
    in a depth space, the first layers of each kind's skip order skipped (`ElasticSpace.uniform`),
    at each of the space's hidden sizes. Largest: the costliest that fits; among equal costs (a
    fitted latency table may price a width step at 0) the larger hidden size, then the wider MLP,
    then the wider attention wins. One that another fitting sub-network contains (as wide or wider
    everywhere) is never chosen: a cost need not grow with the widths (at a block-quantized memory
    type, a width whose rows are not whole blocks falls back to a larger type than the full width)."""
    table, target = budget_target(em, budget)
    space = em.space
    fitting: list[tuple[tuple[float, int, int, int], Subnet, tuple[int, ...]]] = []
    for h in range(len(space.hidden or [None])):
        at = table.at_hidden(h)
        parts = _uniform_parts(space, at)
        for mlp, cost_mlp in parts["mlp"].items():
            for attn, cost_attn in parts["attn"].items():
                subnet = Subnet(mlp=list(mlp), attn=list(attn), hidden=space.hidden_at(h))
                cost = at.const + cost_mlp + cost_attn if table.stock is None else table(subnet)
                if fits(cost, target):
                    fitting.append(((cost, h, sum(mlp), sum(attn)), subnet, (h, *mlp, *attn)))
    if not fitting:  # a per-layer space whose smallest uniform choice is above the smallest mix
        raise FlextronError(f"no uniform sub-network fits budget {budget}; train routers (flextron route)")
    fitting.sort(key=lambda f: f[0], reverse=True)  # in a monotone table the first is contained by none
    return next((subnet, key[0]) for key, subnet, dims in fitting
                if not any(other != dims and all(o >= d for o, d in zip(other, dims)) for _, _, other in fitting))


def uniform_candidates(em: ElasticModel, table: CostTable, target: float, skip_points: int = 5) -> list[Subnet]:
    """The maximal uniform sub-networks within `target`: every combination of an MLP and an
    attention width index, in a depth space skip counts per kind (`skip_points` counts from 0
    to the most the floor allows) and, in a space with hidden sizes, a hidden size, that fits,
    kept unless a wider index, fewer skips or a larger hidden size also fit.
    Which of them is best is for the loss to say (`flextron.train.routers.warm_start`)."""
    space, n = em.space, em.space.n_layers
    most = n - space.min_layers if space.depth else 0
    skips = sorted({round(most * k / max(1, skip_points - 1)) for k in range(skip_points)})
    sizes = ([max(len(space.widths(kind, layer)) for layer in range(n)) for kind in KINDS] + [len(skips)] * 2
             + [len(space.hidden or [None])])
    within = {}
    for i, j, a, b, h in itertools.product(*(range(k) for k in sizes)):
        subnet = space.uniform(i, j, skips[a], skips[b], hidden_index=h)
        if fits(table(subnet), target):
            within[(i, j, a, b, h)] = subnet
    out: list[Subnet] = []
    for (i, j, a, b, h), subnet in within.items():
        bigger = ((i + 1, j, a, b, h), (i, j + 1, a, b, h), (i, j, a - 1, b, h), (i, j, a, b - 1, h),
                  (i, j, a, b, h + 1))
        if not any(k in within for k in bigger) and subnet not in out:
            out.append(subnet)
    return out


@torch.no_grad()
def select_subnet(em: ElasticModel, budget: Budget) -> Subnet:
    """The sub-network for a budget (what eval, export, generate and serve all run).

    Without routers: the largest uniform sub-network within the budget. With routers that `route`
    checked against uniform (`Routers.checked`, at the grid budgets, `--check-budgets` and one every
    `--check-step` between them): snapped to the largest checked budget at or below this one (at
    least 1 - check_step of it), whose kept sub-network is served
    (the router's projection there, or the uniform or lower budget's sub-network it kept): it fits,
    and it was measured against the largest uniform sub-network within that budget. A budget in
    another metric than the routers' gets the kept sub-network of the largest checked budget that
    fits it in that metric. Below every checked budget, the largest uniform sub-network within it.
    Routers without checks (routed before the check existed, or `--check-sequences 0`): the
    router's choice projected onto the budget in the budget's own metric.

    Why snapping rather than checking an asked budget on first use: a check scores up to three
    sub-networks on held-out windows (SmolLM2-135M, 4 windows, 2 CPU threads: about 80 s), holding
    the model a server's engine decodes with, for every new budget a client names; and its verdict
    would depend on the windows and the device that scored it. Snapped, any budget is answered at
    once from routers.json alone, the same everywhere; the price is the budget between the checked
    one and the asked one left unused, at most `--check-step` of it (checks are cheap: SmolLM2, 8 rows
    of 256 tokens, 2-4 s a candidate)."""
    if em.routers is None:
        return uniform_subnet_for(em, budget)[0]
    table, target = budget_target(em, budget)
    if em.routers.checked is None:
        return _projected(em, table, target)
    same = table.metric == em.routers.metric
    own = table if same else cost_table(em, em.routers.metric)
    for check in em.routers.kept(target / table.full if same else 1.0):
        subnet = _kept_subnet(em, own, check)
        if subnet is not None and fits(table(subnet), target):
            return subnet
    try:  # nothing checked fits (below every checked budget): the baseline itself
        return uniform_subnet_for(em, budget)[0]
    except FlextronError:  # a per-layer space where no uniform sub-network fits either: all there is
        return _projected(em, table, target)


def _projected(em: ElasticModel, table: CostTable, target: float) -> Subnet:
    """The static router's choice projected onto `target` in `table`'s metric."""
    fraction = router_fraction(em, table, target)
    return project(em.space, table, em.routers.static(fraction).map(lambda t: F.log_softmax(t, -1)), target)


def _kept_subnet(em: ElasticModel, table: CostTable, check: dict) -> Subnet | None:
    """The sub-network a check kept at its budget (`table`: the routers' metric): the router's
    projection, or the stored uniform or lower budget's sub-network. Where that no longer fits (the
    table changed since: re-profiled), a kept uniform is the rule, not the shape (None where no
    uniform fits); a lower budget's is served by the check below (None)."""
    target = check["budget"] * table.full
    if check["kept"] == "router":
        return _projected(em, table, target)
    subnet = Subnet(**check["subnet"])
    if fits(table(subnet), target):
        return subnet
    if check["kept"] != "uniform":
        return None
    try:
        return uniform_subnet_for(em, Budget(metric=table.metric, fraction=check["budget"]))[0]
    except FlextronError:  # the re-profiled table puts this budget below the smallest sub-network
        return None


@torch.no_grad()
def router_fraction(em: ElasticModel, table: CostTable, target: float, iters: int = 30) -> float:
    """The budget to ask the router for, as a fraction of the full cost in its own metric.

    A budget in the routers' metric is read as it is. A budget in another metric (say params=50%
    to latency routers) is not a fraction the router knows: take the router's largest budget
    whose choice (argmax) costs at most the target in the requested metric (bisection; the
    router's sub-networks grow with its budget), so projection in that metric starts from
    preferences of the right size."""
    if table.metric == em.routers.metric:
        return target / table.full
    grid = em.routers.static.grid
    lo, hi = grid[0].item(), 1.0

    def chosen_fits(fraction: float) -> bool:
        return fits(table(decode(em.space, em.routers.static(fraction))), target)

    if chosen_fits(hi):
        return hi
    if not chosen_fits(lo):
        return lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chosen_fits(mid) else (lo, mid)
    return lo
