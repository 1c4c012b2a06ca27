"""What a chat user sees at a budget, against the original model, without human labels (`eval --tasks chat`).

The original answers each prompt (in its chat template) greedily once; every sub-network is then scored
on those prompts by how often its own greedy answer is the original's (`agree_tokens`: the first N tokens
identical; `agree_sentence`: the first sentence identical) and by the mean KL(original || sub-network) of
the next-token distribution over the original's answer tokens, teacher-forced. Perplexity on prose can
stay flat while an instruct model's answers drift; these numbers move with them.

"The original" of an elastic checkpoint is the model it was converted from (its manifest's
`source_model`), not its own full sub-network after training.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from flextron import llamacpp
from flextron.adaptive import AdaptiveLM
from flextron.assets import DEFAULT_MODEL, GEMMA3
from flextron.chat import packaged_prompts, read_prompts
from flextron.checkpoint import MANIFEST, read_manifest
from flextron.data import tokenizer_key
from flextron.elastic import ElasticModel
from flextron.engine import Engine, Request, Result
from flextron.errors import FlextronError
from flextron.export import EXPORT_MANIFEST, read_export_info
from flextron.generation import prompt_inputs
from flextron.options import Sampling, ServeLimits
from flextron.precision import autocast

# A sentence ends at a line break, or at . ! ? followed by whitespace or the end of the text ("3.14" goes on).
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def first_sentence(text: str) -> str:
    """`text` from its first non-blank character up to its first line break, or its first '.', '!' or '?'
    followed by whitespace or the end of the text (the mark kept), stripped; the whole text, stripped,
    where no sentence ends. An abbreviation ("e.g. ") ends it early: the same rule cuts both answers."""
    text = text.lstrip()
    end = _SENTENCE_END.search(text)
    return (text[: end.end()] if end else text).strip()


def chat_prompts(path: str | None, limit: int) -> list[str]:
    """The first `limit` prompts of a user file (`flextron.chat.read_prompts`), else of the packaged
    held-out split (questions no training run reads)."""
    return (read_prompts(path) if path else packaged_prompts("eval"))[:limit]


def _packaged_name(source: str) -> str | None:
    """The packaged model a dequantized cache directory holds (any machine's cache), else None."""
    p = Path(source)
    return p.name if p.name in (DEFAULT_MODEL, GEMMA3) and p.parent.name == "models" else None


def original_model(path: str | Path | None, original: str | None = None) -> str | None:
    """What the model at `path` is compared with, as `flextron.assets.load_hf` takes it: `original` when
    given; for an elastic checkpoint the model it was converted from (its manifest's `source_model`; the
    packaged model by name, wherever it was cached); for an export its checkpoint's; None where the model is
    its own original (a plain HF model, or the packaged one when `path` is None). Refused in one line when
    the recorded model is not on this machine."""
    if original is not None:
        return original
    if path is None:
        return None
    path = Path(path)
    if (path / EXPORT_MANIFEST).is_file():
        ckpt = read_export_info(path).get("source_checkpoint")
        if not isinstance(ckpt, str) or not (Path(ckpt) / MANIFEST).is_file():
            raise FlextronError(f"the checkpoint export {path} was sliced from ({ckpt}) is not found, so neither is "
                                "the original to compare with; pass --original MODEL_DIR")
        return original_model(ckpt)
    if not (path / MANIFEST).is_file():
        return None
    source = read_manifest(path).get("source_model")
    if not isinstance(source, str) or not source:
        raise FlextronError(f"{path}/{MANIFEST} records no source_model to compare with; pass --original MODEL_DIR")
    if packaged := _packaged_name(source):
        return packaged
    local = Path(source).expanduser()
    is_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if (local / "config.json").is_file() or (is_hub_id and not local.exists()):
        return source
    raise FlextronError(f"the original model of {path}, {source} (its {MANIFEST} source_model), is not found; pass "
                        "--original MODEL_DIR, the model `flextron convert` read")


def greedy_answers(model: ElasticModel | AdaptiveLM, tok: PreTrainedTokenizerBase, prompt_ids: list[list[int]],
                   new_tokens: int) -> list[Result]:
    """Greedy answers of at most `new_tokens` tokens to every prompt at the model's current sub-network, all
    decoding in one batch (`flextron.engine`); an `AdaptiveLM`'s each routed from its prompt, unbatched."""
    n, adaptive = len(prompt_ids), isinstance(model, AdaptiveLM)
    em = model.em if adaptive else model
    engine = Engine(em, tok, limits=ServeLimits(max_batch=n, max_queue=n), start=False,
                    routing=model.routing if adaptive else None)
    greedy = Sampling(max_new_tokens=new_tokens, temperature=0.0)
    fraction = model.fraction if adaptive else None
    return engine.generate([Request(ids, em.current, greedy, adaptive=fraction) for ids in prompt_ids])


@torch.no_grad()
def answer_logprobs(model: ElasticModel | AdaptiveLM, prompt_ids: list[list[int]], answers: list[list[int]],
                    batch_size: int = 8, autocast_dtype: torch.dtype | None = None) -> Iterator[tuple[int, Tensor]]:
    """Teacher forcing, prompt + answer fed whole: per prompt (its index), the next-token log-probabilities
    [len(answer), V] at the positions that predict its answer's tokens; empty answers left out. Rows of
    similar lengths share a forward, right-padded (no real position attends to the padding). An
    `AdaptiveLM` routes each row from its prompt alone, as generation does."""
    device = next(model.parameters()).device
    seqs = [p + a[:-1] for p, a in zip(prompt_ids, answers)]
    order = sorted((i for i in range(len(seqs)) if answers[i]), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        first = min(len(prompt_ids[i]) for i in idx) - 1  # the earliest position whose logits are read
        batch = torch.tensor([seqs[i] + [0] * (width - len(seqs[i])) for i in idx], device=device)
        routed = {"prompt_lengths": [len(prompt_ids[i]) for i in idx]} if isinstance(model, AdaptiveLM) else {}
        with autocast(device, autocast_dtype):
            logits = model(input_ids=batch, use_cache=False, logits_to_keep=width - first, **routed).logits
        for row, i in enumerate(idx):
            at = len(prompt_ids[i]) - 1 - first
            yield i, F.log_softmax(logits[row, at : at + len(answers[i])].float(), -1)


@dataclass
class Reference:
    """The original's side of the comparison, computed once: its prompts' token ids, its greedy answers
    (token ids and text) and its next-token log-probabilities over them (`answer_logprobs`)."""

    prompt_ids: list[list[int]]
    answers: list[list[int]]
    texts: list[str]
    logprobs: Tensor
    new_tokens: int
    tokenizer: str  # `flextron.data.tokenizer_key`: the model compared must read the prompts the same way


def reference(em: ElasticModel, tok: PreTrainedTokenizerBase, prompts: list[str], new_tokens: int,
              batch_size: int = 8, autocast_dtype: torch.dtype | None = None) -> Reference:
    """The original `em` (at its current sub-network, normally the full model) answering `prompts`, each in
    the tokenizer's chat template (the raw prompt where it has none)."""
    if not prompts:
        raise FlextronError("there are no chat prompts to compare on; pass a --chat-prompts file with some")
    ids = [prompt_inputs(tok, p)["input_ids"][0].tolist() for p in prompts]
    results = greedy_answers(em, tok, ids, new_tokens)
    answers = [r.token_ids for r in results]
    offsets = _offsets(answers)
    logprobs = torch.empty(offsets[-1], em.config.vocab_size, device=next(em.parameters()).device)
    for i, lp in answer_logprobs(em, ids, answers, batch_size, autocast_dtype):
        logprobs[offsets[i] : offsets[i + 1]] = lp
    return Reference(ids, answers, [r.text for r in results], logprobs, new_tokens, tokenizer_key(tok))


def _offsets(answers: list[list[int]]) -> list[int]:
    """Where each answer's rows start in `Reference.logprobs`, and (last) their total."""
    return [0, *itertools.accumulate(map(len, answers))]


def compare(model: ElasticModel | AdaptiveLM, tok: PreTrainedTokenizerBase, ref: Reference, batch_size: int = 8,
            autocast_dtype: torch.dtype | None = None) -> dict:
    """The model at its current sub-network (or routed adaptively, each answer from its prompt) against the
    original's `ref`: {n, new_tokens, agree_tokens, agree_sentence, kl} (shares of the prompts; KL in nats per
    answer token)."""
    _check_tokenizer(tok, ref)
    results = greedy_answers(model, tok, ref.prompt_ids, ref.new_tokens)
    scored = answer_logprobs(model, ref.prompt_ids, ref.answers, batch_size, autocast_dtype)
    return _agreement(ref, [r.token_ids for r in results], [r.text for r in results], scored)


def compare_gguf(path: str | Path, tok: PreTrainedTokenizerBase, ref: Reference, stop_ids: Collection[int],
                 threads: int | None = None) -> dict:
    """`compare` for a GGUF file as llama.cpp runs it by default (f16 KV cache, flash attention): what a user
    deploying it sees, e.g. the original at q8_0. `stop_ids` end an answer (`generation.stop_token_ids`)."""
    _check_tokenizer(tok, ref)
    n_ctx = max(len(p) + len(a) for p, a in zip(ref.prompt_ids, ref.answers)) + ref.new_tokens
    with llamacpp.opened(path, n_ctx=n_ctx, threads=threads, all_logits=True) as llm:
        if llm.n_vocab() != ref.logprobs.shape[1]:
            raise FlextronError(f"{path} has a vocabulary of {llm.n_vocab()} tokens, the original's "
                                f"{ref.logprobs.shape[1]}; compare a GGUF exported from the original's checkpoint")
        answers = [llamacpp.greedy(llm, ids, ref.new_tokens, stop_ids) for ids in ref.prompt_ids]

        def scored() -> Iterator[tuple[int, Tensor]]:
            for i, (p, a) in enumerate(zip(ref.prompt_ids, ref.answers)):
                if a:
                    logits = torch.from_numpy(llamacpp.logits(llm, p + a[:-1])[len(p) - 1 :])
                    yield i, F.log_softmax(logits.float(), -1)

        return _agreement(ref, answers, [tok.decode(a, skip_special_tokens=True) for a in answers], scored())


def _check_tokenizer(tok: PreTrainedTokenizerBase, ref: Reference) -> None:
    if tokenizer_key(tok) != ref.tokenizer:
        raise FlextronError("the model's tokenizer is not the original's, so their answers cannot be compared token "
                            "by token; pass the --original the model was converted from")


def _agreement(ref: Reference, answers: list[list[int]], texts: list[str], scored: Iterable[tuple[int, Tensor]]
               ) -> dict:
    """`compare`'s numbers for a model's greedy `answers` (token ids and text) and its log-probabilities over
    the original's answers (`scored`, as `answer_logprobs` yields them)."""
    offsets, kl = _offsets(ref.answers), 0.0
    for i, lp in scored:
        original = ref.logprobs[offsets[i] : offsets[i + 1]].to(lp.device)
        kl += F.kl_div(lp, original, log_target=True, reduction="sum").item()
    n = len(answers)
    return {"n": n, "new_tokens": ref.new_tokens,
            "agree_tokens": sum(a == b for a, b in zip(answers, ref.answers)) / n,
            "agree_sentence": sum(first_sentence(a) == first_sentence(b) for a, b in zip(texts, ref.texts)) / n,
            "kl": max(kl, 0.0) / max(len(ref.logprobs), 1)}  # rounding can take a zero KL a hair below 0
