"""Where a memory budget is priced: a llama.cpp deployment (weight type, context, batch, KV cache type).
Apart from `flextron.footprint`, which prices it, so that the model and the options can hold one."""

from __future__ import annotations

from dataclasses import dataclass

from flextron.errors import FlextronError

WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")  # = flextron.options.OUTTYPES
KV_TYPES = ("f16", "q8_0", "q4_0", "f32")
UBATCH = 512  # llama.cpp's default micro-batch (-ub)
_CELL_PAD = 256  # llama.cpp pads the context (and each sequence's cells) to this


@dataclass(frozen=True)
class Deployment:
    """A llama.cpp deployment a memory budget is priced at: GGUF weights of `weight_type` (an
    `export --outtype`), a KV cache of `context` tokens for each of `batch` sequences at `kv_type`."""

    weight_type: str = "f32"
    context: int = 4096  # llama.cpp's default -c
    batch: int = 1
    kv_type: str = "f16"

    def __post_init__(self) -> None:
        if self.weight_type not in WEIGHT_TYPES:
            raise FlextronError(f"weight type must be one of {', '.join(WEIGHT_TYPES)}, not {self.weight_type!r}")
        if self.kv_type not in KV_TYPES:
            raise FlextronError(f"KV cache type must be one of {', '.join(KV_TYPES)}, not {self.kv_type!r}")
        for name in ("context", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FlextronError(f"--{name} must be a positive integer, got {value!r}")

    def __str__(self) -> str:
        seqs = f" x {self.batch} sequences" if self.batch > 1 else ""
        return f"{self.weight_type} weights, {self.context}-token {self.kv_type} KV cache{seqs}"

    @property
    def seq_cells(self) -> int:
        """KV cells of one sequence: llama.cpp's n_ctx_seq (one stream per sequence)."""
        n_ctx = _pad(self.context * self.batch)
        return n_ctx if self.batch == 1 else _pad(n_ctx // self.batch)

    @property
    def ubatch(self) -> int:
        """Tokens of the micro-batch llama.cpp reserves its compute buffer for (at most the context)."""
        return min(UBATCH, self.context * self.batch)


def _pad(n: int) -> int:
    return -(-n // _CELL_PAD) * _CELL_PAD
