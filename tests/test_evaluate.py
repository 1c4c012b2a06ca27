"""Perplexity equals a plain Hugging Face loop (the model's own shifted loss)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_model
from flextron.evaluate import perplexity


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_equals_the_hf_loss_loop(batch_size):
    model = make_model("llama")
    windows = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert perplexity(model, windows, batch_size=batch_size, progress=False) == pytest.approx(
        math.exp(sum(losses) / len(losses)), rel=1e-5)
