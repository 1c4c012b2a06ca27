"""Text generation with a loaded causal LM (an elastic model at its current sub-network, or an export)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList, TextStreamer

from flextron.errors import FlextronError
from flextron.options import Sampling, resolve


def context_length(config: object) -> int | None:
    """The most positions a model takes: `max_position_embeddings`, else `n_positions`; None where the
    config gives neither, which every caller reads as no known limit (nothing is cut or refused)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def prompt_inputs(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], raw: bool = False
                  ) -> dict[str, Tensor]:
    """Token ids of `prompt`: wrapped in the tokenizer's chat template when it has one, unless `raw`.

    A list of chat messages (`{"role", "content"}`) always goes through the chat template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, list) and not has_template:
        raise FlextronError("this model's tokenizer has no chat template, so it cannot take chat messages; "
                            "send a plain text prompt instead")
    if isinstance(prompt, list) or (has_template and not raw):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first occurrence of any stop string, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class _StopOnText(StoppingCriteria):
    """Ends generation once the new text contains a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_len: int) -> None:
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids: Tensor, scores: Tensor | None, **kwargs) -> Tensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_len:], skip_special_tokens=True)
        done = cut_at_stop(text, self.stops)[1]
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _StopFilter:
    """Passes streamed text on up to the first stop string.

    Text that could be the start of a stop string is held back until the next piece decides
    it, so the pieces passed on always add up to `cut_at_stop` of the whole text.
    """

    def __init__(self, stops: Sequence[str], emit: Callable[[str], None]) -> None:
        self.stops, self.emit = [s for s in stops if s], emit
        self.pending, self.stopped = "", False

    def __call__(self, text: str) -> None:
        if self.stopped:
            return
        self.pending += text
        head, self.stopped = cut_at_stop(self.pending, self.stops)
        if not self.stopped:
            keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
            head = self.pending[:len(self.pending) - keep]
        self.pending = "" if self.stopped else self.pending[len(head):]
        if head:
            self.emit(head)

    def flush(self) -> None:
        if self.pending and not self.stopped:
            self.emit(self.pending)
        self.pending = ""


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The end-of-text token ids: the model's generation config's, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


@dataclass
class Completion:
    """Generated text with its token counts; `finish_reason` is "stop" (end of text or a stop string) or "length"."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@torch.no_grad()
def complete(model: nn.Module, tokenizer: PreTrainedTokenizerBase, inputs: dict[str, Tensor],
             sampling: Sampling | None = None, *, stop: Sequence[str] = (), stream: Callable[[str], None] | None = None,
             **overrides: Any) -> Completion:
    """Continue the token ids `inputs` (see `prompt_inputs`): greedy at temperature 0, else nucleus sampling
    (`sampling`, or its fields as keyword arguments).

    Generation ends at the end-of-text token, after `max_new_tokens` (or at the model's context
    length, whichever comes first), or at the first of the `stop` strings (left out of the text);
    `stream` receives the text piece by piece as it comes.
    """
    sampling = resolve(Sampling, sampling, overrides)
    max_new_tokens, temperature, top_p, seed = (sampling.max_new_tokens, sampling.temperature, sampling.top_p,
                                                sampling.seed)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]
    if prompt_len == 0:
        raise FlextronError("the prompt is empty after tokenization; pass some text or drop --raw")
    context = context_length(model.config)
    if context is not None:
        if prompt_len >= context:
            raise FlextronError(f"the prompt has {prompt_len} tokens, the model's whole context of {context}; "
                                "shorten it")
        max_new_tokens = min(max_new_tokens, context - prompt_len)
    eos = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [None])[0]
    sample = temperature > 0
    # Explicit settings, so that a model's own generation defaults (e.g. sampling) do not leak in.
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if seed is not None:
        torch.manual_seed(seed)
    stops = [s for s in stop if s]
    streamer = stopper = None
    if stream is not None:
        stopper = _StopFilter(stops, stream)
        streamer = _CallbackStreamer(tokenizer, stopper)
    criteria = StoppingCriteriaList([_StopOnText(tokenizer, stops, prompt_len)] if stops else [])
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=eos or None, pad_token_id=pad,
                         streamer=streamer, stopping_criteria=criteria, **options)
    if stopper is not None:
        stopper.flush()
    new = out[0, prompt_len:]
    text, stopped = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stops)
    ended = stopped or (len(new) > 0 and int(new[-1]) in eos)
    return Completion(text, prompt_len, len(new), "stop" if ended or len(new) < max_new_tokens else "length")


def generate_text(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, sampling: Sampling | None = None,
                  *, raw: bool = False, stream: Callable[[str], None] | None = None, **overrides: Any) -> str:
    """Continue `prompt` (in the chat template unless `raw`) as `complete` does; the new text."""
    return complete(model, tokenizer, prompt_inputs(tokenizer, prompt, raw), sampling, stream=stream,
                    **overrides).text
