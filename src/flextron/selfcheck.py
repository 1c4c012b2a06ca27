"""The numerical check of a family against transformers: does the elastic model compute what the HF
model computes, at full width and with one attention and one MLP skipped? And, for hidden-size
choices, does its smallest hidden size compute the same as the first channels (hard slice) and as
the masked stream (soft, how mixed rows train and serve)?

The reference is transformers' own model with that sub-layer's output set to zero by a forward hook
(behind a sandwich or post-norm, the trailing norm of zero is zero, so the branch adds nothing); a
family whose declared block semantics are wrong for the model (a norm in the wrong place) fails it."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.families import Family
from flextron.space import Subnet

TOLERANCE = 1e-4  # of the largest logit: the same operations run in both, so only rounding may differ
# Hard slice and soft mask run different operations (a masked norm). In 16-bit weights their rounding
# differs by more than TOLERANCE (1-2 % of the largest logit on two tiny layers, more in deep models):
# there the check only catches gross mismatches (a statistic over the wrong channels: 20 % and more).
HALF_TOLERANCE = 0.1


def _zero_output(module: nn.Module, args, out):
    return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)


@torch.no_grad()
def _logits(model: nn.Module, ids: Tensor, zeroed: nn.Module | None = None) -> Tensor:
    handle = zeroed.register_forward_hook(_zero_output) if zeroed is not None else None
    try:
        return model(input_ids=ids, use_cache=False).logits.float()
    finally:
        if handle is not None:
            handle.remove()


def _random_ids(model: nn.Module, tokens: int) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen).to(next(model.parameters()).device)


def checked_elastic(model: nn.Module, family: Family, attn_unit: str = "group", tokens: int = 16) -> ElasticModel:
    """`model` made elastic as `family` (in place), after checking on `tokens` random tokens that its full
    width, one attention skip and one MLP skip (in the middle layer) equal transformers' own model with
    that sub-layer's output zeroed; a FlextronError naming the first mismatch otherwise."""
    was_training = model.training
    model.eval()
    ids = _random_ids(model, tokens)
    layer = family.blocks(model)[len(family.blocks(model)) // 2]
    want = {"full width": _logits(model, ids)}
    for kind, branch in (("attention", family.attn), ("MLP", family.mlp)):
        want[f"{kind} skip"] = _logits(model, ids, layer.get_submodule(branch.module))
    em = ElasticModel(model, family=family, attn_unit=attn_unit)
    space, n, middle = em.space, len(em.blocks), len(em.blocks) // 2
    full = space.full()
    skips = {"full width": full}
    if n > 1:  # the depth floor keeps at least one layer whole
        em.set_space(space.with_depth(min_layers=n - 1))
        skips["attention skip"] = Subnet(mlp=full.mlp, attn=[0 if i == middle else a for i, a in enumerate(full.attn)])
        skips["MLP skip"] = Subnet(mlp=[0 if i == middle else w for i, w in enumerate(full.mlp)], attn=full.attn)
    try:
        for what, subnet in skips.items():
            with em.subnet(subnet):
                got = _logits(em, ids)
            error = (got - want[what]).abs().max().item()
            if not error <= TOLERANCE * max(1.0, want[what].abs().max().item()):
                raise FlextronError(
                    f"the {family.name} family ({family.layout}) does not compute this "
                    f"{type(model).__name__}: {what} of layer {middle} differs from transformers by {error:.3g}; "
                    "choose another --family, or ask for this model type to be declared")
    finally:
        em.set_space(space)
        model.train(was_training)
    return em


@torch.no_grad()
def check_hidden(em: ElasticModel, tokens: int = 16) -> None:
    """Check on `tokens` random tokens that `em` (its space with hidden-size choices) computes the same at
    its smallest hidden size hard (the first channels only) and soft (the full stream under a one-hot
    mask); a FlextronError otherwise. A module over the residual stream that flextron does not cut (a norm
    without weights) sees fewer channels in the one and zeros in the other, so they differ."""
    sub = dataclasses.replace(em.space.full(), hidden=em.space.hidden_at(0))
    ids = _random_ids(em.model, tokens)
    was_training = em.training
    em.eval()
    try:
        with em.subnet(sub):
            hard = _logits(em, ids)
        with em.rows([sub]):
            soft = _logits(em, ids)
    finally:
        em.train(was_training)
    error = (hard - soft).abs().max().item()
    tolerance = TOLERANCE if next(em.parameters()).dtype == torch.float32 else HALF_TOLERANCE
    if not error <= tolerance * max(1.0, hard.abs().max().item()):
        raise FlextronError(f"the {em.family.name} family does not run this {type(em.model).__name__} at hidden "
                            f"size {sub.hidden}: its first {sub.hidden} channels and the masked stream differ by "
                            f"{error:.3g}; convert without --hidden-fractions")
