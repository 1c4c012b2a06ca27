"""What a family declares: where a decoder block's elastic weights live and what the block computes.

The slicing itself lives once in `flextron.elastic`; a family is data plus two tiny functions,
chosen by the model's `model_type` (never guessed from module names), so a new family is a few
lines. Besides the weights it states the block's semantics that slicing and skipping depend on:
where the norms of each branch sit (pre-norm, Gemma's sandwich norms, OLMo 2's post-norms), norms
over a whole projection's output (OLMo 2's q/k norms), fused projections (Phi-3's q|k|v, gate|up).
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
    blocks:     one entry per tensor the projection holds side by side (fused: GPT-2's c_attn =
                q|k|v, Phi-3's qkv_proj and gate_up_proj): True where that block holds query heads
                (a unit spans all query heads of one KV group: q, o), False where a unit is one KV
                head (k, v) or one neuron.
    norm:       a norm over the projection's whole output (OLMo 2's q_norm / k_norm): it is sliced
                with the output and its statistic taken over the active features only.
    """

    name: str
    side: Literal["out", "in"]
    blocks: tuple[bool, ...] = (False,)
    norm: str | None = None


@dataclass(frozen=True)
class AttnGeometry:
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def heads_per_unit(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class Branch:
    """A residual branch (attention or MLP) of a decoder block: x + post(module(pre(x))).

    Skipping the branch removes all three (it adds nothing to the residual stream); its importance
    compares the stream entering `pre` (or the module) with what `post` (or the module) adds."""

    module: str
    projs: tuple[Proj, ...]
    pre: str | None = None
    post: str | None = None

    @property
    def norms(self) -> tuple[str, ...]:
        return tuple(n for n in (self.pre, self.post) if n is not None)


@dataclass(frozen=True)
class Family:
    name: str
    layout: str  # the block semantics in words (README's family matrix): pre-norm, sandwich norms, post-norm
    model_types: tuple[str, ...]  # HF `model_type`s declared to have this block
    layers: str
    attn: Branch
    mlp: Branch
    linear_type: type[nn.Module]
    geometry: Callable[[nn.Module], AttnGeometry]
    # Called with (attention module, query heads, KV heads) when the HF attention code reads head
    # counts that must follow the active width (fused q|k|v split points); None where it infers them.
    on_attn_width: Callable[[nn.Module, int, int], None] | None = None
    # HF config keys of the MLP width, query heads, KV heads and head size (export writes them);
    # None where the config has no such key (GPT-2: one head per unit, head size = hidden / heads).
    mlp_width_key: str = "intermediate_size"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    head_dim_key: str | None = "head_dim"
    n_layers_key: str = "num_hidden_layers"
    # The norm after the last block and learned position embeddings (GPT-2): the residual stream's
    # modules outside the blocks besides the token embeddings and the LM head (hidden-size elasticity).
    final_norm: str = "model.norm"
    position_embeddings: str | None = None

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
        for branch in (self.attn, self.mlp):
            # The first block that has this sub-layer (an export may leave it out of some layers).
            block = next((b for b in blocks if not getattr(_get(b, branch.module), "flextron_skipped", False)),
                         blocks[0])
            for norm in branch.norms:
                if _get(block, norm) is None:
                    gone.append(f"{self.layers}[0].{norm}")
            for p in branch.projs:
                if p.norm is not None and _get(block, f"{branch.module}.{p.norm}") is None:
                    gone.append(f"{self.layers}[0].{branch.module}.{p.norm}")
                path = f"{branch.module}.{p.name}"
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
