import pytest
import torch

from flextron.data import HELDOUT_CHARS, default_splits, sample_sequences, tokenize, windows
from flextron.errors import FlextronError
from helpers import make_tokenizer, word_text


def test_heldout_is_the_end_of_war_and_peace_and_never_in_train():
    splits = default_splits()
    held, train = splits["heldout"], splits["train"]
    assert len(held) == HELDOUT_CHARS
    assert "Tolstoy" not in held and len(train) > 6_000_000
    probe = held[1000:1200]
    assert probe not in train
    assert "SHERLOCK HOLMES" in train


def test_tokenize_is_cached_and_stable(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tok = make_tokenizer()
    text = word_text(100)
    a = tokenize(tok, text)
    assert len(list((tmp_path / "flextron" / "tokens").glob("*.npy"))) == 1
    b = tokenize(tok, text)
    assert torch.equal(a, b) and a.numel() == 100 and a.dtype == torch.int64


def test_windows_and_sampling():
    ids = torch.arange(1000)
    w = windows(ids, 64, limit=3)
    assert w.shape == (3, 64) and w[1, 0] == 64
    s1, s2 = sample_sequences(ids, 5, 32, seed=1), sample_sequences(ids, 5, 32, seed=1)
    assert torch.equal(s1, s2) and s1.shape == (5, 32)
    assert (s1[:, 1:] - s1[:, :-1] == 1).all()  # contiguous windows of the stream
    with pytest.raises(FlextronError, match="fewer than one window"):
        windows(ids, 2000)
    with pytest.raises(FlextronError, match="empty"):
        tokenize(make_tokenizer(), "  \n")
