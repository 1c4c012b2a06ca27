"""Configuration dataclasses: the elastic search space, a sub-network, a budget."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from flextron.errors import FlextronError


@dataclass
class ElasticSpace:
    """Per-layer nested choices: MLP widths (neurons) and attention units (KV groups or heads).

    Every list is ascending and ends with the layer's full size, so a smaller choice is a
    prefix of a larger one once the weights are sorted by importance.
    """

    mlp: list[list[int]]
    attn: list[list[int]]

    def __post_init__(self) -> None:
        if len(self.mlp) != len(self.attn):
            raise FlextronError(
                f"elastic space has {len(self.mlp)} MLP layers but {len(self.attn)} attention layers"
            )
        for kind, lists in (("MLP", self.mlp), ("attention", self.attn)):
            for i, choices in enumerate(lists):
                if not choices or sorted(set(choices)) != list(choices) or choices[0] < 1:
                    raise FlextronError(
                        f"layer {i} {kind} choices {choices} must be distinct positive integers in "
                        "ascending order"
                    )

    @property
    def n_layers(self) -> int:
        return len(self.mlp)

    @classmethod
    def default(
        cls,
        n_layers: int,
        intermediate: int,
        attn_units: int,
        mlp_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
        attn_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
        multiple: int = 64,
    ) -> ElasticSpace:
        """Uniform space: MLP fractions rounded to `multiple` neurons, attention fractions of units."""
        for f in (*mlp_fractions, *attn_fractions):
            if not 0.0 < f <= 1.0:
                raise FlextronError(f"elastic fraction {f} is outside (0, 1]; use values like 0.5")
        if multiple < 1:
            raise FlextronError(f"--multiple must be a positive integer, got {multiple}")
        mlp = {min(intermediate, max(multiple, round(f * intermediate / multiple) * multiple))
               for f in mlp_fractions}
        mlp.add(intermediate)
        attn = {max(1, math.ceil(f * attn_units - 1e-9)) for f in attn_fractions}
        attn.add(attn_units)
        return cls(mlp=[sorted(mlp)] * n_layers, attn=[sorted(attn)] * n_layers)

    def full(self) -> Subnet:
        return Subnet(mlp=[c[-1] for c in self.mlp], attn=[c[-1] for c in self.attn])

    def smallest(self) -> Subnet:
        return Subnet(mlp=[c[0] for c in self.mlp], attn=[c[0] for c in self.attn])

    def centroid(self) -> Subnet:
        """The middle choice of every layer (upper middle for an even number of choices)."""
        return Subnet(mlp=[c[len(c) // 2] for c in self.mlp], attn=[c[len(c) // 2] for c in self.attn])

    def uniform(self, mlp_index: int, attn_index: int) -> Subnet:
        """Every layer at the same choice index (clamped to each layer's list)."""
        return Subnet(
            mlp=[c[min(mlp_index, len(c) - 1)] for c in self.mlp],
            attn=[c[min(attn_index, len(c) - 1)] for c in self.attn],
        )

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ElasticSpace:
        return cls(mlp=[list(map(int, c)) for c in d["mlp"]], attn=[list(map(int, c)) for c in d["attn"]])


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


@dataclass
class CalibrationConfig:
    """Where importance is measured: sequences sampled from the training split."""

    n_sequences: int = 256
    seq_len: int = 256
    batch_size: int = 16
    seed: int = 0
    source: str = "default"


SAMPLING = ("sandwich", "uniform", "budgets", "fixed")


@dataclass
class TrainConfig:
    """Elastic continued training (distillation from the frozen original over sampled sub-networks)."""

    seq_len: int = 512
    micro_batch: int = 4  # sequences per process per forward
    grad_accum: int = 1
    max_steps: int | None = None
    tokens: int | None = None  # alternative to max_steps: data tokens to train on
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    kd_temperature: float = 1.0
    kd_weight: float = 1.0
    lm_weight: float = 0.0
    sampling: str = "sandwich"  # sandwich | uniform (MatFormer baseline) | budgets | fixed
    n_random: int = 2  # random sub-networks per step besides the full and the smallest
    budgets: tuple[float, ...] = (1.0, 0.75, 0.5, 0.35)  # for sampling="budgets", and "fixed" uses the first
    budget_probs: tuple[float, ...] | None = None
    full_prob: float = 0.25  # budgets sampling: chance that a draw is the full model
    dtype: str = "bf16"  # autocast dtype: bf16 or fp32
    teacher_dtype: str = "auto"  # teacher weights: fp32, bf16 (half the memory), auto = bf16 on CUDA, else fp32
    loss_chunk: int = 256  # tokens whose full-vocabulary logits the loss holds at a time
    activation_checkpointing: bool = False
    fsdp: bool = False
    save_every: int = 100
    sharded_checkpoints: bool = False  # step checkpoints as per-rank DCP shards (no gather); the last also whole
    eval_budgets: tuple[float, ...] = (1.0, 0.75, 0.5, 0.35)
    eval_limit: int | None = 16  # held-out windows for the before/after table; 0 skips it, None: all
    seed: int = 0
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLING:
            raise FlextronError(f"unknown sampling {self.sampling!r}; use one of {', '.join(SAMPLING)}")
        if (self.max_steps is None) == (self.tokens is None):
            raise FlextronError("give exactly one of --max-steps or --tokens")
        for name in ("seq_len", "micro_batch", "grad_accum", "save_every", "loss_chunk"):
            if getattr(self, name) < 1:
                raise FlextronError(f"{name.replace('_', '-')} must be at least 1")
        if self.budget_probs is not None and len(self.budget_probs) != len(self.budgets):
            raise FlextronError("--budget-probs needs one probability per budget")
        if self.kd_weight <= 0 and self.lm_weight <= 0:
            raise FlextronError("at least one of --kd-weight and --lm-weight must be positive")
        if self.dtype not in ("fp32", "bf16"):
            raise FlextronError("dtype must be fp32 or bf16")
        if self.teacher_dtype not in ("fp32", "bf16", "auto"):
            raise FlextronError("teacher-dtype must be fp32, bf16 or auto")


@dataclass
class RouterConfig:
    """Static routers (budget -> per-layer choices), surrogate-guided, then joint fine-tuning."""

    budgets: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the trained grid (fractions)
    metric: str = "auto"  # cost the budgets refer to: auto = measured decode latency if profiled, else params
    steps: int = 200  # router steps (LLM frozen)
    joint_steps: int = 40  # LLM + routers fine-tuned together
    hidden: int = 128
    router_lr: float = 3e-3
    llm_lr: float = 1e-5
    tau_start: float = 5.0  # Gumbel-softmax temperature, annealed exponentially
    tau_end: float = 0.3
    budget_weight: float = 10.0
    tolerance: float = 0.01  # |expected cost / target - 1| below this costs nothing
    surrogate: bool = True  # False: straight-through Gumbel through the LLM (the ablation baseline)
    surrogate_threshold: float = 0.1  # relative error under which routers follow the surrogate
    surrogate_hidden: int = 256
    surrogate_fit_steps: int = 20
    balance_weight: float = 0.01  # adaptive routers: keeps token routers from collapsing onto one width
    seq_len: int = 256
    micro_batch: int = 4
    dtype: str = "bf16"
    eval_limit: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise FlextronError("--budgets must be fractions in (0, 1], e.g. 0.4,0.5,...,1.0")
        if self.steps < 1 or self.joint_steps < 0:
            raise FlextronError("--steps must be at least 1 and --joint-steps at least 0")
        if self.dtype not in ("fp32", "bf16"):
            raise FlextronError("--dtype must be fp32 or bf16")
