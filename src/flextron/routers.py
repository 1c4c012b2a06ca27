"""Static routers (budget -> per-layer choices), the surrogate model, and budget resolution.

The static router reads the budget as a one-hot over its trained grid (linear interpolation
between the two neighbours for a budget in between) and outputs, per layer, logits over the
MLP choices and over the attention choices. Training relaxes them with Gumbel-softmax;
inference takes the argmax, then `project` nudges single layers up or down along the
router's own preferences until the cost meets the budget exactly (the relaxed cost the
router learnt to hit is an expectation, a single argmax can land a few percent off).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flextron.config import Budget, ElasticSpace, RouterConfig, Subnet
from flextron.cost import CostTable, budget_target, uniform_subnet_for
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError

ROUTER_WEIGHTS = "routers.safetensors"
ROUTER_CONFIG = "routers.json"
ADAPTIVE_WEIGHTS = "adaptive.safetensors"


def encode_budget(grid: Tensor, fraction: float) -> Tensor:
    """One-hot over the sorted grid; linear interpolation between neighbours; clamped at the ends."""
    x = min(max(float(fraction), grid[0].item()), grid[-1].item())
    hi = int(torch.searchsorted(grid, torch.tensor(x, dtype=grid.dtype)).clamp(max=len(grid) - 1))
    out = torch.zeros(len(grid), dtype=torch.float32)
    if grid[hi].item() == x or hi == 0:
        out[hi] = 1.0
        return out
    lo = hi - 1
    w = (x - grid[lo].item()) / (grid[hi].item() - grid[lo].item())
    out[lo], out[hi] = 1 - w, w
    return out


def choice_mask(choices: list[list[int]]) -> Tensor:
    """[L, K] True where layer l has a k-th choice (lists may differ in length)."""
    k = max(len(c) for c in choices)
    return torch.tensor([[i < len(c) for i in range(k)] for c in choices])


class StaticRouter(nn.Module):
    """Budget -> per-layer logits over MLP choices and attention choices."""

    def __init__(self, space: ElasticSpace, grid: tuple[float, ...], hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer("grid", torch.tensor(sorted(grid), dtype=torch.float64))
        self.register_buffer("mlp_mask", choice_mask(space.mlp))
        self.register_buffer("attn_mask", choice_mask(space.attn))
        n_out = self.mlp_mask.numel() + self.attn_mask.numel()
        self.net = nn.Sequential(nn.Linear(len(grid), hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_out))

    def forward(self, fraction: float) -> tuple[Tensor, Tensor]:
        x = encode_budget(self.grid, fraction).to(self.net[0].weight.device)
        out = self.net(x)
        m = self.mlp_mask.numel()
        mlp = out[:m].view(self.mlp_mask.shape).masked_fill(~self.mlp_mask, float("-inf"))
        attn = out[m:].view(self.attn_mask.shape).masked_fill(~self.attn_mask, float("-inf"))
        return mlp, attn


class Surrogate(nn.Module):
    """Predicts the LLM's distillation loss from the router's per-layer choice probabilities
    (a relaxed sample, whose argmax is the architecture measured)."""

    def __init__(self, n_in: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))
        # The net predicts the standardised loss: losses differ by orders of magnitude between models.
        self.register_buffer("offset", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, choices: Tensor) -> Tensor:
        return self.offset + self.scale * self.net(choices).squeeze(-1)


def relaxed(logits: Tensor, tau: float, generator: torch.Generator) -> Tensor:
    """Gumbel-softmax: per-layer choice probabilities of one relaxed sample; masked (-inf) choices get 0."""
    u = torch.rand(logits.shape, generator=generator).to(logits.device).clamp(1e-9, 1 - 1e-9)
    return F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)


def straight_through(soft: Tensor) -> Tensor:
    """One-hot of the most probable choice in value, the gradient of `soft`."""
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


def gumbel(logits: Tensor, tau: float, generator: torch.Generator) -> Tensor:
    """Straight-through Gumbel-softmax: one-hot forward, soft gradient; masked (-inf) choices never win."""
    return straight_through(relaxed(logits, tau, generator))


def expected_cost(table: CostTable, mlp: Tensor, attn: Tensor) -> Tensor:
    """const + sum of per-layer choice weights x costs (padding, +inf in the table, weighs 0)."""
    tm, ta = (t.to(mlp.device, torch.float32).nan_to_num(posinf=0.0) for t in table.tensors())
    return table.const + (mlp * tm).sum() + (attn * ta).sum()


def decode(space: ElasticSpace, mlp: Tensor, attn: Tensor) -> Subnet:
    """The sub-network of per-layer one-hots or logits (argmax), skips restored up to the floor."""
    im, ia = mlp.argmax(-1).tolist(), attn.argmax(-1).tolist()
    return space.floor(Subnet(mlp=[c[i] for c, i in zip(space.mlp, im)], attn=[c[i] for c, i in zip(space.attn, ia)]))


def project(space: ElasticSpace, table: CostTable, mlp_logp: Tensor, attn_logp: Tensor, target: float,
            slack: float = 0.01) -> Subnet:
    """From the argmax, step single layers down (least log-prob lost per cost saved) while over
    the target, then up (most log-prob gained per cost added) while under target x (1 - slack).
    A step down to a skip is taken only while the kind keeps more layers than the space's floor."""
    start = decode(space, mlp_logp, attn_logp)
    lists = {"mlp": space.mlp, "attn": space.attn}
    idx = {k: [c.index(x) for c, x in zip(lists[k], getattr(start, k))] for k in lists}
    logp = {"mlp": mlp_logp.tolist(), "attn": attn_logp.tolist()}
    costs = {"mlp": table.mlp, "attn": table.attn}

    def can_lower(k: str, layer: int, i: int) -> bool:
        kept = sum(lists[k][j][x] > 0 for j, x in enumerate(idx[k]))
        return i > 0 and (lists[k][layer][i - 1] > 0 or kept > space.min_layers)

    def current() -> Subnet:
        return Subnet(mlp=[c[i] for c, i in zip(space.mlp, idx["mlp"])],
                      attn=[c[i] for c, i in zip(space.attn, idx["attn"])])

    cost = table(space, current())
    while cost > target * (1 + 1e-9):
        moves = [((logp[k][layer][i] - logp[k][layer][i - 1]) / max(costs[k][layer][i] - costs[k][layer][i - 1],
                                                                    1e-12), k, layer)
                 for k in idx for layer, i in enumerate(idx[k]) if can_lower(k, layer, i)]
        if not moves:
            break
        _, k, layer = min(moves)
        idx[k][layer] -= 1
        cost = table(space, current())
    while cost < target * (1 - slack):
        moves = []
        for k in idx:
            for layer, i in enumerate(idx[k]):
                if i + 1 < len(lists[k][layer]):
                    added = costs[k][layer][i + 1] - costs[k][layer][i]
                    if cost + added <= target * (1 + 1e-9):
                        moves.append(((logp[k][layer][i + 1] - logp[k][layer][i]) / max(added, 1e-12), k, layer))
        if not moves:
            break
        _, k, layer = max(moves)
        idx[k][layer] += 1
        cost = table(space, current())
    return current()


@dataclass
class Routers:
    """Trained routers of a checkpoint: the static router, the metric its budgets refer to, and
    the input-adaptive routers (`flextron.adaptive.AdaptiveRouters`) once trained."""

    static: StaticRouter
    metric: str
    config: RouterConfig
    adaptive: nn.Module | None = None
    adaptive_config: RouterConfig | None = None
    checked: list[dict] | None = None  # per checked budget: the kept sub-network (train.routers.check_against_uniform)

    def kept(self, fraction: float) -> dict | None:
        """The check of the largest checked budget at or below `fraction` (None below them all)."""
        below = [c for c in self.checked or [] if c["budget"] <= fraction + 1e-9]
        return max(below, key=lambda c: c["budget"]) if below else None

    def save(self, directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.static.state_dict().items()}, directory / ROUTER_WEIGHTS)
        cfg = {**asdict(self.config), "metric": self.metric}
        if self.checked is not None:
            cfg["checked"] = self.checked
        if self.adaptive is not None:
            save_file({k: v.contiguous() for k, v in self.adaptive.state_dict().items()},
                      directory / ADAPTIVE_WEIGHTS)
            cfg["adaptive"] = asdict(self.adaptive_config)
        (directory / ROUTER_CONFIG).write_text(json.dumps(cfg, indent=1))

    @classmethod
    def load(cls, directory: Path, space: ElasticSpace) -> Routers | None:
        if not (directory / ROUTER_CONFIG).is_file():
            return None
        try:
            cfg = json.loads((directory / ROUTER_CONFIG).read_text())
            metric = cfg.pop("metric")
            adaptive_cfg = cfg.pop("adaptive", None)
            checked = cfg.pop("checked", None)
            config = _router_config(cfg)
            router = StaticRouter(space, config.budgets, config.hidden)
            router.load_state_dict(load_file(directory / ROUTER_WEIGHTS))
            routers = cls(router.eval(), metric, config, checked=checked)
            if adaptive_cfg is not None:
                from flextron.adaptive import AdaptiveRouters  # it builds on this module

                routers.adaptive_config = _router_config(adaptive_cfg)
                state = load_file(directory / ADAPTIVE_WEIGHTS)
                routers.adaptive = AdaptiveRouters(space.mlp, space.attn, state["token_in.0.weight"].shape[1],
                                                   routers.adaptive_config.budgets, routers.adaptive_config.hidden)
                routers.adaptive.load_state_dict(state)
                routers.adaptive.eval()
        except Exception as e:  # corrupt, truncated or from another elastic space
            raise FlextronError(f"the routers in {directory} are unreadable ({type(e).__name__}: {e}); "
                                "re-run `flextron route`") from None
        return routers

    def to(self, device: str | torch.device) -> Routers:
        self.static.to(device)
        if self.adaptive is not None:
            self.adaptive.to(device)
        return self


def _router_config(cfg: dict) -> RouterConfig:
    return RouterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


@torch.no_grad()
def select_subnet(em: ElasticModel, budget: Budget) -> Subnet:
    """The sub-network for a budget: the router's choice, projected onto the budget in the budget's
    own metric, or without routers the largest uniform sub-network within it. Where `route`
    checked the largest budget at or below this one and kept the uniform sub-network (or a lower
    budget's), that rule applies instead."""
    if em.routers is None:
        return uniform_subnet_for(em, budget)[0]
    table, target = budget_target(em, budget)
    fraction = router_fraction(em, table, target)
    check = em.routers.kept(fraction) if table.metric == em.routers.metric else None
    if check is not None and check["kept"] == "uniform":
        return uniform_subnet_for(em, budget)[0]
    if check is not None and check["kept"] == "lower budget":
        subnet = Subnet(**check["subnet"])
        if table(em.space, subnet) <= target * (1 + 1e-9):  # unless the table changed since (re-profiled)
            return subnet
    mlp, attn = em.routers.static(fraction)
    return project(em.space, table, F.log_softmax(mlp, -1), F.log_softmax(attn, -1), target)


@torch.no_grad()
def router_fraction(em: ElasticModel, table: CostTable, target: float, iters: int = 30) -> float:
    """The budget to ask the router for, as a fraction of the full cost in its own metric.

    A budget in the routers' metric is read as it is. A budget in another metric (say params=50%
    to latency routers) is not a fraction the router knows: take the router's largest budget
    whose choice (argmax) costs at most the target in the requested metric (bisection; the
    router's sub-networks grow with its budget), so projection in that metric starts from
    preferences of the right size."""
    full = table(em.space, em.space.full())
    if table.metric == em.routers.metric:
        return target / full
    grid = em.routers.static.grid
    lo, hi = grid[0].item(), 1.0

    def fits(fraction: float) -> bool:
        return table(em.space, decode(em.space, *em.routers.static(fraction))) <= target * (1 + 1e-9)

    if fits(hi):
        return hi
    if not fits(lo):
        return lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
