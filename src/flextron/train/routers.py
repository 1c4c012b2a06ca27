"""Stages 2-3: static routers trained through a surrogate model, then joint fine-tuning; and the
input-adaptive routers (per-token MLP, per-request attention) trained the same two-stage way.

Stage 2 keeps the LLM frozen. Each step draws a budget from the grid, samples per-layer
choices from the router (straight-through Gumbel-softmax, annealed temperature), and measures
the distillation loss of that sub-network on a fixed probe batch (hard slices: cheap). The surrogate learns to
predict that loss from the choices; while its running relative error is under the threshold,
the router descends surrogate loss + budget loss, so no gradient crosses the LLM. The
ablation (`surrogate=False`) instead back-propagates the LLM's loss into the router through
soft masks (straight-through Gumbel). Stage 3 drops the surrogate and fine-tunes LLM and router
together through the soft masks.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flextron.adaptive import AdaptiveRouters, AdaptiveRouting, calibrate
from flextron.config import Budget, RouterConfig
from flextron.cost import budget_metric, cost_table
from flextron.data import PackedSequences
from flextron.elastic import ElasticModel
from flextron.precision import autocast, compute_dtype
from flextron.routers import Routers, StaticRouter, Surrogate, decode, expected_cost, gumbel
from flextron.train.loop import kd_loss


def _soft(em: ElasticModel, mlp: torch.Tensor, attn: torch.Tensor) -> None:
    em.set_soft([mlp[i, : len(c)] for i, c in enumerate(em.space.mlp)],
                [attn[i, : len(c)] for i, c in enumerate(em.space.attn)])


def train_routers(em: ElasticModel, teacher: ElasticModel, data: PackedSequences, cfg: RouterConfig,
                  progress: bool = True) -> tuple[Routers, list[dict]]:
    """Train a static router for `em` (stage 2) and fine-tune both (stage 3); returns routers and a log."""
    device = next(em.parameters()).device
    metric = budget_metric(em, Budget(metric=cfg.metric, fraction=1.0))
    table = cost_table(em, metric)
    full = table(em.space, em.space.full())
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    router = StaticRouter(em.space, cfg.budgets, cfg.hidden).to(device)
    opt = torch.optim.Adam(router.parameters(), lr=cfg.router_lr)
    n_in = router.mlp_mask.numel() + router.attn_mask.numel()
    surrogate = Surrogate(n_in, cfg.surrogate_hidden).to(device)
    s_opt = torch.optim.Adam(surrogate.parameters(), lr=1e-3)
    xs: list[torch.Tensor] = []
    ys: list[float] = []
    err_ema = math.inf
    amp = compute_dtype(cfg.dtype)
    log = []
    t0 = time.time()
    em.requires_grad_(False)
    # The surrogate's targets come from one fixed batch: the loss is then a function of the
    # architecture alone, which the surrogate can learn (fresh batches add data noise it cannot).
    probe = data.rows(0, cfg.micro_batch).to(device)
    with torch.no_grad(), autocast(device, amp):
        t_probe = teacher(input_ids=probe, use_cache=False).logits
    total = cfg.steps + cfg.joint_steps
    bar = tqdm(total=total, desc="routers", disable=not progress)
    llm_opt = None
    for step in range(total):
        joint, llm_opt, tau, fraction = _schedule(em, cfg, step, llm_opt, gen)
        mlp_logits, attn_logits = router(fraction)
        ym, ya = gumbel(mlp_logits, tau, gen), gumbel(attn_logits, tau, gen)
        # The budget term uses the tempered choice probabilities: smooth, free of sampling noise,
        # and converging to the argmax's cost as the temperature falls.
        ratio = expected_cost(table, F.softmax(mlp_logits / tau, -1), F.softmax(attn_logits / tau, -1)) / (
            fraction * full)
        budget_loss = F.relu((ratio - 1).abs() - cfg.tolerance)
        used_surrogate = False
        if joint or not cfg.surrogate:
            ids = data.rows(step * cfg.micro_batch, cfg.micro_batch).to(device)
            with torch.no_grad(), autocast(device, amp):
                t_logits = teacher(input_ids=ids, use_cache=False).logits
            _soft(em, ym, ya)
            with autocast(device, amp):
                kd = kd_loss(em(input_ids=ids, use_cache=False).logits, t_logits)
            loss = kd + cfg.budget_weight * budget_loss
            measured = kd.item()
        else:
            em.set_subnet(decode(em.space, ym.detach(), ya.detach()))
            with torch.no_grad(), autocast(device, amp):
                measured = kd_loss(em(input_ids=probe, use_cache=False).logits, t_probe).item()
            x = torch.cat([ym.flatten(), ya.flatten()]).float()
            with torch.no_grad():
                # Error relative to the typical loss seen so far: the loss itself is ~0 at full width.
                scale = (sum(ys) + measured) / (len(ys) + 1)
                rel = abs(surrogate(x.detach()).item() - measured) / max(scale, 1e-6)
            err_ema = rel if math.isinf(err_ema) else 0.9 * err_ema + 0.1 * rel
            xs.append(x.detach())
            ys.append(measured)
            _fit_surrogate(surrogate, s_opt, xs, ys, cfg.surrogate_fit_steps, gen)
            used_surrogate = err_ema < cfg.surrogate_threshold
            loss = cfg.budget_weight * budget_loss
            if used_surrogate:
                surrogate.requires_grad_(False)
                loss = loss + surrogate(x)
                surrogate.requires_grad_(True)
        _update(em, loss, opt, llm_opt)
        log.append({"step": step + 1, "stage": "joint" if joint else "router", "budget": fraction, "tau": tau,
                    "cost_ratio": ratio.item(), "kd": measured, "surrogate_error": err_ema,
                    "surrogate_used": used_surrogate, "elapsed_s": time.time() - t0})
        bar.update(1)
        bar.set_postfix(kd=f"{measured:.3f}", cost=f"{ratio.item():.2f}", sm_err=f"{err_ema:.2f}")
    bar.close()
    em.requires_grad_(False)
    em.set_subnet(None)
    em.eval()
    return Routers(router.eval(), metric, cfg), log


def _schedule(em: ElasticModel, cfg: RouterConfig, step: int, llm_opt: torch.optim.Optimizer | None,
              gen: torch.Generator) -> tuple[bool, torch.optim.Optimizer | None, float, float]:
    """The step's stage (joint or not), the LLM optimizer (made when the joint stage starts), the
    Gumbel temperature and a budget drawn from the grid."""
    joint = step >= cfg.steps
    if joint and llm_opt is None:
        em.requires_grad_(True)
        em.train()
        llm_opt = torch.optim.AdamW(em.parameters(), lr=cfg.llm_lr, weight_decay=0.0)
    fraction = cfg.budgets[torch.randint(len(cfg.budgets), (1,), generator=gen).item()]
    return joint, llm_opt, _tau(cfg, step), fraction


def _update(em: ElasticModel, loss: torch.Tensor, opt: torch.optim.Optimizer,
            llm_opt: torch.optim.Optimizer | None) -> None:
    """One step of the routers (and of the clipped LLM in the joint stage)."""
    opt.zero_grad(set_to_none=True)
    if llm_opt is not None:
        llm_opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if llm_opt is not None:
        torch.nn.utils.clip_grad_norm_(em.parameters(), 1.0)
        llm_opt.step()


def _tau(cfg: RouterConfig, step: int) -> float:
    """Gumbel temperature: annealed exponentially over the router steps, then held at the end value."""
    if step >= cfg.steps:
        return cfg.tau_end
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, cfg.steps - 1))


def train_adaptive(em: ElasticModel, teacher: ElasticModel, data: PackedSequences, cfg: RouterConfig,
                   progress: bool = True) -> tuple[AdaptiveRouters, list[dict]]:
    """Train per-token MLP and per-request attention routers for `em` (LLM frozen), then fine-tune
    both; budgets are fractions of the static routers' metric. Returns the routers and a log."""
    device = next(em.parameters()).device
    table = cost_table(em, em.routers.metric)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    routers = AdaptiveRouters(em.space.mlp, em.space.attn, em.config.hidden_size, cfg.budgets, cfg.hidden).to(device)
    routers.zero_residual_()  # start from the static router's choices
    routing = AdaptiveRouting(em, routers, table).attach()
    opt = torch.optim.Adam(routers.parameters(), lr=cfg.router_lr)
    amp = compute_dtype(cfg.dtype)
    em.requires_grad_(False)
    llm_opt = None
    log, t0 = [], time.time()
    total = cfg.steps + cfg.joint_steps
    bar = tqdm(total=total, desc="adaptive routers", disable=not progress)
    try:
        for step in range(total):
            joint, llm_opt, tau, fraction = _schedule(em, cfg, step, llm_opt, gen)
            ids = data.rows(step * cfg.micro_batch, cfg.micro_batch).to(device)
            with torch.no_grad(), autocast(device, amp):
                t_logits = teacher(input_ids=ids, use_cache=False).logits
            routing.start(fraction, ids, tau, gen)
            with autocast(device, amp):
                kd = kd_loss(em(input_ids=ids, use_cache=False).logits, t_logits)
            # The budget binds the average cost over tokens and requests, not each token's.
            ratio = routing.expected_ratio() / fraction
            balance = routing.balance()
            loss = kd + cfg.budget_weight * F.relu((ratio - 1).abs() - cfg.tolerance) + cfg.balance_weight * balance
            _update(em, loss, opt, llm_opt)
            # The gates are one-hot in value, so `ratio` is the realised cost of the sampled widths.
            log.append({"step": step + 1, "stage": "joint" if joint else "router", "budget": fraction, "tau": tau,
                        "cost_ratio": ratio.item(), "kd": kd.item(), "balance": balance.item(),
                        "elapsed_s": time.time() - t0})
            bar.update(1)
            bar.set_postfix(kd=f"{kd.item():.3f}", cost=f"{ratio.item():.2f}")
        em.requires_grad_(False)
        em.eval()
        routers.eval()
        # Sampling at the last temperature and the argmax realise different costs: calibrate the argmax.
        held = data.rows(total * cfg.micro_batch, max(8, cfg.micro_batch)).to(device)
        with autocast(device, amp):
            realised = calibrate(routing, held)
        log.append({"stage": "calibration", "budgets": list(cfg.budgets), "realised": realised,
                    "shift": routers.shift.tolist(), "elapsed_s": time.time() - t0})
    finally:
        bar.close()
        routing.detach()
        em.requires_grad_(False)
        em.eval()
    return routers.eval(), log


def _fit_surrogate(model: Surrogate, opt: torch.optim.Optimizer, xs: list[torch.Tensor], ys: list[float],
                   steps: int, gen: torch.Generator) -> None:
    """A few Adam steps of MSE on random mini-batches of everything measured so far."""
    x, y = torch.stack(xs), torch.tensor(ys, device=xs[0].device)
    for _ in range(steps):
        i = torch.randint(len(xs), (min(64, len(xs)),), generator=gen).to(x.device)
        loss = F.mse_loss(model(x[i]), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
