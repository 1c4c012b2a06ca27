"""Public entry points; each CLI subcommand calls the function of the same name. They resolve the
device, load and delegate: each stage's work lives in its own module (`convert`, `train.elastic`,
`train.routers`, `latency` / `llamacpp`, `evaluate`, `export`, `generation`, `serve`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from flextron.adaptive import AdaptiveRouting
from flextron.assets import load_hf
from flextron.checkpoint import MANIFEST, load_checkpoint
from flextron.config import (
    Budget,
    CalibrationConfig,
    ElasticSpace,
    RouterConfig,
    Subnet,
    TrainConfig,
    check_number,
)
from flextron.convert import convert as convert_checkpoint
from flextron.cost import subnet_cost
from flextron.data import heldout_windows
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.evaluate import EvalRow, adaptive_at_budgets, eval_at_budgets
from flextron.export import export as export_model
from flextron.fsutil import check_output_dir, clean_leftovers
from flextron.generation import complete, generate_text, prompt_inputs
from flextron.precision import compute_dtype
from flextron.routers import select_subnet
from flextron.serve import ServeConfig, Server, Service
from flextron.tasks import load_docs, score_task, task_names


def resolve_device(device: str | None) -> str:
    """`cuda` when available and not told otherwise; a clear error for an unusable choice."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlextronError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise FlextronError(f"unknown device {device!r}; use cpu or cuda")
    return device


def convert(model: str | None = None, out: str | Path = "flextron-ckpt", *,
            mlp_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
            attn_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
            multiple: int = 64, calibration: CalibrationConfig | None = None,
            order: str = "importance", device: str | None = None, dtype: str = "fp32",
            overwrite: bool = False, progress: bool = True, space: ElasticSpace | None = None,
            depth: bool = False, min_layers: int | None = None) -> Path:
    """Load an HF model, score and sort its units on calibration text, save an elastic checkpoint.

    `space` (per-layer choice lists) replaces the uniform space built from the fractions.
    `depth` adds choice 0 (skip the sub-layer) to every list; `min_layers` is the floor of layers
    that keep each kind of sub-layer. Sub-layers are skipped in ascending importance.
    """
    return convert_checkpoint(model, Path(out), mlp_fractions=mlp_fractions, attn_fractions=attn_fractions,
                              multiple=multiple, calibration=calibration or CalibrationConfig(), order=order,
                              device=resolve_device(device), dtype=dtype, overwrite=overwrite, progress=progress,
                              space=space, depth=depth, min_layers=min_layers)


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


def evaluate(path: str | Path | None, budgets: list[str] | None = None, *, tasks: list[str] | None = None,
             limit: int | None = None, seq_len: int = 1024, batch_size: int = 4, device: str | None = None,
             dtype: str = "fp32", adaptive: bool = False, progress: bool = True, verify: bool = True) -> list[EvalRow]:
    """Held-out perplexity (task `ppl`) and zero-shot task scores (`flextron.tasks.TASKS` or request
    files) of an elastic checkpoint at each budget. `limit` caps windows and documents per task.
    `adaptive`: route per token and per request (rows then report the realised average cost).

    A path without a flextron manifest (or None, the packaged model) is evaluated as a
    plain HF model at full size.
    """
    check_number("limit", limit, integer=True, low=1, optional=True)
    check_number("seq_len", seq_len, integer=True, low=1)
    check_number("batch_size", batch_size, integer=True, low=1)
    autocast = compute_dtype(dtype)
    device = resolve_device(device)
    tasks = task_names(tasks or ["ppl"])
    parsed = [Budget.parse(b) for b in (budgets or ["1.0"])]
    docs = {t: load_docs(t, limit) for t in tasks if t != "ppl"}
    em, tok = open_model(path, parsed, device, verify)
    windows = heldout_windows(tok, seq_len, limit) if "ppl" in tasks else None

    def score(model: torch.nn.Module) -> dict:
        return {t: score_task(model, tok, t, d, batch_size, autocast, progress) for t, d in docs.items()}

    if adaptive:
        return adaptive_at_budgets(em, windows, parsed, batch_size, autocast, progress, score if docs else None)
    return eval_at_budgets(em, windows, parsed, batch_size, autocast, progress, score if docs else None)


def describe(path: str | Path) -> list[dict]:
    """The search space of a checkpoint: cost of its smallest, centroid and full sub-networks."""
    em, _, _ = load(path, "cpu")
    rows = []
    for name, subnet in (("min", em.space.smallest()), ("centroid", em.space.centroid()),
                         ("max", em.space.full())):
        rows.append({"name": name, "subnet": subnet.to_dict(), "cost": subnet_cost(em, subnet).to_dict()})
    return rows


def report(run: str | Path, title: str | None = None, into: str | Path | None = None,
           section: str = "report") -> tuple[Path, str]:
    """Markdown tables and PNG plots of a run's JSON; see `flextron.report`."""
    from flextron.report import report as make_report

    return make_report(run, title, None if into is None else Path(into), section)


def demo(preset: str = "demo", out: str | Path = "flextron-demo", device: str | None = None,
         progress: bool = True) -> dict:
    """The whole pipeline on the packaged model; see `flextron.demo`."""
    from flextron import demo as pipeline  # it calls back into this module

    return pipeline.run(preset, out, device=device, progress=progress)


def export(ckpt: str | Path, budget: str | float | None, out: str | Path, overwrite: bool = False, *,
           subnet: Subnet | dict | None = None, format: str = "hf", outtype: str = "f32",
           verify: bool = True) -> Path:
    """Slice the sub-network for `budget` (or the explicit `subnet`) into a standalone HF directory,
    or with `format="gguf"` into one llama.cpp file (`outtype`: f32, f16, bf16 or q8_0)."""
    out = Path(out)
    if (budget is None) == (subnet is None):
        raise FlextronError("pass exactly one of a budget (e.g. --budget 0.5) or an explicit sub-network")
    if format not in ("hf", "gguf"):
        raise FlextronError(f"--format must be hf or gguf, not {format!r}")
    if format == "hf":
        check_output_dir(out, overwrite)
    em, tok, _ = load(ckpt, "cpu", verify)
    if subnet is None:
        subnet = select_subnet(em, Budget.parse(budget))
    elif isinstance(subnet, dict):
        subnet = Subnet(mlp=list(subnet["mlp"]), attn=list(subnet["attn"]))
    info = {"source_checkpoint": str(ckpt), "budget": None if budget is None else str(Budget.parse(budget))}
    if format == "gguf":
        from flextron.gguf import write_gguf

        write_gguf(em, tok, subnet, out, outtype, overwrite=overwrite, name=Path(ckpt).resolve().name, info=info)
        return out
    return export_model(em, tok, subnet, out, overwrite=overwrite, info=info)


def generate(path: str | Path, prompt: str, budget: str | float | None = None, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, raw: bool = False, device: str | None = None,
             seed: int | None = None, stream: Callable[[str], None] | None = None, adaptive: bool = False,
             verify: bool = True) -> str:
    """Continue `prompt` with an elastic checkpoint at `budget` (full model when None) or any HF model dir.

    Greedy at temperature 0, else sampling with nucleus `top_p`; `stream` receives text as it comes.
    `adaptive`: the prompt picks each layer's attention width, each token its MLP width.
    """
    parsed = [] if budget is None else [Budget.parse(budget)]
    em, tok = open_model(path, parsed, resolve_device(device), verify)
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
               "stream": stream}
    if adaptive:
        routing = AdaptiveRouting.for_model(em)
        fraction = routing.fraction(parsed[0] if parsed else Budget(fraction=1.0))
        routing.attach()
        inputs = prompt_inputs(tok, prompt, raw)
        try:
            routing.start(fraction, inputs["input_ids"].to(next(em.parameters()).device))
            return complete(em.model, tok, inputs, **options).text
        finally:
            routing.detach()
    if parsed:  # no budget: the full model, whatever the routers would pick at 100%
        em.set_subnet(select_subnet(em, parsed[0]))
    return generate_text(em.model, tok, prompt, raw=raw, **options)


def train(ckpt: str | Path, out: str | Path, cfg: TrainConfig, data: list[str] | None = None, *,
          device: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Elastic continued training of a checkpoint; see `flextron.train.elastic.train`."""
    from flextron.train.elastic import train as train_elastic  # torch.distributed only when training

    return train_elastic(Path(ckpt), Path(out), cfg, data, device=resolve_device(device), resume=resume,
                         progress=progress)


def serve(ckpt: str | Path, host: str = "127.0.0.1", port: int = 8000, *, device: str | None = None,
          dtype: str = "fp32", name: str | None = None, config: ServeConfig | None = None,
          on_ready: Callable[[Server], None] | None = None, verify: bool = True) -> None:
    """Serve an elastic checkpoint over OpenAI-compatible HTTP, every budget from one copy of the weights.

    Blocks until interrupted, or until `server.shutdown()` is called on the `Server` that
    `on_ready` receives once it listens.
    """
    device = resolve_device(device)
    check_number("port", port, integer=True, low=0, high=65535)
    em, tok, _ = load_checkpoint(Path(ckpt), device=device, dtype=compute_dtype(dtype) or torch.float32,
                                 verify=verify)
    server = Server(Service(em, tok, name or Path(ckpt).resolve().name, config), host, port)
    try:
        if on_ready is not None:
            on_ready(server)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def profile(ckpt: str | Path, *, device: str | None = None, dtype: str = "fp32", batch: int = 1,
            context: int = 256, decode_steps: int = 16, repeats: int = 3, n_fit: int = 24, n_validate: int = 10,
            progress: bool = True, runtime: str = "hf", threads: int | None = None, outtype: str = "f32",
            verify: bool = True, rounds: int = 1) -> dict:
    """Measure the latency lookup table of a checkpoint on this device and store it in the checkpoint.

    `runtime="llama.cpp"` times GGUF exports (`outtype`) of the sub-networks in llama.cpp with
    `threads` threads instead of the elastic model in HF eager; budgets then refer to that table.
    `rounds` > 1 times every sub-network once per round, interleaved, and keeps the median.
    """
    from flextron.latency import profile as measure_table
    from flextron.latency import save_table

    for name, value in (("batch", batch), ("context", context), ("decode_steps", decode_steps),
                        ("repeats", repeats), ("samples", n_fit), ("validate", n_validate), ("rounds", rounds)):
        check_number(name, value, integer=True, low=1)
    check_number("threads", threads, integer=True, low=1, optional=True)
    if runtime not in ("hf", "llama.cpp"):
        raise FlextronError(f"--runtime must be hf or llama.cpp, not {runtime!r}")
    if runtime == "hf":
        em, _, _ = load(ckpt, device, verify)
        table = measure_table(em, batch, context, decode_steps, repeats, n_fit, n_validate, compute_dtype(dtype),
                              progress=progress, rounds=rounds)
    else:
        from flextron import llamacpp

        if batch != 1:
            raise FlextronError("the llama.cpp latency table is measured at batch 1; drop --batch")
        em, tok, _ = load(ckpt, "cpu", verify)
        table = llamacpp.profile(em, tok, context=context, decode_steps=decode_steps, repeats=repeats, n_fit=n_fit,
                                 n_validate=n_validate, threads=threads, outtype=outtype, progress=progress,
                                 rounds=rounds)
    save_table(Path(ckpt), table)
    return table


def route(ckpt: str | Path, cfg: RouterConfig, data: list[str] | None = None, *, out: str | Path | None = None,
          overwrite: bool = False, device: str | None = None, unseen: tuple[float, ...] | None = None,
          adaptive: bool = False, progress: bool = True) -> dict:
    """Train static routers (surrogate-guided) and fine-tune jointly; per budget keep the better of
    the routed and the largest uniform sub-network on held-out training rows; store them in the
    checkpoint (or in `out`) and report, per budget, the kept sub-network, its cost and held-out
    perplexity.

    `adaptive`: on a checkpoint with static routers, train the input-adaptive routers instead and
    report them against the static router at the same realised cost; see `flextron.train.routers.route`."""
    from flextron.train.routers import route as route_stage  # torch.distributed only when training

    return route_stage(ckpt, cfg, data, out=out, overwrite=overwrite, device=resolve_device(device), unseen=unseen,
                       adaptive=adaptive, progress=progress)
