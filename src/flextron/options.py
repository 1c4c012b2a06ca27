"""Each command's options as one dataclass (field, default, help): the CLI flags, the API keyword
arguments and the `--config FILE.yaml` keys all come from these, and from `TrainConfig` and
`RouterConfig` in `flextron.config`. A run records its resolved options with `write_yaml`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from flextron.config import ATTN_UNITS, DTYPE_NAMES, GRAPHS, OUTTYPES, SEED_RANGE, check_options, opt
from flextron.errors import FlextronError
from flextron.fsutil import atomic_write

T = TypeVar("T")

_POSITIVE = {"low": 1}


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


_VERIFY = "check the weights against the sha256 recorded in the checkpoint (--no-verify: faster)"


@dataclass
class ConvertOptions(Options):
    """`flextron convert`: the elastic space and the importance calibration."""

    mlp_fractions: tuple[float, ...] = opt((0.25, 0.5, 0.75, 1.0), "MLP widths as fractions of the full width")
    attn_fractions: tuple[float, ...] = opt((0.25, 0.5, 0.75, 1.0), "attention units as fractions of all units "
                                                   "(--attn-unit head: of the KV groups, below one head per group)")
    multiple: int = opt(64, "MLP widths are multiples of this", **_POSITIVE)
    space: str | None = opt(None, 'JSON file with per-layer choices {"mlp": [[...], ...], "attn": [[...], ...]} '
                                  "(replaces the fractions); a list may start with 0 (skip)")
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
    calib_data: str = opt("default", "calibration text: a .txt file, or 'default' (the packaged train split)")
    calib_sequences: int = opt(256, "calibration sequences importance is measured on", **_POSITIVE)
    calib_seq_len: int = opt(256, "tokens per calibration sequence", **_POSITIVE)
    batch_size: int = opt(16, "calibration sequences per forward", **_POSITIVE)
    seed: int = opt(0, "seed of the calibration sample (and of --order random)", **SEED_RANGE)
    order: str = opt("importance", "sort units by measured importance, or randomly (the ablation)",
                     choices=("importance", "random"))
    dtype: str = opt("fp32", "compute dtype (bf16 on CUDA also loads and saves the weights in bf16)",
                     choices=DTYPE_NAMES)


@dataclass
class EvalOptions(Options):
    """`flextron eval`: held-out perplexity and zero-shot tasks at each budget."""

    budgets: tuple[str, ...] = opt(("1.0", "0.75", "0.5"), "budgets: 0.6, 60%, or metric=value such as params=80e6")
    tasks: tuple[str, ...] = opt(("ppl",), "ppl and/or zero-shot task names (see flextron.tasks.TASKS), "
                                           "or requests.jsonl(.gz) files")
    limit: int | None = opt(None, "at most this many windows / documents per task", **_POSITIVE)
    seq_len: int = opt(1024, "tokens per perplexity window", **_POSITIVE)
    batch_size: int = opt(4, "sequences per forward", **_POSITIVE)
    adaptive: bool = opt(False, "route per token (MLP) and per request (attention)")
    dtype: str = opt("fp32", "compute dtype", choices=DTYPE_NAMES)
    verify: bool = opt(True, _VERIFY)


@dataclass
class ProfileOptions(Options):
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
    verify: bool = opt(True, _VERIFY)


@dataclass
class ExportOptions(Options):
    """`flextron export`: the output format."""

    format: str = opt("hf", "an HF directory, or one llama.cpp GGUF file", choices=("hf", "gguf"))
    outtype: str = opt("f32", "GGUF weight type", choices=OUTTYPES)
    graph: str = opt("auto", "GGUF: llama.cpp graph of a uniform sub-network: the family's own, per-layer deci, or "
                     "auto (the one the checkpoint's llama.cpp latency table says decodes faster; own without one)",
                     choices=GRAPHS)
    verify: bool = opt(True, _VERIFY)


@dataclass
class Sampling(Options):
    """How a completion is drawn (see `flextron.generation.complete`)."""

    max_new_tokens: int = opt(128, "the most tokens to generate", **_POSITIVE)
    temperature: float = opt(0.0, "0: greedy; >0: sampling", low=0.0)
    top_p: float = opt(1.0, "nucleus sampling threshold", low=0.0, high=1.0, low_open=True)
    seed: int | None = opt(None, "sampling seed", **SEED_RANGE)


@dataclass
class GenerateOptions(Sampling):
    """`flextron generate`: the sampling settings, the budget and the prompt's form."""

    budget: str | None = opt(None, "0.6, 60%, or metric=value; elastic checkpoints only (default: the full model)")
    raw: bool = opt(False, "do not wrap the prompt in the chat template")
    adaptive: bool = opt(False, "route per token (MLP) and per request (attention)")
    verify: bool = opt(True, _VERIFY)


@dataclass
class ServeConfig(Options):
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
class ServeOptions(ServeConfig):
    """`flextron serve`: where to listen, what to call the model, and the server's limits."""

    host: str = opt("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = opt(8000, "port to listen on (0: any free port)", low=0, high=65535)
    name: str | None = opt(None, "model id reported to clients (default: the checkpoint directory's name)")
    dtype: str = opt("fp32", "compute dtype", choices=DTYPE_NAMES)
    verify: bool = opt(True, _VERIFY)


@dataclass
class DemoOptions(Options):
    """`flextron demo`: the pipeline's size and where it writes."""

    preset: str = opt("demo", "tiny (a smoke run of a couple of minutes), demo (about a quarter of an hour on "
                              "2 CPU cores) or bench (larger); see flextron.demo.PRESETS")
    out: str = opt("flextron-demo", "directory to write (checkpoints, exports, results.json, report)")


@dataclass
class ReportOptions(Options):
    """`flextron report`: the title and where the markdown also goes."""

    title: str | None = opt(None, "the report's title (default: from the run)")
    into: str | None = opt(None, "also replace a marked section of this markdown file")
    section: str = opt("report", "the section name in --into (<!-- NAME:start -->)")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A `--config` file: a YAML mapping of option names (dashes or underscores) to values."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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
