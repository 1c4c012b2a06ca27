"""Cost of a sub-network: cost = constant + sum over layers of its MLP and attention choice.

One `CostTable` per metric holds those terms, whether analytic (counted here from the elastic
projections themselves, so every family follows one rule) or measured (the latency lookup
table of `flextron.latency_table`); `flextron.budgets.cost_table` gives either by metric name.
Routers read the same tables as tensors for expected costs.

- params: non-embedding parameters in use;
- flops: per token = 2 x matmul weights in use (lm_head included, biases and norms left out)
  + 4 x active query heads x head_dim x context (QK^T and AV for a token attending to
  `context` positions);
- kv_bytes: KV-cache bytes per token; decode_bytes: weight bytes read per decoded token;
- latency_ms / prefill_ms: measured decode (per token) / prefill latency.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.space import ElasticSpace, Subnet

ANALYTIC = ("params", "flops", "kv_bytes", "decode_bytes")
MEASURED = ("latency_ms", "prefill_ms")


def fits(cost: float, target: float) -> bool:
    """Whether `cost` is within `target` (up to float rounding: a sub-network priced at exactly its
    budget fits)."""
    return cost <= target * (1 + 1e-9)


@dataclass(frozen=True)
class CostTable:
    """cost(subnet) = const + sum_l mlp[l][choice index] + attn[l][choice index], for one metric
    over the choices of `space`.

    A runtime may run some sub-networks in another graph (llama.cpp: a uniform sub-network, the
    full model included, in the family's own architecture; the others in the per-layer `deci`):
    those for which `in_stock` holds are priced by the `stock` table measured in that graph, the
    rest (and routers' expected costs) by this one."""

    metric: str
    const: float
    mlp: list[list[float]]
    attn: list[list[float]]
    space: ElasticSpace
    stock: CostTable | None = None
    in_stock: Callable[[Subnet], bool] | None = None

    def __call__(self, subnet: Subnet) -> float:
        if self.stock is not None and self.in_stock(subnet):
            return self.stock(subnet)
        space, total = self.space, self.const
        for i, (w, a) in enumerate(zip(subnet.mlp, subnet.attn)):
            total += self.mlp[i][space.mlp[i].index(w)] + self.attn[i][space.attn[i].index(a)]
        return total

    @property
    def full(self) -> float:
        """The full model's cost."""
        return self(self.space.full())

    @property
    def smallest(self) -> float:
        """The smallest sub-network's cost."""
        return self(self.space.smallest())

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


def analytic_table(em: ElasticModel, metric: str, context: int = 1024, kv_dtype_bytes: int = 2,
                   weight_dtype_bytes: int = 2) -> CostTable:
    """The table of an analytic `metric` (measured ones: `LatencyTable.table`)."""
    if metric not in ANALYTIC:
        raise FlextronError(f"unknown cost metric {metric!r}; use one of {', '.join(ANALYTIC + MEASURED)}")
    mlp, attn = [], []
    for b, wm, wa in zip(em.blocks, em.space.mlp, em.space.attn):
        hd = b.geometry.head_dim
        if metric == "params":
            mlp.append([b.mlp.n_params(c) for c in wm])
            attn.append([b.attn.n_params(c) for c in wa])
        elif metric in ("flops", "decode_bytes"):
            scale = 2 if metric == "flops" else weight_dtype_bytes
            bias = metric == "decode_bytes"
            mlp.append([scale * b.mlp.n_params(c, bias=bias) for c in wm])
            attn.append([scale * b.attn.n_params(c, bias=bias)
                         + (4 * b.attn_heads(c)[0] * hd * context if metric == "flops" else 0)
                         for c in wa])
        else:  # kv_bytes: keys and values of each KV head
            mlp.append([0] * len(wm))
            attn.append([2 * b.attn_heads(c)[1] * hd * kv_dtype_bytes for c in wa])
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
    return CostTable(metric, float(const), mlp, attn, em.space)


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
    value = {m: int(analytic_table(em, m, context, kv_dtype_bytes, weight_dtype_bytes)(subnet))
             for m in ANALYTIC}
    return Cost(
        params=value["params"] + _embedding_params(em.model),
        params_nonembed=value["params"],
        flops_per_token=value["flops"],
        kv_bytes_per_token=value["kv_bytes"],
        decode_bytes_per_token=value["decode_bytes"],
    )
