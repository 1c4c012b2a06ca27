"""What a sub-network occupies deployed in llama.cpp (the `memory_mb` budget metric, `flextron.cost`):
its weights as the GGUF stores them at a weight type, its KV cache, and the buffers llama.cpp
allocates beside them, at a `Deployment` (weight type, context, batch, KV cache type).

- weights: every tensor at the type flextron's GGUF writer encodes it in (f32, f16, bf16, q8_0, as
  llama.cpp's converter does) or llama.cpp's quantizer picks for it (q4_0, q6_k, q5_k_m, q4_k_m:
  `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp): the k-quant mixes put attn_v (or a
  fused attn_qkv) and ffn_down in q6_k in the layers `use_more_bits` names and the output layer in
  q6_k, and a row whose length the type's block does not divide falls back (q4_k to q5_0, q5_k to
  q5_1, q6_k to q8_0, a 32-block type to f16). Vectors (norms, biases) stay f32 (`tensor_type`).
- KV cache: keys and values of every KV head kept, for each sequence's `context` cells (llama.cpp
  pads them to 256) at `kv_type`, in every layer that keeps its attention. Sliding-window layers
  count the full context, as llama.cpp's C API and llama-cpp-python allocate them (`swa_full`;
  llama-server's default keeps them to the window plus a micro-batch).
- runtime: the logits of one output per sequence and the compute buffer llama.cpp reserves for a
  micro-batch of min(512, cells) tokens with flash attention (`-fa auto` runs it on CPUs):
  `compute_bytes`, an estimate tested against the sizes llama.cpp reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from flextron.deployment import Deployment
from flextron.errors import FlextronError

if TYPE_CHECKING:
    from flextron.elastic import ElasticLinear, ElasticModel, ElasticPart
    from flextron.space import Subnet

_CONVERTED = ("f32", "f16", "bf16", "q8_0")  # encoded by flextron.gguf itself; the rest by llama.cpp's quantizer
_DEFAULT_TYPE = {"q6_k": "q6_k", "q5_k_m": "q5_k", "q4_k_m": "q4_k", "q4_0": "q4_0"}  # llama_ftype_get_default_type
_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}  # tensor_type_fallback
def block(ggml_type: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGML type (gguf's table, llama.cpp's block sizes)."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type.upper()]]


def row_bytes(ggml_type: str, n: int) -> int:
    """Bytes of a row of `n` values stored as `ggml_type` (whole blocks only, as ggml requires)."""
    size, nbytes = block(ggml_type)
    if n % size:
        raise FlextronError(f"a row of {n} values is not a whole number of {ggml_type} blocks of {size}")
    return n // size * nbytes


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's k-quant mixes: whether the i-th of n attn_v / ffn_down tensors gets more bits."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def category(name: str) -> str:
    """llama.cpp's quantization category of a GGUF tensor name (`tensor_get_category`, in its order)."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for kind in ("attn_qkv.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_output.weight",
                 "ffn_up", "ffn_gate", "ffn_down"):
        if kind in name:
            return kind.removesuffix(".weight")
    return "other"


def tensor_type(name: str, shape: tuple[int, ...], weight_type: str, index: int = 0, count: int = 1,
                tied: bool = False) -> str:
    """The GGML type of GGUF tensor `name` of `shape` (GGUF order: row length first) in a file at
    `weight_type`. `index` of `count`: its place among the file's attn_v (or attn_qkv) tensors, or
    its layer among the blocks for ffn_down, which the k-quant mixes read; `tied`: the file has no
    output.weight, so the token embeddings are quantized as the output layer."""
    ne0 = shape[0]
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return "f32"
    if weight_type in _CONVERTED:  # flextron.gguf's encoding: q8_0 falls back to f16 as the converter does
        return "f16" if weight_type == "q8_0" and ne0 % 32 else weight_type
    if not name.endswith("weight") or name == "position_embd.weight":
        return "f32"  # not quantized: as the f32 export has it
    kind, chosen = category(name), _DEFAULT_TYPE[weight_type]
    if kind == "output" or (tied and kind == "token_embd"):
        chosen = "q8_0" if ne0 % block(chosen)[0] else "q6_k"
    elif kind in ("attn_v", "attn_qkv", "ffn_down") and weight_type in ("q4_k_m", "q5_k_m"):
        chosen = "q6_k" if use_more_bits(index, count) else chosen
    if ne0 % block(chosen)[0]:
        chosen = _FALLBACK.get(chosen, chosen)
        chosen = "f16" if ne0 % block(chosen)[0] else chosen
    return chosen


def tensor_bytes(name: str, shape: tuple[int, ...], weight_type: str, index: int = 0, count: int = 1,
                 tied: bool = False) -> int:
    """Bytes of the tensor (`tensor_type`'s arguments)."""
    rows = 1
    for n in shape[1:]:
        rows *= n
    return row_bytes(tensor_type(name, shape, weight_type, index, count, tied), shape[0]) * rows


def _own_arch(em: ElasticModel) -> str:
    """The family's own llama.cpp architecture (that of its uniform GGUF exports)."""
    from flextron.families import PER_LAYER_PREFIX
    from flextron.gguf import UNIFORM_ARCH

    model_type = em.config.model_type.removeprefix(PER_LAYER_PREFIX)
    if model_type not in UNIFORM_ARCH:
        raise FlextronError(f"a {model_type} model has no llama.cpp architecture, so its llama.cpp memory cannot be "
                            "priced; give a params, flops, kv_bytes or decode_bytes budget")
    return UNIFORM_ARCH[model_type]


def gguf_names(em: ElasticModel) -> dict[int, str]:
    """The GGUF tensor name (in the family's own llama.cpp architecture) of each model weight, by id."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[_own_arch(em).upper()], len(em.blocks))
    out = {}
    for hf, p in em.model.named_parameters():
        target = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if target is not None:
            out[id(p)] = target
    return out


def per_layer_arch(em: ElasticModel) -> str | None:
    """The llama.cpp architecture the family's per-layer sub-networks are written in (deci, or openelm
    for a tied Qwen3; `flextron.gguf`); None where it has none (only uniform sub-networks export)."""
    from flextron.gguf import gguf_arch

    try:
        return gguf_arch(em, em.space.full(), per_layer=True)
    except FlextronError:
        return None


def regrouped(em: ElasticModel, graph: str) -> bool:
    """Whether the per-layer `graph` stores the weights in other tensors than the family's own
    architecture: openelm fuses q|k|v, deci splits Phi-3's fused q|k|v and gate|up and writes a tied
    Granite's output layer apart (`_tied`)."""
    fused = any(len(lin.layout) > 1 for b in em.blocks for lin in b.attn.linears + b.mlp.linears)
    return graph == "openelm" or fused or _tied(em, None) != _tied(em, graph)


def _tied(em: ElasticModel, graph: str | None) -> bool:
    """Whether `graph` (None: the family's own) reads the output layer from the token embeddings: a tied
    model's, except in olmo2 and in a Granite's deci, which fold its multipliers (`flextron.gguf`)."""
    own = _own_arch(em)
    return getattr(em.config, "tie_word_embeddings", False) and own != "olmo2" and not (
        graph == "deci" and own == "granite")


def in_own_graph(em: ElasticModel, subnet: Subnet) -> bool:
    """Whether `export --format gguf` writes `subnet` in the family's own architecture (`--graph auto`)."""
    from flextron.gguf import in_own_arch, per_layer_graph

    try:
        return in_own_arch(em, subnet) and not per_layer_graph(em, subnet, "auto")
    except FlextronError:
        return False


def _tensors(lin: ElasticLinear, spans: list, hidden: int | None, name: str, graph: str | None
             ) -> list[tuple[str, tuple[int, int]]]:
    """The GGUF tensors (name, shape) holding projection `lin`'s active features in `graph` (None: the
    family's own architecture, whose name `name` is)."""
    stream = hidden or lin.weight.shape[lin.hdim]
    blocks = [sum(count for _, count in runs) * unit for (unit, _), runs in zip(lin.layout, spans)]
    if lin.side == "in":
        return [(name, (sum(blocks), stream))]
    kind = name.split(".")[-2]
    if graph == "openelm" and kind in ("attn_q", "attn_k", "attn_v"):
        return [(name.replace(f".{kind}.", ".attn_qkv."), (stream, sum(blocks)))]
    if graph == "deci" and len(blocks) > 1:  # Phi-3's q|k|v and gate|up, split
        parts = ("attn_q", "attn_k", "attn_v") if kind == "attn_qkv" else ("ffn_gate", "ffn_up")
        return [(name.replace(f".{kind}.", f".{part}."), (stream, f)) for part, f in zip(parts, blocks)]
    return [(name, (stream, sum(blocks)))]


def part_bytes(part: ElasticPart, layer: int, n_layers: int, units: int, hidden: int | None, weight_type: str,
               names: dict[int, str], graph: str | None = None) -> int:
    """Weight bytes of a block's MLP or attention at choice `units` and hidden size `hidden` (None: the
    full one) in layer `layer` of `n_layers`, as `graph` (None: the family's own architecture) stores
    them: its projections at their `tensor_type`, the rest (biases, norms) in f32. 0 units: none."""
    if units == 0:
        return 0
    total = matrix = 0
    for lin in part.linears:
        spans = part.plan(lin, units)
        for name, shape in _tensors(lin, spans, hidden, names[id(lin.weight)], graph):
            total += tensor_bytes(name, shape, weight_type, layer, n_layers)
            matrix += shape[0] * shape[1]
    return total + 4 * (part.n_params(units, hidden=hidden) - matrix)


def kv_bytes(kv_heads: int, head_dim: int, deployment: Deployment) -> int:
    """KV cache bytes of one layer keeping `kv_heads` KV heads: keys and values of every cell."""
    if kv_heads == 0:
        return 0
    try:
        row = row_bytes(deployment.kv_type, kv_heads * head_dim)
    except FlextronError:
        raise FlextronError(f"a {deployment.kv_type} KV cache needs rows of whole blocks; {kv_heads} KV heads of "
                            f"{head_dim} values are not: use --kv-type f16") from None
    return 2 * row * deployment.seq_cells * deployment.batch


def embedding_bytes(em: ElasticModel, hidden: int | None, weight_type: str, graph: str | None = None) -> int:
    """The token (and position) embeddings and the output layer at hidden size `hidden`, and the
    final norm: the weights outside the blocks, as `graph` (None: the family's own) stores them."""
    model, d = em.model, hidden or em.hidden_size
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is None or _tied(em, graph)
    total = tensor_bytes("token_embd.weight", (d, inp.weight.shape[0]), weight_type, tied=tied)
    if not tied:
        total += tensor_bytes("output.weight", (d, out.weight.shape[0]), weight_type)
    for m in model.modules():  # position embeddings (GPT-2)
        if m is not inp and isinstance(m, nn.Embedding):
            total += tensor_bytes("position_embd.weight", (d, m.weight.shape[0]), weight_type)
    norm = sum(p.numel() for p in model.get_submodule(em.family.final_norm).parameters())
    return total + 4 * norm * d // em.hidden_size


def compute_bytes(em: ElasticModel, hidden: int | None, deployment: Deployment) -> int:
    """llama.cpp's compute buffer (estimated) and output buffer at hidden size `hidden`. The compute
    buffer holds, for a micro-batch of T tokens, the largest of: its logits beside two hidden-size
    vectors; one layer's MLP (three intermediate vectors, four hidden-size ones) or its attention
    (three hidden-size vectors, two of the queries' and two of the keys' width) beside the f16
    attention mask [cells, T]. At the full model's widest layer: a narrower sub-network is priced alike."""
    d, t = hidden or em.hidden_size, deployment.ubatch
    vocab = em.config.vocab_size
    ff = max(b.mlp.inp.weight.shape[b.mlp.inp.edim] if b.mlp.inp is not None else 0 for b in em.blocks)
    heads = [b.attn_heads(b.attn.n_units) for b in em.blocks]
    hd = max(b.geometry.head_dim for b in em.blocks)
    q, kv = max(h for h, _ in heads) * hd, max(k for _, k in heads) * hd
    mask = 2 * deployment.seq_cells * t
    compute = max(4 * t * (vocab + 2 * d), mask + 4 * t * (3 * ff + 4 * d), mask + 4 * t * (3 * d + 2 * q + 2 * kv))
    return compute + 4 * vocab * deployment.batch
