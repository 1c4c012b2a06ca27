"""Does a llama.cpp file's speed follow the file or the order it was loaded in? Byte-identical copies of a
checkpoint's full model are loaded together and timed in turn in each round (`llamacpp.measure_rounds`, as the
budget benchmark and `profile` time), in two sessions: the first loads them in order, the second in reverse.
Each copy's time is the median of its per-round ratios to the median copy of that round. A slowness that
stays with a file is the file's (its pages); one that moves with the load position is the order's.

    python benchmarks/load_order.py CKPT [--copies 8] [--rounds 7] [--threads 2]
    python benchmarks/load_order.py --smoke     # a tiny random model, seconds; writes no results
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _results import command_line, publish
from flextron import api, llamacpp
from llamacpp_budgets import gguf, smoke_checkpoint, with_copies
from timing_repeatability import spread, timing_of

KEY = "decode_ms"


def ratios(paths: list[Path], rounds: int, timing: dict) -> list[float]:
    """Per file, the median over rounds of its decode time / the median file's of the same round."""
    runs = llamacpp.measure_rounds(paths, rounds, **timing)
    middle = [statistics.median(r[KEY] for r in round_) for round_ in zip(*runs)]
    return [statistics.median(r[KEY] / m for r, m in zip(run, middle)) for run in runs]


def full_copies(ckpt: Path, work: Path, n: int) -> tuple[list[Path], str]:
    """`n` byte-identical GGUFs of the checkpoint's full model, at its latency table's weight type."""
    em, _, _ = api.load(ckpt, "cpu")
    outtype = em.latency.outtype if em.latency is not None and em.latency.outtype else "f32"
    return with_copies(gguf(ckpt, em.space.full(), work / "copy.gguf", outtype), n), outtype


def main() -> None:
    t0 = time.time()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", nargs="?")
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="timing rounds per session (after a warm-up)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    timing = timing_of(a.smoke, a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files, outtype = full_copies(smoke_checkpoint(work) if a.smoke else Path(a.ckpt), work, a.copies)
        forward = ratios(files, a.rounds, timing)
        backward = ratios(files[::-1], a.rounds, timing)[::-1]  # back in file order
    n = a.copies
    lines = ["## llama.cpp: identical files loaded together, in order and in reverse", "",
             f"`{command_line('load_order.py', p, a).replace('--ckpt ', '')}` — {llamacpp.runtime_version()}, "
             f"{outtype}, {timing['threads']} thread(s), {time.time() - t0:.0f} s. {n} byte-identical copies of the "
             f"full model (as written), decode ms/token after {timing['context']} tokens, batch 1. Two sessions, "
             f"each loading every file afresh and timing them in turn in {a.rounds} rounds: in order (copy 1 loaded "
             f"first), then in reverse (copy {n} first). Each cell: the median over rounds of the copy's time / the "
             "median copy's in that round.", "",
             "| copy | loaded in order: position | time / median | loaded in reverse: position | time / median |",
             "|---|---|---|---|---|",
             *(f"| {i + 1} | {i + 1} | {f:.3f} | {n - i} | {b:.3f} |"
               for i, (f, b) in enumerate(zip(forward, backward)))]
    by_position = [(forward[k] + backward[n - 1 - k]) / 2 for k in range(n)]
    by_file = [(f + b) / 2 for f, b in zip(forward, backward)]
    lines += ["", f"Spread over the copies (largest / smallest - 1): in order {spread(forward):.1f}%, in reverse "
              f"{spread(backward):.1f}%; averaged per load position {spread(by_position):.1f}%, averaged per file "
              f"{spread(by_file):.1f}%."]
    data = {"checkpoint": str(a.ckpt), "timing": timing, "rounds": a.rounds, "outtype": outtype, "copies": n,
            "in_order": forward, "in_reverse": backward, "by_position": by_position, "by_file": by_file}
    publish("load_order", "load-order", data, lines, a.smoke)


if __name__ == "__main__":
    main()
