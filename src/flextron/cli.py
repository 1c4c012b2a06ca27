"""The `flextron` command line: parse, call `flextron.api`, print.

Each command's flags come from its options dataclass (`flextron.options`);
`--config FILE.yaml` fills the options not given on the command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from flextron import __version__, api, demo
from flextron.deployment import Deployment
from flextron.errors import FlextronError
from flextron.fsutil import atomic_write, check_target
from flextron.options import (
    ConvertOptions,
    DemoOptions,
    EvalOptions,
    ExportOptions,
    GenerateOptions,
    ProfileOptions,
    ReportOptions,
    RouteOptions,
    ServeOptions,
    TrainOptions,
    check_number,
    field_type,
    read_yaml,
)
from flextron.report import CHAT_COLUMNS, chat_cells, chat_note, shares_of, size_cell, task_cell, widths_cell
from flextron.results import EvalRow, rows_json

console = Console()
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _to_number(text: str, integer: bool) -> float | int:
    value = float(text)  # also reads 1e3; ValueError for words
    if integer and math.isfinite(value) and value == int(value):
        return int(value)
    return value


def number(integer: bool = False, **rules) -> Callable[[str], float | int]:
    """An argparse type: a finite number (an integer when `integer`) obeying `check_number`'s rules."""
    def parse(text: str) -> float | int:
        try:
            value = _to_number(text, integer)
            check_number("value", value, integer=integer, **rules)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        except FlextronError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("--value ")) from None
        return value

    return parse


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _strings(text: str) -> tuple[str, ...]:
    values = tuple(x for x in text.split(",") if x)
    if not values:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated values, got {text!r}")
    return values


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def print_space(rows: list[dict]) -> None:
    table = Table(title="Elastic search space")
    hidden = any("hidden" in r["subnet"] for r in rows)  # a space with hidden sizes (its smallest has one)
    for col in ("sub-network", "MLP width", "attn units", *(("hidden",) if hidden else ()), "params",
                "non-emb params", "FLOPs/token", "KV bytes/token"):
        table.add_column(col, justify="right")
    for r in rows:
        c = r["cost"]
        size = (str(r["subnet"].get("hidden", "full")),) if hidden else ()
        table.add_row(r["name"], widths_cell(r["subnet"]["mlp"]), widths_cell(r["subnet"]["attn"]), *size,
                      _human(c["params"]), _human(c["params_nonembed"]),
                      _human(c["flops_per_token"]), _human(c["kv_bytes_per_token"]))
    console.print(table)


def print_ppl(rows: list[EvalRow], original: EvalRow | None = None, label: str = "elastic",
              more: dict[str, list[EvalRow]] | None = None) -> None:
    groups = {label: rows, **(more or {})}
    if original is not None:
        groups = shares_of(groups, original)
    data = any(r.ppl_data is not None for g in groups.values() for r in g)  # `eval --ppl-data`: its own column
    table = Table(title="Held-out perplexity (War and Peace, last 300k chars)" + (" | ppl data: the --ppl-data file"
                                                                                   if data else ""))
    for col in ("model", "budget", "MLP width", "attn units", "non-emb params", "ppl", *(["ppl data"] if data else [])):
        table.add_column(col, justify="right")
    if original is not None:
        table.add_row("original", "-", "-", "-", _human(original.cost["params_nonembed"]), f"{original.ppl:.2f}")
    for name, group in groups.items():
        for r in group:
            table.add_row(name, str(r.budget), widths_cell(r.subnet.mlp), widths_cell(r.subnet.attn),
                          f"{_human(r.cost['params_nonembed'])} ({r.params_fraction:.0%})",
                          f"{r.ppl:.2f}" if r.ppl is not None else "-",
                          *([f"{r.ppl_data:.2f}" if r.ppl_data is not None else "-"] if data else []))
    console.print(table)


def print_chat(groups: dict[str, list[EvalRow]]) -> None:
    """The chat behaviour of each series' rows that have it (`flextron.behaviour`)."""
    note = chat_note(groups)
    if note is None:
        return
    table = Table(title="Chat: agreement with the original")
    for col in ("model", "budget", "non-emb params", *CHAT_COLUMNS):
        table.add_column(col, justify="right")
    for name, group in groups.items():
        for r in group:
            if r.chat:
                table.add_row(name, str(r.budget), size_cell(r), *chat_cells(r.chat))
    console.print(table)
    console.print(note, markup=False, highlight=False)


def print_tasks(rows: list[EvalRow]) -> None:
    names = list(rows[0].tasks or {})
    if not names:
        return
    table = Table(title="Zero-shot tasks: accuracy (length-normalised) | LAMBADA: accuracy (ppl)")
    for col in ("budget", "non-emb params", *names):
        table.add_column(col, justify="right")
    for r in rows:
        cells = [task_cell(r.tasks[name]) for name in names]
        table.add_row(str(r.budget), f"{_human(r.cost['params_nonembed'])} ({r.params_fraction:.0%})", *cells)
    console.print(table)


def _options(a: argparse.Namespace, cls: type[T], **changes: object) -> T:
    """The `cls` options of a parsed command line."""
    return cls(**{f.name: getattr(a, f.name) for f in fields(cls)} | changes)


def cmd_convert(a: argparse.Namespace) -> None:
    out = api.convert(a.model, a.out, _options(a, ConvertOptions), device=a.device, overwrite=a.overwrite)
    console.print(f"Elastic checkpoint written to [bold]{out}[/bold]")
    print_space(api.describe(out))


def cmd_eval(a: argparse.Namespace) -> None:
    if a.out:
        check_target(Path(a.out))  # before the work, not after
    rows = api.evaluate(a.path, _options(a, EvalOptions), device=a.device)
    if a.adaptive:
        print_adaptive(rows)
    elif rows[0].ppl is not None or rows[0].ppl_data is not None:
        print_ppl(rows)
    print_chat({"elastic": rows})
    print_tasks(rows)
    if a.out:
        out = Path(a.out)
        atomic_write(out, lambda f: f.write_text(rows_json(rows)))
        console.print(f"Results: {out}")


def cmd_demo(a: argparse.Namespace) -> None:
    result = demo.run(_options(a, DemoOptions), device=a.device)
    print_space(result["space"])
    print_ppl(result["prune_only"], result["original"], label="prune only",
              more={"flextron": result["flextron"], "export": [result["export_eval"]]})
    print_chat({"prune only": result["prune_only"], "flextron": result["flextron"]})
    v = result["latency_validation"]
    console.print(f"Latency table error on unseen sub-networks: decode median {v['decode_ms']['median_pct']:.1f}%, "
                  f"prefill median {v['prefill_ms']['median_pct']:.1f}%; routers budget in {result['router_metric']}")
    if result["latency_noise"]:  # the demo kept a table that failed the noise check (demo.run)
        console.print(f"WARNING: {demo.NOISY} ({'; '.join(result['latency_noise'])})", style="bold red", markup=False,
                      highlight=False)
    console.print(f"Elastic checkpoint: {result['checkpoint']}  export: {result['export']}  GGUF: {result['gguf']}")
    sp = result["export_speed"]
    line = f"Export decode / prefill ms: HF eager {sp['hf']['decode_ms']:.1f} / {sp['hf']['prefill_ms']:.0f}"
    cpp = sp["llama.cpp"]
    console.print(line + (f", llama.cpp {cpp['decode_ms']:.1f} / {cpp['prefill_ms']:.0f}" if cpp else
                          f"; llama.cpp: {sp['llama.cpp_missing']}"))
    console.print(f"Report: {result['report']} (pareto.png beside it)  results: {a.out}/results.json")


def cmd_report(a: argparse.Namespace) -> None:
    path, text = api.report(a.run, _options(a, ReportOptions))
    console.print(text, markup=False, highlight=False)
    console.print(f"Report: {path}" + (f"; section {a.section!r} of {a.into} updated" if a.into else ""))


def cmd_profile(a: argparse.Namespace) -> None:
    table = api.profile(a.ckpt, _options(a, ProfileOptions), device=a.device)
    t = Table(title=f"Latency lookup table — {table.runtime}, {table.device}, "
                    f"{table.dtype}, batch {table.batch}, context {table.context}")
    for col in ("", "decode ms/token", "prefill ms"):
        t.add_column(col, justify="right")
    d, p = table.main.decode_ms, table.main.prefill_ms
    t.add_row("overhead", f"{d.overhead:.3f}", f"{p.overhead:.2f}")
    for kind in ("mlp", "attn"):
        for choice, cost in getattr(d, kind).items():
            t.add_row(f"{kind} {choice} (per layer)", f"{cost:.3f}", f"{getattr(p, kind)[choice]:.2f}")
    console.print(t)
    for graph, fitted in table.graphs():  # llama.cpp: uniform sub-networks can also run in the family's own graph
        label = "" if graph is None else f"{graph} graph " + ("(uniform only) " if graph == table.stock_graph else "")
        for key in fitted.validation:
            v, which = fitted.error(key)
            console.print(f"{label}{key}: |predicted - measured| / measured over {v['n']} {which} sub-networks: "
                          f"median {v['median_pct']:.1f}%, max {v['max_pct']:.1f}%")
            for size, e in fitted.validation_by_hidden.get(key, {}).items():  # a space with hidden sizes
                if e["n"]:
                    console.print(f"  at hidden size {size} ({e['n']} of them): median {e['median_pct']:.1f}%, "
                                  f"max {e['max_pct']:.1f}%")
    noise = table.noise
    spread = ", ".join(f"{key.removesuffix('_ms')} {v:.1f}%" for key, v in noise.spread_pct.items())
    console.print(f"Noise check: the full model timed {len(noise.full_model_ms)} times from start to end spread "
                  f"{spread} (threshold {noise.max_spread_pct:g}%); median error threshold {noise.max_error_pct:g}%")
    for key, before in (table.refinements[-1]["error_before"].items() if a.refine else ()):
        after, n = table.refinements[-1]["error_after"][key], before["n"]
        console.print(f"{key} on the {n} routed sub-networks added: median |error| {before['median_pct']:.1f}% before, "
                      f"{after['median_pct']:.1f}% after; signed (predicted over measured) "
                      f"{before['median_signed_pct']:+.1f}% before, {after['median_signed_pct']:+.1f}% after")
    if noise.forced:
        console.print(f"Stored although it failed the noise check (--force, recorded in latency.json): "
                      f"{'; '.join(table.noise_problems)}", style="bold red", markup=False, highlight=False)
    console.print(f"Stored in {a.ckpt}/latency.json")


def cmd_route(a: argparse.Namespace) -> None:
    result = api.route(a.ckpt, _options(a, RouteOptions), a.data, out=a.out, device=a.device, adaptive=a.adaptive)
    if a.adaptive:
        print_adaptive(result["budgets"])
        console.print(f"Adaptive routers stored in {result['checkpoint']}; details in "
                      f"{result['checkpoint']}/adaptive.json")
        return
    at = f" at {result['outtype']} weights" if "outtype" in result else ""
    t = Table(title=f"Routed sub-networks (budgets in {result['metric']}{at})")
    for col in ("budget", "MLP widths", "attn units", "cost/target", "ppl", "uniform ppl", "kept"):
        t.add_column(col, justify="right")
    for r in result["budgets"]:
        t.add_row(str(r.budget), widths_cell(r.subnet.mlp), widths_cell(r.subnet.attn), f"{r.cost_ratio:.3f}",
                  f"{r.ppl:.2f}", f"{r.uniform_ppl:.2f}", r.kept or "router")
    console.print(t)
    if "surrogate_guided" in result:
        console.print(f"The surrogate guided {result['surrogate_guided']:.0%} of the router steps (straight-through "
                      "through the LLM while its error was above the threshold).")
    console.print(f"Routers stored in {result['checkpoint']}; details in {result['checkpoint']}/routing.json")


def print_adaptive(rows: list[EvalRow]) -> None:
    t = Table(title=f"Input-adaptive routing (budgets in {rows[0].metric})")
    checked = any(r.kept for r in rows)  # route: what the check against static routing kept
    data = any(r.ppl_data is not None for r in rows)
    for col in ("budget", "realised cost", "cost/target", "ppl", *(["ppl data"] if data else []),
                "static router ppl, same cost", *(["kept"] if checked else [])):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r.budget), f"{r.realised_fraction:.1%}", f"{r.cost_ratio:.3f}",
                  f"{r.ppl:.2f}" if r.ppl is not None else "-",
                  *([f"{r.ppl_data:.2f}" if r.ppl_data is not None else "-"] if data else []),
                  f"{r.static_ppl:.2f}" if r.static_ppl is not None else "-",
                  *([r.kept or "-"] if checked else []))
    console.print(t)


def cmd_export(a: argparse.Namespace) -> None:
    from flextron.export import read_export_info

    o = _options(a, ExportOptions)
    out = api.export(a.ckpt, a.budget, a.out, o, overwrite=a.overwrite)
    if o.format == "gguf":
        import gguf

        from flextron.gguf import fallbacks

        fields = gguf.GGUFReader(out).fields
        arch = fields["general.architecture"].contents()
        console.print(f"Exported a llama.cpp GGUF ([bold]{arch}[/bold], {o.outtype}) to [bold]{out}[/bold]")
        m = json.loads(fields["flextron.memory"].contents())
        console.print(f"Predicted llama.cpp memory at {Deployment(**m['deployment'])}: {m['total'] / 1e6:.2f} MB = "
                      f"weights {m['weights'] / 1e6:.2f} MB (file {out.stat().st_size / 1e6:.2f} MB) + KV cache "
                      f"{m['kv'] / 1e6:.2f} MB + buffers {m['buffers'] / 1e6:.2f} MB")
        if fell := fallbacks(out, o.outtype):
            kinds = ", ".join(f"{n} {t}" for t, n in sorted(Counter(fell.values()).items()))
            console.print(f"{len(fell)} tensors whose rows are not whole {o.outtype} blocks were stored as llama.cpp "
                          f"fell back: {kinds}")
        return
    info = read_export_info(out)
    kind = "per-layer widths, flextron architecture" if info["per_layer"] else "stock transformers architecture"
    console.print(f"Exported [bold]{info['architecture']}[/bold] ({kind}) to [bold]{out}[/bold]")
    table = Table(title=f"Exported sub-network (budget {info['budget']})")
    for col in ("MLP width", "attn units", "params", "non-emb params", "FLOPs/token", "KV bytes/token"):
        table.add_column(col, justify="right")
    c, sub = info["cost"], info["subnet"]
    table.add_row(widths_cell(sub["mlp"]), widths_cell(sub["attn"]), _human(c["params"]), _human(c["params_nonembed"]),
                  _human(c["flops_per_token"]), _human(c["kv_bytes_per_token"]))
    console.print(table)


def cmd_generate(a: argparse.Namespace) -> None:

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    api.generate(a.path, a.prompt, _options(a, GenerateOptions), device=a.device, stream=emit)
    sys.stdout.write("\n")


def cmd_train(a: argparse.Namespace) -> None:
    summary = api.train(a.ckpt, a.out, _options(a, TrainOptions), a.data, device=a.device, resume=a.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: one report, from rank 0
        return
    console.print(f"Trained {summary['steps']} steps ({summary['tokens']:,} tokens); checkpoint: {summary['final']}")
    if "after" in summary:
        table = Table(title="Held-out perplexity before / after elastic training")
        for col in ("budget", "MLP width", "attn units", "before", "after"):
            table.add_column(col, justify="right")
        for b, r in zip(summary["before"], summary["after"]):
            table.add_row(str(r.budget), widths_cell(r.subnet.mlp), widths_cell(r.subnet.attn), f"{b.ppl:.2f}",
                          f"{r.ppl:.2f}")
        console.print(table)
        console.print(f"Plot: {a.out}/eval.png")


def cmd_serve(a: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    options = _options(a, ServeOptions, default_max_tokens=min(a.default_max_tokens, a.max_tokens))

    def ready(server: api.Server) -> None:
        console.print(f"Serving [bold]{server.name}[/bold] at [bold]{server.url}/v1[/bold] "
                      f"(OpenAI-compatible; a budget as model \"{server.name}@50%\"); Ctrl-C stops")

    api.serve(a.ckpt, options, device=a.device, on_ready=ready)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --option per field of an options dataclass: typed from its annotation (bools as --x / --no-x,
    tuples as comma lists), with the help text, choices and number rules of its `opt`."""
    for f in fields(cls):
        kind, item, _ = field_type(cls, f.name)
        meta = f.metadata
        kw = {"default": f.default, "help": meta["help"].replace("%", "%%"), "choices": meta["choices"]}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kw |= {"type": _floats if item is float else _strings, "metavar": "X,Y,..."}
        elif kind in (int, float):
            kw["type"] = number(integer=kind is int, **meta["rules"])
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flextron", description=__doc__)
    p.add_argument("--version", action="version", version=f"flextron {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, cls: type | None, func: Callable[[argparse.Namespace], None], help: str
                ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                            formatter_class=_Help)
        sp.add_argument("--config", type=Path, default=None, metavar="FILE.yaml",
                        help="YAML mapping of this command's options (flag names) to values; "
                             "flags given on the command line override it")
        if cls is not None:
            add_dataclass_args(sp, cls)
        sp.set_defaults(func=func)
        return sp

    def device(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")

    c = command("convert", ConvertOptions, cmd_convert, "score and sort units, write an elastic checkpoint")
    c.add_argument("model", nargs="?", default=None, help="HF model dir or hub id (default: packaged)")
    c.add_argument("--out", required=True, help="checkpoint directory to write")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    device(c)

    e = command("eval", EvalOptions, cmd_eval, "held-out perplexity and zero-shot tasks across budgets")
    e.add_argument("path", nargs="?", default=None, help="elastic checkpoint or HF model dir (default: packaged)")
    e.add_argument("--out", default=None, help="write the results as JSON here")
    device(e)

    rp = command("report", ReportOptions, cmd_report, "markdown tables and PNG plots from a run's JSON")
    rp.add_argument("run", help="demo or training run directory, or a JSON file from `eval --out`")

    device(command("demo", DemoOptions, cmd_demo, "the pipeline on the packaged model"))

    t = command("train", TrainOptions, cmd_train,
                "elastic continued training (distillation over sampled sub-networks)")
    t.add_argument("ckpt", help="elastic checkpoint from `flextron convert`")
    t.add_argument("--out", required=True,
                   help="run directory (checkpoints, metrics.csv, eval.json/png, run.json, config.yaml)")
    t.add_argument("--data", action="append", default=None,
                   help=".txt/.jsonl/.parquet file or folder, or hf:NAME; repeatable (default: packaged train split)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    device(t)

    pr = command("profile", ProfileOptions, cmd_profile, "measure the latency lookup table on this device")
    pr.add_argument("ckpt", help="elastic checkpoint (the table is stored in it)")
    device(pr)

    r = command("route", RouteOptions, cmd_route, "train static routers (budget -> per-layer widths)")
    r.add_argument("ckpt", help="elastic checkpoint")
    r.add_argument("--out", default=None, help="write the routed checkpoint here (default: in place)")
    r.add_argument("--data", action="append", default=None,
                   help=".txt/.jsonl/.parquet file or folder, or hf:NAME; repeatable (default: packaged train split)")
    r.add_argument("--adaptive", action="store_true",
                   help="train input-adaptive routers (per-token MLP, per-request attention) on a routed checkpoint")
    device(r)

    x = command("export", ExportOptions, cmd_export,
                "slice the sub-network for a budget into a standalone HF directory or a GGUF file")
    x.add_argument("ckpt", help="elastic checkpoint")
    x.add_argument("--budget", required=True,
                   help="0.6, 60%%, metric=value such as params=80e6, or memory=512MB (at --outtype, --context)")
    x.add_argument("--out", required=True, help="directory (or GGUF file) to write")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    g = command("generate", GenerateOptions, cmd_generate,
                "continue a prompt with a checkpoint at a budget, or an HF model dir")
    g.add_argument("path", help="elastic checkpoint or HF model directory (e.g. an export)")
    g.add_argument("prompt", help="the text to continue")
    device(g)

    v = command("serve", ServeOptions, cmd_serve,
                "OpenAI-compatible HTTP server: every budget from one elastic checkpoint")
    v.add_argument("ckpt", help="elastic checkpoint")
    device(v)
    return p


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _given(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The options given on the command line: the same argv parsed with every default suppressed."""
    saved = {action: action.default for action in sub._actions}
    for action in saved:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved.items():
            action.default = default


def _config_value(action: argparse.Action, value: object, where: str) -> object:
    """A YAML value read as the flag's command-line text would be (same type, checks and choices)."""
    if value is None:
        if action.default is not None:
            raise FlextronError(f"{where} is null; give it a value or leave the key out")
        return None
    if action.nargs == 0:  # --x / --no-x, or a switch
        if not isinstance(value, bool):
            raise FlextronError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    try:
        value = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise FlextronError(f"{where}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise FlextronError(f"{where} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return value


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> None:
    """Set the options of `args` not given on the command line from its `--config` YAML file."""
    sub = _subparser(parser, args.command)
    values = read_yaml(args.config)
    actions = {a.dest: a for a in sub._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise FlextronError(f"{args.config}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                            f"for `flextron {args.command}` (see `flextron {args.command} --help`)")
    given = _given(parser, sub, argv)
    for dest, value in values.items():
        if dest not in given:
            setattr(args, dest, _config_value(actions[dest], value, f"{args.config}: {dest}"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own bars show the work; transformers' per-load bars would only add noise.
    hf_logging.disable_progress_bar()
    try:
        if args.config is not None:
            apply_config(parser, args, argv)
        args.func(args)
    except FlextronError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment (disk full, permissions, a path that vanished), not a bug
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
