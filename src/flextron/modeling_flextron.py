"""Per-layer Flextron architectures: stock HF decoders whose layers each have their own widths.

`flextron export` writes this file beside the weights of a heterogeneous sub-network, so it
must stay self-contained (torch and transformers only): `AutoModelForCausalLM.from_pretrained(
dir, trust_remote_code=True)` then loads the model where flextron is not installed.

Each config adds three per-layer lists to the family's HF config (whose global sizes stay
those of the model the sub-network came from, but for a smaller hidden size, which comes with an
explicit head size). Each model builds the stock HF model, then gives every layer's projections
their own sizes; the HF attention code infers the number of heads from the tensor shapes (GPT-2
needs its split size set), and the query heads per KV head stay the same, so the stock forward
runs unchanged. A size of 0 removes the sub-layer and its norm: the residual stream passes
through (`SkippedAttention`, `SkippedMLP`).
"""

import copy
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)
from transformers.pytorch_utils import Conv1D


def skipped_attention_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """A skipped attention adds nothing to the residual stream. It still records the new tokens
    in the KV cache as a one-element-wide placeholder: HF reads the cached length (positions,
    masks) from the first layer's entry, which must not stay empty when that layer is skipped."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    cache = getattr(cache, "self_attention_cache", cache)
    if cache is not None:
        b, t = hidden_states.shape[:2]
        stub = hidden_states.new_zeros(b, 1, t, 1)
        cache.update(stub, stub, self.layer_idx)
    return torch.zeros_like(hidden_states), None


def skipped_mlp_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.zeros_like(hidden_states)


class SkippedAttention(nn.Module):
    """The attention of an attention-free layer (no weights)."""

    flextron_skipped = True

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    forward = skipped_attention_forward


class SkippedMLP(nn.Module):
    """The MLP of an MLP-free layer (no weights)."""

    flextron_skipped = True

    forward = skipped_mlp_forward


def _resized(old: nn.Module, out_features: int | None = None, in_features: int | None = None) -> nn.Module:
    """A new projection of the same kind as `old` with other output and/or input sizes."""
    if isinstance(old, Conv1D):
        nx, nf = old.weight.shape
        new = Conv1D(out_features or nf, in_features or nx)
        return new.to(device=old.weight.device, dtype=old.weight.dtype)
    return nn.Linear(in_features or old.in_features, out_features or old.out_features,
                     bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)


def _resized_norm(old: nn.Module, size: int) -> nn.Module:
    """A copy of the norm `old` over `size` features (OLMo 2's q/k norms span the whole projection)."""
    new = copy.deepcopy(old)
    new.weight = nn.Parameter(torch.ones(size, device=old.weight.device, dtype=old.weight.dtype))
    return new


class _HeadCounts:
    """The model config as one attention layer sees it: Phi-3 splits q|k|v at
    `config.num_attention_heads * head_dim`, so a narrower layer reads its own head count."""

    def __init__(self, config: PreTrainedConfig, heads: int) -> None:
        self._config = config
        self.num_attention_heads = heads

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_config":  # copy and pickle probe before _config exists
            raise AttributeError(name)
        return getattr(self._config, name)


def set_phi3_head_counts(attn: nn.Module, heads: int, kv_heads: int) -> None:
    """Make a Phi-3 attention split its fused q|k|v for `heads` query and `kv_heads` KV heads."""
    config = attn.config._config if isinstance(attn.config, _HeadCounts) else attn.config
    attn.config = _HeadCounts(config, heads)
    attn.num_key_value_heads = kv_heads
    attn.num_key_value_groups = heads // kv_heads


# Per block layout, the norms of the attention branch and of the MLP branch (all removed with it).
PRE_NORM = (("input_layernorm",), ("post_attention_layernorm",))
SANDWICH = (("input_layernorm", "post_attention_layernorm"),
            ("pre_feedforward_layernorm", "post_feedforward_layernorm"))
POST_NORM = (("post_attention_layernorm",), ("post_feedforward_layernorm",))


def _skip_parts(layer: nn.Module, width: int, heads: int, attn: str, mlp: str,
                norms: tuple[tuple[str, ...], tuple[str, ...]]) -> tuple[bool, bool]:
    """Replace the sub-layers of size 0 (and their norms); returns which remain (attention, MLP)."""
    if heads == 0:
        setattr(layer, attn, SkippedAttention(getattr(layer, attn).layer_idx))
    if width == 0:
        setattr(layer, mlp, SkippedMLP())
    for size, names in zip((heads, width), norms):
        for name in names if size == 0 else ():
            setattr(layer, name, nn.Identity())
    return heads > 0, width > 0


def _resize_llama_layer(layer: nn.Module, width: int, heads: int, kv_heads: int,
                        norms: tuple[tuple[str, ...], tuple[str, ...]] = PRE_NORM) -> None:
    has_attn, has_mlp = _skip_parts(layer, width, heads, "self_attn", "mlp", norms)
    if has_mlp:
        mlp = layer.mlp
        mlp.gate_proj = _resized(mlp.gate_proj, out_features=width)
        mlp.up_proj = _resized(mlp.up_proj, out_features=width)
        mlp.down_proj = _resized(mlp.down_proj, in_features=width)
    if has_attn:
        attn, d = layer.self_attn, layer.self_attn.head_dim
        attn.q_proj = _resized(attn.q_proj, out_features=heads * d)
        attn.k_proj = _resized(attn.k_proj, out_features=kv_heads * d)
        attn.v_proj = _resized(attn.v_proj, out_features=kv_heads * d)
        attn.o_proj = _resized(attn.o_proj, in_features=heads * d)
        # Eager attention repeats each KV head this many times.
        attn.num_key_value_groups = heads // kv_heads
        if norms is POST_NORM:  # OLMo 2: q/k norms over the whole projections
            attn.q_norm = _resized_norm(attn.q_norm, heads * d)
            attn.k_norm = _resized_norm(attn.k_norm, kv_heads * d)


def _resize_phi3_layer(layer: nn.Module, width: int, heads: int, kv_heads: int) -> None:
    has_attn, has_mlp = _skip_parts(layer, width, heads, "self_attn", "mlp", PRE_NORM)
    if has_mlp:
        layer.mlp.gate_up_proj = _resized(layer.mlp.gate_up_proj, out_features=2 * width)
        layer.mlp.down_proj = _resized(layer.mlp.down_proj, in_features=width)
    if has_attn:
        attn, d = layer.self_attn, layer.self_attn.head_dim
        attn.qkv_proj = _resized(attn.qkv_proj, out_features=(heads + 2 * kv_heads) * d)
        attn.o_proj = _resized(attn.o_proj, in_features=heads * d)
        set_phi3_head_counts(attn, heads, kv_heads)


def _resize_gpt2_block(block: nn.Module, width: int, heads: int, kv_heads: int) -> None:
    has_attn, has_mlp = _skip_parts(block, width, heads, "attn", "mlp", (("ln_1",), ("ln_2",)))
    if has_mlp:
        mlp = block.mlp
        mlp.c_fc = _resized(mlp.c_fc, out_features=width)
        mlp.c_proj = _resized(mlp.c_proj, in_features=width)
    if has_attn:
        attn = block.attn
        # At a smaller hidden size the config states the head size (GPT-2's own is hidden / heads).
        head_dim = getattr(attn.config, "head_dim", None) or attn.head_dim
        if attn.scale_attn_weights:
            attn.scaling *= (attn.head_dim / head_dim) ** 0.5
        attn.head_dim = head_dim
        attn_width = heads * head_dim
        attn.c_attn = _resized(attn.c_attn, out_features=3 * attn_width)
        attn.c_proj = _resized(attn.c_proj, in_features=attn_width)
        attn.split_size = attn_width  # c_attn's output is q|k|v, each this wide
        attn.num_heads = heads


# The config fields added to each family's config: one entry per layer.
_LAYER_LISTS = ("layer_intermediate_sizes", "layer_num_attention_heads", "layer_num_key_value_heads")


class _PerLayer:
    """Mixin for the models: build the stock model, then resize each layer."""

    _layers_path: str
    _resize_layer: Callable[[nn.Module, int, int, int], None]

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__(config)
        self._apply_layer_sizes()

    def _apply_layer_sizes(self) -> None:
        c = self.config
        layers = self.get_submodule(self._layers_path)
        lists = [getattr(c, name) for name in _LAYER_LISTS]
        if any(v is None or len(v) != len(layers) for v in lists):
            raise ValueError(f"{type(c).__name__} needs {', '.join(_LAYER_LISTS)} with one entry per layer "
                             f"({len(layers)})")
        for layer, width, heads, kv_heads in zip(layers, *lists):
            self._resize_layer(layer, width, heads, kv_heads)
        # Initializes only the new projections (the others are marked initialized) and re-ties weights.
        self.post_init()


def _validate(self) -> None:
    """transformers' validation (run by save_pretrained) without the stock configs' check that the hidden
    size is a multiple of the heads: here the per-layer lists and the head size give every projection its
    size, and a sub-network at a smaller hidden size keeps its head size."""
    for check in self.__class_validators__:
        if check.__name__ != "validate_architecture":
            check(self)


def _family(base_config: type, base_model: type, layers_path: str = "model.layers",
            resize_layer: Callable[[nn.Module, int, int, int], None] = _resize_llama_layer) -> tuple[type, type]:
    """The per-layer config and model of one family: `Flextron<base name>`, model type `flextron_<base type>`.

    Exports name these classes in `config.json`'s `auto_map`, so the names and model types never change.
    """
    config_cls = type(f"Flextron{base_config.__name__}", (base_config,), {
        "__module__": __name__,
        "__annotations__": dict.fromkeys(_LAYER_LISTS, list[int] | None),  # config fields (a dataclass)
        "model_type": f"flextron_{base_config.model_type}",
        "validate": _validate,
        **dict.fromkeys(_LAYER_LISTS),
    })
    model_cls = type(f"Flextron{base_model.__name__}", (_PerLayer, base_model), {
        "__module__": __name__,
        "config_class": config_cls,
        "_layers_path": layers_path,
        "_resize_layer": staticmethod(resize_layer),
    })
    # save_pretrained copies this file beside the weights and writes `auto_map` into config.json.
    config_cls.register_for_auto_class()
    model_cls.register_for_auto_class("AutoModelForCausalLM")
    return config_cls, model_cls


# Module-level names: `trust_remote_code` looks the classes up by the names in `auto_map`.
FlextronLlamaConfig, FlextronLlamaForCausalLM = _family(LlamaConfig, LlamaForCausalLM)
FlextronMistralConfig, FlextronMistralForCausalLM = _family(MistralConfig, MistralForCausalLM)
FlextronQwen2Config, FlextronQwen2ForCausalLM = _family(Qwen2Config, Qwen2ForCausalLM)
FlextronQwen3Config, FlextronQwen3ForCausalLM = _family(Qwen3Config, Qwen3ForCausalLM)
FlextronGPT2Config, FlextronGPT2LMHeadModel = _family(GPT2Config, GPT2LMHeadModel, "transformer.h", _resize_gpt2_block)
FlextronGraniteConfig, FlextronGraniteForCausalLM = _family(GraniteConfig, GraniteForCausalLM)
FlextronSmolLM3Config, FlextronSmolLM3ForCausalLM = _family(SmolLM3Config, SmolLM3ForCausalLM)
_sandwich = partial(_resize_llama_layer, norms=SANDWICH)
FlextronGemma2Config, FlextronGemma2ForCausalLM = _family(Gemma2Config, Gemma2ForCausalLM, resize_layer=_sandwich)
FlextronGemma3TextConfig, FlextronGemma3ForCausalLM = _family(Gemma3TextConfig, Gemma3ForCausalLM,
                                                              resize_layer=_sandwich)
FlextronOlmo2Config, FlextronOlmo2ForCausalLM = _family(Olmo2Config, Olmo2ForCausalLM,
                                                        resize_layer=partial(_resize_llama_layer, norms=POST_NORM))
FlextronPhi3Config, FlextronPhi3ForCausalLM = _family(Phi3Config, Phi3ForCausalLM, resize_layer=_resize_phi3_layer)

# Base HF model_type -> (per-layer config, per-layer model).
PER_LAYER = {
    "llama": (FlextronLlamaConfig, FlextronLlamaForCausalLM),
    "mistral": (FlextronMistralConfig, FlextronMistralForCausalLM),
    "qwen2": (FlextronQwen2Config, FlextronQwen2ForCausalLM),
    "qwen3": (FlextronQwen3Config, FlextronQwen3ForCausalLM),
    "gpt2": (FlextronGPT2Config, FlextronGPT2LMHeadModel),
    "granite": (FlextronGraniteConfig, FlextronGraniteForCausalLM),
    "smollm3": (FlextronSmolLM3Config, FlextronSmolLM3ForCausalLM),
    "gemma2": (FlextronGemma2Config, FlextronGemma2ForCausalLM),
    "gemma3_text": (FlextronGemma3TextConfig, FlextronGemma3ForCausalLM),
    "olmo2": (FlextronOlmo2Config, FlextronOlmo2ForCausalLM),
    "phi3": (FlextronPhi3Config, FlextronPhi3ForCausalLM),
}

__all__ = [c.__name__ for pair in PER_LAYER.values() for c in pair] + ["PER_LAYER", "set_phi3_head_counts"]
