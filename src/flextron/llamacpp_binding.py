"""The llama-cpp-python binding itself: loading it (with a one-line error where it is missing), llama.cpp's
log kept quiet and collected, the threads it runs on, and its own quantizer (which `flextron.gguf` calls
without the runtime module, which builds on it)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flextron.errors import FlextronError


def library():
    """The `llama_cpp` module, refused in one line where llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        raise FlextronError("the llama.cpp runtime needs llama-cpp-python: pip install 'flextron[gguf]' "
                            "(it builds from source with cmake and g++, a few minutes)") from None
    return llama_cpp


def quantize(source: Path, out: Path, outtype: str) -> None:
    """llama.cpp's quantizer (`llama-quantize`, its default tensor mix for the type, every core) on the GGUF
    `source`, written to `out`: `outtype` one of llama.cpp's file types (q4_k_m -> LLAMA_FTYPE_MOSTLY_Q4_K_M).
    Its per-tensor log is kept quiet; a failure is one FlextronError line with llama.cpp's reason."""
    llama_cpp = library()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
    params.nthread = default_threads()
    with log_lines() as problems:
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if failed:
        reason = " ".join(problems[-1].split()) if problems else "no reason given"
        raise FlextronError(f"llama.cpp could not quantize the export to {outtype} ({reason}); export with "
                            "another --outtype")


LOG_INFO, LOG_WARN = 2, 3  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


@contextmanager
def log_lines(lowest: int = LOG_WARN) -> Iterator[list[str]]:
    """llama.cpp's log within the block: nothing printed, its lines of level `lowest` up to errors
    (by default its warnings and errors) collected."""
    llama_cpp = library()
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if lowest <= level < 5:
            lines.append(text.decode("utf-8", "replace"))

    callback, data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(data))
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(callback, data)


def default_threads() -> int:
    return os.cpu_count() or 1
