"""The measured latency table of a checkpoint (`latency.json`) as a type.

`LatencyTable` is the one reader of the file: it validates it on load (a damaged table is a
one-line error naming the file and what is wrong), prices sub-networks through a `CostTable` per
metric (built once per space), and holds the one rule for which llama.cpp graph runs a
sub-network. The fit itself (latency = overhead + per-layer terms, increments held non-negative,
least squares on the relative error; over several hidden sizes each term affine in the hidden size,
see `fit`) lives here too, since an old table with decreasing terms is refitted from its
measurements on load; `flextron.latency` measures the sub-networks it is fitted on. The profile's
noise check is read and judged here too (`NoiseCheck`, the optional record in latency.json;
`noise_problems`, the rule that refuses a busy machine's table). A llama.cpp table is timed at one
GGUF weight type (`LatencyTable.outtype`): a latency budget holds for exports at that type only
(`check_weight_type`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flextron.cost import CostTable, measured_table
from flextron.errors import FlextronError
from flextron.fsutil import atomic_write
from flextron.gguf import in_own_arch
from flextron.options import OUTTYPES
from flextron.space import ElasticSpace, Subnet

if TYPE_CHECKING:
    from flextron.elastic import ElasticModel

LATENCY_FILE = "latency.json"
QUANTITY = {"latency_ms": "decode_ms", "prefill_ms": "prefill_ms"}  # budget metric -> the table's key
_MAX_BYTES = 64 << 20  # a table of thousands of measurements is a few MB


class _Damaged(ValueError):
    """What is wrong with a table, said by the validators and given its file name by `LatencyTable`."""


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Damaged(f"{what} must be a finite number, not {value!r}")
    return float(value)


def _mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise _Damaged(f"{what} is missing or not a JSON object")
    return value


@dataclass(frozen=True)
class Fit:
    """One fitted quantity (ms): overhead + sum over layers of the MLP width's and the attention
    units' terms, at the full hidden size; the smallest choices cost 0 (their time is in the overhead).

    `proportional`, where the profile timed several hidden sizes: the part of the overhead and of
    each term that is proportional to the hidden size (its value at the full size D; stored as the
    optional field "proportional" of the same shape). The rest does not change with the hidden size:
    at hidden size d a term t with part p costs (t - p) + p * d / D (`cost.measured_table`). Without
    it (tables timed at the full hidden size only) every term is taken as proportional, unmeasured."""

    overhead: float
    mlp: dict[int, float]
    attn: dict[int, float]
    proportional: Fit | None = None

    @classmethod
    def from_dict(cls, d: Any, what: str) -> Fit:
        d = _mapping(d, what)
        terms = {}
        for kind in ("mlp", "attn"):
            costs = _mapping(d.get(kind), f"{what}.{kind}")
            if not costs or not all(isinstance(k, str) and k.isdigit() for k in costs):
                raise _Damaged(f"{what}.{kind} must map each choice (a whole number) to its cost")
            terms[kind] = {int(k): _number(v, f"{what}.{kind}[{k}]") for k, v in costs.items()}
        part = None
        if d.get("proportional") is not None:  # (a part's own "proportional" means nothing)
            part = replace(cls.from_dict(d["proportional"], f"{what}.proportional"), proportional=None)
            for kind in ("mlp", "attn"):
                if set(getattr(part, kind)) != set(terms[kind]):
                    raise _Damaged(f"{what}.proportional.{kind} must price the same choices as {what}.{kind}")
        return cls(_number(d.get("overhead"), f"{what}.overhead"), terms["mlp"], terms["attn"], part)

    def to_dict(self) -> dict:
        out = {"overhead": self.overhead, "mlp": {str(k): v for k, v in self.mlp.items()},
               "attn": {str(k): v for k, v in self.attn.items()}}
        return out if self.proportional is None else out | {"proportional": self.proportional.to_dict()}

    @property
    def ascending(self) -> bool:
        """Whether no wider choice costs less (every table fitted since the fit was constrained), and,
        where it prices hidden sizes, no larger hidden size either: the proportional part is never
        negative, and it and the rest of each term both ascend (up to rounding: the rest is a difference)."""
        def rising(terms: dict[int, float], tol: float = 0.0) -> bool:
            v = [terms[k] for k in sorted(terms)]
            return all(a <= b + tol for a, b in zip(v, v[1:]))

        if not (rising(self.mlp) and rising(self.attn)):
            return False
        p = self.proportional
        if p is None:
            return True
        tol = 1e-9 * max(map(abs, (*self.mlp.values(), *self.attn.values())))
        rest = [{c: t - part[c] for c, t in full.items()} for full, part in ((self.mlp, p.mlp), (self.attn, p.attn))]
        return (p.overhead >= 0 and min(*p.mlp.values(), *p.attn.values()) >= 0 and rising(p.mlp) and rising(p.attn)
                and all(rising(r, tol) for r in rest))

    def costs(self, space: ElasticSpace, metric: str) -> CostTable:
        """This fit over the choices of `space`, as the CostTable of `metric` (one table per hidden size
        of the space: `cost.measured_table`)."""
        missing = sorted({c for cs in space.mlp for c in cs} - set(self.mlp)
                         | {c for cs in space.attn for c in cs} - set(self.attn))
        if missing:
            raise _Damaged(f"it lacks choice {missing[0]} of the elastic space")

        def rows(fit: Fit) -> tuple[float, list[list[float]], list[list[float]]]:
            return (fit.overhead, [[fit.mlp[c] for c in cs] for cs in space.mlp],
                    [[fit.attn[c] for c in cs] for cs in space.attn])

        part = None if self.proportional is None else rows(self.proportional)
        return measured_table(metric, *rows(self), space, part)


def columns(space: ElasticSpace) -> tuple[list[int], list[int]]:
    """Every MLP width and every attention width of the space, ascending."""
    return sorted({c for cs in space.mlp for c in cs}), sorted({c for cs in space.attn for c in cs})


def design(space: ElasticSpace, subnets: list[Subnet]) -> np.ndarray:
    """Per sub-network: how many layers reach each MLP width and each attention width beyond the
    smallest (the columns of the fit are the increments between neighbouring widths)."""
    widths, units = columns(space)
    rows = [[sum(m >= w for m in s.mlp) for w in widths[1:]] + [sum(a >= u for a in s.attn) for u in units[1:]]
            for s in subnets]
    return np.asarray(rows, dtype=np.float64).reshape(len(subnets), len(widths) + len(units) - 2)


def nonneg_lstsq(x: np.ndarray, y: np.ndarray, free: bool = True, weights: np.ndarray | None = None
                 ) -> tuple[float, np.ndarray]:
    """min ||w (y - c - x d)|| over a free intercept c and d >= 0 (w: `weights` per row, default 1);
    without `free`, c = 0 (a column of ones in `x` gives an intercept held non-negative). Lawson and
    Hanson's active set: exact in a few steps, where coordinate descent crawls along correlated columns
    (a fit over hidden sizes has each column twice, once times d / D)."""
    w = np.ones_like(y) if weights is None else weights
    if free:  # the best c for any d is the w²-weighted mean of y - x d: centre on those means
        xm, ym = (w**2 @ x) / (w**2).sum(), (w**2 @ y) / (w**2).sum()
        x, y = x - xm, y - ym
    a, b = x * w[:, None], y * w
    n = a.shape[1]
    d, passive = np.zeros(n), np.zeros(n, dtype=bool)
    tol = 10 * max(a.shape) * np.finfo(np.float64).eps * np.abs(a).max(initial=0.0) * np.abs(b).max(initial=0.0)
    for _ in range(3 * n):
        grad = a.T @ (b - a @ d)
        if passive.all() or grad[~passive].max() <= tol:
            break
        passive[np.argmax(np.where(passive, -np.inf, grad))] = True
        while True:  # least squares on the passive set, stepping back where it leaves d >= 0
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                d = z
                break
            out = passive & (z <= 0)
            gap = d[out] - z[out]
            ratios = np.divide(d[out], gap, out=np.zeros_like(gap), where=gap > 0)
            d = d + ratios.min() * (z - d)
            d[np.flatnonzero(out)[ratios.argmin()]] = 0.0
            passive &= d > 0
            d[~passive] = 0.0
    return (float(ym - xm @ d) if free else 0.0), d


def hidden_ratios(space: ElasticSpace, subnets: list[Subnet]) -> np.ndarray:
    """Per sub-network, its hidden size d over the full one D (1 where the space has no hidden sizes)."""
    full = space.hidden[-1] if space.hidden else None
    return np.asarray([(s.hidden or full) / full if full else 1.0 for s in subnets], dtype=np.float64)


def fit(space: ElasticSpace, subnets: list[Subnet], y: list[float], relative: bool = True,
        weights: list[float] | None = None) -> Fit:
    """Least squares constrained to non-negative increments between neighbouring widths, so a
    wider choice never costs less (timing noise cannot invert the table) and the smallest
    sub-network is the cheapest.

    `relative` (the default): least squares on the relative error (each timing weighted by 1 / itself),
    the error a budget is judged by. On milliseconds the largest sub-networks steer the fit, and the
    small ones that skip many sub-layers, where routers put low budgets, pay for a few % of noise on
    them: refitted both ways, a width + depth table's worst cross-validated error fell from 20.9 % to
    12.0 % (benchmarks/latency_fit.py, which scores both rules on stored tables).

    Over sub-networks timed at two or more hidden sizes, the overhead and each increment are affine in
    the hidden size d: a part proportional to d (a projection's cost is proportional to both its
    dimensions) plus a part that does not change with it (per-operation overheads, attention over the
    context), both held non-negative, so that nothing costs more at a smaller hidden size either:
    latency = c0 + r c1 + sum_j x_j (u_j + r v_j), r = d / D, x the design's columns, c0, c1, u, v >= 0
    (`Fit.proportional` holds c1 and the v terms). The overhead's fixed part c0 is held non-negative
    too (the single-size intercept stays free): no part of a time is negative, and a free c0 lets timing
    noise tilt the line c0 + r c1 until it prices the smallest hidden size at or below zero.

    `weights`: a weight per timing on top of that (`latency.refine` weighs the served sub-networks up)."""
    widths, units = columns(space)
    x, target = design(space, subnets), np.asarray(y, dtype=np.float64)

    def terms(inc: np.ndarray) -> tuple[dict[int, float], dict[int, float]]:
        mlp = np.concatenate([[0.0], np.cumsum(inc[: len(widths) - 1])])
        attn = np.concatenate([[0.0], np.cumsum(inc[len(widths) - 1 :])])
        return {w: float(v) for w, v in zip(widths, mlp)}, {a: float(v) for a, v in zip(units, attn)}

    r, w = hidden_ratios(space, subnets), 1 / target if relative else np.ones_like(target)
    w = w if weights is None else w * np.asarray(weights, dtype=np.float64)
    if len(set(r.tolist())) < 2:
        overhead, inc = nonneg_lstsq(x, target, weights=w)
        return Fit(overhead, *terms(inc))
    n = x.shape[1]
    _, coef = nonneg_lstsq(np.column_stack([np.ones_like(r), r, x, r[:, None] * x]), target, free=False, weights=w)
    (c0, c1), fixed, part = coef[:2].tolist(), coef[2 : n + 2], coef[n + 2 :]
    return Fit(c0 + c1, *terms(fixed + part), Fit(c1, *terms(part)))


@dataclass(frozen=True)
class GraphFit:
    """The decode and prefill fits of one graph, with their errors on unseen (`validation`) and on
    fitted (`fit_error`) sub-networks: {key: {"median_pct", "max_pct", "n"}}, over every hidden size;
    a profile of a space with hidden sizes also splits the unseen ones by hidden size
    (`validation_by_hidden`: {key: {hidden size: error}})."""

    decode_ms: Fit
    prefill_ms: Fit
    validation: dict[str, dict]
    fit_error: dict[str, dict]
    validation_by_hidden: dict[str, dict[int, dict]] = field(default_factory=dict)

    def quantity(self, key: str) -> Fit:
        return self.decode_ms if key == "decode_ms" else self.prefill_ms

    def error(self, key: str) -> tuple[dict, str]:
        """The error on `key` over unseen sub-networks, or over the fitted ones where none was left
        unseen (a small space's stock graph), and which of the two it is."""
        return reported_error({"validation": self.validation, "fit_error": self.fit_error}, key)


def reported_error(errors: dict, key: str) -> tuple[dict, str]:
    """From {"validation": ..., "fit_error": ...} (a graph's errors, as stored or reported): the error
    on `key` over unseen sub-networks, or over the fitted ones where none was left unseen."""
    if errors["validation"].get(key, {}).get("n"):
        return errors["validation"][key], "unseen"
    return errors["fit_error"].get(key, {"median_pct": None, "max_pct": None, "n": 0}), "fitted"


@dataclass(frozen=True)
class NoiseCheck:
    """How steady the machine was during a profile (latency.json's optional "noise"; tables profiled
    before the check have none): the full model's timings at the start, interleaved among the other
    timings and at the end (each the median over the rounds, as every timing of the table), their
    spread per quantity (slowest / fastest - 1, in %), the thresholds the profile was held to (the
    spread, and the median error of each graph's fit), whether it passed, and whether `--force`
    stored it although it did not."""

    full_model_ms: list[dict[str, float]]
    spread_pct: dict[str, float]
    max_spread_pct: float
    max_error_pct: float
    passed: bool
    forced: bool

    @classmethod
    def from_dict(cls, d: Any) -> NoiseCheck:
        d = _mapping(d, "noise")
        timings = d.get("full_model_ms")
        if not isinstance(timings, list) or not timings:
            raise _Damaged("noise.full_model_ms must be a non-empty list of the full model's timings")
        full = [{key: _number(_mapping(t, f"noise.full_model_ms[{i}]").get(key), f"noise.full_model_ms[{i}].{key}")
                 for key in QUANTITY.values()} for i, t in enumerate(timings)]
        spread = _mapping(d.get("spread_pct"), "noise.spread_pct")
        flags = [d.get(k) for k in ("passed", "forced")]
        if not all(isinstance(f, bool) for f in flags):
            raise _Damaged("noise.passed and noise.forced must be true or false")
        return cls(full, {key: _number(spread.get(key), f"noise.spread_pct.{key}") for key in QUANTITY.values()},
                   _number(d.get("max_spread_pct"), "noise.max_spread_pct"),
                   _number(d.get("max_error_pct"), "noise.max_error_pct"), *flags)

    def to_dict(self) -> dict:
        return {"full_model_ms": self.full_model_ms, "spread_pct": self.spread_pct,
                "max_spread_pct": self.max_spread_pct, "max_error_pct": self.max_error_pct, "passed": self.passed,
                "forced": self.forced}


def spread_pct(timings: list[dict[str, float]]) -> dict[str, float]:
    """Per quantity, how much slower the slowest of the timings is than the fastest, in % (a busy
    machine only adds time, so the fastest is the steadiest reading)."""
    return {key: (max(t[key] for t in timings) / min(t[key] for t in timings) - 1) * 100 for key in QUANTITY.values()}


def noise_problems(spread: dict[str, float], n_timings: int, graphs: list[tuple[str | None, GraphFit]],
                   max_spread: float, max_error: float) -> list[str]:
    """What fails the noise check, one phrase each: the full model's `n_timings` timings, where they spread
    more than `max_spread` % in a quantity; each fit among `graphs` (`LatencyTable.graphs`) whose median
    error in a quantity (on unseen sub-networks, or fitted ones where none was left unseen) is above
    `max_error` %."""
    def over(values: dict[str, float], limit: float) -> str:
        return ", ".join(f"{key.removesuffix('_ms')} {v:.1f}%" for key, v in values.items() if v > limit)

    problems = []
    if over(spread, max_spread):
        problems.append(f"the full model's {n_timings} timings from start to end spread {over(spread, max_spread)} "
                        f"(slowest over fastest; threshold {max_spread:g}%)")
    for graph, fitted in graphs:
        errors = {key: fitted.error(key) for key in QUANTITY.values()}
        medians = {key: e["median_pct"] for key, (e, _) in errors.items() if e["median_pct"] is not None}
        if over(medians, max_error):
            (e, which), label = errors["decode_ms"], "" if graph is None else f"{graph} graph "
            problems.append(f"the {label}table's median error on {e['n']} {which} sub-networks is "
                            f"{over(medians, max_error)} (threshold {max_error:g}%)")
    return problems


def _errors(d: Any, what: str) -> dict[str, dict]:
    out = {}
    for key, e in _mapping(d if d is not None else {}, what).items():
        e = _mapping(e, f"{what}.{key}")
        if not isinstance(e.get("n"), int) or isinstance(e.get("n"), bool):
            raise _Damaged(f"{what}.{key}.n must be a whole number")
        out[key] = e
    return out


def _errors_by_hidden(d: Any, what: str) -> dict[str, dict[int, dict]]:
    out = {}
    for key, per in _mapping(d if d is not None else {}, what).items():
        per = _mapping(per, f"{what}.{key}")
        if not all(isinstance(k, str) and k.isdigit() for k in per):
            raise _Damaged(f"{what}.{key} must map each hidden size (a whole number) to its error")
        out[key] = {int(k): e for k, e in _errors(per, f"{what}.{key}").items()}
    return out


def _measurements(rows: Any) -> list[dict]:
    if not isinstance(rows, list):
        raise _Damaged("measurements must be a list")
    for i, r in enumerate(rows):
        what = f"measurements[{i}]"
        r = _mapping(r, what)
        subnet = _mapping(r.get("subnet"), f"{what}.subnet")
        choices = all(isinstance(subnet.get(k), list) and all(type(c) is int for c in subnet[k])
                      for k in ("mlp", "attn"))
        hidden = subnet.get("hidden") is None or type(subnet["hidden"]) is int
        if not isinstance(r.get("role"), str) or not choices or not hidden:
            raise _Damaged(f"{what} needs a role and a subnet of whole-number choices")
        for key in QUANTITY.values():
            if not _number(r.get(key), f"{what}.{key}") > 0:
                raise _Damaged(f"{what}.{key} must be a positive time, not {r[key]!r}")
    return rows


class LatencyTable:
    """A checkpoint's measured latency table, validated, bound to an elastic model's space."""

    def __init__(self, data: dict, em: ElasticModel, source: str = "the latency table") -> None:
        """`data` as `flextron.latency.profile` builds it and `latency.json` stores it; `source` names
        the table in errors. Raises a one-line FlextronError where it is damaged."""
        self.em, self.source = em, source
        try:
            self.data = _mapping(data, "the table")
            self.main = self._graph(data, "")
            self.stock: GraphFit | None = None
            if "stock" in data:
                stock = _mapping(data["stock"], "stock")
                if not isinstance(stock.get("graph"), str):
                    raise _Damaged("stock.graph must name the llama.cpp graph")
                self.stock = self._graph(stock, "stock.")
            self.measurements = _measurements(data.get("measurements", []))
            if data.get("outtype", OUTTYPES[0]) not in OUTTYPES:
                raise _Damaged(f"outtype must be one of {', '.join(OUTTYPES)}, not {data['outtype']!r}")
            self.noise: NoiseCheck | None = None if data.get("noise") is None else NoiseCheck.from_dict(data["noise"])
            # A llama.cpp table's reference: the full model's own times at the start of its profile, the scale its
            # rows are stored on (`llamacpp.Reference`); None for HF eager.
            ref = data.get("reference")
            self.reference: dict[str, float] | None = None if ref is None else {
                key: _number(_mapping(ref, "reference").get(key), f"reference.{key}") for key in QUANTITY.values()}
            self.main = self._refitted(self.main)
            self._tables: dict[str, CostTable] = {}
            self._raw: dict[str, tuple[CostTable, CostTable | None]] = {}
            self._space: ElasticSpace | None = None
            for metric in QUANTITY:
                self.table(metric)  # every choice priced, and the prices make sense
        except _Damaged as e:
            raise FlextronError(f"{source} is damaged: {e}; re-run `flextron profile`") from None

    @staticmethod
    def _graph(d: dict, prefix: str) -> GraphFit:
        return GraphFit(*(Fit.from_dict(d.get(k), prefix + k) for k in QUANTITY.values()),
                        _errors(d.get("validation"), prefix + "validation"),
                        _errors(d.get("fit_error"), prefix + "fit_error"),
                        _errors_by_hidden(d.get("validation_by_hidden"), prefix + "validation_by_hidden"))

    def _refitted(self, graph: GraphFit) -> GraphFit:
        """Fits made before increments were held non-negative, refitted from the table's own
        measurements."""
        fits = {}
        for key in QUANTITY.values():
            fits[key] = graph.quantity(key)
            if not fits[key].ascending:
                rows = [m for m in self.measurements if m["role"] == "fit"]
                if not rows:
                    raise _Damaged(f"its {key} decreases with width (or hidden size) and it holds no "
                                   "measurements to refit")
                fits[key] = fit(self.em.space, [Subnet(**m["subnet"]) for m in rows], [m[key] for m in rows])
        return replace(graph, decode_ms=fits["decode_ms"], prefill_ms=fits["prefill_ms"])

    @classmethod
    def load(cls, ckpt: str | Path, em: ElasticModel) -> LatencyTable | None:
        """The checkpoint's table (`ckpt` a directory, or the table file itself), or None where it
        was never profiled."""
        path = Path(ckpt)
        path = path / LATENCY_FILE if path.is_dir() else path
        if not path.exists():
            return None
        try:
            if not path.is_file() or path.stat().st_size > _MAX_BYTES:
                raise FlextronError(f"{path} is not a latency table (a regular file of at most "
                                    f"{_MAX_BYTES >> 20} MiB); re-run `flextron profile`")
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            reason = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:200]
            raise FlextronError(f"{path} is not readable JSON ({reason}); re-run `flextron profile`") from None
        return cls(data, em, str(path))

    def save(self, ckpt: str | Path) -> Path:
        path = Path(ckpt) / LATENCY_FILE
        atomic_write(path, lambda p: p.write_text(json.dumps(self.data, indent=1)))
        return path

    def to_dict(self) -> dict:
        return self.data

    @property
    def runtime(self) -> str:
        """hf-eager, or the llama.cpp version the GGUF exports were timed in."""
        return str(self.data.get("runtime", "hf-eager"))

    @property
    def device(self) -> str:
        return str(self.data.get("device", "unknown"))

    @property
    def dtype(self) -> str:
        return str(self.data.get("dtype", "fp32"))

    @property
    def batch(self) -> int:
        return int(self.data.get("batch", 1))

    @property
    def context(self) -> int | None:
        return self.data.get("context")

    @property
    def threads(self) -> int | None:
        """llama.cpp threads the table was timed with (None: HF eager)."""
        return self.data.get("threads")

    @property
    def outtype(self) -> str | None:
        """The GGUF weight type the table was timed at (every llama.cpp table records it); None for HF eager."""
        return self.data.get("outtype")

    @property
    def refinements(self) -> list[dict]:
        """What each `profile --refine` added (`latency.refine`), oldest first."""
        return list(self.data.get("refined", []))

    @property
    def settings(self) -> dict[str, Any]:
        """How the table was measured: every field but the fits, errors and measurements."""
        return {k: v for k, v in self.data.items() if not isinstance(v, (dict, list))}

    @property
    def stock_graph(self) -> str | None:
        """The family's own llama.cpp graph where the table also fitted it (uniform sub-networks)."""
        return self.data["stock"]["graph"] if self.stock is not None else None

    def graphs(self) -> list[tuple[str | None, GraphFit]]:
        """(graph name, fit) of every fitted graph: the main one (None: the table's only graph or
        llama.cpp's deci) and the stock one."""
        return [(None if self.stock is None else "deci", self.main),
                *([(self.stock_graph, self.stock)] if self.stock is not None else [])]

    @property
    def noise_problems(self) -> list[str]:
        """What fails the profile's noise check (`noise_problems`): empty where it passed, or where the
        table predates the check."""
        n = self.noise
        if n is None:
            return []
        return noise_problems(n.spread_pct, len(n.full_model_ms), self.graphs(), n.max_spread_pct, n.max_error_pct)

    @property
    def hidden_pricing(self) -> str | None:
        """How the table prices the smaller hidden sizes of the model's space (None where it has none):
        "measured" (fitted on sub-networks timed at several hidden sizes) or "modelled" (the table was
        timed at the full hidden size only, so every term is scaled by d / D, `cost.measured_table`:
        re-run `flextron profile` to measure them)."""
        if len(self.em.space.hidden or ()) < 2:
            return None
        fits = [graph.quantity(key) for _, graph in self.graphs() for key in QUANTITY.values()]
        return "measured" if all(f.proportional is not None for f in fits) else "modelled"

    def _priced(self, metric: str) -> tuple[CostTable, CostTable | None]:
        """The main and the stock fit of `metric` over the model's current space, each alone."""
        if self._space is not self.em.space:
            self._tables, self._raw, self._space = {}, {}, self.em.space
        if metric not in self._raw:
            key = QUANTITY[metric]
            self._raw[metric] = (self.main.quantity(key).costs(self.em.space, metric),
                                 None if self.stock is None else self.stock.quantity(key).costs(self.em.space, metric))
        return self._raw[metric]

    def table(self, metric: str) -> CostTable:
        """The CostTable of `metric` (latency_ms: decode per token; prefill_ms) over the model's
        space; uniform sub-networks that llama.cpp runs in the family's own graph are priced by
        that graph's fit (`runs_in_stock`)."""
        main, stock = self._priced(metric)
        if metric not in self._tables:
            table = main if stock is None else replace(main, stock=stock, in_stock=self.runs_in_stock)
            for name, cost in (("the full model", table.full), ("the smallest sub-network", table.smallest)):
                if not cost > 0:
                    raise _Damaged(f"it prices {name} at {cost:.4g} ms ({QUANTITY[metric]})")
            self._tables[metric] = table
        return self._tables[metric]

    def deci_faster(self, subnet: Subnet) -> bool:
        """Whether the llama.cpp table prices `subnet`'s decode lower in the per-layer `deci` graph
        than in the family's own, where the family's own graph can hold it (llama.cpp runs the same
        weights up to ~17% apart in the two, and which is faster depends on the width, the CPU and
        the threads: benchmarks/gguf_arch.py)."""
        deci, own = self._priced("latency_ms")
        return own is not None and in_own_arch(self.em, subnet) and deci(subnet) < own(subnet)

    def runs_in_stock(self, subnet: Subnet) -> bool:
        """Whether `export --format gguf` (`--graph auto`) writes `subnet` in the family's own llama.cpp
        graph: where that graph can hold it, unless this table says `deci` decodes it faster."""
        return in_own_arch(self.em, subnet) and not self.deci_faster(subnet)


def check_weight_type(table: LatencyTable | None, metric: str, outtype: str | None) -> None:
    """Refuse (one line) GGUF weights of `outtype` for budgets in `metric` where a llama.cpp table
    timed at another weight type prices them: its latencies hold at its own type only. Nothing to
    check for analytic metrics, an HF eager table, or no `outtype` given."""
    if metric not in QUANTITY or table is None or table.outtype in (None, outtype) or outtype is None:
        return
    raise FlextronError(f"the {metric} budgets are priced by the llama.cpp latency table timed at {table.outtype} "
                        f"weights, not {outtype}: use --outtype {table.outtype}, or profile at {outtype} first "
                        f"(flextron profile CKPT --runtime llama.cpp --outtype {outtype})")
