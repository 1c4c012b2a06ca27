"""Llama-like decoders: separate q/k/v/o and a gated MLP, in three block layouts.

- pre-norm (Llama, Mistral, Qwen2/3, Granite, SmolLM3): x + attn(input_layernorm(x)), then
  x + mlp(post_attention_layernorm(x));
- sandwich norms (Gemma 2, Gemma 3): `post_attention_layernorm` normalises the attention's output,
  and `pre_feedforward_layernorm` / `post_feedforward_layernorm` wrap the MLP;
- post-norm (OLMo 2): x + post_attention_layernorm(attn(x)), x + post_feedforward_layernorm(mlp(x)),
  with q/k norms over the whole q and k projections.
"""

from torch import nn

from flextron.families.base import AttnGeometry, Branch, Family, Proj


def _geometry(attn: nn.Module) -> AttnGeometry:
    head_dim = attn.head_dim
    return AttnGeometry(
        n_heads=attn.q_proj.out_features // head_dim,
        n_kv_heads=attn.k_proj.out_features // head_dim,
        head_dim=head_dim,
    )


def _attn_projs(qk_norms: bool = False) -> tuple[Proj, ...]:
    return (
        Proj("q_proj", "out", blocks=(True,), norm="q_norm" if qk_norms else None),
        Proj("k_proj", "out", norm="k_norm" if qk_norms else None),
        Proj("v_proj", "out"),
        Proj("o_proj", "in", blocks=(True,)),
    )


MLP_PROJS = (Proj("gate_proj", "out"), Proj("up_proj", "out"), Proj("down_proj", "in"))

LLAMA = Family(
    name="llama",
    layout="pre-norm",
    model_types=("llama", "mistral", "qwen2", "qwen3", "granite", "smollm3"),
    layers="model.layers",
    attn=Branch("self_attn", _attn_projs(), pre="input_layernorm"),
    mlp=Branch("mlp", MLP_PROJS, pre="post_attention_layernorm"),
    linear_type=nn.Linear,
    geometry=_geometry,
)

GEMMA = Family(
    name="gemma",
    layout="sandwich norms",
    model_types=("gemma2", "gemma3_text"),
    layers="model.layers",
    attn=Branch("self_attn", _attn_projs(), pre="input_layernorm", post="post_attention_layernorm"),
    mlp=Branch("mlp", MLP_PROJS, pre="pre_feedforward_layernorm", post="post_feedforward_layernorm"),
    linear_type=nn.Linear,
    geometry=_geometry,
)

OLMO2 = Family(
    name="olmo2",
    layout="post-norm",
    model_types=("olmo2",),
    layers="model.layers",
    attn=Branch("self_attn", _attn_projs(qk_norms=True), post="post_attention_layernorm"),
    mlp=Branch("mlp", MLP_PROJS, post="post_feedforward_layernorm"),
    linear_type=nn.Linear,
    geometry=_geometry,
)
