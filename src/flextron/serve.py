"""An OpenAI-compatible HTTP server over one elastic checkpoint: every budget from one set of weights.

The checkpoint is loaded once. Each request may name a `budget` (0.5, "60%", "params=80e6"; the
full model when absent); the server resolves it as `flextron export` does (`select_subnet`: the
static router's choice where routers were trained, else the largest uniform sub-network),
switches the elastic model to it by hard slicing (no weights are copied) and generates. The sub-network is state of
the one model, so generation runs one request at a time under a lock: requests at different
budgets queue, up to `ServeConfig.max_queue` of them.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream` as server-sent
events in OpenAI's chunk format), `GET /v1/models`, `GET /health`. Errors are OpenAI-style JSON,
`{"error": {"message", "type", "code", "param"}}`, with a 4xx status for a bad request.

Built on the standard library's `ThreadingHTTPServer` (a thread per connection, HTTP/1.1
keep-alive, chunked streaming): generation is serialized anyway, so an async stack would add
dependencies without adding throughput.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from jinja2.exceptions import TemplateError
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from flextron import __version__
from flextron.config import Budget, Subnet
from flextron.cost import Cost, subnet_cost
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.generation import Completion, complete, prompt_inputs
from flextron.routers import select_subnet

log = logging.getLogger("flextron.serve")

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
               dict: "an object"}
_NUMBER = (int, float)


@dataclass
class ServeConfig:
    """Limits of the server (tokens, bytes, waiting requests, seconds)."""

    max_prompt_tokens: int = 4096
    max_tokens: int = 1024  # the most new tokens one request may ask for
    default_max_tokens: int = 128  # when a request gives no max_tokens
    max_body_bytes: int = 1 << 20
    max_queue: int = 64  # requests generating or waiting; more get 503
    timeout_s: float = 120.0  # a connection idle for this long (reading or writing) is dropped

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "max_body_bytes", "max_queue"):
            if getattr(self, name) < 1:
                raise FlextronError(f"{name.replace('_', '-')} must be at least 1")
        if self.default_max_tokens > self.max_tokens:
            raise FlextronError("default-max-tokens cannot exceed max-tokens")


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


@dataclass
class Job:
    """One validated request."""

    chat: bool
    model: str
    inputs: dict[str, Tensor]
    budget: Budget | None
    subnet: Subnet
    cost: Cost
    options: dict  # keyword arguments of `flextron.generation.complete`
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, choices: list[dict], chunk: bool = False) -> dict:
        """A response (or stream chunk) around `choices`, with the budget and size that served it."""
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "object": kind, "created": self.created,
                "model": self.model, "choices": choices,
                "flextron": {"budget": str(self.budget) if self.budget else "full",
                             "params": self.cost.params, "params_nonembed": self.cost.params_nonembed}}

    def choice(self, text: str | None, finish: str | None = None, chunk: bool = False) -> dict:
        """One choice: text (completions), message (chat) or delta (chat stream; None: an empty delta)."""
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if chunk:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}


def usage(result: Completion) -> dict:
    """OpenAI's token counts of a completion."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


class Engine:
    """The loaded elastic model, its tokenizer and limits; runs one generation at a time."""

    def __init__(self, em: ElasticModel, tokenizer: PreTrainedTokenizerBase, name: str,
                 config: ServeConfig | None = None) -> None:
        self.em, self.tokenizer, self.name = em, tokenizer, name
        self.config = config or ServeConfig()
        cfg = em.config
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.config.max_queue)
        self._budgets: dict[Budget, tuple[Subnet, Cost]] = {}

    def resolve(self, budget: str | float | None) -> tuple[Budget | None, Subnet, Cost]:
        """The sub-network for a request's budget (the full model when None), as `flextron export` picks it."""
        try:
            parsed = Budget.parse(1.0 if budget is None else budget)
            if parsed not in self._budgets:
                subnet = select_subnet(self.em, parsed)
                self._budgets[parsed] = subnet, subnet_cost(self.em, subnet)
        except FlextronError as e:
            raise RequestError(str(e), code="invalid_budget", param="budget") from None
        return (None if budget is None else parsed), *self._budgets[parsed]

    def encode(self, prompt: str | list[dict], raw: bool, max_tokens: int) -> dict[str, Tensor]:
        """Token ids of a prompt, within the prompt and context limits."""
        param = "messages" if isinstance(prompt, list) else "prompt"
        try:
            inputs = prompt_inputs(self.tokenizer, prompt, raw)
        except (FlextronError, TemplateError, ValueError) as e:
            raise RequestError(f"cannot build the prompt: {e}", param=param) from None
        n = inputs["input_ids"].shape[1]
        _check(n > 0, "the prompt is empty after tokenization", param)
        limit = self.config.max_prompt_tokens
        if n > limit or (self.context is not None and n + max_tokens > self.context):
            why = (f"the prompt has {n} tokens, over this server's limit of {limit}" if n > limit else
                   f"this model's maximum context length is {self.context} tokens, but the prompt has {n} "
                   f"and max_tokens asks for {max_tokens} more")
            raise RequestError(why, code="context_length_exceeded", param=param)
        return inputs

    @contextmanager
    def slot(self) -> Iterator[None]:
        """A place in the queue, or 503 when it is full."""
        if not self._slots.acquire(blocking=False):
            raise RequestError(f"the server is busy ({self.config.max_queue} requests queued); retry later",
                               503, code="server_busy", kind="server_error")
        try:
            yield
        finally:
            self._slots.release()

    def run(self, job: Job, stream: Callable[[str], None] | None = None) -> Completion:
        """Generate for `job` at its sub-network, after the requests before it."""
        with self._lock:
            self.em.set_subnet(job.subnet)
            return complete(self.em.model, self.tokenizer, job.inputs, stream=stream, **job.options)

    def parse(self, body: dict, chat: bool) -> Job:
        """Validate a completions (`chat` False) or chat completions request body."""
        model = _field(body, "model", (str,), self.name)
        if chat:
            prompt, raw = _messages(_field(body, "messages", (list,), required=True)), False
        else:
            prompt, raw = _field(body, "prompt", (str, list), required=True), True
            if isinstance(prompt, list):
                _check(len(prompt) == 1 and isinstance(prompt[0], str),
                       "'prompt' must be a string (or a list of one string); batches and token ids are not "
                       "supported", "prompt")
                prompt = prompt[0]
        _check(_field(body, "n", (int,), 1) == 1, "only n=1 is supported", "n")
        for name in ("echo", "logprobs"):
            _check(not _field(body, name, (bool, int), False), f"'{name}' is not supported", name)
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _field(body, key, (int,), self.config.default_max_tokens)
        _check(1 <= max_tokens <= self.config.max_tokens,
               f"'{key}' must be between 1 and {self.config.max_tokens}, got {max_tokens}", key)
        temperature = _field(body, "temperature", _NUMBER, 1.0)
        _check(0 <= temperature <= 2, f"'temperature' must be between 0 and 2, got {temperature}", "temperature")
        top_p = _field(body, "top_p", _NUMBER, 1.0)
        _check(0 < top_p <= 1, f"'top_p' must be in (0, 1], got {top_p}", "top_p")
        seed = _field(body, "seed", (int,))
        _check(seed is None or -(2**63) <= seed < 2**64, "'seed' is out of range", "seed")
        stop = _field(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        _check(len(stop) <= 4 and all(isinstance(s, str) for s in stop), "'stop' must be a string or up to 4 strings",
               "stop")
        stream = _field(body, "stream", (bool,), False)
        include_usage = _field(_field(body, "stream_options", (dict,), {}), "include_usage", (bool,), False)
        budget, subnet, cost = self.resolve(_field(body, "budget", (str, *_NUMBER)))
        options = {"max_new_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
                   "seed": seed, "stop": stop}
        return Job(chat, model, self.encode(prompt, raw, max_tokens), budget, subnet, cost, options, stream,
                   include_usage)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"flextron/{__version__}"
    server: Server

    def setup(self) -> None:
        self.timeout = self.server.engine.config.timeout_s
        super().setup()

    def log_message(self, format: str, *args) -> None:
        log.info("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._streaming = False
        path = urlsplit(self.path).path.rstrip("/")
        try:
            route = ROUTES.get((method, path))
            if route is None:
                self.close_connection = True  # a body we did not read may follow
                if any(p == path for _, p in ROUTES):
                    raise RequestError(f"{method} is not allowed on {path}", 405, code="method_not_allowed")
                raise RequestError(f"no endpoint {path}; see GET /v1/models", 404, code="not_found")
            route(self)
        except RequestError as e:
            if not self._streaming:
                self._send_json(e.status, e.body())
        except (ConnectionError, TimeoutError):
            log.info("client %s went away", self.address_string())
            self.close_connection = True
        except Exception as e:
            log.exception("request failed")
            err = RequestError(f"internal error: {type(e).__name__}: {e}", 500, kind="server_error")
            if self._streaming:
                self._end_stream(err.body())
            else:
                self._send_json(500, err.body())

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported; send Content-Length", 411,
                               code="length_required")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > self.server.engine.config.max_body_bytes:
            self.close_connection = True
            if length < 0:
                raise RequestError("invalid Content-Length header", code="invalid_request")
            raise RequestError(f"request body of {length} bytes is over the limit of "
                               f"{self.server.engine.config.max_body_bytes}", 413, code="body_too_large")
        data = self.rfile.read(length)
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, ValueError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object", code="invalid_json")
        return body

    def _health(self) -> None:
        self._send_json(200, {"status": "ok", "model": self.server.engine.name})

    def _models(self) -> None:
        e = self.server.engine
        self._send_json(200, {"object": "list", "data": [
            {"id": e.name, "object": "model", "created": 0, "owned_by": "flextron",
             "max_model_len": e.context, "elastic_space": e.em.space.to_dict()}]})

    def _completions(self) -> None:
        self._generate(chat=False)

    def _chat(self) -> None:
        self._generate(chat=True)

    def _generate(self, chat: bool) -> None:
        engine = self.server.engine
        job = engine.parse(self._body(), chat)
        with engine.slot():
            if job.stream:
                self._stream(engine, job)
                return
            result = engine.run(job)
            self._send_json(200, {**job.envelope([job.choice(result.text, result.finish_reason)]),
                                  "usage": usage(result)})

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

    def _event(self, obj: dict | str) -> None:
        self._chunk(b"data: " + (obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n\n")

    def _stream(self, engine: Engine, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True
        if job.chat:
            self._event(job.envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}], chunk=True))
        result = engine.run(job, lambda text: self._event(job.envelope([job.choice(text, chunk=True)], chunk=True)))
        self._event(job.envelope([job.choice(None, result.finish_reason, chunk=True)], chunk=True))
        if job.include_usage:
            self._event({**job.envelope([], chunk=True), "usage": usage(result)})
        self._end_stream()

    def _end_stream(self, error: dict | None = None) -> None:
        try:
            if error is not None:
                self._event(error)
            self._event("[DONE]")
            self._chunk(b"")
        except (ConnectionError, TimeoutError):
            self.close_connection = True


ROUTES: dict[tuple[str, str], Callable[[_Handler], None]] = {
    ("GET", "/health"): _Handler._health,
    ("GET", "/v1/models"): _Handler._models,
    ("POST", "/v1/completions"): _Handler._completions,
    ("POST", "/v1/chat/completions"): _Handler._chat,
}


class Server(ThreadingHTTPServer):
    """The HTTP server; `serve_forever()` runs it, `shutdown()` (from another thread) stops it."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.engine = engine
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise FlextronError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"
