"""Importance of MLP neurons and attention units, and the permutation that sorts by it.

Scores aggregate as Minitron's: for each calibration sequence, the mean over tokens of a
per-token magnitude, then the L2 norm of that over sequences. The magnitude of an MLP neuron and of
a whole KV group is Minitron's: |x| entering the "in" projection (down, or attention output), or
the L2 norm of the unit's slice there. A query head inside its KV group (`attn_unit="head"`) is scored by what it adds
to the residual stream, ||W_h x_h||: its slice times that slice's output columns. The slice's norm
alone ignores how much the projection amplifies each head, and on SmolLM2 it chose the head to keep
in each group worse than at random; for whole groups the two rules measured about even
(docs/results.md, "Which heads to keep").

Sub-layers (depth) are scored in the same single pass by Minitron's block importance: the mean
over tokens of 1 - cos(x, x + f(x)), where x is the residual stream entering the sub-layer and
f(x) what it adds. A sub-layer that barely turns the residual stream changes the model least
when skipped; unlike the distillation-loss increase of skipping each sub-layer alone, it needs
no extra forward pass per sub-layer (60 more passes over the calibration set for 30 layers).

Channels of the residual stream (hidden-size choices) are scored as Minitron ranks embedding
channels: by the activation magnitude of the normalised stream. For every norm over the stream
(each block's pre- and post-norms and the final norm), per channel, the mean over tokens of |norm
output| per sequence, then the L2 norm over sequences; the channel's score sums that over the norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from flextron.elastic import ElasticLinear, ElasticModel
from flextron.precision import autocast

ATTN_SCORES = ("input", "output")  # an attention unit's score: Minitron's, or what it adds (see above)


@dataclass
class Importance:
    """Per layer, one score per MLP neuron and per attention unit; per kind, one score per layer; one
    score per channel of the residual stream where the space has hidden-size choices (else None)."""

    mlp: list[Tensor]
    attn: list[Tensor]
    layers: dict[str, list[float]] | None = None
    hidden: Tensor | None = None

    def to_dict(self) -> dict:
        out = {"mlp": [s.tolist() for s in self.mlp], "attn": [s.tolist() for s in self.attn]}
        out |= {"layers": self.layers} if self.layers is not None else {}
        return out | ({"hidden": self.hidden.tolist()} if self.hidden is not None else {})

    def skip_order(self) -> dict[str, list[int]]:
        """Per kind, the layers from the least to the most important sub-layer."""
        return {k: sorted(range(len(v)), key=v.__getitem__) for k, v in (self.layers or {}).items()}


def _hook(store: list[Tensor], idx: int, unit: int):
    def hook(module: ElasticLinear, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach().float()
        b, t, f = x.shape
        per_seq = x.view(b, t, f // unit, unit).norm(dim=-1).mean(dim=1)
        store[idx] += per_seq.pow(2).sum(dim=0)

    return hook


def _contribution_hook(store: list[Tensor], idx: int):
    """Per unit, the norm of its contribution W_u x_u to the output, as sqrt(x_u^T (W_u^T W_u) x_u):
    no [tokens, units, hidden] tensor, so it scales to wide models."""
    def hook(module: ElasticLinear, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach().float()
        b, t, f = x.shape
        w = module.weight.detach().float()
        w = (w if module.conv1d else w.T).reshape(f // module.unit, module.unit, -1)  # [units, unit, out]
        z = x.view(b, t, f // module.unit, module.unit)
        sq = torch.einsum("btui,uij,btuj->btu", z, w @ w.transpose(1, 2), z)
        store[idx] += sq.clamp_min(0).sqrt().mean(dim=1).pow(2).sum(dim=0)

    return hook


def _block_hooks(part, store: list[Tensor], idx: int) -> list:
    """Accumulate sum over tokens of 1 - cos(x, x + f(x)) for the branch of `part`: x enters its
    first module (the pre-norm, else the sub-layer), f(x) leaves its last (the post-norm, else the sub-layer)."""
    seen: dict[str, Tensor] = {}

    def pre(module, args, kwargs) -> None:  # decoder layers pass the attention's input by keyword
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().float()

    def post(module, args, out) -> None:
        f = (out[0] if isinstance(out, tuple) else out).detach().float()
        x = seen.pop("x")
        store[idx] += (1 - F.cosine_similarity(x, x + f, dim=-1)).sum()

    first, last = part.pre or part.module, part.post or part.module
    return [first.register_forward_pre_hook(pre, with_kwargs=True), last.register_forward_hook(post)]


def _norm_hook(store: list[Tensor], idx: int):
    """Accumulate, per channel, the square of each sequence's mean over tokens of |output| of a norm."""
    def hook(module, args, out: Tensor) -> None:
        store[idx] += out.detach().float().abs().mean(dim=1).pow(2).sum(dim=0)

    return hook


def default_attn_score(em: ElasticModel) -> str:
    """"output" where attention units are query heads inside KV groups, else Minitron's "input"."""
    return "output" if em.attn_unit == "head" else "input"


@torch.no_grad()
def measure_importance(em: ElasticModel, sequences: Tensor, batch_size: int = 16,
                       autocast_dtype: torch.dtype | None = None, progress: bool = True,
                       attn_score: str | None = None) -> Importance:
    """Run the full model over `sequences` [N, T] and score every neuron and unit. `attn_score`
    forces one attention rule (an ablation); default: `default_attn_score(em)`."""
    attn_score = attn_score or default_attn_score(em)
    if attn_score not in ATTN_SCORES:
        raise ValueError(f"attn_score must be one of {ATTN_SCORES}, not {attn_score!r}")
    device = next(em.parameters()).device
    mlp = [torch.zeros(b.mlp.n_units, device=device) for b in em.blocks]
    attn = [torch.zeros(b.attn.n_units, device=device) for b in em.blocks]
    layers = {k: [torch.zeros((), device=device) for _ in em.blocks] for k in ("mlp", "attn")}
    norms = em.axis.norms if em.space.hidden is not None else []
    hidden = [torch.zeros(em.hidden_size, device=device) for _ in norms]
    handles = [norm.register_forward_hook(_norm_hook(hidden, i)) for i, norm in enumerate(norms)]
    for i, b in enumerate(em.blocks):
        handles.append(b.mlp.inp.register_forward_pre_hook(_hook(mlp, i, b.mlp.inp.unit)))
        score = _contribution_hook(attn, i) if attn_score == "output" else _hook(attn, i, b.attn.inp.unit)
        handles.append(b.attn.inp.register_forward_pre_hook(score))
        for kind in layers:
            handles += _block_hooks(getattr(b, kind), layers[kind], i)
    was_training = em.training
    em.eval()
    try:
        with em.subnet(None):
            for start in tqdm(range(0, len(sequences), batch_size), desc="calibration", disable=not progress):
                batch = sequences[start : start + batch_size].to(device)
                with autocast(device, autocast_dtype):
                    em(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        em.train(was_training)
    tokens = sequences.numel()
    return Importance(mlp=[s.sqrt().cpu() for s in mlp], attn=[s.sqrt().cpu() for s in attn],
                      layers={k: [float(v) / tokens for v in vs] for k, vs in layers.items()},
                      hidden=sum(s.sqrt() for s in hidden).cpu() if hidden else None)


def random_importance(em: ElasticModel, seed: int = 0) -> Importance:
    """Random scores: the ablation baseline for importance ordering (channels last, where the space has
    hidden-size choices, so the other draws are those of a space without them)."""
    gen = torch.Generator().manual_seed(seed)
    return Importance(
        mlp=[torch.rand(b.mlp.n_units, generator=gen) for b in em.blocks],
        attn=[torch.rand(b.attn.n_units, generator=gen) for b in em.blocks],
        layers={k: torch.rand(len(em.blocks), generator=gen).tolist() for k in ("mlp", "attn")},
        hidden=torch.rand(em.hidden_size, generator=gen) if em.space.hidden is not None else None,
    )


def sort_by_importance(em: ElasticModel, imp: Importance) -> Importance:
    """Permute the model so that units (and channels of the residual stream, where scored) come in
    descending importance; returns sorted scores."""
    mlp_perm = [torch.argsort(s, descending=True, stable=True) for s in imp.mlp]
    attn_perm = [b.attn_order(s) for b, s in zip(em.blocks, imp.attn)]
    em.permute_(mlp_perm, attn_perm)
    hidden = None
    if imp.hidden is not None:
        perm = torch.argsort(imp.hidden, descending=True, stable=True)
        em.permute_hidden_(perm)
        hidden = imp.hidden[perm]
    return Importance(
        mlp=[s[p] for s, p in zip(imp.mlp, mlp_perm)], attn=[s[p] for s, p in zip(imp.attn, attn_perm)],
        layers=imp.layers, hidden=hidden,
    )
