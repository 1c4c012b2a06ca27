"""Input-adaptive Flextron: each token picks its MLP width, each request its attention width.

The MLP choices are nested experts sharing weights (the width-w expert is the first w neurons).
A per-layer token router reads the MLP input and the budget; tokens are grouped by their width
and each group runs the layer's MLP hard-sliced to that width (gather, sliced matmuls, scatter),
so compute falls with the routed width in training and inference alike. Attention is chosen
once per request, from the mean of the prompt's input embeddings and the budget, and kept for
the whole generation: the KV cache stays consistent and has the routed (smaller) size. Scoring
routes the same way, never on the tokens it scores (`AdaptiveLM`): a task's candidates share the
widths their context chooses; a perplexity window is scored in chunks, each a request whose prompt
is the tokens before it (`causal_chunks`).

Training uses straight-through Gumbel-softmax: the forward pass takes the sampled width, its
output is multiplied by the one-hot gate (1 in value) whose gradient reaches the router. At
inference the argmax is taken; a per-budget shift, calibrated after training, lowers every
logit by shift x (the choice's share of its layer's largest cost) so that the average realised
cost meets the budget (sampling at the final temperature and the argmax differ in cost). The
shift exists only at the grid budgets: a budget between two routes as the one below it. At a
grid budget where adaptive routing did worse than the static router's sub-network on held-out
rows, that sub-network is served instead (`AdaptiveRouters.learned`).

In a space with hidden sizes, a request runs at one hidden size, fixed per budget: that of the static
sub-network served at its grid budget (it fits the budget, so the routing can meet it); the routers
read the d-channel stream zero-padded to the full width, and costs, penalties and the calibrated
shift are those of the table at d.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from flextron.budgets import budget_target, cost_table, select_subnet
from flextron.cost import CostTable
from flextron.elastic import ElasticModel, ElasticPart, nested_mask, skip_keep
from flextron.errors import FlextronError
from flextron.routers import AdaptiveRouters, gumbel
from flextron.space import Budget, Subnet


def grouped_forward(part: ElasticPart, module: nn.Module, widths: list[int], x: Tensor, choice: Tensor,
                    gate: Tensor | None = None) -> Tensor:
    """The MLP over tokens x [N, d], token n at width widths[choice[n]]: one hard-sliced call of the
    module's own forward per width group (gather, run, scatter). `gate` [N, K] multiplies each
    output by its chosen entry (straight-through training)."""
    out = None
    for k, width in enumerate(widths):
        idx = (choice == k).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        if width == 0:  # these tokens skip the MLP: nothing is added to their residual stream
            y = x.new_zeros(idx.numel(), x.shape[-1])
        else:
            part.set_hard(width)
            y = type(module).forward(module, x.index_select(0, idx))
        if gate is not None:  # 1 in value; carries the router's gradient
            y = y * gate.index_select(0, idx)[:, k : k + 1].to(y.dtype)
        out = (torch.zeros(x.shape[0], y.shape[-1], dtype=y.dtype, device=y.device) if out is None
               else out).index_copy(0, idx, y)
    part.set_hard(part.n_units)
    return out


class AdaptiveRouting:
    """Runs an elastic model input-adaptively at a budget: `attached` (or `attach`), then `start` per
    batch of requests.

    With `tau` set (training), widths are sampled with straight-through Gumbel-softmax and the
    attention of each sequence is a one-hot soft mask; without (inference) the argmax is taken, and
    a single request's attention is hard-sliced.
    """

    def __init__(self, em: ElasticModel, routers: AdaptiveRouters, table: CostTable) -> None:
        self.em, self.routers, self.table = em, routers, table
        # Per hidden size of the space (one without hidden sizes): the constant, the [L, K] tables and
        # the penalties (each choice's share of its layer's largest cost), so that a request routed at
        # hidden size d is priced, shifted and calibrated by the table of d.
        consts, tm, ta = table.hidden_tensors()
        self._consts = consts.tolist()
        tm, ta = (t.nan_to_num(posinf=0.0).float() for t in (tm, ta))
        self._mlp_costs, self._attn_costs = tm, ta
        device = routers.shift.device
        self._mlp_penalties = (tm / tm.amax(-1, keepdim=True).clamp(min=1e-12)).to(device)
        self._attn_penalties = (ta / ta.amax(-1, keepdim=True).clamp(min=1e-12)).to(device)
        self._price(len(self._consts) - 1)
        self.full = table.full
        self.tau: float | None = None
        self.generator: torch.Generator | None = None
        self._budget: Tensor | None = None
        self._static = False
        # Static sub-networks served (their fixed logits and hidden-size index), by budget.
        self._served: dict[float, tuple[tuple[Tensor, Tensor], int]] = {}
        self._hidden: dict[float, int] = {}  # the hidden-size index routed at each grid budget
        self._attached = False
        self.reset_stats()

    def _price(self, h: int) -> None:
        """Price the routing at the space's hidden size `h` (costs, realised cost and penalties)."""
        self.hidden_index = h
        self.const, self.mlp_cost, self.attn_cost = self._consts[h], self._mlp_costs[h], self._attn_costs[h]
        self.mlp_penalty, self.attn_penalty = self._mlp_penalties[h], self._attn_penalties[h]

    @classmethod
    def for_model(cls, em: ElasticModel) -> AdaptiveRouting:
        """The trained adaptive routers of a loaded checkpoint, costed in their metric (not attached)."""
        if em.routers is None or em.routers.adaptive is None:
            raise FlextronError("this checkpoint has no adaptive routers; train them with "
                                "`flextron route CKPT --adaptive` (after the static routers), or drop --adaptive")
        return cls(em, em.routers.adaptive, cost_table(em, em.routers.metric))

    def fraction(self, budget: Budget) -> float:
        """A budget as the fraction of the full cost in the routers' metric."""
        table, target = budget_target(self.em, budget)
        if table.metric != self.table.metric:
            raise FlextronError(f"the adaptive routers take budgets in {self.table.metric}, not {table.metric}")
        self.routers.grid_index(target / self.full)  # refuses a budget below the routers' grid
        return target / self.full

    @contextmanager
    def attached(self) -> Iterator[AdaptiveRouting]:
        """Attached inside the `with` block; on leaving it, by an exception too, detached with the
        model's previous sub-network (or soft mix) back. Inside another `attached` block of this routing,
        it stays attached: the outer block detaches."""
        if self._attached:
            yield self
            return
        with self.em.subnet(None):
            self.attach()
            try:
                yield self
            finally:
                self.detach()

    def attach(self) -> AdaptiveRouting:
        """Route every block's MLP per token (the module's own forward runs on each width group)."""
        self.em.set_subnet(None)  # no sub-layer left skipped by an earlier static sub-network
        for layer, block in enumerate(self.em.blocks):
            module = block.mlp.module
            module.forward = types.MethodType(
                lambda mod, x, _layer=layer: self._mlp_forward(_layer, mod, x), module)
        self._attached = True
        return self

    def detach(self) -> None:
        for block in self.em.blocks:
            vars(block.mlp.module).pop("forward", None)
        self.em.set_subnet(None)
        self._attached = False

    def reset_stats(self) -> None:
        n = len(self.em.blocks)
        self.mlp_probs: list[Tensor | None] = [None] * n
        self.mlp_gates: list[Tensor | None] = [None] * n
        self.mlp_counts = torch.zeros(n, self.mlp_cost.shape[-1])
        self.attn_onehot: Tensor | None = None
        self.token_choices: list[Tensor | None] = [None] * n

    def start(self, fraction: float, input_ids: Tensor, tau: float | None = None,
              generator: torch.Generator | None = None, prompt_lengths: list[int] | None = None) -> list[list[int]]:
        """Choose each sequence's attention widths from its prompt and the budget; returns them [B][L].
        The prompt of row b is its first `prompt_lengths[b]` tokens (all of them when None): the rest
        of the row (a scored continuation, padding) is run at those widths but does not choose them."""
        self.tau, self.generator = tau, generator
        i = self.routers.grid_index(fraction)
        grid_fraction = self.routers.grid[i].item()
        self._budget = self.routers.budget(grid_fraction)
        self._shift = self.routers.shift[i]
        # Where `route`'s check kept the static router's sub-network, it is served (at this very
        # budget, projected onto it): the routing is fixed to it, every token and request alike.
        self._static = tau is None and self.routers.learned[i].item() == 0
        if self._static:
            if fraction not in self._served:
                subnet = select_subnet(self.em, Budget(fraction=fraction))
                self._served[fraction] = self._fixed(subnet), self.em.space.hidden_index(subnet)
            self._prior, h = self._served[fraction]
        else:  # the static router's choice for this grid budget is the prior the adaptive routers refine
            h = self._hidden_at(grid_fraction)
            self._prior = (torch.zeros_like(self.mlp_penalty), torch.zeros_like(self.attn_penalty))
            if self.em.routers is not None:
                with torch.no_grad():
                    mlp, attn, _ = self.em.routers.static(grid_fraction)
                self._prior = (mlp.nan_to_num(neginf=0.0).float().to(self.mlp_penalty.device),
                               attn.nan_to_num(neginf=0.0).float().to(self.attn_penalty.device))
        self._price(h)
        if self.em.axis is not None:  # the whole request at that hidden size: its embeddings, blocks and head
            self.em.axis.set_hard(self.em.space.hidden_at(h))
        self.reset_stats()
        with torch.set_grad_enabled(tau is not None and torch.is_grad_enabled()):
            if self._static:
                logits = self._prior[1].expand(len(input_ids), -1, -1)
            else:
                embedded = self.em.model.get_input_embeddings()(input_ids)
                pooled = embedded.mean(dim=1) if prompt_lengths is None else torch.stack(
                    [row[:n].mean(dim=0) for row, n in zip(embedded, prompt_lengths)])
                logits = (self.routers.request_logits(pooled, self._budget) + self._prior[1]
                          - self._shift * self.attn_penalty)
        onehot = gumbel(logits, tau, generator) if tau is not None else F.one_hot(
            logits.argmax(-1), logits.shape[-1]).float()
        self.attn_onehot = onehot
        index = onehot.argmax(-1).tolist()
        widths = [[self.em.space.attn[layer][k] for layer, k in enumerate(row)] for row in index]
        for layer, block in enumerate(self.em.blocks):
            block.mlp.set_hard(block.mlp.n_units)
            choices = self.em.space.attn[layer]
            if tau is None and len(widths) == 1:
                block.set_attn_hard(widths[0][layer])
            else:  # per-sequence widths in one batch: one-hot nested masks, exact but full compute
                w = onehot[:, layer, : len(choices)]
                keep = skip_keep(choices, w)
                block.set_attn_soft(nested_mask(choices, w, block.attn.n_units)[:, None, :],
                                    None if keep is None else keep[:, None, :])
        return widths

    def _hidden_at(self, grid_fraction: float) -> int:
        """The hidden-size index a grid budget routes at: that of the static sub-network served there
        (`select_subnet`: the static router's choice projected onto the budget, or what its check kept),
        which fits the budget, so its hidden size leaves the routing a way to meet it (the raw argmax's
        may not). Fixed per budget: the routers refine the widths on top of it."""
        if not self.em.space.hidden:
            return 0
        if grid_fraction not in self._hidden:
            subnet = select_subnet(self.em, Budget(metric=self.table.metric, fraction=grid_fraction))
            self._hidden[grid_fraction] = self.em.space.hidden_index(subnet)
        return self._hidden[grid_fraction]

    def _fixed(self, subnet: Subnet) -> tuple[Tensor, Tensor]:
        """Logits that pick `subnet`'s choice in every layer (0 there, -inf elsewhere)."""
        def one(choices: list[list[int]], taken: list[int], like: Tensor) -> Tensor:
            out = torch.full_like(like, float("-inf"))
            for layer, (cs, c) in enumerate(zip(choices, taken)):
                out[layer, cs.index(c)] = 0.0
            return out

        return (one(self.em.space.mlp, subnet.mlp, self.mlp_penalty),
                one(self.em.space.attn, subnet.attn, self.attn_penalty))

    def _mlp_forward(self, layer: int, module: nn.Module, x: Tensor) -> Tensor:
        part = self.em.blocks[layer].mlp
        flat = x.reshape(-1, x.shape[-1])
        if self._static:
            logits = self._prior[0][layer].expand(len(flat), -1)
        else:
            logits = (self.routers.token_logits(layer, flat, self._budget) + self._prior[0][layer]
                      - self._shift * self.mlp_penalty[layer])
        train = self.tau is not None
        gate = gumbel(logits, self.tau, self.generator) if train else None
        choice = (gate if train else logits).argmax(-1)
        behind_norm = train and part.post is not None  # a post-norm would undo the gate: it scales the norm's output
        out = grouped_forward(part, module, self.em.space.mlp[layer], flat, choice, None if behind_norm else gate)
        if behind_norm:
            part.scale_output(gate.gather(-1, choice[:, None]).view(*x.shape[:-1], 1))
        self.mlp_probs[layer] = F.softmax(logits / (self.tau or 1.0), -1)
        self.mlp_gates[layer] = gate
        self.mlp_counts[layer] += torch.bincount(choice, minlength=self.mlp_counts.shape[1]).cpu().float()
        self.token_choices[layer] = choice.detach()
        return out.view(*x.shape[:-1], -1)

    def expected_ratio(self) -> Tensor:
        """Training: the average realised cost of the sampled widths / full cost, differentiable
        through the straight-through gates."""
        dev = self.attn_onehot.device
        mlp = sum((g.mean(0) * self.mlp_cost[i].to(dev)).sum() for i, g in enumerate(self.mlp_gates))
        attn = (self.attn_onehot.mean(0) * self.attn_cost.to(dev)).sum()
        return (self.const + mlp + attn) / self.full

    def realised_fraction(self, positions: slice | None = None) -> float:
        """Average realised cost of the widths taken (tokens' MLPs, requests' attention) / full cost:
        over every token run since `start`, or over the tokens at `positions` of the last forward."""
        counts = self.mlp_counts
        if positions is not None:
            rows = len(self.attn_onehot)
            counts = torch.stack([torch.bincount(c.view(rows, -1)[:, positions].flatten().cpu(),
                                                 minlength=counts.shape[1]) for c in self.token_choices]).float()
        share = counts / counts.sum(1, keepdim=True).clamp(min=1)
        mlp = (share * self.mlp_cost).sum()
        attn = (self.attn_onehot.detach().cpu().mean(0) * self.attn_cost).sum()
        return float((self.const + mlp + attn) / self.full)

    def balance(self) -> Tensor:
        """Switch-style load balance per layer, K * sum_k share_k * mean prob_k (1 when even); mean over layers."""
        terms = []
        for i, p in enumerate(self.mlp_probs):
            k = int(self.routers.mlp_mask[i].sum())
            share = F.one_hot(self.token_choices[i], p.shape[-1]).float().mean(0)
            terms.append(k * (share * p.mean(0)).sum())
        return torch.stack(terms).mean()


@torch.no_grad()
def calibrate(routing: AdaptiveRouting, input_ids: Tensor, iters: int = 12, bound: float = 30.0,
              slack: float = 0.01) -> list[float]:
    """Set each grid budget's shift by bisection so that the argmax routing of `input_ids` realises
    just under that budget's average cost (at most, and within `slack` below where reachable);
    returns the realised fractions."""
    routers, realised = routing.routers, []

    def run(i: int, fraction: float, shift: float) -> float:
        routers.shift[i] = shift
        routing.start(fraction, input_ids)
        routing.em(input_ids=input_ids, use_cache=False)
        return routing.realised_fraction()

    for i, fraction in enumerate(routers.grid.tolist()):
        target = fraction * (1 - slack)  # aiming a little low keeps the shift moderate at 100%
        lo, hi = -bound, bound  # a larger shift makes every layer cheaper
        for _ in range(iters):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if run(i, fraction, mid) > target else (lo, mid)
        realised.append(run(i, fraction, hi))  # the side that stays within the budget
    return realised


def causal_chunks(length: int) -> list[tuple[int, int]]:
    """How `AdaptiveLM` scores a window of `length` tokens causally: (prompt, end) pairs, each a request
    whose prompt is the first `prompt` tokens and whose logits at positions prompt - 1 .. end - 1 are
    kept (they predict tokens prompt .. end). Prompts double from 1, so token t is predicted at the
    widths chosen from its first 2**floor(log2 t) tokens (more than half of those before it), at
    about twice the tokens of one pass; the last chunk runs to the window's end."""
    chunks, prompt = [], 1
    while 2 * prompt - 1 < length - 1:
        chunks.append((prompt, 2 * prompt - 1))
        prompt *= 2
    return [*chunks, (prompt, length)]


class AdaptiveLM(nn.Module):
    """A forward that routes each call's batch (one request per sequence) at a fixed budget, for
    scoring loops that call `model(input_ids=...)` (perplexity, tasks), causally as generation is: the
    widths of a prediction are chosen from tokens before it, never from the tokens being scored.

    With `prompt_lengths` (tasks: each row's context), each row's prompt chooses its widths and the
    rest is run at them: the candidates of a question share their context's widths. Without (a
    perplexity window), the window is run in `causal_chunks`, each chunk's logits at the widths its
    prompt chooses, and only the logits come back. `costs` gets one realised fraction per call (of
    the scored positions, by chunk, weighted by their count)."""

    def __init__(self, routing: AdaptiveRouting, fraction: float) -> None:
        super().__init__()
        self.routing, self.fraction = routing, fraction
        self.em = routing.em
        self.costs: list[float] = []

    @property
    def config(self):
        return self.em.config

    def forward(self, input_ids: Tensor, prompt_lengths: list[int] | None = None, **kwargs):
        if prompt_lengths is not None:
            self.routing.start(self.fraction, input_ids, prompt_lengths=prompt_lengths)
            out = self.em(input_ids=input_ids, **kwargs)
            self.costs.append(self.routing.realised_fraction())
            return out
        logits, cost = [], 0.0
        for prompt, end in causal_chunks(input_ids.shape[1]):
            self.routing.start(self.fraction, input_ids[:, :prompt])
            if self.routing._static:  # the served sub-network reads no prompt: one pass is the same routing
                prompt, end = 1, input_ids.shape[1]
            kept = slice(prompt - 1, end)
            logits.append(self.em(input_ids=input_ids[:, :end], **kwargs).logits[:, kept])
            cost += self.routing.realised_fraction(kept) * (end - prompt + 1)
            if end == input_ids.shape[1]:
                break
        self.costs.append(cost / input_ids.shape[1])
        return CausalLMOutputWithPast(logits=torch.cat(logits, 1))
