"""`EvalRow`, the typed result row of every evaluation, and the JSON run files hold of it: light
(no model code), so a run's JSON is read without loading what evaluated it."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from flextron.space import Budget, Subnet

_SUBNETS = ("subnet", "uniform_subnet", "static_subnet")


@dataclass
class EvalRow:
    """One budget's result: of `eval_at_budgets`, `adaptive_at_budgets` or `router_report` (`flextron.evaluate`).

    `budget` is the `Budget` the row answers; its `str` is the label every table prints (50%,
    params=8e+07). Rows with a `metric` (adaptive routing, the router report) hold a fraction of
    the full cost in that metric, the routers'. Fields that do not apply stay None. `to_dict` is
    the JSON every run file holds: unset fields left out, the budget a number where `metric` is
    set and its label elsewhere.
    """

    budget: Budget
    metric: str | None = None
    adaptive: bool = False
    subnet: Subnet | None = None
    cost: dict | None = None  # `Cost.to_dict()`
    params_fraction: float | None = None  # parameters the params metric counts / the full model's
    raw_cost_ratio: float | None = None  # the router's argmax before projection: cost / target
    cost_ratio: float | None = None  # realised cost / target
    fraction_of_full: float | None = None  # cost / full cost, in `metric`
    uniform_subnet: Subnet | None = None  # the largest uniform sub-network within the budget
    uniform_fraction_of_full: float | None = None
    ppl: float | None = None
    tokens: int | None = None  # the tokens `ppl` scored
    tasks: dict[str, dict] | None = None  # per task, its scores (`flextron.tasks.score_task`)
    ppl_data: float | None = None  # perplexity on the user's text file (`eval --ppl-data`)
    data_tokens: int | None = None  # the tokens `ppl_data` scored
    chat: dict | None = None  # agreement and KL with the original on chat prompts (`flextron.behaviour.compare`)
    uniform_ppl: float | None = None
    realised_fraction: float | None = None  # adaptive: the average realised cost / full cost
    kept: str | None = None  # what the check on held-out training rows kept (router, uniform, lower budget;
    # adaptive: adaptive or static)
    calib_ppl: dict[str, float] | None = None  # that check's perplexity per candidate
    static_ppl: float | None = None  # adaptive: the static router at the realised cost
    static_fraction_of_full: float | None = None
    static_subnet: Subnet | None = None

    def to_dict(self) -> dict:
        out = {f.name: v.to_dict() if isinstance(v, Subnet) else v for f in fields(self)
               if (v := getattr(self, f.name)) is not None and v is not False}
        out["budget"] = self.budget.fraction if self.metric is not None else str(self.budget)
        if self.adaptive:  # adaptive rows have always ended with the cost ratio and the static router
            for key in ("cost_ratio", "static_ppl", "static_fraction_of_full", "static_subnet"):
                if key in out:
                    out[key] = out.pop(key)
        return out

    @classmethod
    def from_dict(cls, row: dict) -> EvalRow:
        """A row as `to_dict` wrote it (every run file so far)."""
        b = row["budget"]
        budget = Budget.parse(b) if isinstance(b, str) else Budget(fraction=float(b))
        return cls(**{**row, "budget": budget, **{k: Subnet(**row[k]) for k in _SUBNETS if k in row}})


def rows_json(data: object) -> str:
    """`data` as indented JSON, its `EvalRow`s as `to_dict` writes them."""
    def encode(x: object) -> dict:
        if isinstance(x, EvalRow):
            return x.to_dict()
        raise TypeError(f"{type(x).__name__} is not JSON serializable")

    return json.dumps(data, indent=1, default=encode)
