"""Compute dtypes by name and the autocast context every stage runs under."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from flextron.errors import FlextronError

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def compute_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype | None:
    """The autocast dtype for a --dtype name (None: plain fp32). "auto" is bf16 on CUDA and fp32
    elsewhere: on CPUs without bf16 matrix units bf16 autocast is slower (1.46x per training step,
    1.47x per router step on a 2-core AVX-512-BF16 Xeon), so it buys memory only."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else None
    if name not in DTYPES:
        raise FlextronError(f"unknown dtype {name!r}; use auto, {' or '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """bf16 (or another) autocast on `device`; a no-op for None (fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
