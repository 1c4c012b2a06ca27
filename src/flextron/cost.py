"""Cost of a sub-network: cost = constant + sum over layers of its MLP and attention choice.

One `CostTable` per metric holds those terms, whether analytic (counted from the elastic
projections themselves, so every family follows one rule) or measured (the latency lookup
table of `flextron.latency`). Routers read the same tables as tensors for expected costs.

- params: non-embedding parameters in use;
- flops: per token = 2 x matmul weights in use (lm_head included, biases and norms left out)
  + 4 x active query heads x head_dim x context (QK^T and AV for a token attending to
  `context` positions);
- kv_bytes: KV-cache bytes per token; decode_bytes: weight bytes read per decoded token;
- latency_ms / prefill_ms: measured decode (per token) / prefill latency.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from flextron.config import KINDS, Budget, ElasticSpace, Subnet
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError

ANALYTIC = ("params", "flops", "kv_bytes", "decode_bytes")
MEASURED = ("latency_ms", "prefill_ms")


@dataclass(frozen=True)
class CostTable:
    """cost(subnet) = const + sum_l mlp[l][choice index] + attn[l][choice index], for one metric."""

    metric: str
    const: float
    mlp: list[list[float]]
    attn: list[list[float]]

    def __call__(self, space: ElasticSpace, subnet: Subnet) -> float:
        total = self.const
        for i, (w, a) in enumerate(zip(subnet.mlp, subnet.attn)):
            total += self.mlp[i][space.mlp[i].index(w)] + self.attn[i][space.attn[i].index(a)]
        return total

    def tensors(self) -> tuple[Tensor, Tensor]:
        """[L, K] tables, padded with +inf where a layer has fewer choices (for routers)."""
        def pad(rows: list[list[float]]) -> Tensor:
            k = max(len(r) for r in rows)
            return torch.tensor([r + [float("inf")] * (k - len(r)) for r in rows], dtype=torch.float64)

        return pad(self.mlp), pad(self.attn)


def _embedding_params(model: nn.Module) -> int:
    seen = {id(p): p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out = model.get_output_embeddings()
    if out is not None:
        seen[id(out.weight)] = out.weight
    return sum(p.numel() for p in seen.values())


def _head_weights(em: ElasticModel) -> int:
    head = em.model.get_output_embeddings()
    return head.weight.numel() if head is not None else 0


def cost_table(em: ElasticModel, metric: str, context: int = 1024, kv_dtype_bytes: int = 2,
               weight_dtype_bytes: int = 2) -> CostTable:
    """The analytic table of `metric`; measured metrics come from `flextron.latency`."""
    if metric in MEASURED:
        from flextron.latency import latency_table  # a measured table lives beside the checkpoint

        return latency_table(em, metric)
    if metric not in ANALYTIC:
        raise FlextronError(f"unknown cost metric {metric!r}; use one of {', '.join(ANALYTIC + MEASURED)}")
    mlp, attn = [], []
    for b, wm, wa in zip(em.blocks, em.space.mlp, em.space.attn):
        g = b.geometry
        if metric == "params":
            mlp.append([b.mlp.n_params(c) for c in wm])
            attn.append([b.attn.n_params(c) for c in wa])
        elif metric in ("flops", "decode_bytes"):
            scale = 2 if metric == "flops" else weight_dtype_bytes
            bias = metric == "decode_bytes"
            mlp.append([scale * b.mlp.n_params(c, bias=bias) for c in wm])
            attn.append([scale * b.attn.n_params(c, bias=bias)
                         + (4 * c * g.heads_per_unit * g.head_dim * context if metric == "flops" else 0)
                         for c in wa])
        else:  # kv_bytes: one KV head per unit, keys and values
            mlp.append([0] * len(wm))
            attn.append([2 * c * g.head_dim * kv_dtype_bytes for c in wa])
    total = sum(p.numel() for p in em.model.parameters())
    elastic_full = sum(b.mlp.n_params(b.mlp.n_units) + b.attn.n_params(b.attn.n_units) for b in em.blocks)
    fixed_nonembed = total - elastic_full - _embedding_params(em.model)
    const = {
        "params": fixed_nonembed,
        "flops": 2 * _head_weights(em),
        "kv_bytes": 0,
        # Every non-embedding weight is read once per token, the output head included.
        "decode_bytes": weight_dtype_bytes * (fixed_nonembed + _head_weights(em)),
    }[metric]
    return CostTable(metric, float(const), mlp, attn)


@dataclass(frozen=True)
class Cost:
    params: int
    params_nonembed: int
    flops_per_token: int
    kv_bytes_per_token: int
    decode_bytes_per_token: int

    def to_dict(self) -> dict:
        return asdict(self)


def subnet_cost(em: ElasticModel, subnet: Subnet | None = None, context: int = 1024,
                kv_dtype_bytes: int = 2, weight_dtype_bytes: int = 2) -> Cost:
    """All analytic costs of `subnet` (the full model when None)."""
    subnet = subnet or em.space.full()
    em.space.validate(subnet)
    value = {m: int(cost_table(em, m, context, kv_dtype_bytes, weight_dtype_bytes)(em.space, subnet))
             for m in ANALYTIC}
    return Cost(
        params=value["params"] + _embedding_params(em.model),
        params_nonembed=value["params"],
        flops_per_token=value["flops"],
        kv_bytes_per_token=value["kv_bytes"],
        decode_bytes_per_token=value["decode_bytes"],
    )


def budget_metric(em: ElasticModel, budget: Budget) -> str:
    """The metric a budget refers to: its own; for `auto`, the routers' metric where routers were
    trained, else decode latency where measured, else params."""
    if budget.metric != "auto":
        return budget.metric
    if em.routers is not None:
        return em.routers.metric
    from flextron.latency import has_latency_table

    return "latency_ms" if has_latency_table(em) else "params"


def smallest_fraction(em: ElasticModel, metric: str) -> float:
    """The smallest sub-network's cost as a fraction of the full model's, in `metric` ("auto" allowed)."""
    table = cost_table(em, budget_metric(em, Budget(metric=metric, fraction=1.0)))
    return table(em.space, em.space.smallest()) / table(em.space, em.space.full())


def budget_grid(em: ElasticModel, metric: str = "auto", points: int = 5) -> tuple[float, ...]:
    """`points` budgets from the smallest feasible fraction (rounded up to 5%) to 1.0: how low a
    latency budget can go depends on the machine."""
    # Timing noise can put the smallest sub-network above the full one: cap at 1.
    lowest = min(1.0, math.ceil(smallest_fraction(em, metric) * 20) / 20)
    return tuple(sorted({round(lowest + (1 - lowest) * i / (points - 1), 2) for i in range(points)}))


def budget_target(em: ElasticModel, budget: Budget) -> tuple[CostTable, float]:
    """The cost table of the budget's metric and the target value, checked against what is feasible."""
    table = cost_table(em, budget_metric(em, budget))
    full, smallest = table(em.space, em.space.full()), table(em.space, em.space.smallest())
    target = budget.fraction * full if budget.fraction is not None else budget.value
    if target < smallest * (1 - 1e-9):
        raise FlextronError(
            f"budget {budget} is below the smallest sub-network ({smallest / full:.1%} of the full model's "
            f"{table.metric}, {smallest:.4g}); choose a budget between {smallest / full:.2f} and 1.0"
        )
    return table, target


def uniform_subnet_for(em: ElasticModel, budget: Budget) -> tuple[Subnet, float]:
    """The largest uniform sub-network within the budget: the same width index in every layer and,
    in a depth space, the first layers of each kind's skip order skipped (`ElasticSpace.uniform`)."""
    table, target = budget_target(em, budget)
    space, n = em.space, em.space.n_layers
    skips = range(n - space.min_layers + 1) if space.depth else range(1)
    # The cost separates into an MLP part and an attention part: enumerate each kind alone.
    parts: dict[str, dict[tuple[int, ...], float]] = {}
    for kind in KINDS:
        rows, lists = getattr(table, kind), getattr(space, kind)
        parts[kind] = {}
        for i in range(max(len(space.widths(kind, layer)) for layer in range(n))):
            for skip in skips:
                chosen = getattr(space.uniform(i, i, skip, skip), kind)
                parts[kind][tuple(chosen)] = sum(rows[layer][lists[layer].index(c)] for layer, c in enumerate(chosen))
    best: tuple[float, Subnet] | None = None
    for mlp, cost_mlp in parts["mlp"].items():
        for attn, cost_attn in parts["attn"].items():
            value = table.const + cost_mlp + cost_attn
            if value <= target * (1 + 1e-9) and (best is None or value > best[0]):
                best = (value, Subnet(mlp=list(mlp), attn=list(attn)))
    if best is None:  # a per-layer space whose smallest uniform choice is above the smallest mix
        raise FlextronError(f"no uniform sub-network fits budget {budget}; train routers (flextron route)")
    return best[1], best[0]
