"""The OpenAI protocol of `flextron serve`, without the transport: validating request bodies into
jobs for the engine, and shaping results into OpenAI's responses, stream chunks and errors.

A budget travels in the model name (`NAME@50%`, `NAME@params=80e6`, `NAME@latency_ms=20`) or in
the extra field `budget`; no budget is the full model. The extra field `adaptive: true` routes by
the checkpoint's input-adaptive routers instead of one sub-network.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenizers import decoders, models
from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from flextron.cost import Cost
from flextron.engine import Request, Result, TokenLogprob
from flextron.errors import FlextronError
from flextron.generation import prompt_text
from flextron.options import MAX_STOP_CHARS, MAX_STOPS, Sampling, ServeLimits
from flextron.space import Budget, Subnet

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_LOGPROBS = 20
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
               dict: "an object"}
_NUMBER = (int, float)


class RequestError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind

    def body(self) -> dict:
        """The JSON error body."""
        return {"error": {"message": str(self), "type": self.kind, "code": self.code, "param": self.param}}


def _field(body: dict, name: str, kinds: tuple[type, ...], default: Any = None, required: bool = False) -> Any:
    """`body[name]` checked against `kinds` (JSON null counts as absent)."""
    value = body.get(name)
    if value is None:
        if required:
            raise RequestError(f"missing required field '{name}'", code="missing_field", param=name)
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(_TYPE_NAMES[k] for k in kinds)
        raise RequestError(f"'{name}' must be {expected}, got {json.dumps(value)[:80]}", code="invalid_type",
                           param=name)
    return value


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise RequestError(message, code="invalid_value", param=param)


def parse_json(data: bytes) -> dict:
    """A request body as a JSON object whose strings are all valid Unicode."""
    try:
        body = json.loads(data)
        json.dumps(body, ensure_ascii=False).encode()  # lone surrogates such as "\ud800" cannot be encoded
    except (UnicodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise RequestError(f"the request body is not valid JSON: {why}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    return body


def _messages(raw: list) -> list[dict]:
    """Chat messages as the chat template takes them; content parts are joined into one string."""
    _check(len(raw) > 0, "'messages' must hold at least one message", "messages")
    out = []
    for i, m in enumerate(raw):
        param = f"messages[{i}]"
        _check(isinstance(m, dict), f"{param} must be an object with 'role' and 'content'", param)
        role = _field(m, "role", (str,), required=True)
        _check(role in ROLES, f"{param}.role {role!r} is not supported; use one of {', '.join(ROLES)}", param)
        content = _field(m, "content", (str, list), required=True)
        if isinstance(content, list):
            _check(all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content), f"{param}.content parts must be text parts", param)
            content = "".join(p["text"] for p in content)
        out.append({"role": ROLES[role], "content": content})
    return out


def _prompts(raw: str | list) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(raw, str):
        return [raw]
    _check(len(raw) > 0, "'prompt' must not be empty", "prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
        return [raw]
    ok = all(isinstance(p, str) or (isinstance(p, list) and p and all(
        isinstance(t, int) and not isinstance(t, bool) for t in p)) for p in raw)
    _check(ok, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
           "prompt")
    return raw


def count_prompts(body: dict, chat: bool) -> int:
    """How many sequences a request asks for (each takes a place in the queue)."""
    raw = body.get("prompt")
    if chat or not isinstance(raw, list) or not raw or not isinstance(raw[0], (str, list)):
        return 1
    return len(raw)


def split_model(model: str, name: str) -> str | None:
    """The budget in a model name `NAME@BUDGET` (None for plain `NAME`; `NAME` may itself hold an @);
    another name, or a budget with spaces around it, is not served (404)."""
    if model == name:
        return None
    budget = model[len(name) + 1:] if model.startswith(name + "@") else ""
    if not budget or budget != budget.strip():
        raise RequestError(f"model {model!r} does not exist; this server serves {name!r}, "
                           f"at a budget as {name}@50% or {name}@params=80e6 (see GET /v1/models)", 404,
                           code="model_not_found", param="model")
    return budget or None


@dataclass
class Job:
    """One validated request: its prompts as token ids, the sub-network serving them, how to continue them."""

    chat: bool
    model: str
    prompts: list[list[int]]
    texts: list[str]  # the prompts as text (for echo)
    budget: Budget | None
    subnet: Subnet
    cost: Cost
    sampling: Sampling | None  # None: max_tokens 0, an echo that only scores the prompt
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    adaptive: float | None = None  # input-adaptive routing at this fraction of the routers' metric
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def requests(self, on_text: Callable[[int, str], None] | None = None,
                 on_scored: Callable[[int, list[TokenLogprob]], None] | None = None) -> list[Request]:
        """The engine requests of this job; `on_text(index, piece)` streams each prompt's text, `on_scored(index,
        scored)` the logprobs of its tokens (`flextron.engine.Request.on_scored`)."""
        return [Request(ids, self.subnet, self.sampling, top_logprobs=self.logprobs,
                        prompt_logprobs=self.echo and self.logprobs is not None, adaptive=self.adaptive,
                        on_text=None if on_text is None else (lambda t, i=i: on_text(i, t)),
                        on_scored=None if on_scored is None else (lambda s, i=i: on_scored(i, s)))
                for i, ids in enumerate(self.prompts)]

    def envelope(self, choices: list[dict], chunk: bool = False) -> dict:
        """A response (or stream chunk) around `choices`, with the budget and sub-network that served it."""
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        served = {"budget": str(self.budget) if self.budget else "full"}
        if self.adaptive is not None:  # widths chosen per prompt and per token
            served |= {"adaptive": True, "fraction": self.adaptive}
        else:
            served |= {"params": self.cost.params, "params_nonembed": self.cost.params_nonembed,
                       "subnet": self.subnet.to_dict()}
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "object": kind, "created": self.created,
                "model": self.model, "choices": choices, "flextron": served}

    def choice(self, text: str | None, finish: str | None = None, chunk: bool = False, index: int = 0,
               logprobs: dict | None = None) -> dict:
        """One choice: text (completions), message (chat) or delta (chat stream; None: an empty delta)."""
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if chunk:
            return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def usage(self, results: list[Result]) -> dict:
        """OpenAI's token counts, and the parameters of the sub-network that served."""
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "flextron_params": None if self.adaptive is not None else self.cost.params}


_HELD = 4  # UTF-8 takes at most 4 bytes: more tokens still ending in U+FFFD are invalid bytes or the character itself
_CONTEXT = 4  # tokens decoded before a token's own, so that decoders that strip a leading space see the same text


class TokenPieces:
    """The text of each token of one sequence, fed in order; the pieces add up to the decoded sequence.

    A token that ends inside a character (alone, its bytes decode to U+FFFD) gives "", and the token completing
    the character gives it whole. Each token is decoded in a window of a few tokens before it: linear work.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special: bool) -> None:
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self.done = 0  # the tokens whose text has been given out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def __call__(self, ids: list[int], final: bool = False) -> list[str]:
        """The pieces of the next tokens `ids`; `final`: the sequence ends with them, nothing is held back."""
        pieces = []
        for k, token in enumerate(ids):
            self.ids.append(token)
            start = max(0, self.done - _CONTEXT)
            text = self._decode(self.ids[start:])
            held = len(self.ids) - self.done
            if text.endswith("\ufffd") and held < _HELD and not (final and k == len(ids) - 1):
                pieces.append("")
                continue
            pieces.append(text[len(self._decode(self.ids[start:self.done])):])
            self.done = len(self.ids)
        return pieces


class ChoiceLogprobs:
    """The completions `logprobs` of one choice, built as its tokens come (all at once, or chunk by chunk
    when streamed): `tokens` add up to the choice's text (`TokenPieces`), `text_offset` runs on across chunks."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.generated = TokenPieces(tokenizer, skip_special=True)  # as the engine decodes the completion
        self.offset = 0

    def prompt(self, scored: list[TokenLogprob]) -> dict:
        """The echoed prompt's tokens, decoded as the prompt's text is."""
        return self._object(scored, TokenPieces(self.tokenizer, skip_special=False)([t for t, _, _ in scored], True))

    def completion(self, scored: list[TokenLogprob], final: bool = False) -> dict:
        """The next generated tokens; `final`: the last of them."""
        return self._object(scored, self.generated([t for t, _, _ in scored], final))

    def _alternative(self, token: int) -> str:
        """An alternative token's text alone; its vocabulary piece where that text is part of a character,
        so that no two alternatives share the key U+FFFD."""
        text = self.tokenizer.decode([token])
        return self.tokenizer.convert_ids_to_tokens(token) if "\ufffd" in text else text

    def _object(self, scored: list[TokenLogprob], pieces: list[str]) -> dict:
        offsets = []
        for piece in pieces:
            offsets.append(self.offset)
            self.offset += len(piece)
        return {"tokens": pieces, "token_logprobs": [lp for _, lp, _ in scored],
                "top_logprobs": [None if lp is None else {self._alternative(i): v for i, v in top}
                                 for _, lp, top in scored],
                "text_offset": offsets}


def completion_choice(job: Job, tokenizer: PreTrainedTokenizerBase, index: int, result: Result) -> dict:
    """A finished completions choice; with echo the prompt leads the text (and its logprobs)."""
    text = job.texts[index] + result.text if job.echo else result.text
    logprobs = None
    if job.logprobs is not None:
        shaper = ChoiceLogprobs(tokenizer)
        parts = [shaper.prompt(result.prompt_logprobs)] if result.prompt_logprobs else []
        parts.append(shaper.completion(result.logprobs or [], final=True))
        logprobs = {key: [v for part in parts for v in part[key]] for key in parts[0]}
    return job.choice(text, result.finish_reason, index=index, logprobs=logprobs)


def max_token_chars(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The most characters of text one token can stand for, or None where that is not bounded or not known.

    Bounded for a BPE that turns every character into tokens: with byte fallback, or byte-level with a
    token for every byte. A token then stands for at most its vocabulary piece's characters (a byte's piece is
    one character or more), times 4 where a normaliser may first compose up to 4 code points into one.
    Other tokenizers may drop text or fold any run of it into one unknown token: no character bound holds.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if not isinstance(model, models.BPE):
        return None
    vocab = tokenizer.get_vocab()
    byte_level = isinstance(backend.decoder, decoders.ByteLevel) and all(
        c in vocab for c in bytes_to_unicode().values())
    if not (model.byte_fallback or byte_level):
        return None
    return max(map(len, vocab)) * (1 if backend.normalizer is None else 4)


class Protocol:
    """Validates request bodies against one model's tokenizer, context and the server's limits."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, name: str, context: int | None, vocab: int,
                 config: ServeLimits, resolve: Callable[[Budget | None], tuple[Subnet, Cost]],
                 adaptive: Callable[[Budget], float] | None = None) -> None:
        self.tokenizer, self.name, self.context, self.vocab = tokenizer, name, context, vocab
        self.config, self._resolve, self._adaptive = config, resolve, adaptive
        self._token_chars = max_token_chars(tokenizer)

    def resolve(self, budget: str | float | None, adaptive: bool = False
                ) -> tuple[Budget | None, Subnet, Cost, float | None]:
        """The sub-network for a request's budget (the full model when None); with `adaptive`, the
        fraction the adaptive routers take (and the full model, whose weights they route)."""
        try:
            parsed = Budget.parse(1.0 if budget is None else budget)
            if adaptive and self._adaptive is None:
                raise FlextronError("this server does not route adaptively")
            fraction = self._adaptive(parsed) if adaptive else None
            subnet, cost = self._resolve(None if adaptive or budget is None else parsed)
        except FlextronError as e:
            raise RequestError(str(e), code="invalid_budget", param="budget") from None
        return (None if budget is None else parsed), subnet, cost, fraction

    def encode(self, prompt: str | list, raw: bool, max_tokens: int) -> list[int]:
        """Token ids of a prompt (text, chat messages or ids), within the prompt and context limits."""
        param = "messages" if prompt and isinstance(prompt[0], dict) else "prompt"
        if isinstance(prompt, list) and param == "prompt":
            ids = prompt
            _check(all(0 <= t < self.vocab for t in ids), f"token ids must be in [0, {self.vocab})", param)
        else:
            try:
                text, special = prompt_text(self.tokenizer, prompt, raw)
            except FlextronError as e:
                raise RequestError(f"cannot build the prompt: {e}", param=param) from None
            self._check_chars(text, param)
            ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        n = len(ids)
        _check(n > 0, "the prompt is empty after tokenization", param)
        limit = self.config.max_prompt_tokens
        if n > limit or (self.context is not None and n + max_tokens > self.context):
            why = (f"the prompt has {n} tokens, over this server's limit of {limit}" if n > limit else
                   f"this model's maximum context length is {self.context} tokens, but the prompt has {n} "
                   f"and max_tokens asks for {max_tokens} more")
            raise RequestError(why, code="context_length_exceeded", param=param)
        return ids

    def _check_chars(self, text: str, param: str) -> None:
        """Refuse, before tokenizing it, a text too long to fit in the prompt limit whatever its tokens."""
        limit = self.config.max_prompt_tokens
        if self._token_chars is not None and len(text) > limit * self._token_chars:
            raise RequestError(f"the prompt has {len(text)} characters, more than this server's limit of {limit} "
                               f"tokens can hold (one token stands for at most {self._token_chars} characters here)",
                               code="context_length_exceeded", param=param)

    def parse(self, body: dict, chat: bool) -> Job:
        """Validate a completions (`chat` False) or chat completions request body."""
        model = _field(body, "model", (str,), self.name)
        in_name = split_model(model, self.name)
        budget = _field(body, "budget", (str, *_NUMBER))
        _check(in_name is None or budget is None, "give the budget in the model name or in 'budget', not both",
               "budget")
        if chat:
            prompts, raw = [_messages(_field(body, "messages", (list,), required=True))], False
        else:
            prompts, raw = _prompts(_field(body, "prompt", (str, list), required=True)), True
        _check(_field(body, "n", (int,), 1) == 1, "only n=1 is supported", "n")
        _check(_field(body, "best_of", (int,), 1) == 1, "only best_of=1 is supported", "best_of")
        echo = _field(body, "echo", (bool,), False)
        logprobs = _field(body, "logprobs", (int, bool) if chat else (int,))
        _check(not chat or not (echo or logprobs), "'echo' and 'logprobs' are supported on /v1/completions only",
               "logprobs")
        _check(logprobs is None or 0 <= logprobs <= MAX_LOGPROBS, f"'logprobs' must be between 0 and {MAX_LOGPROBS}",
               "logprobs")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _field(body, key, (int,), self.config.default_max_tokens)
        least = 0 if echo else 1
        _check(least <= max_tokens <= self.config.max_tokens,
               f"'{key}' must be between {least} and {self.config.max_tokens}, got {max_tokens}", key)
        temperature = _field(body, "temperature", _NUMBER, 1.0)
        _check(0 <= temperature <= 2, f"'temperature' must be between 0 and 2, got {temperature}", "temperature")
        top_p = _field(body, "top_p", _NUMBER, 1.0)
        _check(0 < top_p <= 1, f"'top_p' must be in (0, 1], got {top_p}", "top_p")
        seed = _field(body, "seed", (int,))
        _check(seed is None or -(2**63) <= seed < 2**64, "'seed' is out of range", "seed")
        stop = _field(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        _check(len(stop) <= MAX_STOPS and all(isinstance(s, str) for s in stop),
               f"'stop' must be a string or up to {MAX_STOPS} strings", "stop")
        _check(all(len(s) <= MAX_STOP_CHARS for s in stop),
               f"each 'stop' string may be at most {MAX_STOP_CHARS} characters long", "stop")
        stream = _field(body, "stream", (bool,), False)
        _check(not stream or len(prompts) == 1, "streaming takes one prompt per request", "stream")
        include_usage = _field(_field(body, "stream_options", (dict,), {}), "include_usage", (bool,), False)
        adaptive = _field(body, "adaptive", (bool,), False)
        budget, subnet, cost, fraction = self.resolve(in_name if in_name is not None else budget, adaptive)
        ids = [self.encode(p, raw, max_tokens) for p in prompts]
        texts = [p if isinstance(p, str) else self.tokenizer.decode(i) for p, i in zip(prompts, ids)]
        sampling = None
        if max_tokens:  # OpenAI's seeds may be negative: the generator takes them modulo 2**64
            sampling = Sampling(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                                seed=None if seed is None else seed % 2**64, stop=tuple(stop) or None)
        return Job(chat, model, ids, texts, budget, subnet, cost, sampling, logprobs, echo, stream, include_usage,
                   fraction)

    def models(self, space: dict, routed: tuple[str, tuple[float, ...]] | None) -> dict:
        """`GET /v1/models`: the checkpoint, and one entry per budget its routers were trained on."""
        entry = {"id": self.name, "object": "model", "created": 0, "owned_by": "flextron",
                 "max_model_len": self.context}
        data = [{**entry, "elastic_space": space}]
        if routed is not None:
            metric, budgets = routed
            prefix = "" if metric == "auto" else f"{metric}="
            data += [{**entry, "id": f"{self.name}@{prefix}{b:.0%}", "root": self.name} for b in budgets]
        return {"object": "list", "data": data}
