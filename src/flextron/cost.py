"""Cost of a sub-network: cost = constant + sum over layers of its MLP and attention choice.

One `CostTable` per metric holds those terms, whether analytic (counted here from the elastic
projections themselves, so every family follows one rule) or measured (the latency lookup
table of `flextron.latency_table`); `flextron.budgets.cost_table` gives either by metric name.
Routers read the same tables as tensors for expected costs.

- params: the parameters a sub-network's choices govern. Without hidden-size choices: the
  non-embedding parameters in use (the embeddings and LM head never shrink, so a fraction of them
  would only blur the budget). In a space with hidden sizes: every parameter in use, the token (and
  position) embeddings and an untied LM head at the sub-network's hidden size included, in the
  constant (they are d columns wide, and shrinking them is the point of the axis);
- flops: per token = 2 x matmul weights in use (lm_head included, biases and norms left out)
  + 4 x active query heads x head_dim x context (QK^T and AV for a token attending to
  `context` positions);
- kv_bytes: KV-cache bytes per token (head sizes never change with the hidden size);
  decode_bytes: weight bytes read per decoded token (the LM head included, the embeddings not);
- memory_mb: megabytes (10^6 bytes) a llama.cpp deployment of the sub-network's GGUF occupies at the
  model's `Deployment` (`em.deployment`: weight type, context, batch, KV cache type): its weights as
  llama.cpp stores them, its KV cache and llama.cpp's buffers (`flextron.footprint`). The constant
  holds the embeddings, output layer and buffers; each layer's terms its weights, and the attention's
  its KV cache. In a depth space, skipping shifts which later layers the k-quant mixes give more bits
  (llama.cpp counts the tensors present); the terms keep each layer's place in the full model;
- latency_ms / prefill_ms: measured decode (per token) / prefill latency.

At hidden size d every projection reads or writes d channels of the residual stream, its norms
keep d weights, the embeddings and LM head d columns (`flextron.hidden`): a table over a space with
hidden sizes holds one table per size (`CostTable.by_hidden`). Measured tables price them by the
profile's fit over the hidden sizes it timed, or by a proportional model where it timed none
(`measured_table`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from torch import Tensor, nn

from flextron import footprint
from flextron.deployment import Deployment
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.space import ElasticSpace, Subnet

ANALYTIC = ("params", "flops", "kv_bytes", "decode_bytes", "memory_mb")
MEASURED = ("latency_ms", "prefill_ms")
MB = 1e6  # bytes of a megabyte, the unit of memory_mb


def fits(cost: float, target: float) -> bool:
    """Whether `cost` is within `target` (up to float rounding: a sub-network priced at exactly its
    budget fits)."""
    return cost <= target * (1 + 1e-9)


@dataclass(frozen=True)
class CostTable:
    """cost(subnet) = const + sum_l mlp[l][choice index] + attn[l][choice index], for one metric
    over the choices of `space`.

    Over a space with hidden sizes, `by_hidden` holds one table per size (aligned with
    `space.hidden`, each over the space without its hidden axis; the last one's terms are this
    table's own): a sub-network is priced by the table of its hidden size.

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
    by_hidden: tuple[CostTable, ...] = ()

    def __post_init__(self) -> None:
        if len(self.by_hidden) != len(self.space.hidden or ()):
            raise FlextronError(f"a {self.metric} table over {len(self.space.hidden or ())} hidden sizes holds "
                                f"{len(self.by_hidden)} tables of them; build it with analytic_table or measured_table")

    def __call__(self, subnet: Subnet) -> float:
        if self.stock is not None and self.in_stock(subnet):
            return self.stock(subnet)
        space = self.space
        table = self.by_hidden[space.hidden_index(subnet)] if self.by_hidden else self
        total = table.const
        for i, (w, a) in enumerate(zip(subnet.mlp, subnet.attn)):
            total += table.mlp[i][space.mlp[i].index(w)] + table.attn[i][space.attn[i].index(a)]
        return total

    def at_hidden(self, index: int) -> CostTable:
        """The table of the space's hidden size `index`, itself without a hidden axis (with its
        stock table at that size); a table without hidden sizes is its own."""
        if not self.by_hidden:
            return self
        table = self.by_hidden[index]
        return table if self.stock is None else replace(table, stock=self.stock.at_hidden(index),
                                                         in_stock=self.in_stock)

    @property
    def full(self) -> float:
        """The full model's cost."""
        return self(self.space.full())

    @property
    def smallest(self) -> float:
        """The smallest sub-network's cost (the smallest hidden size included)."""
        return self(self.space.smallest())

    def tensors(self) -> tuple[Tensor, Tensor]:
        """[L, K] tables at the full hidden size, padded with +inf where a layer has fewer choices (for routers)."""
        def pad(rows: list[list[float]]) -> Tensor:
            k = max(len(r) for r in rows)
            return torch.tensor([r + [float("inf")] * (k - len(r)) for r in rows], dtype=torch.float64)

        return pad(self.mlp), pad(self.attn)

    def hidden_tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per hidden size of the space (one without hidden sizes): const [H] and the mlp and attention
        tables [H, L, K] (as `tensors`), so that an expected cost is sum_h p_h (const_h + E[mlp_h] + E[attn_h])."""
        tables = self.by_hidden or (self,)
        per = [t.tensors() for t in tables]
        return (torch.tensor([t.const for t in tables], dtype=torch.float64),
                torch.stack([m for m, _ in per]), torch.stack([a for _, a in per]))


def measured_table(metric: str, const: float, mlp: list[list[float]], attn: list[list[float]],
                   space: ElasticSpace, proportional: tuple[float, list[list[float]], list[list[float]]] | None = None
                   ) -> CostTable:
    """A measured metric's table over `space` from its terms at the full hidden size D.

    `proportional` (const, mlp, attn): the part of each term that is proportional to the hidden size,
    at D, as a profile that timed several hidden sizes fits it (`flextron.latency_table.fit`); the rest
    of the term does not change with the hidden size. At hidden size d a term t with part p is
    (t - p) + p * d / D. Without it (a table timed at the full hidden size only) every term is taken
    as proportional, a MODEL, not a measurement: a projection's cost is proportional to both its
    dimensions (issue 34), so every layer term and the constant are the full size's times d / D."""
    if not space.hidden:
        return CostTable(metric, const, mlp, attn, space)
    flat = replace(space, hidden=None)
    p_const, p_mlp, p_attn = proportional or (const, mlp, attn)

    def at(f: float) -> CostTable:  # f = d / D
        def terms(full: list[list[float]], part: list[list[float]]) -> list[list[float]]:
            return [[t - p + p * f for t, p in zip(*rows)] for rows in zip(full, part)]

        return CostTable(metric, const - p_const + p_const * f, terms(mlp, p_mlp), terms(attn, p_attn), flat)

    return CostTable(metric, const, mlp, attn, space, by_hidden=tuple(at(d / space.hidden[-1]) for d in space.hidden))


def _embedding_params(em: ElasticModel, hidden: int | None = None) -> int:
    """Token (and position) embeddings and an untied LM head, at hidden size `hidden` (None: the
    full one): each has one column per channel of the residual stream."""
    model = em.model
    seen = {id(p): p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out = model.get_output_embeddings()
    if out is not None:
        seen[id(out.weight)] = out.weight
    width = em.hidden_size
    return sum(p.numel() // width * hidden if hidden and p.shape[-1] == width else p.numel() for p in seen.values())


def _head_weights(em: ElasticModel, hidden: int | None = None) -> int:
    """The LM head's weights at hidden size `hidden` (None: the full one)."""
    head = em.model.get_output_embeddings()
    return 0 if head is None else head.weight.shape[0] * (hidden or head.weight.shape[1])


def _fixed_nonembed(em: ElasticModel, hidden: int | None = None) -> int:
    """Non-embedding parameters outside the blocks' elastic parts (the final norm: d of its weights
    at hidden size d; the hidden axis refuses a model with any other stream-wide one)."""
    total = sum(p.numel() for p in em.model.parameters())
    elastic_full = sum(b.mlp.n_params(b.mlp.n_units) + b.attn.n_params(b.attn.n_units) for b in em.blocks)
    fixed = total - elastic_full - _embedding_params(em)
    if hidden is not None:
        norm = sum(p.numel() for p in em.model.get_submodule(em.family.final_norm).parameters())
        fixed -= norm * (em.hidden_size - hidden) // em.hidden_size
    return fixed


def _memory_terms(em: ElasticModel, hidden: int | None, deployment: Deployment, graph: str | None
                  ) -> tuple[float, list[list[float]], list[list[float]]]:
    """const, mlp and attn terms of memory_mb at hidden size `hidden` (None: the full one), the weights
    as `graph` stores them (None: the family's own llama.cpp architecture). A per-layer graph stands a
    zero FFN in for a skipped MLP, and a single KV group for a skipped attention in the first layer (in
    every layer in openelm; `flextron.gguf.layer_counts`): a skip is priced at those."""
    from flextron.gguf import ZERO_FFN

    names, n, wt = footprint.gguf_names(em), len(em.blocks), deployment.weight_type
    mlp = [[footprint.part_bytes(b.mlp, i, n, c or (ZERO_FFN if graph else 0), hidden, wt, names, graph) / MB
            for c in choices] for i, (b, choices) in enumerate(zip(em.blocks, em.space.mlp))]
    attn = []
    for i, (b, choices) in enumerate(zip(em.blocks, em.space.attn)):
        stand_in = _attn_stand_in(graph, i)
        attn.append([(footprint.part_bytes(b.attn, i, n, c or stand_in, hidden, wt, names, graph)
                      + footprint.kv_bytes(b.attn_heads(c or stand_in)[1], b.geometry.head_dim, deployment)) / MB
                     for c in choices])
    const = footprint.embedding_bytes(em, hidden, wt, graph) + footprint.compute_bytes(em, hidden, deployment)
    return const / MB, mlp, attn


def _attn_stand_in(graph: str | None, layer: int) -> int:
    """The KV groups a per-layer `graph` keeps for a skipped attention in `layer` (`_memory_terms`)."""
    return int(graph == "openelm" or (graph is not None and layer == 0))


def memory_parts(em: ElasticModel, subnet: Subnet, deployment: Deployment | None = None) -> dict[str, int]:
    """memory_mb of `subnet` at `deployment` (default: the model's) in bytes, split as llama.cpp reports
    what it allocates: `weights` (its model size), `kv` (the KV cache), `buffers` (output and compute)."""
    deployment = deployment or em.deployment or Deployment()
    total = round(analytic_table(em, "memory_mb", deployment=deployment)(subnet) * MB)
    graph = footprint.per_layer_arch(em)
    kv = sum(footprint.kv_bytes(b.attn_heads(a or _attn_stand_in(graph, i))[1], b.geometry.head_dim, deployment)
             for i, (b, a) in enumerate(zip(em.blocks, subnet.attn)))
    buffers = footprint.compute_bytes(em, subnet.hidden, deployment)
    return {"weights": total - kv - buffers, "kv": kv, "buffers": buffers, "total": total}


def _memory_table(em: ElasticModel, deployment: Deployment) -> CostTable:
    """memory_mb, as `export --format gguf` writes a sub-network: the terms as the family's per-layer
    llama.cpp graph stores them; where its own graph stores the projections otherwise (fused, split),
    the sub-networks written there priced by a stock table of that graph."""
    graph = footprint.per_layer_arch(em)
    main = _per_hidden(em, "memory_mb", lambda hidden: _memory_terms(em, hidden, deployment, graph))
    if graph is None or not footprint.regrouped(em, graph):
        return main
    stock = _per_hidden(em, "memory_mb", lambda hidden: _memory_terms(em, hidden, deployment, None))
    return replace(main, stock=stock, in_stock=partial(footprint.in_own_graph, em))


def _terms(em: ElasticModel, metric: str, hidden: int | None, context: int, kv_dtype_bytes: int,
           weight_dtype_bytes: int) -> tuple[float, list[list[float]], list[list[float]]]:
    """const, mlp and attn terms of an analytic `metric` at hidden size `hidden` (None: the full one)."""
    mlp, attn = [], []
    for b, wm, wa in zip(em.blocks, em.space.mlp, em.space.attn):
        hd = b.geometry.head_dim
        if metric == "params":
            mlp.append([b.mlp.n_params(c, hidden=hidden) for c in wm])
            attn.append([b.attn.n_params(c, hidden=hidden) for c in wa])
        elif metric in ("flops", "decode_bytes"):
            scale = 2 if metric == "flops" else weight_dtype_bytes
            bias = metric == "decode_bytes"
            mlp.append([scale * b.mlp.n_params(c, bias=bias, hidden=hidden) for c in wm])
            attn.append([scale * b.attn.n_params(c, bias=bias, hidden=hidden)
                         + (4 * b.attn_heads(c)[0] * hd * context if metric == "flops" else 0)
                         for c in wa])
        else:  # kv_bytes: keys and values of each KV head
            mlp.append([0] * len(wm))
            attn.append([2 * b.attn_heads(c)[1] * hd * kv_dtype_bytes for c in wa])
    fixed, head = _fixed_nonembed(em, hidden), _head_weights(em, hidden)
    const = {
        # The embeddings count where the hidden size governs them (see the module docstring).
        "params": fixed + (_embedding_params(em, hidden) if em.space.hidden else 0),
        "flops": 2 * head,
        "kv_bytes": 0,
        # Every non-embedding weight is read once per token, the output head included.
        "decode_bytes": weight_dtype_bytes * (fixed + head),
    }[metric]
    return float(const), mlp, attn


def _per_hidden(em: ElasticModel, metric: str,
                terms: Callable[[int | None], tuple[float, list[list[float]], list[list[float]]]]) -> CostTable:
    """The table of `terms(hidden size)`, one per hidden size where the space has them."""
    space = em.space
    if not space.hidden:
        return CostTable(metric, *terms(None), space)
    flat = replace(space, hidden=None)
    per = tuple(CostTable(metric, *terms(space.hidden_at(i)), flat) for i in range(len(space.hidden)))
    return CostTable(metric, per[-1].const, per[-1].mlp, per[-1].attn, space, by_hidden=per)


def analytic_table(em: ElasticModel, metric: str, context: int = 1024, kv_dtype_bytes: int = 2,
                   weight_dtype_bytes: int = 2, deployment: Deployment | None = None) -> CostTable:
    """The table of an analytic `metric` (measured ones: `LatencyTable.table`), one per hidden size
    where the space has them. memory_mb prices `deployment` (default: the model's, `em.deployment`)."""
    if metric not in ANALYTIC:
        raise FlextronError(f"unknown cost metric {metric!r}; use one of {', '.join(ANALYTIC + MEASURED)}")
    if metric == "memory_mb":
        return _memory_table(em, deployment or em.deployment or Deployment())
    return _per_hidden(em, metric, lambda hidden: _terms(em, metric, hidden, context, kv_dtype_bytes,
                                                         weight_dtype_bytes))


@dataclass(frozen=True)
class Cost:
    params: int
    params_nonembed: int
    flops_per_token: int
    kv_bytes_per_token: int
    decode_bytes_per_token: int
    memory_bytes: int | None  # at the model's deployment (em.deployment); None where llama.cpp cannot run it

    def to_dict(self) -> dict:
        return asdict(self)


def subnet_cost(em: ElasticModel, subnet: Subnet | None = None, context: int = 1024,
                kv_dtype_bytes: int = 2, weight_dtype_bytes: int = 2) -> Cost:
    """All analytic costs of `subnet` (the full model when None), at its hidden size: `params` with the
    embeddings and LM head, `params_nonembed` without, whichever of the two the params metric is."""
    subnet = subnet or em.space.full()
    em.space.validate(subnet)
    value = {m: analytic_table(em, m, context, kv_dtype_bytes, weight_dtype_bytes)(subnet) for m in ANALYTIC
             if m != "memory_mb"}
    try:
        memory = round(analytic_table(em, "memory_mb")(subnet) * MB)
    except FlextronError:  # a model llama.cpp cannot run (e.g. Gemma 1 converted as llama) has no memory
        memory = None
    embeddings = _embedding_params(em, subnet.hidden)
    nonembed = int(value["params"]) - (embeddings if em.space.hidden else 0)
    return Cost(
        params=nonembed + embeddings,
        params_nonembed=nonembed,
        flops_per_token=int(value["flops"]),
        kv_bytes_per_token=int(value["kv_bytes"]),
        decode_bytes_per_token=int(value["decode_bytes"]),
        memory_bytes=memory,
    )
