"""The llama.cpp runtime (through `llama-cpp-python`): load a GGUF, logits, greedy decoding, timing,
and the latency table of a checkpoint's sub-networks as GGUF exports."""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from collections.abc import Iterator
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
from flextron.llamacpp_binding import LOG_INFO, default_threads, library, log_lines
from flextron.options import ProfileOptions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from flextron.elastic import ElasticModel

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


def greedy(llm, ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy continuation of `ids`: the new token ids (stops after `eos_token_id`)."""
    llm.reset()
    llm.eval(list(ids))
    out: list[int] = []
    while len(out) < max_new_tokens:
        nxt = int(np.argmax(last_logits(llm)))
        out.append(nxt)
        if nxt == eos_token_id or len(out) == max_new_tokens:
            break
        llm.eval([nxt])
    return out


def measure_rounds(paths: list[str | Path], rounds: int, context: int = 256, decode_steps: int = 16,
                   threads: int | None = None) -> list[list[dict[str, float]]]:
    """Per file, its prefill latency (ms) of `context` tokens and decode latency (ms per token, batch
    1) after them, once per round. All files are loaded together and timed in turn within each round
    (the order alternating, after a warm-up round), so a slow spell of a shared machine falls on
    neighbours alike and the ratio of two files' times in one round cancels it."""
    out: list[list[dict[str, float]]] = [[] for _ in paths]
    with ExitStack() as stack:
        llms = [stack.enter_context(opened(p, n_ctx=context + decode_steps + 1, threads=threads)) for p in paths]
        ids = np.random.default_rng(0).integers(0, llms[0].n_vocab(), context + 1).tolist()
        for r in range(rounds + 1):  # the first round warms up
            for i in (range(len(llms)) if r % 2 else reversed(range(len(llms)))):
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


def gguf_timer(em, tokenizer, workdir: str | Path, outtype: str = "f32", context: int = 256,
               decode_steps: int = 16, repeats: int = 3, threads: int | None = None, per_layer: bool = False):
    """A `latency.profile` timer: each sub-network is exported to a GGUF in `workdir` (`per_layer`:
    as `deci`, see `write_gguf`) and timed in llama.cpp."""
    def timer(subnet) -> dict[str, float]:
        path = Path(workdir) / "subnet.gguf"
        write_gguf(em, tokenizer, subnet, path, outtype, overwrite=True, per_layer=per_layer)
        return measure(path, context, decode_steps, repeats, threads)

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

    The noise check of `latency.profile` holds here too: the full model's GGUF (as `deci` where the
    family has both graphs) is timed again among the others, and every graph's fit is held to the
    error threshold."""
    threads = options.threads or default_threads()
    named = {"runtime": runtime_version(), "threads": threads, "outtype": options.outtype, "dtype": options.outtype,
             "device": f"cpu ({threads} threads)"}
    timing = (options.outtype, options.context, options.decode_steps, options.repeats, threads)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            own = gguf_arch(em, em.space.full())
            gguf_arch(em, em.space.full(), per_layer=True)
        except FlextronError:  # one graph, for uniform sub-networks only (GPT-2, untied Qwen3, Gemma, OLMo 2, ...)
            if em.space.depth:
                raise FlextronError(f"llama.cpp runs {em.config.model_type} sub-networks only with the same widths "
                                    "in every layer and no skipped sub-layer; profile a checkpoint converted without "
                                    "--depth, or profile with --runtime hf") from None
            _check_hidden_sizes(em, per_layer=False)
            return fit_table(em, options, progress=progress, timer=gguf_timer(em, tokenizer, tmp, *timing),
                             runtime=named | {"graphs": "uniform only"}, uniform_only=True)
        _check_hidden_sizes(em, per_layer=True)
        stock = StockGraph(own, partial(in_own_arch, em), gguf_timer(em, tokenizer, tmp, *timing))
        return fit_table(em, options, progress=progress, timer=gguf_timer(em, tokenizer, tmp, *timing, per_layer=True),
                         runtime=named, stock=stock)


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
