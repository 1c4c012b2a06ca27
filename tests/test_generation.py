"""`flextron generate` on the one decoder (the engine) against transformers' own greedy `generate`; the
context limit, the sampling settings, and stop strings matched as the text streams."""

import dataclasses
import json
import random
import time

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from flextron import api
from flextron.budgets import select_subnet
from flextron.checkpoint import save_checkpoint
from flextron.elastic import ElasticModel
from flextron.engine import Engine, Request
from flextron.errors import FlextronError
from flextron.generation import StopFilter, cut_at_stop, prompt_inputs
from flextron.options import MAX_STOP_CHARS, Sampling, resolve
from flextron.space import Budget
from helpers import (
    FAMILY_KINDS,
    LLAMA_LIKE,
    VOCAB,
    hf_greedy,
    make_elastic,
    make_model,
    make_tokenizer,
    with_adaptive_routers,
)

TEMPLATE = ("{% for m in messages %}w1 {{ m['content'] }} w2{% endfor %}"
            "{% if add_generation_prompt %} w3{% endif %}")


# qwen2's own tokenizer class reloads the word-level test tokenizer as one that splits no words.
@pytest.mark.parametrize("kind", [k for k in FAMILY_KINDS if k != "qwen2"])
def test_generate_is_transformers_greedy_on_an_hf_model(kind, tmp_path):
    model = make_model(kind).eval()
    model.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    streamed: list[str] = []
    got = api.generate(tmp_path, "w5 w6 w7", raw=True, max_new_tokens=12, device="cpu", stream=streamed.append)
    assert got == hf_greedy(model, AutoTokenizer.from_pretrained(tmp_path), "w5 w6 w7", 12) and got
    assert "".join(streamed) == got


def test_generate_at_a_budget_in_the_chat_template_is_transformers_greedy(tmp_path):
    em, tok = make_elastic("llama"), make_tokenizer()
    tok.chat_template = TEMPLATE
    ckpt = save_checkpoint(em, tok, tmp_path / "ckpt", {})
    with em.subnet(select_subnet(em, Budget.parse("0.5"))):
        expected = hf_greedy(em.model, tok, "w5 w6", 10, raw=False)
    with em.subnet(None):
        full = hf_greedy(em.model, tok, "w5 w6", 10, raw=False)
    assert api.generate(ckpt, "w5 w6", budget="0.5", max_new_tokens=10, device="cpu") == expected != full


def test_adaptive_generate_is_transformers_greedy_with_the_routing_attached(tmp_path):
    from flextron.adaptive import AdaptiveRouting

    em, tok = with_adaptive_routers(make_elastic("llama")), make_tokenizer()
    em.routers.adaptive_config = dataclasses.replace(em.routers.config, hidden=16)  # as `route --adaptive` records
    ckpt = save_checkpoint(em, tok, tmp_path / "ckpt", {})
    routing = AdaptiveRouting.for_model(em)
    with routing.attached():
        routing.start(routing.fraction(Budget.parse("0.5")), prompt_inputs(tok, "w5 w6")["input_ids"])
        expected = hf_greedy(em.model, tok, "w5 w6", 10)
    assert api.generate(ckpt, "w5 w6", budget="0.5", adaptive=True, max_new_tokens=10, device="cpu") == expected
    assert expected != api.generate(ckpt, "w5 w6", budget="0.5", max_new_tokens=10, device="cpu")


def test_tiny_temperatures_decode_greedily_and_seeds_repeat(tmp_path):
    """Issue 36 item 6: softmax(logits / 1e-300) overflowed, and `generate` died with a traceback."""
    model = make_model("llama").eval()
    model.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    greedy = hf_greedy(model, AutoTokenizer.from_pretrained(tmp_path), "w5 w6", 8)
    for t in (1e-300, 5e-324, 1e-40):
        assert api.generate(tmp_path, "w5 w6", raw=True, max_new_tokens=8, temperature=t, device="cpu") == greedy
    sampled = [api.generate(tmp_path, "w5 w6", raw=True, max_new_tokens=8, temperature=1.0, seed=3, device="cpu")
               for _ in range(2)]
    assert sampled[0] == sampled[1] != greedy


@pytest.fixture(scope="module")
def short_engine():
    """An engine over a tiny Llama with a 32-token context whose end-of-text id never comes, so only limits stop it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_LIKE, "max_position_embeddings": 32})).eval()
    model.generation_config.eos_token_id = VOCAB
    em = ElasticModel(model)
    engine = Engine(em, make_tokenizer())
    yield engine, em.space.full()
    engine.close()


def test_new_tokens_are_bounded_by_the_context(short_engine):
    engine, full = short_engine
    (r,) = engine.generate([Request(list(range(5, 15)), full, Sampling(max_new_tokens=100_000))])
    assert (r.prompt_tokens, r.completion_tokens, r.finish_reason) == (10, 22, "length")


def test_a_prompt_filling_the_context_is_refused(short_engine):
    engine, full = short_engine
    with pytest.raises(FlextronError, match="the prompt has 32 tokens, the model's whole context of 32"):
        engine.submit(Request(list(range(5, 37)), full, Sampling(max_new_tokens=1)))
    with pytest.raises(FlextronError, match="the prompt is empty after tokenization"):
        engine.submit(Request([], full))


@pytest.mark.parametrize("options, message", [
    ({"temperature": float("nan")}, "--temperature must be a finite number"),
    ({"temperature": float("inf")}, "--temperature must be a finite number"),
    ({"temperature": -1.0}, r"--temperature must be in \[0, inf\]"),
    ({"top_p": 0.0}, r"--top-p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
    ({"top_p": float("nan")}, "--top-p must be a finite number"),
    ({"max_new_tokens": -1}, r"--max-new-tokens must be in \[1, inf\]"),
    ({"max_new_tokens": 2.5}, "--max-new-tokens must be an integer"),
    ({"seed": -1}, "--seed must be in"),
    ({"stop": ("a",) * 5}, "--stop takes at most 4 strings"),
    ({"stop": ("z" * (MAX_STOP_CHARS + 1),)}, f"of at most {MAX_STOP_CHARS} characters each"),
    ({"top_k": 5}, "unknown option top_k; Sampling has max_new_tokens, temperature, top_p, seed, stop"),
])
def test_sampling_parameters_are_validated(options, message):
    with pytest.raises(FlextronError, match=message):
        resolve(Sampling, None, {"max_new_tokens": 4, **options})


def test_stop_filter_passes_on_the_text_up_to_the_first_stop():
    """Whatever the pieces, what is passed on is the text up to the first stop string in the text so far."""
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 24)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(1, 4))]
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1)) // 2)) if text else []
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        out: list[str] = []
        f = StopFilter(stops, out.append)
        seen, expected = "", None
        for piece in pieces:
            f(piece)
            seen += piece
            head, hit = cut_at_stop(seen, stops)
            if hit and expected is None:
                expected = head
            assert f.stopped == (expected is not None)
            assert "".join(out) == expected if f.stopped else seen.startswith("".join(out))
        f.flush()
        assert "".join(out) == (text if expected is None else expected), (text, stops, pieces)


def test_stop_filter_time_is_linear_in_the_stop_strings():
    """Issue 36 item 3: every piece rescanned the held-back text for every prefix of every stop string,
    quadratic in their length: four long ones stalled the engine for seconds per token."""
    stops = ["z" * 100_000 + end for end in "!?.,"]
    out: list[str] = []
    began = time.perf_counter()
    f = StopFilter(stops, out.append)
    for _ in range(10):
        f("z")  # could be the start of every stop string: held back
    held = list(out)
    f("?")  # "z" * 10 + "?" starts no stop string
    took = time.perf_counter() - began
    assert held == [] and "".join(out) == "z" * 10 + "?" and not f.stopped
    assert took < 2, f"{took:.1f} s"  # the old filter took about a second per piece here


@pytest.mark.parametrize("template, why", [
    ("{{ raise_exception('roles must alternate user/assistant') }}", "TemplateError: roles must alternate"),
    ("{{ no_such_function() }}", "UndefinedError: 'no_such_function' is undefined"),
    ("{{ [].append(1) }}", "SecurityError: access to attribute 'append'"),
    ("{{ 1 + 'a' }}", "TypeError: unsupported operand"),
])
def test_a_failing_chat_template_is_one_line_naming_it(template, why, tmp_path):
    """Issue 36 item 10: the template's own errors (raise_exception, undefined names, the sandbox's
    SecurityError, any other) were tracebacks."""
    make_model("llama").save_pretrained(tmp_path)
    tok = make_tokenizer()
    tok.chat_template = template
    tok.save_pretrained(tmp_path)
    with pytest.raises(FlextronError) as e:
        api.generate(tmp_path, "w5 w6", max_new_tokens=2, device="cpu")
    message = str(e.value)
    assert message.startswith(f"the chat template of {tmp_path} ") and why in message and "\n" not in message
    assert message.endswith("pass --raw to send the prompt without it")
    assert api.generate(tmp_path, "w5 w6", raw=True, max_new_tokens=2, device="cpu")  # as the message says


@pytest.mark.parametrize("eos", ["abc", ["abc"], [1, "x"], -5, 1.5, True, {"a": 1}])
def test_an_eos_token_id_that_is_not_a_token_id_is_one_line_naming_the_file(eos, tmp_path):
    """Issue 36 item 10: `"eos_token_id": "abc"` was taken as an end-of-text token no model emits (a dict, a
    TypeError traceback)."""
    make_model("llama").save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    config = tmp_path / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "eos_token_id": eos}))
    with pytest.raises(FlextronError) as e:
        api.generate(tmp_path, "w5 w6", raw=True, max_new_tokens=2, device="cpu")
    assert str(e.value) == (f"eos_token_id {json.dumps(eos)} in {tmp_path / 'generation_config.json'} (or config.json) "
                            "is not a token id (an integer from 0, or a list of them); fix or remove it")
