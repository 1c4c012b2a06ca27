"""The elastic search space (`ElasticSpace`: per-layer nested choices), one sub-network (`Subnet`) and
a budget (`Budget`: a fraction of the full model's cost or an absolute value of a metric)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass

import torch

from flextron.errors import FlextronError

KINDS = ("mlp", "attn")
ATTN_UNITS = ("group", "head")  # what an attention choice counts (see ElasticSpace)
SAMPLE_MODES = ("layers", "uniform", "spread")  # how ElasticSpace.sample draws a sub-network


@dataclass
class ElasticSpace:
    """Per-layer nested choices: MLP widths (neurons) and attention units.

    Every list is ascending and ends with the layer's full size, so a smaller choice is a
    prefix of a larger one once the weights are sorted by importance. A list may start with 0:
    the sub-layer may be skipped (depth). `min_layers` is the floor of layers that keep each
    kind of sub-layer; `skip_order` lists, per kind, the layers from the first to skip (least
    important) to the last (the default: the deepest first).

    `hidden`, where set, lists hidden sizes (ascending, ending with the model's): one choice for the
    whole model, the first channels of the residual stream (see `flextron.hidden`); None: always full.

    `attn_unit` says what an attention choice counts. "group": KV groups, each with all its query
    heads (whole-group removal). "head": query heads, nested as G*q (all G groups kept, q heads in
    each) down to G, then c < G (c groups of one head): trims heads inside the groups first.
    """

    mlp: list[list[int]]
    attn: list[list[int]]
    min_layers: int = 1
    skip_order: dict[str, list[int]] | None = None
    attn_unit: str = "group"
    hidden: list[int] | None = None

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
        h = self.hidden
        if h is not None and (not h or sorted(set(h)) != list(h) or h[0] < 1):
            raise FlextronError(f"hidden sizes {h} must be distinct positive integers in ascending order, "
                                "the model's hidden size last")

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

    def with_hidden(self, size: int, fractions: tuple[float, ...] = (0.5, 0.75, 1.0), multiple: int = 64
                    ) -> ElasticSpace:
        """This space with hidden-size choices: `fractions` of `size` rounded to `multiple` channels."""
        for f in fractions:
            if not 0.0 < f <= 1.0:
                raise FlextronError(f"hidden fraction {f} is outside (0, 1]; use values like 0.5")
        if multiple < 1:
            raise FlextronError(f"--hidden-multiple must be a positive integer, got {multiple}")
        sizes = {min(size, max(multiple, round(f * size / multiple) * multiple)) for f in fractions} | {size}
        return dataclasses.replace(self, hidden=sorted(sizes))

    def hidden_index(self, subnet: Subnet) -> int:
        """The index of `subnet`'s hidden size among this space's (0 where the space has none)."""
        return self.hidden.index(subnet.hidden or self.hidden[-1]) if self.hidden else 0

    def with_depth(self, min_layers: int | None = None, skip_order: dict[str, list[int]] | None = None
                   ) -> ElasticSpace:
        """This space with choice 0 (skip) added to every list; floor default: a third of the layers."""
        n = self.n_layers
        return ElasticSpace(mlp=[sorted({0, *self.widths("mlp", i)}) for i in range(n)],
                            attn=[sorted({0, *self.widths("attn", i)}) for i in range(n)],
                            min_layers=max(1, math.ceil(n / 3)) if min_layers is None else min_layers,
                            skip_order=skip_order, attn_unit=self.attn_unit, hidden=self.hidden)

    def hidden_at(self, index: int | None) -> int | None:
        """The hidden size at `index` of this space's choices (clamped); None for the full size."""
        if not self.hidden or index is None or index >= len(self.hidden) - 1:
            return None
        return self.hidden[index]

    def full(self) -> Subnet:
        return Subnet(mlp=[c[-1] for c in self.mlp], attn=[c[-1] for c in self.attn])

    def smallest(self) -> Subnet:
        """The smallest width of every layer and hidden size, with as many sub-layers skipped as the floor allows."""
        return self.uniform(0, 0, self.n_layers, self.n_layers, hidden_index=0)

    def centroid(self) -> Subnet:
        """The middle width of every layer and hidden size (upper middle for an even number of choices)."""
        mid = {k: [w[len(w) // 2] for w in (self.widths(k, i) for i in range(self.n_layers))] for k in KINDS}
        return Subnet(**mid, hidden=self.hidden_at(len(self.hidden) // 2 if self.hidden else None))

    def uniform(self, mlp_index: int, attn_index: int, skip_mlp: int = 0, skip_attn: int = 0,
                hidden_index: int | None = None) -> Subnet:
        """Every layer at the same width index (clamped to each layer's widths), then the first
        `skip_mlp` / `skip_attn` skippable layers of the skip order skipped (within the floor); the
        hidden size at `hidden_index` of the space's (None: the full size)."""
        out = {}
        for kind, index, skip in (("mlp", mlp_index, skip_mlp), ("attn", attn_index, skip_attn)):
            ws = [self.widths(kind, i) for i in range(self.n_layers)]
            out[kind] = self._skip_first(kind, [w[min(index, len(w) - 1)] for w in ws], skip)
        return Subnet(**out, hidden=self.hidden_at(hidden_index))

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
        at random layers. A space with hidden sizes draws one of them last, uniformly. Draws from `gen`
        in that order, so a seed gives the same sub-networks."""
        def draw(k: int) -> int:
            return torch.randint(k, (1,), generator=gen).item()

        def skip_count() -> int:  # 0 up to the floor
            return draw(self.n_layers - self.min_layers + 1)

        if mode not in SAMPLE_MODES:
            raise FlextronError(f"unknown sampling mode {mode!r}; use one of {', '.join(SAMPLE_MODES)}")
        skip_counts = self.depth and (mode == "uniform" or ordered_skips)
        if mode == "uniform":
            i, j = (draw(max(len(self.widths(k, layer)) for layer in range(self.n_layers))) for k in KINDS)
            skips = [skip_count() for _ in range(2)] if skip_counts else [0, 0]
            return self.uniform(i, j, *skips, hidden_index=draw(len(self.hidden)) if self.hidden else None)
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
        hidden = self.hidden_at(draw(len(self.hidden))) if self.hidden else None
        return self.floor(Subnet(**picks, hidden=hidden))

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
        return Subnet(**out, hidden=subnet.hidden)

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
        if subnet.hidden is not None and subnet.hidden not in (self.hidden or []):
            raise FlextronError(f"hidden size {subnet.hidden} is not in the elastic space "
                                f"{self.hidden or '(no hidden-size choices)'}; pick one of those values")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "hidden" or v is not None}

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
        hidden = d.get("hidden")
        if hidden is not None and not (isinstance(hidden, list) and all(type(c) is int for c in hidden)):
            raise FlextronError(f"elastic space hidden {hidden!r} must be a list of integers")
        return cls(mlp=[list(c) for c in d["mlp"]], attn=[list(c) for c in d["attn"]], min_layers=min_layers,
                   skip_order={k: list(v) for k, v in order.items()} if order else None,
                   attn_unit=d.get("attn_unit", "group"), hidden=hidden)


@dataclass
class Subnet:
    """One sub-network: per layer, the MLP width in neurons and the number of attention units; the
    hidden size of the whole model (None: the full size)."""

    mlp: list[int]
    attn: list[int]
    hidden: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "hidden" or v is not None}


METRICS = ("params", "flops", "kv_bytes", "decode_bytes", "memory_mb", "latency_ms", "prefill_ms")
# memory=SIZE: its unit, in megabytes (10^6 bytes) of the memory_mb metric
MEMORY_UNITS = {"KB": 1e-3, "MB": 1.0, "GB": 1e3, "KiB": 1024 / 1e6, "MiB": 2**20 / 1e6, "GiB": 2**30 / 1e6}


@dataclass(frozen=True)
class Budget:
    """A target cost: a fraction of the full model's cost, or an absolute value of a metric.

    Metric "auto" (a bare fraction) means measured decode latency where the checkpoint has a
    latency table, else parameters (non-embedding ones, or all of them in a space with hidden sizes).
    A memory budget is in megabytes of 10^6 bytes (`memory_mb`), written as a number of them or as
    `memory=SIZE` with a unit (`MEMORY_UNITS`: 512MB, 1.5GB, 2GiB).
    """

    metric: str = "auto"
    fraction: float | None = None
    value: float | None = None

    @classmethod
    def parse(cls, text: str | float) -> Budget:
        """Accept `0.6` or `60%` (fractions), `params=80e6` or `latency_ms=25` (absolute), `flops=50%`,
        `memory_mb=60`, `memory=512MB` or `memory=50%`."""
        s = str(text).strip().lower().replace(" ", "")
        metric, unit = "auto", None
        if "=" in s:
            metric, s = s.split("=", 1)
            if metric == "memory":
                metric, s, unit = "memory_mb", *_memory_size(text, s)
            elif metric not in METRICS:
                raise FlextronError(
                    f"unknown budget metric {metric!r}; use one of {', '.join(METRICS)}, or memory=SIZE such as "
                    "memory=512MB"
                )
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(%?)", s)
        if not m:
            hint = " (memory_mb counts megabytes: memory_mb=512, or memory=512MB)" if metric == "memory_mb" else ""
            raise FlextronError(
                f"cannot read budget {text!r}; write 0.6, 60% or metric=value such as params=80e6{hint}"
            )
        number = float(m.group(1)) / (100.0 if m.group(2) else 1.0) * (unit or 1.0)
        if not math.isfinite(number):
            raise FlextronError(f"budget {text!r} is not a finite number")
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
        short = f"{self.value:g}"
        return prefix + (short if float(short) == self.value else f"{self.value:.12g}")  # reads back the same


def _memory_size(text: str | float, size: str) -> tuple[str, float | None]:
    """`memory=SIZE`: the number and its unit in megabytes (None for a percentage)."""
    if size.endswith("%"):
        return size, None
    units = {u.lower(): scale for u, scale in MEMORY_UNITS.items()}  # `parse` reads the text in lower case
    m = re.fullmatch(r"(.*?)([a-z]+)", size)
    if not m or m.group(2) not in units:
        raise FlextronError(f"cannot read memory budget {text!r}; give a size with its unit "
                            f"({', '.join(MEMORY_UNITS)}) such as memory=512MB or memory=1.5GB, or megabytes as "
                            "memory_mb=512")
    return m.group(1), units[m.group(2)]
