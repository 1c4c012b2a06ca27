"""Chat-format data: prompt sets, rendering with an assistant mask, the teacher's cached answers."""

import json

import pytest
import torch

from flextron.assets import default_model_dir
from flextron.chat import (
    conversation_tokens,
    packaged_prompts,
    read_conversations,
    read_prompts,
    render,
    teacher_conversations,
)
from flextron.errors import FlextronError
from flextron.options import Sampling
from helpers import TINY_TEMPLATE, make_elastic, make_tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "Six."}]


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())


def test_render_gives_the_templates_own_tokens_and_marks_the_assistants_replies(smol_tok):
    ids, mask = render(smol_tok, CONVERSATION)
    reference = smol_tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert smol_tok.decode(ids) == reference
    assert ids == smol_tok(reference, add_special_tokens=False)["input_ids"]
    marked = smol_tok.decode([i for i, m in zip(ids, mask) if m])
    assert marked == "It is 4.<|im_end|>\nSix.<|im_end|>\n"  # the replies with their end-of-turn marks


def test_a_template_that_rewrites_earlier_turns_is_refused(smol_tok):
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}{% if loop.last %}w3 {% endif %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(FlextronError, match="chat-loss all"):
        render(tok, [{"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6"}])
    with pytest.raises(FlextronError, match="no chat template"):
        conversation_tokens(make_tokenizer(), [CONVERSATION])


def test_conversations_pack_back_to_back_with_or_without_the_mask(smol_tok):
    ids, mask = conversation_tokens(smol_tok, [CONVERSATION, CONVERSATION[1:3]], assistant_only=True)
    one, one_mask = render(smol_tok, CONVERSATION)
    assert ids.tolist()[: len(one)] == one and mask.tolist()[: len(one)] == one_mask
    assert smol_tok.decode(ids[len(one):]) == smol_tok.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    plain, none = conversation_tokens(smol_tok, [CONVERSATION, CONVERSATION[1:3]])
    assert none is None and plain.tolist() == ids.tolist()


def test_packaged_prompts_are_questions_and_the_splits_share_none():
    train, held = packaged_prompts("train"), packaged_prompts("eval")
    assert len(train) > 1000 and len(held) > 500
    assert not set(train) & set(held)
    assert all(p.endswith("?") and "\n" not in p and not p.startswith(("Question:", "Goal:")) for p in train + held)
    assert packaged_prompts("eval", 4) == held[:4]
    with pytest.raises(FlextronError, match="unknown prompt split"):
        packaged_prompts("test")


def test_user_files_are_read_or_refused_in_one_line(tmp_path):
    (tmp_path / "p.txt").write_text("What is up?\n\n  Why?  \n")
    assert read_prompts(tmp_path / "p.txt") == ["What is up?", "Why?"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "Hi?"}\n{"text": "no"}\n')
    with pytest.raises(FlextronError, match="line 2: no \"prompt\" string"):
        read_prompts(tmp_path / "p.jsonl")
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    assert read_conversations(tmp_path / "c.jsonl") == [CONVERSATION]
    for bad, why in ((CONVERSATION[:2], "no assistant message"), ([{"role": "bot", "content": "x"}], "role 'bot'"),
                     ("text", "not a JSON object")):
        (tmp_path / "c.jsonl").write_text(json.dumps({"messages": bad}) + "\n")
        with pytest.raises(FlextronError, match=f"line 1: {why}"):
            read_conversations(tmp_path / "c.jsonl")
    with pytest.raises(FlextronError, match="cannot read chat data"):
        read_conversations(tmp_path / "missing.jsonl")


def test_teacher_answers_are_its_greedy_continuations_cached_and_extended(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    em, tok = make_elastic(), make_tokenizer()
    tok.chat_template = TINY_TEMPLATE
    prompts = [f"w{i} w{i + 1} w{i + 2}" for i in range(10, 40)]
    sampling = Sampling(max_new_tokens=6)
    first = teacher_conversations(em, tok, prompts, "t", tokens_needed=30, sampling=sampling, batch=4,
                                  progress=False)
    assert 0 < len(first) < len(prompts) and len(first) % 4 == 0  # whole batches until the tokens suffice
    # Each answer is the model's own greedy continuation of the prompt in the template.
    ids = tok(f"w1 {prompts[0]} [EOS] w2 ", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = em.model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    expected = tok.decode(greedy[greedy != tok.eos_token_id], skip_special_tokens=True).strip()
    assert first[0] == [{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": expected}]
    cache = next((tmp_path / "flextron" / "chat").glob("*.jsonl"))
    assert len(cache.read_text().splitlines()) == len(first)
    monkeypatch.setattr("flextron.chat.Engine.generate", lambda *a: pytest.fail("generated again"))
    assert teacher_conversations(em, tok, prompts, "t", 30, sampling, batch=4, progress=False) == first
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    more = teacher_conversations(em, tok, prompts, "t", 10**6, sampling, batch=4, progress=False)
    assert len(more) == len(prompts) and more[: len(first)] == first  # extended, every prompt answered once
    other = teacher_conversations(em, tok, prompts, "another teacher", 1, sampling, batch=4, progress=False)
    assert len(other) == 4 and len(list(cache.parent.glob("*.jsonl"))) == 2
