"""Llama-like decoders (Llama, Mistral, Qwen2, Qwen3, ...): separate q/k/v/o and gated MLP."""

from torch import nn

from flextron.families.base import AttnGeometry, Family, Proj


def _geometry(attn: nn.Module) -> AttnGeometry:
    head_dim = attn.head_dim
    return AttnGeometry(
        n_heads=attn.q_proj.out_features // head_dim,
        n_kv_heads=attn.k_proj.out_features // head_dim,
        head_dim=head_dim,
    )


LLAMA = Family(
    name="llama",
    classes=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"),
    layers="model.layers",
    attn="self_attn",
    mlp="mlp",
    attn_projs=(
        Proj("q_proj", "out", grouped=True),
        Proj("k_proj", "out"),
        Proj("v_proj", "out"),
        Proj("o_proj", "in", grouped=True),
    ),
    mlp_projs=(Proj("gate_proj", "out"), Proj("up_proj", "out"), Proj("down_proj", "in")),
    linear_type=nn.Linear,
    geometry=_geometry,
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
)
