"""Text generation with a loaded causal LM (an elastic model at its current sub-network, or an export)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, TextStreamer

from flextron.errors import FlextronError


def prompt_inputs(tokenizer: PreTrainedTokenizerBase, prompt: str, raw: bool = False) -> dict[str, Tensor]:
    """Token ids of `prompt`: wrapped in the tokenizer's chat template when it has one, unless `raw`."""
    if not raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        # The template already holds the special tokens it wants.
        return dict(tokenizer(text, return_tensors="pt", add_special_tokens=False))
    return dict(tokenizer(prompt, return_tensors="pt"))


class _CallbackStreamer(TextStreamer):
    """Hands each piece of finished text to a callback instead of printing it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, callback: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, *,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  raw: bool = False, seed: int | None = None,
                  stream: Callable[[str], None] | None = None) -> str:
    """Continue `prompt`: greedy at temperature 0, else sampling with nucleus `top_p`; the new text."""
    if max_new_tokens < 1:
        raise FlextronError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise FlextronError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise FlextronError(f"--top-p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in prompt_inputs(tokenizer, prompt, raw).items()}
    if inputs["input_ids"].shape[1] == 0:
        raise FlextronError("the prompt is empty after tokenization; pass some text or drop --raw")
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    sample = temperature > 0
    # Explicit settings, so that a model's own generation defaults (e.g. sampling) do not leak in.
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
        streamer=None if stream is None else _CallbackStreamer(tokenizer, stream), **options,
    )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
