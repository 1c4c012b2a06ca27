"""Routers: the static router (budget -> per-layer choices), the input-adaptive routers' networks
(run by `flextron.adaptive`), the surrogate model, projection onto a budget, and their storage.

The static router reads the budget as a one-hot over its trained grid (linear interpolation
between the two neighbours for a budget in between) and outputs, per layer, logits over the
MLP choices and over the attention choices, and, in a space with hidden sizes, logits over
those (one choice for the whole model). Training relaxes them with Gumbel-softmax;
inference takes the argmax, then `project` nudges single layers up or down along the
router's own preferences until the cost meets the budget exactly (the relaxed cost the
router learnt to hit is an expectation, a single argmax can land a few percent off).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flextron.cost import CostTable, fits
from flextron.errors import FlextronError
from flextron.options import RouteOptions
from flextron.space import METRICS, ElasticSpace, Subnet

ROUTER_WEIGHTS = "routers.safetensors"
ROUTER_CONFIG = "routers.json"
_MAX_CONFIG_BYTES = 16 << 20  # a router config is a few KB
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


class Choices(NamedTuple):
    """Logits (or probabilities, one-hots) over each layer's MLP choices [L, K] and attention choices
    [L, K], and over the space's hidden sizes [H] (None where the space has none)."""

    mlp: Tensor
    attn: Tensor
    hidden: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> Choices:
        return Choices(fn(self.mlp), fn(self.attn), None if self.hidden is None else fn(self.hidden))

    def flat(self) -> Tensor:
        """Every entry in one vector (the surrogate's input)."""
        return torch.cat([t.flatten() for t in self if t is not None])


class StaticRouter(nn.Module):
    """Budget -> per-layer logits over MLP choices and attention choices (and over the hidden sizes):
    a learnt MLP plus a fixed prior per grid budget (`set_prior`; zero unless set), read with the
    same budget encoding."""

    def __init__(self, space: ElasticSpace, grid: tuple[float, ...], hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer("grid", torch.tensor(sorted(grid), dtype=torch.float64))
        self.register_buffer("mlp_mask", choice_mask(space.mlp))
        self.register_buffer("attn_mask", choice_mask(space.attn))
        self.n_hidden = len(space.hidden) if space.hidden else 0
        n_out = self.mlp_mask.numel() + self.attn_mask.numel() + self.n_hidden
        self.net = nn.Sequential(nn.Linear(len(grid), hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_out))
        self.register_buffer("prior", torch.zeros(len(grid), n_out))
        self.space = space

    @property
    def n_choices(self) -> int:
        """Entries of `Choices.flat()`."""
        return self.mlp_mask.numel() + self.attn_mask.numel() + self.n_hidden

    def forward(self, fraction: float) -> Choices:
        x = encode_budget(self.grid, fraction).to(self.net[0].weight.device)
        out = self.net(x) + x @ self.prior
        m, a = self.mlp_mask.numel(), self.attn_mask.numel()
        mlp = out[:m].view(self.mlp_mask.shape).masked_fill(~self.mlp_mask, float("-inf"))
        attn = out[m : m + a].view(self.attn_mask.shape).masked_fill(~self.attn_mask, float("-inf"))
        return Choices(mlp, attn, out[m + a :] if self.n_hidden else None)

    @torch.no_grad()
    def set_prior(self, fraction: float, subnet: Subnet, margin: float) -> None:
        """Start grid budget `fraction` at `subnet`: each layer's logits fall by `margin` per choice
        away from the subnet's, so neighbouring widths stay likely draws and distant ones
        (a skip, for a wide layer) rare."""
        g = int((self.grid - fraction).abs().argmin())
        flat: list[float] = []
        for kind, mask in (("mlp", self.mlp_mask), ("attn", self.attn_mask)):
            width = mask.shape[1]
            for choices, c in zip(getattr(self.space, kind), getattr(subnet, kind)):
                k = choices.index(c)
                flat += [-margin * abs(i - k) for i in range(len(choices))] + [0.0] * (width - len(choices))
        if self.n_hidden:
            k = self.space.hidden_index(subnet)
            flat += [-margin * abs(i - k) for i in range(self.n_hidden)]
        self.prior[g] = torch.tensor(flat, dtype=self.prior.dtype)


class AdaptiveRouters(nn.Module):
    """Per-layer token routers over MLP widths and one request router over attention widths.

    They read the residual stream at the model's full width D; at a smaller hidden size d (a space with
    hidden sizes) they read its d channels as the stream with zeros beyond them (what their first d
    input columns compute)."""

    def __init__(self, mlp_choices: list[list[int]], attn_choices: list[list[int]], hidden_size: int,
                 grid: tuple[float, ...], hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("grid", torch.tensor(sorted(grid), dtype=torch.float64))
        self.register_buffer("mlp_mask", choice_mask(mlp_choices))
        self.register_buffer("attn_mask", choice_mask(attn_choices))
        g, (n_layers, k_mlp), k_attn = len(grid), self.mlp_mask.shape, self.attn_mask.shape[1]
        self.token_in = nn.ModuleList(nn.Linear(hidden_size, hidden) for _ in range(n_layers))
        self.token_budget = nn.Linear(g, n_layers * hidden)
        self.token_out = nn.ModuleList(nn.Linear(hidden, k_mlp) for _ in range(n_layers))
        self.request = nn.Sequential(nn.Linear(hidden_size + g, 4 * hidden), nn.GELU(),
                                     nn.Linear(4 * hidden, n_layers * k_attn))
        self.register_buffer("shift", torch.zeros(g))  # per grid budget, set by `calibrate`
        # Per grid budget: 1 routes adaptively, 0 serves the static router's sub-network instead
        # (set by `train.routers.check_against_static`).
        self.register_buffer("learned", torch.ones(g))
        self.hidden = hidden

    @torch.no_grad()
    def zero_residual_(self) -> None:
        """Output layers at zero: routing starts as the static router's prior, then learns per input."""
        for lin in (*self.token_out, self.request[-1]):
            lin.weight.zero_()
            lin.bias.zero_()

    def budget(self, fraction: float) -> Tensor:
        return encode_budget(self.grid, fraction).to(self.token_budget.weight.device)

    def _stream(self, x: Tensor) -> Tensor:
        """x [..., d]: the first d channels of the stream, zero-padded to the full width D."""
        width = self.token_in[0].in_features
        return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))

    def token_logits(self, layer: int, x: Tensor, budget: Tensor) -> Tensor:
        """x [N, d <= hidden_size] -> [N, K] logits over the layer's MLP widths (absent choices -inf)."""
        b = self.token_budget(budget).view(-1, self.hidden)[layer]
        logits = self.token_out[layer](F.gelu(self.token_in[layer](self._stream(x).to(b.dtype)) + b)).float()
        return logits.masked_fill(~self.mlp_mask[layer], float("-inf"))

    def request_logits(self, pooled: Tensor, budget: Tensor) -> Tensor:
        """pooled [B, d <= hidden_size] -> [B, L, K] logits over each layer's attention widths."""
        x = torch.cat([self._stream(pooled).to(budget.dtype), budget.expand(len(pooled), -1)], dim=-1)
        logits = self.request(x).float().view(len(pooled), *self.attn_mask.shape)
        return logits.masked_fill(~self.attn_mask, float("-inf"))

    def grid_index(self, fraction: float) -> int:
        """The largest grid budget at or below `fraction`: the per-token cost is calibrated only on
        the grid, so a budget between grid points routes as the one below it (within the budget)."""
        grid = self.grid.tolist()
        if not fits(grid[0], fraction):
            raise FlextronError(f"the adaptive routers serve budgets from {grid[0]:.0%} (their lowest grid budget); "
                                "ask at least that, or re-route --adaptive with a lower --budgets point")
        return max(i for i, g in enumerate(grid) if fits(g, fraction))


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


def expected_cost(table: CostTable, weights: Choices) -> Tensor:
    """const + sum of per-layer choice weights x costs (padding, +inf in the table, weighs 0); with
    hidden-size weights, the mix of those sums over the tables of each hidden size."""
    def at(t: CostTable) -> Tensor:
        tm, ta = (x.to(weights.mlp.device, torch.float32).nan_to_num(posinf=0.0) for x in t.tensors())
        return t.const + (weights.mlp * tm).sum() + (weights.attn * ta).sum()

    if weights.hidden is None:
        return at(table)
    return sum(w * at(table.at_hidden(i)) for i, w in enumerate(weights.hidden))


def decode(space: ElasticSpace, choices: Choices) -> Subnet:
    """The sub-network of per-layer one-hots or logits (argmax), skips restored up to the floor."""
    im, ia = choices.mlp.argmax(-1).tolist(), choices.attn.argmax(-1).tolist()
    hidden = None if choices.hidden is None else space.hidden_at(int(choices.hidden.argmax()))
    return space.floor(Subnet(mlp=[c[i] for c, i in zip(space.mlp, im)],
                              attn=[c[i] for c, i in zip(space.attn, ia)], hidden=hidden))


def project(space: ElasticSpace, table: CostTable, logp: Choices, target: float, slack: float = 0.01) -> Subnet:
    """From the argmax, step single choices down (least log-prob lost per cost saved) while over
    the target, then up (most log-prob gained per cost added) while under target x (1 - slack).
    A step down to a skip is taken only while the kind keeps more layers than the space's floor.
    The hidden size, in a space with hidden sizes, is one more choice that steps the same way."""
    start = decode(space, logp)
    lists = {"mlp": space.mlp, "attn": space.attn}
    idx = {k: [c.index(x) for c, x in zip(lists[k], getattr(start, k))] for k in lists}
    logps = {"mlp": logp.mlp.tolist(), "attn": logp.attn.tolist()}
    if logp.hidden is not None:
        lists["hidden"], idx["hidden"], logps["hidden"] = [space.hidden], [space.hidden_index(start)], [
            logp.hidden.tolist()]

    def can_lower(k: str, layer: int, i: int) -> bool:
        if k == "hidden":
            return i > 0
        kept = sum(lists[k][j][x] > 0 for j, x in enumerate(idx[k]))
        return i > 0 and (lists[k][layer][i - 1] > 0 or kept > space.min_layers)

    def current() -> Subnet:
        hidden = space.hidden_at(idx["hidden"][0]) if "hidden" in idx else None
        return Subnet(mlp=[c[i] for c, i in zip(space.mlp, idx["mlp"])],
                      attn=[c[i] for c, i in zip(space.attn, idx["attn"])], hidden=hidden)

    def step(k: str, layer: int, i: int, j: int) -> float:
        """The cost change of moving one choice from index i to j: per-layer terms at the current hidden
        size (as routers price them), the hidden size itself repriced whole."""
        if k == "hidden":
            idx[k][0] = j
            changed = table(current())
            idx[k][0] = i
            return changed - cost
        terms = getattr(table.at_hidden(idx["hidden"][0]) if "hidden" in idx else table, k)[layer]
        return terms[j] - terms[i]

    cost = table(current())
    while not fits(cost, target):
        moves = [((logps[k][layer][i] - logps[k][layer][i - 1]) / max(-step(k, layer, i, i - 1), 1e-12), k, layer)
                 for k in idx for layer, i in enumerate(idx[k]) if can_lower(k, layer, i)]
        if not moves:
            break
        _, k, layer = min(moves)
        idx[k][layer] -= 1
        cost = table(current())
    while cost < target * (1 - slack):
        moves = []
        for k in idx:
            for layer, i in enumerate(idx[k]):
                if i + 1 < len(lists[k][layer]):
                    added = step(k, layer, i, i + 1)
                    if fits(cost + added, target):
                        moves.append(((logps[k][layer][i + 1] - logps[k][layer][i]) / max(added, 1e-12), k, layer))
        if not moves:
            break
        _, k, layer = max(moves)
        idx[k][layer] += 1
        widened = table(current())
        if not fits(widened, target):  # the step changed the graph the runtime runs (CostTable.stock)
            idx[k][layer] -= 1
            break
        cost = widened
    return current()


@dataclass
class Routers:
    """Trained routers of a checkpoint: the static router, the metric its budgets refer to, and
    the input-adaptive routers once trained."""

    static: StaticRouter
    metric: str
    config: RouteOptions
    adaptive: AdaptiveRouters | None = None
    adaptive_config: RouteOptions | None = None
    checked: list[dict] | None = None  # per checked budget: the kept sub-network (train.routers.check_against_uniform)

    def kept(self, fraction: float) -> list[dict]:
        """The checks of the checked budgets at or below `fraction`, the largest budget first (none
        below them all). What a check kept fits its budget, so it fits any larger one too."""
        below = [c for c in self.checked or [] if c["budget"] <= fraction + 1e-9]
        return sorted(below, key=lambda c: c["budget"], reverse=True)

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
            if (directory / ROUTER_CONFIG).stat().st_size > _MAX_CONFIG_BYTES:
                raise ValueError(f"{ROUTER_CONFIG} is larger than {_MAX_CONFIG_BYTES >> 20} MiB")
            cfg = json.loads((directory / ROUTER_CONFIG).read_text())
            if not isinstance(cfg, dict):
                raise ValueError(f"{ROUTER_CONFIG} is not a JSON object")
            metric = cfg.pop("metric", None)
            if metric not in METRICS:
                raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
            adaptive_cfg = cfg.pop("adaptive", None)
            checked = _checked(cfg.pop("checked", None), space)
            config = _router_config(cfg)
            router = StaticRouter(space, config.budgets, config.hidden)
            state = load_file(directory / ROUTER_WEIGHTS)
            state.setdefault("prior", router.prior)  # routers saved before priors existed had none: zero
            router.load_state_dict(state)
            routers = cls(router.eval(), metric, config, checked=checked)
            if adaptive_cfg is not None:
                routers.adaptive_config = _router_config(adaptive_cfg)
                state = load_file(directory / ADAPTIVE_WEIGHTS)
                # Routers trained before the check against static routed adaptively at every budget.
                state.setdefault("learned", torch.ones(len(routers.adaptive_config.budgets)))
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


def _checked(checked: object, space: ElasticSpace) -> list[dict] | None:
    """The stored check against uniform, each entry's kept sub-network valid in `space`."""
    if checked is None:
        return None
    if not isinstance(checked, list):
        raise ValueError("checked must be a list")
    for i, c in enumerate(checked):
        if not (isinstance(c, dict) and isinstance(c.get("kept"), str) and isinstance(c.get("subnet"), dict)
                and isinstance(c.get("budget"), (int, float)) and not isinstance(c["budget"], bool)
                and 0 < c["budget"] <= 1):
            raise ValueError(f"checked[{i}] needs a budget in (0, 1], the kept candidate's name and its sub-network")
        try:
            sub = c["subnet"]
            subnet = Subnet(mlp=list(sub["mlp"]), attn=list(sub["attn"]), hidden=sub.get("hidden"))
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"checked[{i}].subnet needs mlp and attn lists") from None
        try:
            space.validate(subnet)
        except FlextronError as e:
            raise ValueError(f"checked[{i}]: {e}") from None
    return checked


def _router_config(cfg: dict) -> RouteOptions:
    return RouteOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
