"""Fixtures shared by the test modules; the plain helpers they build on live in helpers.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from flextron.checkpoint import save_checkpoint
from helpers import FAMILY_KINDS, make_bpe_tokenizer, make_elastic, make_model, make_tokenizer, word_text


@pytest.fixture(params=FAMILY_KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """A saved tiny Llama-GQA model directory with a tokenizer, and a calibration text file."""
    model_dir = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text(word_text(4000))
    return model_dir, text


@pytest.fixture
def elastic_ckpt(tmp_path) -> Callable[..., Path]:
    """A factory of checkpoints: `elastic_ckpt(kind="llama", name="ckpt", bpe=False, **options)` saves
    `make_elastic(kind, **options)` (seed, n_layers, min_layers, attn_unit) with the word-level tokenizer,
    or with `bpe` the byte-level BPE that llama.cpp can run, as `tmp_path / name` and returns that path."""

    def write(kind: str = "llama", *, name: str = "ckpt", bpe: bool = False, **options) -> Path:
        tokenizer = make_bpe_tokenizer() if bpe else make_tokenizer()
        return save_checkpoint(make_elastic(kind, **options), tokenizer, tmp_path / name, {"source_model": "tiny"})

    return write


@pytest.fixture(scope="session")
def trained_routers():
    """A tiny elastic model with static routers trained on it (100 steps, budgets 40-100 % of the
    parameters), the routers, their training log and the tokenizer; trained once for the session
    (test_routers and test_train_routers). Tests that change the model put it back."""
    from flextron.data import PackedSequences, tokenize
    from flextron.elastic import ElasticModel
    from flextron.options import RouteOptions
    from flextron.train.routers import train_routers

    em = make_elastic()
    teacher = ElasticModel(make_model("llama"))  # the original, as `flextron route` uses it
    teacher.requires_grad_(False)
    tok = make_tokenizer()
    data = PackedSequences(tokenize(tok, word_text(3000)), 16, seed=0)
    # Tiny random models tell architectures apart only a little: a loose threshold lets the
    # surrogate guide some steps and not others (its error hovers around 0.3-0.5 here).
    cfg = RouteOptions(budgets=(0.4, 0.6, 0.8, 1.0), metric="params", steps=100, joint_steps=4, seq_len=16,
                       micro_batch=2, dtype="fp32", router_lr=1e-2, surrogate=True, surrogate_warmup=32,
                       surrogate_threshold=0.4)
    routers, log = train_routers(em, teacher, data, cfg, progress=False)
    em.routers = routers
    return em, routers, log, tok
