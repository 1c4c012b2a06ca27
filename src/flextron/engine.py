"""Continuous batching over one elastic model: many requests, many budgets, one set of weights.

Requests at the same sub-network decode together: each holds rows of its group's KV cache
(left-padded; an attention mask and per-row positions keep rows independent) and its own
sampling settings. A request is prefilled alone, then joins its group's batch between decode
steps, and leaves it when it finishes or is cancelled.

A request routed by the input-adaptive routers (`Request.adaptive`) runs unbatched: its
attention widths come from its own prompt and each token picks its MLP width, so it forms a group
of its own and takes its turn like the others.

Scheduling: waiting requests are admitted first come, first served while fewer than
`ServeLimits.max_batch` sequences run (over all groups); the groups with running sequences then
take one decode step each, in turn (round robin). Every running sequence so gets one token per
round whatever its budget or its group's size, and a waiting request is admitted as soon as a
sequence ends, so no budget starves. `max_batch=1` is the old one-request-at-a-time server.

With `ServeLimits.mix_budgets`, requests of every budget share one batch instead: the model runs
at full width and each row's MLP neurons and attention units beyond its sub-network are masked to zero
(`ElasticModel.rows`), so one decode step serves all budgets at the cost of the widest. That wins
where a step's cost is mostly fixed per layer (HF eager on CPUs, launch-bound GPUs), and loses
where it is mostly the bytes or FLOPs of the widths.

This is the one decoder: `flextron serve` feeds it many requests, `flextron generate` one.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PreTrainedTokenizerBase

from flextron.adaptive import AdaptiveRouting
from flextron.budgets import select_subnet
from flextron.cost import Cost, subnet_cost
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.generation import StopFilter, context_length, cut_at_stop, stop_token_ids
from flextron.options import Sampling, ServeLimits
from flextron.space import Budget, Subnet

log = logging.getLogger("flextron.engine")

# A token's log-probability and the most likely alternatives: (token id, logprob or None, [(id, logprob)]).
TokenLogprob = tuple[int, float | None, list[tuple[int, float]]]


class Busy(Exception):
    """The queue is full."""


class Cancelled(Exception):
    """The request was cancelled (its client went away, or the engine closed)."""


def _drop(req: Request) -> None:
    """End a cancelled request's future: cancelled while waiting, else with `Cancelled`."""
    if not req.future.cancel() and not req.future.done():
        req.future.set_exception(Cancelled("the request was cancelled"))


@dataclass
class Request:
    """One sequence to continue as `sampling` says (None: only score the prompt, as an echo with no new
    tokens). `top_logprobs`: None for no log-probabilities, else how many alternatives each generated
    token reports; `prompt_logprobs`: score the prompt too (echo)."""

    input_ids: list[int]
    subnet: Subnet
    sampling: Sampling | None = field(default_factory=Sampling)
    top_logprobs: int | None = None
    prompt_logprobs: bool = False
    adaptive: float | None = None  # input-adaptive routing at this fraction (`subnet` unused; runs unbatched)
    on_text: Callable[[str], None] | None = None  # called from the engine thread
    # With `top_logprobs`, called (from the engine thread) just before each `on_text` with the tokens scored
    # since the last call, and once after the prefill with the prompt's (`prompt_logprobs`); tokens scored
    # after the last piece of text come only in the result.
    on_scored: Callable[[list[TokenLogprob]], None] | None = None
    future: Future = field(default_factory=Future)
    cancelled: bool = False


@dataclass
class Result:
    """What a request generated; `finish_reason` is "stop" (end of text or a stop string) or "length"."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


class _Row:
    """A running request: its tokens so far, sampler and streamed text."""

    def __init__(self, req: Request, eos: set[int], tokenizer: PreTrainedTokenizerBase, limit: int) -> None:
        """`limit`: the most new tokens, within the model's context."""
        self.req, self.eos, self.tokenizer, self.limit = req, eos, tokenizer, limit
        self.sampling = req.sampling or Sampling()
        self.stops = self.sampling.stop or ()
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if req.top_logprobs is not None else None
        self.generator = torch.Generator()
        self.generator.manual_seed(self.sampling.seed if self.sampling.seed is not None else torch.seed())
        self.sent = ""
        self.filter = StopFilter(self.stops, self._emit) if self.stops or req.on_text is not None else None
        self.reported = 0  # tokens whose logprobs went to `on_scored`
        self.finish: str | None = None
        self.prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def position(self) -> int:
        """Position of the last token, the next one fed."""
        return len(self.req.input_ids) + len(self.tokens) - 1

    def add(self, logits: Tensor, greedy: int) -> None:
        """Choose the next token from its logits [V] (`greedy`: their argmax); note whether the request is done."""
        s = self.sampling
        token = greedy
        if s.temperature > 0:
            # The logits' gaps below the best one, scaled: never above 0, so no temperature overflows (in
            # float64, where tiny ones are not 0); a tiny temperature puts all the mass on the argmax.
            logits64 = logits.double()
            probs = F.softmax((logits64 - logits64.max()) / s.temperature, -1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                sorted_p[(sorted_p.cumsum(0) - sorted_p) > s.top_p] = 0  # keep the nucleus, at least one
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            token = int(torch.multinomial(probs.cpu(), 1, generator=self.generator))
        if self.logprobs is not None:
            self.logprobs.append(_scored(F.log_softmax(logits.float(), -1), token, self.req.top_logprobs))
        self.tokens.append(token)
        stopped = False
        if self.filter is not None:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            # Pass text on once it is stable: a complete character, and a prefix of what follows. Text
            # that is not (yet) is searched whole for the stop strings instead.
            if text.startswith(self.sent) and not text.endswith("\ufffd"):
                self.filter(text[len(self.sent):])
                self.sent = text
                stopped = self.filter.stopped
            else:
                stopped = cut_at_stop(text, self.stops)[1]
        if token in self.eos or stopped:
            self.finish = "stop"
        elif len(self.tokens) >= self.limit:
            self.finish = "length"

    def _emit(self, text: str) -> None:
        """Pass a piece of text on, after the logprobs of the tokens scored since the last piece."""
        if self.req.on_scored is not None and self.logprobs is not None and len(self.logprobs) > self.reported:
            self.req.on_scored(self.logprobs[self.reported:])
            self.reported = len(self.logprobs)
        if self.req.on_text is not None:
            self.req.on_text(text)

    def result(self) -> Result:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.filter is not None:
            if text.startswith(self.sent):
                self.filter(text[len(self.sent):])
            self.filter.flush()
        return Result(cut_at_stop(text, self.stops)[0], self.tokens, len(self.req.input_ids), len(self.tokens),
                      self.finish or "length", self.logprobs, self.prompt_logprobs)


def _scored(logp: Tensor, token: int, top: int | None) -> TokenLogprob:
    """`token`'s log-probability under `logp` [V] with the `top` most likely tokens."""
    values, ids = logp.topk(top or 0) if top else (logp[:0], logp[:0].long())
    return token, float(logp[token]), list(zip(ids.tolist(), values.tolist()))


class _Group:
    """The running sequences of one sub-network (or, mixing budgets, of all of them): one KV cache,
    rows left-padded to one length."""

    def __init__(self, adaptive: float | None = None) -> None:
        self.adaptive = adaptive
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask: Tensor | None = None  # [rows, cached length], 1 where a row has a token

    def join(self, row: _Row, cache: DynamicCache) -> None:
        n = len(row.req.input_ids)
        mask = torch.ones(1, n, dtype=torch.long, device=cache.layers[0].keys.device)
        if self.cache is None:
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        length = max(self.mask.shape[1], n)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)])
            mine.values = torch.cat([_pad_left(mine.values, length), _pad_left(theirs.values, length)])
        self.mask = torch.cat([_pad_left(self.mask, length), _pad_left(mask, length)])
        self.rows.append(row)

    def keep(self, keep: list[int]) -> None:
        """Keep only these rows; drop the cache columns that became padding for all of them."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[index]
        start = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


def _pad_left(x: Tensor, length: int) -> Tensor:
    """Zero-pad a mask [B, T] or cache tensor [B, H, T, D] on the left of its T axis to `length`."""
    extra = length - x.shape[1 if x.dim() == 2 else 2]
    if extra == 0:
        return x
    return F.pad(x, (extra, 0)) if x.dim() == 2 else F.pad(x, (0, 0, extra, 0))


class Engine:
    """Runs requests on its own thread (with `start=False`, on the thread that calls `run()`); `submit`
    returns at once, the request's future holds the result. Of the server's `limits` it reads `max_batch`,
    `max_queue`, `max_budgets` and `mix_budgets`. Adaptive requests are routed by `routing` (default: the
    checkpoint's adaptive routers, built at the first)."""

    def __init__(self, em: ElasticModel, tokenizer: PreTrainedTokenizerBase, limits: ServeLimits | None = None,
                 start: bool = True, routing: AdaptiveRouting | None = None) -> None:
        self.em, self.tokenizer = em, tokenizer
        self.limits = limits or ServeLimits()
        self.eos = set(stop_token_ids(em.model, tokenizer))
        self.context = context_length(em.config)
        self.device = next(em.parameters()).device
        # transformers renamed `past_key_values` to `cache` (5.2x); either works, the old one warns.
        self._cache_arg = "cache" if "cache" in inspect.signature(em.model.forward).parameters else "past_key_values"
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._groups: OrderedDict[tuple, _Group] = OrderedDict()
        self._reserved = 0
        self._budgets: OrderedDict[Budget, tuple[Subnet, Cost]] = OrderedDict()
        self._budget_lock = threading.Lock()
        self._closed = False
        self._routing = routing
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self.run, name="flextron-engine", daemon=True)
            self._thread.start()

    def resolve(self, budget: Budget | None) -> tuple[Subnet, Cost]:
        """The sub-network for a budget, as `flextron export` picks it (None: the full model, whatever routers
        would pick at 100 %), and its cost (kept, least recent dropped)."""
        with self._budget_lock:
            if budget in self._budgets:
                self._budgets.move_to_end(budget)
                return self._budgets[budget]
        subnet = self.em.space.full() if budget is None else select_subnet(self.em, budget)
        found = subnet, subnet_cost(self.em, subnet)
        with self._budget_lock:
            self._budgets[budget] = found
            while len(self._budgets) > self.limits.max_budgets:
                self._budgets.popitem(last=False)
        return found

    def adaptive_fraction(self, budget: Budget) -> float:
        """A budget as the fraction the checkpoint's input-adaptive routers take (FlextronError without them)."""
        with self._budget_lock:
            if self._routing is None:
                self._routing = AdaptiveRouting.for_model(self.em)
        return self._routing.fraction(budget)

    def reserve(self, n: int = 1) -> None:
        """Places for `n` requests in the queue (running or waiting), or `Busy` when it is full;
        each place is given back with `release`."""
        with self._cond:
            if self._reserved + n > self.limits.max_queue:
                raise Busy(f"{self._reserved} requests are queued, the limit is {self.limits.max_queue}")
            self._reserved += n

    def release(self, n: int = 1) -> None:
        with self._cond:
            self._reserved -= n

    def submit(self, req: Request) -> Future:
        """Queue a request; the future resolves to a `Result`. A prompt must leave room in the model's
        context, where generation ends at the latest."""
        self.em.space.validate(req.subnet)
        n = len(req.input_ids)
        if n == 0:
            raise FlextronError("the prompt is empty after tokenization; pass some text or drop --raw")
        if self.context is not None and n + (req.sampling is not None) > self.context:  # room for a new token
            raise FlextronError(f"the prompt has {n} tokens, the model's whole context of {self.context}; "
                                "shorten it")
        with self._cond:
            if self._closed:
                raise FlextronError("the engine is closed")
            self._waiting.append(req)
            self._cond.notify()
        return req.future

    def cancel(self, req: Request) -> None:
        """Drop a request (its client went away): it leaves its batch at the next step."""
        req.cancelled = True

    def close(self) -> None:
        """Stop the loop (and wait for the engine's own thread); requests still queued are cancelled."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)

    def generate(self, requests: list[Request]) -> list[Result]:
        """Submit requests together and wait for all of them. An engine without a thread of its own
        (`start=False`) runs its loop on this thread until they are done, then closes."""
        futures = [self.submit(r) for r in requests]
        if self._thread is None:
            def close_when_done(_: Future) -> None:
                if all(f.done() for f in futures):
                    self.close()

            for f in futures:
                f.add_done_callback(close_when_done)
            self.run()
        return [f.result() for f in futures]

    # The engine loop.

    def run(self) -> None:
        """Admit, prefill and decode until `close()`. `Engine(start=False)` leaves the loop to the
        caller's thread: on CPUs, PyTorch's matmuls ran about half as fast in a secondary thread
        as in the main one here (`docs/serve.md`), so the server and `generate` run it on the main thread."""
        turn = 0
        try:
            with torch.inference_mode():
                while (admitted := self._admit()) is not None:
                    for req in admitted:
                        self._guard(self._prefill, req, [req])
                    if self._groups:
                        key = list(self._groups)[turn % len(self._groups)]
                        group = self._groups[key]
                        self._guard(self._step, group, [r.req for r in group.rows])
                        if not group.rows:
                            del self._groups[key]
                        turn += 1
        finally:  # closed, or interrupted (Ctrl-C on the main thread): nobody waits forever
            with self._cond:
                self._closed = True
                left = [*self._waiting, *(r.req for g in self._groups.values() for r in g.rows)]
                self._waiting.clear()
                self._groups.clear()
            for req in left:
                _drop(req)

    def _admit(self) -> list[Request] | None:
        """Wait for work; the waiting requests admitted now (first come, first served, within
        `max_batch`), or None once closed."""
        with self._cond:
            while not (self._closed or self._waiting or self._groups):
                self._cond.wait()
            if self._closed:
                return None
            for req in [r for r in self._waiting if r.cancelled]:  # give their places back now
                self._waiting.remove(req)
                _drop(req)
            running = sum(len(g.rows) for g in self._groups.values())
            admitted = []
            while self._waiting and running + len(admitted) < self.limits.max_batch:
                admitted.append(self._waiting.popleft())
            return admitted

    def _guard(self, fn: Callable, arg, reqs: list[Request]) -> None:
        """Run one prefill or step; a failure fails its requests, never the engine."""
        try:
            fn(arg)
        except Exception as e:  # a bug or out of memory: the server answers 500 and keeps going
            log.exception("generation failed")
            for req in reqs:
                if not req.future.done():
                    req.future.set_exception(e)
            if isinstance(arg, _Group):
                arg.keep([])

    @contextmanager
    def _at(self, subnets: list[Subnet], adaptive: float | None, input_ids: list[int]) -> Iterator[None]:
        """Run the model with each row at its sub-network, or routed by the adaptive routers for one
        request's prompt."""
        if adaptive is None:
            with self.em.rows(subnets) if self.limits.mix_budgets else self.em.subnet(subnets[0]):
                yield
            return
        with self._routing.attached():
            # The prompt fixes the attention widths (the same at every step), each token its MLP width.
            self._routing.start(adaptive, torch.tensor([input_ids], device=self.device))
            yield

    def _prefill(self, req: Request) -> None:
        if not req.future.set_running_or_notify_cancel():
            return
        if req.cancelled:
            _drop(req)
            return
        ids = torch.tensor([req.input_ids], device=self.device)
        cache = DynamicCache()
        with self._at([req.subnet], req.adaptive, req.input_ids):
            out = self.em.model(input_ids=ids, **{self._cache_arg: cache}, use_cache=True,
                                logits_to_keep=0 if req.prompt_logprobs else 1)
        logits = out.logits[0]
        limit = req.sampling.max_new_tokens if req.sampling is not None else 0
        if self.context is not None:
            limit = min(limit, self.context - len(req.input_ids))
        row = _Row(req, self.eos, self.tokenizer, limit)
        if req.prompt_logprobs:
            logp = F.log_softmax(logits[:-1].float(), -1)
            row.prompt_logprobs = [(req.input_ids[0], None, [])] + [
                _scored(logp[i], t, req.top_logprobs) for i, t in enumerate(req.input_ids[1:])]
            if req.on_scored is not None:
                req.on_scored(row.prompt_logprobs)
        if req.sampling is None:  # echo only: score the prompt, generate nothing
            row.finish = "length"
        else:
            row.add(logits[-1], int(logits[-1].argmax()))
        if row.finish is not None:
            req.future.set_result(row.result())
            return
        if req.adaptive is not None:
            key = ("adaptive", id(req))
        else:
            key = ("mixed",) if self.limits.mix_budgets else (tuple(req.subnet.mlp), tuple(req.subnet.attn))
        self._groups.setdefault(key, _Group(req.adaptive)).join(row, cache)

    def _step(self, group: _Group) -> None:
        for r in group.rows:
            if r.req.cancelled:
                _drop(r.req)
        group.keep([i for i, r in enumerate(group.rows) if not r.req.cancelled])
        if not group.rows:
            return
        rows = group.rows
        group.mask = torch.cat([group.mask, group.mask.new_ones(len(rows), 1)], 1)
        with self._at([r.req.subnet for r in rows], group.adaptive, rows[0].req.input_ids):
            out = self.em.model(input_ids=torch.tensor([[r.tokens[-1]] for r in rows], device=self.device),
                                position_ids=torch.tensor([[r.position] for r in rows], device=self.device),
                                attention_mask=group.mask, **{self._cache_arg: group.cache}, use_cache=True)
        logits = out.logits[:, -1]
        for i, greedy in enumerate(logits.argmax(-1).tolist()):  # one device sync for the whole batch
            row = rows[i]
            row.add(logits[i], greedy)
            if row.finish is not None:
                row.req.future.set_result(row.result())
        group.keep([i for i, r in enumerate(rows) if r.finish is None])
