"""Analytic cost of a sub-network: parameters, FLOPs per token, KV-cache bytes per token.

Counted from the elastic projections themselves, so every family is covered by one rule:
cost = fixed part (embeddings, norms, lm_head, position embeddings) + sum over layers of the
active projection weights. FLOPs per token = 2 x matmul weights in use (lm_head included,
biases and norms left out) + 4 x active query heads x head_dim x context (QK^T and AV for
a token that attends to `context` positions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from flextron.config import Budget, Subnet
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError


@dataclass(frozen=True)
class Cost:
    params: int
    params_nonembed: int
    flops_per_token: int
    kv_bytes_per_token: int

    def metric(self, name: str) -> float:
        """The value a budget metric refers to."""
        return {
            "params": self.params_nonembed,
            "flops": self.flops_per_token,
            "kv_bytes": self.kv_bytes_per_token,
        }[name]

    def to_dict(self) -> dict:
        return asdict(self)


def _embedding_params(model: nn.Module) -> int:
    seen = {id(p): p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out = model.get_output_embeddings()
    if out is not None:
        seen[id(out.weight)] = out.weight
    return sum(p.numel() for p in seen.values())


def subnet_cost(em: ElasticModel, subnet: Subnet | None = None, context: int = 1024,
                kv_dtype_bytes: int = 2) -> Cost:
    """Cost of `subnet` (the full model when None); KV bytes at `kv_dtype_bytes` per value."""
    subnet = subnet or em.space.full()
    em.space.validate(subnet)
    total = sum(p.numel() for p in em.model.parameters())
    full_elastic = sum(b.mlp.n_params(b.mlp.n_units) + b.attn.n_params(b.attn.n_units) for b in em.blocks)
    fixed = total - full_elastic
    elastic, weights, attn_flops, kv = 0, 0, 0, 0
    for b, w, a in zip(em.blocks, subnet.mlp, subnet.attn):
        elastic += b.mlp.n_params(w) + b.attn.n_params(a)
        weights += b.mlp.n_params(w, bias=False) + b.attn.n_params(a, bias=False)
        g = b.geometry
        attn_flops += 4 * a * g.heads_per_unit * g.head_dim * context
        kv += 2 * a * g.head_dim * kv_dtype_bytes  # one KV head per unit, keys and values
    head = em.model.get_output_embeddings()
    matmul = weights + (head.weight.numel() if head is not None else 0)
    params = fixed + elastic
    return Cost(
        params=params,
        params_nonembed=params - _embedding_params(em.model),
        flops_per_token=2 * matmul + attn_flops,
        kv_bytes_per_token=kv,
    )


def uniform_subnet_for(em: ElasticModel, budget: Budget) -> tuple[Subnet, Cost]:
    """The largest uniform sub-network (same choice index in every layer) within the budget."""
    full = subnet_cost(em).metric(budget.metric)
    target = budget.fraction * full if budget.fraction is not None else budget.value
    n_mlp = max(len(c) for c in em.space.mlp)
    n_attn = max(len(c) for c in em.space.attn)
    best: tuple[float, Subnet, Cost] | None = None
    smallest = subnet_cost(em, em.space.smallest()).metric(budget.metric)
    for i in range(n_mlp):
        for j in range(n_attn):
            sub = em.space.uniform(i, j)
            cost = subnet_cost(em, sub)
            value = cost.metric(budget.metric)
            if value <= target * (1 + 1e-9) and (best is None or value > best[0]):
                best = (value, sub, cost)
    if best is None:
        raise FlextronError(
            f"budget {budget} is below the smallest sub-network ({smallest / full:.1%} of the full "
            f"model's {budget.metric}); choose a budget between {smallest / full:.2f} and 1.0"
        )
    return best[1], best[2]
