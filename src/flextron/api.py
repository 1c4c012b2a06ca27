"""Public entry points; each CLI subcommand calls the function of the same name. They resolve the
device, load and delegate: each stage's work lives in its own module (`convert`, `train.elastic`,
`train.routers`, `latency` / `llamacpp`, `evaluate`, `export`, `generation`, `serve`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from flextron.adaptive import AdaptiveLM
from flextron.assets import load_hf
from flextron.behaviour import chat_prompts, compare, original_model, reference
from flextron.budgets import budget_metric, select_subnet
from flextron.checkpoint import MANIFEST, load_checkpoint
from flextron.convert import convert as convert_checkpoint
from flextron.cost import memory_parts, subnet_cost
from flextron.data import heldout_windows
from flextron.elastic import ElasticModel
from flextron.engine import Engine, Request
from flextron.errors import FlextronError
from flextron.evaluate import adaptive_at_budgets, eval_at_budgets, read_text_file, text_windows
from flextron.export import export as export_model
from flextron.fsutil import check_output_dir, clean_leftovers
from flextron.generation import check_positions, prompt_inputs
from flextron.latency_table import LatencyTable, check_weight_type
from flextron.options import (
    ConvertOptions,
    EvalOptions,
    ExportOptions,
    GenerateOptions,
    ProfileOptions,
    ReportOptions,
    RouteOptions,
    ServeOptions,
    TrainOptions,
    resolve,
)
from flextron.precision import compute_dtype
from flextron.results import EvalRow
from flextron.serve import Server, Service
from flextron.space import Budget, Subnet
from flextron.tasks import OWN_TASKS, load_docs, score_task, task_names


def resolve_device(device: str | None) -> str:
    """`cuda` when available and not told otherwise; a clear error for an unusable choice."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlextronError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise FlextronError(f"unknown device {device!r}; use cpu or cuda")
    return device


def convert(model: str | None = None, out: str | Path = "flextron-ckpt", options: ConvertOptions | None = None, *,
            device: str | None = None, overwrite: bool = False, progress: bool = True, **overrides: Any) -> Path:
    """Load an HF model, score and sort its units on calibration text, save an elastic checkpoint.

    `options` (or its fields as keyword arguments): the space is uniform from the fractions, or
    per layer from the JSON file `space`; `depth` adds choice 0 (skip the sub-layer) to every list;
    `min_layers` is the floor of layers that keep each kind of sub-layer. Sub-layers are skipped
    in ascending importance. `hidden_fractions` adds hidden-size choices (multiples of
    `hidden_multiple`), the residual stream's channels sorted by importance too.
    """
    return convert_checkpoint(model, Path(out), resolve(ConvertOptions, options, overrides),
                              device=resolve_device(device), overwrite=overwrite, progress=progress)


def load(path: str | Path, device: str | None = None, verify: bool = True
         ) -> tuple[ElasticModel, PreTrainedTokenizerBase, dict]:
    """An elastic checkpoint as (model, tokenizer, manifest); `verify=False` skips the weights' hash check."""
    return load_checkpoint(Path(path), device=resolve_device(device), verify=verify)


def open_model(path: str | Path | None, budgets: list[Budget], device: str | None, verify: bool = True
          ) -> tuple[ElasticModel, PreTrainedTokenizerBase]:
    """An elastic checkpoint, or a plain HF model directory (None: the packaged model) at its one size."""
    if path is not None and not Path(path).exists():
        clean_leftovers(Path(path).parent)  # a directory hidden by a killed overwrite comes back
    if path is not None and (Path(path) / MANIFEST).is_file():
        em, tok, _ = load(path, device, verify)
        return em, tok
    if any(b.fraction != 1.0 for b in budgets):
        raise FlextronError(
            f"{path or 'the packaged model'} is not an elastic checkpoint (no {MANIFEST}), so only budget 1.0 "
            "applies; run `flextron convert` first, or drop --budget"
        )
    hf, tok, _ = load_hf(None if path is None else str(path), device=resolve_device(device))
    return ElasticModel(hf), tok


def evaluate(path: str | Path | None, options: EvalOptions | None = None, *, device: str | None = None,
             progress: bool = True, **overrides: Any) -> list[EvalRow]:
    """Held-out perplexity (task `ppl`), behaviour against the original on chat prompts (task `chat`,
    `flextron.behaviour`) and zero-shot task scores (`flextron.tasks.TASKS` or request files) of an elastic
    checkpoint at each budget; `options` or its fields as keyword arguments. `limit` caps windows and
    documents per task; `ppl_data` adds the perplexity on a text file. `adaptive`: route per token and per
    request (rows then report the realised average cost).

    A path without a flextron manifest (or None, the packaged model) is evaluated as a
    plain HF model at full size: pass `budgets=["1.0"]`. Memory budgets (`memory_mb=60`, `memory=512MB`) are
    priced at `weight_type` weights with a KV cache of `context` x `batch` at `kv_type` (`flextron.footprint`).
    """
    o = resolve(EvalOptions, options, overrides)
    limit, seq_len, batch_size = o.limit, o.seq_len, o.batch_size
    device = resolve_device(device)
    autocast = compute_dtype(o.dtype, device)
    tasks = task_names(list(o.tasks) or ["ppl"])
    parsed = [Budget.parse(b) for b in o.budgets]
    _check_eval_options(o, tasks)
    docs = {t: load_docs(t, limit) for t in tasks if t not in OWN_TASKS}
    data = read_text_file(o.ppl_data) if o.ppl_data else None
    prompts = chat_prompts(o.chat_prompts, o.chat_limit) if "chat" in tasks else None
    source = original_model(path, o.original) if prompts else None
    ref = None
    if source is not None:  # the original answers first and is let go before the model loads
        original, original_tok, _ = load_hf(source, device=device)
        ref = reference(ElasticModel(original), original_tok, prompts, o.chat_tokens, batch_size, autocast)
        del original
    em, tok = open_model(path, parsed, device, o.verify)
    em.deployment = o.deployment(o.weight_type)
    windows = heldout_windows(tok, seq_len, limit) if "ppl" in tasks else None
    data_windows = text_windows(tok, data, seq_len, limit, f"--ppl-data {o.ppl_data}") if data else None
    if prompts and ref is None:  # a plain model is its own original
        ref = reference(em, tok, prompts, o.chat_tokens, batch_size, autocast)

    def score(model: torch.nn.Module) -> dict:
        return {t: score_task(model, tok, t, d, batch_size, autocast, progress) for t, d in docs.items()}

    def chat(model: ElasticModel | AdaptiveLM) -> dict:
        return compare(model, tok, ref, batch_size, autocast)

    if o.adaptive:
        return adaptive_at_budgets(em, windows, parsed, batch_size, autocast, progress, score if docs else None,
                                   data_windows, chat if ref is not None else None)
    return eval_at_budgets(em, windows, parsed, batch_size, autocast, progress, score if docs else None,
                           data_windows, chat if ref is not None else None)


def _check_eval_options(o: EvalOptions, tasks: list[str]) -> None:
    """Refuse, before any model loads, the chat options where they do not apply."""
    if "chat" not in tasks and (o.chat_prompts or o.original):
        raise FlextronError("--chat-prompts and --original set up the chat task; add chat to --tasks")


def describe(path: str | Path) -> list[dict]:
    """The search space of a checkpoint: cost of its smallest, centroid and full sub-networks."""
    em, _, _ = load(path, "cpu")
    rows = []
    for name, subnet in (("min", em.space.smallest()), ("centroid", em.space.centroid()),
                         ("max", em.space.full())):
        rows.append({"name": name, "subnet": subnet.to_dict(), "cost": subnet_cost(em, subnet).to_dict()})
    return rows


def report(run: str | Path, options: ReportOptions | None = None, **overrides: Any) -> tuple[Path, str]:
    """Markdown tables and PNG plots of a run's JSON; see `flextron.report`."""
    from flextron.report import report as make_report

    o = resolve(ReportOptions, options, overrides)
    return make_report(run, o.title, None if o.into is None else Path(o.into), o.section)


def export(ckpt: str | Path, budget: str | float | None, out: str | Path, options: ExportOptions | None = None, *,
           overwrite: bool = False, subnet: Subnet | dict | None = None, **overrides: Any) -> Path:
    """Slice the sub-network for `budget` (or the explicit `subnet`) into a standalone HF directory,
    or with `format="gguf"` into one llama.cpp file (`outtype`: f32, f16, bf16, q8_0, or a llama.cpp quantizer
    type q6_k, q5_k_m, q4_k_m, q4_0; a latency budget needs the type its llama.cpp table was timed at; `graph`:
    which llama.cpp graph a uniform sub-network is written in, by default the faster by the checkpoint's
    llama.cpp latency table, as its budgets were priced). A memory budget (`memory_mb=60`, `memory=512MB`)
    is priced at `outtype` weights with a KV cache of `context` x `batch` at `kv_type`; a GGUF records what
    it is predicted to occupy there, in bytes (`flextron.memory`: `cost.memory_parts` and the deployment)."""
    o = resolve(ExportOptions, options, overrides)
    out = Path(out)
    if (budget is None) == (subnet is None):
        raise FlextronError("pass exactly one of a budget (e.g. --budget 0.5) or an explicit sub-network")
    if o.format == "hf":
        check_output_dir(out, overwrite)
    em, tok, _ = load(ckpt, "cpu", o.verify)
    em.deployment = o.deployment(o.outtype)  # a memory budget holds for the weights written
    if subnet is None:
        if o.format == "gguf":  # a latency budget holds at the weight type its llama.cpp table was timed at
            check_weight_type(em.latency, budget_metric(em, Budget.parse(budget)), o.outtype)
        subnet = select_subnet(em, Budget.parse(budget))
    elif isinstance(subnet, dict):
        hidden = subnet.get("hidden")  # the full size is spelled None, as every sub-network flextron makes
        subnet = Subnet(mlp=list(subnet["mlp"]), attn=list(subnet["attn"]),
                        hidden=None if hidden == em.hidden_size else hidden)
    info = {"source_checkpoint": str(ckpt), "budget": None if budget is None else str(Budget.parse(budget))}
    if o.format == "gguf":
        from flextron.gguf import per_layer_graph, write_gguf

        per_layer = per_layer_graph(em, subnet, o.graph)
        # What llama.cpp will allocate for it at the deployment (bytes), as a memory budget prices it.
        info["memory"] = json.dumps({**memory_parts(em, subnet), "deployment": asdict(em.deployment)})
        write_gguf(em, tok, subnet, out, o.outtype, overwrite=overwrite, name=Path(ckpt).resolve().name, info=info,
                   per_layer=per_layer)
        return out
    info["cost"] = subnet_cost(em, subnet).to_dict()
    return export_model(em, tok, subnet, out, overwrite=overwrite, info=info)


def generate(path: str | Path, prompt: str, options: GenerateOptions | None = None, *, device: str | None = None,
             stream: Callable[[str], None] | None = None, **overrides: Any) -> str:
    """Continue `prompt` (in the chat template unless `raw`) with an elastic checkpoint at `budget` (the
    full model when None) or any HF model dir; `options` or its fields as keyword arguments.

    Greedy at temperature 0, else sampling with nucleus `top_p`. Generation ends at the end-of-text
    token, after `max_new_tokens` (or at the model's context length), or at the first `stop` string
    (left out of the text); `stream` receives the text as it comes. `adaptive`: the prompt picks each
    layer's attention width, each token its MLP width. The decoder is `serve`'s (`flextron.engine`),
    run on this thread.
    """
    o = resolve(GenerateOptions, options, overrides)
    budget = None if o.budget is None else Budget.parse(o.budget)
    em, tok = open_model(path, [] if budget is None else [budget], resolve_device(device), o.verify)
    em.deployment = o.deployment(o.weight_type)
    engine = Engine(em, tok, start=False)
    fraction = engine.adaptive_fraction(budget or Budget(fraction=1.0)) if o.adaptive else None
    # No budget: the full model, whatever the routers would pick at 100 % (adaptive routing routes it).
    subnet, _ = engine.resolve(None if o.adaptive else budget)
    ids = prompt_inputs(tok, prompt, o.raw)["input_ids"][0].tolist()
    (result,) = engine.generate([Request(ids, subnet, o, adaptive=fraction, on_text=stream)])
    return result.text


def train(ckpt: str | Path, out: str | Path, cfg: TrainOptions | None = None, data: list[str] | None = None, *,
          device: str | None = None, resume: bool = False, progress: bool = True, **overrides: Any) -> dict:
    """Elastic continued training of a checkpoint (`cfg` or its fields as keyword arguments);
    see `flextron.train.elastic.train`."""
    from flextron.train.elastic import train as train_elastic  # torch.distributed only when training

    cfg = resolve(TrainOptions, cfg, overrides)
    return train_elastic(Path(ckpt), Path(out), cfg, data, device=resolve_device(device), resume=resume,
                         progress=progress)


def serve(ckpt: str | Path, options: ServeOptions | None = None, *, device: str | None = None,
          on_ready: Callable[[Server], None] | None = None, **overrides: Any) -> None:
    """Serve an elastic checkpoint over OpenAI-compatible HTTP, every budget from one copy of the weights;
    `options` (address, name, limits) or its fields as keyword arguments.

    Blocks until interrupted, or until `server.shutdown()` is called on the `Server` that
    `on_ready` receives once it listens.
    """
    o = resolve(ServeOptions, options, overrides)
    device = resolve_device(device)
    em, tok, _ = load_checkpoint(Path(ckpt), device=device, dtype=compute_dtype(o.dtype, device) or torch.float32,
                                 verify=o.verify)
    em.deployment = o.deployment(o.weight_type)
    server = Server(Service(em, tok, o.name or Path(ckpt).resolve().name, o), o.host, o.port)
    try:
        if on_ready is not None:
            on_ready(server)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def profile(ckpt: str | Path, options: ProfileOptions | None = None, *, device: str | None = None,
            progress: bool = True, **overrides: Any) -> LatencyTable:
    """Measure the latency lookup table of a checkpoint on this device and store it in the checkpoint;
    `options` or its fields as keyword arguments.

    `runtime="llama.cpp"` times GGUF exports (`outtype`) of the sub-networks in llama.cpp with
    `threads` threads instead of the elastic model in HF eager; budgets then refer to that table.
    `rounds` > 1 times every sub-network once per round, interleaved, and keeps the median.
    A table that fails the noise check (the full model's repeated timings spread more than `max_spread`
    %, or a median error on unseen sub-networks above `max_error` %: a busy machine) is refused in one
    line and the checkpoint left as it was, unless `force` (then latency.json records it: `table.noise`).

    `refine`: keep the stored llama.cpp table and refit it with the sub-networks the checkpoint's routers
    serve at their grid budgets timed and added (`llamacpp.refine`); route again afterwards, so the routers
    learn the refitted prices.
    """
    from flextron.latency import profile as measure_table

    o = resolve(ProfileOptions, options, overrides)
    if o.runtime == "llama.cpp" and o.batch != 1:
        raise FlextronError("the llama.cpp latency table is measured at batch 1; drop --batch")
    em, tok, _ = load(ckpt, device if o.runtime == "hf" and not o.refine else "cpu", o.verify)
    if o.refine:  # at the stored table's context and decode steps
        table = _refined(em, tok, o, ckpt, progress)
    else:
        check_positions(em.config, o.context + o.decode_steps, "--context plus --decode-steps")
        if o.runtime == "hf":
            table = measure_table(em, o, compute_dtype(o.dtype, next(em.parameters()).device), progress=progress)
        else:
            from flextron import llamacpp

            table = llamacpp.profile(em, tok, o, progress=progress)
    table.save(ckpt)
    return table


def _refined(em: ElasticModel, tok: PreTrainedTokenizerBase, o: ProfileOptions, ckpt: str | Path, progress: bool
             ) -> LatencyTable:
    """The stored llama.cpp table refitted with the routers' served sub-networks at their grid budgets."""
    from flextron import llamacpp

    if em.latency is None or not em.latency.runtime.startswith(llamacpp.RUNTIME):
        raise FlextronError(f"--refine refits a llama.cpp latency table and {ckpt} has none; run flextron profile "
                            f"{ckpt} --runtime llama.cpp first")
    if em.routers is None:
        raise FlextronError(f"--refine times the sub-networks the routers serve and {ckpt} has no routers; run "
                            f"flextron route {ckpt} first")
    served = [select_subnet(em, Budget(metric=em.routers.metric, fraction=b)) for b in em.routers.config.budgets]
    return llamacpp.refine(em, tok, em.latency, served, o, progress=progress)


def route(ckpt: str | Path, cfg: RouteOptions | None = None, data: list[str] | None = None, *,
          out: str | Path | None = None, overwrite: bool = False, device: str | None = None,
          adaptive: bool = False, progress: bool = True,
          **overrides: Any) -> dict:
    """Train static routers (straight through the LLM, or surrogate-guided) and fine-tune jointly; per
    budget keep the better of the routed and the largest uniform sub-network on held-out training rows;
    store them in the checkpoint (or in `out`) and report, per budget, the kept sub-network, its cost and
    held-out perplexity.

    `adaptive`: on a checkpoint with static routers, train the input-adaptive routers instead and
    report them against the static router at the same realised cost; see `flextron.train.routers.route`.
    `cfg` or its fields as keyword arguments; the resolved options are recorded beside the JSON report
    (routing.yaml or adaptive.yaml)."""
    from flextron.train.routers import route as route_stage  # torch.distributed only when training

    cfg = resolve(RouteOptions, cfg, overrides)
    return route_stage(ckpt, cfg, data, out=out, overwrite=overwrite, device=resolve_device(device),
                       adaptive=adaptive, progress=progress)
