import json

import pytest
import torch

from flextron import api, samples
from flextron.chat import conversation_tokens, teacher_conversations
from flextron.errors import FlextronError
from flextron.options import Sampling
from flextron.samples import model_id, own_text, own_tokens, start_token
from helpers import TINY_TEMPLATE, make_elastic, make_tokenizer


def test_own_text_is_the_models_continuation_of_its_start_token(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(samples, "SAMPLING", Sampling(temperature=0.0))  # greedy: one answer, transformers' own
    em, tok = make_elastic(), make_tokenizer()
    start = start_token(tok)
    assert start == tok.eos_token_id  # this tokenizer has no beginning-of-text token
    with torch.no_grad():
        ids = em.model.generate(torch.tensor([[start]]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, 1, dtype=torch.long))
    expected = tok.decode(ids[0, 1:], skip_special_tokens=True).strip()
    text = own_text(em, tok, "m", tokens=12, seq_len=6, seed=0, batch=2, progress=False)
    pieces = text.split("\n\n")
    assert len(pieces) == 2 and all(p.strip() == expected for p in pieces)


def test_own_text_is_seeded_per_sample_cached_and_extended(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    em, tok = make_elastic(), make_tokenizer()
    first = own_text(em, tok, "m", tokens=26, seq_len=8, seed=0, batch=4, progress=False)
    pieces = first.split("\n\n")
    assert len(pieces) >= 3 and len(set(pieces)) == len(pieces)  # each sample has its own seed
    (cache,) = (tmp_path / "flextron" / "samples").glob("*.jsonl")
    assert len(cache.read_text().splitlines()) == 4  # one batch sufficed, sized to the tokens asked
    assert all(len(tok(p, add_special_tokens=False)["input_ids"]) <= 8 for p in pieces)
    assert own_text(em, tok, "m", 26, 8, seed=1, batch=4, progress=False) != first
    monkeypatch.setattr("flextron.samples.Engine.generate", lambda *a: pytest.fail("generated again"))
    assert own_text(em, tok, "m", 26, 8, seed=0, batch=4, progress=False) == first
    assert own_text(em, tok, "m", 5, 8, seed=0, batch=4, progress=False) == pieces[0]  # fewer tokens: a prefix
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    more = own_text(em, tok, "m", 60, 8, seed=0, batch=4, progress=False)
    assert more.startswith(first) and len(more.split("\n\n")) > len(pieces)
    assert len(cache.read_text().splitlines()) > 4 and len(list(cache.parent.glob("*.jsonl"))) == 2  # and seed 1's
    other = make_elastic(seed=1)
    assert model_id(other) != model_id(em)
    assert own_text(other, tok, model_id(other), 26, 8, seed=0, batch=4, progress=False) != first


def test_a_tokenizer_without_start_or_end_token_is_refused():
    tok = make_tokenizer()
    tok.eos_token = None
    with pytest.raises(FlextronError, match="--calib-data FILE.txt"):
        start_token(tok)


def test_convert_calibrates_on_the_models_own_text(tiny_hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model_dir, _ = tiny_hf_dir
    options = {"calib_sequences": 4, "calib_seq_len": 16, "multiple": 8, "device": "cpu", "progress": False}
    own = api.convert(str(model_dir), tmp_path / "own", calib_data="self", **options)
    manifest = json.loads((own / "flextron.json").read_text())
    assert manifest["calibration"]["source"] == "self"
    # The same as calibrating on a file holding the samples the model wrote (cached once).
    (cache,) = (tmp_path / "cache" / "flextron" / "samples").glob("*.jsonl")
    text = tmp_path / "own.txt"
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    used = next(n for n in range(len(rows) + 1) if sum(r["tokens"] for r in rows[:n]) >= 4 * 16)
    text.write_text("\n\n".join(r["text"] for r in rows[:used] if r["text"].strip()))
    from_file = api.convert(str(model_dir), tmp_path / "file", calib_data=str(text), **options)
    assert json.loads((from_file / "flextron.json").read_text())["importance"] == manifest["importance"]


def test_a_chat_model_calibrates_on_its_answers_too(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    em, tok = make_elastic(), make_tokenizer()
    plain = own_tokens(em, tok, 64, 8, seed=0, progress=False)
    tok.chat_template = TINY_TEMPLATE
    monkeypatch.setattr("flextron.samples.packaged_prompts", lambda split: [f"w{i} w{i + 1}" for i in range(30)])
    ids = own_tokens(em, tok, 64, 8, seed=0, progress=False)
    answers = teacher_conversations(em, tok, [f"w{i} w{i + 1}" for i in range(30)], model_id(em), 16,
                                    Sampling(max_new_tokens=128), progress=False)
    chat = conversation_tokens(tok, answers)[0]
    assert ids[-len(chat):].tolist() == chat.tolist()  # a quarter of the tokens: its answers, in its template
    own = ids[: len(ids) - len(chat)]
    assert 48 <= len(own) < len(plain) and plain[: len(own)].tolist() == own.tolist()
