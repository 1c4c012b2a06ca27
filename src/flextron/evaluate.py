"""Held-out perplexity (and on a user's text file), task scores and chat behaviour of the sub-networks
that budgets select, as typed rows (`flextron.results.EvalRow`); the router reports, static and adaptive."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from flextron.adaptive import AdaptiveLM, AdaptiveRouting
from flextron.budgets import budget_target, select_subnet, smallest_fraction, uniform_subnet_for
from flextron.cost import subnet_cost
from flextron.data import tokenize
from flextron.data import windows as cut_windows
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.precision import autocast
from flextron.results import EvalRow
from flextron.routers import decode
from flextron.space import Budget, Subnet


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 8,
               autocast_dtype: torch.dtype | None = None, progress: bool = True,
               desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over all windows [N, T]; each window scored independently."""
    device = next(model.parameters()).device
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        with autocast(device, autocast_dtype):
            logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def counted_params(em: ElasticModel, subnet: Subnet | None = None) -> int:
    """The parameters the `params` metric counts: all of them in a space with hidden sizes (the hidden
    size shrinks the embeddings and LM head), else the non-embedding ones (`flextron.cost`)."""
    cost = subnet_cost(em, subnet)
    return cost.params if em.space.hidden else cost.params_nonembed


def _sized_row(em: ElasticModel, budget: Budget, subnet: Subnet, params_full: float, **more: Any) -> EvalRow:
    """A row for `subnet` with its cost and its share of the full model's parameters (`counted_params`)."""
    return EvalRow(budget, subnet=subnet, cost=subnet_cost(em, subnet).to_dict(),
                   params_fraction=counted_params(em, subnet) / params_full, **more)


def read_text_file(path: str | Path, flag: str = "--ppl-data") -> str:
    """A user's UTF-8 text file (`flag` names it in the one-line refusal of a missing, unreadable or empty one)."""
    path = Path(path)
    if not path.is_file():
        raise FlextronError(f"{flag} {path} is not a file; pass a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FlextronError(f"cannot read {flag} {path} ({e}); pass a UTF-8 text file") from None
    if not text.strip():
        raise FlextronError(f"{flag} {path} holds no text; pass a UTF-8 text file")
    return text


def text_windows(tok: PreTrainedTokenizerBase, text: str, seq_len: int, limit: int | None = None,
                 what: str = "--ppl-data") -> Tensor:
    """Perplexity windows of a text (`what` names it in the refusal of one shorter than a window)."""
    ids = tokenize(tok, text)
    if ids.numel() < seq_len:
        raise FlextronError(f"{what} holds {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}; "
                            "pass more text or a smaller --seq-len")
    return cut_windows(ids, seq_len, limit)


def eval_at_budgets(em: ElasticModel, windows: Tensor | None, budgets: list[Budget], batch_size: int = 4,
                    autocast_dtype: torch.dtype | None = None, progress: bool = True,
                    tasks: Callable[[nn.Module], dict] | None = None, data_windows: Tensor | None = None,
                    chat: Callable[[ElasticModel], dict] | None = None) -> list[EvalRow]:
    """Per budget, the sub-network it selects (router, else largest uniform), its cost, held-out
    perplexity on `windows`, perplexity on `data_windows` (`ppl_data`), `tasks(model)` and `chat(em)`
    at the sub-network (`flextron.behaviour.compare`), each unless None."""
    full = counted_params(em)
    rows = []
    for budget in budgets:
        subnet = select_subnet(em, budget)
        row = _sized_row(em, budget, subnet, full)
        with em.subnet(subnet):
            if windows is not None:
                row.ppl = perplexity(em, windows, batch_size, autocast_dtype, progress, desc=f"ppl @ {budget}")
                row.tokens = int(windows[:, 1:].numel())
            if data_windows is not None:
                row.ppl_data = perplexity(em, data_windows, batch_size, autocast_dtype, progress,
                                          desc=f"ppl_data @ {budget}")
                row.data_tokens = int(data_windows[:, 1:].numel())
            if tasks is not None:
                row.tasks = tasks(em)
            if chat is not None:
                row.chat = chat(em)
        rows.append(row)
    return rows


def adaptive_at_budgets(em: ElasticModel, windows: Tensor | None, budgets: list[Budget], batch_size: int = 4,
                        autocast_dtype: torch.dtype | None = None, progress: bool = True,
                        tasks: Callable[[nn.Module], dict] | None = None, data_windows: Tensor | None = None,
                        chat: Callable[[nn.Module], dict] | None = None) -> list[EvalRow]:
    """Per budget (in the routers' metric), input-adaptive routing: each sequence a request, each
    token its MLP width, scored causally (`AdaptiveLM`: a window in chunks whose widths the tokens
    before them choose, a task's candidates at their context's widths, a chat answer at its prompt's).
    Rows hold the budget as a fraction, the realised average cost / full cost (of the windows and
    tasks scored), perplexity, `ppl_data`, tasks and chat, each unless None."""
    routing = AdaptiveRouting.for_model(em)
    fractions = [routing.fraction(b) for b in budgets]
    rows = []
    with routing.attached():
        for fraction in fractions:
            lm = AdaptiveLM(routing, fraction)
            row = EvalRow(Budget(fraction=fraction), metric=em.routers.metric, adaptive=True)
            if windows is not None:
                row.ppl = perplexity(lm, windows, batch_size, autocast_dtype, progress,
                                     desc=f"adaptive @ {fraction:.0%}")
            if data_windows is not None:
                row.ppl_data = perplexity(lm, data_windows, batch_size, autocast_dtype, progress,
                                          desc=f"adaptive ppl_data @ {fraction:.0%}")
                row.data_tokens = int(data_windows[:, 1:].numel())
            if tasks is not None:
                row.tasks = tasks(lm)
            if chat is not None:
                scored = len(lm.costs)
                row.chat = chat(lm)
                del lm.costs[scored:]  # its rows are right-padded: the realised cost is of the windows and tasks
            row.realised_fraction = sum(lm.costs) / max(len(lm.costs), 1)
            row.cost_ratio = row.realised_fraction / fraction
            rows.append(row)
    return rows


@torch.no_grad()
def router_report(em: ElasticModel, windows: Tensor, fractions: list[float], batch_size: int = 4,
                  autocast_dtype: torch.dtype | None = None, progress: bool = True, uniform: bool = True
                  ) -> list[EvalRow]:
    """Per budget: the routed sub-network (raw argmax and projected), its realised cost in the
    routers' metric and its parameters, its held-out perplexity, and (if `uniform`) the same for the
    largest uniform sub-network (not evaluated twice where it is the routed one)."""
    params_full = counted_params(em)
    rows = []
    for fraction in fractions:
        budget = Budget(fraction=fraction)
        table, target = budget_target(em, budget)
        full = table.full
        raw = decode(em.space, em.routers.static(fraction))
        routed = select_subnet(em, budget)
        row = _sized_row(em, budget, routed, params_full, metric=table.metric,
                         raw_cost_ratio=table(raw) / target, cost_ratio=table(routed) / target,
                         fraction_of_full=table(routed) / full, tokens=int(windows[:, 1:].numel()))
        with em.subnet(routed):
            row.ppl = perplexity(em, windows, batch_size, autocast_dtype, progress, desc=f"ppl @ {fraction:.0%}")
        if uniform:
            sub, _ = uniform_subnet_for(em, budget)
            row.uniform_subnet, row.uniform_fraction_of_full = sub, table(sub) / full
            if sub == routed:
                row.uniform_ppl = row.ppl
            else:
                with em.subnet(sub):
                    row.uniform_ppl = perplexity(em, windows, batch_size, autocast_dtype, progress,
                                                 desc=f"uniform_ppl @ {fraction:.0%}")
        rows.append(row)
    return rows


def checked_router_report(em: ElasticModel, windows: Tensor, fractions: list[float],
                          autocast_dtype: torch.dtype | None = None, progress: bool = True) -> list[EvalRow]:
    """The router report, with what the check against uniform kept per budget."""
    rows = router_report(em, windows, fractions, autocast_dtype=autocast_dtype, progress=progress)
    checks = {c["budget"]: c for c in em.routers.checked or []}
    for r in rows:
        check = checks.get(r.budget.fraction)
        if check is not None:
            r.kept, r.calib_ppl = check["kept"], check["calib_ppl"]
    return rows


def adaptive_router_report(em: ElasticModel, windows: Tensor, fractions: list[float],
                           autocast_dtype: torch.dtype | None = None, progress: bool = True) -> list[EvalRow]:
    """Adaptive routing per budget beside the static router at the very cost the adaptive routing
    realised (a like-for-like comparison), or at the smallest sub-network's where per-token routing
    realised less."""
    rows = adaptive_at_budgets(em, windows, [Budget(fraction=f) for f in fractions], autocast_dtype=autocast_dtype,
                               progress=progress)
    lowest = smallest_fraction(em, em.routers.metric)
    static = router_report(em, windows, [max(r.realised_fraction, lowest) for r in rows],
                           autocast_dtype=autocast_dtype, progress=progress, uniform=False)
    adaptive = em.routers.adaptive
    for r, s in zip(rows, static):
        r.static_ppl, r.static_fraction_of_full, r.static_subnet = s.ppl, s.fraction_of_full, s.subnet
        i = adaptive.grid_index(r.budget.fraction)
        if abs(adaptive.grid[i].item() - r.budget.fraction) < 1e-9:  # a grid budget: what the check kept
            r.kept = "adaptive" if adaptive.learned[i] else "static"
    return rows
