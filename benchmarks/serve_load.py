"""`flextron serve` under load: continuous batching vs one request at a time, in the same run.

The packaged SmolLM2-135M (converted with a random unit order: speed does not depend on it) is
served by `flextron serve` in a subprocess three times: with `--max-batch 1` (the old serialized
server), batched (`--max-batch 16`: a batch per sub-network, the batches taking turns), and with
all budgets in one batch (`--max-batch 16 --mix-budgets`). For 1, 4, 16 and 64 concurrent
clients, each request asks
for 64 greedy tokens of a token-id prompt (8 prompts of 8-64 tokens), at one of three budgets in
the model name (`NAME@100%`, `@75%`, `@50%`), half of them streamed. Reported per policy and
level: aggregate generated tokens/s, p50/p99 time to first token (streamed requests) and total
latency, errors, the server's resident memory before/after; and whether every greedy output
equals the same request sent alone (references from the serialized server, one at a time).

    python benchmarks/serve_load.py [--device cpu|cuda] [--max-batch 16] [--work DIR]
    python benchmarks/serve_load.py --smoke     # a tiny random model, seconds; writes no results
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import openai
import torch

from _results import command_line, update_section, write_json
from flextron import api
from speed import bench_checkpoint, hardware_name

BUDGETS = ["100%", "75%", "50%"]
BEFORE = "serial (before) = the `--max-batch 1` server of the earlier source tree given by --baseline; "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Served:
    """`flextron serve CKPT` in a subprocess, until closed."""

    def __init__(self, ckpt: Path, max_batch: int, device: str, dtype: str, mix: bool = False,
                 src: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flextron", "serve", str(ckpt), "--port", str(self.port), "--name", "ckpt",
             "--max-batch", str(max_batch), "--max-queue", "256", "--max-tokens", "256", "--device", device,
             "--dtype", dtype, *(["--mix-budgets"] if mix else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=None if src is None else {**os.environ, "PYTHONPATH": str(Path(src) / "src")})
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def one(client: openai.OpenAI, prompt: list[int], budget: str, stream: bool, max_tokens: int) -> dict:
    """One greedy completion: its text, tokens, time to first token (streamed) and latency."""
    t0 = time.perf_counter()
    kw = {"model": f"ckpt@{budget}", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        r = client.completions.create(**kw)
        return {"text": r.choices[0].text, "tokens": r.usage.completion_tokens, "ttft": None,
                "latency": time.perf_counter() - t0}
    text, ttft, tokens = "", None, 0
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            text += chunk.choices[0].text
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"text": text, "tokens": tokens, "ttft": ttft, "latency": time.perf_counter() - t0}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def level(url: str, clients: int, per_client: int, prompts: list[list[int]], max_tokens: int,
          reference: dict) -> dict:
    """`clients` threads, each sending `per_client` requests one after another."""
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=1800)
        for j in range(per_client):
            k = i * per_client + j
            p, b, stream = k % len(prompts), BUDGETS[k % len(BUDGETS)], k % 2 == 0
            try:
                r = one(client, prompts[p], b, stream, max_tokens)
                r["same"] = reference is None or r["text"] == reference[(p, b)]
                with lock:
                    results.append(r)
            except Exception as e:  # counted, the run goes on
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    latency = [r["latency"] for r in results]
    return {"clients": clients, "requests": clients * per_client, "wall_s": wall,
            "tokens": sum(r["tokens"] for r in results), "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "latency_p50_s": pct(latency, 0.5),
            "latency_p99_s": pct(latency, 0.99), "errors": len(errors), "error_samples": errors[:3],
            "mismatches": sum(not r["same"] for r in results)}


def fmt(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--min-requests", type=int, default=16, help="requests per level at least (spread over clients)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--work", default=None, help="keep the checkpoint here (default: a temp dir)")
    p.add_argument("--name", default="serve_load", help="the JSON file and docs/results.md section written")
    p.add_argument("--baseline", default=None, help="source tree of an earlier flextron (e.g. a git worktree); "
                                                    "its --max-batch 1 server joins the run as 'serial (before)'")
    p.add_argument("--smoke", action="store_true", help="tiny random model, few tokens; writes no results")
    a = p.parse_args()
    if a.smoke:
        a.clients, a.min_requests, a.max_tokens = "1,4", 4, 8
    device = api.resolve_device(a.device)
    hardware = hardware_name(device)
    levels = [int(c) for c in a.clients.split(",")]
    gen = torch.Generator().manual_seed(0)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = bench_checkpoint(Path(a.work or tmp), a.smoke)
        vocab = api.load(ckpt, "cpu")[0].config.vocab_size
        prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (8, 16, 24, 32, 40, 48, 56, 64)]
        runs, reference = {}, None
        policies = [("serial", 1, None), ("batched", a.max_batch, None), ("mixed", a.max_batch, None)]
        if a.baseline:
            policies.insert(0, ("serial (before)", 1, Path(a.baseline)))
        for policy, max_batch, src in policies:
            server = Served(ckpt, max_batch, device, a.dtype, mix=policy == "mixed", src=src)
            try:
                if reference is None:  # each request alone, one at a time
                    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600)
                    reference = {(i, b): one(client, pr, b, False, a.max_tokens)["text"]
                                 for i, pr in enumerate(prompts) for b in BUDGETS}
                before = rss_mb(server.proc.pid)
                rows = [level(server.url, c, max(1, -(-a.min_requests // c)), prompts, a.max_tokens, reference)
                        for c in levels]
                after = rss_mb(server.proc.pid)
                runs[policy] = {"max_batch": max_batch, "rss_before_mb": before, "rss_after_mb": after, "levels": rows,
                                **({"source": str(src)} if src else {})}
            finally:
                server.close()
            for r in rows:
                print(f"{policy:8s} {r['clients']:3d} clients: {r['tokens_per_s']:8.1f} tok/s, latency p50 "
                      f"{fmt(r['latency_p50_s'])} s p99 {fmt(r['latency_p99_s'])} s, errors {r['errors']}, "
                      f"mismatches {r['mismatches']}")
    if a.smoke:
        print(f"smoke run done in {time.time() - t_start:.0f} s (no results written)")
        return
    command = command_line("serve_load.py", p, a)
    write_json(a.name, {"command": command, "device": device, "hardware": hardware, "torch": torch.__version__,
                              "dtype": a.dtype, "max_tokens": a.max_tokens, "budgets": BUDGETS, "runs": runs,
                              "seconds": time.time() - t_start})
    against = ", against an earlier build" if a.baseline else ""
    lines = [f"## Serving under load: {', '.join(map(str, levels))} clients{against} (`flextron serve`, continuous "
             "batching vs one at a time)", "",
             f"`{command}` on {hardware} ({device}, {a.dtype}, torch {torch.__version__}); SmolLM2-135M "
             f"(packaged), {a.max_tokens}-token greedy completions at {', '.join(BUDGETS)} (model `ckpt@B`), half "
             f"streamed. {BEFORE if a.baseline else ''}"
             f"serial = `--max-batch 1` (one request at a time), batched = `--max-batch {a.max_batch}` (a batch "
             f"per sub-network, taking turns), mixed = `--max-batch {a.max_batch} --mix-budgets` (one batch, "
             "full width, rows masked). "
             "Time to first token over streamed requests; mismatches: outputs that differ from the same request "
             "sent alone.", "",
             "| clients | policy | tokens/s | TTFT p50 / p99 (s) | latency p50 / p99 (s) | errors | mismatches |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for i, c in enumerate(levels):
        for policy, run in runs.items():
            r = run["levels"][i]
            lines.append(f"| {c} | {policy} | {r['tokens_per_s']:.1f} | {fmt(r['ttft_p50_s'])} / "
                         f"{fmt(r['ttft_p99_s'])} | {fmt(r['latency_p50_s'])} / {fmt(r['latency_p99_s'])} | "
                         f"{r['errors']} | {r['mismatches']} |")
    lines += [""] + [f"Server memory ({policy}): {run['rss_before_mb']:.0f} MB before, {run['rss_after_mb']:.0f} MB "
                     "after the run." for policy, run in runs.items()]
    update_section(a.name, "\n".join(lines))


if __name__ == "__main__":
    main()
