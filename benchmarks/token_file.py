"""Tokenizing + packing throughput and peak memory of the token-file data path at two corpus sizes.

The packaged train split (big.txt, ~6 MB) copied 1x and Nx into .txt files is tokenized with the
packaged model's tokenizer into a fresh cache (`flextron.tokens.corpus_tokens`) and cut into
packed sequences, each size in a fresh process; peak RSS should stay flat as the corpus grows.

    python benchmarks/token_file.py [--copies 1,4] [--seq-len 2048]
    python benchmarks/token_file.py --smoke     # a tiny word-level tokenizer and corpus, seconds; no results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import update_section, write_json


def _tokenizer(smoke: bool):
    if smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from helpers import make_tokenizer

        return make_tokenizer()
    from transformers import AutoTokenizer

    from flextron.assets import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def child(files: list[str], seq_len: int, smoke: bool) -> dict:
    from flextron.data import PackedSequences
    from flextron.tokens import corpus_tokens
    from flextron.train.memory import peak_rss_bytes

    tok = _tokenizer(smoke)
    t0 = time.perf_counter()
    ids = corpus_tokens(files, tok)
    seqs = PackedSequences(ids, seq_len, seed=0)
    seqs.rows(0, 8)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes() / 2**20
    return {"chars": sum(os.path.getsize(f) for f in files), "tokens": len(ids), "sequences": len(seqs),
            "seconds": round(seconds, 2), "tokens_per_s": round(len(ids) / seconds),
            "peak_rss_mb": round(peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", default="1,4", help="corpus sizes, in copies of the train split")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(child(a.child, a.seq_len, a.smoke)))
        return
    from flextron.data import default_splits

    text = default_splits()["train"][: 20_000 if a.smoke else None]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for n in (int(c) for c in a.copies.split(",")):
            files = []
            for i in range(n):
                files.append(str(Path(work) / f"size{n}-{i}.txt"))
                Path(files[-1]).write_text(text)
            env = {**os.environ, "XDG_CACHE_HOME": str(Path(work) / f"cache{n}")}
            out = subprocess.run([sys.executable, __file__, "--seq-len", str(a.seq_len),
                                  *(["--smoke"] if a.smoke else []), "--child", *files],
                                 capture_output=True, text=True, check=True, env=env)
            rows.append({"copies": n, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(rows[-1])
    if a.smoke:
        return
    write_json("token_file", {"seq_len": a.seq_len, "rows": rows})
    update_section("token-file", (
        "Tokenizing + packing the packaged train split copied into .txt files, SmolLM2 tokenizer, one process "
        "(`python benchmarks/token_file.py`):\n\n"
        "| corpus | characters | tokens | tokens/s | peak RSS of the process (MB) |\n"
        "|---|---:|---:|---:|---:|\n"
        + "".join(f"| {r['copies']}x | {r['chars']:,} | {r['tokens']:,} | {r['tokens_per_s']:,} | "
                  f"{r['peak_rss_mb']} |\n" for r in rows)))


if __name__ == "__main__":
    main()
