"""What decoding needs around the model, for the one decoder (`flextron.engine`): chat-template
prompts, the model's context length and end-of-text tokens, and stop strings matched as text streams."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from flextron.errors import FlextronError


def context_length(config: object) -> int | None:
    """The most positions a model takes: `max_position_embeddings`, else `n_positions`; None where the
    config gives neither, which every caller reads as no known limit (nothing is cut or refused)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def within_context(config: object, tokens: int) -> int:
    """`tokens`, or the model's context where that is shorter (held-out windows of a report)."""
    return min(tokens, context_length(config) or tokens)


def check_positions(config: object, tokens: int, what: str) -> None:
    """Refuse, in one line, a run of `tokens` positions (`what` says which options make them) beyond
    the model's context: learned positions have no row for them, RoPE was never trained on them."""
    context = context_length(config)
    if context is not None and tokens > context:
        raise FlextronError(f"{what} is {tokens} tokens, beyond the model's context of {context}; make it smaller")


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], raw: bool = False) -> tuple[str, bool]:
    """The text to tokenize for `prompt`, wrapped in the tokenizer's chat template when it has one, unless
    `raw` (a list of chat messages, `{"role", "content"}`, always goes through it); and whether the
    tokenizer adds its special tokens (the template already holds those it wants)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, list) and not has_template:
        raise FlextronError("this model's tokenizer has no chat template, so it cannot take chat messages; "
                            "send a plain text prompt instead")
    if not isinstance(prompt, list) and (raw or not has_template):
        return prompt, True
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template is code from the model's files: whatever it raises is its own failure
        where = getattr(tokenizer, "name_or_path", "") or "the model"
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        todo = ("send a plain text prompt instead" if isinstance(prompt, list) else
                "pass --raw to send the prompt without it")
        raise FlextronError(f"the chat template of {where} (chat_template.jinja or tokenizer_config.json) failed "
                            f"on this prompt ({why}); {todo}") from None
    return text, False


def prompt_inputs(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], raw: bool = False
                  ) -> dict[str, Tensor]:
    """Token ids of `prompt`: wrapped in the tokenizer's chat template when it has one, unless `raw`.

    A list of chat messages (`{"role", "content"}`) always goes through the chat template.
    """
    text, special = prompt_text(tokenizer, prompt, raw)
    return dict(tokenizer(text, return_tensors="pt", add_special_tokens=special))


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first occurrence of any stop string, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def _borders(s: str) -> list[int]:
    """Knuth-Morris-Pratt: for each prefix s[:i+1], the length of its longest proper prefix that is also its suffix."""
    border, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = border[k - 1]
        if s[i] == s[k]:
            k += 1
        border[i] = k
    return border


class StopFilter:
    """Passes streamed text on up to the first stop string, in time linear in the text.

    Text that could be the start of a stop string is held back until the next piece decides it, so
    the pieces passed on always add up to `cut_at_stop` of the whole text. Each stop string is matched
    by its Knuth-Morris-Pratt automaton, one step per character: nothing is scanned twice, however long
    the stop strings or the held-back text.
    """

    def __init__(self, stops: Sequence[str], emit: Callable[[str], None] | None = None) -> None:
        self.stops, self.emit = [s for s in stops if s], emit
        self._borders = [_borders(s) for s in self.stops]
        self._matched = [0] * len(self.stops)  # per stop: its longest prefix the text ends with
        self.pending, self.stopped = "", False

    def __call__(self, text: str) -> None:
        if self.stopped:
            return
        start = len(self.pending)
        self.pending += text
        cut = None
        for j, (stop, border) in enumerate(zip(self.stops, self._borders)):
            k = self._matched[j]
            for i, ch in enumerate(text):
                while k and ch != stop[k]:
                    k = border[k - 1]
                if ch == stop[k]:
                    k += 1
                if k == len(stop):  # its first occurrence; another stop may still start earlier
                    at = start + i + 1 - k
                    cut = at if cut is None else min(cut, at)
                    break
            self._matched[j] = k
        # A match starts within the held-back text, which is as long as the longest matched prefix.
        self.stopped = cut is not None
        head = self.pending[:cut] if self.stopped else self.pending[:len(self.pending) - max(self._matched, default=0)]
        self.pending = "" if self.stopped else self.pending[len(head):]
        if head and self.emit is not None:
            self.emit(head)

    def flush(self) -> None:
        """Pass on the held-back text: the text has ended without a stop string."""
        if self.pending and not self.stopped and self.emit is not None:
            self.emit(self.pending)
        self.pending = ""


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The end-of-text token ids: the model's generation config's, else the tokenizer's; one that is not a
    token id (an integer from 0) is refused in one line naming the file."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
        where = getattr(model, "name_or_path", "")
        raise FlextronError(f"eos_token_id {json.dumps(eos, default=str)[:80]} in "
                            f"{Path(where) / 'generation_config.json' if where else 'generation_config.json'} (or "
                            "config.json) is not a token id (an integer from 0, or a list of them); fix or remove it")
    return ids
