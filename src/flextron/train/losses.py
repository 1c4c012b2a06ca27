"""Every training loss: the distillation loss (KL to the teacher + next-token CE) on logits, and
the same read over the vocabulary in chunks of tokens.

Full-vocabulary logits are the largest tensors of a training step (128k vocabulary x 4k tokens
is 2 GB in fp32 per sequence, per model). `chunked_distill_loss` sends each chunk of final hidden
states through the output layers of student and teacher, log-softmax, KL and CE, and forms its
gradients with respect to the student's hidden states and output layer at once (the gradient of KL
and CE with respect to logits is a difference of probabilities), accumulated in place, as fused
linear-cross-entropy kernels do. No chunk's logits outlive the chunk, and backward only scales
the accumulated gradients. A student at a smaller hidden size d (flextron.hidden) has d channels in
its hidden states and reads the first d columns of its output layer; the teacher reads all of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flextron.options import TrainOptions


def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0, keep: Tensor | None = None) -> Tensor:
    """T^2 * KL(teacher || student) at temperature T, summed over the vocabulary, mean over tokens (those
    where `keep` is true, when given)."""
    s_log = F.log_softmax(student.float() / temperature, dim=-1)
    t_log = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(s_log, t_log, log_target=True, reduction="none").sum(-1)
    mean = kl.mean() if keep is None else (kl * keep).sum() / keep.sum().clamp(min=1)
    return mean * temperature * temperature


def loss_positions(mask: Tensor) -> Tensor:
    """The positions in the loss for a mask of the tokens to learn ([B, T]): those that predict one of
    them (the last position predicts nothing in the row)."""
    return torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1).bool()


def distill_loss(student: Tensor, teacher: Tensor, ids: Tensor, cfg: TrainOptions, s_head: nn.Linear | None = None,
                 t_head: nn.Module | None = None, mask: Tensor | None = None) -> tuple[Tensor, dict]:
    """kd_weight * T^2 * KL(teacher || student) at temperature T + lm_weight * next-token CE.

    `student` / `teacher` are logits, or final hidden states with the output layers that make logits
    of them (then the vocabulary is read in chunks of `cfg.loss_chunk` tokens, `chunked_distill_loss`).
    `mask` ([B, T], e.g. a chat's assistant tokens) limits both terms to the positions predicting its tokens.
    """
    keep = None if mask is None else loss_positions(mask)
    if s_head is not None:
        loss, kd, lm = chunked_distill_loss(student, teacher, ids, s_head, t_head, cfg.kd_weight, cfg.lm_weight,
                                            cfg.kd_temperature, cfg.loss_chunk, keep)
    else:
        kd = kd_loss(student, teacher, cfg.kd_temperature, keep)
        targets = ids[:, 1:] if keep is None else ids[:, 1:].masked_fill(~keep[:, :-1], -100)
        lm = F.cross_entropy(student[:, :-1].flatten(0, 1).float(), targets.flatten())
        loss = cfg.kd_weight * kd + cfg.lm_weight * lm
    return loss, {"kd": kd.item(), "lm": lm.item()}


class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, t_hidden: Tensor, t_head: nn.Module,
                targets: Tensor, kd_weight: float, lm_weight: float, temperature: float, chunk: int,
                keep: Tensor | None):
        n = hidden.shape[0] if keep is None else max(int(keep.sum()), 1)
        n_ce = int((targets != -100).sum())
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        grad_b = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        kl_sum, ce_sum = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
        for lo in range(0, hidden.shape[0], chunk):
            h, tgt = hidden[lo : lo + chunk], targets[lo : lo + chunk]
            s = F.linear(h, weight, bias).float()
            t_log = F.log_softmax(t_head(t_hidden[lo : lo + chunk]).float() / temperature, dim=-1)
            s_log = F.log_softmax(s / temperature, dim=-1)
            if keep is None:
                kl_sum += F.kl_div(s_log, t_log, log_target=True, reduction="sum")
            else:
                k = keep[lo : lo + chunk]
                kl_sum += (F.kl_div(s_log, t_log, log_target=True, reduction="none").sum(-1) * k).sum()
            valid = tgt != -100
            log_p = s_log if temperature == 1 else F.log_softmax(s, dim=-1)
            ce_sum -= (log_p.gather(1, tgt.clamp(min=0)[:, None]).squeeze(1) * valid).sum()
            d_ce = None
            if lm_weight and n_ce:  # d(CE)/ds = softmax(s) - one_hot(target), on valid rows
                d_ce = log_p.exp()
                d_ce[valid, tgt[valid]] -= 1
                d_ce.mul_(valid[:, None] * (lm_weight / n_ce))
            # d(T^2 * KL / n)/ds = T / n * (softmax(s / T) - p_teacher)
            g = (s_log.exp_() - t_log.exp_()).mul_(kd_weight * temperature / n)
            if keep is not None:
                g.mul_(k[:, None])
            if d_ce is not None:
                g += d_ce
            grad_h[lo : lo + chunk] = g.to(weight.dtype) @ weight
            if torch.is_autocast_enabled(h.device.type):  # low-precision matmul, one [V, H] temporary
                grad_w += g.T @ h
            else:
                grad_w.addmm_(g.T, h.to(grad_w.dtype))
            if grad_b is not None:
                grad_b += g.sum(0)
        kd = kl_sum / n * temperature * temperature
        lm = ce_sum / max(n_ce, 1)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), grad_b)
        ctx.has_bias = bias is not None
        loss = kd_weight * kd + lm_weight * lm
        ctx.mark_non_differentiable(kd, lm)
        return loss, kd, lm

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_loss.to(grad_h.dtype)
        return (grad_h.mul_(scale), grad_w.mul_(scale), grad_b.mul_(scale) if ctx.has_bias else None,
                None, None, None, None, None, None, None, None)


def chunked_distill_loss(hidden: Tensor, t_hidden: Tensor, ids: Tensor, head: nn.Linear, t_head: nn.Module,
                         kd_weight: float = 1.0, lm_weight: float = 0.0, temperature: float = 1.0,
                         chunk: int = 1024, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(kd_weight * kd + lm_weight * lm, kd, lm) from the final hidden states [B, T, H] of student and teacher.

    kd = T^2 * KL(teacher || student) at temperature T, mean over tokens; lm = next-token CE; both over
    the positions where `keep` ([B, T]) is true, when given.
    Equal to the same terms on full logits; at most `chunk` tokens' logits exist at a time. Student
    hidden states narrower than `head` (a smaller hidden size) meet its first columns, as the elastic
    model's own head does.
    """
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    if keep is not None:
        targets = targets.masked_fill(~keep, -100)
        keep = keep.flatten().to(hidden.dtype)
    weight = head.weight
    if hidden.shape[-1] != weight.shape[1]:  # the slice's backward puts its gradient in those columns
        weight = weight[:, : hidden.shape[-1]]
    return _ChunkedDistill.apply(hidden.flatten(0, 1), weight, head.bias, t_hidden.flatten(0, 1), t_head,
                                 targets.flatten(), kd_weight, lm_weight, temperature, chunk, keep)
