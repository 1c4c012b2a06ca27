"""The surrogate of stage 2 as it learns online: an MLP from the router's per-layer choice
probabilities to the LLM's distillation loss, fitted on every architecture measured so far, with
a running error on architectures it had not yet seen that tells when it may guide the router;
and the random router logits its warm-up measures."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flextron.options import RouteOptions
from flextron.routers import Choices, Surrogate


class OnlineSurrogate:
    """The surrogate, its optimizer and everything measured so far; `accurate` once its recent
    error on architectures it had not yet been fitted on is small against the loss's spread."""

    window = 16  # recent predictions the running error averages

    def __init__(self, n_in: int, cfg: RouteOptions, gen: torch.Generator, device: torch.device) -> None:
        self.model = Surrogate(n_in, cfg.surrogate_hidden).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.cfg, self.gen = cfg, gen
        self.xs: list[torch.Tensor] = []
        self.ys: list[float] = []
        self.misses: list[float] = []

    @property
    def error(self) -> float:
        """Mean |prediction - loss| of the last `window` predictions over the mean |loss - mean loss|:
        a surrogate that only knows the mean loss scores ~1, one that tells architectures apart ~0."""
        if len(self.misses) < self.window:
            return math.inf
        ys = torch.tensor(self.ys, dtype=torch.float64)
        spread = (ys - ys.mean()).abs().mean().item()
        return sum(self.misses[-self.window :]) / self.window / max(spread, 1e-12)

    @property
    def accurate(self) -> bool:
        return self.error < self.cfg.surrogate_threshold

    def predict(self, probs: Choices) -> torch.Tensor:
        """The predicted loss, differentiable in the choice probabilities (not in the surrogate)."""
        self.model.requires_grad_(False)
        out = self.model(probs.flat().float())
        self.model.requires_grad_(True)
        return out

    def observe(self, probs: Choices, sample: Choices, loss: float) -> None:
        """Score the prediction for the sampled architecture (one-hot), then fit on it and on the
        router's probabilities, both with the measured loss, and on everything before."""
        x = sample.flat().float()
        with torch.no_grad():
            self.misses.append(abs(self.model(x).item() - loss))
        # The surrogate reads E[loss] under the router's probabilities: at a one-hot that is the
        # architecture's loss, elsewhere the sampled loss is an unbiased draw of it.
        self.xs += [x, probs.flat().float()]
        self.ys += [loss, loss]
        _fit_surrogate(self.model, self.opt, self.xs, self.ys, self.cfg.surrogate_fit_steps, self.gen)


def random_logits(mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random router logits, tilted towards small or large choices (so warm-up covers every budget)
    and from flat to sharp."""
    k = mask.shape[-1]
    tilt = (torch.rand((), generator=gen) * 8 - 4) * torch.arange(k) / max(k - 1, 1)
    sharpness = 4 ** (torch.rand((), generator=gen) * 2 - 1)
    return ((torch.randn(mask.shape, generator=gen) + tilt) * sharpness).masked_fill(~mask.cpu(), float("-inf"))




def _fit_surrogate(model: Surrogate, opt: torch.optim.Optimizer, xs: list[torch.Tensor], ys: list[float],
                   steps: int, gen: torch.Generator) -> None:
    """A few Adam steps of MSE on random mini-batches of everything measured so far."""
    x, y = torch.stack(xs), torch.tensor(ys, device=xs[0].device)
    model.offset.fill_(y.mean().item())
    model.scale.fill_(max(y.std().item() if len(ys) > 1 else 1.0, 1e-8))
    for _ in range(steps):
        i = torch.randint(len(xs), (min(64, len(xs)),), generator=gen).to(x.device)
        loss = F.mse_loss((model(x[i]) - y[i]) / model.scale, torch.zeros_like(y[i]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
