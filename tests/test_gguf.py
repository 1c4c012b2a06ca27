"""GGUF export: llama.cpp runs the written file with the elastic model's logits and tokens."""

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flextron import api, llamacpp
from flextron.checkpoint import save_checkpoint
from flextron.cli import main
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.gguf import write_gguf
from flextron.space import Subnet
from helpers import THREADS, VOCAB, elastic_logits, gguf_logits, make_bpe_tokenizer, make_elastic, two_graph_table

KINDS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
# f32 weights and KV cache: llama.cpp's logits equal the elastic model's to float rounding (about
# 2e-7 observed on these models); a wrong q/k row order is off by about 0.3 (see below).
TOL = 1e-4
SMOLLM_TOL = 2e-3  # logits of magnitude ~30 on SmolLM2
IDS = torch.randint(1, VOCAB, (24,), generator=torch.Generator().manual_seed(1)).tolist()


def sharp_elastic(kind: str, **space) -> ElasticModel:
    """A tiny elastic model whose attention is peaked (q/k weights x8), so the rotary layout shows in the logits."""
    em = make_elastic(kind, **space)
    with torch.no_grad():
        for name, p in em.model.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                p.mul_(8)
    return em


def subnet_for(em: ElasticModel, case: str) -> Subnet:
    """full, uniform, per_layer; hidden_uniform / hidden_per_layer: those at hidden sizes 32 / 48 of 64
    (make_elastic(hidden=True)), the head size unchanged."""
    s = em.space
    if case.startswith("hidden_"):
        sub = subnet_for(em, case.removeprefix("hidden_"))
        return dataclasses.replace(sub, hidden=s.hidden[0] if case == "hidden_uniform" else s.hidden[1])
    if case == "full":
        return s.full()
    if case == "uniform":  # GPT-2: llama.cpp needs all its heads
        return s.uniform(1, 3) if em.config.model_type == "gpt2" else s.uniform(1, 1)
    return Subnet(mlp=[s.mlp[0][0], s.mlp[1][2]], attn=[s.attn[0][1], s.attn[1][3]])


# The words of the one-line refusals.
_OWN_HEAD = "reads the output layer from the embeddings, and this Qwen3 has its own"
_GPT2_HEADS = "sizes its heads as hidden size / heads"
REFUSED = {("qwen3", "per_layer"): _OWN_HEAD, ("gpt2", "per_layer"): "all heads",
           ("qwen3", "hidden_per_layer"): _OWN_HEAD, ("gpt2", "hidden_uniform"): _GPT2_HEADS,
           ("gpt2", "hidden_per_layer"): _GPT2_HEADS}


@pytest.mark.parametrize("case", ["full", "uniform", "per_layer", "hidden_uniform", "hidden_per_layer"])
@pytest.mark.parametrize("kind", KINDS)
def test_llamacpp_logits_equal_elastic_model(kind, case, tmp_path):
    em, tok = sharp_elastic(kind, hidden=case.startswith("hidden_")), make_bpe_tokenizer()
    sub = subnet_for(em, case)
    if (kind, case) in REFUSED:
        with pytest.raises(FlextronError, match=REFUSED[kind, case]) as refused:
            write_gguf(em, tok, sub, tmp_path / "m.gguf")
        assert "\n" not in str(refused.value) and not any(tmp_path.iterdir())
        return
    info = write_gguf(em, tok, sub, tmp_path / "m.gguf")
    # Qwen2's own llama.cpp architecture sizes q by the hidden size: all 8 query heads of 8 at 64, 4 at 32.
    per_layer = case.endswith("per_layer") or (kind == "qwen2" and case == "uniform")
    assert info["architecture"] == ("deci" if per_layer else {"mistral": "llama"}.get(kind, kind))
    if sub.hidden is not None:  # n_embd is the hidden size; the head size and the RoPE dimensions stay the model's
        fields, arch = gguf.GGUFReader(tmp_path / "m.gguf").fields, info["architecture"]
        keys = ("embedding_length", "attention.key_length", "attention.value_length", "rope.dimension_count")
        assert [fields[f"{arch}.{k}"].contents() for k in keys] == [sub.hidden, 8, 8, 8]
    diff = np.abs(gguf_logits(tmp_path / "m.gguf", IDS) - elastic_logits(em, sub, IDS)).max()
    assert diff < TOL, diff


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_uniform_sub_network_written_per_layer(kind, tmp_path):
    """`per_layer` writes a uniform sub-network as deci with the same logits; GPT-2 has no deci form."""
    em, tok = sharp_elastic(kind), make_bpe_tokenizer()
    sub = em.space.full()
    if kind == "gpt2":
        with pytest.raises(FlextronError, match=r"no per-layer architecture \(deci\) for GPT-2; .*--graph auto or own"):
            write_gguf(em, tok, sub, tmp_path / "m.gguf", per_layer=True)
        assert not any(tmp_path.iterdir())
        return
    assert write_gguf(em, tok, sub, tmp_path / "m.gguf", per_layer=True)["architecture"] == "deci"
    diff = np.abs(gguf_logits(tmp_path / "m.gguf", IDS) - elastic_logits(em, sub, IDS)).max()
    assert diff < TOL, diff


@pytest.mark.parametrize("wrong", ["unpermuted", "one head"])
def test_wrong_rotary_row_order_fails_the_tolerance(wrong, tmp_path, monkeypatch):
    """The tolerance catches a q/k layout that is not the one llama.cpp expects (about 0.3 off)."""
    from flextron.gguf import permute_rotary

    em, tok = sharp_elastic("llama"), make_bpe_tokenizer()
    sub = subnet_for(em, "per_layer")
    bad = (lambda w, n_head: w) if wrong == "unpermuted" else (lambda w, n_head: permute_rotary(w, 1))
    monkeypatch.setattr("flextron.gguf.permute_rotary", bad)
    write_gguf(em, tok, sub, tmp_path / "wrong.gguf")
    assert np.abs(gguf_logits(tmp_path / "wrong.gguf", IDS) - elastic_logits(em, sub, IDS)).max() > 1000 * TOL


def hf_greedy(em: ElasticModel, subnet: Subnet, ids: list[int], n: int) -> list[int]:
    """Greedy continuation by the elastic model at `subnet`, with its KV cache."""
    with em.subnet(subnet), torch.no_grad():
        out, new = em(input_ids=torch.tensor([ids]), use_cache=True), []
        for _ in range(n):
            new.append(int(out.logits[0, -1].argmax()))
            out = em(input_ids=torch.tensor([new[-1:]]), cache=out.cache, use_cache=True)
    return new


@pytest.mark.parametrize("case", ["uniform", "per_layer"])
def test_greedy_32_tokens_equal(case, tmp_path):
    em, tok = sharp_elastic("llama"), make_bpe_tokenizer()
    sub = subnet_for(em, case)
    write_gguf(em, tok, sub, tmp_path / "m.gguf")
    with llamacpp.opened(tmp_path / "m.gguf", n_ctx=64, threads=THREADS, exact=True) as llm:
        assert llamacpp.greedy(llm, IDS[:8], 32) == hf_greedy(em, sub, IDS[:8], 32)


@pytest.mark.parametrize("kind,hidden", [("llama", None), ("qwen2", None), ("llama", 48)])
def test_depth_sub_networks_run_in_llamacpp(kind, hidden, tmp_path):
    """Layer 0 without attention, layer 1 without MLP (the deci trap: a zero FFN keeps its attention
    output), layer 2 skipped whole (left out), layer 3 full; then layer 2 without attention (deci's
    attention-free layer, head_count 0): logits and greedy tokens equal; also at a smaller hidden size
    (the zero stand-ins at that size)."""
    em, tok = sharp_elastic(kind, n_layers=4, min_layers=1, hidden=hidden is not None), make_bpe_tokenizer()
    s = em.space
    sub = Subnet(mlp=[s.mlp[0][2], 0, 0, s.mlp[3][-1]], attn=[0, s.attn[1][2], 0, s.attn[3][-1]], hidden=hidden)
    info = write_gguf(em, tok, sub, tmp_path / "m.gguf")
    assert info["architecture"] == "deci"
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["deci.block_count"].contents() == 3
    assert reader.fields["deci.attention.head_count"].contents() == [2, 4, 8]  # layer 0: a zero KV group
    middle = Subnet(mlp=[s.mlp[0][1], 0, s.mlp[2][-1], s.mlp[3][-1]], attn=[s.attn[0][1], s.attn[1][2], 0, 0],
                    hidden=hidden)
    write_gguf(em, tok, middle, tmp_path / "middle.gguf")
    for path, net in ((tmp_path / "m.gguf", sub), (tmp_path / "middle.gguf", middle)):
        diff = np.abs(gguf_logits(path, IDS) - elastic_logits(em, net, IDS)).max()
        assert diff < TOL, diff
        with llamacpp.opened(path, n_ctx=64, threads=THREADS, exact=True) as llm:
            assert llamacpp.greedy(llm, IDS[:8], 32) == hf_greedy(em, net, IDS[:8], 32)


def test_tokenizer_fields(tmp_path):
    em, tok = make_elastic("llama"), make_bpe_tokenizer()
    write_gguf(em, tok, em.space.full(), tmp_path / "m.gguf")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == VOCAB and tokens[:3] == ["<|endoftext|>", "Ġ", "!"] and tokens[-1] == f"[PAD{VOCAB - 1}]"
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"].contents() == [" ".join(m) for m in merges]
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False  # as the HF tokenizer does


def _pre_tokenizers() -> dict:
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    from flextron.gguf_tokenizer import _REST, _WORDS

    def split(digits: str):
        return pt.Sequence([pt.Split(Regex(_WORDS + digits + _REST), "isolated"), pt.ByteLevel(False, use_regex=False)])

    return {"gpt-2": pt.ByteLevel(add_prefix_space=False),
            "smollm": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
            "llama-bpe": split(r"\p{N}{1,3}"), "qwen2": split(r"\p{N}")}


@pytest.mark.parametrize("name", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizer_name_gives_hf_tokenization(name, tmp_path):
    em, tok = make_elastic("llama"), make_bpe_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = _pre_tokenizers()[name]
    write_gguf(em, tok, em.space.full(), tmp_path / "m.gguf")
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.pre"].contents() == name
    text = "It's 2024: 12345 cats, 7 dogs.\n\n  then  THE END'RE 99"
    with llamacpp.opened(tmp_path / "m.gguf", n_ctx=64, threads=THREADS) as llm:
        assert llm.tokenize(text.encode(), add_bos=False) == tok(text)["input_ids"]


@pytest.mark.parametrize("outtype,tol", [("f16", 0.05), ("bf16", 0.3), ("q8_0", 0.3)])
def test_smaller_outtypes_load_and_stay_close(outtype, tol, tmp_path):
    em, tok = make_elastic("llama"), make_bpe_tokenizer()
    sub = subnet_for(em, "per_layer")
    info = write_gguf(em, tok, sub, tmp_path / "m.gguf", outtype=outtype)
    f32 = write_gguf(em, tok, sub, tmp_path / "f32.gguf")
    assert info["bytes"] < 0.7 * f32["bytes"]
    diff = np.abs(gguf_logits(tmp_path / "m.gguf", IDS) - elastic_logits(em, sub, IDS)).max()
    assert diff < tol, diff


# llama.cpp's quantizer types: the types of the weight matrices whose rows are whole 256-weight blocks
# (k-quant mixes keep some in a larger k-type; q4_0's output layer is q6_k).
QUANTIZER_TYPES = {"q4_k_m": {"Q4_K", "Q5_K", "Q6_K"}, "q5_k_m": {"Q5_K", "Q6_K"}, "q6_k": {"Q6_K"},
                   "q4_0": {"Q4_0", "Q6_K"}}
# Relative error of the logits (RMS of the difference over the RMS spread of the f32 logits): random Gaussian
# weights rounded to 4-6 bits per weight, through two layers; observed 0.14-0.16 (q4_k_m), 0.08-0.09 (q5_k_m),
# 0.05 (q6_k), 0.21-0.22 (q4_0) on this model, so about twice that. Another sub-network is 0.88 off.
QUANTIZED_TOL = {"q4_k_m": 0.3, "q5_k_m": 0.2, "q6_k": 0.12, "q4_0": 0.4}


def relative_error(logits: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(logits - reference) / np.linalg.norm(reference - reference.mean(-1, keepdims=True)))


def wide_elastic() -> ElasticModel:
    """A tiny Llama whose rows are whole k-quant blocks (hidden 256, MLP 512): MLP widths 128-512, one or two
    of its two KV groups (head size 64)."""
    from flextron.space import ElasticSpace

    torch.manual_seed(0)
    em = ElasticModel(LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=256)).eval())
    b = em.blocks[0]
    em.set_space(ElasticSpace.default(2, b.mlp.n_units, b.attn.n_units, multiple=64, kv_groups=b.geometry.n_kv_heads))
    return em


@pytest.mark.parametrize("outtype,case", [("q4_k_m", "uniform"), ("q4_k_m", "per_layer"), ("q5_k_m", "per_layer"),
                                          ("q6_k", "per_layer"), ("q4_0", "uniform")])
def test_llamacpp_quantizer_types_load_close_to_the_f32_export(outtype, case, tmp_path):
    """llama.cpp quantizes the f32 export: its tensor mix where rows are whole blocks; in a per-layer (deci)
    sub-network the 384-neuron MLP and the one-group attention output of layer 0 are not, and fall back as
    llama.cpp decides, which the export reports as the file holds them. The logits stay near the f32 file's."""
    em, tok = wide_elastic(), make_bpe_tokenizer()
    s = em.space
    sub = s.uniform(1, 1) if case == "uniform" else Subnet(mlp=[384, 512], attn=[1, 2])
    f32 = write_gguf(em, tok, sub, tmp_path / "f32.gguf")
    info = write_gguf(em, tok, sub, tmp_path / "q.gguf", outtype=outtype)
    assert info["architecture"] == f32["architecture"] == ("llama" if case == "uniform" else "deci")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f32.gguf", "q.gguf"]  # the f32 step is gone
    stored = {t.name: (t.tensor_type.name, int(t.shape[0])) for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors
              if len(t.shape) == 2}
    whole = {name: kind for name, (kind, row) in stored.items() if row % 256 == 0}
    assert set(whole.values()) <= QUANTIZER_TYPES[outtype]
    assert info["fallback"] == {name: kind for name, (kind, row) in stored.items() if row % 256}
    if case == "per_layer" and outtype != "q4_0":  # q4_0's blocks are 32 weights: nothing falls back
        assert set(info["fallback"]) == {"blk.0.ffn_down.weight", "blk.0.attn_output.weight"}
        assert not set(info["fallback"].values()) & QUANTIZER_TYPES[outtype]
    assert info["bytes"] < 0.35 * f32["bytes"]
    error = relative_error(gguf_logits(tmp_path / "q.gguf", IDS), gguf_logits(tmp_path / "f32.gguf", IDS))
    assert error < QUANTIZED_TOL[outtype], error


def test_a_failed_quantization_leaves_the_existing_output_as_it_was(tmp_path, monkeypatch):
    """llama.cpp refuses a file type it does not know: one line with its reason, the old file untouched, no
    intermediate left."""
    import llama_cpp

    em, tok = make_elastic("llama"), make_bpe_tokenizer()
    out = tmp_path / "m.gguf"
    write_gguf(em, tok, em.space.full(), out, outtype="f16")
    before = out.read_bytes()
    monkeypatch.setattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_Q4_K_M", 9999)
    with pytest.raises(FlextronError, match="could not quantize the export to q4_k_m .*invalid output file type 9999") \
            as failed:
        write_gguf(em, tok, em.space.smallest(), out, outtype="q4_k_m", overwrite=True)
    assert "\n" not in str(failed.value)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    with pytest.raises(FlextronError, match="--outtype must be one of .*q4_k_m, q4_0, not 'q3_k'"):
        write_gguf(em, tok, em.space.full(), out, outtype="q3_k", overwrite=True)


def test_cli_export_at_a_quantizer_type_reports_its_fallbacks(elastic_ckpt, tmp_path, capsys):
    ckpt = elastic_ckpt(bpe=True)
    out = tmp_path / "q.gguf"
    assert main(["export", str(ckpt), "--budget", "0.5", "--format", "gguf", "--out", str(out),
                 "--outtype", "q4_k_m"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    # hidden size 64: no row is a whole 256-weight block; llama.cpp stores them in 32-weight types, and rows of
    # the 48-neuron MLP, not whole 32-weight blocks either, in f16.
    stored = [t.tensor_type.name for t in gguf.GGUFReader(out).tensors if len(t.shape) == 2]
    counts = {kind: stored.count(kind) for kind in sorted(set(stored))}
    assert f"{len(stored)} tensors whose rows are not whole q4_k_m blocks" in text
    assert ", ".join(f"{n} {kind}" for kind, n in counts.items()) in text and set(counts) == {"F16", "Q5_0", "Q8_0"}
    with pytest.raises(SystemExit, match="2"):
        main(["export", str(ckpt), "--budget", "0.5", "--format", "gguf", "--out", str(tmp_path / "x.gguf"),
              "--outtype", "q3_k"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "q4_k_m" in err and "q3_k" in err
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export_gguf(elastic_ckpt, tmp_path, capsys):
    ckpt = elastic_ckpt(bpe=True)
    out = tmp_path / "half.gguf"
    assert main(["export", str(ckpt), "--budget", "0.5", "--format", "gguf", "--out", str(out)]) == 0
    assert "GGUF" in capsys.readouterr().out
    fields = gguf.GGUFReader(out).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["flextron.budget"].contents() == "50%"
    assert fields["flextron.source_checkpoint"].contents() == str(ckpt)
    # An existing file is kept unless --overwrite.
    before = out.read_bytes()
    assert main(["export", str(ckpt), "--budget", "0.6", "--format", "gguf", "--out", str(out)]) == 2
    assert out.read_bytes() == before
    assert main(["export", str(ckpt), "--budget", "0.6", "--format", "gguf", "--out", str(out), "--overwrite",
                 "--outtype", "f16"]) == 0
    assert out.read_bytes() != before


def test_export_writes_a_uniform_sub_network_in_the_graph_its_latency_table_prices(elastic_ckpt, tmp_path, capsys):
    """`--graph auto` writes a uniform sub-network as deci where the checkpoint's llama.cpp table
    says deci decodes it faster, which is the graph its budgets were priced in; `own` and `deci`
    force a graph, and `own` refuses a sub-network only deci can hold, writing nothing."""
    em = make_elastic("llama")
    em.latency, _, _ = two_graph_table(em)  # own graph faster when narrow, deci when wide
    ckpt = tmp_path / "ckpt"
    save_checkpoint(em, make_bpe_tokenizer(), ckpt, {})
    full, small, mixed = em.space.full(), em.space.smallest(), subnet_for(em, "per_layer")

    def arch(subnet, **options):
        out = tmp_path / "m.gguf"
        api.export(ckpt, None, out, subnet=subnet, format="gguf", overwrite=True, **options)
        return gguf.GGUFReader(out).fields["general.architecture"].contents()

    assert [arch(s) for s in (full, small, mixed)] == ["deci", "llama", "deci"]
    assert [arch(full, graph="own"), arch(small, graph="deci")] == ["llama", "deci"]
    assert main(["export", str(ckpt), "--budget", "1.0", "--format", "gguf", "--out", str(tmp_path / "f.gguf")]) == 0
    assert "deci" in capsys.readouterr().out
    with pytest.raises(FlextronError, match="--graph auto or deci"):
        api.export(ckpt, None, tmp_path / "x.gguf", subnet=mixed, format="gguf", graph="own")
    assert not (tmp_path / "x.gguf").exists()
    plain = elastic_ckpt(name="plain", bpe=True)  # no table: own graph
    out = tmp_path / "plain.gguf"
    api.export(plain, None, out, subnet=full, format="gguf")
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


def test_refused_exports_write_nothing(elastic_ckpt, tmp_path, capsys):
    word_level = elastic_ckpt(name="word")
    out = tmp_path / "x.gguf"
    assert main(["export", str(word_level), "--budget", "0.5", "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "byte-level BPE" in err and "--format hf" in err
    for kind in ("gpt2", "qwen3"):  # GPT-2 with fewer heads; Qwen3 per-layer
        em = make_elastic(kind)
        save_checkpoint(em, make_bpe_tokenizer(), tmp_path / kind, {})
        sub = em.space.uniform(1, 1) if kind == "gpt2" else subnet_for(em, "per_layer")
        with pytest.raises(FlextronError, match="--format hf"):
            api.export(tmp_path / kind, None, out, subnet=sub, format="gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "qwen3", "word"]


@pytest.fixture(scope="module")
def smollm():
    from flextron.assets import load_hf

    model, tok, _ = load_hf(None)
    return ElasticModel(model), tok


@pytest.mark.real
@pytest.mark.parametrize("case", ["uniform-75", "uniform-50", "per_layer-a", "per_layer-b"])
def test_smollm2_gguf_logits_and_greedy_equal(smollm, case, tmp_path):
    """The packaged SmolLM2 at two uniform budgets and two per-layer sub-networks."""
    from flextron.latency import random_subnets

    em, tok = smollm
    s = em.space
    sub = {"uniform-75": s.uniform(2, 1), "uniform-50": s.uniform(1, 1),
           "per_layer-a": random_subnets(em, 1, seed=1)[0], "per_layer-b": random_subnets(em, 1, seed=2)[0]}[case]
    info = write_gguf(em, tok, sub, tmp_path / "m.gguf")
    assert info["architecture"] == ("llama" if case.startswith("uniform") else "deci")
    ids = tok("The quick brown fox jumps over the lazy dog. Once upon a time, in 1868,")["input_ids"]
    with llamacpp.opened(tmp_path / "m.gguf", n_ctx=128, threads=THREADS, exact=True, all_logits=True) as llm:
        assert llm.tokenize(tok.decode(ids).encode(), add_bos=False) == ids
        diff = np.abs(llamacpp.logits(llm, ids) - elastic_logits(em, sub, ids)).max()
        assert diff < SMOLLM_TOL, diff
        if case in ("uniform-50", "per_layer-a"):  # greedy decoding once per kind: HF decoding is the slow part
            assert llamacpp.greedy(llm, ids, 32) == hf_greedy(em, sub, ids, 32)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_query_heads_within_groups_run_in_llamacpp(kind, tmp_path):
    em, tok = sharp_elastic(kind, attn_unit="head"), make_bpe_tokenizer()
    for name, sub in (("uniform", Subnet(mlp=[48, 48], attn=[4, 4])), ("per_layer", Subnet(mlp=[24, 96], attn=[2, 8]))):
        info = write_gguf(em, tok, sub, tmp_path / f"{name}.gguf")
        # Qwen2's own architecture sizes q by the hidden size: narrower query heads go to deci.
        assert info["architecture"] == ("llama" if kind == "llama" and name == "uniform" else "deci")
        diff = np.abs(gguf_logits(tmp_path / f"{name}.gguf", IDS) - elastic_logits(em, sub, IDS)).max()
        assert diff < TOL, (name, diff)


@pytest.mark.real
def test_smollm2_query_head_sub_networks_in_llamacpp(tmp_path):
    """SmolLM2 (9 query heads, 3 KV groups) with heads trimmed inside the groups: one head per group
    everywhere (stock llama), and per-layer head counts (deci). These pruned, untrained sub-networks
    drift further from llama.cpp's f32 rounding than trained ones (up to 0.004 of logits ~40), so the
    tolerance is 0.01; the same file read against another head of each group is off by ~56."""
    from flextron.assets import load_hf
    from flextron.latency import random_subnets

    model, tok, _ = load_hf(None)
    em = ElasticModel(model, attn_unit="head")
    assert em.space.attn[0] == [1, 2, 3, 6, 9]
    n = em.space.n_layers
    subs = {"llama": Subnet(mlp=[768] * n, attn=[3] * n), "deci": random_subnets(em, 1, seed=3)[0]}
    ids = tok("The quick brown fox jumps over the lazy dog. Once upon a time, in 1868,")["input_ids"]
    got = {}
    for arch, sub in subs.items():
        assert write_gguf(em, tok, sub, tmp_path / f"{arch}.gguf")["architecture"] == arch
        with llamacpp.opened(tmp_path / f"{arch}.gguf", n_ctx=128, threads=THREADS, exact=True,
                             all_logits=True) as llm:
            got[arch] = llamacpp.logits(llm, ids)
        diff = np.abs(got[arch] - elastic_logits(em, sub, ids)).max()
        assert diff < 1e-2, (arch, diff)
    for b in em.blocks:  # the first two heads of each group trade places
        b.permute_attn_(torch.tensor([1, 0, 2, 4, 3, 5, 7, 6, 8]))
    assert np.abs(got["llama"] - elastic_logits(em, subs["llama"], ids)).max() > 1


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}


@pytest.mark.parametrize("case", ["full", "per_layer"])
def test_llama3_rope_scaling_runs_in_llamacpp_with_its_frequency_factors(case, tmp_path):
    """Llama 3.x: tied embeddings and llama3 RoPE scaling (written as llama.cpp's rope_freqs tensor, as its
    converter does); the scaling changes every rotary frequency of this tiny model, so a file without the
    factors is far off."""
    em, tok = sharp_elastic("llama"), make_bpe_tokenizer()
    plain = em.model(input_ids=torch.tensor([IDS])).logits
    config = LlamaConfig(**{**em.config.to_dict(), "rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True})
    model = LlamaForCausalLM(config).eval()
    state = {k: v for k, v in em.model.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False)
    em = ElasticModel(model, em.space)
    with torch.no_grad():
        assert (em.model(input_ids=torch.tensor([IDS])).logits - plain).abs().max() > 0.05
    sub = subnet_for(em, case)
    info = write_gguf(em, tok, sub, tmp_path / "m.gguf")
    assert info["architecture"] == ("llama" if case == "full" else "deci")
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    diff = np.abs(gguf_logits(tmp_path / "m.gguf", IDS) - elastic_logits(em, sub, IDS)).max()
    assert diff < TOL, diff


def test_a_sliding_window_llama_cpp_ignores_is_refused(tmp_path):
    em = make_elastic("mistral")
    em.model.config.sliding_window = 8  # Mistral 7B v0.1: a window shorter than the context
    with pytest.raises(FlextronError, match="sliding window of 8 tokens .*llama graph ignores it"):
        write_gguf(em, make_bpe_tokenizer(), em.space.full(), tmp_path / "m.gguf")
    assert not any(tmp_path.iterdir())
