"""A tokenizer as llama.cpp's `tokenizer.ggml.*` GGUF fields, read from tokenizer.json: byte-level BPE
as llama.cpp's `gpt2` tokenizer (with merges and the pre-tokenizer named), SentencePiece-style BPE
(Gemma, Llama 2) as its `llama` one, with scores that rank merges as the BPE merges do (llama.cpp's
converter reads them from tokenizer.model, which an HF directory may lack). Any other kind is refused.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from flextron.errors import FlextronError

# Pre-tokenizer names llama.cpp knows, by the split regex of a tokenizer.json `Split` step.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_PRE = {_WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe", _WORDS + r"\p{N}" + _REST: "qwen2"}
# SentencePiece's stand-in for a space, and its byte-fallback pieces.
_SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, read from tokenizer.json."""
    steps = (spec or {}).get("pretokenizers") if (spec or {}).get("type") == "Sequence" else [spec]
    kinds = [s.get("type") if s else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_PRE.get(steps[0].get("pattern", {}).get("Regex"))
        if name is not None:
            return name
    raise FlextronError(f"the tokenizer's pre-tokenizer ({'+'.join(map(str, kinds))}) has no llama.cpp "
                        "equivalent here; export with --format hf instead")


def _spm(spec: dict) -> bool:
    """Whether tokenizer.json holds a SentencePiece-style BPE (byte fallback, "▁" for spaces: Gemma, Llama 2),
    else a byte-level one (GPT-2, Llama 3, SmolLM, Qwen); FlextronError (one line) for any other kind."""
    model, decoder = spec.get("model", {}), spec.get("decoder") or {}
    bpe = model.get("type") == "BPE"
    if bpe and decoder.get("type") == "ByteLevel":
        return False
    affixes = model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
    sentencepiece = bpe and model.get("byte_fallback") and not (affixes or model.get("ignore_merges"))
    if sentencepiece and decoder.get("type") == "Sequence":
        return True
    raise FlextronError("GGUF export needs a byte-level BPE tokenizer (GPT-2, Llama 3, SmolLM, Qwen) or a "
                        "SentencePiece-style BPE one (Gemma, Llama 2) in tokenizer.json; export with --format hf "
                        "instead")


def _vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int, spm: bool) -> tuple[list[str], list[int]]:
    """Token strings and types as the converter writes them: `get_vocab_base` for byte-level BPE,
    `_set_vocab_sentencepiece` for SentencePiece-style (`spm`: byte pieces "<0xNN>" are BYTE, and a
    normalized added token is matched in the raw text, so with spaces for its "▁")."""
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise FlextronError(f"the tokenizer has ids up to {max(reverse)} but the model only {vocab_size} embeddings")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        if token in added:
            if spm and decoder[i].normalized:
                token = token.replace(_SPACE, " ")
            elif not spm and not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(TokenType.CONTROL if decoder[i].special or looks_special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.BYTE if spm and _BYTE_PIECE.fullmatch(token) else TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _merge_ranks(spec: dict) -> dict[str, int]:
    """Each piece's first BPE merge rank; FlextronError (one line) unless the merges are SentencePiece's (every
    split of a piece into two pieces is a merge, ranked by the piece it makes), all that scores can say."""
    vocab = spec["model"]["vocab"]
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    rank: dict[str, int] = {}
    for k, (left, right) in enumerate(pairs):
        rank.setdefault(left + right, k)
    ordered = all(rank["".join(a)] <= rank["".join(b)] for a, b in zip(pairs, pairs[1:]))
    known = set(pairs)
    complete = all((t[:i], t[i:]) in known for t in vocab for i in range(1, len(t))
                   if t[:i] in vocab and t[i:] in vocab)
    if not (ordered and complete):
        raise FlextronError("the tokenizer's BPE merges are not SentencePiece's (every split of a piece a merge, "
                            "ranked by the piece it makes), so llama.cpp would split text differently; export "
                            "with --format hf instead")
    return rank


def _spm_scores(spec: dict, tokens: list[str], types: list[int]) -> list[float]:
    """Scores under which llama.cpp's SentencePiece tokenizer (it merges the adjacent pair whose merged piece
    scores highest, leftmost first) merges as the BPE merge ranks do: normal pieces 0, -1, -2, ... in the
    order of the first merge that makes them (pieces no merge makes last, by id); byte pieces 0 and
    the others -1000, as the converter scores them."""
    from gguf import TokenType

    rank = _merge_ranks(spec)
    scores = [0.0 if t == TokenType.BYTE else -1000.0 for t in types]
    normal = [i for i, t in enumerate(types) if t == TokenType.NORMAL]
    for place, i in enumerate(sorted(normal, key=lambda i: (rank.get(tokens[i], math.inf), i))):
        scores[i] = -float(place)
    return scores


def _space_prefix(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text; FlextronError (one line) unless its
    normalizer and pre-tokenizer only turn spaces into "▁", unsplit, as llama.cpp's SPM tokenizer does.

    llama.cpp then puts it before every text, also one that starts with a space or follows a special token,
    as SentencePiece does; transformers' Llama tokenizer (Metaspace, prepend_scheme "first") there does not."""
    backend = tokenizer.backend_tokenizer
    probe = "a  b\n c"
    text = backend.normalizer.normalize_str(probe) if backend.normalizer else probe
    pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    escaped = probe.replace(" ", _SPACE)
    if pieces not in ([escaped], [_SPACE + escaped]):
        raise FlextronError("the tokenizer's normalizer or pre-tokenizer does more than turn spaces into '▁', "
                            "which is all llama.cpp's SentencePiece tokenizer does; export with --format hf instead")
    return pieces != [escaped]


def tokenizer_fields(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Callable[[object], None]:
    """Check the tokenizer and return the function that writes its `tokenizer.ggml.*` fields: llama.cpp's
    `gpt2` (byte-level BPE, with merges) or `llama` (SentencePiece-style BPE, with scores)."""
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise FlextronError("GGUF export needs a fast tokenizer (tokenizer.json); export with --format hf instead")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text())
        spm = _spm(spec)
        tokens, types = _vocab(tokenizer, vocab_size, spm)
        pre = "default" if spm else _pre_tokenizer(spec.get("pre_tokenizer"))
        scores = _spm_scores(spec, tokens, types) if spm else []
        prefix = spm and _space_prefix(tokenizer)
        special = gguf.SpecialVocab(Path(tmp), load_merges=not spm, n_vocab=vocab_size)
    # What the HF tokenizer really does, so llama.cpp tokenizes a prompt the same way.
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]

    def write(writer) -> None:
        writer.add_tokenizer_model("llama" if spm else "gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if spm:
            writer.add_token_scores(scores)
            writer.add_add_space_prefix(prefix)
        special.add_to_gguf(writer)

    return write
