"""GGUF export of the families beyond Llama, Qwen and GPT-2 (Gemma 2 / 3, OLMo 2, Phi-3, Granite,
SmolLM3) and per-layer Qwen3: llama.cpp runs each written file with the elastic model's logits,
and what its graphs cannot hold is refused in one line, writing nothing."""

import dataclasses

import gguf
import numpy as np
import pytest
import torch

from flextron import llamacpp
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.gguf import layer_counts, write_gguf
from flextron.space import ElasticSpace, Subnet
from helpers import (
    HIDDEN_FRACTIONS,
    NEW_KINDS,
    THREADS,
    VOCAB,
    elastic_logits,
    gguf_logits,
    make_bpe_tokenizer,
    make_model,
)

TOL = 1e-4  # f32 weights and KV cache, as tests/test_gguf.py: observed up to 3e-7
# ggml's CPU GELU reads an f16 lookup table: Gemma's logits are up to 2.3e-4 off on these models
# (4e-6 for Gemma 2 once torch's GELU rounds its input and output to f16 alike).
GEMMA_TOL = 1e-3
IDS = torch.randint(1, VOCAB, (24,), generator=torch.Generator().manual_seed(1)).tolist()  # > sliding window 4

# (kind, sub-network) -> the llama.cpp architecture written, or the words of the one-line refusal.
# "uniform" trims heads and MLP, "uniform_mlp" the MLP only (all heads), "per_layer" both, per layer;
# "depth" skips the attention of layer 0 and the MLP of layer 1 (deci's zero stand-ins, as for Llama).
EXPECTED = {
    ("gemma2", "full"): "gemma2", ("gemma2", "uniform"): "gemma2", ("gemma2", "per_layer"): "no sandwich norms",
    ("gemma3", "full"): "gemma3", ("gemma3", "uniform"): "gemma3",
    ("gemma3", "per_layer"): "no sandwich norms or q/k norms",
    ("olmo2", "full"): "olmo2", ("olmo2", "uniform_mlp"): "olmo2", ("olmo2", "uniform"): "all query heads",
    ("olmo2", "per_layer"): "no post-norms or q/k norms",
    # Phi-4-mini style partial RoPE (0.75): deci rotates whole heads, phi3 needs all query heads.
    ("phi3", "full"): "phi3", ("phi3", "uniform_mlp"): "phi3", ("phi3", "uniform"): "no partial RoPE",
    ("phi3", "per_layer"): "no partial RoPE",
    ("phi3-rotary", "full"): "phi3", ("phi3-rotary", "uniform"): "deci", ("phi3-rotary", "per_layer"): "deci",
    ("granite", "full"): "granite", ("granite", "uniform"): "granite", ("granite", "per_layer"): "deci",
    ("granite", "depth"): "deci", ("phi3-rotary", "depth"): "deci", ("gemma3", "depth"): "no sandwich norms",
    # RoPE off in every 2nd layer; llama.cpp's smollm3 graph has it off in every 4th, deci in none.
    ("smollm3", "full"): "every 4th", ("smollm3", "uniform"): "every 4th", ("smollm3", "per_layer"): "every 4th",
    ("smollm3-4", "full"): "smollm3", ("smollm3-4", "uniform"): "smollm3",
    ("smollm3-4", "per_layer"): "no layers without RoPE", ("smollm3-4", "no_rope_attn_skipped"): "deci",
    ("qwen3", "per_layer"): "this Qwen3 has its own",
    # Qwen3 with tied embeddings (0.6B-4B): per-layer in llama.cpp's openelm (fused q|k|v, per-head q/k norms).
    ("qwen3-tied", "full"): "qwen3", ("qwen3-tied", "uniform"): "qwen3", ("qwen3-tied", "per_layer"): "openelm",
    ("qwen3-tied", "depth"): "openelm",
    # hidden_*: at hidden size 32 of 64 ("uniform": 4 query heads x 8 = 32, what the q width of llama.cpp's
    # qwen2 / olmo2 / phi3 graphs needs; "uniform_mlp": all 8 heads), "per_layer" and "depth" at 48.
    # Gemma's embedding scale sqrt(hidden) is folded into the weights (export._fold_embedding_scale).
    ("gemma2", "hidden_uniform"): "gemma2", ("gemma2", "hidden_uniform_mlp"): "gemma2",
    ("gemma3", "hidden_uniform"): "gemma3", ("gemma3", "hidden_uniform_mlp"): "gemma3",
    ("olmo2", "hidden_uniform"): "olmo2", ("olmo2", "hidden_uniform_mlp"): "query heads x head size = the hidden size",
    ("phi3", "hidden_uniform"): "phi3", ("phi3-rotary", "hidden_uniform_mlp"): "deci",
    ("phi3-rotary", "hidden_per_layer"): "deci", ("granite", "hidden_per_layer"): "deci",
    ("granite", "hidden_depth"): "deci", ("qwen3-tied", "hidden_per_layer"): "openelm",
}
assert {k for k, _ in EXPECTED} >= set(NEW_KINDS)


def elastic(model, min_layers: int | None = None, hidden: bool = False) -> ElasticModel:
    """An elastic model of `model` as helpers' make_elastic builds it, q/k weights x8 (peaked
    attention, so that rotary layout, sliding windows and attention scales show in the logits)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f".{proj}_proj." in name for proj in ("q", "k", "qkv")):
                p.mul_(8)
    em = ElasticModel(model)
    b = em.blocks[0]
    space = ElasticSpace.default(len(em.blocks), b.mlp.n_units, b.attn.n_units, multiple=8,
                                 kv_groups=b.geometry.n_kv_heads)
    space = space if min_layers is None else space.with_depth(min_layers)
    em.set_space(space.with_hidden(em.hidden_size, HIDDEN_FRACTIONS, 16) if hidden else space)
    return em


def variant(kind: str, n_layers: int = 2, **config):
    """helpers' tiny model of `kind` with the same weights under other config values."""
    base = make_model(kind, n_layers=n_layers)
    model = type(base)(type(base.config).from_dict({**base.config.to_dict(), **config}))
    model.load_state_dict(base.state_dict())
    return model.eval()


def family_model(kind: str):
    if kind == "phi3-rotary":  # Phi-3 / Phi-4 (14B): RoPE over whole heads
        rope = {**make_model("phi3").config.rope_parameters, "partial_rotary_factor": 1.0}
        return variant("phi3", rope_parameters=rope, partial_rotary_factor=1.0)
    if kind == "smollm3-4":  # SmolLM3's own pattern: RoPE off in every 4th layer
        return variant("smollm3", n_layers=4, no_rope_layers=[1, 1, 1, 0], no_rope_layer_interval=4)
    if kind == "qwen3-tied":
        return variant("qwen3", tie_word_embeddings=True)
    return make_model(kind)


def subnet_for(em: ElasticModel, case: str) -> Subnet:
    s, n = em.space, em.space.n_layers
    if case.startswith("hidden_"):
        sub = subnet_for(em, case.removeprefix("hidden_"))
        return dataclasses.replace(sub, hidden=s.hidden[0] if case.startswith("hidden_uniform") else s.hidden[1])
    if case == "full":
        return s.full()
    if case == "uniform":
        return s.uniform(1, 1)
    if case == "uniform_mlp":
        return Subnet(mlp=[s.mlp[0][1]] * n, attn=[a[-1] for a in s.attn])
    if case == "depth":
        return Subnet(mlp=[s.mlp[0][2], 0], attn=[0, s.attn[1][-1]])
    if case == "no_rope_attn_skipped":  # the only layer without RoPE keeps its MLP only
        return Subnet(mlp=[c[-1] for c in s.mlp], attn=[s.attn[0][1], s.attn[1][3], s.attn[2][2], 0])
    mlp, attn = (0, 2, 1, 3), (1, 3, 2, 0)  # choice indices, per layer
    return Subnet(mlp=[s.mlp[i][mlp[i]] for i in range(n)], attn=[s.attn[i][attn[i]] for i in range(n)])


def max_diff(em: ElasticModel, subnet: Subnet, path) -> float:
    return float(np.abs(gguf_logits(path, IDS) - elastic_logits(em, subnet, IDS)).max())


@pytest.mark.parametrize("kind,case", list(EXPECTED))
def test_llamacpp_logits_equal_elastic_model(kind, case, tmp_path):
    n_layers = 4 if kind == "smollm3-4" else 2
    em = elastic(family_model(kind), min_layers=1 if case.endswith(("depth", "no_rope_attn_skipped")) else None,
                 hidden=case.startswith("hidden_"))
    assert em.space.n_layers == n_layers
    sub, expected = subnet_for(em, case), EXPECTED[kind, case]
    out = tmp_path / "m.gguf"
    if " " in expected:  # the words of a refusal
        with pytest.raises(FlextronError, match=expected) as refused:
            write_gguf(em, make_bpe_tokenizer(), sub, out)
        assert "\n" not in str(refused.value) and "--format hf" in str(refused.value)
        assert not any(tmp_path.iterdir())
        return
    assert write_gguf(em, make_bpe_tokenizer(), sub, out)["architecture"] == expected
    diff = max_diff(em, sub, out)
    assert diff < (GEMMA_TOL if expected.startswith("gemma") else TOL), diff


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_sliding_window_layers_follow_the_kept_layers(kind, tmp_path):
    """Local and global layers alternate (window 4 tokens of 24): a sub-network that leaves out
    layer 0 starts with a global layer, and llama.cpp reads which is which from the file; the same
    file with the kinds swapped is far off."""
    em = elastic(make_model(kind, n_layers=4), min_layers=1)
    s = em.space
    sub = Subnet(mlp=[0] + [c[2] for c in s.mlp[1:]], attn=[0] + [c[-1] for c in s.attn[1:]])
    assert write_gguf(em, make_bpe_tokenizer(), sub, tmp_path / "m.gguf")["architecture"] == kind
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert list(fields[f"{kind}.attention.sliding_window_pattern"].contents()) == [False, True, False]
    assert max_diff(em, sub, tmp_path / "m.gguf") < GEMMA_TOL
    em.config.layer_types = [{"sliding_attention": "full_attention"}.get(t, "sliding_attention")
                             for t in em.config.layer_types]
    write_gguf(em, make_bpe_tokenizer(), sub, tmp_path / "swapped.gguf")
    em.config.layer_types = make_model(kind, n_layers=4).config.layer_types
    assert max_diff(em, sub, tmp_path / "swapped.gguf") > 10 * GEMMA_TOL


def test_gemma_query_scale_and_norms(tmp_path):
    """Gemma's norms are stored as 1 + weight (as the converter writes them), and a query_pre_attn_scalar
    other than the head size, which llama.cpp's gemma graphs do not read, is folded into the queries."""
    em = elastic(variant("gemma2", query_pre_attn_scalar=32))
    sub = em.space.full()
    write_gguf(em, make_bpe_tokenizer(), sub, tmp_path / "m.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    norm = em.model.model.norm.weight.detach().numpy()
    assert np.allclose(tensors["output_norm.weight"].data, norm + 1)
    assert max_diff(em, sub, tmp_path / "m.gguf") < GEMMA_TOL


@pytest.mark.parametrize("change,words", [
    ({"attn_logit_softcapping": None}, "no soft-capping"),
    ({"hidden_activation": "gelu"}, "the gelu activation"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                          "original_max_position_embeddings": 128}}, "not 'yarn'"),
])
def test_settings_llamacpp_cannot_run_are_refused(change, words, tmp_path):
    em = elastic(variant("gemma2", **change))
    with pytest.raises(FlextronError, match=words) as refused:
        write_gguf(em, make_bpe_tokenizer(), em.space.full(), tmp_path / "m.gguf")
    assert "\n" not in str(refused.value) and "--format hf" in str(refused.value)
    assert not any(tmp_path.iterdir())


class _PerLayerWriter:
    """A GGUFWriter that writes the per-layer MLP widths where the file would hold one."""

    def __init__(self, writer, widths: list[int]):
        self._writer, self._widths = writer, widths

    def add_feed_forward_length(self, _) -> None:
        self._writer.add_feed_forward_length(self._widths)

    def __getattr__(self, name):
        return getattr(self._writer, name)


@pytest.mark.parametrize("kind", ["qwen3", "gemma2", "gemma3", "olmo2", "phi3", "granite", "smollm3-4"])
def test_own_architectures_read_one_mlp_width_for_all_layers(kind, tmp_path, monkeypatch):
    """Why per-layer sub-networks are deci or refused: llama.cpp reads feed_forward_length as a
    per-layer array for every architecture, but these loaders check every layer's tensors against
    layer 0's width and refuse the file."""
    import flextron.gguf as module

    em = elastic(family_model(kind))
    s = em.space
    sub = Subnet(mlp=[s.mlp[0][0]] + [c[2] for c in s.mlp[1:]], attn=[c[-1] for c in s.attn])
    own = write_gguf(em, make_bpe_tokenizer(), em.space.full(), tmp_path / "own.gguf")["architecture"]
    monkeypatch.setattr(module, "gguf_arch", lambda *_: own)
    write_hparams = module._write_hparams
    monkeypatch.setattr(module, "_write_hparams", lambda writer, em, subnet, *rest: write_hparams(
        _PerLayerWriter(writer, layer_counts(em, subnet)[0]), em, subnet, *rest))
    write_gguf(em, make_bpe_tokenizer(), sub, tmp_path / "m.gguf")
    widths = gguf.GGUFReader(tmp_path / "m.gguf").fields[f"{own}.feed_forward_length"].contents()
    assert list(widths) == layer_counts(em, sub)[0] and len(set(widths)) > 1
    with pytest.raises(FlextronError, match="cannot load"):
        llamacpp.load(tmp_path / "m.gguf", n_ctx=64, threads=THREADS, exact=True)


# A per-layer graph where the family has one (deci, openelm); every family's own graph at the full model.
QUANTIZED_CASES = [(kind, "full") for kind in ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma2", "gemma3",
                                                "olmo2", "phi3", "granite", "smollm3-4")]
QUANTIZED_CASES += [("llama", "per_layer"), ("granite", "per_layer"), ("phi3-rotary", "per_layer"),
                    ("qwen3-tied", "per_layer")]


@pytest.mark.parametrize("kind,case", QUANTIZED_CASES)
def test_every_family_runs_at_q4_k_m_close_to_its_f32_export(kind, case, tmp_path):
    """llama.cpp quantizes every architecture the export writes. Hidden size 64: no row is a whole 256-weight
    block, so every quantized matrix falls back (to Q5_0, Q8_0, or F16 where rows are not whole 32-weight
    blocks either; GPT-2's 256-wide MLP output stays a k-quant) and the export says so. Relative logit error
    under 0.3, as tests/test_gguf.py's Q4_K_M bound (observed 0.01-0.16 on these models)."""
    em = elastic(family_model(kind))
    sub, tok = subnet_for(em, case), make_bpe_tokenizer()
    f32 = write_gguf(em, tok, sub, tmp_path / "f32.gguf")
    info = write_gguf(em, tok, sub, tmp_path / "q.gguf", outtype="q4_k_m")
    assert info["architecture"] == f32["architecture"] == EXPECTED.get((kind, case), info["architecture"])
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors
              if len(t.shape) == 2 and t.tensor_type != gguf.GGMLQuantizationType.F32}
    assert info["fallback"] == {n: t for n, t in stored.items() if t not in ("Q4_K", "Q5_K", "Q6_K")} != {}
    assert set(info["fallback"].values()) <= {"Q5_0", "Q8_0", "F16"}
    f, q = gguf_logits(tmp_path / "f32.gguf", IDS), gguf_logits(tmp_path / "q.gguf", IDS)
    error = float(np.linalg.norm(q - f) / np.linalg.norm(f - f.mean(-1, keepdims=True)))
    assert error < 0.3, error
