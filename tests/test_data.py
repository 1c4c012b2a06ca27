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


def test_mixed_rows_hold_the_share_and_read_each_stream_in_its_own_order():
    import numpy as np

    from flextron.data import MixedSequences, PackedSequences

    text = PackedSequences(np.arange(0, 400, dtype=np.int64), 4, seed=1)  # 100 rows of ids < 400
    chat_mask = np.arange(1000, 1200) % 3 == 0
    chat = PackedSequences(np.arange(1000, 1200, dtype=np.int64), 4, seed=2, mask=chat_mask)  # 50 rows
    mixed = MixedSequences(text, chat, 0.3)
    rows = mixed.rows(0, 40)
    from_chat = rows[:, 0] >= 1000
    assert from_chat.sum() == 12  # 30 % of 40 rows
    assert all(abs(int(from_chat[:n].sum()) - 0.3 * n) < 1 for n in range(1, 41))  # within a row all along
    assert torch.equal(rows[from_chat], chat.rows(0, 12)) and torch.equal(rows[~from_chat], text.rows(0, 28))
    masks = mixed.masks(0, 40)
    assert masks[~from_chat].all() and torch.equal(masks[from_chat], chat.masks(0, 12))
    assert torch.equal(masks[from_chat], torch.from_numpy(chat_mask)[rows[from_chat] - 1000])
    assert torch.equal(mixed.rows(17, 5), rows[17:22])  # any stretch reads the same rows
    assert MixedSequences(text, PackedSequences(np.arange(1000, 1200), 4), 0.5).masks(0, 4) is None
