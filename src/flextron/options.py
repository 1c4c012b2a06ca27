"""Options, in one home: each command's options are one dataclass whose fields are made with `opt`
(default, help text, choices, number rules). The CLI flags, the API keyword arguments and the
`--config FILE.yaml` keys all come from these fields, and every options object checks its fields on
creation (`check_options`), so the API and the CLI refuse the same values. A run records its resolved
options with `write_yaml`."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from flextron.deployment import KV_TYPES, Deployment
from flextron.errors import FlextronError
from flextron.fsutil import atomic_write
from flextron.space import ATTN_UNITS

DTYPE_NAMES = ("auto", "fp32", "bf16")  # flextron.precision.compute_dtype: auto is bf16 on CUDA, else fp32
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")  # GGUF weight types (flextron.gguf)
GRAPHS = ("auto", "own", "deci")  # llama.cpp graphs a uniform sub-network can be written in
SAMPLING = ("sandwich", "uniform", "budgets", "fixed")
LOGGERS = ("csv", "tensorboard", "wandb")  # metrics.csv is always written; the others add a tracker

SEED_RANGE = {"low": 0, "high": 2**32 - 1}
_POSITIVE = {"low": 1}
_NON_NEGATIVE = {"low": 0}
_POSITIVE_FLOAT = {"low": 0.0, "low_open": True}
_FRACTION = {"low": 0.0, "high": 1.0, "low_open": True}  # each value of a list of budget fractions
_MAX_CONFIG_BYTES = 1 << 20  # options fit in a few KiB; bounds what a hostile file costs
_FP32_MAX = 3.4e38  # a larger learning rate cannot even be applied to fp32 weights


def opt(default: Any, help: str, *, choices: tuple | None = None, **rules: Any) -> Any:
    """A dataclass field that is a command option: its default, its --help text, its allowed values
    and its `check_number` rules (low, high, low_open; for a list, of each value), applied by
    `check_options` and the CLI."""
    return field(default=default, metadata={"help": help, "choices": choices, "rules": rules})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_type(cls: type, name: str) -> tuple[Any, Any, bool]:
    """(type, element type of a tuple or None, whether None is allowed) of a dataclass field."""
    hint, optional = _hints(cls)[name], False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint, optional = args[0], len(args) < len(typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return tuple, typing.get_args(hint)[0], optional
    return hint, None, optional


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _checked(name: str, value: object, kind: Any, rules: dict) -> object:
    """`value` checked as one value of type `kind` (str, bool, int or float) by `rules`."""
    if kind in (int, float):
        check_number(name, value, integer=kind is int, **rules)
    elif kind is bool and not isinstance(value, bool):
        raise FlextronError(f"{_flag(name)} must be true or false, got {value!r}")
    elif kind is str and not isinstance(value, str):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FlextronError(f"{_flag(name)} must be text, got {value!r}")
        return str(value)  # a budget written as a YAML or Python number
    return value


def check_options(obj: object) -> None:
    """Check each `opt` field of a dataclass: its type (None only where the field allows it), numbers
    by their rules, lists non-empty with each value checked (and made tuples), choices."""
    for f in fields(obj):
        kind, item, optional = field_type(type(obj), f.name)
        value, meta = getattr(obj, f.name), f.metadata
        rules = meta.get("rules", {})
        if value is None:
            if not optional:
                raise FlextronError(f"{_flag(f.name)} needs a value, got none (null); give one or leave it out")
            continue
        if kind is tuple:
            if not isinstance(value, (tuple, list)):
                raise FlextronError(f"{_flag(f.name)} must be a list of values, got {value!r}")
            if not value:
                raise FlextronError(f"{_flag(f.name)} needs at least one value")
            value = tuple(_checked(f.name, v, item, rules) for v in value)
        else:
            value = _checked(f.name, value, kind, rules)
        setattr(obj, f.name, value)
        choices = meta.get("choices")
        if choices and value not in choices:
            raise FlextronError(f"{_flag(f.name)} must be one of {', '.join(choices)}, not {value!r}")


def check_number(name: str, value: object, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, low_open: bool = False, optional: bool = False) -> None:
    """Raise a one-line FlextronError unless `value` is a finite number (an int when `integer`) in
    [low, high] ((low, high] when `low_open`); None passes when `optional`."""
    flag = _flag(name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise FlextronError(f"{flag} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise FlextronError(f"{flag} must be a finite number, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        left = "(" if low_open else "["
        raise FlextronError(f"{flag} must be in {left}{'-inf' if low is None else f'{low:g}'}, "
                            f"{'inf' if high is None else f'{high:g}'}], got {value}")


T = TypeVar("T")

def resolve(cls: type[T], options: T | None, overrides: dict[str, Any]) -> T:
    """`options` (default: `cls()`) with keyword `overrides` of its fields, checked anew."""
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise FlextronError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"{cls.__name__} has {', '.join(names)}")
    base = cls() if options is None else options
    return dataclasses.replace(base, **overrides) if overrides else base


class Options:
    """A command's options: checked on creation (numbers, choices) by their `opt` metadata."""

    def __post_init__(self) -> None:
        check_options(self)


# Options several commands share are declared once, here, and inherited (dataclass fields of bases
# come first in --help).
@dataclass
class Verified(Options):
    """The weight-hash check of a checkpoint that is read."""

    verify: bool = opt(True, "check the weights against the sha256 recorded in the checkpoint (--no-verify: faster)")


@dataclass
class Computed(Options):
    """The compute dtype of a command that runs the model."""

    dtype: str = opt("fp32", "compute dtype", choices=DTYPE_NAMES)


@dataclass
class Autocast(Options):
    """The autocast dtype of a training stage."""

    dtype: str = opt("auto", "autocast dtype (auto: bf16 on CUDA, fp32 on CPU, where bf16 is slower)",
                     choices=DTYPE_NAMES)


@dataclass
class Adaptive(Options):
    """Input-adaptive routing instead of a budget's static sub-network."""

    adaptive: bool = opt(False, "route per token (MLP) and per request (attention)")


@dataclass
class Deployed(Options):
    """The llama.cpp deployment a memory budget (memory_mb=N, memory=512MB) is priced at, besides its
    weight type (`Weighted`, or the command's --outtype); see flextron.footprint."""

    context: int = opt(4096, "memory budgets: KV cache tokens per sequence (llama.cpp's default -c)", **_POSITIVE)
    batch: int = opt(1, "memory budgets: sequences decoded together, each with its own KV cache", **_POSITIVE)
    kv_type: str = opt("f16", "memory budgets: KV cache type (llama.cpp's -ctk / -ctv)", choices=KV_TYPES)

    def deployment(self, weight_type: str) -> Deployment:
        return Deployment(weight_type, self.context, self.batch, self.kv_type)


@dataclass
class Weighted(Deployed):
    """A memory budget's weight type, for commands that write no GGUF."""

    weight_type: str = opt("f32", "memory budgets: GGUF weight type deployed (as export --outtype writes it)",
                           choices=OUTTYPES)


@dataclass
class ConvertOptions(Options):
    """`flextron convert`: the elastic space and the importance calibration."""

    mlp_fractions: tuple[float, ...] = opt((0.25, 0.5, 0.75, 1.0), "MLP widths as fractions of the full width",
                                           **_FRACTION)
    attn_fractions: tuple[float, ...] = opt((0.25, 0.5, 0.75, 1.0), "attention units as fractions of all units "
                                            "(--attn-unit head: of the KV groups, below one head per group)",
                                            **_FRACTION)
    multiple: int = opt(64, "MLP widths are multiples of this", **_POSITIVE)
    hidden_fractions: tuple[float, ...] | None = opt(None, "also make the hidden size (residual stream, embeddings, "
                                                           "LM head) elastic: these fractions of it (default: off)",
                                                     **_FRACTION)
    hidden_multiple: int = opt(64, "hidden sizes are multiples of this (with --hidden-fractions)", **_POSITIVE)
    space: str | None = opt(None, 'JSON file with per-layer choices {"mlp": [[...], ...], "attn": [[...], ...]} '
                                  "(replaces the fractions); a list may start with 0 (skip); an optional "
                                  '"hidden": [...] lists hidden sizes, the model\'s last')
    attn_unit: str | None = opt(None, "what an attention choice counts: 'group' (whole KV groups; the default) or "
                                      "'head' (query heads, trimmed inside every group first, then whole groups)",
                                choices=ATTN_UNITS)
    family: str | None = opt(None, "treat a model type that is not declared as this family's block layout: "
                                   "llama (pre-norm), gemma (sandwich norms), olmo2 (post-norm), phi3 (fused "
                                   "projections), gpt2; checked against transformers before anything is written",
                             choices=("llama", "gemma", "olmo2", "phi3", "gpt2"))
    depth: bool = opt(False, "also allow skipping each layer's attention or MLP (choice 0), least important first")
    min_layers: int | None = opt(None, "depth floor: layers that keep their attention, and their MLP "
                                       "(default with --depth: 1/3)")
    calib_data: str = opt("self", "calibration text: self (the model's own: unprompted samples and, with a chat "
                                  "template, its answers to the packaged train prompts; generated once and cached), "
                                  "default (the packaged train split), or a .txt file")
    calib_sequences: int = opt(256, "calibration sequences importance is measured on", **_POSITIVE)
    calib_seq_len: int = opt(256, "tokens per calibration sequence", **_POSITIVE)
    batch_size: int = opt(16, "calibration sequences per forward", **_POSITIVE)
    seed: int = opt(0, "seed of the calibration sample (and of --order random)", **SEED_RANGE)
    order: str = opt("importance", "sort units by measured importance, or randomly (the ablation)",
                     choices=("importance", "random"))
    dtype: str = opt("fp32", "compute dtype (bf16 on CUDA also loads and saves the weights in bf16)",
                     choices=DTYPE_NAMES)


@dataclass
class EvalOptions(Weighted, Verified, Computed, Adaptive):
    """`flextron eval`: held-out perplexity and zero-shot tasks at each budget."""

    budgets: tuple[str, ...] = opt(("1.0", "0.75", "0.5"), "budgets: 0.6, 60%, or metric=value such as params=80e6 "
                                   "or memory=512MB")
    tasks: tuple[str, ...] = opt(("ppl",), "ppl, chat (greedy answers and next-token KL against the original: "
                                           "flextron.behaviour) and/or zero-shot task names (flextron.tasks.TASKS), "
                                           "or requests.jsonl(.gz) files")
    limit: int | None = opt(None, "at most this many windows / documents per task", **_POSITIVE)
    seq_len: int = opt(1024, "tokens per perplexity window", **_POSITIVE)
    batch_size: int = opt(4, "sequences per forward", **_POSITIVE)
    ppl_data: str | None = opt(None, "also the perplexity on windows of this UTF-8 text file (another domain), "
                                     "column ppl_data")
    chat_prompts: str | None = opt(None, "chat task: prompts file, one per line (.txt) or {\"prompt\": ...} per "
                                         "line (.jsonl) (default: the packaged held-out questions)")
    chat_limit: int = opt(64, "chat task: at most this many prompts", **_POSITIVE)
    chat_tokens: int = opt(48, "chat task: new tokens of each greedy answer compared", **_POSITIVE)
    original: str | None = opt(None, "chat task: the model to compare with (default: the one the checkpoint was "
                                     "converted from, as its manifest records)")


@dataclass
class ProfileOptions(Verified):
    """`flextron profile`: how the latency lookup table is measured."""

    batch: int = opt(1, "sequences decoded together", **_POSITIVE)
    context: int = opt(256, "prompt tokens (prefill) before decoding", **_POSITIVE)
    decode_steps: int = opt(16, "tokens decoded per measurement", **_POSITIVE)
    repeats: int = opt(3, "timed runs per sub-network (after a warm-up)", **_POSITIVE)
    rounds: int = opt(1, "time every sub-network once per round, interleaved, and keep the median (noisy machines)",
                      **_POSITIVE)
    samples: int = opt(24, "random sub-networks the table is fitted on", **_POSITIVE)
    validate: int = opt(10, "further sub-networks it is checked on", **_POSITIVE)
    runtime: str = opt("hf", "time the elastic model in HF eager, or GGUF exports in llama.cpp",
                       choices=("hf", "llama.cpp"))
    threads: int | None = opt(None, "llama.cpp threads (default: all cores)", **_POSITIVE)
    outtype: str = opt("f32", "llama.cpp weights", choices=OUTTYPES)
    dtype: str = opt("fp32", "compute dtype (HF runtime)", choices=DTYPE_NAMES)
    # The noise check: quiet tables validated at 1.5-10.6% median error (docs/results.md; the
    # highest, a depth space's deci table); a table is of use below ~10-15%. On a quiet VM the full
    # model's time moved up to ~18% within one run.
    check_every: int = opt(10, "time the full model again after every this many timings, and at the start and the "
                           "end: how far those timings spread shows a busy machine", **_POSITIVE)
    max_spread: float = opt(50.0, "refuse the table where the full model's timings spread more than this % (slowest "
                            "over fastest)", **_POSITIVE_FLOAT)
    max_error: float = opt(15.0, "refuse the table where its median error on unseen sub-networks is above this %",
                           **_POSITIVE_FLOAT)
    force: bool = opt(False, "store the table even where it fails the noise check (latency.json records that)")
    refine: bool = opt(False, "llama.cpp: time the sub-networks the routers serve at their grid budgets and refit the "
                       "stored table with them (at its own threads, weight type, context, decode steps, repeats); "
                       "then route again")


@dataclass
class ExportOptions(Deployed, Verified):
    """`flextron export`: the output format."""

    format: str = opt("hf", "an HF directory, or one llama.cpp GGUF file", choices=("hf", "gguf"))
    outtype: str = opt("f32", "GGUF weight type", choices=OUTTYPES)
    graph: str = opt("auto", "GGUF: llama.cpp graph of a uniform sub-network: the family's own, per-layer deci, or "
                     "auto (the one the checkpoint's llama.cpp latency table says decodes faster; own without one)",
                     choices=GRAPHS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format == "hf" and (self.outtype, self.graph) != ("f32", "auto"):
            raise FlextronError("--outtype and --graph are GGUF settings; add --format gguf or drop them")


MAX_STOPS = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 1000  # characters per stop string: bounds what matching them costs per request

@dataclass
class Sampling(Options):
    """How a prompt is continued (by `flextron.engine`): how many tokens, how each is drawn, where to stop."""

    max_new_tokens: int = opt(128, "the most tokens to generate (fewer where the model's context ends first)",
                              **_POSITIVE)
    temperature: float = opt(0.0, "0: greedy; >0: sampling (a tiny one samples the most likely token)", low=0.0)
    top_p: float = opt(1.0, "nucleus sampling threshold", low=0.0, high=1.0, low_open=True)
    seed: int | None = opt(None, "sampling seed", low=0, high=2**64 - 1)
    stop: tuple[str, ...] | None = opt(None, f"end at the first of these strings, left out of the text (at most "
                                             f"{MAX_STOPS}, each at most {MAX_STOP_CHARS} characters)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stop is not None and (len(self.stop) > MAX_STOPS or max(map(len, self.stop)) > MAX_STOP_CHARS):
            raise FlextronError(f"--stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters "
                                "each; shorten them")


@dataclass
class GenerateOptions(Weighted, Verified, Adaptive, Sampling):
    """`flextron generate`: the sampling settings, the budget and the prompt's form."""

    budget: str | None = opt(None, "0.6, 60%, or metric=value; elastic checkpoints only (default: the full model)")
    raw: bool = opt(False, "do not wrap the prompt in the chat template")


@dataclass
class ServeLimits(Options):
    """Limits of the server (tokens, bytes, requests, connections, seconds) and its batching."""

    max_prompt_tokens: int = opt(4096, "longer prompts get 400", **_POSITIVE)
    max_tokens: int = opt(1024, "the most new tokens one request may ask for", **_POSITIVE)
    default_max_tokens: int = opt(128, "new tokens when a request gives no max_tokens", **_POSITIVE)
    max_body_bytes: int = opt(1 << 20, "larger request bodies get 413", **_POSITIVE)
    max_queue: int = opt(64, "requests generating or waiting; more get 503", **_POSITIVE)
    max_batch: int = opt(16, "sequences decoding together, over all budgets (1: one at a time)", **_POSITIVE)
    mix_budgets: bool = opt(False, "decode all budgets in one batch (full width, each row masked to its "
                            "sub-network) instead of one batch per sub-network taking turns")
    max_connections: int = opt(256, "open connections; more get 503", **_POSITIVE)
    max_budgets: int = opt(256, "distinct budgets kept resolved (least recently used dropped)", **_POSITIVE)
    timeout_s: float = opt(120.0, "seconds after which an idle keep-alive connection is closed", low=0.0,
                           low_open=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.default_max_tokens > self.max_tokens:
            raise FlextronError("default-max-tokens cannot exceed max-tokens")


@dataclass
class ServeOptions(Weighted, Verified, Computed, ServeLimits):
    """`flextron serve`: where to listen, what to call the model, and the server's limits."""

    host: str = opt("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = opt(8000, "port to listen on (0: any free port)", low=0, high=65535)
    name: str | None = opt(None, "model id reported to clients (default: the checkpoint directory's name)")


@dataclass
class DemoOptions(Options):
    """`flextron demo`: the pipeline's size and where it writes."""

    preset: str = opt("demo", "tiny (a smoke run of a couple of minutes), demo (about 20 minutes on "
                              "2 CPU cores) or bench (larger); see flextron.demo.PRESETS")
    out: str = opt("flextron-demo", "directory to write (checkpoints, exports, results.json, report)")


@dataclass
class ReportOptions(Options):
    """`flextron report`: the title and where the markdown also goes."""

    title: str | None = opt(None, "the report's title (default: from the run)")
    into: str | None = opt(None, "also replace a marked section of this markdown file")
    section: str = opt("report", "the section name in --into (<!-- NAME:start -->)")


CHAT_SOURCES = ("auto", "self", "none")  # --chat, besides a .jsonl file


@dataclass
class ChatData(Options):
    """Chat-format distillation rows beside the text (`flextron.chat.chat_rows`)."""

    chat: str = opt("auto", "chat-format distillation data beside the text: a .jsonl of {\"messages\": [...]} "
                            "conversations, self (the teacher's own answers to --chat-prompts, generated once and "
                            "cached), none, or auto (self where the tokenizer has a chat template, else none)")
    chat_mix: float = opt(0.5, "share of the training sequences taken from the chat data", low=0.0, high=1.0,
                          low_open=True)
    chat_prompts: str | None = opt(None, "prompts --chat self answers: a text file, one per line, or .jsonl lines "
                                         "with a \"prompt\" (default: the packaged task questions, train split)")
    chat_tokens: int = opt(128, "--chat self: the most tokens of each of the teacher's answers", **_POSITIVE)
    chat_temperature: float = opt(0.0, "--chat self: 0 for the teacher's greedy answers, >0 to sample them", low=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chat not in CHAT_SOURCES and not self.chat.endswith(".jsonl"):
            raise FlextronError(f"--chat takes {', '.join(CHAT_SOURCES)} or a .jsonl file of conversations, "
                                f"not {self.chat!r}")


@dataclass
class TrainOptions(ChatData, Autocast):
    """`flextron train`: elastic continued training (distillation from the frozen original over sampled
    sub-networks)."""

    seq_len: int = opt(512, "tokens per training sequence", **_POSITIVE)
    micro_batch: int = opt(4, "sequences per process per forward", **_POSITIVE)
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", **_POSITIVE)
    max_steps: int | None = opt(None, "optimizer steps to train (give this or --tokens)", **_POSITIVE)
    tokens: int | None = opt(None, "data tokens to train on, instead of --max-steps", **_POSITIVE)
    lr: float = opt(1e-4, "peak learning rate (AdamW)", **_POSITIVE_FLOAT, high=_FP32_MAX)
    min_lr_ratio: float = opt(0.1, "the cosine schedule ends at this fraction of --lr", low=0.0, high=1.0)
    warmup_steps: int = opt(10, "linear warm-up steps", **_NON_NEGATIVE)
    weight_decay: float = opt(0.0, "AdamW weight decay", **_NON_NEGATIVE)
    adam_eps: float = opt(1e-5, "AdamW epsilon: gradients far below it move their weights less than --lr a step "
                                "(the full model starts at the teacher, where its gradients are near 0; 1e-5 kept "
                                "SmolLM2's full budget closer to the original than 1e-8, docs/results.md \"instruct\")",
                          **_POSITIVE_FLOAT)
    clip: float = opt(1.0, "gradient norm clipping threshold", **_POSITIVE_FLOAT)
    kd_temperature: float = opt(1.0, "distillation softmax temperature", **_POSITIVE_FLOAT)
    kd_weight: float = opt(1.0, "weight of the distillation loss (KL to the frozen original)", **_NON_NEGATIVE)
    lm_weight: float = opt(0.0, "weight of the next-token cross-entropy loss", **_NON_NEGATIVE)
    sampling: str = opt("sandwich", "sub-networks per step: sandwich (full, smallest, random), uniform "
                        "(MatFormer baseline), budgets (routed budgets), fixed (the first budget only)",
                        choices=SAMPLING)
    n_random: int = opt(2, "random sub-networks per step besides the full and the smallest", **_NON_NEGATIVE)
    full_weight: float = opt(16.0, "weight of the full sub-network's loss against each other sub-network's: "
                                    "keeps the full budget closer to the original (16 halved its KL to the "
                                    "original on SmolLM2 at no cost at 50 %, docs/results.md \"instruct\")",
                             **_POSITIVE_FLOAT)
    mixed_tokens: int = opt(0, "passes per step at random per-token MLP widths and per-sequence attention widths "
                               "(what adaptive routing runs; at full-width compute)", **_NON_NEGATIVE)
    chat_loss: str = opt("all", "on chat sequences, the loss on every token or on the assistant's only",
                         choices=("all", "assistant"))
    budgets: tuple[float, ...] = opt((1.0, 0.75, 0.5, 0.35),
                                     "budget fractions for --sampling budgets; fixed uses the first", **_FRACTION)
    budget_probs: tuple[float, ...] | None = opt(None, "probability of each of --budgets (default: equal)",
                                                 **_NON_NEGATIVE)
    full_prob: float = opt(0.25, "budgets sampling: chance that a draw is the full model", low=0.0, high=1.0)
    teacher_dtype: str = opt("auto", "teacher weights: fp32, bf16 (half the memory), auto (bf16 on CUDA, else fp32)",
                             choices=DTYPE_NAMES)
    loss_chunk: int = opt(256, "tokens whose full-vocabulary logits the loss holds at a time", **_POSITIVE)
    activation_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory)")
    fsdp: bool = opt(False, "shard weights, gradients and optimizer state over processes (torchrun)")
    save_every: int = opt(100, "optimizer steps between checkpoints", **_POSITIVE)
    sharded_checkpoints: bool = opt(False, "step checkpoints as per-rank DCP shards (no gather); the last also whole")
    eval_budgets: tuple[float, ...] = opt((1.0, 0.75, 0.5, 0.35), "budgets of the before/after perplexity table",
                                          **_FRACTION)
    eval_limit: int | None = opt(16, "held-out windows for the before/after table (0 skips it)", **_NON_NEGATIVE)
    seed: int = opt(0, "seed of the data order and the sampled sub-networks", **SEED_RANGE)
    logger: str = opt("csv", "tracker besides metrics.csv (always written): csv (none), tensorboard, or wandb "
                             "(offline unless WANDB_MODE says otherwise)", choices=LOGGERS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.max_steps is None) == (self.tokens is None):
            raise FlextronError("give exactly one of --max-steps or --tokens")
        if self.budget_probs is not None:
            if len(self.budget_probs) != len(self.budgets):
                raise FlextronError("--budget-probs needs one probability per budget")
            if sum(self.budget_probs) <= 0:
                raise FlextronError("--budget-probs must not all be 0")
        if self.kd_weight <= 0 and self.lm_weight <= 0:
            raise FlextronError("at least one of --kd-weight and --lm-weight must be positive")


@dataclass
class RouteOptions(ChatData, Deployed, Autocast):
    """`flextron route`: static routers (budget -> per-layer choices), surrogate-guided, then joint
    fine-tuning."""

    budgets: tuple[float, ...] = opt((0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), "the trained grid of budget fractions",
                                     **_FRACTION)
    metric: str = opt("auto", "cost the budgets refer to: auto (measured decode latency if profiled, else params), "
                      "params, flops, kv_bytes, decode_bytes, memory_mb (at --outtype), latency_ms or prefill_ms")
    outtype: str | None = opt(None, "GGUF weight type the routed sub-networks are for: latency budgets need a "
                              "llama.cpp table timed at it (default and recorded: the table's)", choices=OUTTYPES)
    steps: int = opt(200, "router steps (LLM frozen)", **_POSITIVE)
    joint_steps: int = opt(0, "steps fine-tuning the LLM and the routers together (the paper's stage 3; off by "
                              "default: on SmolLM2-Instruct 40 of them moved the full budget from the original and "
                              "gained nothing at 50 %, docs/results.md \"instruct_joint\")", **_NON_NEGATIVE)
    hidden: int = opt(128, "router MLP hidden size", **_POSITIVE)
    warm_start: float = opt(2.0, "each grid budget starts where the loss is lowest (a uniform sub-network "
                            "within it or the untrained router's choice); logit margin per choice away "
                            "from that start (0: no start)", **_NON_NEGATIVE)
    router_lr: float = opt(3e-3, "router learning rate", **_POSITIVE_FLOAT)
    llm_lr: float = opt(1e-5, "LLM learning rate in the joint steps", **_NON_NEGATIVE)
    full_weight: float = opt(4.0, "static routers' joint steps: weight of a full-model distillation pass added to "
                                  "each step's loss (4 halved the full budget's KL to the original after 40 joint "
                                  "steps; 0: none)", **_NON_NEGATIVE)
    tau_start: float = opt(5.0, "Gumbel-softmax temperature at the start, annealed exponentially", **_POSITIVE_FLOAT)
    tau_end: float = opt(0.3, "Gumbel-softmax temperature at the end", **_POSITIVE_FLOAT)
    budget_weight: float = opt(10.0, "weight of the budget penalty", **_NON_NEGATIVE)
    tolerance: float = opt(0.01, "|expected cost / target - 1| below this costs nothing", **_NON_NEGATIVE)
    surrogate: bool = opt(False, "guide routers by a loss surrogate while it is accurate (off: straight-through "
                                 "Gumbel through the LLM at every step; on SmolLM2 at 100-200 router steps the "
                                 "surrogate never became accurate enough to guide: docs/results.md)")
    surrogate_threshold: float = opt(0.25, "surrogate error / the loss's spread under which routers follow it",
                                     **_NON_NEGATIVE)
    surrogate_warmup: int = opt(64, "random architectures the surrogate is fitted on before router steps",
                                **_NON_NEGATIVE)
    surrogate_hidden: int = opt(128, "surrogate MLP hidden size", **_POSITIVE)
    surrogate_fit_steps: int = opt(5, "surrogate fitting steps per router step (more overfits noisy targets)",
                                   **_NON_NEGATIVE)
    balance_weight: float = opt(0.01, "adaptive routers: keeps token routers from collapsing onto one width",
                                **_NON_NEGATIVE)
    check_sequences: int = opt(16, "held-out training sequences each budget's choice is checked on against "
                               "the uniform sub-network (with --adaptive: adaptive routing against the "
                               "static sub-network) (0: off)", **_NON_NEGATIVE)
    check_budgets: tuple[float, ...] | None = opt(
        None, "budgets checked (and reported) besides the grid, which the routers never train on (default: "
              "halfway between the grid's two lowest and between its two highest); a budget asked between checked "
              "ones is served the checked one below it, so check the budgets you serve", **_FRACTION)
    check_step: float = opt(0.03, "also check a budget every this share of cost below each checked one (not "
                                  "reported), so a budget asked is served the check of one at least 1 - this of "
                                  "itself (0: off)",
                            low=0.0, high=0.5)
    seq_len: int = opt(256, "tokens per training sequence", **_POSITIVE)
    micro_batch: int = opt(4, "sequences per step", **_POSITIVE)
    eval_limit: int = opt(16, "held-out windows for the perplexity report", **_POSITIVE)
    eval_seq_len: int = opt(1024, "tokens per held-out window of the perplexity report (the model's context "
                                  "where that is shorter)", **_POSITIVE)
    seed: int = opt(0, "seed of the data order, the routers' initialisation and their random draws", **SEED_RANGE)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A `--config` file: a YAML mapping of option names (dashes or underscores) to values."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > _MAX_CONFIG_BYTES:
            raise FlextronError(f"the config {path} must be a regular file of at most "
                                f"{_MAX_CONFIG_BYTES // 1024} KiB of YAML")
        text = path.read_text(encoding="utf-8")
        if any(isinstance(t, yaml.AliasToken) for t in yaml.scan(text)):
            raise FlextronError(f"the config {path} uses a YAML alias (*name); write each value out")
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise FlextronError(f"cannot read the config {path}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise FlextronError(f"the config {path} must be a YAML mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def write_yaml(path: Path, values: dict[str, Any]) -> Path:
    """Record resolved options as YAML (tuples as lists), atomically; `--config` reads it back."""
    plain = json.loads(json.dumps(values))
    atomic_write(path, lambda p: p.write_text(yaml.safe_dump(plain, sort_keys=False), encoding="utf-8"))
    return path
