import json

import numpy as np
import pytest
import torch

from flextron import data
from flextron.data import PackedSequences, documents, load_corpus, tokenize
from flextron.errors import FlextronError
from flextron.tokens import corpus_tokens
from helpers import make_tokenizer, word_text


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_BLOCK_CHARS", 500)  # several pieces per .txt file
    txt, jsonl = tmp_path / "a.txt", tmp_path / "b.jsonl"
    txt.write_text("\n\n".join(word_text(200, seed=i) for i in range(5)))
    jsonl.write_text("\n".join(json.dumps({"text": word_text(50, seed=10 + i)}) for i in range(4)))
    return tmp_path, [str(txt), str(jsonl)]


def test_token_file_holds_the_tokens_of_the_joined_corpus(corpus):
    root, sources = corpus
    tok = make_tokenizer()
    assert len(list(documents(sources[:1]))) == 5  # the .txt file streamed in paragraph-aligned pieces
    ids = corpus_tokens(sources, tok)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint32
    assert torch.equal(torch.from_numpy(ids.astype(np.int64)), tokenize(tok, load_corpus(sources)))
    (path,) = (root / "cache" / "flextron" / "token-files").iterdir()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["n_tokens"] == len(ids) == 1200 and meta["n_documents"] > 5


def test_token_file_is_reused_and_rebuilt_when_a_source_changes(corpus):
    root, sources = corpus
    tok = make_tokenizer()
    corpus_tokens(sources, tok)
    (path,) = (root / "cache" / "flextron" / "token-files").iterdir()
    built = (path / "tokens.bin").stat().st_mtime_ns
    corpus_tokens(sources, tok)
    assert (path / "tokens.bin").stat().st_mtime_ns == built
    with open(sources[1], "a") as f:
        f.write("\n" + json.dumps({"text": "w5 w6"}))
    assert len(corpus_tokens(sources, tok)) == 1202
    assert len(list((root / "cache" / "flextron" / "token-files").iterdir())) == 2
    (root / "c.txt").write_text("w1")
    with pytest.raises(FlextronError, match="missing; rank 0 failed"):
        corpus_tokens([str(root / "c.txt")], tok, build=False)


def test_packed_rows_from_a_token_file_equal_those_from_a_tensor(corpus):
    _, sources = corpus
    ids = corpus_tokens(sources, make_tokenizer())
    a = PackedSequences(ids, 16, seed=3)
    b = PackedSequences(torch.from_numpy(ids.astype(np.int64)), 16, seed=3)
    assert len(a) == 75 and torch.equal(a.rows(70, 10), b.rows(70, 10))  # across an epoch boundary
    assert a.rows(0, 2).dtype == torch.int64
