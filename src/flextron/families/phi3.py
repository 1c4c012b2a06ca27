"""Phi-3 / Phi-4-mini: a pre-norm Llama-like block with fused projections, q|k|v in `qkv_proj`
and gate|up in `gate_up_proj`, which the elastic slicing cuts block by block."""

from torch import nn

from flextron.families.base import AttnGeometry, Branch, Family, Proj
from flextron.modeling_flextron import set_phi3_head_counts


def _geometry(attn: nn.Module) -> AttnGeometry:
    d, kv = attn.head_dim, attn.num_key_value_heads
    return AttnGeometry(n_heads=attn.qkv_proj.out_features // d - 2 * kv, n_kv_heads=kv, head_dim=d)


PHI3 = Family(
    name="phi3",
    layout="pre-norm, fused projections",
    model_types=("phi3",),
    layers="model.layers",
    attn=Branch("self_attn", (Proj("qkv_proj", "out", blocks=(True, False, False)),
                              Proj("o_proj", "in", blocks=(True,))), pre="input_layernorm"),
    mlp=Branch("mlp", (Proj("gate_up_proj", "out", blocks=(False, False)), Proj("down_proj", "in")),
               pre="post_attention_layernorm"),
    linear_type=nn.Linear,
    geometry=_geometry,
    on_attn_width=set_phi3_head_counts,
)
