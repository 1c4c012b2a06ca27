"""GGUF export: a static sub-network as a llama.cpp model file.

Uniform sub-networks get the family's own llama.cpp architecture (`llama`, `qwen2`, `qwen3`,
`gemma2`, `gemma3`, `olmo2`, `phi3`, `granite`, `smollm3`, `gpt2`), with the tensor names, q/k
rotary row order, norm weights, hyper-parameters and tokenizer fields that llama.cpp's
`convert_hf_to_gguf.py` writes for the stock model. Those architectures read one MLP width and
head count for all layers (their loaders check every layer's tensors against layer 0's), so
per-layer sub-networks get llama.cpp's `deci` architecture, whose loader reads the MLP width and
the query / KV head counts as per-layer arrays: pre-norm families without q/k norms only (Phi-3's
fused projections are split for it, Granite's multipliers folded into the weights). Qwen3 with tied
embeddings goes to `openelm`, whose graph computes Qwen3's block (fused q|k|v, per-head q/k norms,
NeoX RoPE) with per-layer counts and reads its output layer from the embeddings. A sub-network at
a smaller hidden size d has `embedding_length` d (head size and RoPE dimensions unchanged, written
explicitly; llama.cpp's gemma graphs scale the embeddings by sqrt(d) as transformers does, so the
HF export's fold holds); qwen2, olmo2 and phi3 size their queries by it, gpt2 its heads. Weights
come from `export.sliced_state_dict`: the slicing rule lives there only; the tokenizer fields from
`gguf_tokenizer`. What llama.cpp cannot express is refused before anything is written.

f32, f16, bf16 and q8_0 are encoded here as llama.cpp's converter encodes them; the other types
(q6_k, q5_k_m, q4_k_m, q4_0) are written as f32 first and quantized by llama.cpp's own quantizer,
with its tensor mix and its fallbacks for rows that are not whole blocks (`fallbacks` reads them back).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.export import hidden_size, kept_layers, layer_sizes, sliced_state_dict
from flextron.fsutil import atomic_write
from flextron.gguf_tokenizer import tokenizer_fields
from flextron.options import OUTTYPES
from flextron.space import Subnet
from flextron.version import __version__

# model_type -> llama.cpp architecture of a uniform sub-network
UNIFORM_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2",
                "gemma2": "gemma2", "gemma3_text": "gemma3", "olmo2": "olmo2", "phi3": "phi3", "granite": "granite",
                "smollm3": "smollm3"}
# Architectures whose rotary layout is llama.cpp's "normal" one: q/k rows are permuted on export.
_PERMUTED = {"llama", "deci", "granite", "smollm3"}
# Architectures whose loader sizes the query projection by the hidden size: query heads x head size = hidden.
_FULL_QUERY = {"qwen2", "olmo2", "phi3"}
# The per-layer architectures: their loaders read per-layer head counts and MLP widths.
PER_LAYER_ARCHS = ("deci", "openelm")
# What `deci` lacks for the other families' blocks.
_NOT_IN_DECI = {"gemma2": "sandwich norms", "gemma3": "sandwich norms or q/k norms",
                "olmo2": "post-norms or q/k norms"}
_GEMMA = {"gemma2", "gemma3"}
# llama.cpp scales Gemma queries by (hidden / heads) ** -0.5 at these layer counts (the 27B models), else by
# head size ** -0.5; the model's own query_pre_attn_scalar is folded into the queries against that.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Every n-th layer of llama.cpp's smollm3 graph has no RoPE; the others all have it.
_SMOLLM3_NO_ROPE_STEP = 4
# The outtypes encoded here; the others are llama.cpp quantizer types.
_ENCODED = ("f32", "f16", "bf16", "q8_0")
# Width of the all-zero FFN that stands for a skipped MLP (it adds exactly 0 to the residual stream).
ZERO_FFN = 32



def layer_counts(em: ElasticModel, subnet: Subnet, arch: str = "deci") -> tuple[list[int], list[int], list[int]]:
    """Per kept layer, what llama.cpp's `arch` reads: feed_forward_length, head_count, head_count_kv.

    The one place sub-network choices become llama.cpp counts. A skipped attention is head_count 0
    (`deci` builds an attention-free layer), except in the first layer, and in every layer of
    `openelm`, which has no attention-free layers: llama.cpp reads the head size only when layer 0 has
    heads, so there it is one KV group whose projections are zero. A skipped MLP in a layer that keeps
    its attention is a zero FFN of `ZERO_FFN` neurons, because `deci` drops the attention output of a
    layer whose feed_forward_length is 0. Zero sub-layers add exactly nothing. Layers that skip both
    are left out, as in the HF export."""
    ff, heads, kv = layer_sizes(em, subnet)
    kept = kept_layers(subnet)
    for j in range(len(heads) if arch == "openelm" else min(1, len(heads))):
        if heads[j] == 0:
            heads[j], kv[j] = em.blocks[kept[j]].geometry.heads_per_unit, 1
    return [w or ZERO_FFN for w in ff], heads, kv


def _zero_tensors(em: ElasticModel, subnet: Subnet, arch: str) -> list[tuple[str, Tensor]]:
    """The all-zero stand-ins `layer_counts` promises for skipped sub-layers that llama.cpp must see."""
    import gguf

    hidden, head_dim = hidden_size(em, subnet), em.blocks[0].geometry.head_dim
    widths, heads, _ = layer_sizes(em, subnet)
    _, counted, _ = layer_counts(em, subnet, arch)
    shapes = []
    for layer in (i for i, h in enumerate(heads) if h == 0 and counted[i]):
        q = counted[layer] * head_dim
        attn = {"ATTN_Q": (q, hidden), "ATTN_K": (head_dim, hidden), "ATTN_V": (head_dim, hidden)}
        if arch == "openelm":  # fused q|k|v and per-head q/k norms
            attn = {"ATTN_QKV": (q + 2 * head_dim, hidden), "ATTN_Q_NORM": (head_dim,), "ATTN_K_NORM": (head_dim,)}
        shapes.append((layer, {"ATTN_NORM": (hidden,), **attn, "ATTN_OUT": (hidden, q)}))
    shapes += [(layer, {"FFN_NORM": (hidden,), "FFN_GATE": (ZERO_FFN, hidden), "FFN_UP": (ZERO_FFN, hidden),
                        "FFN_DOWN": (hidden, ZERO_FFN)}) for layer, w in enumerate(widths) if w == 0]
    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]].format(bid=layer) + ".weight",
             torch.ones(shape) if kind.endswith("NORM") else torch.zeros(shape))
            for layer, tensors in shapes for kind, shape in tensors.items()]


def is_uniform(counts: tuple[list[int], list[int], list[int]]) -> bool:
    return all(len(set(c)) == 1 for c in counts)


def in_own_arch(em: ElasticModel, subnet: Subnet) -> bool:
    """Whether the family's own llama.cpp architecture can hold `subnet` (else only a per-layer one can)."""
    return gguf_arch(em, subnet) not in PER_LAYER_ARCHS


def gguf_arch(em: ElasticModel, subnet: Subnet, per_layer: bool = False) -> str:
    """The llama.cpp architecture `subnet` is written as (`per_layer`: the per-layer one, `deci` or
    `openelm`, even where the family's own would do); FlextronError (one line) where none fits."""
    model_type = em.config.model_type
    if model_type not in UNIFORM_ARCH:
        raise FlextronError(f"GGUF export supports the model types {', '.join(UNIFORM_ARCH)}, not {model_type!r}; "
                            "export with --format hf instead")
    own = UNIFORM_ARCH[model_type]
    counts = layer_counts(em, subnet)
    widths, heads, _ = layer_sizes(em, subnet)
    partial = 0 in widths or 0 in heads  # a layer without MLP or without attention
    kept_full = all(subnet.attn[i] == em.blocks[i].attn.n_units for i in kept_layers(subnet))
    if own == "gpt2" and per_layer:
        raise FlextronError("llama.cpp has no per-layer architecture (deci) for GPT-2; export it with --graph "
                            "auto or own")
    if own == "gpt2" and subnet.hidden is not None:
        raise FlextronError("llama.cpp's gpt2 architecture sizes its heads as hidden size / heads, which a smaller "
                            "hidden size changes; export this sub-network with --format hf")
    if own == "gpt2" and (partial or not is_uniform(counts) or not kept_full):
        raise FlextronError("llama.cpp's gpt2 architecture needs the same MLP width in every layer and all heads "
                            "(head size = hidden / heads); export this sub-network with --format hf")
    narrow = counts[1][0] * em.blocks[0].geometry.head_dim != hidden_size(em, subnet)
    if (is_uniform(counts) and not partial and not per_layer and not (narrow and own in _FULL_QUERY)
            and _rope_layers_fit(em, subnet, own)):
        return own
    if own == "qwen3":
        if getattr(em.config, "tie_word_embeddings", False):
            return "openelm"
        raise FlextronError("llama.cpp's per-layer architecture with q/k norms (openelm) reads the output layer "
                            "from the embeddings, and this Qwen3 has its own; export a sub-network with the same "
                            "widths in every layer and no skipped sub-layer, or use --format hf")
    missing = _not_in_deci(em, subnet, own)
    if missing is not None:
        raise FlextronError(f"llama.cpp's per-layer architecture (deci) has no {missing}, and its {own} architecture "
                            f"needs {_own_needs(own)}; export such a sub-network, or use --format hf")
    return "deci"


def per_layer_graph(em: ElasticModel, subnet: Subnet, graph: str) -> bool:
    """The graph rule of `export --format gguf --graph GRAPH`: whether `subnet` is written in the
    per-layer graph (`deci`) although the family's own could hold it: `deci` asked, or `auto` and the
    checkpoint's llama.cpp table says `deci` decodes it faster. (A sub-network the family's own graph
    cannot hold is written per-layer in any case; `own` refuses it.)"""
    if graph == "own":
        if not in_own_arch(em, subnet):
            raise FlextronError(f"llama.cpp's {em.config.model_type} graph cannot hold this sub-network (per-layer "
                                "sizes or head counts); export it with --graph auto or deci")
        return False
    return graph == "deci" or (em.latency is not None and em.latency.deci_faster(subnet))


def _own_needs(own: str) -> str:
    """What llama.cpp's `own` architecture needs of a sub-network, in words."""
    needs = "the same MLP width and heads in every layer, no skipped sub-layer"
    if own in _FULL_QUERY:
        needs += ", query heads x head size = the hidden size (all query heads at the full hidden size)"
    if own == "smollm3":
        needs += f", RoPE in every layer but every {_SMOLLM3_NO_ROPE_STEP}th"
    return needs


def _has_rope(em: ElasticModel, layer: int) -> bool:
    no_rope = getattr(em.config, "no_rope_layers", None)  # SmolLM3: 1 where the layer has RoPE
    return no_rope is None or bool(no_rope[layer])


def _rope_layers_fit(em: ElasticModel, subnet: Subnet, own: str) -> bool:
    """Whether llama.cpp's `own` graph applies RoPE in exactly the kept layers that have it."""
    kept = kept_layers(subnet)
    if own != "smollm3":
        return all(_has_rope(em, i) for i in kept)
    return [_has_rope(em, i) for i in kept] == [(j + 1) % _SMOLLM3_NO_ROPE_STEP != 0 for j in range(len(kept))]


def _not_in_deci(em: ElasticModel, subnet: Subnet, own: str) -> str | None:
    """What of `subnet` llama.cpp's `deci` graph lacks; None where it runs it exactly."""
    if own in _NOT_IN_DECI:
        return _NOT_IN_DECI[own]
    if _rope_dims(em) != em.blocks[0].geometry.head_dim:
        return "partial RoPE"
    if not all(_has_rope(em, i) for i in kept_layers(subnet) if subnet.attn[i]):
        return "layers without RoPE"
    return None


def _rope_params(em: ElasticModel, layers: str = "full_attention") -> dict:
    """The config's RoPE parameters (of `layers` where it has per-kind RoPE, as Gemma 3)."""
    params = getattr(em.config, "rope_parameters", None) or {}
    return params.get(layers, params)


def _rope_theta(em: ElasticModel, layers: str = "full_attention") -> tuple[float, float | None]:
    """RoPE base and linear scaling factor; RoPE scalings other than linear and Llama 3's (a tensor,
    `_llama3_rope_factors`) are refused."""
    params = _rope_params(em, layers)
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise FlextronError(f"GGUF export supports default, linear and llama3 RoPE, not {kind!r}; export with "
                            "--format hf")
    theta = params.get("rope_theta", getattr(em.config, "rope_theta", 10000.0))
    return float(theta), (float(params["factor"]) if kind == "linear" else None)


def _llama3_rope_factors(em: ElasticModel) -> Tensor | None:
    """Llama 3.x's RoPE frequency factors as llama.cpp's converter writes them (`rope_freqs`); None for
    other RoPE. Long wavelengths are slowed by `factor`, short ones kept, those between interpolated."""
    params = _rope_params(em)
    if params.get("rope_type") != "llama3":
        return None
    dim = em.blocks[0].geometry.head_dim
    freqs = 1.0 / (_rope_theta(em)[0] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, old = params.get("factor", 8.0), params.get("original_max_position_embeddings", 8192)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < old / high, torch.ones_like(freqs),
                       torch.where(wavelen > old / low, torch.full_like(freqs, factor), between))


def _rope_dims(em: ElasticModel) -> int:
    """How many dimensions of each head RoPE rotates (Phi-4-mini: a fraction of them)."""
    params = getattr(em.config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(em.config, "partial_rotary_factor", 1.0))
    return int(em.blocks[0].geometry.head_dim * factor)


def _check_config(em: ElasticModel, arch: str) -> None:
    """Refuse (one line) an HF setting that llama.cpp's `arch` graph would compute differently."""
    cfg = em.config
    own = UNIFORM_ARCH[cfg.model_type]
    _rope_theta(em)
    act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    window = getattr(cfg, "sliding_window", None) or cfg.max_position_embeddings
    want = "gelu_pytorch_tanh" if own in _GEMMA else "silu"
    problem = None
    if act != want:
        problem = f"the {act} activation (llama.cpp's {arch} graph uses {want})"
    elif own == "gemma2" and None in (cfg.attn_logit_softcapping, cfg.final_logit_softcapping, cfg.sliding_window):
        problem = "no soft-capping or no sliding window (llama.cpp's gemma2 graph always has them)"
    elif own == "gemma2" and not cfg.tie_word_embeddings:
        problem = "an output layer apart from the embeddings (llama.cpp's gemma2 graph reuses them)"
    elif own == "gemma3" and cfg.attn_logit_softcapping is not None:
        problem = "attention soft-capping (llama.cpp's gemma3 graph has none)"
    elif own == "gemma3" and _rope_theta(em, "sliding_attention")[1] is not None:
        problem = "scaled RoPE in its sliding-window layers (llama.cpp's gemma3 graph scales none there)"
    elif own in ("phi3", "llama") and window < cfg.max_position_embeddings:  # Phi-3, Mistral 7B v0.1
        problem = f"a sliding window of {window} tokens (llama.cpp's {own} graph ignores it)"
    elif _llama3_rope_factors(em) is not None and arch not in ("llama", "deci"):
        problem = f"Llama 3 RoPE scaling (llama.cpp's {arch} graph reads no frequency factors)"
    elif own not in _GEMMA and getattr(cfg, "use_sliding_window", False):
        problem = f"sliding-window layers (llama.cpp's {arch} graph has none)"
    if problem is not None:
        raise FlextronError(f"this {cfg.model_type} model has {problem}; export with --format hf instead")


def permute_rotary(w: Tensor, n_head: int) -> Tensor:
    """HF's half-split rotary rows -> llama.cpp's interleaved pairs, per head (as its converter does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layer(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def _gemma_query_scale(em: ElasticModel, subnet: Subnet, arch: str) -> float:
    """The factor on Gemma's queries that turns llama.cpp's attention scale into query_pre_attn_scalar ** -0.5
    (1 for the stock models)."""
    _, heads, _ = layer_counts(em, subnet)
    llamacpp = em.blocks[0].geometry.head_dim
    if len(kept_layers(subnet)) == _GEMMA_27B_LAYERS[arch]:
        llamacpp = hidden_size(em, subnet) // heads[0]
    return (llamacpp / em.config.query_pre_attn_scalar) ** 0.5


def _unfused(em: ElasticModel, subnet: Subnet, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Phi-3's fused q|k|v and gate|up as the separate projections `deci` reads."""
    _, heads, kv = layer_sizes(em, subnet)
    head_dim = em.blocks[0].geometry.head_dim
    out = {}
    for name, t in state.items():
        if ".qkv_proj." in name:
            layer = _layer(name)
            parts = t.split([heads[layer] * head_dim, kv[layer] * head_dim, kv[layer] * head_dim])
            out.update({name.replace("qkv_proj", p): w for p, w in zip(("q_proj", "k_proj", "v_proj"), parts)})
        elif ".gate_up_proj." in name:
            out.update(zip((name.replace("gate_up", "gate"), name.replace("gate_up", "up")), t.chunk(2)))
        else:
            out[name] = t
    return out


def _folded_multipliers(em: ElasticModel, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Granite's embedding, attention, residual and logit multipliers folded into the weights, for
    `deci`, which has none: the same function, written as plain Llama weights."""
    cfg = em.config
    residual = cfg.residual_multiplier
    query = cfg.attention_multiplier * em.blocks[0].geometry.head_dim ** 0.5  # deci scales by head size ** -0.5
    factors = {"embed_tokens.weight": cfg.embedding_multiplier, "lm_head.weight": 1 / cfg.logits_scaling,
               "q_proj.weight": query, "q_proj.bias": query, "o_proj.weight": residual, "o_proj.bias": residual,
               "down_proj.weight": residual, "down_proj.bias": residual}
    return {name: t * factors.get(".".join(name.split(".")[-2:]), 1.0) for name, t in state.items()}


def _weights(em: ElasticModel, subnet: Subnet, arch: str) -> dict[str, Tensor]:
    """The sub-network's HF-named weights as llama.cpp's `arch` reads them."""
    own = UNIFORM_ARCH[em.config.model_type]
    state = sliced_state_dict(em, subnet)
    folded = arch == "deci" and own == "granite"
    if arch == "deci" and own == "phi3":
        state = _unfused(em, subnet, state)
    if folded:
        state = _folded_multipliers(em, state)
    if arch in _GEMMA:
        scale = _gemma_query_scale(em, subnet, arch)
        for name, t in state.items():
            t = t + 1 if name.endswith("norm.weight") else t  # Gemma's RMSNorm multiplies by 1 + weight
            state[name] = t * scale if (".q_norm." if arch == "gemma3" else ".q_proj.") in name else t
    # A tied output layer is read from the embeddings, except where llama.cpp needs it apart.
    if getattr(em.config, "tie_word_embeddings", False) and not (arch == "olmo2" or folded):
        state.pop("lm_head.weight", None)
    return {name: t for name, t in state.items() if "rotary_emb" not in name}


def _tensors(em: ElasticModel, subnet: Subnet, arch: str) -> list[tuple[str, Tensor]]:
    import gguf

    _, heads, kv = layer_counts(em, subnet, arch)
    # openelm's tensors are qwen3's with q|k|v fused (`_fused_qkv`); its name map knows OpenELM's HF names only.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH["QWEN3" if arch == "openelm" else arch.upper()],
                                     em.space.n_layers)
    out = []
    for name, t in _weights(em, subnet, arch).items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise FlextronError(f"no llama.cpp tensor for {name}; export with --format hf instead")
        if arch in _PERMUTED and (".q_proj." in name or ".k_proj." in name):
            layer = _layer(name)
            t = permute_rotary(t, heads[layer] if ".q_proj." in name else kv[layer])
        if arch == "gpt2" and t.ndim == 2 and name.startswith("transformer.h."):
            t = t.T  # Conv1D stores [in, out]
        out.append((target, t.detach().float().cpu()))
    factors = _llama3_rope_factors(em)
    if factors is not None:
        out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors))
    out = _fused_qkv(out) if arch == "openelm" else out
    return out + _zero_tensors(em, subnet, arch)


def _fused_qkv(tensors: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """Each layer's attn_q, attn_k and attn_v as one attn_qkv (q rows, then k, then v), as `openelm` reads them."""
    parts = {name: t for name, t in tensors if name.split(".")[-2] in ("attn_q", "attn_k", "attn_v")}
    out = [(name, t) for name, t in tensors if name not in parts]
    for q in (name for name in parts if ".attn_q." in name):
        out.append((q.replace(".attn_q.", ".attn_qkv."),
                    torch.cat([parts[q], parts[q.replace("_q.", "_k.")], parts[q.replace("_q.", "_v.")]])))
    return out


def _encode(name: str, t: Tensor, outtype: str) -> tuple[np.ndarray, object]:
    """The array and GGML type llama.cpp's converter stores `t` as for `outtype`."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    data = t.numpy()
    if data.ndim <= 1 or name.endswith("_norm.weight") or outtype == "f32":
        return data.astype(np.float32, copy=False), Q.F32
    if outtype == "f16":
        return data.astype(np.float16), Q.F16
    qtype = Q.BF16 if outtype == "bf16" else Q.Q8_0
    try:
        return quants.quantize(data, qtype), qtype
    except quants.QuantError:  # rows not a multiple of the block: the converter falls back to f16
        return data.astype(np.float16), Q.F16


def _nominal(outtype: str):
    """The GGML type an `outtype` file nominally stores its weight matrices in (llama.cpp's k-quant mixes
    keep some in a larger k-type, and all put norms and other vectors in f32)."""
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q6_k": Q.Q6_K, "q5_k_m": Q.Q5_K,
            "q4_k_m": Q.Q4_K, "q4_0": Q.Q4_0}[outtype]


def fallbacks(path: Path, outtype: str) -> dict[str, str]:
    """The quantized tensors of the GGUF at `path` whose rows are not whole blocks of `outtype`'s nominal
    type (256 weights for the k-quants, 32 for q8_0 and q4_0), each with the type it is stored in: what
    llama.cpp's quantizer (or, for q8_0, its converter) fell back to for them."""
    import gguf

    block = gguf.GGML_QUANT_SIZES[_nominal(outtype)][0]
    if block == 1:
        return {}
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors
            if len(t.shape) >= 2 and t.shape[0] % block and t.tensor_type != gguf.GGMLQuantizationType.F32}


def _file_type(outtype: str):
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[outtype]


def _write_hparams(writer, em: ElasticModel, subnet: Subnet, arch: str, outtype: str) -> None:
    cfg = em.config
    ff, heads, kv = layer_counts(em, subnet, arch)
    if arch == "gpt2":
        writer.add_block_count(len(kept_layers(subnet)))
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(ff[0])
        writer.add_head_count(heads[0])
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
        writer.add_file_type(_file_type(outtype))
        return
    head_dim = em.blocks[0].geometry.head_dim
    theta, linear = _rope_theta(em)
    uniform = arch not in PER_LAYER_ARCHS
    writer.add_block_count(len(kept_layers(subnet)))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(hidden_size(em, subnet))
    writer.add_feed_forward_length(ff[0] if uniform else ff)
    writer.add_head_count(heads[0] if uniform else heads)
    writer.add_head_count_kv(kv[0] if uniform else kv)
    writer.add_rope_freq_base(theta)
    if linear is not None:
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(_file_type(outtype))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(_rope_dims(em))
    _write_family_hparams(writer, em, subnet, arch)


def _write_family_hparams(writer, em: ElasticModel, subnet: Subnet, arch: str) -> None:
    """What llama.cpp's `arch` reads beyond the Llama hyper-parameters, from the HF config."""
    cfg = em.config
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    if arch in _GEMMA and cfg.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch in _GEMMA and cfg.sliding_window is not None:
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([cfg.layer_types[i] == "sliding_attention" for i in kept_layers(subnet)])
    if arch == "gemma3":
        writer.add_rope_freq_base_swa(_rope_theta(em, "sliding_attention")[0])
    if arch == "granite":
        writer.add_attention_scale(cfg.attention_multiplier)
        writer.add_embedding_scale(cfg.embedding_multiplier)
        writer.add_residual_scale(cfg.residual_multiplier)
        writer.add_logit_scale(cfg.logits_scaling)
    if arch == "phi3":
        writer.add_sliding_window(cfg.sliding_window or 0)  # 0: no window, as the converter writes
        if getattr(cfg, "original_max_position_embeddings", None):
            writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)


def write_gguf(em: ElasticModel, tokenizer: PreTrainedTokenizerBase, subnet: Subnet, out: Path,
               outtype: str = "f32", overwrite: bool = False, name: str = "flextron", info: dict | None = None,
               per_layer: bool = False) -> dict:
    """Write `subnet` as one GGUF file at `out` (atomically); returns what was written, with the
    tensors whose types fell back from `outtype`'s (`fallbacks`).

    `info` (e.g. source checkpoint, budget) is stored as `flextron.*` metadata strings. `per_layer`
    writes llama.cpp's `deci` even for a sub-network the family's own architecture can hold (the
    two run at different speeds: benchmarks/gguf_arch.py)."""
    import gguf

    if outtype not in OUTTYPES:
        raise FlextronError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    out = Path(out)
    if out.is_dir() or (out.exists() and not overwrite):
        raise FlextronError(f"{out} already exists; pass --overwrite or choose another --out")
    em.space.validate(subnet)
    arch = gguf_arch(em, subnet, per_layer)
    if arch != "gpt2":
        _check_config(em, arch)  # refuse what llama.cpp would run differently before any work
    write_tokenizer = tokenizer_fields(tokenizer, em.config.vocab_size)
    tensors = _tensors(em, subnet, arch)

    def write(tmp: Path, outtype: str = outtype) -> None:
        if outtype not in _ENCODED:  # llama.cpp quantizes an f32 export, written beside its output and removed
            from flextron.llamacpp_binding import quantize

            source = tmp.with_name(f"{tmp.name}-f32")
            try:
                write(source, "f32")
                quantize(source, tmp, outtype)
            finally:
                source.unlink(missing_ok=True)
            return
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_string("flextron.version", __version__)
        writer.add_string("flextron.subnet", json.dumps(subnet.to_dict()))
        for key, value in (info or {}).items():
            if value is not None:
                writer.add_string(f"flextron.{key}", str(value))
        _write_hparams(writer, em, subnet, arch, outtype)
        write_tokenizer(writer)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tname, t in tensors:
            data, qtype = _encode(tname, t, outtype)
            writer.add_tensor(tname, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(out, write)
    return {"path": str(out), "architecture": arch, "outtype": outtype, "per_layer": arch in PER_LAYER_ARCHS,
            "bytes": out.stat().st_size, "fallback": fallbacks(out, outtype)}
