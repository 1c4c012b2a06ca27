"""The OpenAI protocol without sockets: bodies into jobs, results into responses."""

from __future__ import annotations

import json

import pytest

from conftest import make_elastic, make_tokenizer
from flextron import protocol as op
from flextron.budgets import select_subnet
from flextron.config import Budget
from flextron.cost import subnet_cost
from flextron.engine import Engine, Result
from flextron.protocol import Protocol, RequestError, ServeConfig
from test_engine import with_adaptive_routers


@pytest.fixture(scope="module")
def protocol():
    em, tok = make_elastic("llama"), make_tokenizer()

    def resolve(b: Budget | None):  # as Engine.resolve: None is the full model
        s = em.space.full() if b is None else select_subnet(em, b)
        return s, subnet_cost(em, s)

    config = ServeConfig(max_prompt_tokens=64, max_tokens=32, default_max_tokens=8)
    return Protocol(tok, "ckpt", 256, 128, config, resolve), em


def refused(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*args)
    return e.value


def test_model_names_carry_budgets(protocol):
    p, em = protocol
    assert op.split_model("ckpt", "ckpt") is None and op.split_model("ckpt@50%", "ckpt") == "50%"
    assert op.split_model("ckpt@params=80e6", "ckpt") == "params=80e6"
    for bad in ("gpt-4", "ckpt@", "other@50%"):
        assert refused(op.split_model, bad, "ckpt").status == 404
    job = p.parse({"model": "ckpt@50%", "prompt": "w5 w6"}, chat=False)
    assert job.budget == Budget.parse("50%") and job.subnet == select_subnet(em, Budget.parse("0.5"))
    assert job.envelope([])["flextron"]["subnet"] == job.subnet.to_dict()
    assert p.parse({"model": "ckpt", "prompt": "w5", "budget": 0.5}, False).subnet == job.subnet
    assert refused(p.parse, {"model": "ckpt@50%", "prompt": "w5", "budget": 0.5}, False).param == "budget"
    assert refused(p.parse, {"model": "ckpt@lots", "prompt": "w5"}, False).code == "invalid_budget"


def test_bodies_that_are_not_json_objects():
    assert op.parse_json(b'{"a": ["\\u00e9"]}') == {"a": ["\u00e9"]}
    for data in (b"[" * 200_000, b'{"prompt": "\\ud800"}', b"\xff", b"[]", b"{"):
        assert refused(op.parse_json, data).code == "invalid_json"


def test_prompt_forms(protocol):
    p, _ = protocol
    assert p.parse({"prompt": [5, 6, 7]}, False).prompts == [[5, 6, 7]]
    job = p.parse({"prompt": ["w5 w6", [9, 10]]}, False)
    assert job.prompts == [[7, 8], [9, 10]] and job.texts == ["w5 w6", "w7 w8"]
    assert op.count_prompts({"prompt": ["a", "b", "c"]}, False) == 3
    assert op.count_prompts({"prompt": [1, 2]}, False) == 1
    assert op.count_prompts({"messages": []}, True) == 1
    assert refused(p.parse, {"prompt": [5, 500]}, False).param == "prompt"
    assert refused(p.parse, {"prompt": [[5], "a", 3]}, False).param == "prompt"
    assert refused(p.parse, {"prompt": ["a", "b"], "stream": True}, False).param == "stream"
    assert refused(p.parse, {"prompt": [5] * 65}, False).code == "context_length_exceeded"


def test_logprobs_and_echo(protocol):
    p, _ = protocol
    assert refused(p.parse, {"prompt": "w5", "max_tokens": 0}, False).param == "max_tokens"
    job = p.parse({"prompt": [5, 6], "max_tokens": 0, "echo": True, "logprobs": 1}, False)
    (req,) = job.requests()
    assert req.max_new_tokens == 0 and req.prompt_logprobs and req.top_logprobs == 1
    assert refused(p.parse, {"messages": [{"role": "user", "content": "w5"}], "logprobs": True}, True).param
    assert refused(p.parse, {"prompt": "w5", "logprobs": 21}, False).param == "logprobs"
    result = Result(" w9", [11], 2, 1, "length", logprobs=[(11, -0.5, [(11, -0.5)])],
                    prompt_logprobs=[(5, None, []), (6, -2.0, [(7, -1.0)])])
    job = p.parse({"prompt": "w3 w4", "max_tokens": 1, "echo": True, "logprobs": 1}, False)
    choice = op.completion_choice(job, p.tokenizer, 0, result)
    assert choice["text"] == "w3 w4 w9"
    assert choice["logprobs"] == {"tokens": ["w3", "w4", "w9"], "token_logprobs": [None, -2.0, -0.5],
                                  "top_logprobs": [None, {"w5": -1.0}, {"w9": -0.5}], "text_offset": [0, 2, 4]}
    json.dumps(choice)


def test_models_list_the_trained_budgets(protocol):
    p, em = protocol
    listing = p.models(em.space.to_dict(), ("params", (0.5, 1.0)))
    assert [m["id"] for m in listing["data"]] == ["ckpt", "ckpt@params=50%", "ckpt@params=100%"]
    assert p.models({}, None)["data"][0]["max_model_len"] == 256
    for name in [m["id"] for m in listing["data"]][1:]:
        assert p.parse({"model": name, "prompt": "w5"}, False).budget is not None


def test_adaptive_routing_is_asked_for_explicitly(protocol):
    p, _ = protocol
    assert refused(p.parse, {"prompt": "w5", "adaptive": True}, False).code == "invalid_budget"
    em = with_adaptive_routers(make_elastic("llama"))
    engine = Engine(em, p.tokenizer)
    try:
        routed = Protocol(p.tokenizer, "ckpt", 256, 128, p.config, engine.resolve, engine.adaptive_fraction)
        job = routed.parse({"model": "ckpt@params=50%", "prompt": "w5", "adaptive": True}, False)
        assert job.adaptive == pytest.approx(0.5) and job.requests()[0].adaptive == job.adaptive
        assert job.envelope([])["flextron"] == {"budget": "params=50%", "adaptive": True, "fraction": job.adaptive}
        assert routed.parse({"prompt": "w5"}, False).adaptive is None
    finally:
        engine.close()
