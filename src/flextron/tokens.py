"""Training tokens on disk: a corpus tokenized once, document by document, into a memory-mapped
uint32 file (`tokens.bin` + `meta.json`), cached under a fingerprint of (sources, tokenizer).

Memory stays flat as the corpus grows: documents stream from the readers of `flextron.data` in
batches of about a million characters and their ids are appended to the file; training reads
only the windows it asks for. Documents are separated by the ids of a blank line, as the text
they came from would be.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from flextron.assets import big_txt, cache_dir
from flextron.data import HELDOUT_CHARS, documents, source_files, tokenizer_key
from flextron.errors import FlextronError
from flextron.fsutil import atomic_dir

_BATCH_CHARS = 1 << 20


def fingerprint(sources: list[str] | None, tok: PreTrainedTokenizerBase) -> str:
    """Names, sizes and modification times of the source files, and the tokenizer."""
    if not sources:
        st = big_txt().stat()
        ident: list = ["default", str(big_txt()), st.st_size, st.st_mtime_ns, HELDOUT_CHARS]
    else:
        ident = [f if isinstance(f, str) else [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns]
                 for f in source_files(sources)]
    return hashlib.sha1(json.dumps([ident, tokenizer_key(tok)]).encode()).hexdigest()[:20]


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def build_token_file(sources: list[str] | None, tok: PreTrainedTokenizerBase, out: Path) -> dict:
    """Tokenize `sources` into `out`/tokens.bin (uint32) and `out`/meta.json, atomically."""
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    n_tokens = n_docs = 0
    with atomic_dir(out, overwrite=True) as tmp:
        with (tmp / "tokens.bin").open("wb") as f:
            for batch in _batches(documents(sources)):
                for ids in tok(batch, add_special_tokens=False, verbose=False)["input_ids"]:
                    chunk = np.asarray((sep if n_docs else []) + ids, dtype=np.uint32)
                    chunk.tofile(f)
                    n_tokens += len(chunk)
                    n_docs += 1
        if n_tokens == 0:
            raise FlextronError(f"the training data {', '.join(sources or ['default'])} holds no text")
        meta = {"n_tokens": n_tokens, "n_documents": n_docs, "sources": sources or ["default"],
                "tokenizer": tokenizer_key(tok), "dtype": "uint32"}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def corpus_tokens(sources: list[str] | None, tok: PreTrainedTokenizerBase, build: bool = True) -> np.ndarray:
    """The corpus's token ids as a read-only memory map, tokenizing it first unless cached.

    With `build=False` (ranks other than 0, after rank 0 built it) a missing file is an error.
    """
    path = cache_dir() / "token-files" / fingerprint(sources, tok)
    meta_file, bin_file = path / "meta.json", path / "tokens.bin"
    fresh = meta_file.is_file() and bin_file.is_file() and \
        json.loads(meta_file.read_text())["n_tokens"] * 4 == bin_file.stat().st_size
    if not fresh:
        if not build:
            raise FlextronError(f"token file {path} is missing; rank 0 failed to build it")
        build_token_file(sources, tok, path)
    return np.memmap(bin_file, dtype=np.uint32, mode="r")
