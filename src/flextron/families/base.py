"""What a family adapter says: where a decoder block's elastic weights live.

The slicing itself lives once in `flextron.elastic`; an adapter is data plus two tiny
functions, so a new family is a few lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass(frozen=True)
class Proj:
    """One projection of an elastic sub-module.

    side="out": its output features are the elastic units (q/k/v, gate/up, c_fc).
    side="in":  its input features are the elastic units (o_proj, down_proj, c_proj).
    grouped:    a unit spans all query heads of one KV group (q, o) instead of one head (k, v).
    blocks:     a fused projection holding several tensors side by side (GPT-2 c_attn = q|k|v).
    """

    name: str
    side: Literal["out", "in"]
    grouped: bool = False
    blocks: int = 1


@dataclass(frozen=True)
class AttnGeometry:
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def heads_per_unit(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[str, ...]
    layers: str
    attn: str
    mlp: str
    attn_projs: tuple[Proj, ...]
    mlp_projs: tuple[Proj, ...]
    linear_type: type[nn.Module]
    geometry: Callable[[nn.Module], AttnGeometry]
    # Called with (attention module, active width per block) when a fused projection's
    # split size must follow the active width; None where the HF code infers it.
    on_attn_width: Callable[[nn.Module, int], None] | None = None
    # HF config keys of the MLP width, query heads, KV heads and head size (export writes them);
    # None where the config has no such key (GPT-2: one head per unit, head size = hidden / heads).
    mlp_width_key: str = "intermediate_size"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    head_dim_key: str | None = "head_dim"
    n_layers_key: str = "num_hidden_layers"
    # The norms in front of the attention and the MLP (a skipped sub-layer skips its norm too).
    attn_norm: str | None = None
    mlp_norm: str | None = None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def missing(self, model: nn.Module) -> list[str]:
        """Module paths this family expects but the model lacks (empty when the layout fits)."""
        try:
            blocks = self.blocks(model)
        except AttributeError:
            return [self.layers]
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            return [self.layers]
        gone = []
        for sub, projs in ((self.attn, self.attn_projs), (self.mlp, self.mlp_projs)):
            # The first block that has this sub-layer (an export may leave it out of some layers).
            block = next((b for b in blocks if not getattr(_get(b, sub), "flextron_skipped", False)), blocks[0])
            for p in projs:
                path = f"{sub}.{p.name}"
                try:
                    if not isinstance(block.get_submodule(path), self.linear_type):
                        gone.append(f"{self.layers}[0].{path} ({self.linear_type.__name__})")
                except AttributeError:
                    gone.append(f"{self.layers}[0].{path}")
        return gone


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None
