"""Elastic execution: run every layer's MLP and attention at a chosen width.

A projection whose output (q/k/v, gate/up) or input (o, down) features are nested units is
swapped for an `ElasticLinear` that holds the very same parameters (state-dict keys do not
change, so an elastic checkpoint is a plain HF checkpoint). Two modes:

- hard: the first `active` units are sliced out of the weights, so compute, activations and
  the KV cache shrink; the HF attention code infers the head count from the tensor shapes.
- soft: everything runs at full width and the input of the "in" projection is multiplied by
  a mask that mixes the nested prefixes, sum_k w_k * 1[unit < c_k] (routers train this way).

Choice 0 skips a sub-layer (depth): in hard mode its module and its norms (in front of it, and
behind it in sandwich and post-norm blocks) are replaced by ones that add nothing to the residual
stream; in soft mode the weight of choice 0 scales the whole contribution, the "in" projection's
bias included (behind a post-norm: the norm's output).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flextron.errors import FlextronError
from flextron.families import AttnGeometry, Branch, Family, Proj, detect_family
from flextron.hidden import HiddenAxis, ModuleView
from flextron.modeling_flextron import skipped_attention_forward, skipped_mlp_forward
from flextron.space import ElasticSpace, Subnet

if TYPE_CHECKING:  # loaded with a checkpoint, built on this module
    from flextron.deployment import Deployment
    from flextron.latency_table import LatencyTable
    from flextron.routers import Routers

Spans = list[list[tuple[int, int]]]  # per block of a projection: the (first unit, count) runs it keeps


def elastic_dim(side: str, conv1d: bool) -> int:
    """The weight dimension holding a projection's elastic features: [out, in] for Linear, [in, out] for Conv1D."""
    return 0 if (side == "out") != conv1d else 1


class ElasticLinear(nn.Module):
    """A Linear (or GPT-2 Conv1D) whose output or input features form nested units, in one or more
    blocks side by side (a fused projection: q|k|v, gate|up). Block b holds `layout[b]` =
    (features per unit, units); hard mode runs, in each block, the unit runs `spans[b]`."""

    def __init__(self, base: nn.Module, proj: Proj, layout: list[tuple[int, int]], conv1d: bool) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.side = proj.side
        self.layout = layout
        self.conv1d = conv1d
        self.edim = elastic_dim(self.side, conv1d)
        self.hdim = 1 - self.edim  # the residual stream's dimension (read by "out", written by "in" projections)
        # A writer at a smaller hidden size: its first `hidden` output rows (hard), or its output times
        # `hidden_mask` (soft); see flextron.hidden. A reader follows its input's width.
        self.hidden: int | None = None
        self.hidden_mask: Tensor | None = None
        features = self.weight.shape[self.edim]
        if features != sum(u * n for u, n in layout) or (self.side == "in" and len(layout) > 1):
            raise FlextronError(f"projection {proj.name} has {features} features, not "
                                f"{' + '.join(f'{n} units of {u}' for u, n in layout)}")
        self._full_spans: Spans = [[(0, n)] for _, n in layout]
        self.spans = self.full_spans()
        self.mask: Tensor | None = None
        self.bias_scale: Tensor | None = None  # soft mode with a skip choice: 1 - its weight

    @property
    def unit(self) -> int:
        """Features per unit of the first block (the only one of an "in" projection)."""
        return self.layout[0][0]

    @property
    def n_units(self) -> int:
        return self.layout[0][1]

    def full_spans(self) -> Spans:
        return [list(runs) for runs in self._full_spans]

    @property
    def full(self) -> bool:
        return self.spans == self._full_spans

    def _parts(self, t: Tensor, dim: int) -> list[Tensor]:
        """The active features of `t` along `dim`, one view per kept run of units."""
        parts, offset = [], 0
        for (unit, n), spans in zip(self.layout, self.spans):
            parts += [t.narrow(dim, offset + first * unit, count * unit) for first, count in spans if count]
            offset += unit * n
        return parts

    def take(self, t: Tensor, dim: int) -> Tensor:
        """The active features of `t` along `dim` (the weight's elastic dimension, or a bias)."""
        if self.full:
            return t
        parts = self._parts(t, dim)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    def _matmul(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if self.conv1d:  # as transformers' Conv1D computes it, so full width matches exactly
            flat = x.reshape(-1, x.shape[-1])
            out = flat @ w if b is None else torch.addmm(b, flat, w)
            return out.view(*x.shape[:-1], -1)
        return F.linear(x, w, b)

    def forward(self, x: Tensor) -> Tensor:
        if self.side == "in":
            if self.mask is not None:
                x = x * self.mask.repeat_interleave(self.unit, dim=-1).to(x.dtype)
            w, b = self.take(self.weight, self.edim), self.bias
            if self.hidden is not None:
                w, b = w.narrow(self.hdim, 0, self.hidden), None if b is None else b[: self.hidden]
            if self.bias_scale is not None and b is not None:
                out = self._matmul(x, w, None) + b * self.bias_scale.to(x.dtype)
            else:
                out = self._matmul(x, w, b)
            return out if self.hidden_mask is None else out * self.hidden_mask.to(out.dtype)
        reads = x.shape[-1]
        if self.full and reads == self.weight.shape[self.hdim]:
            return self._matmul(x, self.weight, self.bias)
        # One matmul per kept run: cheaper than gathering the weight when the runs are few and large.
        full = self.full
        parts = [self.weight] if full else self._parts(self.weight, self.edim)
        weights = [w.narrow(self.hdim, 0, reads) for w in parts]
        biases = ([None] * len(weights) if self.bias is None else [self.bias] if full
                  else self._parts(self.bias, 0))
        outs = [self._matmul(x, w, b) for w, b in zip(weights, biases)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    @torch.no_grad()
    def permute_(self, perm: Tensor, group_perm: Tensor | None = None) -> None:
        """Reorder the units in place: new unit i of a block is its old unit perm[i]; a block with
        another number of units (KV heads beside query heads) is reordered by `group_perm`."""
        idx, offset = [], 0
        for unit, n in self.layout:
            p = perm if n == len(perm) else group_perm
            if p is None or len(p) != n:
                raise FlextronError(f"a permutation of {len(perm)} units does not fit a block of {n} units")
            offsets = torch.arange(unit, device=p.device)
            idx.append(offset + (p[:, None] * unit + offsets).reshape(-1))
            offset += unit * n
        index = torch.cat(idx).to(self.weight.device)
        self.weight.copy_(self.weight.index_select(self.edim, index))
        if self.side == "out" and self.bias is not None:
            self.bias.copy_(self.bias.index_select(0, index))

    def active_features(self, spans: Spans) -> int:
        return sum(count * unit for (unit, _), runs in zip(self.layout, spans) for _, count in runs)

    def n_params(self, spans: Spans, bias: bool = True, hidden: int | None = None) -> int:
        """Weights (and biases) in use when the unit runs `spans` are active (at hidden size `hidden`)."""
        features = self.active_features(spans)
        stream = hidden or self.weight.shape[self.hdim]
        count = features * stream
        if bias and self.bias is not None:
            count += features if self.side == "out" else stream
        return count


def nested_mask(choices: list[int], weights: Tensor, n_units: int) -> Tensor:
    """Mix nested prefixes: weights [..., K] over `choices` -> per-unit mask [..., n_units]."""
    prefix = torch.arange(n_units, device=weights.device)[None, :] < torch.tensor(
        choices, device=weights.device
    )[:, None]
    return weights @ prefix.to(weights.dtype)


def _identity(self: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    return x


def skip_keep(choices: list[int], weights: Tensor) -> Tensor | None:
    """1 - the weight of the skip choice, [..., 1]; None where the layer cannot be skipped."""
    return 1 - weights[..., :1] if choices[0] == 0 else None


Plan = Callable[["ElasticLinear", int], Spans]  # (projection, a part's choice) -> its unit runs


def _prefix_plan(lin: ElasticLinear, units: int) -> Spans:
    return [[(0, units)] for _ in lin.layout]


class ElasticPart:
    """One elastic branch of a block (its MLP or its attention) with its norms.

    `plan` says which unit runs of each projection a choice activates (default: the first c units
    of every block); `n_units` is the largest choice. `projection_norms` pairs norms over a whole
    projection's output (OLMo 2's q/k norms) with that projection."""

    def __init__(self, module: nn.Module, outs: list[ElasticLinear], inp: ElasticLinear | None,
                 pre: nn.Module | None, post: nn.Module | None, skipped_forward, n_units: int | None = None,
                 plan: Plan = _prefix_plan, projection_norms: list[tuple[nn.Module, ElasticLinear]] = ()) -> None:
        self.module = module
        self.outs = outs
        self.inp = inp
        self.pre, self.post = pre, post
        # The largest choice; 0 for a sub-layer that an export left out (its module adds nothing already).
        self.n_units = n_units if n_units is not None else inp.n_units if inp is not None else 0
        self.plan = plan
        self.projection_norms = list(projection_norms)
        self.soft_mask: Tensor | None = None
        self._keep_hook = None
        sliced = {id(p) for lin in (*outs, inp) if lin is not None for p in lin.parameters()}
        sliced |= {id(norm.weight) for norm, _ in self.projection_norms}
        self.fixed = sum(p.numel() for m in (module, *self.norms) for p in m.parameters() if id(p) not in sliced)
        self._skips = [(module, types.MethodType(skipped_forward, module))]
        self._skips += [(norm, types.MethodType(_identity, norm)) for norm in self.norms]
        for norm, lin in self.projection_norms:
            norm.forward = types.MethodType(self._projection_norm_forward(lin), norm)

    @property
    def norms(self) -> list[nn.Module]:
        return [n for n in (self.pre, self.post) if n is not None]

    @property
    def linears(self) -> list[ElasticLinear]:
        return [*self.outs, self.inp] if self.inp is not None else []

    def _projection_norm_forward(self, lin: ElasticLinear):
        """The forward of a norm over `lin`'s output: its class's own forward on the active slice of its
        weight (hard), or, in soft mode, with its statistic over the active features: for a 0/1 mask m,
        norm(x * m * s) / s with s = sqrt(features / sum(m)) is exactly the norm of the kept features."""
        def forward(norm: nn.Module, x: Tensor) -> Tensor:
            run = type(norm).forward
            if self.soft_mask is None:
                return run(norm, x) if lin.full else run(ModuleView(norm, weight=lin.take(norm.weight, 0)), x)
            mask = self.soft_mask
            if mask.shape[-1] != lin.n_units:  # KV heads under query-head units: a group is on with its first head
                mask = mask.unflatten(-1, (lin.n_units, -1))[..., 0]
            m = mask.repeat_interleave(lin.unit, dim=-1).to(x.dtype)
            s = (m.shape[-1] / m.sum(-1, keepdim=True).clamp_min(1e-6)).sqrt()
            return run(norm, x * m * s) / s

        return forward

    def _skip(self, skipped: bool) -> None:
        # Instance attributes shadow the class forward; only ours are removed (adaptive routing
        # installs its own MLP forward the same way).
        for module, fwd in self._skips:
            if skipped:
                module.forward = fwd
            elif vars(module).get("forward") is fwd:
                del module.forward

    def scale_output(self, keep: Tensor | None) -> None:
        """Behind a post-norm, scale what the branch adds (a soft skip, a router's straight-through gate)
        after the norm, which undoes any scale of its input; until the next `set_hard` / `set_soft`."""
        if self._keep_hook is not None:
            self._keep_hook.remove()
            self._keep_hook = None
        if keep is not None:
            self._keep_hook = self.post.register_forward_hook(lambda m, args, out: out * keep.to(out.dtype))

    def set_hard(self, units: int) -> None:
        if self.inp is None:
            return
        for lin in self.linears:
            lin.spans = self.plan(lin, units)
        self.inp.mask = None
        self.inp.bias_scale = None
        self.soft_mask = None
        if self.post is not None:
            self.scale_output(None)
        self._skip(units == 0)

    def set_soft(self, mask: Tensor, keep: Tensor | None = None) -> None:
        """Full width, input of the "in" projection times `mask`; `keep` (1 - the skip weight) scales its
        bias (pre-norm) or the branch's output (behind a post-norm, where the mask is divided by it)."""
        if self.inp is None:
            return
        self._skip(False)
        for lin in self.linears:
            lin.spans = lin.full_spans()
        if self.post is not None:
            # The norm sees the mix of the kept widths at full strength (a mix of "skip" and one width is
            # exactly that width); the skip weight scales what the branch adds.
            mask = mask if keep is None else mask / keep.clamp_min(1e-6)
            self.scale_output(keep)
            self.inp.bias_scale = None
        else:
            self.inp.bias_scale = keep
        self.inp.mask = mask
        self.soft_mask = mask if self.projection_norms else None

    def n_params(self, units: int, bias: bool = True, hidden: int | None = None) -> int:
        """Weights in use at `units` (and hidden size `hidden`, default the full one); with `bias`, also
        biases, the norms and other parameters that are not projections (Qwen3's q/k norms). A skipped
        sub-layer uses none."""
        if units == 0:
            return 0
        count = sum(lin.n_params(self.plan(lin, units), bias, hidden) for lin in self.linears)
        if bias:
            count += self.fixed + sum(lin.active_features(self.plan(lin, units)) for _, lin in self.projection_norms)
            if hidden is not None:  # the norms over the residual stream keep `hidden` of their weights
                stream = self.inp.weight.shape[self.inp.hdim]
                count -= sum(p.numel() for n in self.norms for p in n.parameters()) * (stream - hidden) // stream
        return count


def _absent(module: nn.Module) -> bool:
    return getattr(module, "flextron_skipped", False)


class ElasticBlock:
    """A decoder block's elastic MLP and attention.

    Attention units are KV groups (`attn_unit="group"`) or query heads (`"head"`, see ElasticSpace):
    choice c keeps min(c, G) groups with max(1, c // G) query heads each, the first ones of each
    group. HF's layout is group-major (head h reads KV group h // R), so the query block keeps one run
    of heads per group; soft masks, which count heads in the nested order, are reordered into that layout."""

    def __init__(self, block: nn.Module, family: Family, attn_unit: str = "group") -> None:
        self.family = family
        attn = block.get_submodule(family.attn.module)
        # An attention that an export left out has no heads: any geometry gives it cost 0.
        self.geometry = AttnGeometry(1, 1, 0) if _absent(attn) else family.geometry(attn)
        g = self.geometry
        if g.n_heads % g.n_kv_heads:
            raise FlextronError(f"{g.n_heads} query heads do not split into {g.n_kv_heads} KV groups")
        # With one head per group the two units coincide: keep the group code path.
        self.head_units = attn_unit == "head" and g.heads_per_unit > 1
        conv1d = family.linear_type is not nn.Linear
        G, R, d = g.n_kv_heads, g.heads_per_unit, g.head_dim

        def attn_layout(p: Proj, base: nn.Module) -> list[tuple[int, int]]:
            if self.head_units:
                return [(d, g.n_heads) if queries else (d, G) for queries in p.blocks]
            return [(R * d, G) if queries else (d, G) for queries in p.blocks]

        def mlp_layout(p: Proj, base: nn.Module) -> list[tuple[int, int]]:
            return [(1, base.weight.shape[elastic_dim(p.side, conv1d)] // len(p.blocks))] * len(p.blocks)

        def wrap(branch: Branch, layout, skipped, **part) -> ElasticPart:
            parent = block.get_submodule(branch.module)
            pre, post = (block.get_submodule(n) if n else None for n in (branch.pre, branch.post))
            if _absent(parent):
                return ElasticPart(parent, [], None, pre, post, skipped)
            wrapped, norms = [], []
            for p in branch.projs:
                base = parent.get_submodule(p.name)
                lin = ElasticLinear(base, p, layout(p, base), conv1d)
                setattr(parent, p.name, lin)
                wrapped.append(lin)
                if p.norm is not None:
                    norms.append((parent.get_submodule(p.norm), lin))
            outs = [lin for lin in wrapped if lin.side == "out"]
            (inp,) = [lin for lin in wrapped if lin.side == "in"]
            return ElasticPart(parent, outs, inp, pre, post, skipped, projection_norms=norms, **part)

        self.mlp = wrap(family.mlp, mlp_layout, skipped_mlp_forward)
        if self.head_units:
            if not hasattr(attn, "num_key_value_groups"):
                raise FlextronError(f"the {family.name} family's attention cannot trim query heads within "
                                    "KV groups; convert with --attn-unit group")
            self.attn = wrap(family.attn, attn_layout, skipped_attention_forward, n_units=g.n_heads,
                             plan=self._head_plan)
            # Soft masks count heads in the nested order r * G + g; HF head g * R + r reads that entry.
            h = torch.arange(g.n_heads)
            self._mask_order = (h % R) * G + h // R
        else:
            self.attn = wrap(family.attn, attn_layout, skipped_attention_forward)

    def _head_layout(self, units: int) -> tuple[int, int]:
        """Head mode: (KV groups kept, query heads in each) at choice `units`."""
        G = self.geometry.n_kv_heads
        return min(units, G), max(1, units // G)

    def _head_plan(self, lin: ElasticLinear, units: int) -> Spans:
        """Head mode: the query block keeps the first heads of each kept group, KV blocks the kept groups."""
        groups, per_group = self._head_layout(units)
        R = self.geometry.heads_per_unit
        return [[(k * R, per_group) for k in range(groups)] if n == self.geometry.n_heads else [(0, groups)]
                for _, n in lin.layout]

    def attn_heads(self, units: int) -> tuple[int, int]:
        """(query heads, KV heads) that attention choice `units` runs."""
        if units == 0:
            return 0, 0
        if not self.head_units:
            return units * self.geometry.heads_per_unit, units
        groups, per_group = self._head_layout(units)
        return groups * per_group, groups

    def valid_attn(self, units: int) -> bool:
        """Whether `units` is an attention choice this block can run."""
        if not 0 <= units <= self.attn.n_units:
            return False
        return not self.head_units or units < self.geometry.n_kv_heads or units % self.geometry.n_kv_heads == 0

    def set_attn_hard(self, units: int) -> None:
        self.attn.set_hard(units)
        if self.attn.inp is None or units == 0:
            return
        heads, kv = self.attn_heads(units)
        if self.head_units:  # HF repeats each KV head this many times
            self.attn.module.num_key_value_groups = heads // kv
        if self.family.on_attn_width is not None:
            self.family.on_attn_width(self.attn.module, heads, kv)

    def set_attn_soft(self, mask: Tensor, keep: Tensor | None = None) -> None:
        """Full width; `mask` [..., n_units] over attention units in nested order."""
        self.set_attn_hard(self.attn.n_units)
        if self.head_units:
            mask = mask.index_select(-1, self._mask_order.to(mask.device))
        self.attn.set_soft(mask, keep)

    @torch.no_grad()
    def permute_attn_(self, perm: Tensor) -> None:
        """Reorder the attention units (heads in HF order in head mode, whole groups kept together)."""
        if not self.head_units:
            for lin in self.attn.linears:
                lin.permute_(perm)
            self._permute_norms(self.attn, perm)
            return
        R = self.geometry.heads_per_unit
        groups = perm.view(-1, R) // R
        if not (groups == groups[:, :1]).all():
            raise FlextronError("a head permutation must keep each KV group's query heads together")
        for lin in self.attn.linears:
            lin.permute_(perm, groups[:, 0])
        self._permute_norms(self.attn, perm, groups[:, 0])

    @staticmethod
    @torch.no_grad()
    def _permute_norms(part: ElasticPart, perm: Tensor, group_perm: Tensor | None = None) -> None:
        """Reorder the weights of norms over a projection's output with that projection's units."""
        for norm, lin in part.projection_norms:
            p = perm if lin.n_units == len(perm) else group_perm
            idx = (p[:, None] * lin.unit + torch.arange(lin.unit, device=p.device)).reshape(-1)
            norm.weight.copy_(norm.weight.index_select(0, idx.to(norm.weight.device)))

    def attn_order(self, scores: Tensor) -> Tensor:
        """The permutation that sorts attention units by descending score; in head mode groups by
        their summed score, heads within each group by their own."""
        if not self.head_units:
            return torch.argsort(scores, descending=True, stable=True)
        R = self.geometry.heads_per_unit
        per_group = scores.view(-1, R)
        groups = torch.argsort(per_group.sum(1), descending=True, stable=True)
        within = torch.argsort(per_group, dim=1, descending=True, stable=True)
        return (groups[:, None] * R + within[groups]).reshape(-1)


@dataclass
class PositionChoices:
    """Per layer, indices into its choice lists: MLP [B, T] (per token), attention [B, 1] (per sequence);
    the hidden size [B, 1] (per sequence, into the space's hidden choices; None: the full size)."""

    mlp: list[Tensor]
    attn: list[Tensor]
    hidden: Tensor | None = None

    @classmethod
    def sample(cls, space: ElasticSpace, gen: torch.Generator, batch: int, seq_len: int) -> PositionChoices:
        """Every token's MLP choice and every sequence's attention choice (and hidden size, where the space
        has them; drawn last, so a space without them draws as before) drawn uniformly."""
        picks = cls(mlp=[torch.randint(len(c), (batch, seq_len), generator=gen) for c in space.mlp],
                    attn=[torch.randint(len(c), (batch, 1), generator=gen) for c in space.attn])
        if space.hidden:
            picks.hidden = torch.randint(len(space.hidden), (batch, 1), generator=gen)
        return picks


class ElasticModel(nn.Module):
    """A Hugging Face causal LM whose layers run at any width of its elastic space."""

    def __init__(self, model: nn.Module, space: ElasticSpace | None = None,
                 family: Family | None = None, attn_unit: str | None = None) -> None:
        """`attn_unit` (default: the space's, else "group") fixes how attention is sliced; see ElasticSpace."""
        super().__init__()
        self.family = family or detect_family(model)
        self.model = model
        self.train(model.training)  # nn.Module starts in training mode; follow the wrapped model
        self.attn_unit = attn_unit or (space.attn_unit if space is not None else "group")
        self.blocks = [ElasticBlock(b, self.family, self.attn_unit) for b in self.family.blocks(model)]
        # Budget resolution aids loaded with a checkpoint: the measured latency table and the
        # trained routers (a plain holder, so the routers are not parameters of the LLM); and the
        # llama.cpp deployment memory budgets are priced at (the command's options set it).
        self.latency: LatencyTable | None = None
        self.routers: Routers | None = None
        self.deployment: Deployment | None = None  # None: footprint.Deployment()'s defaults
        self.axis: HiddenAxis | None = None  # built once a space has hidden-size choices
        if space is None:  # the default choices of each layer's own size (exports may differ per layer)
            spaces = [ElasticSpace.default(1, max(1, b.mlp.n_units), max(1, b.attn.n_units),
                                           attn_unit=self.attn_unit, kv_groups=b.geometry.n_kv_heads)
                      for b in self.blocks]
            space = ElasticSpace(mlp=[sp.mlp[0] if b.mlp.n_units else [0] for sp, b in zip(spaces, self.blocks)],
                                 attn=[sp.attn[0] if b.attn.n_units else [0] for sp, b in zip(spaces, self.blocks)],
                                 attn_unit=self.attn_unit)
        self.set_space(space)

    def set_space(self, space: ElasticSpace) -> None:
        """Adopt an elastic space whose largest choices are the layers' full sizes."""
        if space.n_layers != len(self.blocks):
            raise FlextronError(
                f"elastic space has {space.n_layers} layers but the model has {len(self.blocks)}"
            )
        if space.attn_unit != self.attn_unit:
            raise FlextronError(f"the elastic space counts attention in {space.attn_unit}s but the model was "
                                f"made elastic by {self.attn_unit}s; build the ElasticModel with that space")
        for i, (b, mlp, attn) in enumerate(zip(self.blocks, space.mlp, space.attn)):
            if mlp[-1] != b.mlp.n_units or attn[-1] != b.attn.n_units:
                raise FlextronError(
                    f"layer {i}: the elastic space's largest choices (MLP {mlp[-1]}, attention "
                    f"{attn[-1]}) must equal the layer's size (MLP {b.mlp.n_units}, attention "
                    f"{b.attn.n_units})"
                )
            bad = [c for c in attn if not b.valid_attn(c)]
            if bad:
                G = b.geometry.n_kv_heads
                raise FlextronError(f"layer {i}: attention choices {bad} are not head counts this layer can run "
                                    f"({G} KV groups: fewer than {G} heads, or a multiple of {G})")
        if space.hidden is not None:
            if space.hidden[-1] != self.hidden_size:
                raise FlextronError(f"the elastic space's largest hidden size {space.hidden[-1]} must equal the "
                                    f"model's {self.hidden_size}")
            self._build_axis()
        self.space = space
        self.set_subnet(None)

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        """The full width of the residual stream."""
        return self.model.get_input_embeddings().weight.shape[1]

    def _build_axis(self) -> None:
        if self.axis is not None:
            return
        fam, m = self.family, self.model
        parts = [p for b in self.blocks for p in (b.attn, b.mlp) if p.inp is not None]
        embeddings = [m.get_input_embeddings()]
        if fam.position_embeddings is not None:
            embeddings.append(m.get_submodule(fam.position_embeddings))
        self.axis = HiddenAxis(m, embeddings, [n for p in parts for n in p.norms] + [m.get_submodule(fam.final_norm)],
                               [lin for p in parts for lin in p.outs], [p.inp for p in parts],
                               [norm for p in parts for norm, _ in p.projection_norms])

    def forward(self, *args, head: Callable[[Tensor, nn.Module], Any] | None = None, **kwargs):
        """The HF forward; with `head`, head(final hidden states, output layer) instead of logits
        (a loss that reads the vocabulary in chunks runs inside the forward, where FSDP has the
        output layer gathered)."""
        if head is None:
            return self.model(*args, **kwargs)
        hidden = self.model.base_model(*args, **kwargs).last_hidden_state
        return head(hidden, self.model.get_output_embeddings())

    def set_subnet(self, subnet: Subnet | None = None) -> None:
        """Run the given sub-network (the full model when None) by hard slicing, until told otherwise;
        `subnet` sets one for a `with` block only."""
        subnet = subnet or self.space.full()
        self.space.validate(subnet)
        for block, w, a in zip(self.blocks, subnet.mlp, subnet.attn):
            block.mlp.set_hard(w)
            block.set_attn_hard(a)
        if self.axis is not None:
            self.axis.set_hard(subnet.hidden)
        self.current: Subnet | None = subnet  # None while soft
        self._soft: tuple[list[Tensor], list[Tensor], Tensor | None] | None = None

    def set_soft(self, mlp_weights: list[Tensor], attn_weights: list[Tensor],
                 hidden_weights: Tensor | None = None) -> None:
        """Mix nested choices per layer: weights [..., K] over that layer's choices; `hidden_weights`
        [..., K] over the space's hidden sizes (None: the full hidden size)."""
        for i, (block, wm, wa) in enumerate(zip(self.blocks, mlp_weights, attn_weights)):
            block.mlp.set_soft(nested_mask(self.space.mlp[i], wm, block.mlp.n_units),
                               skip_keep(self.space.mlp[i], wm))
            block.set_attn_soft(nested_mask(self.space.attn[i], wa, block.attn.n_units),
                                skip_keep(self.space.attn[i], wa))
        if hidden_weights is not None:
            if self.axis is None:
                raise FlextronError("this elastic space has no hidden-size choices to mix")
            self.axis.set_soft(nested_mask(self.space.hidden, hidden_weights, self.hidden_size))
        elif self.axis is not None:
            self.axis.set_hard(None)
        self.current, self._soft = None, (mlp_weights, attn_weights, hidden_weights)

    @contextmanager
    def subnet(self, subnet: Subnet | None = None) -> Iterator[Subnet]:
        """Run `subnet` (the full model when None) inside the `with` block; on leaving it, by an
        exception too, the previous sub-network (or soft mix) is back."""
        previous, soft = self.current, self._soft
        self.set_subnet(subnet)
        try:
            yield self.current
        finally:
            self._restore(previous, soft)

    @contextmanager
    def rows(self, subnets: list[Subnet]) -> Iterator[None]:
        """Batch row b runs `subnets[b]` inside the `with` block: full width, each row's units masked
        (so that one forward serves many budgets); on leaving it, the previous state is back."""
        for s in subnets:
            self.space.validate(s)

        def index(choices: list[list[int]], picks: list[list[int]]) -> list[Tensor]:  # per layer [rows, 1]
            return [torch.tensor([[layer.index(p[i])] for p in picks]) for i, layer in enumerate(choices)]

        hidden = None
        if any(s.hidden is not None for s in subnets):
            sizes = self.space.hidden
            hidden = torch.tensor([[sizes.index(s.hidden or sizes[-1])] for s in subnets])
        with self.choices(PositionChoices(index(self.space.mlp, [s.mlp for s in subnets]),
                                          index(self.space.attn, [s.attn for s in subnets]), hidden)):
            yield

    @contextmanager
    def choices(self, picks: PositionChoices) -> Iterator[None]:
        """Per position choices inside the `with` block (MLP per token or per row, attention per row).
        Full width with one-hot masks, so each position computes exactly what its choices compute
        alone; on leaving it, the previous state is back."""
        device = next(self.parameters()).device

        def one_hot(idx: list[Tensor], choices: list[list[int]]) -> list[Tensor]:
            return [F.one_hot(i.to(device), len(c)).float() for i, c in zip(idx, choices)]

        previous, soft = self.current, self._soft
        hidden = None if picks.hidden is None else one_hot([picks.hidden], [self.space.hidden])[0]
        self.set_soft(one_hot(picks.mlp, self.space.mlp), one_hot(picks.attn, self.space.attn), hidden)
        try:
            yield
        finally:
            self._restore(previous, soft)

    def _restore(self, previous: Subnet | None, soft: tuple[list[Tensor], list[Tensor], Tensor | None] | None) -> None:
        if soft is not None:
            self.set_soft(*soft)
        else:
            self.set_subnet(previous)

    def permute_(self, mlp_perms: list[Tensor], attn_perms: list[Tensor]) -> None:
        """Reorder every layer's MLP neurons and attention units; the function is unchanged."""
        for block, pm, pa in zip(self.blocks, mlp_perms, attn_perms):
            for lin in block.mlp.linears:
                lin.permute_(pm)
            block.permute_attn_(pa)

    def permute_hidden_(self, perm: Tensor) -> None:
        """Reorder the residual stream's channels (the space must have hidden choices); the function is unchanged."""
        if self.axis is None:
            raise FlextronError("this elastic space has no hidden-size choices; its channels stay in place")
        self.axis.permute_(perm)
