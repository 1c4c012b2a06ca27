"""The model's own text: what it writes unprompted, sampled from its start token, generated once and cached.

Importance measured on one domain ranks first the units that domain uses, so the narrow sub-networks keep
it and lose the rest: calibrated on the packaged prose, SmolLM2's uniform 75 % scored 2.8x the original's
perplexity on held-out prose but 6.4x on technical documentation. The model's own samples cover what it
learned, in the proportions it learned it (the data-free calibration of LLM-QAT, Liu et al. 2023), and
need no data at hand (docs/results.md, "Calibration text").
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, replace

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from flextron.assets import cache_dir
from flextron.chat import conversation_tokens, packaged_prompts, teacher_conversations
from flextron.data import tokenize, tokenizer_key
from flextron.elastic import ElasticModel
from flextron.engine import Engine, Request
from flextron.errors import FlextronError
from flextron.fsutil import read_jsonl, write_jsonl
from flextron.options import Sampling, ServeLimits

SAMPLING = Sampling(temperature=1.0, top_p=0.95)  # the model's distribution, without its long tail of noise
CHAT_SHARE = 0.25  # of a chat model's calibration tokens: its answers (measured: docs/results.md)
CHAT_TOKENS = 128  # the most tokens of each answer, as `train --chat self` writes them


def model_id(model: nn.Module) -> str:
    """A hash of a model's weights (names, types, shapes and bytes): the key of what it generates."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def start_token(tok: PreTrainedTokenizerBase) -> int:
    """The token a document starts after: the beginning-of-text token, else the end-of-text one."""
    token = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if token is None:
        raise FlextronError("the tokenizer has neither a beginning- nor an end-of-text token, so the model cannot "
                            "be sampled unprompted; pass --calib-data FILE.txt")
    return int(token)


def own_text(em: ElasticModel, tok: PreTrainedTokenizerBase, ident: str, tokens: int, seq_len: int, seed: int,
             batch: int = 32, progress: bool = True) -> str:
    """Samples of the full model from its start token (`SAMPLING`, at most `seq_len` tokens each, sample i
    seeded from `seed` and i) until they hold `tokens` tokens, joined by blank lines. Cached under the
    model's `ident` (`model_id`), the tokenizer, the sampling and the seed; a later call needing more extends
    the cache."""
    sampling = replace(SAMPLING, max_new_tokens=seq_len)
    key = hashlib.sha1(json.dumps([ident, tokenizer_key(tok), asdict(sampling), seed]).encode()).hexdigest()
    path = cache_dir() / "samples" / f"{key[:20]}.jsonl"
    rows = read_jsonl(path)
    have = sum(r["tokens"] for r in rows)
    start, full = start_token(tok), em.space.full()
    with tqdm(total=tokens, initial=min(have, tokens), desc="own text (calibration)", unit="tok",
              disable=not progress or have >= tokens) as bar:
        while have < tokens:
            first, size = len(rows), min(batch, math.ceil(1.2 * (tokens - have) / seq_len))  # some end early
            requests = [Request([start], full, replace(sampling, seed=(seed * 1_000_003 + i) % 2**63))
                        for i in range(first, first + size)]
            results = Engine(em, tok, ServeLimits(max_batch=size), start=False).generate(requests)
            if not any(r.text.strip() for r in results):
                raise FlextronError("the model's own samples are empty (it ends its texts at once); pass "
                                    "--calib-data FILE.txt")
            for result in results:
                rows.append({"text": result.text, "tokens": result.completion_tokens})
                have += result.completion_tokens
                bar.update(result.completion_tokens)
            write_jsonl(path, rows)
    used, count = [], 0
    for r in rows:
        if count >= tokens:
            break
        used.append(r["text"])
        count += r["tokens"]
    return "\n\n".join(t for t in used if t.strip())


def own_tokens(em: ElasticModel, tok: PreTrainedTokenizerBase, tokens: int, seq_len: int, seed: int,
               progress: bool = True) -> Tensor:
    """Calibration ids the model writes itself: its unprompted samples (`own_text`) and, where the tokenizer
    has a chat template, `CHAT_SHARE` of the tokens its greedy answers to the packaged train prompts in that
    template (`flextron.chat.teacher_conversations`), what an instruct model is asked to do."""
    ident = model_id(em)
    chat = int(tokens * CHAT_SHARE) if getattr(tok, "chat_template", None) else 0
    parts = [tokenize(tok, own_text(em, tok, ident, tokens - chat, seq_len, seed, progress=progress))]
    if chat:
        answers = teacher_conversations(em, tok, packaged_prompts("train"), ident, chat,
                                        Sampling(max_new_tokens=CHAT_TOKENS), progress=progress)
        parts.append(torch.from_numpy(conversation_tokens(tok, answers)[0].astype(np.int64)))
    return torch.cat(parts)
