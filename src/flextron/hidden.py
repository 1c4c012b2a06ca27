"""The hidden size as one elastic choice for the whole model: the first d channels of the residual
stream, from the embeddings through every block to the LM head (Megatron-LM's `emb_int_list`,
Minitron's `hidden_size`).

Hard mode (d < D): the embeddings' output is cut to d channels; every projection that writes the
stream (o, down) keeps its first d output rows, every one that reads it (q/k/v, gate/up, the LM head)
its first d input columns, and every norm over the stream its first d weights. Compute, activations
and weights shrink, and the sub-network is the stock model with `hidden_size = d`. A norm takes its
statistic over the kept channels only, as that stock model does: RMSNorm the mean square of the d
channels, LayerNorm their mean and variance.

Soft mode: the stream stays D wide and is multiplied by a mask m over its channels (a nested mix of
prefixes, one per batch row where rows run different sizes). Channels beyond d then hold zeros, so
readers need nothing; the embeddings' and writers' outputs are multiplied by m, and a norm over the
stream computes its statistic over the kept channels: an RMS norm as norm(x * s) / s with
s = sqrt(D / sum(m)) (exact for a 0/1 mask, eps included: the norm is of x's kept channels), LayerNorm
written out with the mask; its output is multiplied by m. So a one-hot mask computes exactly what
the hard slice computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flextron.errors import FlextronError

_SWAPPED: dict[tuple[type, Callable], type] = {}


def _swap_forward(module: nn.Module, forward: Callable) -> None:
    """Give `module` a subclass of its class whose forward is `forward` (its state-dict keys, and an
    instance forward that a skip installs on top, are untouched)."""
    cls = type(module)
    if getattr(cls, "_flextron_base", None) is not None:
        return
    key = (cls, forward)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(cls.__name__, (cls,), {"forward": forward, "_flextron_base": cls,
                                                    "__module__": cls.__module__})
    module.__class__ = _SWAPPED[key]


class ModuleView:
    """A module seen through other attributes (its class's forward runs on, e.g., a slice of its weight)."""

    def __init__(self, module: nn.Module, **overrides) -> None:
        self._flextron_module = module
        vars(self).update(overrides)

    def __getattr__(self, name: str):
        return getattr(self._flextron_module, name)


def _narrowed(norm: nn.Module, d: int) -> ModuleView:
    """`norm` seen through its first `d` channels."""
    over = {k: getattr(norm, k)[:d] for k in ("weight", "bias") if getattr(norm, k, None) is not None}
    if hasattr(norm, "normalized_shape"):
        over["normalized_shape"] = (d,)
    return ModuleView(norm, **over)


def _norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    run = type(self)._flextron_base.forward
    mask = self.flextron_mask
    if mask is None:
        return run(self, x) if x.shape[-1] == self.flextron_full else run(_narrowed(self, x.shape[-1]), x)
    m = mask.to(x.dtype)
    kept = m.sum(-1, keepdim=True).clamp_min(1e-6)
    if isinstance(self, nn.LayerNorm):
        mean = (x * m).sum(-1, keepdim=True) / kept
        centred = (x - mean) * m
        y = centred * torch.rsqrt(centred.pow(2).sum(-1, keepdim=True) / kept + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y * m
    s = (x.shape[-1] / kept).sqrt()
    return run(self, x * s) / s * m


def _head_forward(self: nn.Module, x: Tensor) -> Tensor:
    """The LM head reads the first x.shape[-1] channels of its input features."""
    w = self.weight
    return F.linear(x, w if x.shape[-1] == w.shape[1] else w[:, : x.shape[-1]], self.bias)


def _embedding_hook(module: nn.Module, args, out: Tensor) -> Tensor:
    d = module.flextron_hidden
    if d < out.shape[-1]:
        out = out[..., :d]
    return out if module.flextron_mask is None else out * module.flextron_mask.to(out.dtype)


class HiddenAxis:
    """The residual stream's channels of an elastic model, as one nested choice for all its layers.

    Built once the space has hidden-size choices (a model without them runs exactly as before). It
    refuses a model with a weight of the hidden size that it does not know how to cut, rather than
    leave it full and compute something else than the stock model of the smaller size."""

    def __init__(self, model: nn.Module, embeddings: list[nn.Module], norms: list[nn.Module],
                 readers: list[nn.Module], writers: list[nn.Module], others: list[nn.Module] = ()) -> None:
        """`others`: modules known to hold no hidden-size dimension (a norm over a projection's output,
        which may have as many features as the stream)."""
        self.embeddings = embeddings
        self.head = model.get_output_embeddings()
        if not isinstance(self.head, nn.Linear):
            raise FlextronError(f"{type(model).__name__}'s output layer is not a Linear; it cannot run at a "
                                "smaller hidden size (convert without --hidden-fractions)")
        self.size = embeddings[0].weight.shape[1]
        self.norms = list({id(n): n for n in norms}.values())
        self.readers, self.writers = readers, writers
        self._check_covered(model, others)
        self.active, self.mask = self.size, None
        for emb in self.embeddings:
            emb.register_forward_hook(_embedding_hook)
        for norm in self.norms:
            _swap_forward(norm, _norm_forward)
        _swap_forward(self.head, _head_forward)
        self._apply()

    def _check_covered(self, model: nn.Module, others: list[nn.Module]) -> None:
        touched = {id(p) for m in (*self.embeddings, self.head, *self.norms, *self.readers, *self.writers, *others)
                   for p in m.parameters()}
        left = [n for n, p in model.named_parameters() if id(p) not in touched and self.size in p.shape]
        if left:
            raise FlextronError(f"{type(model).__name__} has weights of the hidden size that flextron does not "
                                f"know how to cut ({', '.join(left[:3])}); convert without --hidden-fractions")

    def _apply(self) -> None:
        hard = None if self.active == self.size else self.active
        for m in (*self.embeddings, *self.norms):
            m.flextron_full, m.flextron_hidden, m.flextron_mask = self.size, self.active, self.mask
        for lin in self.writers:
            lin.hidden, lin.hidden_mask = hard, self.mask

    def set_hard(self, d: int | None) -> None:
        """Run the first `d` channels (None: all of them)."""
        self.active, self.mask = d or self.size, None
        self._apply()

    def set_soft(self, mask: Tensor) -> None:
        """All channels, the stream times `mask` [..., D] (rows, or one mask for every row)."""
        self.active, self.mask = self.size, mask
        self._apply()

    @torch.no_grad()
    def permute_(self, perm: Tensor) -> None:
        """Reorder the channels everywhere they are read or written; the function is unchanged."""
        def take(t: Tensor, dim: int) -> None:
            t.copy_(t.index_select(dim, perm.to(t.device)))

        seen = set()
        for emb in (*self.embeddings, self.head):
            if id(emb.weight) not in seen:
                take(emb.weight, 1)
                seen.add(id(emb.weight))
        for norm in self.norms:
            for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)):
                if p is not None:
                    take(p, 0)
        for lin in self.readers:
            take(lin.weight, lin.hdim)
        for lin in self.writers:
            take(lin.weight, lin.hdim)
            if lin.bias is not None:
                take(lin.bias, 0)
