"""The numerical check of a family against transformers: does the elastic model compute what the HF
model computes, at full width and with one attention and one MLP skipped?

The reference is transformers' own model with that sub-layer's output set to zero by a forward hook
(behind a sandwich or post-norm, the trailing norm of zero is zero, so the branch adds nothing); a
family whose declared block semantics are wrong for the model (a norm in the wrong place) fails it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.families import Family
from flextron.space import Subnet

TOLERANCE = 1e-4  # of the largest logit: the same operations run in both, so only rounding may differ


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


def checked_elastic(model: nn.Module, family: Family, attn_unit: str = "group", tokens: int = 16) -> ElasticModel:
    """`model` made elastic as `family` (in place), after checking on `tokens` random tokens that its full
    width, one attention skip and one MLP skip (in the middle layer) equal transformers' own model with
    that sub-layer's output zeroed; a FlextronError naming the first mismatch otherwise."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen).to(device)
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
