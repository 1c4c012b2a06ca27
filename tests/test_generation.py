import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import _LLAMA_LIKE, VOCAB, make_tokenizer
from flextron.errors import FlextronError
from flextron.generation import complete, prompt_inputs


@pytest.fixture(scope="module")
def short_model():
    """A tiny Llama with a 32-token context whose end-of-text id never comes, so only limits stop it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**_LLAMA_LIKE, "max_position_embeddings": 32})).eval()
    model.generation_config.eos_token_id = VOCAB
    return model, make_tokenizer()


def prompt(tok, n: int) -> dict:
    return prompt_inputs(tok, " ".join(f"w{i}" for i in range(n)), raw=True)


def test_new_tokens_are_bounded_by_the_context(short_model):
    model, tok = short_model
    c = complete(model, tok, prompt(tok, 10), max_new_tokens=100_000)
    assert (c.prompt_tokens, c.completion_tokens, c.finish_reason) == (10, 22, "length")


def test_a_prompt_filling_the_context_is_refused(short_model):
    model, tok = short_model
    with pytest.raises(FlextronError, match="the prompt has 32 tokens, the model's whole context of 32"):
        complete(model, tok, prompt(tok, 32), max_new_tokens=1)


@pytest.mark.parametrize("options, message", [
    ({"temperature": float("nan")}, "--temperature must be a finite number"),
    ({"temperature": float("inf")}, "--temperature must be a finite number"),
    ({"temperature": -1.0}, r"--temperature must be in \[0, inf\]"),
    ({"top_p": 0.0}, r"--top-p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
    ({"top_p": float("nan")}, "--top-p must be a finite number"),
    ({"max_new_tokens": -1}, r"--max-new-tokens must be in \[1, inf\]"),
    ({"max_new_tokens": 2.5}, "--max-new-tokens must be an integer"),
    ({"top_k": 5}, "unknown option top_k; Sampling has max_new_tokens, temperature, top_p, seed"),
])
def test_sampling_parameters_are_validated(short_model, options, message):
    model, tok = short_model
    with pytest.raises(FlextronError, match=message):
        complete(model, tok, prompt(tok, 3), **{"max_new_tokens": 4, **options})
