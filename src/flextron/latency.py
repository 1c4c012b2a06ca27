"""Measuring the latency lookup table (per layer kind and choice, decode and prefill time; the table
itself, its fit and its pricing are `flextron.latency_table`).

Timing one block alone on a CPU misses the framework work between blocks and is dominated by
timer noise for blocks of a millisecond, so the table is measured differentially: end-to-end
latency of many random sub-networks (warm-up, device sync, trimmed mean of repeats), then a
least-squares fit of latency = overhead + sum over layers of t_mlp[width] + t_attn[units], with
the increments between neighbouring widths held non-negative. Each column of the fit is the
difference that widening one layer's choice makes — repeat-and-subtract, done across all layers
at once. The fitted sub-networks are half uniform, half "spread" (each drawn from its own random
mix of widths): independent per-layer draws all hold about the same mix of widths, which leaves
the increments poorly determined and mispredicts the uniform sub-networks that budgets often
pick. The table is checked on independent random sub-networks that the fit never saw.

In a space with hidden sizes every drawn sub-network carries one (`ElasticSpace.sample`) and is timed
at it (HF: the elastic model's hard slice; llama.cpp: its GGUF export at that size), so the fit prices
the hidden size from measurements (each term affine in it, `latency_table.fit`), and the validation
covers every hidden size (stored overall and per hidden size).

A busy machine spoils a table (one profiled beside other jobs erred 280% on its own unseen
sub-networks), so the profile checks itself: the full model is timed again among the others and at
the end, and a table whose full-model timings spread too far, or whose error on unseen sub-networks
is too high (thresholds: `ProfileOptions`), is refused unless forced (`profile`).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from flextron.cost import CostTable
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.latency_table import QUANTITY, LatencyTable, NoiseCheck, noise_problems, spread_pct
from flextron.latency_table import fit as fit_terms
from flextron.options import ProfileOptions
from flextron.precision import autocast
from flextron.space import KINDS, Subnet

_CHECK = "check"  # the role of the full model's timings that the noise check compares


def sync(device: torch.device | str) -> None:
    """Wait for the work queued on `device` (a no-op off CUDA), so that a timer reads finished work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trimmed_mean(xs: list[float]) -> float:
    xs = sorted(xs)
    cut = len(xs) // 5
    kept = xs[cut : len(xs) - cut] or xs
    return sum(kept) / len(kept)


@torch.inference_mode()
def measure(em: ElasticModel, subnet: Subnet, batch: int = 1, context: int = 256, decode_steps: int = 16,
            repeats: int = 3, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """End-to-end prefill latency (ms) of `context` tokens and decode latency (ms per token) after them."""
    device = next(em.parameters()).device
    em.eval()
    ids = torch.randint(0, em.config.vocab_size, (batch, context + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    prefill, decode = [], []
    with em.subnet(subnet), autocast(device, autocast_dtype):
        for r in range(repeats + 1):  # the first round warms up
            sync(device)
            t = time.perf_counter()
            out = em(input_ids=ids[:, :context], use_cache=True)
            sync(device)
            t_prefill = time.perf_counter() - t
            cache, nxt = out.cache, ids[:, context:]
            t = time.perf_counter()
            for _ in range(decode_steps):
                out = em(input_ids=nxt, cache=cache, use_cache=True)
                cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
            sync(device)
            if r > 0:
                prefill.append(t_prefill * 1e3)
                decode.append((time.perf_counter() - t) * 1e3 / decode_steps)
    return {"prefill_ms": trimmed_mean(prefill), "decode_ms": trimmed_mean(decode)}


def random_subnets(em: ElasticModel, n: int, seed: int, mode: str = "layers") -> list[Subnet]:
    """`n` sub-networks of a seeded generator (`ElasticSpace.sample`; default: heterogeneous)."""
    gen = torch.Generator().manual_seed(seed)
    return [em.space.sample(gen, mode) for _ in range(n)]


def design_subnets(em: ElasticModel, n: int, seed: int) -> list[Subnet]:
    """`n` sub-networks to fit the table on: uniform and spread draws in turn (`ElasticSpace.sample`)."""
    gen = torch.Generator().manual_seed(seed)
    return [em.space.sample(gen, "uniform" if i % 2 == 0 else "spread") for i in range(n)]


def relative_errors(pred: list[float], meas: list[float]) -> dict:
    """|predicted - measured| / measured in %: the median (the upper one of an even count), max and count,
    as every table reports its validation and fit errors."""
    err = sorted(abs(p - m) / m * 100 for p, m in zip(pred, meas))
    if not err:  # every stock sub-network of a small space is in the fit
        return {"median_pct": None, "max_pct": None, "n": 0}
    return {"median_pct": err[len(err) // 2], "max_pct": err[-1], "n": len(err)}


def profile(em: ElasticModel, options: ProfileOptions, autocast_dtype: torch.dtype | None = None, seed: int = 0,
            progress: bool = True, timer: Callable[[Subnet], dict[str, float]] | None = None,
            runtime: dict | None = None, stock: StockGraph | None = None, uniform_only: bool = False
            ) -> LatencyTable:
    """Build the latency table on this device (`options.samples` sub-networks) and validate it on
    `options.validate` unseen random ones.

    `timer` measures one sub-network in another runtime (default: this model in HF eager);
    `runtime` names that runtime in the table (e.g. runtime, threads, outtype). With `options.rounds`
    > 1 every sub-network is timed once per round, round after round, and keeps its median: a slow
    spell of a shared machine then lands on one round of many sub-networks, not on all of one.
    With `stock`, the sub-networks the runtime runs in its stock graph are timed there as well,
    each right after the same sub-network in the other graph, and a second table fitted and
    validated on them is stored under "stock". `uniform_only`: the runtime's one graph holds uniform
    sub-networks only (llama.cpp's for GPT-2, untied Qwen3, Gemma, OLMo 2): the table is fitted and validated
    on those, and prices per-layer sub-networks by the same additive terms, unmeasured.

    The noise check: the full model is timed again at the start, after every `options.check_every`
    timings and at the end (in each round, at the same places). Where those timings spread more than
    `options.max_spread` % (slowest over fastest) or a fit's median error on unseen sub-networks is
    above `options.max_error` %, a busy machine has spoilt the table: it is refused in one line
    (nothing is returned, so nothing is stored) unless `options.force`. The table records the check
    (`NoiseCheck`: the timings, their spread, the thresholds, passed, forced).
    """
    if options.samples < 4 or options.validate < 1:
        raise FlextronError("profiling needs at least 4 fitting and 1 validation sub-networks")
    batch, context, decode_steps, repeats = options.batch, options.context, options.decode_steps, options.repeats
    space = em.space
    if uniform_only:
        cover = _distinct([space.full(), space.smallest(), *_uniform_cover(em)])
        draws = random_subnets(em, 20 * (options.samples + options.validate), seed, "uniform")
        fit_nets = _distinct([*cover, *draws], max(options.samples, len(cover)))
        val_nets = _distinct((s for s in draws if s not in fit_nets), options.validate)
    else:
        fit_nets = [space.full(), space.smallest(), *design_subnets(em, options.samples - 2, seed)]
        val_nets = random_subnets(em, options.validate, seed + 1)
    default = timer or (lambda s: measure(em, s, batch, context, decode_steps, repeats, autocast_dtype))
    jobs = [(s, default, "fit") for s in fit_nets]
    stock_val: list[Subnet] = []
    if stock is not None:
        # Every width of each kind in the stock fit; each stock timing right after its twin's, and
        # the stock validation between the others, so a drift of the machine spares the comparison.
        # A stock graph holding few sub-networks (a depth space's unskipped uniform ones) is fitted on all of
        # them: the few a cover leaves free would validate a fit pinned through single timings.
        held = _stock_uniforms(em, stock.written)
        fit_nets += [s for s in (held if len(held) <= options.samples else _uniform_cover(em)) if s not in fit_nets]
        jobs = []
        for i, s in enumerate(fit_nets):
            jobs.append((s, default, "fit"))
            if stock.written(s) and s not in fit_nets[:i]:
                jobs.append((s, stock.timer, "fit-stock"))
        stock_val = _distinct((s for s in random_subnets(em, 20 * options.validate, seed + 2, "uniform")
                               if stock.written(s) and s not in fit_nets), options.validate)
    for i in range(max(len(val_nets), len(stock_val))):
        jobs += [(s, default, "validate") for s in val_nets[i : i + 1]]
        jobs += [(s, stock.timer, "validate-stock") for s in stock_val[i : i + 1]]
    rows, full_model = _timed(_with_checks(jobs, (space.full(), default, _CHECK), options.check_every),
                              options.rounds, progress, "profiling")
    device = next(em.parameters()).device
    table = {
        "runtime": "hf-eager",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "dtype": "bf16" if autocast_dtype == torch.bfloat16 else "fp32",
        "batch": batch, "context": context, "decode_steps": decode_steps, "repeats": repeats,
        "rounds": options.rounds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "measurements": rows,
    }
    table.update(runtime or {})
    table.update(_fitted(em, rows, ""))
    if stock is not None:
        table["stock"] = {"graph": stock.name, **_fitted(em, rows, "-stock")}
    table["noise"] = _noise_check(em, table, full_model, options, "profile")
    return LatencyTable(table, em, "the measured latency table")


def refine(em: ElasticModel, table: LatencyTable, subnets: list[Subnet], timer: Callable[[Subnet], dict[str, float]],
           options: ProfileOptions, progress: bool = True) -> LatencyTable:
    """`table` refitted with `subnets` (the sub-networks routers serve) timed by `timer` and added to its
    fitted ones; the unseen validation sub-networks and the stock graph's fit stay as they were.

    Random sub-networks are what a profile fits on; routers serve another kind (most layers at full width,
    a few sub-layers skipped or narrowed), which a table of one additive term per width can misprice all in
    one direction while it prices random ones well. Timed, the error on them says whether it does; fitted on,
    weighing together as much as the profile's fitted ones (`_fitted`), they pull the fit to where budgets
    are served. The new timings must be on the table's scale: `timer` times each beside the table's own
    reference (`llamacpp.refine`). The noise check holds for this run's full-model timings. latency.json records
    each refinement ("refined": how many, the table's error on them before and after, its noise check)."""
    measured = [Subnet(**m["subnet"]) for m in table.measurements]
    new = [s for s in _distinct(subnets) if s not in measured]
    if not new:
        raise FlextronError("every sub-network the routers serve is timed in the latency table already (fitted or "
                            "validated), or runs in the stock graph whose fit holds every uniform one: nothing to "
                            "refine")
    jobs = _with_checks([(s, timer, "fit") for s in new], (em.space.full(), timer, _CHECK), options.check_every)
    rows, full_model = _timed(jobs, options.rounds, progress, "refining")
    for r in rows:
        r["routed"] = True

    def errors(data: LatencyTable) -> dict:  # and the signed median: how far the table over-prices them
        out = {}
        for key in QUANTITY.values():
            price = data.main.quantity(key).costs(em.space, key)
            pred, meas = [price(s) for s in new], [r[key] for r in rows]
            out[key] = {**relative_errors(pred, meas),
                        "median_signed_pct": statistics.median((p - m) / m * 100 for p, m in zip(pred, meas))}
        return out

    data = {**table.to_dict(), "measurements": [*table.measurements, *rows]}
    data.update(_fitted(em, data["measurements"], ""))
    after = LatencyTable(data, em, "the refined latency table")
    data["refined"] = [*table.refinements, {
        "subnets": len(new), "rounds": options.rounds, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "error_before": errors(table), "error_after": errors(after),
        "noise": _noise_check(em, data, full_model, options, "refinement")}]
    return LatencyTable(data, em, "the refined latency table")


def _timed(jobs: list, rounds: int, progress: bool, desc: str) -> tuple[list[dict], list[dict[str, float]]]:
    """Every job (sub-network, timer, role) timed once per round, round after round, each keeping its
    median: the rows of the non-check jobs, and the full model's timings at the checks."""
    runs: list[list[dict[str, float]]] = [[] for _ in jobs]
    with tqdm(total=rounds * len(jobs), desc=desc, disable=not progress) as bar:
        for _ in range(rounds):
            for i, (s, time_it, _) in enumerate(jobs):
                runs[i].append(time_it(s))
                bar.update()
    timings = [{k: statistics.median(r[k] for r in rs) for k in rs[0]} for rs in runs]
    rows = [{"role": role, "subnet": s.to_dict(), **t} for (s, _, role), t in zip(jobs, timings) if role != _CHECK]
    # A timer that times each sub-network beside a reference (`llamacpp.Reference`) gives that reference's own
    # times too: those show a busy machine, where the ratio to it hides one.
    full_model = [{key: t.get(f"reference_{key}", t[key]) for key in QUANTITY.values()}
                  for (_, _, role), t in zip(jobs, timings) if role == _CHECK]
    return rows, full_model


def _noise_check(em: ElasticModel, table: dict, full_model: list[dict[str, float]], options: ProfileOptions,
                 what: str) -> dict:
    """The noise check of a table's data (`NoiseCheck`, as latency.json stores it); refuses it in one line where
    it fails, unless `options.force`."""
    spread = spread_pct(full_model)
    problems = noise_problems(spread, len(full_model), LatencyTable(table, em).graphs(), options.max_spread,
                              options.max_error)
    if problems and not options.force:
        raise FlextronError(f"the latency {what} looks noisy (a busy machine?): {'; '.join(problems)}; the table was "
                            "not stored (latency.json is unchanged): profile again on a quiet machine or with more "
                            "--rounds, or add --force to store it anyway")
    return NoiseCheck(full_model, spread, options.max_spread, options.max_error, passed=not problems,
                      forced=bool(problems)).to_dict()


def _with_checks(jobs: list, check: tuple, every: int) -> list:
    """`jobs` with `check` before them, after every `every` of them and after the last."""
    out = [check]
    for i in range(0, len(jobs), every):
        out += [*jobs[i : i + every], check]
    return out


@dataclass(frozen=True)
class StockGraph:
    """Where a runtime runs some sub-networks in another graph than the rest: its name, which
    sub-networks it takes (`written`) and how to time one there."""

    name: str
    written: Callable[[Subnet], bool]
    timer: Callable[[Subnet], dict[str, float]]


def _uniform_cover(em: ElasticModel) -> list[Subnet]:
    """Uniform sub-networks at every MLP width with all attention, and at every attention width with
    the widest MLP: fitted on with the smallest, they determine each width's cost in a uniform graph.
    In a space with hidden sizes, at the full and at the smallest one: each width's cost at both ends
    of the hidden range (the fit is affine in the hidden size)."""
    space = em.space
    top = [max(len(space.widths(k, i)) for i in range(space.n_layers)) - 1 for k in KINDS]
    cover = []
    for h in [None, 0] if len(space.hidden or ()) > 1 else [None]:  # hidden_index None: the full size
        cover += [space.uniform(i, top[1], hidden_index=h) for i in range(top[0] + 1)]
        cover += [space.uniform(top[0], j, hidden_index=h) for j in range(top[1])]
    return cover


def _stock_uniforms(em: ElasticModel, written: Callable[[Subnet], bool]) -> list[Subnet]:
    """Every uniform sub-network with no skipped sub-layer, at every hidden size, that a stock graph
    holds (`StockGraph.written`)."""
    space = em.space
    top = [max(len(space.widths(k, i)) for i in range(space.n_layers)) for k in KINDS]
    hidden = range(len(space.hidden)) if space.hidden else [None]
    nets = (space.uniform(i, j, hidden_index=h) for h in hidden for i in range(top[0]) for j in range(top[1]))
    return _distinct(s for s in nets if 0 not in (*s.mlp, *s.attn) and written(s))


def _distinct(subnets, limit: int | None = None) -> list[Subnet]:
    out: list[Subnet] = []
    for s in subnets:
        if s not in out:
            out.append(s)
        if len(out) == limit:
            break
    return out


def _fitted(em: ElasticModel, rows: list[dict], suffix: str) -> dict:
    """The decode and prefill fits of the rows with role "fit" + `suffix`, validated on "validate" + `suffix`
    (in a space with hidden sizes, also per hidden size: "validation_by_hidden")."""
    fit = [r for r in rows if r["role"] == "fit" + suffix]
    val = [r for r in rows if r["role"] == "validate" + suffix]
    sizes = em.space.hidden or []
    out: dict = {"validation": {}, "fit_error": {}, **({"validation_by_hidden": {}} if sizes else {})}

    def errors(predict: CostTable, part: list[dict], key: str) -> dict:
        return relative_errors([predict(Subnet(**r["subnet"])) for r in part], [r[key] for r in part])

    # Refined tables (`refine`): the routed rows weigh as much together as the profile's fitted ones. On SmolLM2
    # width + depth (2 threads, docs/results.md) that took the error on them from 1.1 to 0.6 % and the unseen one
    # from 2.8 to 2.3 %; as plain rows, 1.2 % and 2.6 %.
    routed = sum(bool(r.get("routed")) for r in fit)
    weights = [(len(fit) - routed) / routed if r.get("routed") else 1.0 for r in fit] if routed else None
    for key in ("decode_ms", "prefill_ms"):
        fitted = fit_terms(em.space, [Subnet(**r["subnet"]) for r in fit], [r[key] for r in fit], weights=weights)
        out[key] = fitted.to_dict()
        predict = fitted.costs(em.space, key)
        for name, part in (("validation", val), ("fit_error", fit)):
            out[name][key] = errors(predict, part, key)
        if sizes:
            out["validation_by_hidden"][key] = {
                str(d): errors(predict, [r for r in val if r["subnet"].get("hidden", sizes[-1]) == d], key)
                for d in sizes}
    return out
