"""Do latency budgets hold where the model runs? Each budget's sub-network of a checkpoint whose
latency table was measured in llama.cpp (`flextron profile CKPT --runtime llama.cpp`) is exported
to a GGUF and timed in llama.cpp: measured decode (and prefill) ms against the budget's target,
beside what the table predicted. With routers (`flextron route`) the routed per-layer
sub-networks are measured, else the largest uniform ones.

    python benchmarks/llamacpp_budgets.py CKPT [--budgets 0.45,0.55,...] [--threads N] [--copies N] [--group N]
        [--name NAME]
    python benchmarks/llamacpp_budgets.py --smoke      # a tiny random model, seconds; writes no results
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _results import update_section, write_json
from flextron import api, llamacpp
from flextron.budgets import budget_grid, cost_table, select_subnet
from flextron.checkpoint import save_checkpoint
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.gguf import gguf_arch, write_gguf
from flextron.latency_table import reported_error
from flextron.space import Budget, ElasticSpace, Subnet

TIMING = {"context": 256, "decode_steps": 32, "rounds": 7}


def smoke_checkpoint(work: Path, hidden: bool = False) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer (with `hidden`, hidden sizes too), profiled in
    llama.cpp on tiny settings."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import make_bpe_tokenizer, make_elastic

    ckpt = save_checkpoint(make_elastic("llama", hidden=hidden), make_bpe_tokenizer(), work / "ckpt", {})
    # A tiny model's microseconds are noise, whatever the machine: forced past the noise check, and each timing
    # the median of 3, since one far-low timing (weighted by 1 / itself) can pull the fit's price of the smallest
    # sub-network to zero, a table every reader refuses (seen once in CI with 1 repeat).
    api.profile(ckpt, runtime="llama.cpp", context=16, decode_steps=2, repeats=3, samples=6, validate=2,
                threads=1, progress=False, force=True)
    return ckpt


def space_label(space: ElasticSpace) -> str:
    """The kinds of choice a checkpoint's space holds, as the results' headings name them."""
    kinds = ["width" if space.attn_unit == "group" else "width (query-head units)"]
    kinds += ["depth"] * space.depth + ["hidden size"] * bool(space.hidden)
    return " + ".join(kinds)


def seen(em: ElasticModel, budget: float) -> str:
    """How the routers know `budget`: trained on it ("grid"), checked against uniform there ("checked"),
    or neither ("unseen": served what the check of the largest checked budget below it kept)."""
    if em.routers is None:
        return "uniform"
    if any(abs(budget - g) < 1e-9 for g in em.routers.config.budgets):
        return "grid"
    return "checked" if any(abs(budget - c["budget"]) < 1e-9 for c in em.routers.checked or []) else "unseen"


def gguf(ckpt: Path, subnet: Subnet, path: Path, outtype: str) -> Path:
    return api.export(ckpt, None, path, overwrite=True, subnet=subnet, format="gguf", outtype=outtype)


def default_budgets(em: ElasticModel) -> list[float]:
    """The routers' grid (else the checkpoint's feasible grid) and the budgets halfway between its points."""
    grid = list(em.routers.config.budgets) if em.routers else budget_grid(em, "latency_ms")
    return sorted({*grid, *(round((x + y) / 2, 3) for x, y in zip(grid, grid[1:]))})


def per_round_median(copies: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Copies of one model timed in the same rounds, as one file: each round's time is their median."""
    return [{k: statistics.median(r[k] for r in round_) for k in round_[0]} for round_ in zip(*copies)]


def load_order(copies: list[list[Path]], references: list[Path], deci: Path) -> list[Path]:
    """The order files are loaded in and timed in each round. A file's speed can follow its place in the load
    order (benchmarks/load_order.py), so each sub-network's copies (`copies[c]`: copy c of every sub-network)
    sit at places mirrored about the middle, alternate copies in reverse, and the reference copies at places
    spread evenly from first to last (the deci full model in the middle): every model's average place is
    the middle."""
    out = [p for c, row in enumerate(copies) for p in (row if c % 2 == 0 else row[::-1])]
    out.insert(len(out) // 2, deci)
    n = len(out)
    for j in reversed(range(len(references))):
        out.insert(round(j * n / max(1, len(references) - 1)), references[j])
    return out


def with_copies(first: Path, n: int) -> list[Path]:
    """`first` and n - 1 byte copies of it beside it (`name-1.gguf`, ...): one model as n files."""
    out = [first]
    for i in range(1, n):
        out.append(first.with_name(f"{first.stem}-{i}{first.suffix}"))
        shutil.copyfile(first, out[-1])
    return out


def sessions(keys: list[str], group: int) -> list[list[str]]:
    """The served sub-networks split into timing sessions of `group` each (0: all in one)."""
    return [keys] if group <= 0 else [keys[i : i + group] for i in range(0, len(keys), group)]


def run(ckpt: Path, budgets: list[float] | None, work: Path, threads: int | None,
        timing: dict, references: int = 3, copies: int = 2, group: int = 0) -> tuple[dict, list[dict]]:
    em, tok, _ = api.load(ckpt, "cpu")
    if em.latency is None or not em.latency.runtime.startswith(llamacpp.RUNTIME):
        raise FlextronError(f"{ckpt} has no llama.cpp latency table; run flextron profile {ckpt} --runtime llama.cpp")
    outtype, threads = em.latency.outtype, threads or em.latency.threads

    # The reference, the full model as written, is `references` files timed alike, and each round's reference
    # time is their median: one file can run up to ~18 % slower than a copy of itself in the same rounds (a run's
    # 100 % row, which is such a copy, measured 0.853), and every row is a fraction of the reference. Each served
    # sub-network is `copies` files for the same reason.
    fulls = with_copies(gguf(ckpt, em.space.full(), work / "full.gguf", outtype), references)
    # The full model written as deci too: the per-layer graph runs the same weights at another speed
    # (benchmarks/gguf_arch.py), and routed sub-networks are deci files.
    full_deci = write_gguf(em, tok, em.space.full(), work / "full-deci.gguf", outtype, per_layer=True)["path"]

    # One session for every row (or one per `group` of them): each distinct sub-network written once (and copied),
    # and the session's files loaded together and timed in turn in each round, so its rows are judged against the
    # same loads of the full model. With some thirty files loaded at once, sub-networks ran a median 2.5-2.9 % faster
    # against the reference than their price, in sessions of about ten 1.3 % faster to 0.9 % slower
    # (docs/results.md), as the profile that priced them times each beside the full model alone: `--group`.
    budgets = budgets or default_budgets(em)
    served = {b: select_subnet(em, Budget(fraction=b)) for b in budgets}

    def named(s: Subnet) -> str:
        return json.dumps(s.to_dict())

    distinct = {named(s): s for s in [em.space.smallest(), *served.values()]}
    files: dict[str, list[Path]] = {"full": fulls, "deci": [full_deci]}
    for i, (k, s) in enumerate(distinct.items()):
        files[k] = with_copies(gguf(ckpt, s, work / f"subnet{i}.gguf", outtype), copies)
    timed, reference_ms = {}, []
    for keys in sessions(list(distinct), group):
        order = load_order([[files[k][c] for k in keys] for c in range(copies)], fulls, full_deci)
        timings = dict(zip(order, llamacpp.measure_rounds(order, threads=threads, **timing)))
        full_sets = [timings[f] for f in fulls]
        full_runs = per_round_median(full_sets)
        deci_runs = timings[full_deci]
        for k in keys:
            sets = [timings[f] for f in files[k]]
            r = per_round_median(sets)
            timed[k] = (llamacpp.medians(r), llamacpp.median_ratios(r, full_runs),
                        llamacpp.median_ratios(r, deci_runs), [llamacpp.median_ratios(c, full_runs)["decode_ms"]
                                                               for c in sets], llamacpp.medians(full_runs))
        reference_ms.append([llamacpp.medians(f)["decode_ms"] for f in full_sets])
        print("reference files, decode ms: " + ", ".join(f"{ms:.2f}" for ms in reference_ms[-1]))

    tables = {"decode_ms": cost_table(em, "latency_ms"), "prefill_ms": cost_table(em, "prefill_ms")}
    decode = tables["decode_ms"]
    deci = replace(decode, stock=None, in_stock=None)
    smallest = {"measured_fraction": timed[named(em.space.smallest())][1]["decode_ms"],
                "table_fraction": decode.smallest / decode.full, "subnet": em.space.smallest().to_dict()}
    print(f"smallest sub-network: decode {smallest['measured_fraction']:.3f} of the full model's (table "
          f"{smallest['table_fraction']:.3f})")
    rows = []
    for b, subnet in served.items():
        got, ratio, to_deci, each_copy, full = timed[named(subnet)]
        row = {"budget": b, "seen": seen(em, b), "subnet": subnet.to_dict(), "graph": gguf_arch(em, subnet),
               **{f"measured_{k}": v for k, v in got.items()},
               **{f"full_{k}": v for k, v in full.items()}}
        for key, table in tables.items():
            row[f"{key}_target"] = b * full[key]  # the budget as a fraction of the measured full model
            row[f"{key}_ratio"] = ratio[key] / b
            row[f"{key}_predicted_ratio"] = table(subnet) / (b * table.full)
            row[f"{key}_ratio_to_deci_full"] = to_deci[key] / b
        # Were the same choices a deci file: over the target means that no per-layer sub-network
        # within it holds as much as a uniform one served in the stock graph.
        row["decode_ms_predicted_deci_ratio"] = deci(subnet) / (b * decode.full)
        row["decode_ms_copy_ratios"] = [c / b for c in each_copy]
        rows.append(row)
        print(f"budget {b:.0%}: decode {got['decode_ms']:.2f} ms (x{row['decode_ms_ratio']:.3f} of target, table "
              f"x{row['decode_ms_predicted_ratio']:.3f}), prefill {got['prefill_ms']:.1f} ms "
              f"(x{row['prefill_ms_ratio']:.3f})")
    return {"outtype": outtype, "threads": threads, "routed": em.routers is not None, "smallest": smallest,
            "reference_decode_ms": reference_ms, "copies": copies, "group": group,
            "space": space_label(em.space),
            "validation": em.latency.main.validation,
            "stock": {"graph": em.latency.stock_graph, "validation": em.latency.stock.validation,
                      "fit_error": em.latency.stock.fit_error} if em.latency.stock is not None else None,
            "table": {k: v for k, v in em.latency.settings.items()
                      if k in ("runtime", "threads", "outtype", "context", "decode_steps", "repeats", "rounds",
                               "relative_to")}
            }, rows


def _stock_error(stock: dict) -> str:
    """On unseen uniform sub-networks, or on the fitted ones where the fit took every one."""
    (d, which), (p, _) = (reported_error(stock, key) for key in ("decode_ms", "prefill_ms"))
    which += " (every uniform sub-network was fitted on)" if which == "fitted" else ""
    return (f"decode {d['median_pct']:.1f}% ({d['max_pct']:.1f}%), prefill {p['median_pct']:.1f}% "
            f"({p['max_pct']:.1f}%) on {d['n']} {which}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", nargs="?")
    p.add_argument("--budgets", default=None, help="fractions of the full model's decode latency "
                   "(default: the routers' grid, else the checkpoint's feasible grid, and the budgets halfway "
                   "between its points)")
    p.add_argument("--threads", type=int, default=None, help="default: the table's")
    p.add_argument("--references", type=int, default=3,
                   help="copies of the full model timed as the reference (each round: their median)")
    p.add_argument("--copies", type=int, default=2,
                   help="copies of each served sub-network timed (each round: their median)")
    p.add_argument("--group", type=int, default=3,
                   help="served sub-networks per timing session, each session with its own reference copies "
                        "(0: all in one session)")
    p.add_argument("--name", default="llamacpp_budgets",
                   help="results name (JSON and docs/results.md section): one per space and thread count")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    timing = {"context": 16, "decode_steps": 2, "rounds": 1} if a.smoke else TIMING
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = smoke_checkpoint(work) if a.smoke else Path(a.ckpt)
        budgets = [float(x) for x in a.budgets.split(",")] if a.budgets else None
        meta, rows = run(ckpt, budgets, work, a.threads, timing, a.references, a.copies, a.group)
    refs = "; ".join(", ".join(f"{ms:.2f}" for ms in session) for session in meta["reference_decode_ms"])
    one = len(meta["reference_decode_ms"]) == 1
    lines = [
        f"## Latency budgets measured in llama.cpp: {meta['space']}, {meta['threads']} thread(s)",
        "",
        f"`python benchmarks/llamacpp_budgets.py {a.ckpt or '--smoke'}"
        f"{f' --budgets {a.budgets}' if a.budgets else ''}"
        f"{f' --threads {a.threads}' if a.threads else ''}"
        f"{f' --name {a.name}' if a.name != p.get_default('name') else ''}"
        f"{f' --references {a.references}' if a.references != p.get_default('references') else ''}"
        f"{f' --copies {a.copies}' if a.copies != p.get_default('copies') else ''}"
        f"{f' --group {a.group}' if a.group != p.get_default('group') else ''}`"
        f" — {llamacpp.runtime_version()}, "
        f"{meta['outtype']}, {meta['threads']} threads, {'routed' if meta['routed'] else 'uniform'} sub-networks, "
        f"{round(time.time() - t0)} s. Decode ms/token after {timing['context']} tokens (batch 1), prefill ms of "
        f"them; target = budget x the full model's time. "
        + ("One session: the full model (as written and as `deci`), the smallest and every served sub-network are "
           "loaded together and timed in turn" if one else
           f"{len(meta['reference_decode_ms'])} sessions of {a.group} served sub-networks (the smallest among them): "
           "in each, the full model (as written and as `deci`) and the session's sub-networks are loaded together "
           "and timed in turn")
        + f" in {timing['rounds']} rounds, so every row has its session's reference; measured / target is the median "
        f"of the per-round ratios / budget. The reference is {a.references} copies of the full model, each round's "
        f"time their median (their decode ms{'' if one else ', per session'}: {refs}), and each served sub-network "
        f"is {a.copies} copies of its file timed alike, each round's time their median; the copies column gives "
        "each copy's own measured / target, how far one file of the same sub-network can stray. Files load in an "
        "order that mirrors each model's copies about the middle (the reference copies first, middle and last), "
        "so no row gains from its place (benchmarks/load_order.py).",
        "",
        f"The checkpoint's latency table (`flextron profile CKPT --runtime llama.cpp`, {meta['table']}): "
        f"|predicted - measured| / measured on {meta['validation']['decode_ms']['n']} unseen random sub-networks, "
        f"median (max): decode {meta['validation']['decode_ms']['median_pct']:.1f}% "
        f"({meta['validation']['decode_ms']['max_pct']:.1f}%), prefill "
        f"{meta['validation']['prefill_ms']['median_pct']:.1f}% ({meta['validation']['prefill_ms']['max_pct']:.1f}%). "
        f"The smallest sub-network decodes in {meta['smallest']['measured_fraction']:.2f} of the full model's time "
        f"(table: {meta['smallest']['table_fraction']:.2f}), the lowest feasible latency budget.",
        "",
        *([f"The table prices uniform sub-networks (the full model included) by its {meta['stock']['graph']} "
           f"table, fitted on them written as {meta['stock']['graph']}, and the others by the `deci` one above. "
           f"The {meta['stock']['graph']} table's error, median (max): {_stock_error(meta['stock'])}.", ""]
          if meta["stock"] else []),
        "\"The same as deci\": the table's price of the served choices written as `deci`, over the target; above "
        "1 for a uniform sub-network served in the stock graph, no per-layer sub-network within the target runs "
        "as much of the model by the table. Last column: the same sub-network against the full model written as "
        "`deci` (the per-layer graph of routed sub-networks), timed in the same rounds.",
        "",
        "Routers: \"grid\" budgets they were trained on, \"checked\" ones the quality check scored against "
        "uniform, \"unseen\" neither.",
        "",
        "| budget | routers | written as | decode ms (measured / target) | measured / target | "
        "table's prediction / target | the same as deci, table / target | prefill measured / target | "
        "measured / target, full as deci | copies: measured / target |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['budget']:.1%} | {r['seen']} | {r['graph']} | "
          f"{r['measured_decode_ms']:.2f} / {r['decode_ms_target']:.2f} | "
          f"{r['decode_ms_ratio']:.3f} | {r['decode_ms_predicted_ratio']:.3f} | "
          f"{r['decode_ms_predicted_deci_ratio']:.3f} | {r['prefill_ms_ratio']:.3f} | "
          f"{r['decode_ms_ratio_to_deci_full']:.3f} | "
          f"{', '.join(f'{c:.3f}' for c in r['decode_ms_copy_ratios'])} |" for r in rows),
    ]
    print("\n".join(lines))
    if not a.smoke:
        write_json(a.name, {**meta, "timing": timing, "rows": rows, "checkpoint": str(a.ckpt)})
        update_section(a.name, "\n".join(lines))


if __name__ == "__main__":
    main()
