"""Configuration dataclasses: the elastic search space, a sub-network, a budget, training and routers.

Options are fields made with `opt` (default, help text, choices, number rules): the CLI builds its
flags from them (`flextron.cli.add_dataclass_args`) and the API takes them as keyword arguments.
"""

from __future__ import annotations

import functools
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from flextron.errors import FlextronError

KINDS = ("mlp", "attn")
DTYPE_NAMES = ("auto", "fp32", "bf16")  # flextron.precision.compute_dtype: auto is bf16 on CUDA, else fp32
OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # GGUF weight types
GRAPHS = ("auto", "own", "deci")  # llama.cpp graphs a uniform sub-network can be written in
ATTN_UNITS = ("group", "head")  # what an attention choice counts (see ElasticSpace)
SAMPLE_MODES = ("layers", "uniform", "spread")  # how ElasticSpace.sample draws a sub-network


def opt(default: Any, help: str, *, choices: tuple | None = None, **rules: Any) -> Any:
    """A dataclass field that is a command option: its default, its --help text, its allowed values
    and its `check_number` rules (low, high, low_open), applied by `check_options` and the CLI."""
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


def check_options(obj: object) -> None:
    """Check each `opt` field of a dataclass: numbers by their rules, choices, sequences made tuples."""
    for f in fields(obj):
        kind, _, optional = field_type(type(obj), f.name)
        value, meta = getattr(obj, f.name), f.metadata
        if kind is tuple and isinstance(value, list):
            setattr(obj, f.name, value := tuple(value))
        if kind in (int, float):
            check_number(f.name, value, integer=kind is int, optional=optional, **meta.get("rules", {}))
        choices = meta.get("choices")
        if choices and value not in choices and not (optional and value is None):
            raise FlextronError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, not {value!r}")


def check_number(name: str, value: object, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, low_open: bool = False, optional: bool = False) -> None:
    """Raise a one-line FlextronError unless `value` is a finite number (an int when `integer`) in
    [low, high] ((low, high] when `low_open`); None passes when `optional`."""
    flag = "--" + name.replace("_", "-")
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


def check_fields(obj: object, rules: dict[str, dict]) -> None:
    """`check_number` on each named attribute of a config with its keyword rules."""
    for name, rule in rules.items():
        check_number(name, getattr(obj, name), **rule)


def check_fractions(name: str, values: tuple[float, ...]) -> None:
    if not values:
        raise FlextronError(f"--{name.replace('_', '-')} needs at least one value")
    for v in values:
        check_number(name, v, low=0.0, high=1.0, low_open=True)


SEED_RANGE = {"low": 0, "high": 2**32 - 1}
_SEED = {"integer": True, **SEED_RANGE}
_POSITIVE = {"integer": True, "low": 1}
_POSITIVE_FLOAT = {"low": 0.0, "low_open": True}
_FP32_MAX = 3.4e38  # a larger learning rate cannot even be applied to fp32 weights


@dataclass
class ElasticSpace:
    """Per-layer nested choices: MLP widths (neurons) and attention units.

    Every list is ascending and ends with the layer's full size, so a smaller choice is a
    prefix of a larger one once the weights are sorted by importance. A list may start with 0:
    the sub-layer may be skipped (depth). `min_layers` is the floor of layers that keep each
    kind of sub-layer; `skip_order` lists, per kind, the layers from the first to skip (least
    important) to the last (the default: the deepest first).

    `attn_unit` says what an attention choice counts. "group": KV groups, each with all its query
    heads (whole-group removal). "head": query heads, nested as G*q (all G groups kept, q heads in
    each) down to G, then c < G (c groups of one head): trims heads inside the groups first.
    """

    mlp: list[list[int]]
    attn: list[list[int]]
    min_layers: int = 1
    skip_order: dict[str, list[int]] | None = None
    attn_unit: str = "group"

    def __post_init__(self) -> None:
        if len(self.mlp) != len(self.attn):
            raise FlextronError(
                f"elastic space has {len(self.mlp)} MLP layers but {len(self.attn)} attention layers"
            )
        for kind, lists in (("MLP", self.mlp), ("attention", self.attn)):
            for i, choices in enumerate(lists):
                if not choices or sorted(set(choices)) != list(choices) or choices[0] < 0:
                    raise FlextronError(
                        f"layer {i} {kind} choices {choices} must be distinct positive integers in "
                        "ascending order (0 first to allow skipping the sub-layer)"
                    )
        n = self.n_layers
        if not 1 <= self.min_layers <= n:
            raise FlextronError(f"--min-layers {self.min_layers} must be between 1 and the model's {n} layers "
                                "(at least one layer keeps its attention and its MLP)")
        for kind, order in (self.skip_order or {}).items():
            if kind not in KINDS or sorted(order) != list(range(n)):
                raise FlextronError(f"skip_order[{kind!r}] must list each of the {n} layers once")
        if self.attn_unit not in ATTN_UNITS:
            raise FlextronError(f"attn_unit must be one of {', '.join(ATTN_UNITS)}, not {self.attn_unit!r}")

    @property
    def n_layers(self) -> int:
        return len(self.mlp)

    @property
    def depth(self) -> bool:
        """Whether some sub-layer may be skipped (choice 0)."""
        return any(c[0] == 0 for c in (*self.mlp, *self.attn))

    def order(self, kind: str) -> list[int]:
        """Layers in the order their `kind` sub-layer is skipped (least important first)."""
        return list((self.skip_order or {}).get(kind) or range(self.n_layers - 1, -1, -1))

    def widths(self, kind: str, layer: int) -> list[int]:
        """The layer's choices that run the sub-layer (all but 0; [0] where the sub-layer is absent)."""
        return [c for c in getattr(self, kind)[layer] if c > 0] or [0]

    @classmethod
    def default(
        cls,
        n_layers: int,
        intermediate: int,
        attn_units: int,
        mlp_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
        attn_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
        multiple: int = 64,
        attn_unit: str = "group",
        kv_groups: int = 1,
    ) -> ElasticSpace:
        """Uniform space: MLP fractions rounded to `multiple` neurons, attention fractions of units.
        With `attn_unit="head"` (`attn_units` query heads in `kv_groups` groups): every head count
        per group, G*q, and below G the fractions of the groups, one head each."""
        for f in (*mlp_fractions, *attn_fractions):
            if not 0.0 < f <= 1.0:
                raise FlextronError(f"elastic fraction {f} is outside (0, 1]; use values like 0.5")
        if multiple < 1:
            raise FlextronError(f"--multiple must be a positive integer, got {multiple}")
        mlp = {min(intermediate, max(multiple, round(f * intermediate / multiple) * multiple))
               for f in mlp_fractions}
        mlp.add(intermediate)
        if attn_unit == "head":
            attn = {max(1, math.ceil(f * kv_groups - 1e-9)) for f in attn_fractions}
            attn |= set(range(kv_groups, attn_units + 1, kv_groups))
        else:
            attn = {max(1, math.ceil(f * attn_units - 1e-9)) for f in attn_fractions}
        attn.add(attn_units)
        return cls(mlp=[sorted(mlp)] * n_layers, attn=[sorted(attn)] * n_layers, attn_unit=attn_unit)

    def with_depth(self, min_layers: int | None = None, skip_order: dict[str, list[int]] | None = None
                   ) -> ElasticSpace:
        """This space with choice 0 (skip) added to every list; floor default: a third of the layers."""
        n = self.n_layers
        return ElasticSpace(mlp=[sorted({0, *self.widths("mlp", i)}) for i in range(n)],
                            attn=[sorted({0, *self.widths("attn", i)}) for i in range(n)],
                            min_layers=max(1, math.ceil(n / 3)) if min_layers is None else min_layers,
                            skip_order=skip_order, attn_unit=self.attn_unit)

    def full(self) -> Subnet:
        return Subnet(mlp=[c[-1] for c in self.mlp], attn=[c[-1] for c in self.attn])

    def smallest(self) -> Subnet:
        """The smallest width of every layer, with as many sub-layers skipped as the floor allows."""
        return self.uniform(0, 0, self.n_layers, self.n_layers)

    def centroid(self) -> Subnet:
        """The middle width of every layer (upper middle for an even number of choices)."""
        mid = {k: [w[len(w) // 2] for w in (self.widths(k, i) for i in range(self.n_layers))] for k in KINDS}
        return Subnet(**mid)

    def uniform(self, mlp_index: int, attn_index: int, skip_mlp: int = 0, skip_attn: int = 0) -> Subnet:
        """Every layer at the same width index (clamped to each layer's widths), then the first
        `skip_mlp` / `skip_attn` skippable layers of the skip order skipped (within the floor)."""
        out = {}
        for kind, index, skip in (("mlp", mlp_index, skip_mlp), ("attn", attn_index, skip_attn)):
            ws = [self.widths(kind, i) for i in range(self.n_layers)]
            out[kind] = self._skip_first(kind, [w[min(index, len(w) - 1)] for w in ws], skip)
        return Subnet(**out)

    def _skip_first(self, kind: str, chosen: list[int], skip: int) -> list[int]:
        """`chosen` with the first `skip` skippable layers of the skip order skipped (within the floor)."""
        skippable = [i for i in self.order(kind) if getattr(self, kind)[i][0] == 0]
        out = list(chosen)
        for i in skippable[: min(skip, self.n_layers - self.min_layers)]:
            out[i] = 0
        return out

    def sample(self, gen: torch.Generator, mode: str = "layers", ordered_skips: bool = False) -> Subnet:
        """A random sub-network (skips restored up to the floor). `mode` "layers": each layer's
        choice drawn independently; "uniform": one width index per kind for all layers plus, in a
        depth space, skip counts; "spread": each kind's layers drawn from one random distribution
        over the width indices (Dirichlet(1)), so sub-networks range from mostly narrow to mostly
        wide (independent draws concentrate near the middle). `ordered_skips` (a depth space,
        "layers" and "spread"): the widths are drawn among the running choices, then a skip count
        per kind, skipped in the skip order as "uniform" does: the nested depth family, not skips
        at random layers. Draws from `gen` in that order, so a seed gives the same sub-networks."""
        def draw(k: int) -> int:
            return torch.randint(k, (1,), generator=gen).item()

        def skip_count() -> int:  # 0 up to the floor
            return draw(self.n_layers - self.min_layers + 1)

        if mode not in SAMPLE_MODES:
            raise FlextronError(f"unknown sampling mode {mode!r}; use one of {', '.join(SAMPLE_MODES)}")
        skip_counts = self.depth and (mode == "uniform" or ordered_skips)
        if mode == "uniform":
            i, j = (draw(max(len(self.widths(k, layer)) for layer in range(self.n_layers))) for k in KINDS)
            skips = (skip_count() for _ in range(2)) if skip_counts else (0, 0)
            return self.uniform(i, j, *skips)
        picks = {}
        for kind in KINDS:
            lists = [self.widths(kind, i) for i in range(self.n_layers)] if skip_counts else getattr(self, kind)
            if mode == "layers":
                picks[kind] = [c[draw(len(c))] for c in lists]
                continue
            weights = -torch.rand(max(map(len, lists)), generator=gen, dtype=torch.float64).log()
            picks[kind] = [c[int(torch.multinomial(weights[: len(c)], 1, generator=gen))] for c in lists]
        if skip_counts:
            picks = {k: self._skip_first(k, picks[k], skip_count()) for k in KINDS}
        return self.floor(Subnet(**picks))

    def floor(self, subnet: Subnet) -> Subnet:
        """`subnet` with skipped sub-layers restored (most important first, at their smallest width)
        until each kind keeps `min_layers` layers."""
        out = {}
        for kind in KINDS:
            chosen = list(getattr(subnet, kind))
            for i in reversed(self.order(kind)):
                if sum(c > 0 for c in chosen) >= self.min_layers:
                    break
                chosen[i] = chosen[i] or self.widths(kind, i)[0]
            out[kind] = chosen
        return Subnet(**out)

    def validate(self, subnet: Subnet) -> None:
        """Raise a FlextronError naming the first choice that is not in this space."""
        if len(subnet.mlp) != self.n_layers or len(subnet.attn) != self.n_layers:
            raise FlextronError(
                f"sub-network has {len(subnet.mlp)}/{len(subnet.attn)} MLP/attention entries but "
                f"the model has {self.n_layers} layers"
            )
        for kind, chosen, space in (("MLP width", subnet.mlp, self.mlp),
                                    ("attention units", subnet.attn, self.attn)):
            for i, (c, options) in enumerate(zip(chosen, space)):
                if c not in options:
                    raise FlextronError(
                        f"layer {i} {kind} {c} is not in the elastic space {options}; "
                        "pick one of those values"
                    )
            kept = sum(c > 0 for c in chosen)
            if kept < self.min_layers:
                raise FlextronError(
                    f"the sub-network keeps the {kind.split()[0]} of {kept} layers, below the elastic space's "
                    f"floor of {self.min_layers}; skip fewer layers"
                )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ElasticSpace:
        """From `{"mlp": [[...] per layer], "attn": [[...] per layer]}` of JSON integers (no floats or bools)."""
        if not isinstance(d, dict) or not all(isinstance(d.get(k), list) for k in ("mlp", "attn")):
            raise FlextronError('an elastic space is {"mlp": [[widths per layer]], "attn": [[units per layer]]}')
        for kind in ("mlp", "attn"):
            for layer in d[kind]:
                if not isinstance(layer, list) or not all(type(c) is int for c in layer):
                    raise FlextronError(f"elastic space {kind} entry {layer!r} must be a list of integers")
        order = d.get("skip_order")
        if order is not None and not (isinstance(order, dict) and all(
                isinstance(v, list) and all(type(i) is int for i in v) for v in order.values())):
            raise FlextronError('elastic space skip_order must be {"mlp": [layer indices], "attn": [layer indices]}')
        min_layers = d.get("min_layers", 1)
        if type(min_layers) is not int:
            raise FlextronError(f"elastic space min_layers must be an integer, got {min_layers!r}")
        return cls(mlp=[list(c) for c in d["mlp"]], attn=[list(c) for c in d["attn"]], min_layers=min_layers,
                   skip_order={k: list(v) for k, v in order.items()} if order else None,
                   attn_unit=d.get("attn_unit", "group"))


@dataclass
class Subnet:
    """One sub-network: per layer, the MLP width in neurons and the number of attention units."""

    mlp: list[int]
    attn: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


METRICS = ("params", "flops", "kv_bytes", "decode_bytes", "latency_ms", "prefill_ms")


@dataclass(frozen=True)
class Budget:
    """A target cost: a fraction of the full model's cost, or an absolute value of a metric.

    Metric "auto" (a bare fraction) means measured decode latency where the checkpoint has a
    latency table, else non-embedding parameters.
    """

    metric: str = "auto"
    fraction: float | None = None
    value: float | None = None

    @classmethod
    def parse(cls, text: str | float) -> Budget:
        """Accept `0.6` or `60%` (fractions), `params=80e6` or `latency_ms=25` (absolute), `flops=50%`."""
        s = str(text).strip().lower().replace(" ", "")
        metric = "auto"
        if "=" in s:
            metric, s = s.split("=", 1)
            if metric not in METRICS:
                raise FlextronError(
                    f"unknown budget metric {metric!r}; use one of {', '.join(METRICS)}"
                )
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(%?)", s)
        if not m:
            raise FlextronError(
                f"cannot read budget {text!r}; write 0.6, 60% or metric=value such as params=80e6"
            )
        number = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
        if number <= 0:
            raise FlextronError(f"budget {text!r} must be positive")
        if m.group(2) or metric == "auto":
            if number > 1.0:
                raise FlextronError(f"budget {text!r} is above the full model; use a fraction up to 1.0 (100%)")
            return cls(metric=metric, fraction=number)
        return cls(metric=metric, value=number)

    def __str__(self) -> str:
        prefix = "" if self.metric == "auto" else f"{self.metric}="
        if self.fraction is not None:
            return f"{prefix}{self.fraction:.0%}"
        return f"{prefix}{self.value:g}"


SAMPLING = ("sandwich", "uniform", "budgets", "fixed")
LOGGERS = ("csv", "tensorboard", "wandb")  # metrics.csv is always written; the others add a tracker


@dataclass
class TrainConfig:
    """Elastic continued training (distillation from the frozen original over sampled sub-networks)."""

    seq_len: int = opt(512, "tokens per training sequence")
    micro_batch: int = opt(4, "sequences per process per forward")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    max_steps: int | None = opt(None, "optimizer steps to train (give this or --tokens)")
    tokens: int | None = opt(None, "data tokens to train on, instead of --max-steps")
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "the cosine schedule ends at this fraction of --lr")
    warmup_steps: int = opt(10, "linear warm-up steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    clip: float = opt(1.0, "gradient norm clipping threshold")
    kd_temperature: float = opt(1.0, "distillation softmax temperature")
    kd_weight: float = opt(1.0, "weight of the distillation loss (KL to the frozen original)")
    lm_weight: float = opt(0.0, "weight of the next-token cross-entropy loss")
    sampling: str = opt("sandwich", "sub-networks per step: sandwich (full, smallest, random), uniform "
                        "(MatFormer baseline), budgets (routed budgets), fixed (the first budget only)",
                        choices=SAMPLING)
    n_random: int = opt(2, "random sub-networks per step besides the full and the smallest")
    mixed_tokens: int = opt(0, "passes per step at random per-token MLP widths and per-sequence attention widths "
                               "(what adaptive routing runs; at full-width compute)")
    budgets: tuple[float, ...] = opt((1.0, 0.75, 0.5, 0.35),
                                     "budget fractions for --sampling budgets; fixed uses the first")
    budget_probs: tuple[float, ...] | None = opt(None, "probability of each of --budgets (default: equal)")
    full_prob: float = opt(0.25, "budgets sampling: chance that a draw is the full model")
    dtype: str = opt("auto", "autocast dtype (auto: bf16 on CUDA, fp32 on CPU, where bf16 is slower)",
                     choices=DTYPE_NAMES)
    teacher_dtype: str = opt("auto", "teacher weights: fp32, bf16 (half the memory), auto (bf16 on CUDA, else fp32)",
                             choices=DTYPE_NAMES)
    loss_chunk: int = opt(256, "tokens whose full-vocabulary logits the loss holds at a time")
    activation_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory)")
    fsdp: bool = opt(False, "shard weights, gradients and optimizer state over processes (torchrun)")
    save_every: int = opt(100, "optimizer steps between checkpoints")
    sharded_checkpoints: bool = opt(False, "step checkpoints as per-rank DCP shards (no gather); the last also whole")
    eval_budgets: tuple[float, ...] = opt((1.0, 0.75, 0.5, 0.35), "budgets of the before/after perplexity table")
    eval_limit: int | None = opt(16, "held-out windows for the before/after table (0 skips it)")
    seed: int = opt(0, "seed of the data order and the sampled sub-networks")
    logger: str = opt("csv", "tracker besides metrics.csv (always written): csv (none), tensorboard, or wandb "
                             "(offline unless WANDB_MODE says otherwise)", choices=LOGGERS)

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLING:
            raise FlextronError(f"unknown sampling {self.sampling!r}; use one of {', '.join(SAMPLING)}")
        if self.logger not in LOGGERS:
            raise FlextronError(f"unknown logger {self.logger!r}; use one of {', '.join(LOGGERS)}")
        if (self.max_steps is None) == (self.tokens is None):
            raise FlextronError("give exactly one of --max-steps or --tokens")
        check_fields(self, {
            "lr": {**_POSITIVE_FLOAT, "high": _FP32_MAX},
            "seq_len": _POSITIVE, "micro_batch": _POSITIVE, "grad_accum": _POSITIVE, "save_every": _POSITIVE,
            "loss_chunk": _POSITIVE,
            "max_steps": {**_POSITIVE, "optional": True}, "tokens": {**_POSITIVE, "optional": True},
            "min_lr_ratio": {"low": 0.0, "high": 1.0},
            "warmup_steps": {"integer": True, "low": 0}, "weight_decay": {"low": 0.0},
            "clip": _POSITIVE_FLOAT, "kd_temperature": _POSITIVE_FLOAT, "kd_weight": {"low": 0.0},
            "lm_weight": {"low": 0.0}, "n_random": {"integer": True, "low": 0},
            "mixed_tokens": {"integer": True, "low": 0},
            "full_prob": {"low": 0.0, "high": 1.0}, "eval_limit": {"integer": True, "low": 0, "optional": True},
            "seed": _SEED,
        })
        check_fractions("budgets", self.budgets)
        check_fractions("eval_budgets", self.eval_budgets)
        if self.budget_probs is not None:
            if len(self.budget_probs) != len(self.budgets):
                raise FlextronError("--budget-probs needs one probability per budget")
            for p in self.budget_probs:
                check_number("budget_probs", p, low=0.0)
            if sum(self.budget_probs) <= 0:
                raise FlextronError("--budget-probs must not all be 0")
        if self.kd_weight <= 0 and self.lm_weight <= 0:
            raise FlextronError("at least one of --kd-weight and --lm-weight must be positive")
        if self.dtype not in DTYPE_NAMES or self.teacher_dtype not in DTYPE_NAMES:
            raise FlextronError(f"--dtype and --teacher-dtype must each be one of {', '.join(DTYPE_NAMES)}")


@dataclass
class RouterConfig:
    """Static routers (budget -> per-layer choices), surrogate-guided, then joint fine-tuning."""

    budgets: tuple[float, ...] = opt((0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), "the trained grid of budget fractions")
    metric: str = opt("auto", "cost the budgets refer to: auto (measured decode latency if profiled, else params), "
                      "params, flops, kv_bytes, decode_bytes, latency_ms or prefill_ms")
    steps: int = opt(200, "router steps (LLM frozen)")
    joint_steps: int = opt(40, "steps fine-tuning the LLM and the routers together")
    hidden: int = opt(128, "router MLP hidden size")
    warm_start: float = opt(2.0, "each grid budget starts where the loss is lowest (a uniform sub-network "
                            "within it or the untrained router's choice); logit margin per choice away "
                            "from that start (0: no start)")
    router_lr: float = opt(3e-3, "router learning rate")
    llm_lr: float = opt(1e-5, "LLM learning rate in the joint steps")
    tau_start: float = opt(5.0, "Gumbel-softmax temperature at the start, annealed exponentially")
    tau_end: float = opt(0.3, "Gumbel-softmax temperature at the end")
    budget_weight: float = opt(10.0, "weight of the budget penalty")
    tolerance: float = opt(0.01, "|expected cost / target - 1| below this costs nothing")
    surrogate: bool = opt(True, "guide routers by a loss surrogate (off: straight-through Gumbel through the LLM)")
    surrogate_threshold: float = opt(0.25, "surrogate error / the loss's spread under which routers follow it")
    surrogate_warmup: int = opt(64, "random architectures the surrogate is fitted on before router steps")
    surrogate_hidden: int = opt(128, "surrogate MLP hidden size")
    surrogate_fit_steps: int = opt(5, "surrogate fitting steps per router step (more overfits noisy targets)")
    balance_weight: float = opt(0.01, "adaptive routers: keeps token routers from collapsing onto one width")
    check_sequences: int = opt(16, "held-out training sequences each budget's choice is checked on against "
                               "the uniform sub-network (with --adaptive: adaptive routing against the "
                               "static sub-network) (0: off)")
    seq_len: int = opt(256, "tokens per training sequence")
    micro_batch: int = opt(4, "sequences per step")
    dtype: str = opt("auto", "autocast dtype (auto: bf16 on CUDA, fp32 on CPU, where bf16 is slower)",
                     choices=DTYPE_NAMES)
    eval_limit: int = opt(16, "held-out windows for the perplexity report")
    seed: int = opt(0, "seed of the data order, the routers' initialisation and their random draws")

    def __post_init__(self) -> None:
        check_fractions("budgets", self.budgets)
        check_fields(self, {
            "steps": _POSITIVE, "joint_steps": {"integer": True, "low": 0}, "hidden": _POSITIVE,
            "router_lr": _POSITIVE_FLOAT, "llm_lr": {"low": 0.0}, "warm_start": {"low": 0.0},
            "tau_start": _POSITIVE_FLOAT, "tau_end": _POSITIVE_FLOAT, "budget_weight": {"low": 0.0},
            "tolerance": {"low": 0.0},
            "surrogate_threshold": {"low": 0.0}, "surrogate_hidden": _POSITIVE,
            "surrogate_fit_steps": {"integer": True, "low": 0}, "balance_weight": {"low": 0.0},
            "seq_len": _POSITIVE, "micro_batch": _POSITIVE, "eval_limit": _POSITIVE,
            "seed": _SEED,
        })
        if self.dtype not in DTYPE_NAMES:
            raise FlextronError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}")
