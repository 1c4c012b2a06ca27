"""The batching engine: every request's output equals that request run alone, whatever joins or leaves."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from flextron.engine import Busy, Cancelled, Engine, Request
from flextron.generation import stop_token_ids
from flextron.options import Sampling, ServeLimits
from flextron.space import Budget
from helpers import make_elastic, make_tokenizer, with_adaptive_routers

NEW = 12
GREEDY = Sampling(max_new_tokens=NEW)
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19], [20], [30, 31, 32]]


def alone(em, req: Request) -> list[int]:
    """Greedy tokens of one request by HF generate, batch of one, at its sub-network."""
    with em.subnet(req.subnet):
        out = em.model.generate(torch.tensor([req.input_ids]), max_new_tokens=req.sampling.max_new_tokens,
                                do_sample=False, eos_token_id=stop_token_ids(em.model, make_tokenizer()),
                                pad_token_id=0)
    return out[0, len(req.input_ids):].tolist()


def subnets(em):
    """Three sub-networks; in a space with hidden sizes, at three hidden sizes."""
    h = [None, 0, 1] if em.space.hidden else [None] * 3
    return [em.space.full(), em.space.uniform(1, 1, hidden_index=h[1]), em.space.uniform(0, 2, hidden_index=h[2])]


@pytest.fixture(params=[("llama", False), ("qwen2", False), ("llama", True), ("qwen2", True), ("gemma3", True),
                        ("olmo2", True), ("phi3", True), ("llama", "hidden"), ("gemma3", "hidden")],
                ids=["llama", "qwen2", "llama-mixed", "qwen2-mixed", "gemma3-mixed", "olmo2-mixed", "phi3-mixed",
                     "llama-hidden-mixed", "gemma3-hidden-mixed"])
def engine(request):
    kind, mix = request.param  # mixed: all budgets in one batch, each row masked to its sub-network
    em, tok = make_elastic(kind, hidden=mix == "hidden"), make_tokenizer()  # "hidden": and hidden sizes, mixed
    eng = Engine(em, tok, ServeLimits(max_batch=6, mix_budgets=bool(mix)))
    yield eng
    eng.close()


def test_batched_greedy_equals_each_request_alone(engine):
    em = engine.em
    reqs = [Request(p, s, GREEDY) for s in subnets(em) for p in PROMPTS]
    started = threading.Event()
    reqs[0].on_text = lambda _: started.set()
    first = [engine.submit(r) for r in reqs[:4]]
    assert started.wait(30)  # the rest join a batch that is already decoding
    results = [f.result(60) for f in first] + engine.generate(reqs[4:])
    assert len({tuple(r.token_ids) for r in results}) > 3  # the budgets and prompts really differ
    for req, res in zip(reqs, results):
        expected = alone(em, req)
        assert res.token_ids == expected
        assert res.text == engine.tokenizer.decode(expected, skip_special_tokens=True)
        assert res.prompt_tokens == len(req.input_ids) and res.completion_tokens == len(expected)


def test_one_at_a_time_gives_the_same_outputs(engine):
    serial = Engine(engine.em, engine.tokenizer, ServeLimits(max_batch=1))
    try:
        reqs = [Request(p, s, GREEDY) for s in subnets(engine.em)[:2] for p in PROMPTS[:3]]
        again = [Request(r.input_ids, r.subnet, GREEDY) for r in reqs]
        assert [r.token_ids for r in serial.generate(reqs)] == [r.token_ids for r in engine.generate(again)]
    finally:
        serial.close()


def test_sampling_settings_are_per_request(engine):
    sub = engine.em.space.full()
    nucleus = Sampling(NEW, temperature=1.0, top_p=0.9, seed=3)
    solo = engine.generate([Request(PROMPTS[0], sub, nucleus)])[0].token_ids
    crowd = [Request(PROMPTS[0], sub, nucleus)] + [
        Request(p, sub, Sampling(NEW, temperature=0.7, seed=i)) for i, p in enumerate(PROMPTS)] + [
        Request(PROMPTS[1], sub, GREEDY)]
    results = engine.generate(crowd)
    assert results[0].token_ids == solo
    assert results[-1].token_ids == alone(engine.em, crowd[-1])  # greedy next to sampled rows


def test_stream_stop_and_finish(engine):
    sub = engine.em.space.full()
    full = engine.generate([Request(PROMPTS[2], sub, GREEDY)])[0]
    stop = full.text.split()[3]
    pieces: list[str] = []
    res = engine.generate([Request(PROMPTS[2], sub, Sampling(NEW, stop=(stop,)), on_text=pieces.append)])[0]
    assert res.text == full.text[:full.text.find(stop)] == "".join(pieces)
    assert res.finish_reason == "stop" and full.finish_reason == "length"


def test_cancel_frees_the_slot(engine):
    sub = engine.em.space.full()
    serial = Engine(engine.em, engine.tokenizer, ServeLimits(max_batch=1))
    try:
        going = threading.Event()
        long = Request(PROMPTS[0], sub, Sampling(200), on_text=lambda _: going.set())
        f_long = serial.submit(long)
        f_next = serial.submit(Request(PROMPTS[1], sub, Sampling(4)))
        assert going.wait(30)
        serial.cancel(long)
        with pytest.raises(Cancelled):
            f_long.result(30)
        assert len(f_next.result(30).token_ids) == 4
    finally:
        serial.close()


def test_logprobs_match_one_forward(engine):
    sub = engine.em.space.uniform(1, 1)
    req = Request(PROMPTS[2], sub, Sampling(5), top_logprobs=3, prompt_logprobs=True)
    res = engine.generate([req])[0]
    ids = req.input_ids + res.token_ids
    with engine.em.subnet(sub), torch.no_grad():
        logp = F.log_softmax(engine.em.model(torch.tensor([ids])).logits[0].float(), -1)
    scored = res.prompt_logprobs + res.logprobs
    assert [t for t, _, _ in scored] == ids and scored[0][1] is None
    for i, (token, lp, top) in enumerate(scored[1:]):
        assert lp == pytest.approx(float(logp[i, token]), abs=1e-4)
        assert [t for t, _ in top] == logp[i].topk(3).indices.tolist()
    echo_only = engine.generate([Request(PROMPTS[2], sub, None, top_logprobs=0, prompt_logprobs=True)])[0]
    assert echo_only.token_ids == [] and echo_only.prompt_logprobs == res.prompt_logprobs[:1] + [
        (t, lp, []) for t, lp, _ in res.prompt_logprobs[1:]]


def test_streamed_logprobs_come_before_their_text(engine):
    """Issue 36 item 16: streaming dropped the logprobs. `on_scored` gets the prompt's after the prefill, then
    before each piece of text the tokens scored since the last one; with the rest in the result, the whole."""
    sub = engine.em.space.full()
    events: list = []
    req = Request(PROMPTS[2], sub, Sampling(NEW, stop=("never",)), top_logprobs=2, prompt_logprobs=True,
                  on_text=lambda t: events.append(t), on_scored=lambda s: events.append(list(s)))
    res = engine.generate([req])[0]
    assert events[0] == res.prompt_logprobs and isinstance(events[1], list)
    streamed = [e for e in events[1:] if isinstance(e, list)]
    pieces = [e for e in events[1:] if isinstance(e, str)]
    assert len(streamed) == len(pieces) and "".join(pieces) == res.text  # each piece after its tokens' logprobs
    assert all(isinstance(a, list) and isinstance(b, str) for a, b in zip(events[1::2], events[2::2]))
    reported = [s for chunk in streamed for s in chunk]
    assert reported == res.logprobs[:len(reported)] and len(reported) >= len(res.logprobs) - 1


def test_queue_and_budget_cache_are_bounded():
    em = make_elastic("llama")
    eng = Engine(em, make_tokenizer(), ServeLimits(max_queue=3, max_budgets=2))
    try:
        eng.reserve(2)
        with pytest.raises(Busy):
            eng.reserve(2)
        eng.release(2)
        eng.reserve(3)
        eng.release(3)
        for b in ("1.0", "0.9", "0.8", "0.7", "0.9"):
            eng.resolve(Budget.parse(b))
        assert list(eng._budgets) == [Budget.parse("0.7"), Budget.parse("0.9")]
    finally:
        eng.close()


def test_adaptive_requests_run_alone_next_to_batched_ones():
    from flextron.adaptive import AdaptiveRouting

    em, tok = with_adaptive_routers(make_elastic("llama")), make_tokenizer()
    eng = Engine(em, tok, ServeLimits(max_batch=8))
    try:
        fraction = eng.adaptive_fraction(Budget.parse("0.5"))
        routed = [Request(p, em.space.full(), GREEDY, adaptive=fraction) for p in PROMPTS[:3]]
        static = [Request(p, em.space.uniform(1, 1), GREEDY) for p in PROMPTS[:3]]
        results = eng.generate([x for pair in zip(routed, static) for x in pair])
        with AdaptiveRouting.for_model(em).attached() as routing:
            for req, res in zip(routed, results[::2]):
                routing.start(fraction, torch.tensor([req.input_ids]))
                out = em.model.generate(torch.tensor([req.input_ids]), max_new_tokens=NEW, do_sample=False,
                                        eos_token_id=stop_token_ids(em.model, tok), pad_token_id=0)
                assert res.token_ids == out[0, len(req.input_ids):].tolist()
        assert [r.token_ids for r in results[1::2]] == [alone(em, r) for r in static]
        assert results[0].token_ids != alone(em, Request(PROMPTS[0], em.space.full(), GREEDY))
    finally:
        eng.close()


def test_mixed_budgets_share_one_decode_step():
    em, tok = make_elastic("llama"), make_tokenizer()
    calls = []
    em.model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                   with_kwargs=True)
    steps = {}
    for mix in (False, True):
        eng = Engine(em, tok, ServeLimits(max_batch=8, mix_budgets=mix))
        reqs = [Request(PROMPTS[0], s, GREEDY) for s in subnets(em)]
        gate = threading.Event()
        reqs[0].on_text = lambda _, gate=gate: gate.wait(30)  # hold the engine until all three are queued
        futures = [eng.submit(r) for r in reqs]
        gate.set()
        tokens = [f.result(60).token_ids for f in futures]
        eng.close()
        steps[mix] = sum(shape[1] == 1 for shape in calls)  # decode steps (one new token per row)
        assert tokens == [alone(em, r) for r in reqs]
        calls.clear()
    assert steps[True] * 2 < steps[False]  # one step for all three budgets, not one per budget


def test_no_budget_means_the_full_model_whatever_the_routers_pick_at_100(monkeypatch):
    """A request without a budget runs the full model (labelled "full"), as `generate` does; a routed
    checkpoint's router at 100 % may pick less, which only an explicit budget of 1.0 gets."""
    from flextron.cost import subnet_cost
    from flextron.protocol import Protocol

    em, tok = make_elastic("llama"), make_tokenizer()
    monkeypatch.setattr("flextron.engine.select_subnet", lambda em, budget: em.space.smallest())
    engine = Engine(em, tok, ServeLimits(), start=False)
    assert engine.resolve(Budget.parse(1.0))[0] == em.space.smallest()
    protocol = Protocol(tok, "m", None, em.config.vocab_size, ServeLimits(), engine.resolve)
    budget, subnet, cost, _ = protocol.resolve(None)
    assert budget is None and subnet == em.space.full() and cost == subnet_cost(em)
    assert protocol.resolve("1.0")[1] == em.space.smallest()
