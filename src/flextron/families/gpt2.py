"""GPT-2: fused q|k|v `Conv1D`, multi-head attention (a unit is one head), GeLU MLP."""

from torch import nn
from transformers.pytorch_utils import Conv1D

from flextron.families.base import AttnGeometry, Branch, Family, Proj


def _geometry(attn: nn.Module) -> AttnGeometry:
    return AttnGeometry(n_heads=attn.num_heads, n_kv_heads=attn.num_heads, head_dim=attn.head_dim)


def _set_split(attn: nn.Module, heads: int, kv_heads: int) -> None:
    # GPT2Attention splits c_attn's output into q, k, v by this attribute.
    attn.split_size = heads * attn.head_dim


GPT2 = Family(
    name="gpt2",
    layout="pre-norm",
    model_types=("gpt2",),
    layers="transformer.h",
    attn=Branch("attn", (Proj("c_attn", "out", blocks=(False,) * 3), Proj("c_proj", "in")), pre="ln_1"),
    mlp=Branch("mlp", (Proj("c_fc", "out"), Proj("c_proj", "in")), pre="ln_2"),
    linear_type=Conv1D,
    geometry=_geometry,
    on_attn_width=_set_split,
    mlp_width_key="n_inner",
    heads_key="n_head",
    kv_heads_key=None,
    head_dim_key=None,
    n_layers_key="n_layer",
    final_norm="transformer.ln_f",
    position_embeddings="transformer.wpe",
)
