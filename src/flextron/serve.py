"""An OpenAI-compatible HTTP server over one elastic checkpoint: every budget from one set of weights.

The checkpoint is loaded once. Each request names a budget (`model: "NAME@50%"`, or the extra
field `budget`; the full model when absent), resolved as `flextron export` resolves it; the
batching engine (`flextron.engine`) decodes requests at the same sub-network together and lets
sub-networks take turns. The protocol (validation, response shapes) is `flextron.protocol`; this
module is the transport: Starlette routes on uvicorn.

Endpoints: `POST /v1/completions` (with `logprobs` / `echo`), `POST /v1/chat/completions` (both with
`stream` as server-sent events in OpenAI's chunk format), `GET /v1/models`, `GET /health`. Errors
are OpenAI-style JSON with a 4xx status for a bad request (415 for a Content-Type other than JSON,
so no web page can POST to it without a CORS preflight), 503 when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from transformers import PreTrainedTokenizerBase

from flextron.elastic import ElasticModel
from flextron.engine import Busy, Engine, Result, TokenLogprob
from flextron.engine import Request as EngineRequest
from flextron.errors import FlextronError
from flextron.generation import context_length
from flextron.options import ServeLimits
from flextron.protocol import (
    ChoiceLogprobs,
    Job,
    Protocol,
    RequestError,
    completion_choice,
    count_prompts,
    parse_json,
)

__all__ = ["ServeLimits", "Server", "Service"]

log = logging.getLogger("flextron.serve")


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class Service:
    """The model behind the server: its batching engine and the protocol that feeds it."""

    def __init__(self, em: ElasticModel, tokenizer: PreTrainedTokenizerBase, name: str,
                 config: ServeLimits | None = None) -> None:
        self.em, self.tokenizer, self.name = em, tokenizer, name
        self.config = config or ServeLimits()
        cfg = em.config
        context = context_length(cfg)
        self.engine = Engine(em, tokenizer, self.config, start=False)  # `Server.serve_forever` runs its loop
        self.protocol = Protocol(tokenizer, name, context, cfg.vocab_size, self.config, self.engine.resolve,
                                 self.engine.adaptive_fraction)

    def models(self) -> dict:
        routers = self.em.routers
        routed = None if routers is None else (routers.metric, tuple(routers.config.budgets))
        return self.protocol.models(self.em.space.to_dict(), routed)


def _client(request: HTTPRequest) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "client"


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), e.status)


async def _body(request: HTTPRequest, limit: int) -> bytes:
    if "chunked" in request.headers.get("transfer-encoding", "").lower():
        raise RequestError("chunked request bodies are not supported; send Content-Length", 411,
                           code="length_required")
    try:
        length = int(request.headers.get("content-length", "0"))
    except ValueError:
        length = -1
    if length < 0:
        raise RequestError("invalid Content-Length header", code="invalid_request")
    if length > limit:
        raise RequestError(f"request body of {length} bytes is over the limit of {limit}", 413,
                           code="body_too_large")
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind and kind != "application/json" and not kind.endswith("+json"):  # no cross-site "simple" POSTs
        raise RequestError(f"Content-Type {kind!r} is not supported; send application/json", 415,
                           code="unsupported_media_type")
    try:
        return await request.body()
    except ClientDisconnect:
        raise ClientGone from None


async def _wait(request: HTTPRequest, futures: list) -> list[Result]:
    """The results, or `ClientGone` as soon as the client disconnects."""
    together = asyncio.gather(*[asyncio.wrap_future(f) for f in futures])
    while True:
        done, _ = await asyncio.wait({together}, timeout=0.2)
        if done:
            return together.result()
        if await request.is_disconnected():
            together.cancel()
            raise ClientGone


def _sse(obj: dict | str) -> bytes:
    return b"data: " + (obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n\n"


def _stream(service: Service, job: Job, client: str) -> AsyncIterator[bytes]:
    """Submit a streaming job now; its server-sent events follow as they come: the queue gets each piece of
    text, before it the logprobs of the tokens scored since the last piece (a list), and None at the end."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def put(_: int, item: str | list[TokenLogprob]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    (req,) = job.requests(put, put if job.logprobs is not None else None)
    future = _submit(service, req)
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
    return _events(service, job, req, future, queue, client)


async def _events(service: Service, job: Job, req: EngineRequest, future: Future, queue: asyncio.Queue,
                  client: str) -> AsyncIterator[bytes]:
    logprobs = ChoiceLogprobs(service.tokenizer) if job.logprobs is not None else None
    echo, scored, reported = job.echo, [], 0  # echo: the prompt is still to send (with logprobs, once scored)
    try:
        if job.chat:
            yield _sse(job.envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}], chunk=True))
        elif echo and logprobs is None:
            echo = False
            yield _sse(job.envelope([job.choice(job.texts[0], chunk=True)], chunk=True))
        while (item := await queue.get()) is not None:
            if isinstance(item, list) and echo:  # the prompt's logprobs come first, after the prefill
                echo = False
                yield _sse(job.envelope([job.choice(job.texts[0], chunk=True, logprobs=logprobs.prompt(item))],
                                        chunk=True))
            elif isinstance(item, list):
                scored += item
            else:
                chunk = None if logprobs is None else logprobs.completion(scored)
                reported, scored = reported + len(scored), []
                yield _sse(job.envelope([job.choice(item, chunk=True, logprobs=chunk)], chunk=True))
        try:
            result = future.result()
        except Exception as e:  # logged by the engine
            yield _sse(RequestError(f"internal error: {type(e).__name__}: {e}", 500, kind="server_error").body())
        else:
            # Tokens scored after the last piece of text (the end-of-text token) come with the finish.
            rest = None if logprobs is None else logprobs.completion((result.logprobs or [])[reported:], final=True)
            yield _sse(job.envelope([job.choice(None, result.finish_reason, chunk=True, logprobs=rest)], chunk=True))
            if job.include_usage:
                yield _sse({**job.envelope([], chunk=True), "usage": job.usage([result])})
        yield _sse("[DONE]")
    finally:
        if not future.done():
            service.engine.cancel(req)
            log.info("client %s went away; its request is dropped", client)


def _submit(service: Service, req: EngineRequest) -> Future:
    """Queue a request whose place was reserved; the place is given back when it ends, however it ends."""
    future = service.engine.submit(req)
    future.add_done_callback(lambda _: service.engine.release())
    return future


async def _generate(request: HTTPRequest, chat: bool) -> Response:
    service: Service = request.app.state.service
    client = _client(request)
    # Parsing, tokenizing and shaping answers run on worker threads: work that grows with a request's size
    # never holds the event loop, which answers every other client (GET /health included) meanwhile.
    body = await run_in_threadpool(parse_json, await _body(request, service.config.max_body_bytes))
    n = count_prompts(body, chat)
    if n > service.config.max_queue:  # never fits the queue: 503 would ask the client to retry in vain
        raise RequestError(f"a request may hold at most {service.config.max_queue} prompts (the server's "
                           f"--max-queue), this one holds {n}", code="too_many_prompts", param="prompt")
    try:
        service.engine.reserve(n)  # before parsing: resolving budgets and tokenizing count as queued work
    except Busy:
        raise RequestError(f"the server is busy ({service.config.max_queue} requests queued); retry later",
                           503, code="server_busy", kind="server_error") from None
    try:
        job = await run_in_threadpool(service.protocol.parse, body, chat)
    except BaseException:
        service.engine.release(n)
        raise
    if job.stream:
        return StreamingResponse(_stream(service, job, client), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    reqs = job.requests()
    try:
        results = await _wait(request, [_submit(service, r) for r in reqs])
    except ClientGone:
        for r in reqs:
            service.engine.cancel(r)
        log.info("client %s went away; its request is dropped", client)
        return Response(status_code=499)
    if chat:
        choices = [job.choice(results[0].text, results[0].finish_reason)]
    else:
        choices = await run_in_threadpool(
            lambda: [completion_choice(job, service.tokenizer, i, r) for i, r in enumerate(results)])
    return JSONResponse({**job.envelope(choices), "usage": job.usage(results)})


def _route(handler):
    """A route whose refusals and failures are OpenAI-style JSON, never a traceback to the client."""
    async def endpoint(request: HTTPRequest) -> Response:
        try:
            return await handler(request)
        except RequestError as e:
            return _error(e)
        except ClientGone:
            log.info("client %s went away before its request was read", _client(request))
            return Response(status_code=499)
        except Exception as e:
            log.exception("request failed")
            return _error(RequestError(f"internal error: {type(e).__name__}: {e}", 500, kind="server_error"))
    return endpoint


async def _completions(request: HTTPRequest) -> Response:
    return await _generate(request, chat=False)


async def _chat(request: HTTPRequest) -> Response:
    return await _generate(request, chat=True)


async def _models(request: HTTPRequest) -> Response:
    return JSONResponse(request.app.state.service.models())


async def _health(request: HTTPRequest) -> Response:
    return JSONResponse({"status": "ok", "model": request.app.state.service.name})


async def _http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    if exc.status_code == 405:
        err = RequestError(f"{request.method} is not allowed on {request.url.path}", 405, code="method_not_allowed")
    elif exc.status_code == 404:
        err = RequestError(f"no endpoint {request.url.path}; see GET /v1/models", 404, code="not_found")
    else:
        err = RequestError(str(exc.detail), exc.status_code, code="http_error")
    return JSONResponse(err.body(), err.status, headers=exc.headers)


def app(service: Service) -> Starlette:
    """The ASGI application serving `service`."""
    routes = [Route("/v1/completions", _route(_completions), methods=["POST"]),
              Route("/v1/chat/completions", _route(_chat), methods=["POST"]),
              Route("/v1/models", _route(_models), methods=["GET"]),
              Route("/health", _route(_health), methods=["GET"])]
    application = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    application.state.service = service
    return application


class Server:
    """The HTTP server; `serve_forever()` runs it, `shutdown()` (from another thread) stops it."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.service = service
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(2048)
        except (OSError, OverflowError) as e:
            self.socket.close()
            raise FlextronError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}); "
                                "pick another --port") from None
        self.server_address = self.socket.getsockname()[:2]
        config = service.config
        self._uvicorn = uvicorn.Server(uvicorn.Config(
            app(service), log_config=None, limit_concurrency=config.max_connections,
            timeout_keep_alive=max(1, int(config.timeout_s)), timeout_graceful_shutdown=5, server_header=False))
        self._stopped = threading.Event()

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve until `shutdown()` (or Ctrl-C / SIGTERM on the main thread): HTTP on a background
        thread, the engine loop on this one (PyTorch's CPU matmuls run about twice as fast on the
        main thread as on a secondary one, measured in `docs/serve.md`)."""
        http = threading.Thread(target=self._serve_http, name="flextron-http", daemon=True)
        http.start()
        # As uvicorn does on the main thread: Ctrl-C or SIGTERM stops the server gracefully (requests
        # under way finish within the grace period), a second one at once; also where the shell
        # started it with SIGINT ignored (a background job).
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.service.engine.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._uvicorn.should_exit = True
            http.join(30)
            self._stopped.set()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._uvicorn.should_exit:
            self._uvicorn.force_exit = True
            raise KeyboardInterrupt
        self._uvicorn.should_exit = True  # the HTTP side drains, then closes the engine loop

    def _serve_http(self) -> None:
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:  # the HTTP side ended (shut down, or failed): so does the engine loop
            self.service.engine.close()

    def shutdown(self) -> None:
        """Stop as a signal does: the HTTP side drains, then closes the engine loop (`_serve_http`)."""
        self._uvicorn.should_exit = True
        self._stopped.wait(30)

    def server_close(self) -> None:
        self.socket.close()
        self.service.engine.close()
