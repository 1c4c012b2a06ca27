"""Plain helpers of the tests (fixtures live in conftest.py): tiny random models of every supported
family, tiny word-level and byte-level BPE tokenizers, fake latency tables, task request files,
reference logits of transformers and llama.cpp, and transformers' greedy decoding.

pyproject puts tests/ on pytest's `pythonpath`: tests import these with `from helpers import ...`."""

from __future__ import annotations

import builtins
import errno
import gzip
import io
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from flextron.options import ServeLimits

if TYPE_CHECKING:
    from flextron.elastic import ElasticModel
    from flextron.space import Subnet

VOCAB = 128
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=256)
HIDDEN_FRACTIONS = (0.5, 0.75, 1.0)  # make_elastic(hidden=True): hidden sizes 32, 48, 64


def make_model(kind: str, seed: int = 0, n_layers: int = 2) -> torch.nn.Module:
    """A tiny randomly initialised causal LM in eval mode."""
    torch.manual_seed(seed)
    llama_like = {**LLAMA_LIKE, "num_hidden_layers": n_layers}
    if kind in NEW_KINDS:  # their configs default to token ids outside the tiny vocabulary
        llama_like.update(bos_token_id=1, eos_token_id=1, pad_token_id=0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**llama_like))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**llama_like))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**llama_like))  # q/k/v carry biases
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**llama_like))  # per-head q/k norms
    elif kind == "gemma2":  # sandwich norms, attention and final logit soft-capping, sliding window
        model = Gemma2ForCausalLM(Gemma2Config(**llama_like, query_pre_attn_scalar=8, sliding_window=4,
                                               attn_logit_softcapping=20.0, final_logit_softcapping=10.0))
    elif kind == "gemma3":  # sandwich norms, q/k norms, local and global layers with their own RoPE
        types = ["sliding_attention", "full_attention"] * n_layers
        model = Gemma3ForCausalLM(Gemma3TextConfig(**llama_like, query_pre_attn_scalar=8, sliding_window=4,
                                                   layer_types=types[:n_layers]))
    elif kind == "olmo2":  # post-norms, q/k norms over whole projections
        model = Olmo2ForCausalLM(Olmo2Config(**llama_like))
    elif kind == "phi3":  # fused q|k|v and gate|up, partial rotary as Phi-4-mini
        phi = {k: v for k, v in llama_like.items() if k != "head_dim"}
        model = Phi3ForCausalLM(Phi3Config(**phi, partial_rotary_factor=0.75))
    elif kind == "granite":  # embedding, residual, attention and logit multipliers
        model = GraniteForCausalLM(GraniteConfig(**llama_like, embedding_multiplier=2.0, residual_multiplier=0.5,
                                                 attention_multiplier=0.2, logits_scaling=3.0))
    elif kind == "smollm3":  # RoPE in some layers only
        model = SmolLM3ForCausalLM(SmolLM3Config(**llama_like, no_rope_layer_interval=2))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=n_layers, n_head=4, n_positions=256,
                                           bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(kind)
    # Random biases and norms, so that slicing them wrongly would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.startswith("transformer.ln"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def make_elastic(kind: str = "llama", seed: int = 0, n_layers: int = 2, min_layers: int | None = None,
                 attn_unit: str = "group", hidden: bool = False):
    """A tiny elastic model with the default space at multiples of 8 neurons (4 MLP choices);
    with `min_layers`, every sub-layer may also be skipped (depth) down to that floor; with
    `attn_unit="head"`, attention choices are query heads (llama-like: 1, 2, 3, 4 or 8 of 8);
    with `hidden`, hidden sizes 32, 48 and 64 (HIDDEN_FRACTIONS of 64 channels, multiples of 16)."""
    from flextron.elastic import ElasticModel
    from flextron.space import ElasticSpace

    em = ElasticModel(make_model(kind, seed, n_layers), attn_unit=attn_unit)
    b = em.blocks[0]
    space = ElasticSpace.default(len(em.blocks), b.mlp.n_units, b.attn.n_units, multiple=8, attn_unit=attn_unit,
                                 kv_groups=b.geometry.n_kv_heads)
    space = space if min_layers is None else space.with_depth(min_layers)
    em.set_space(space.with_hidden(em.hidden_size, HIDDEN_FRACTIONS, 16) if hidden else space)
    return em


# Every declared block layout: pre-norm (llama .. qwen3, granite, smollm3, gpt2), sandwich norms (gemma2,
# gemma3), post-norm with q/k norms over whole projections (olmo2), fused projections (phi3).
NEW_KINDS = ["gemma2", "gemma3", "olmo2", "phi3", "granite", "smollm3"]
FAMILY_KINDS = ["llama", "mistral", "qwen2", "qwen3", "gpt2", *NEW_KINDS]
# grouped-query attention: query heads can be trimmed inside KV groups
LLAMA_KINDS = [k for k in FAMILY_KINDS if k != "gpt2"]


# A chat template the tiny word-level tokenizer can read: every piece is a word of its vocabulary.
TINY_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}w2 {% else %}w1 {% endif %}"
                 "{{ m['content'] }} [EOS] {% endfor %}{% if add_generation_prompt %}w2 {% endif %}")


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of `VOCAB` pieces: [UNK], [EOS], w0 .. w125."""
    words = ["[UNK]", "[EOS]"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def make_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (printable ASCII, newline, a few merges): a tokenizer llama.cpp can run."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    vocab = {"<|endoftext|>": 0}
    for b in [*range(32, 127), 10]:
        vocab[b2u[b]] = len(vocab)
    # Digit and apostrophe merges make the pre-tokenizers (GPT-2, SmolLM, Llama 3, Qwen2) give different ids.
    pairs = [("Ġ", c) for c in "taoswbcmfdhpil"] + [("t", "h"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"),
                                                   ("o", "n"), ("r", "e"), ("a", "t"), ("e", "n"), ("i", "s"),
                                                   ("Ġ", "1"), ("1", "2"), ("3", "4"), ("'", "R")]
    merges = pairs[: VOCAB - len(vocab)]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def word_text(n_words: int, seed: int = 0) -> str:
    """`n_words` random words of `make_tokenizer`'s vocabulary, 16 to a line."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n_words,), generator=gen).tolist()
    return "\n".join(" ".join(f"w{i}" for i in ids[j : j + 16]) for j in range(0, n_words, 16))


def rewrite_weights(ckpt, change) -> None:
    """Apply `change` to the dict of tensors in `ckpt`/model.safetensors and write it back (damage tests)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(ckpt / "model.safetensors")
    change(weights)
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})


def dead_pid() -> int:
    """The id of a process that has exited (a dead writer's temp names carry one)."""
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def make_device(path):
    """A character device node (a copy of /dev/null) at `path`, so that tests never aim at the real /dev;
    None where this user may not create one."""
    import os
    import stat

    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:
        return None
    return path


def two_graph_table(em, samples: int = 10) -> tuple[dict, Callable, Callable]:
    """A llama.cpp-shaped latency table of `em` (a 2-layer space of MLP 24-96, 1-4 attention units, 0 a skip)
    fitted on additive fake timers, and the timers: `deci` for every sub-network, `own` (the stock
    graph, uniform sub-networks only) faster than deci for narrow sub-networks, slower for wide ones."""
    from flextron.latency import StockGraph, profile
    from flextron.options import ProfileOptions

    mlp_ms, attn_ms = {0: 0.0, 24: 1.0, 48: 1.7, 72: 2.6, 96: 3.1}, {0: 0.0, 1: 0.5, 2: 0.9, 3: 1.4, 4: 1.6}

    def deci(s):
        ms = 5.0 + sum(mlp_ms[w] for w in s.mlp) + sum(attn_ms[a] for a in s.attn)
        return {"decode_ms": ms, "prefill_ms": 10 * ms}

    def own(s):
        return {k: 1.5 * v - 6.0 * (10 if k == "prefill_ms" else 1) for k, v in deci(s).items()}

    uniform = StockGraph("llama", lambda s: len(set(s.mlp)) == len(set(s.attn)) == 1, own)
    return (profile(em, ProfileOptions(samples=samples, validate=3), timer=deci, stock=uniform, progress=False),
            deci, own)


def write_requests(path, docs: list[tuple[list[tuple[str, str]], int]]) -> None:
    """An olmo-eval style request file: one line per (document, choice)."""
    with gzip.open(path, "wt") as f:
        for doc_id, (pairs, label) in enumerate(docs):
            for idx, (ctx, cont) in enumerate(pairs):
                f.write(json.dumps({"request_type": "loglikelihood", "doc_id": doc_id, "idx": idx, "label": label,
                                    "request": {"context": ctx, "continuation": cont}}) + "\n")


def random_docs(n: int, choices: int = 4, seed: int = 0) -> list[tuple[list[tuple[str, str]], int]]:
    """`n` multiple-choice documents of random words: (context, continuation) pairs and the label."""
    g = torch.Generator().manual_seed(seed)

    def words(k: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(2, 120, (k,), generator=g).tolist())

    docs = []
    for _ in range(n):
        ctx = words(int(torch.randint(3, 20, (1,), generator=g)))
        pairs = [(ctx, " " + words(int(torch.randint(1, 6, (1,), generator=g)))) for _ in range(choices)]
        docs.append((pairs, int(torch.randint(0, choices, (1,), generator=g))))
    return docs


def scale_output(scale: float):
    """A forward hook multiplying a module's output (the first of a tuple) by `scale`."""
    def hook(module, args, out):
        return (out[0] * scale, *out[1:]) if isinstance(out, tuple) else out * scale

    return hook


def hf_logits(model, x, hooks=()):
    """A transformers model's logits of `x` with (module, hook) forward hooks in place."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            return model(input_ids=x, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


THREADS = 1  # llama.cpp's threads wait on each other by spinning: on a busy shared CPU one is faster


def elastic_logits(em: ElasticModel, subnet: Subnet, ids: list[int]) -> np.ndarray:
    """The elastic model's logits of one sequence at `subnet`."""
    with em.subnet(subnet), torch.no_grad():
        return em(input_ids=torch.tensor([ids])).logits[0].numpy()


def hf_greedy(model, tok, prompt: str, new: int, raw: bool = True) -> str:
    """The reference decoder: transformers' own greedy `generate` of `new` tokens at most, decoded."""
    from flextron.generation import prompt_inputs

    ids = prompt_inputs(tok, prompt, raw)["input_ids"]
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0,
                             eos_token_id=tok.eos_token_id if eos is None else eos)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def gguf_logits(path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits of one sequence from the GGUF at `path` (f32 KV cache, every position)."""
    from flextron import llamacpp

    with llamacpp.opened(path, n_ctx=64, threads=THREADS, exact=True, all_logits=True) as llm:
        return llamacpp.logits(llm, ids)


class FullDisk(io.FileIO):
    """A file on a full disk: every write fails as the OS fails it."""

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def safetensors_full(*args, **kwargs):
    """safetensors' writer on a full disk: it raises its own error, naming the OS error."""
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def full_disk(monkeypatch, writer: str) -> None:
    """A full disk for one writer: "safetensors" (transformers' weights writer) or "fsutil" (the files
    `flextron.fsutil` opens for writing: torch's training state)."""
    if writer == "safetensors":
        monkeypatch.setattr("transformers.modeling_utils.safe_save_file", safetensors_full)
    else:
        def open_for_writing(path, mode="r", *args, **kwargs):
            return FullDisk(path, "wb") if "w" in mode else builtins.open(path, mode, *args, **kwargs)

        monkeypatch.setattr("flextron.fsutil.open", open_for_writing, raising=False)


# The server of tests/test_serve.py (also driven by the campaign), at small limits.
CONFIG = ServeLimits(max_prompt_tokens=64, max_tokens=32, default_max_tokens=8, max_body_bytes=16384, timeout_s=30,
                     max_batch=8, max_connections=16)
# With a trap for each way a template fails (issue 36 item 10): a message of just "raise", "undefined",
# "unsafe" (the sandbox's SecurityError) or "type" (a TypeError) sets one off.
TEMPLATE = ("{% for m in messages %}"
            "{% if m['content'] == 'raise' %}{{ raise_exception('no such messages') }}{% endif %}"
            "{% if m['content'] == 'undefined' %}{{ no_such_function() }}{% endif %}"
            "{% if m['content'] == 'unsafe' %}{{ [].append(1) }}{% endif %}"
            "{% if m['content'] == 'type' %}{{ 1 + 'a' }}{% endif %}"
            "w1 {{ m['content'] }} w2{% endfor %}{% if add_generation_prompt %} w3{% endif %}")


@contextmanager
def running(ckpt, **limits):
    """A server over `ckpt` on a free port (at `CONFIG`, with `limits` changed), and an `openai` client of it."""
    ready, box = threading.Event(), {}

    def on_ready(server) -> None:
        box["server"] = server
        ready.set()

    import openai  # the dev extra installs it: missing, the tests fail rather than skip

    from flextron import api

    thread = threading.Thread(target=api.serve, args=(ckpt,), daemon=True,
                              kwargs={"device": "cpu", "on_ready": on_ready, "port": 0, **asdict(CONFIG), **limits})
    thread.start()
    assert ready.wait(60), "server did not start"
    server = box["server"]
    yield server, openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
    server.shutdown()
    thread.join(10)
    assert not thread.is_alive()


def with_adaptive_routers(em):
    """Untrained static and adaptive routers (params metric), the token routers' choices spread over all widths."""
    from flextron.options import RouteOptions
    from flextron.routers import AdaptiveRouters, Routers, StaticRouter

    grid = (0.4, 0.7, 1.0)
    em.routers = Routers(StaticRouter(em.space, grid), "params", RouteOptions(budgets=grid))
    torch.manual_seed(0)
    em.routers.adaptive = AdaptiveRouters(em.space.mlp, em.space.attn, em.config.hidden_size, grid, hidden=16)
    with torch.no_grad():
        for lin in em.routers.adaptive.token_out:
            lin.weight.mul_(30)
    return em


def prompt_sensitive(routers) -> None:
    """Make the request router read its prompt strongly (untrained, its budget and biases decide): scales
    the weights it applies to the pooled embeddings, so that other tokens in the prompt choose other widths."""
    with torch.no_grad():
        routers.request[0].weight[:, : routers.token_in[0].in_features].mul_(100)


def run_clis(*commands: tuple[list[str], str]) -> list[subprocess.CompletedProcess]:
    """`python -m flextron ARGS` for each (ARGS, stdin), all at once, their results in order: each spends
    most of its ~9 s importing torch and transformers, which two cores do side by side."""
    def run(command: tuple[list[str], str]) -> subprocess.CompletedProcess:
        args, stdin = command
        return subprocess.run([sys.executable, "-m", "flextron", *args], capture_output=True, text=True, timeout=300,
                              input=stdin)

    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(run, commands))
