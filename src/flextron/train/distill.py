"""The distillation loss read over the vocabulary in chunks of tokens.

Full-vocabulary logits are the largest tensors of a training step (128k vocabulary x 4k tokens
is 2 GB in fp32 per sequence, per model). Here each chunk of final hidden states goes through
the output layers of student and teacher, log-softmax, KL (+ CE) and is summed; the chunk is
checkpointed, so backward recomputes its logits instead of keeping every chunk's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Head = Callable[[Tensor], Tensor]


def _chunk_sums(s_hidden: Tensor, t_hidden: Tensor, targets: Tensor, s_head: Head, t_head: Head,
                temperature: float) -> Tensor:
    """[KL sum, CE sum] over the chunk's tokens (CE skips targets of -100)."""
    s = s_head(s_hidden).float()
    with torch.no_grad():
        t_log = F.log_softmax(t_head(t_hidden).float() / temperature, dim=-1)
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), t_log, log_target=True, reduction="sum")
    ce = F.cross_entropy(s, targets, ignore_index=-100, reduction="sum")
    return torch.stack([kl, ce])


def chunked_distill_terms(s_hidden: Tensor, t_hidden: Tensor, ids: Tensor, s_head: Head, t_head: Head,
                          temperature: float = 1.0, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(T^2 * KL(teacher || student) mean over tokens, next-token CE mean) from final hidden states.

    Equal to the same terms on full logits; at most `chunk` tokens' logits exist at a time.
    """
    b, t, _ = s_hidden.shape
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).flatten()
    s_flat, t_flat = s_hidden.flatten(0, 1), t_hidden.flatten(0, 1)
    total = s_hidden.new_zeros(2, dtype=torch.float32)
    for lo in range(0, b * t, chunk):
        part = slice(lo, lo + chunk)
        args = (s_flat[part], t_flat[part], targets[part], s_head, t_head, temperature)
        if torch.is_grad_enabled() and s_flat.requires_grad:
            total = total + checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            total = total + _chunk_sums(*args)
    kd = total[0] / (b * t) * temperature * temperature
    return kd, total[1] / (b * (t - 1))

