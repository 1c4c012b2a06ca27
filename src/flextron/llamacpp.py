"""The llama.cpp runtime (through `llama-cpp-python`): load a GGUF, logits, greedy decoding, timing,
and the latency table of a checkpoint's sub-networks as GGUF exports."""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flextron.deployment import Deployment
from flextron.errors import FlextronError
from flextron.gguf import gguf_arch, in_own_arch, write_gguf
from flextron.latency import StockGraph, trimmed_mean
from flextron.latency import profile as fit_table
from flextron.latency import refine as refit_table
from flextron.llamacpp_binding import LOG_INFO, default_threads, library, log_lines
from flextron.options import ProfileOptions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from flextron.elastic import ElasticModel
    from flextron.latency_table import LatencyTable
    from flextron.space import Subnet

RUNTIME = "llama.cpp"


def runtime_version() -> str:
    return f"{RUNTIME} (llama-cpp-python {library().__version__})"


def load(path: str | Path, *, n_ctx: int = 512, threads: int | None = None, exact: bool = False,
         all_logits: bool = False):
    """A `llama_cpp.Llama` on `path`, quiet, set up as llama.cpp's own tools default to: f16 KV cache
    and flash attention (`-fa auto` resolves to on for CPUs and GPUs; without it llama.cpp pads
    every layer's V cache to the widest layer's, so per-layer `deci` sub-networks would be timed with
    attention they do not have). `exact`: f32 KV cache and no flash attention (which rounds through
    f16 on CPUs), for comparisons with the elastic model.

    `all_logits` keeps every position's logits (`logits`); otherwise only the last one is computed.
    """
    llama_cpp = library()
    if not Path(path).is_file():
        raise FlextronError(f"{path} is not a GGUF file")
    threads = threads or default_threads()
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if exact else {}
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                               n_threads_batch=threads, logits_all=all_logits, flash_attn=not exact, verbose=False,
                               **cache)
    except ValueError as e:  # llama.cpp refused the file
        raise FlextronError(f"llama.cpp cannot load {path} ({e})") from None


@contextmanager
def opened(path: str | Path, **options) -> Iterator:
    """`load` as a context manager that frees the model at the end."""
    llm = load(path, **options)
    try:
        yield llm
    finally:
        llm.close()


def allocated(path: str | Path, deployment: Deployment) -> dict[str, int]:
    """What llama.cpp allocates to run the GGUF `path` at `deployment` (a KV cache of `context` cells per
    sequence for `batch` sequences at `kv_type`; flash attention, its default 512-token micro-batch), in
    bytes: `weights` (its model size, exact) and the `kv`, `output` and `compute` buffers its log reports
    (MiB to 2 decimals)."""
    llama_cpp = library()
    if not Path(path).is_file():
        raise FlextronError(f"{path} is not a GGUF file")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max = deployment.context * deployment.batch, deployment.batch
    params.n_threads = params.n_threads_batch = 1
    params.type_k = params.type_v = getattr(llama_cpp, f"GGML_TYPE_{deployment.kv_type.upper()}")
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    with log_lines(LOG_INFO) as lines:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not model:
            raise FlextronError(f"llama.cpp cannot load {path}")
        try:
            lines.clear()  # the model's own buffers: its size is exact
            ctx = llama_cpp.llama_init_from_model(model, params)
            if not ctx:
                raise FlextronError(f"llama.cpp cannot make a context for {path} at {deployment}")
            reported = list(lines)
            llama_cpp.llama_free(ctx)
            out = {"weights": llama_cpp.llama_model_size(model), "kv": 0, "output": 0, "compute": 0}
        finally:
            llama_cpp.llama_model_free(model)
    for line in reported:
        if m := re.search(r"(\w+) buffer size =\s*([0-9.]+) MiB", line):
            key = m.group(1).lower()
            if key in out:
                out[key] += round(float(m.group(2)) * 2**20)
    return out


def last_logits(llm) -> np.ndarray:
    """Logits after the last evaluated token."""
    ptr = library().llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def logits(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] logits of a fresh sequence (the model must be loaded with `all_logits`)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)])


def greedy(llm, ids: list[int], max_new_tokens: int, stop_ids: Collection[int] = ()) -> list[int]:
    """Greedy continuation of `ids`: the new token ids, up to the first of `stop_ids` (kept)."""
    llm.reset()
    llm.eval(list(ids))
    out: list[int] = []
    while len(out) < max_new_tokens:
        nxt = int(np.argmax(last_logits(llm)))
        out.append(nxt)
        if nxt in stop_ids or len(out) == max_new_tokens:
            break
        llm.eval([nxt])
    return out


def measure_rounds(paths: list[str | Path], rounds: int, context: int = 256, decode_steps: int = 16,
                   threads: int | None = None) -> list[list[dict[str, float]]]:
    """Per file, its prefill latency (ms) of `context` tokens and decode latency (ms per token, batch
    1) after them, once per round. All files are loaded together and timed in turn within each round
    (the order alternating, after a warm-up round), so a slow spell of a shared machine falls on
    neighbours alike and the ratio of two files' times in one round cancels it."""
    with ExitStack() as stack:
        llms = [stack.enter_context(opened(p, n_ctx=context + decode_steps + 1, threads=threads)) for p in paths]
        return _rounds(llms, _prompt(llms[0], context), rounds, decode_steps)


def _prompt(llm, context: int) -> list[int]:
    return np.random.default_rng(0).integers(0, llm.n_vocab(), context + 1).tolist()


def _rounds(llms: list, ids: list[int], rounds: int, decode_steps: int, warm: int = 0) -> list[list[dict[str, float]]]:
    """`measure_rounds` on loaded models; the first `warm` of them have run before and skip the warm-up."""
    out: list[list[dict[str, float]]] = [[] for _ in llms]
    for r in range(rounds + 1):  # the first round warms up
        for i in (range(len(llms)) if r % 2 else reversed(range(len(llms)))):
            if r > 0 or i >= warm:
                timing = _time_once(llms[i], ids, decode_steps)
                if r > 0:
                    out[i].append(timing)
    return out


def against(reference: str | Path, path: str | Path, rounds: int, context: int = 256, decode_steps: int = 16,
            threads: int | None = None) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """The two files timed back to back in each of `rounds` rounds (`measure_rounds`): the medians
    of `reference`'s and of `path`'s prefill and decode ms, and the medians of the per-round ratios
    path / reference, which a slow spell of the machine does not move."""
    ref, got = measure_rounds([reference, path], rounds, context, decode_steps, threads)
    return medians(ref), medians(got), median_ratios(got, ref)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per timing (prefill_ms, decode_ms), the median over one file's rounds."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def median_ratios(runs: list[dict[str, float]], reference: list[dict[str, float]]) -> dict[str, float]:
    """Per timing, the median over rounds of one file's time / the reference file's in the same round."""
    return {k: statistics.median(g[k] / f[k] for f, g in zip(reference, runs)) for k in runs[0]}


def _time_once(llm, ids: list[int], decode_steps: int) -> dict[str, float]:
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids[:-1])
    prefill = time.perf_counter() - t
    nxt = ids[-1]
    t = time.perf_counter()
    for _ in range(decode_steps):
        llm.eval([nxt])
        nxt = int(np.argmax(last_logits(llm)))
    return {"prefill_ms": prefill * 1e3, "decode_ms": (time.perf_counter() - t) * 1e3 / decode_steps}


def measure(path: str | Path, context: int = 256, decode_steps: int = 16, repeats: int = 3,
            threads: int | None = None) -> dict[str, float]:
    """Prefill latency (ms) of `context` tokens and decode latency (ms per token, batch 1) after them."""
    runs = measure_rounds([path], repeats, context, decode_steps, threads)[0]
    return {k: trimmed_mean([r[k] for r in runs]) for k in ("prefill_ms", "decode_ms")}


class Reference:
    """The full model's GGUF, loaded once for a whole profile, beside which every sub-network is timed.

    At 2 threads on a 2-core VM the same file decoded at 15.6-20.6 ms/token from one load to the next,
    and a sub-network's time over the full model's moved 12-25 % between sessions timed alone, 3.7-9.6 %
    timed in turn with the full model in the same rounds (benchmarks/timing_repeatability.py). So a sub-network's
    time is stored as its median ratio to the reference within rounds, times the reference's own median
    time at the start (`scale`): a slow load or spell moves both alike, and the table prices what the
    budgets are judged by, a fraction of the full model's time. `reference_*` keys carry the
    reference's raw times beside each timing, which the profile's noise check reads."""

    def __init__(self, llm, context: int, decode_steps: int, repeats: int, scale: dict[str, float] | None = None
                 ) -> None:
        """`scale`: a stored table's reference times (a refinement stores on its scale); timed here otherwise."""
        self.llm, self.decode_steps, self.repeats = llm, decode_steps, repeats
        self.ids = _prompt(llm, context)
        self.scale = scale or medians(_rounds([llm], self.ids, max(3, repeats), decode_steps)[0])

    def time(self, path: str | Path, threads: int | None) -> dict[str, float]:
        with opened(path, n_ctx=len(self.ids) + self.decode_steps, threads=threads) as llm:
            ref, got = _rounds([self.llm, llm], self.ids, self.repeats, self.decode_steps, warm=1)
        ratio = median_ratios(got, ref)
        return {k: r * self.scale[k] for k, r in ratio.items()} | {f"reference_{k}": v for k, v in medians(ref).items()}


def gguf_timer(em, tokenizer, workdir: str | Path, reference: Reference, outtype: str = "f32",
               threads: int | None = None, per_layer: bool = False):
    """A `latency.profile` timer: each sub-network is exported to a GGUF in `workdir` (`per_layer`:
    as `deci`, see `write_gguf`) and timed in llama.cpp beside `reference` (`Reference.time`)."""
    def timer(subnet) -> dict[str, float]:
        path = Path(workdir) / "subnet.gguf"
        write_gguf(em, tokenizer, subnet, path, outtype, overwrite=True, per_layer=per_layer)
        return reference.time(path, threads)

    return timer


def profile(em: ElasticModel, tokenizer: PreTrainedTokenizerBase, options: ProfileOptions, *, progress: bool
            ) -> dict:
    """The latency table (`flextron.latency.profile`, batch 1, `options.rounds` interleaved timing
    rounds) of the sub-networks exported as GGUF files (`options.outtype`) and timed in llama.cpp
    with `options.threads` threads (default: every core).

    llama.cpp runs the same weights up to ~17% apart in the family's own architecture, which holds
    uniform sub-networks only (the full model included), and in `deci`, which holds all. Where the
    family has both, the table is fitted on every sub-network written as `deci` and its "stock"
    table on the uniform ones written in the family's own, so `export --graph auto` can write each
    uniform sub-network in its faster graph and budgets price it there (`LatencyTable.runs_in_stock`).

    In a space with hidden sizes the sub-networks are exported and timed at theirs; a family whose
    llama.cpp graphs cannot hold a smaller hidden size (GPT-2; OLMo 2 and others whose own graph ties the
    query width to it and that have no `deci`) is refused before any timing.

    Every sub-network is timed beside the full model's GGUF (as `deci` where the family has both
    graphs), kept loaded through the profile, and stored as its time relative to it (`Reference`;
    latency.json's "relative_to" and "reference"). The noise check of `latency.profile` holds here too,
    on the full model's own times: it is timed again among the others, and every graph's fit is held
    to the error threshold."""
    threads = options.threads or default_threads()
    named = {"runtime": runtime_version(), "threads": threads, "outtype": options.outtype, "dtype": options.outtype,
             "device": f"cpu ({threads} threads)"}
    try:  # own: the family's own graph, where llama.cpp also runs its sub-networks as deci
        own = gguf_arch(em, em.space.full())
        gguf_arch(em, em.space.full(), per_layer=True)
    except FlextronError:  # one graph, for uniform sub-networks only (GPT-2, untied Qwen3, Gemma, OLMo 2, ...)
        if em.space.depth:
            raise FlextronError(f"llama.cpp runs {em.config.model_type} sub-networks only with the same widths "
                                "in every layer and no skipped sub-layer; profile a checkpoint converted without "
                                "--depth, or profile with --runtime hf") from None
        own, graph = None, gguf_arch(em, em.space.full())
    else:
        graph = "deci"
    _check_hidden_sizes(em, per_layer=own is not None)
    with tempfile.TemporaryDirectory() as tmp, _reference(em, tokenizer, Path(tmp), options, threads, own) as ref:
        named |= {"relative_to": f"the full model as {graph}", "reference": ref.scale}
        uniform = gguf_timer(em, tokenizer, tmp, ref, options.outtype, threads)  # in the family's own graph
        if own is None:
            return fit_table(em, options, progress=progress, timer=uniform, runtime=named | {"graphs": "uniform only"},
                             uniform_only=True)
        stock = StockGraph(own, partial(in_own_arch, em), uniform)
        return fit_table(em, options, progress=progress, runtime=named, stock=stock,
                         timer=gguf_timer(em, tokenizer, tmp, ref, options.outtype, threads, per_layer=True))


def refine(em: ElasticModel, tokenizer: PreTrainedTokenizerBase, table: LatencyTable, subnets: list[Subnet],
           options: ProfileOptions, *, progress: bool) -> LatencyTable:
    """`table` (a llama.cpp table of `em`) refitted with `subnets` added (`flextron.latency.refine`): each
    exported as the table exports it and timed beside a fresh load of its reference, at the table's own
    settings (threads, weight type, context, decode steps, repeats; `options` gives the rounds and the noise
    check), and stored on the table's scale (its "reference" times: `Reference`), so old and new rows
    are fractions of the same full model. Uniform sub-networks served in the family's own graph are left
    out: its stock fit holds them all already."""
    if not table.runtime.startswith(RUNTIME) or table.reference is None:
        raise FlextronError("--refine adds sub-networks to a llama.cpp latency table timed beside its reference; "
                            "profile the checkpoint with --runtime llama.cpp first")
    timed = table.settings
    settings = replace(options, runtime=RUNTIME, threads=table.threads, outtype=table.outtype, context=table.context,
                       decode_steps=timed["decode_steps"], repeats=timed["repeats"])
    own = table.stock_graph
    with tempfile.TemporaryDirectory() as tmp, _reference(em, tokenizer, Path(tmp), settings, settings.threads,
                                                          own, table.reference) as ref:
        timer = gguf_timer(em, tokenizer, tmp, ref, settings.outtype, settings.threads, per_layer=own is not None)
        return refit_table(em, table, [s for s in subnets if not table.runs_in_stock(s)], timer, settings, progress)


@contextmanager
def _reference(em: ElasticModel, tokenizer: PreTrainedTokenizerBase, work: Path, options: ProfileOptions,
               threads: int, own: str | None, scale: dict[str, float] | None = None) -> Iterator[Reference]:
    """The full model written to `work` (as deci where the family has both graphs: the one most
    sub-networks run in), loaded and timed for a profile (`Reference`; `scale`: its times, given)."""
    path = work / "reference.gguf"
    write_gguf(em, tokenizer, em.space.full(), path, options.outtype, per_layer=own is not None)
    with opened(path, n_ctx=options.context + options.decode_steps + 1, threads=threads) as llm:
        yield Reference(llm, options.context, options.decode_steps, options.repeats, scale)


def _check_hidden_sizes(em: ElasticModel, per_layer: bool) -> None:
    """Refuse a space whose smaller hidden sizes llama.cpp cannot run (the GGUF export refuses them), in
    one line before any timing; `per_layer`: the profile times its sub-networks in the per-layer graph."""
    space = em.space
    if not space.hidden or len(space.hidden) < 2:
        return
    try:
        gguf_arch(em, replace(space.full(), hidden=space.hidden[0]), per_layer=per_layer)
    except FlextronError:
        raise FlextronError(f"llama.cpp cannot run {em.config.model_type} sub-networks below the full hidden size "
                            f"{space.hidden[-1]} (the GGUF export refuses hidden size {space.hidden[0]} at full "
                            "width); profile this checkpoint with --runtime hf, or convert it without "
                            "--hidden-fractions") from None
