"""The `flextron` command line: parse, call `flextron.api`, print."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from flextron import __version__, api
from flextron.config import CalibrationConfig, ElasticSpace, RouterConfig, TrainConfig, check_number
from flextron.errors import FlextronError
from flextron.evaluate import EvalRow, rows_json
from flextron.fsutil import atomic_write, check_target
from flextron.gguf import OUTTYPES
from flextron.precision import DTYPES
from flextron.report import task_cell
from flextron.tasks import TASKS

console = Console()


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


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


_POS_INT = number(integer=True, low=1)
_SEED = number(integer=True, low=0, high=2**32 - 1)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _widths(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else f"{min(values)}..{max(values)}"


def print_space(rows: list[dict]) -> None:
    table = Table(title="Elastic search space")
    for col in ("sub-network", "MLP width", "attn units", "params", "non-emb params",
                "FLOPs/token", "KV bytes/token"):
        table.add_column(col, justify="right")
    for r in rows:
        c = r["cost"]
        table.add_row(r["name"], _widths(r["subnet"]["mlp"]), _widths(r["subnet"]["attn"]),
                      _human(c["params"]), _human(c["params_nonembed"]),
                      _human(c["flops_per_token"]), _human(c["kv_bytes_per_token"]))
    console.print(table)


def print_ppl(rows: list[EvalRow], original: EvalRow | None = None, label: str = "elastic",
              more: dict[str, list[EvalRow]] | None = None) -> None:
    table = Table(title="Held-out perplexity (War and Peace, last 300k chars)")
    for col in ("model", "budget", "MLP width", "attn units", "non-emb params", "ppl"):
        table.add_column(col, justify="right")
    if original is not None:
        table.add_row("original", "-", "-", "-", _human(original.cost["params_nonembed"]), f"{original.ppl:.2f}")
    for name, group in {label: rows, **(more or {})}.items():
        for r in group:
            table.add_row(name, str(r.budget), _widths(r.subnet.mlp), _widths(r.subnet.attn),
                          f"{_human(r.cost['params_nonembed'])} ({r.params_fraction:.0%})",
                          f"{r.ppl:.2f}" if r.ppl is not None else "-")
    console.print(table)


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


def cmd_convert(a: argparse.Namespace) -> None:
    calib = CalibrationConfig(n_sequences=a.calib_sequences, seq_len=a.calib_seq_len,
                              batch_size=a.batch_size, seed=a.seed, source=a.calib_data)
    space = None
    if a.space:
        try:
            space = ElasticSpace.from_dict(json.loads(Path(a.space).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FlextronError(f"cannot read the elastic space {a.space} ({e}); it needs "
                                '{"mlp": [[widths per layer]], "attn": [[units per layer]]}') from None
    out = api.convert(a.model, a.out, mlp_fractions=a.mlp_fractions, attn_fractions=a.attn_fractions,
                      multiple=a.multiple, calibration=calib, order=a.order, device=a.device,
                      dtype=a.dtype, overwrite=a.overwrite, space=space, depth=a.depth, min_layers=a.min_layers)
    console.print(f"Elastic checkpoint written to [bold]{out}[/bold]")
    print_space(api.describe(out))


def cmd_eval(a: argparse.Namespace) -> None:
    if a.out:
        check_target(Path(a.out))  # before the work, not after
    rows = api.evaluate(a.path, a.budgets, tasks=a.tasks, limit=a.limit, seq_len=a.seq_len,
                        batch_size=a.batch_size, device=a.device, dtype=a.dtype, adaptive=a.adaptive,
                        verify=a.verify)
    if a.adaptive:
        print_adaptive(rows)
    elif rows[0].ppl is not None:
        print_ppl(rows)
    print_tasks(rows)
    if a.out:
        out = Path(a.out)
        atomic_write(out, lambda f: f.write_text(rows_json(rows)))
        console.print(f"Results: {out}")


def cmd_demo(a: argparse.Namespace) -> None:
    result = api.demo(a.preset, a.out, device=a.device)
    print_space(result["space"])
    print_ppl(result["prune_only"], result["original"], label="prune only",
              more={"flextron": result["flextron"], "export": [result["export_eval"]]})
    v = result["latency_validation"]
    console.print(f"Latency table error on unseen sub-networks: decode median {v['decode_ms']['median_pct']:.1f}%, "
                  f"prefill median {v['prefill_ms']['median_pct']:.1f}%; routers budget in {result['router_metric']}")
    console.print(f"Elastic checkpoint: {result['checkpoint']}  export: {result['export']}  GGUF: {result['gguf']}")
    sp = result["export_speed"]
    line = f"Export decode / prefill ms: HF eager {sp['hf']['decode_ms']:.1f} / {sp['hf']['prefill_ms']:.0f}"
    cpp = sp["llama.cpp"]
    console.print(line + (f", llama.cpp {cpp['decode_ms']:.1f} / {cpp['prefill_ms']:.0f}" if cpp else
                          f"; llama.cpp: {sp['llama.cpp_missing']}"))
    console.print(f"Report: {result['report']} (pareto.png beside it)  results: {a.out}/results.json")


def cmd_report(a: argparse.Namespace) -> None:
    path, text = api.report(a.run, title=a.title, into=a.into, section=a.section)
    console.print(text, markup=False, highlight=False)
    console.print(f"Report: {path}" + (f"; section {a.section!r} of {a.into} updated" if a.into else ""))


def cmd_profile(a: argparse.Namespace) -> None:
    table = api.profile(a.ckpt, device=a.device, dtype=a.dtype, batch=a.batch, context=a.context,
                        decode_steps=a.decode_steps, repeats=a.repeats, n_fit=a.samples, n_validate=a.validate,
                        runtime=a.runtime, threads=a.threads, outtype=a.outtype, rounds=a.rounds,
                        verify=a.verify)
    t = Table(title=f"Latency lookup table — {table.get('runtime', 'hf-eager')}, {table['device']}, "
                    f"{table['dtype']}, batch {table['batch']}, context {table['context']}")
    for col in ("", "decode ms/token", "prefill ms"):
        t.add_column(col, justify="right")
    d, p = table["decode_ms"], table["prefill_ms"]
    t.add_row("overhead", f"{d['overhead']:.3f}", f"{p['overhead']:.2f}")
    for kind in ("mlp", "attn"):
        for choice in d[kind]:
            t.add_row(f"{kind} {choice} (per layer)", f"{d[kind][choice]:.3f}", f"{p[kind][choice]:.2f}")
    console.print(t)
    for key, v in table["validation"].items():
        console.print(f"{key}: |predicted - measured| / measured over {v['n']} unseen sub-networks: "
                      f"median {v['median_pct']:.1f}%, max {v['max_pct']:.1f}%")
    console.print(f"Stored in {a.ckpt}/latency.json")


def cmd_route(a: argparse.Namespace) -> None:
    cfg = RouterConfig(**{f.name: getattr(a, f.name) for f in fields(RouterConfig)})
    result = api.route(a.ckpt, cfg, a.data, out=a.out, device=a.device, adaptive=a.adaptive)
    if a.adaptive:
        print_adaptive(result["budgets"])
        console.print(f"Adaptive routers stored in {result['checkpoint']}; details in "
                      f"{result['checkpoint']}/adaptive.json")
        return
    t = Table(title=f"Routed sub-networks (budgets in {result['metric']})")
    for col in ("budget", "MLP widths", "attn units", "cost/target", "ppl", "uniform ppl", "kept"):
        t.add_column(col, justify="right")
    for r in result["budgets"]:
        t.add_row(str(r.budget), _widths(r.subnet.mlp), _widths(r.subnet.attn), f"{r.cost_ratio:.3f}",
                  f"{r.ppl:.2f}", f"{r.uniform_ppl:.2f}", r.kept or "router")
    console.print(t)
    if "surrogate_guided" in result:
        console.print(f"The surrogate guided {result['surrogate_guided']:.0%} of the router steps (straight-through "
                      "through the LLM while its error was above the threshold).")
    console.print(f"Routers stored in {result['checkpoint']}; details in {result['checkpoint']}/routing.json")


def print_adaptive(rows: list[EvalRow]) -> None:
    t = Table(title=f"Input-adaptive routing (budgets in {rows[0].metric})")
    for col in ("budget", "realised cost", "cost/target", "ppl", "static router ppl, same cost"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r.budget), f"{r.realised_fraction:.1%}", f"{r.cost_ratio:.3f}",
                  f"{r.ppl:.2f}" if r.ppl is not None else "-",
                  f"{r.static_ppl:.2f}" if r.static_ppl is not None else "-")
    console.print(t)


def cmd_export(a: argparse.Namespace) -> None:
    from flextron.export import read_export_info

    out = api.export(a.ckpt, a.budget, a.out, overwrite=a.overwrite, format=a.format, outtype=a.outtype,
                     verify=a.verify)
    if a.format == "gguf":
        console.print(f"Exported a llama.cpp GGUF ({a.outtype}) to [bold]{out}[/bold]")
        return
    info = read_export_info(out)
    kind = "per-layer widths, flextron architecture" if info["per_layer"] else "stock transformers architecture"
    console.print(f"Exported [bold]{info['architecture']}[/bold] ({kind}) to [bold]{out}[/bold]")
    table = Table(title=f"Exported sub-network (budget {info['budget']})")
    for col in ("MLP width", "attn units", "params", "non-emb params", "FLOPs/token", "KV bytes/token"):
        table.add_column(col, justify="right")
    c, sub = info["cost"], info["subnet"]
    table.add_row(_widths(sub["mlp"]), _widths(sub["attn"]), _human(c["params"]), _human(c["params_nonembed"]),
                  _human(c["flops_per_token"]), _human(c["kv_bytes_per_token"]))
    console.print(table)


def cmd_generate(a: argparse.Namespace) -> None:

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    api.generate(a.path, a.prompt, a.budget, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                 top_p=a.top_p, raw=a.raw, device=a.device, seed=a.seed, stream=emit, adaptive=a.adaptive,
                 verify=a.verify)
    sys.stdout.write("\n")


def cmd_train(a: argparse.Namespace) -> None:
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)})
    summary = api.train(a.ckpt, a.out, cfg, a.data, device=a.device, resume=a.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: one report, from rank 0
        return
    console.print(f"Trained {summary['steps']} steps ({summary['tokens']:,} tokens); checkpoint: {summary['final']}")
    if "after" in summary:
        table = Table(title="Held-out perplexity before / after elastic training")
        for col in ("budget", "MLP width", "attn units", "before", "after"):
            table.add_column(col, justify="right")
        for b, r in zip(summary["before"], summary["after"]):
            table.add_row(str(r.budget), _widths(r.subnet.mlp), _widths(r.subnet.attn), f"{b.ppl:.2f}",
                          f"{r.ppl:.2f}")
        console.print(table)
        console.print(f"Plot: {a.out}/eval.png")


def cmd_serve(a: argparse.Namespace) -> None:
    import logging

    from flextron.serve import ServeConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = ServeConfig(max_prompt_tokens=a.max_prompt_tokens, max_tokens=a.max_tokens,
                         default_max_tokens=min(a.default_max_tokens, a.max_tokens), max_body_bytes=a.max_body_bytes,
                         max_queue=a.max_queue, max_batch=a.max_batch, max_connections=a.max_connections)

    def ready(server: api.Server) -> None:
        console.print(f"Serving [bold]{server.name}[/bold] at [bold]{server.url}/v1[/bold] "
                      f"(OpenAI-compatible; a budget as model \"{server.name}@50%\"); Ctrl-C stops")

    api.serve(a.ckpt, a.host, a.port, device=a.device, dtype=a.dtype, name=a.name, config=config, on_ready=ready,
              verify=a.verify)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --option per dataclass field, typed from its default (tuples are comma-separated floats)."""
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple) or f.name == "budget_probs":
            parser.add_argument(flag, type=_floats, default=default, metavar="X,Y,...")
        elif default is None or isinstance(default, int):
            parser.add_argument(flag, type=number(integer=True), default=default)
        elif isinstance(default, float):
            parser.add_argument(flag, type=number(), default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flextron", description=__doc__)
    p.add_argument("--version", action="version", version=f"flextron {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        sp.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="compute dtype")

    def no_verify(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the weights against the sha256 recorded in the checkpoint (faster)")

    c = sub.add_parser("convert", help="score and sort units, write an elastic checkpoint")
    c.add_argument("model", nargs="?", default=None, help="HF model dir or hub id (default: packaged)")
    c.add_argument("--out", required=True, help="checkpoint directory to write")
    c.add_argument("--mlp-fractions", type=_floats, default=(0.25, 0.5, 0.75, 1.0))
    c.add_argument("--attn-fractions", type=_floats, default=(0.25, 0.5, 0.75, 1.0))
    c.add_argument("--multiple", type=_POS_INT, default=64, help="MLP widths are multiples of this")
    c.add_argument("--space", default=None,
                   help='JSON file with per-layer choices {"mlp": [[...], ...], "attn": [[...], ...]}'
                        "; a list may start with 0 (skip)")
    c.add_argument("--depth", action="store_true",
                   help="also allow skipping each layer's attention or MLP (choice 0), least important first")
    c.add_argument("--min-layers", type=int, default=None,
                   help="depth floor: layers that keep their attention, and their MLP (default with --depth: 1/3)")
    c.add_argument("--calib-data", default="default", help="a .txt file, or 'default' (train split)")
    c.add_argument("--calib-sequences", type=_POS_INT, default=256)
    c.add_argument("--calib-seq-len", type=_POS_INT, default=256)
    c.add_argument("--batch-size", type=_POS_INT, default=16)
    c.add_argument("--seed", type=_SEED, default=0)
    c.add_argument("--order", default="importance", choices=["importance", "random"])
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    common(c)
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("eval", help="held-out perplexity and zero-shot tasks across budgets")
    e.add_argument("path", nargs="?", default=None, help="elastic checkpoint or HF model dir")
    e.add_argument("--budgets", type=_list, default=["1.0", "0.75", "0.5"])
    e.add_argument("--tasks", type=_list, default=["ppl"],
                   help=f"ppl and/or {','.join(TASKS)}, or requests.jsonl(.gz) files")
    e.add_argument("--limit", type=_POS_INT, default=None, help="at most this many windows / documents per task")
    e.add_argument("--out", default=None, help="write the results as JSON here")
    e.add_argument("--adaptive", action="store_true", help="route per token (MLP) and per request (attention)")
    e.add_argument("--seq-len", type=_POS_INT, default=1024)
    e.add_argument("--batch-size", type=_POS_INT, default=4)
    common(e)
    no_verify(e)
    e.set_defaults(func=cmd_eval)

    rp = sub.add_parser("report", help="markdown tables and PNG plots from a run's JSON")
    rp.add_argument("run", help="demo or training run directory, or a JSON file from `eval --out`")
    rp.add_argument("--title", default=None)
    rp.add_argument("--into", type=Path, default=None, help="also replace a marked section of this markdown file")
    rp.add_argument("--section", default="report", help="the section name in --into (<!-- NAME:start -->)")
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="the pipeline on the packaged model")
    d.add_argument("--preset", default="demo", choices=["tiny", "demo", "bench"])
    d.add_argument("--out", default="flextron-demo")
    d.add_argument("--device", default=None)
    d.set_defaults(func=cmd_demo)
    t = sub.add_parser("train", help="elastic continued training (distillation over sampled sub-networks)")
    t.add_argument("ckpt", help="elastic checkpoint from `flextron convert`")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics.csv, eval.json/png)")
    t.add_argument("--data", action="append", default=None,
                   help=".txt/.jsonl/.parquet file or folder, or hf:NAME; repeatable (default: packaged train split)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--device", default=None)
    add_dataclass_args(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("profile", help="measure the latency lookup table on this device")
    pr.add_argument("ckpt")
    pr.add_argument("--batch", type=_POS_INT, default=1)
    pr.add_argument("--context", type=_POS_INT, default=256, help="prompt tokens (prefill) before decoding")
    pr.add_argument("--decode-steps", type=_POS_INT, default=16)
    pr.add_argument("--repeats", type=_POS_INT, default=3, help="timed runs per sub-network (after a warm-up)")
    pr.add_argument("--rounds", type=_POS_INT, default=1,
                    help="time every sub-network once per round, interleaved, and keep the median (noisy machines)")
    pr.add_argument("--samples", type=_POS_INT, default=24, help="random sub-networks the table is fitted on")
    pr.add_argument("--validate", type=_POS_INT, default=10, help="further sub-networks it is checked on")
    pr.add_argument("--runtime", choices=["hf", "llama.cpp"], default="hf",
                    help="time the elastic model in HF eager, or GGUF exports in llama.cpp")
    pr.add_argument("--threads", type=_POS_INT, default=None, help="llama.cpp threads (default: all cores)")
    pr.add_argument("--outtype", choices=OUTTYPES, default="f32", help="llama.cpp weights")
    common(pr)
    no_verify(pr)
    pr.set_defaults(func=cmd_profile)

    r = sub.add_parser("route", help="train static routers (budget -> per-layer widths)")
    r.add_argument("ckpt")
    r.add_argument("--out", default=None, help="write the routed checkpoint here (default: in place)")
    r.add_argument("--data", action="append", default=None)
    r.add_argument("--device", default=None)
    r.add_argument("--adaptive", action="store_true",
                   help="train input-adaptive routers (per-token MLP, per-request attention) on a routed checkpoint")
    add_dataclass_args(r, RouterConfig)
    r.set_defaults(func=cmd_route)

    x = sub.add_parser("export", help="slice the sub-network for a budget into a standalone HF directory")
    x.add_argument("ckpt", help="elastic checkpoint")
    x.add_argument("--budget", required=True, help="0.6, 60%%, or metric=value such as params=80e6")
    x.add_argument("--out", required=True, help="directory to write")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    no_verify(x)
    x.add_argument("--format", choices=["hf", "gguf"], default="hf", help="HF directory, or one llama.cpp GGUF file")
    x.add_argument("--outtype", choices=OUTTYPES, default="f32", help="GGUF weight type")
    x.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="continue a prompt with a checkpoint at a budget, or an HF model dir")
    g.add_argument("path", help="elastic checkpoint or HF model directory (e.g. an export)")
    g.add_argument("prompt")
    g.add_argument("--budget", default=None, help="elastic checkpoints only (default: the full model)")
    g.add_argument("--max-new-tokens", type=_POS_INT, default=128)
    g.add_argument("--temperature", type=number(low=0.0), default=0.0, help="0: greedy (default); >0: sampling")
    g.add_argument("--top-p", type=number(low=0.0, high=1.0, low_open=True), default=1.0,
                   help="nucleus sampling threshold")
    g.add_argument("--seed", type=_SEED, default=None, help="sampling seed")
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    g.add_argument("--adaptive", action="store_true", help="route per token (MLP) and per request (attention)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    no_verify(g)
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server: every budget from one elastic checkpoint")
    v.add_argument("ckpt", help="elastic checkpoint")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    v.add_argument("--port", type=number(integer=True, low=0, high=65535), default=8000)
    v.add_argument("--name", default=None, help="model id reported to clients (default: checkpoint dir name)")
    v.add_argument("--max-prompt-tokens", type=_POS_INT, default=4096, help="longer prompts get 400")
    v.add_argument("--max-tokens", type=_POS_INT, default=1024, help="largest max_tokens a request may ask")
    v.add_argument("--default-max-tokens", type=_POS_INT, default=128, help="when a request gives none")
    v.add_argument("--max-body-bytes", type=_POS_INT, default=1 << 20, help="larger request bodies get 413")
    v.add_argument("--max-queue", type=_POS_INT, default=64, help="requests generating or waiting; more get 503")
    v.add_argument("--max-batch", type=_POS_INT, default=16, help="sequences decoding together (1: one at a time)")
    v.add_argument("--max-connections", type=_POS_INT, default=256, help="open connections; more get 503")
    common(v)
    no_verify(v)
    v.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own bars show the work; transformers' per-load bars would only add noise.
    hf_logging.disable_progress_bar()
    try:
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
