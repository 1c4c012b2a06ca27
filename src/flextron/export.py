"""Export: slice a static sub-network out of an elastic model into a standalone HF model directory.

Layers whose attention and MLP are both skipped are left out (the others renumbered). Uniform
widths give the family's stock architecture, which plain `transformers` loads; at a smaller hidden
size too, with that `hidden_size` and an explicit `head_dim` (the head size never changes). Per-layer
widths, a layer without attention or without MLP, or head counts the stock config cannot
express (GPT-2 ties the head size to hidden / heads; strict HF configs refuse some head
counts), give a per-layer architecture from
`flextron.modeling_flextron`: its code is written beside the weights and `config.json` maps
the Auto classes to it, so `trust_remote_code=True` loads it without flextron, and importing
this module registers it with `AutoConfig` / `AutoModelForCausalLM`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.fsutil import atomic_dir, file_sha256
from flextron.modeling_flextron import PER_LAYER
from flextron.space import Subnet
from flextron.version import __version__

EXPORT_MANIFEST = "flextron_export.json"
# Config lists with one entry per layer (attention kind; SmolLM3's RoPE on/off): renumbered with the layers.
_LAYERWISE_KEYS = ("layer_types", "no_rope_layers")
MODELING_FILE = "modeling_flextron.py"


def register() -> None:
    """Make `AutoConfig` and `AutoModelForCausalLM` load the per-layer architectures."""
    for config_cls, model_cls in PER_LAYER.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


register()


def kept_layers(subnet: Subnet) -> list[int]:
    """The layers that keep their attention or their MLP."""
    return [i for i, (w, a) in enumerate(zip(subnet.mlp, subnet.attn)) if w or a]


def sliced_state_dict(em: ElasticModel, subnet: Subnet) -> dict[str, Tensor]:
    """The elastic model's state dict with every elastic projection cut to `subnet`; skipped
    sub-layers (and their norms) left out, skipped layers too, the other layers renumbered. At a
    smaller hidden size, every tensor of the residual stream is cut to it too (`_cut_stream`)."""
    names = {id(m): n for n, m in em.model.named_modules()}
    state = dict(em.model.state_dict())
    dropped = []
    with torch.no_grad(), em.subnet(subnet):  # each projection then holds exactly what its forward runs
        for block, width, units in zip(em.blocks, subnet.mlp, subnet.attn):
            for part, k in ((block.mlp, width), (block.attn, units)):
                if k == 0:
                    dropped += [f"{names[id(m)]}." for m in (part.module, *part.norms)]
                    continue
                for norm, lin in part.projection_norms:  # OLMo 2's q/k norms: cut with their projection
                    state[f"{names[id(norm)]}.weight"] = lin.take(norm.weight, 0).clone()
                for lin in part.linears:
                    state[f"{names[id(lin)]}.weight"] = lin.take(lin.weight, lin.edim).clone()
                    # An "in" projection's bias is added after the reduction over units: it stays whole.
                    if lin.bias is not None and lin.side == "out":
                        state[f"{names[id(lin)]}.bias"] = lin.take(lin.bias, 0).clone()
    if subnet.hidden is not None:
        _cut_stream(em, state, names, subnet.hidden)
    prefix = f"{em.family.layers}."
    renumber = {str(old): str(new) for new, old in enumerate(kept_layers(subnet))}
    out = {}
    for key, value in state.items():
        if key.startswith(tuple(dropped)):
            continue
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if index not in renumber:
                continue
            key = f"{prefix}{renumber[index]}.{rest}"
        out[key] = value
    return out


def _cut_stream(em: ElasticModel, state: dict[str, Tensor], names: dict[int, str], d: int) -> None:
    """Cut every tensor of the residual stream in `state` to its first `d` channels, as the elastic
    model's hard slice runs them (`flextron.hidden`): the embeddings and the LM head their columns,
    projections reading the stream their input columns, those writing it their output rows and biases,
    the norms over it their weights and biases. A tied LM head stays one tensor with the embeddings."""
    axis = em.axis
    dims = {f"{names[id(m)]}.weight": 1 for m in (*axis.embeddings, axis.head)}
    dims |= {f"{names[id(lin)]}.weight": lin.hdim for lin in (*axis.readers, *axis.writers)}
    dims |= {f"{names[id(lin)]}.bias": 0 for lin in axis.writers if lin.bias is not None}
    dims |= {f"{names[id(n)]}.{k}": 0 for n in axis.norms for k in ("weight", "bias")
             if getattr(n, k, None) is not None}
    cut: dict[tuple, Tensor] = {}  # by source tensor: tied weights give one tensor
    for key, dim in dims.items():
        if key in state:  # the norms of skipped sub-layers are not
            t = state[key]
            state[key] = cut.setdefault((t.data_ptr(), t.shape, dim), t.narrow(dim, 0, d))
    if em.family.name == "gemma":
        _fold_embedding_scale(em, state, names, d)


def _fold_embedding_scale(em: ElasticModel, state: dict[str, Tensor], names: dict[int, str], d: int) -> None:
    """Gemma multiplies its embeddings by sqrt(hidden_size) (transformers and llama.cpp alike): the
    elastic model keeps sqrt(D) at every hidden size, the stock model of hidden size d uses sqrt(d).
    The exported embeddings are multiplied by sqrt(D / d), so its residual stream is the elastic
    model's exactly (every norm sees the same input: no eps caveat). A tied LM head reads that same
    tensor, so the final norm's output is multiplied by c = sqrt(d / D) against it: Gemma's norm
    multiplies by 1 + w, so w -> c (1 + w) - 1. An untied head is left as it is."""
    model = em.model
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    c = (d / em.hidden_size) ** 0.5
    scaled = state[f"{names[id(emb)]}.weight"] / c
    state[f"{names[id(emb)]}.weight"] = scaled
    if head.weight is emb.weight:
        state[f"{names[id(head)]}.weight"] = scaled
        norm = f"{em.family.final_norm}.weight"
        state[norm] = c * (1 + state[norm]) - 1


def hidden_size(em: ElasticModel, subnet: Subnet) -> int:
    """The width of `subnet`'s residual stream."""
    return subnet.hidden or em.hidden_size


def layer_sizes(em: ElasticModel, subnet: Subnet) -> tuple[list[int], list[int], list[int]]:
    """Per kept layer: MLP width, query heads, KV heads of `subnet`."""
    kept = kept_layers(subnet)
    heads = [em.blocks[i].attn_heads(subnet.attn[i]) for i in kept]
    return [subnet.mlp[i] for i in kept], [h for h, _ in heads], [kv for _, kv in heads]


def _base_values(em: ElasticModel, subnet: Subnet) -> dict:
    """The source config's values with the layer count (and per-layer lists) of the kept layers, and the
    hidden size of `subnet` with the head size explicit (no longer hidden / heads; GPT-2's per-layer
    architecture reads it too)."""
    values = em.config.to_dict()
    if subnet.hidden is not None:
        values[em.config.attribute_map.get("hidden_size", "hidden_size")] = subnet.hidden
        values[em.family.head_dim_key or "head_dim"] = em.blocks[0].geometry.head_dim
    kept = kept_layers(subnet)
    if len(kept) < em.space.n_layers and values.get("scale_attn_by_inverse_layer_idx"):
        raise FlextronError("this GPT-2 scales attention by the layer index, so its layers cannot be renumbered; "
                            "export a sub-network that keeps every layer")
    values[em.family.n_layers_key] = len(kept)
    for key in _LAYERWISE_KEYS:
        if isinstance(values.get(key), list):
            values[key] = [values[key][i] for i in kept]
    return values


def _stock_config(em: ElasticModel, subnet: Subnet) -> PreTrainedConfig | None:
    """The family's own config for a uniform sub-network; None where it cannot express it."""
    widths, heads, kv = layer_sizes(em, subnet)
    if len(set(widths)) > 1 or len(set(heads)) > 1 or len(set(kv)) > 1 or 0 in widths or 0 in heads:
        return None
    fam = em.family
    full_attn = all(a == b.attn.n_units for b, a in zip(em.blocks, subnet.attn) if a)
    values = _base_values(em, subnet)
    values[fam.mlp_width_key] = widths[0]
    if fam.head_dim_key is None and (not full_attn or subnet.hidden is not None):  # GPT-2: head size = hidden / heads
        return None
    if not full_attn:
        values[fam.heads_key] = heads[0]
        values[fam.head_dim_key] = em.blocks[0].geometry.head_dim
        if fam.kv_heads_key is not None:
            values[fam.kv_heads_key] = kv[0]
    try:
        return type(em.config).from_dict(values)
    except Exception:  # strict HF validation (e.g. hidden size not a multiple of the heads): go per-layer
        return None


def _per_layer_config(em: ElasticModel, subnet: Subnet) -> PreTrainedConfig:
    base = em.config.model_type
    if base not in PER_LAYER:
        raise FlextronError(
            f"per-layer export supports the model types {', '.join(PER_LAYER)}, not {base!r}; "
            "export a uniform sub-network (the same choice in every layer) instead"
        )
    n_head = getattr(em.config, "n_head", None)
    if base == "gpt2" and subnet.hidden is not None and subnet.hidden % n_head:
        raise FlextronError(f"transformers' GPT-2 attention needs a hidden size that its {n_head} heads divide, not "
                            f"{subnet.hidden}; export a sub-network at another hidden size")
    widths, heads, kv = layer_sizes(em, subnet)
    values = {k: v for k, v in _base_values(em, subnet).items() if k not in ("model_type", "auto_map", "architectures")}
    values.update(layer_intermediate_sizes=widths, layer_num_attention_heads=heads, layer_num_key_value_heads=kv)
    return PER_LAYER[base][0].from_dict(values)


def build_model(em: ElasticModel, subnet: Subnet) -> nn.Module:
    """A standalone HF model holding exactly the weights of `subnet`."""
    config = _stock_config(em, subnet)
    model_cls = type(em.model) if config is not None else None
    if config is None:
        config = _per_layer_config(em, subnet)
        model_cls = PER_LAYER[em.config.model_type][1]
    dtype = next(em.model.parameters()).dtype
    with no_init_weights():  # every weight is loaded right after
        model = model_cls(config)
    model = model.to(dtype)
    model.load_state_dict(sliced_state_dict(em, subnet), strict=True)
    model.generation_config = copy.deepcopy(em.model.generation_config)
    return model.eval()


def export(em: ElasticModel, tokenizer: PreTrainedTokenizerBase, subnet: Subnet, out: Path,
           overwrite: bool = False, info: dict | None = None) -> Path:
    """Write `subnet` as a standalone HF directory (weights, config, tokenizer, generation config).

    `info` is added to the directory's `flextron_export.json` (e.g. source checkpoint, budget, cost).
    """
    em.space.validate(subnet)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        model = build_model(em, subnet)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "flextron_version": __version__,
            "family": em.family.name,
            "architecture": type(model).__name__,
            "per_layer": type(model).__name__ in {m.__name__ for _, m in PER_LAYER.values()},
            "subnet": subnet.to_dict(),
            **(info or {}),
        }
        if (tmp / MODELING_FILE).is_file():  # what `trust_remote_code=True` would run: recorded, checked on load
            manifest["modeling_sha256"] = file_sha256(tmp / MODELING_FILE)
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Path(out)


def read_export_info(path: Path) -> dict:
    """The `flextron_export.json` of an exported directory."""
    try:
        info = json.loads((Path(path) / EXPORT_MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise FlextronError(f"{path} is not a flextron export ({e})") from None
    if not isinstance(info, dict):
        raise FlextronError(f"{path}/{EXPORT_MANIFEST} is not a JSON object; re-run `flextron export`")
    return info


def verify_export(path: Path) -> None:
    """Refuse an export whose `modeling_flextron.py` differs from the sha256 recorded when it was written."""
    expected = read_export_info(path).get("modeling_sha256")
    code = Path(path) / MODELING_FILE
    if expected is not None and (not code.is_file() or file_sha256(code) != expected):
        raise FlextronError(f"{code} is missing or was modified after export; re-run `flextron export` "
                            "(do not load this directory with trust_remote_code=True)")
