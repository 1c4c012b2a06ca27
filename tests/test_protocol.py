"""The OpenAI protocol without sockets: bodies into jobs, results into responses."""

from __future__ import annotations

import json
import time

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from flextron import protocol as op
from flextron.budgets import select_subnet
from flextron.cost import subnet_cost
from flextron.engine import Engine, Result
from flextron.options import MAX_STOP_CHARS, Sampling
from flextron.protocol import Protocol, RequestError, ServeLimits
from flextron.space import Budget
from helpers import TEMPLATE, make_bpe_tokenizer, make_elastic, make_tokenizer, with_adaptive_routers


@pytest.fixture(scope="module")
def protocol():
    em, tok = make_elastic("llama"), make_tokenizer()

    def resolve(b: Budget | None):  # as Engine.resolve: None is the full model
        s = em.space.full() if b is None else select_subnet(em, b)
        return s, subnet_cost(em, s)

    config = ServeLimits(max_prompt_tokens=64, max_tokens=32, default_max_tokens=8)
    return Protocol(tok, "ckpt", 256, 128, config, resolve), em


def refused(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*args)
    return e.value


def test_model_names_carry_budgets(protocol):
    p, em = protocol
    assert op.split_model("ckpt", "ckpt") is None and op.split_model("ckpt@50%", "ckpt") == "50%"
    assert op.split_model("ckpt@params=80e6", "ckpt") == "params=80e6"
    for bad in ("gpt-4", "ckpt@", "other@50%", "ckpt@50% ", "ckpt@ 50%", "ckpt @50%"):
        assert refused(op.split_model, bad, "ckpt").status == 404
    # A served name may hold an @ itself (serve --name my@model): it is served, and so are its budgets.
    assert op.split_model("my@model", "my@model") is None and op.split_model("my@model@50%", "my@model") == "50%"
    assert refused(op.split_model, "my@50%", "my@model").status == 404
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
    assert req.sampling is None and req.prompt_logprobs and req.top_logprobs == 1
    assert refused(p.parse, {"messages": [{"role": "user", "content": "w5"}], "logprobs": True}, True).param
    assert refused(p.parse, {"prompt": "w5", "logprobs": 21}, False).param == "logprobs"
    result = Result(" w9", [11], 2, 1, "length", logprobs=[(11, -0.5, [(11, -0.5)])],
                    prompt_logprobs=[(5, None, []), (6, -2.0, [(7, -1.0)])])
    job = p.parse({"prompt": "w3 w4", "max_tokens": 1, "echo": True, "logprobs": 1}, False)
    choice = op.completion_choice(job, p.tokenizer, 0, result)
    assert choice["text"] == "w3 w4 w9"
    # Each token's text as it reads in its sequence (the space before "w4"), the prompt's and the completion's.
    assert choice["logprobs"] == {"tokens": ["w3", " w4", "w9"], "token_logprobs": [None, -2.0, -0.5],
                                  "top_logprobs": [None, {"w5": -1.0}, {"w9": -0.5}], "text_offset": [0, 2, 5]}
    json.dumps(choice)
    assert refused(p.parse, {"prompt": "w5", "best_of": 2}, False).param == "best_of"  # refused as n is
    assert p.parse({"prompt": "w5", "best_of": 1}, False).prompts == [[7]]


def test_sampling_settings_become_one_sampling(protocol):
    p, _ = protocol
    job = p.parse({"prompt": "w5", "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "seed": -1, "stop": "w7"}, False)
    assert job.sampling == Sampling(max_new_tokens=3, temperature=0.5, top_p=0.9, seed=2**64 - 1, stop=("w7",))
    assert job.requests()[0].sampling == job.sampling
    assert p.parse({"prompt": "w5"}, False).sampling == Sampling(max_new_tokens=8, temperature=1.0)


def test_stop_strings_are_bounded(protocol):
    """Issue 36 item 3: four stop strings of 240000 characters stalled the engine for every request."""
    p, _ = protocol
    longest = ["z" * MAX_STOP_CHARS] * 4
    assert p.parse({"prompt": "w5", "stop": longest}, False).sampling.stop == tuple(longest)
    for stop in (["z" * (MAX_STOP_CHARS + 1)], ["w5", "z" * 240_000], ["a"] * 5):
        e = refused(p.parse, {"prompt": "w5", "stop": stop}, False)
        assert (e.status, e.code, e.param) == (400, "invalid_value", "stop")
    assert str(refused(p.parse, {"prompt": "w5", "stop": ["z" * 240_000]}, False)) == (
        f"each 'stop' string may be at most {MAX_STOP_CHARS} characters long")


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


def byte_level_tokenizer(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """A byte-level BPE with a token for every byte, and `merges` (bytes as GPT-2 spells them): every text is
    tokens, none dropped; a character of several bytes may take several tokens."""
    b2u = bytes_to_unicode()
    vocab = {"<|endoftext|>": 0, **{b2u[b]: b + 1 for b in range(256)}}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def utf8(text: str) -> str:
    """`text`'s bytes as a byte-level BPE spells them."""
    b2u = bytes_to_unicode()
    return "".join(b2u[b] for b in text.encode())


# "é" one token; "’" (3 bytes) as 2 + 1 bytes; "😀" (4 bytes) as 4 tokens of one byte.
MERGES = [("Ã", "©"), (utf8("’")[0], utf8("’")[1]), ("c", "a"), ("ca", "f")]


def test_logprobs_tokens_add_up_to_non_ascii_text():
    """Issue 36 item 16: tokens of a character of several bytes each decoded to U+FFFD, so the echoed tokens
    did not add up to the text, and alternatives that are parts of characters shared one key."""
    tok = byte_level_tokenizer(MERGES)
    config = ServeLimits(max_prompt_tokens=64, max_tokens=32, default_max_tokens=8)
    em = make_elastic("llama")
    p = Protocol(tok, "ckpt", 256, len(tok), config, lambda b: (em.space.full(), subnet_cost(em, em.space.full())))
    prompt, completion = "café ’x 😀 naïve", " ’😀é"
    job = p.parse({"prompt": prompt, "max_tokens": 8, "echo": True, "logprobs": 2}, False)
    ids, new = job.prompts[0], tok(completion)["input_ids"]
    assert len(ids) > len(prompt) - 6  # the multi-byte characters take several tokens
    parts = tok(utf8("’") + utf8("😀"), add_special_tokens=False)  # parts of characters as alternatives
    top = [(parts["input_ids"][0], -1.0), (tok.convert_tokens_to_ids(utf8("😀")[0]), -2.0)]
    result = Result(completion, new, len(ids), len(new), "length", logprobs=[(t, -1.0, top) for t in new],
                    prompt_logprobs=[(ids[0], None, [])] + [(t, -1.0, top) for t in ids[1:]])
    choice = op.completion_choice(job, tok, 0, result)
    text, logprobs = choice["text"], choice["logprobs"]
    assert text == prompt + completion and len(logprobs["tokens"]) == len(ids) + len(new)
    assert "".join(logprobs["tokens"]) == text and "\ufffd" not in text
    assert "" in logprobs["tokens"]  # a token ending inside a character; the next one gives it whole
    assert all(text[at:at + len(t)] == t for t, at in zip(logprobs["tokens"], logprobs["text_offset"]))
    assert all(len(alternatives) == 2 for alternatives in logprobs["top_logprobs"][1:])

    # Streamed chunk by chunk (as the engine passes text on: whole characters), the same logprobs.
    shaper = op.ChoiceLogprobs(tok)
    chunks = [shaper.prompt(result.prompt_logprobs)] + [shaper.completion(result.logprobs[i:j], final=j == len(new))
                                                         for i, j in ((0, 1), (1, 4), (4, len(new)))]
    assert {key: [v for c in chunks for v in c[key]] for key in chunks[0]} == logprobs


def test_over_long_text_is_refused_before_tokenizing():
    """Issue 36 item 14: a prompt of megabytes was tokenized before it was refused. Where every token stands
    for a bounded number of characters, a text with more than the prompt limit of them is refused unread."""
    tok = byte_level_tokenizer(MERGES)
    assert op.max_token_chars(tok) == len("<|endoftext|>")  # the longest piece
    assert op.max_token_chars(make_tokenizer()) is None  # word-level: an unknown word of any length is one token
    assert op.max_token_chars(make_bpe_tokenizer()) is None  # no token for most bytes: their text is dropped
    config = ServeLimits(max_prompt_tokens=64, max_tokens=32, default_max_tokens=8)
    em = make_elastic("llama")
    p = Protocol(tok, "ckpt", 4096, len(tok), config, lambda b: (em.space.full(), subnet_cost(em, em.space.full())))
    longest = "<|endoftext|>" * 64  # as many characters as 64 tokens can hold: tokenized, and it fits
    assert p.parse({"prompt": longest, "max_tokens": 1}, False).prompts == [[0] * 64]
    e = refused(p.parse, {"prompt": longest + "x", "max_tokens": 1}, False)
    assert (e.code, e.param) == ("context_length_exceeded", "prompt")
    assert str(e) == ("the prompt has 833 characters, more than this server's limit of 64 tokens can hold "
                      "(one token stands for at most 13 characters here)")
    began = time.perf_counter()
    e = refused(p.parse, {"prompt": "ab " * 3_000_000, "max_tokens": 1}, False)
    assert "9000000 characters" in str(e) and time.perf_counter() - began < 1  # tokenizing it takes seconds


@pytest.mark.parametrize("content", ["raise", "undefined", "unsafe", "type"])
def test_a_failing_chat_template_is_a_400(protocol, content):
    """Issue 36 item 10: a chat template's TypeError (any error but jinja's own) was a 500."""

    p, _ = protocol
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    templated = Protocol(tok, "ckpt", 256, 128, p.config, p._resolve)
    e = refused(templated.parse, {"messages": [{"role": "user", "content": content}]}, True)
    assert (e.status, e.param) == (400, "messages") and str(e).startswith("cannot build the prompt: the chat template")
    assert str(e).endswith("send a plain text prompt instead")
    assert templated.parse({"messages": [{"role": "user", "content": "w5"}]}, True).prompts == [[3, 7, 4, 5]]
