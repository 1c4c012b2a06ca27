"""Stages 2-3: static routers trained straight through the LLM (or through a surrogate model), then
joint fine-tuning; the input-adaptive routers (per-token MLP, per-request attention) trained the
same two-stage way; and `route`, the stage that runs them on a checkpoint, checks, stores and
reports them.

Stage 2 keeps the LLM frozen. Each step draws a budget from the grid, a relaxed Gumbel-softmax
sample of the router's choices (annealed temperature) and a fresh training batch, and
back-propagates the LLM's loss through soft masks (straight-through) plus the budget loss into the
router. With `surrogate=True` (the paper's method; off by default because it never became accurate
enough to guide at CPU step counts) a surrogate (an MLP from the router's per-layer choice
probabilities to the LLM's distillation loss, `flextron.train.surrogate`) first warms up on random
architectures of every size and is fitted on every sampled architecture's loss; while its running
error on architectures it had not yet seen is under the threshold, the router descends surrogate +
budget loss instead and the LLM only runs forward (hard slices). Stage 3 fine-tunes LLM and router
together through the soft masks.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from flextron.adaptive import AdaptiveLM, AdaptiveRouting, calibrate
from flextron.budgets import (
    budget_metric,
    cost_table,
    select_subnet,
    smallest_fraction,
    uniform_candidates,
    uniform_subnet_for,
)
from flextron.chat import chat_rows
from flextron.checkpoint import load_checkpoint, save_checkpoint, weights_id
from flextron.cost import MEASURED, CostTable, fits
from flextron.data import MixedSequences, PackedSequences, heldout_windows, load_corpus, tokenize
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.evaluate import adaptive_router_report, checked_router_report, perplexity
from flextron.fsutil import atomic_write, check_output_dir
from flextron.generation import check_positions, within_context
from flextron.latency_table import check_weight_type
from flextron.options import RouteOptions, write_yaml
from flextron.precision import autocast, compute_dtype
from flextron.results import rows_json
from flextron.routers import (
    AdaptiveRouters,
    Choices,
    Routers,
    StaticRouter,
    decode,
    expected_cost,
    gumbel,
    project,
    relaxed,
    straight_through,
)
from flextron.space import Budget, Subnet
from flextron.train.losses import kd_loss
from flextron.train.surrogate import OnlineSurrogate, random_logits


def route(ckpt: str | Path, cfg: RouteOptions, data: list[str] | None, *, out: str | Path | None, overwrite: bool,
          device: str, adaptive: bool, progress: bool) -> dict:
    """Train static routers (straight through the LLM, or surrogate-guided) and fine-tune jointly; per
    budget keep the better of the routed and the largest uniform sub-network on held-out training rows;
    store them in the checkpoint (or in `out`) and report (also in routing.json), per budget, the kept
    sub-network, its cost and held-out perplexity on the grid and `cfg.check_budgets` (default: midway
    between the grid's two lowest and its two highest). Between those, a budget every `cfg.check_step` is
    checked too (`check_fractions`), not reported.

    `adaptive`: on a checkpoint with static routers, train the input-adaptive routers instead, per
    grid budget keep the better of adaptive routing and the static sub-network (`check_against_static`), and
    report them (adaptive.json) against the static router at the same realised cost. The resolved
    options go beside the report (routing.yaml, adaptive.yaml) for `flextron route --config`."""
    ckpt = Path(ckpt)
    out = Path(out or ckpt)
    if out != ckpt:
        check_output_dir(out, overwrite)
    em, tok, manifest = load_checkpoint(ckpt, device=device)
    em.deployment = cfg.deployment(cfg.outtype or "f32")  # what memory budgets are priced at
    if adaptive and em.routers is None:
        raise FlextronError(f"{ckpt} has no static routers yet; run `flextron route {ckpt}` first, then --adaptive")
    if adaptive and cfg.metric not in ("auto", em.routers.metric):
        raise FlextronError(f"adaptive routers take the budgets of the static routers ({em.routers.metric}), not "
                            f"{cfg.metric}; drop --metric")
    lowest = smallest_fraction(em, cfg.metric)
    metric = budget_metric(em, Budget(metric=cfg.metric, fraction=1.0))
    check_weight_type(em.latency, metric, cfg.outtype)
    if metric in MEASURED:  # the routers record the weight type their latency budgets hold at
        cfg = replace(cfg, outtype=em.latency.outtype)
    if cfg.budgets == RouteOptions().budgets:  # the default grid starts at the smallest sub-network when above it
        cfg = replace(cfg, budgets=tuple(sorted({max(b, math.ceil(lowest * 100) / 100) for b in cfg.budgets})))
    grid = sorted(cfg.budgets)
    if cfg.check_budgets is None:
        pairs = (grid[:2], grid[-2:]) if len(grid) > 1 else ()  # one budget (e.g. timing noise): none between
        cfg = replace(cfg, check_budgets=tuple(sorted({round((a + b) / 2, 4) for a, b in pairs})) or tuple(grid))
    fractions = sorted(set(grid) | set(cfg.check_budgets))
    if not fits(lowest, fractions[0]):
        raise FlextronError(f"router budgets must lie between {lowest:.2f} (the smallest sub-network) and 1.0 "
                            f"of the full model's cost; got {fractions}")
    check_positions(em.config, cfg.seq_len, "--seq-len")
    teacher, _, _ = load_checkpoint(ckpt, device=device)
    teacher.requires_grad_(False)
    data_seq = _rows(cfg, data, tok, teacher, weights_id(manifest), progress)
    if adaptive:
        em.routers.adaptive, log = train_adaptive(em, teacher, data_seq, cfg, progress=progress)
        em.routers.adaptive_config = cfg
    else:
        em.routers, log = train_routers(em, teacher, data_seq, cfg, progress=progress)
    del teacher
    amp = compute_dtype(cfg.dtype, device)
    if not adaptive and cfg.check_sequences > 0:  # on training rows the routers never read
        check_against_uniform(em, data_seq.rows(rows_used(cfg), cfg.check_sequences),
                              check_fractions(fractions, cfg.check_step), amp, progress)
    key = "adaptive_routing" if adaptive else "routing"
    manifest[key] = {"metric": em.routers.metric, "steps": cfg.steps, "joint_steps": cfg.joint_steps,
                     "surrogate": cfg.surrogate and not adaptive, **({"outtype": cfg.outtype} if cfg.outtype else {})}
    if cfg.surrogate and not adaptive:
        manifest[key]["surrogate_guided"] = guided_fraction(log)
    save_checkpoint(em, tok, out, manifest, overwrite=True)
    windows = heldout_windows(tok, within_context(em.config, cfg.eval_seq_len), cfg.eval_limit)
    report = adaptive_router_report if adaptive else checked_router_report
    result = {"checkpoint": str(out), "metric": em.routers.metric,
              "budgets": report(em, windows, fractions, amp, progress), "log": log,
              **{k: v for k, v in manifest[key].items() if k in ("surrogate_guided", "outtype")}}
    name = "adaptive" if adaptive else "routing"
    atomic_write(out / f"{name}.json", lambda p: p.write_text(rows_json(result)))
    data = None if data is None else [str(Path(d).resolve()) if Path(d).exists() else d for d in data]
    write_yaml(out / f"{name}.yaml", {**asdict(cfg), "data": data, "device": device, "adaptive": adaptive})
    return result


def check_fractions(fractions: list[float], step: float) -> list[float]:
    """`fractions` and, below each, a budget every `step` of it down to the next one: a budget asked
    between two of them is served the one below (`select_subnet`), which is then at least `1 - step` of it."""
    out = set(fractions)
    for low, high in zip(fractions, fractions[1:]):
        x = high
        while step > 0:
            # 4 decimals, rounded up (no gap wider than `step`), and at least one down (a step finer than that ends)
            x = min(math.ceil(x * (1 - step) * 1e4) / 1e4, round(x - 1e-4, 4))
            if x <= low:
                break
            out.add(x)
    return sorted(out)


def _rows(cfg: RouteOptions, data: list[str] | None, tok: PreTrainedTokenizerBase, teacher: ElasticModel,
          teacher_id: str, progress: bool) -> PackedSequences | MixedSequences:
    """The rows routing reads: the text, and beside it (at a share of --chat-mix) the chat data, enough for
    every row the routers, the calibration and the check read."""
    text = PackedSequences(tokenize(tok, load_corpus(data)), cfg.seq_len, cfg.seed)
    rows = rows_used(cfg) + calibration_rows(cfg) + cfg.check_sequences
    chat = chat_rows(cfg, tok, teacher, teacher_id, math.ceil(rows * cfg.seq_len * cfg.chat_mix) + cfg.seq_len,
                     cfg.seq_len, cfg.seed, progress=progress)
    return text if chat is None else MixedSequences(text, chat, cfg.chat_mix)


def _soft(em: ElasticModel, y: Choices) -> None:
    em.set_soft([y.mlp[i, : len(c)] for i, c in enumerate(em.space.mlp)],
                [y.attn[i, : len(c)] for i, c in enumerate(em.space.attn)], y.hidden)


def _random_logits(router: StaticRouter, gen: torch.Generator, device: torch.device) -> Choices:
    """Random router logits (`random_logits`) for every choice the router makes."""
    hidden = None
    if router.n_hidden:
        hidden = random_logits(torch.ones(1, router.n_hidden, dtype=torch.bool), gen)[0].to(device)
    return Choices(*(random_logits(mask, gen).to(device) for mask in (router.mlp_mask, router.attn_mask)), hidden)


def train_routers(em: ElasticModel, teacher: ElasticModel, data: PackedSequences | MixedSequences, cfg: RouteOptions,
                  progress: bool = True) -> tuple[Routers, list[dict]]:
    """Train a static router for `em` (stage 2) and fine-tune both (stage 3); returns routers and a log."""
    with em.subnet(None):  # the steps slice the model: the full one after them, whatever happens
        return _train_routers(em, teacher, data, cfg, progress)


def _train_routers(em: ElasticModel, teacher: ElasticModel, data: PackedSequences | MixedSequences, cfg: RouteOptions,
                   progress: bool) -> tuple[Routers, list[dict]]:
    device = next(em.parameters()).device
    metric = budget_metric(em, Budget(metric=cfg.metric, fraction=1.0))
    table = cost_table(em, metric)
    full = table.full
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    router = StaticRouter(em.space, cfg.budgets, cfg.hidden).to(device)
    amp = compute_dtype(cfg.dtype, device)
    em.requires_grad_(False)
    t0 = time.time()

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh training rows for call i, and the teacher's logits on them."""
        ids = data.rows(i * cfg.micro_batch, cfg.micro_batch).to(device)
        with torch.no_grad(), autocast(device, amp):
            return ids, teacher(input_ids=ids, use_cache=False).logits

    log = warm_start(em, router, table, *batch(0), cfg.warm_start, amp, progress) if cfg.warm_start > 0 else []
    opt = torch.optim.Adam(router.parameters(), lr=cfg.router_lr)
    surrogate = OnlineSurrogate(router.n_choices, cfg, gen, device) if cfg.surrogate else None
    warmup = cfg.surrogate_warmup if surrogate else 0
    total = cfg.steps + cfg.joint_steps
    bar = tqdm(total=warmup + total, desc="routers", disable=not progress)

    def measure(y: Choices, ids: torch.Tensor, t_logits: torch.Tensor) -> float:
        return subnet_loss(em, decode(em.space, y), ids, t_logits, amp)

    for i in range(warmup):  # diverse random architectures, before any router update
        logits = _random_logits(router, gen, device)
        y = logits.map(lambda t: straight_through(relaxed(t, 1.0, gen)))
        surrogate.observe(logits.map(lambda t: F.softmax(t, -1)), y, measure(y, *batch(i)))
        log.append({"step": i + 1, "stage": "warmup", "kd": surrogate.ys[-1], "surrogate_error": surrogate.error,
                    "surrogate_used": False, "elapsed_s": time.time() - t0})
        bar.update(1)
    llm_opt = None
    for step in range(total):
        joint, llm_opt, tau, fraction = _schedule(em, cfg, step, llm_opt, gen)
        logits = router(fraction)
        y = logits.map(lambda t, tau=tau: gumbel(t, tau, gen))
        # What the router outputs: per-layer choice probabilities. The Gumbel argmax draws each
        # layer's choice with exactly these probabilities (whatever the temperature).
        probs = logits.map(lambda t: F.softmax(t, -1))
        # The budget term uses the tempered choice probabilities: smooth, free of sampling noise,
        # and converging to the argmax's cost as the temperature falls. Once they saturate their
        # gradient vanishes, and a router that the loss pulled over budget would stay there: the
        # argmax's own cost (straight through the untempered probabilities) is bound too.
        ratio = expected_cost(table, logits.map(lambda t, tau=tau: F.softmax(t / tau, -1))) / (fraction * full)
        argmax_ratio = expected_cost(table, probs.map(straight_through)) / (fraction * full)
        budget_loss = F.relu((ratio - 1).abs() - cfg.tolerance) + F.relu((argmax_ratio - 1).abs() - cfg.tolerance)
        ids, t_logits = batch(warmup + step)
        # Guided: descend the surrogate's prediction, the LLM only measures (forward, hard slices).
        # Otherwise (joint stage, ablation, or a surrogate not yet accurate) the step goes straight
        # through the LLM: the router still learns from the true loss instead of idling on the budget.
        guided = surrogate is not None and not joint and surrogate.accurate
        if guided:
            measured = measure(y.map(torch.Tensor.detach), ids, t_logits)
            loss = surrogate.predict(probs) + cfg.budget_weight * budget_loss
        else:
            _soft(em, y)
            with autocast(device, amp):
                kd = kd_loss(em(input_ids=ids, use_cache=False).logits, t_logits)
            loss = kd + cfg.budget_weight * budget_loss
            measured = kd.item()
            if joint and cfg.full_weight > 0:  # the full model is distilled too: joint steps keep it the original
                with em.subnet(None), autocast(device, amp):
                    loss = loss + cfg.full_weight * kd_loss(em(input_ids=ids, use_cache=False).logits, t_logits)
        _update(em, loss, opt, llm_opt)
        if surrogate is not None and not joint:
            surrogate.observe(probs.map(torch.Tensor.detach), y.map(torch.Tensor.detach), measured)
        guide = {} if surrogate is None else {"surrogate_error": surrogate.error, "surrogate_used": guided}
        log.append({"step": step + 1, "stage": "joint" if joint else "router", "budget": fraction, "tau": tau,
                    "cost_ratio": ratio.item(), "kd": measured, **guide, "elapsed_s": time.time() - t0})
        bar.update(1)
        bar.set_postfix(kd=f"{measured:.3f}", cost=f"{ratio.item():.2f}",
                        **({} if surrogate is None else {"sm_err": f"{surrogate.error:.2f}"}))
    bar.close()
    em.requires_grad_(False)
    em.eval()
    return Routers(router.eval(), metric, cfg), log


@torch.no_grad()
def subnet_loss(em: ElasticModel, subnet: Subnet, ids: torch.Tensor, t_logits: torch.Tensor,
                amp: torch.dtype | None) -> float:
    """Distillation loss of `subnet` (hard slices, forward only: cheap) against the teacher's logits."""
    em.set_subnet(subnet)
    with autocast(ids.device, amp):
        return kd_loss(em(input_ids=ids, use_cache=False).logits, t_logits).item()


@torch.no_grad()
def warm_start(em: ElasticModel, router: StaticRouter, table: CostTable, ids: torch.Tensor, t_logits: torch.Tensor,
               margin: float, amp: torch.dtype | None, progress: bool) -> list[dict]:
    """Start each grid budget where the distillation loss on `ids` is lowest: the maximal uniform
    sub-networks within it (`uniform_candidates`) and the randomly initialised router's own
    choice projected onto it compete, and the winner becomes the router's prior at that budget.
    Returns a log row per budget.

    Why: without a prior every draw picks each layer's choices alike, skips included, so the
    router learns from random models missing random layers and, with a few steps per budget,
    stays near one; which shape (narrow everywhere, wide with the least important sub-layers
    skipped, or mixed) suits a budget depends on the model, so the loss picks it."""
    losses: dict[tuple, float] = {}

    def loss(subnet: Subnet) -> float:
        key = (tuple(subnet.mlp), tuple(subnet.attn), subnet.hidden)
        if key not in losses:
            losses[key] = subnet_loss(em, subnet, ids, t_logits, amp)
        return losses[key]

    rows = []
    with em.subnet(None):
        for fraction in tqdm(router.grid.tolist(), desc="warm start", disable=not progress):
            target = fraction * table.full
            own = project(em.space, table, router(fraction).map(lambda t: F.log_softmax(t, -1)), target)
            best = min(uniform_candidates(em, table, target), key=loss, default=own)
            start, chosen = ("uniform", best) if loss(best) <= loss(own) else ("random", own)
            router.set_prior(fraction, chosen, margin)
            rows.append({"stage": "warm start", "budget": fraction, "start": start, "kd": loss(chosen),
                         "subnet": chosen.to_dict()})
    return rows


def calibration_rows(cfg: RouteOptions) -> int:
    """Rows the adaptive routers' argmax is calibrated on, after their training rows."""
    return max(8, cfg.micro_batch)


def rows_used(cfg: RouteOptions) -> int:
    """Training rows that `train_routers` reads (warm-up, router and joint steps); later rows are held out."""
    return (cfg.surrogate_warmup * cfg.surrogate + cfg.steps + cfg.joint_steps) * cfg.micro_batch


@torch.no_grad()
def check_against_uniform(em: ElasticModel, windows: torch.Tensor, fractions: list[float],
                          autocast_dtype: torch.dtype | None = None, progress: bool = True) -> list[dict]:
    """Never worse than the baseline: per budget (ascending, in the routers' metric), perplexity on
    held-out `windows` of the routed sub-network, the largest uniform one within the budget and
    the sub-network kept for the budget below (it fits too); the best is kept, so the kept
    perplexity never rises with the budget. Stores the checks in `em.routers.checked`; a budget
    between them is served what was kept at the checked budget below it (`select_subnet`)."""
    em.routers.checked = None  # route, do not read earlier checks
    checks, lower = [], None
    for fraction in sorted(fractions):
        budget = Budget(fraction=fraction)
        candidates = {"router": select_subnet(em, budget)}
        try:
            candidates["uniform"] = uniform_subnet_for(em, budget)[0]
        except FlextronError:  # per-layer spaces: no uniform sub-network may fit
            pass
        if lower is not None:
            candidates["lower budget"] = lower
        ppl: dict[str, float] = {}
        for name, subnet in candidates.items():
            same = next((k for k in ppl if candidates[k] == subnet), None)
            if same is not None:
                ppl[name] = ppl[same]
                continue
            with em.subnet(subnet):
                ppl[name] = perplexity(em, windows, 4, autocast_dtype, progress, desc=f"check {name} @ {fraction:.0%}")
        kept = min(ppl, key=ppl.get)  # ties keep the router's choice (first)
        lower = candidates[kept]
        checks.append({"budget": fraction, "kept": kept, "subnet": lower.to_dict(), "calib_ppl": ppl})
    em.routers.checked = checks
    return checks


@torch.no_grad()
def check_against_static(routing: AdaptiveRouting, windows: torch.Tensor, autocast_dtype: torch.dtype | None = None,
                         progress: bool = True) -> list[dict]:
    """Never worse than static routing: per grid budget, perplexity on held-out `windows` of the
    adaptive routing (scored causally, as `eval` scores it: `AdaptiveLM`) and of the static router's
    sub-network (what `eval` serves at the budget);
    where static is better it is served at that budget instead (`AdaptiveRouters.learned`).
    Returns a log row per budget.

    Why: straight-through router training can lead away from a start that routes as well as the
    static router (on one checkpoint its distillation loss rose through training at every budget
    from 50% up)."""
    routers, rows = routing.routers, []
    for i, fraction in enumerate(routers.grid.tolist()):
        ppl, realised = {}, {}
        for name, learned in (("adaptive", 1.0), ("static", 0.0)):
            routers.learned[i] = learned
            lm = AdaptiveLM(routing, fraction)
            ppl[name] = perplexity(lm, windows, 4, autocast_dtype, progress, desc=f"check {name} @ {fraction:.0%}")
            realised[name] = sum(lm.costs) / len(lm.costs)
        kept = min(ppl, key=ppl.get)  # ties keep adaptive routing (first)
        routers.learned[i] = 1.0 if kept == "adaptive" else 0.0
        rows.append({"stage": "check", "budget": fraction, "kept": kept, "calib_ppl": ppl, "realised": realised})
    return rows


def guided_fraction(log: list[dict]) -> float:
    """The share of router steps (LLM frozen) that descended the surrogate."""
    steps = [r for r in log if r.get("stage") == "router"]
    return sum(r["surrogate_used"] for r in steps) / max(len(steps), 1)


def _schedule(em: ElasticModel, cfg: RouteOptions, step: int, llm_opt: torch.optim.Optimizer | None,
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


def _tau(cfg: RouteOptions, step: int) -> float:
    """Gumbel temperature: annealed exponentially over the router steps, then held at the end value."""
    if step >= cfg.steps:
        return cfg.tau_end
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, cfg.steps - 1))


def train_adaptive(em: ElasticModel, teacher: ElasticModel, data: PackedSequences | MixedSequences, cfg: RouteOptions,
                   progress: bool = True) -> tuple[AdaptiveRouters, list[dict]]:
    """Train per-token MLP and per-request attention routers for `em` (LLM frozen), then fine-tune
    both; budgets are fractions of the static routers' metric (each run at its hidden size, in a space
    with hidden sizes: `AdaptiveRouting.start`). Returns the routers and a log."""
    device = next(em.parameters()).device
    table = cost_table(em, em.routers.metric)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    routers = AdaptiveRouters(em.space.mlp, em.space.attn, em.config.hidden_size, cfg.budgets, cfg.hidden).to(device)
    routers.zero_residual_()  # start from the static router's choices
    routing = AdaptiveRouting(em, routers, table)
    opt = torch.optim.Adam(routers.parameters(), lr=cfg.router_lr)
    amp = compute_dtype(cfg.dtype, device)
    em.requires_grad_(False)
    llm_opt = None
    log, t0 = [], time.time()
    total = cfg.steps + cfg.joint_steps
    bar = tqdm(total=total, desc="adaptive routers", disable=not progress)
    try:
        with routing.attached():
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
            held = data.rows(total * cfg.micro_batch, calibration_rows(cfg)).to(device)
            with autocast(device, amp):
                realised = calibrate(routing, held)
            log.append({"stage": "calibration", "budgets": list(cfg.budgets), "realised": realised,
                        "shift": routers.shift.tolist(), "elapsed_s": time.time() - t0})
            if cfg.check_sequences > 0:  # on rows neither training nor calibration read
                rows = data.rows(total * cfg.micro_batch + len(held), cfg.check_sequences)
                log += check_against_static(routing, rows, amp, progress)
    finally:
        bar.close()
        em.requires_grad_(False)
        em.eval()
    return routers.eval(), log
