"""Where batch-1 decode time goes: the full packaged model vs its export at a budget, per matmul
shape (ms per token, achieved GB/s) and outside the matmuls, from torch.profiler; optionally
the same decode under torch.compile (a static KV cache), to separate framework overhead from
matmul efficiency.

    python benchmarks/decode_profile.py [--budget 0.5] [--tokens 32] [--compile]
"""

from __future__ import annotations

import argparse
import collections
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, StaticCache

from _results import update_section, write_json
from flextron import api
from flextron.assets import default_model_dir


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, n: int) -> float:
    """Greedy decode of n tokens with the default (dynamic) KV cache; tokens/s."""
    out = model(input_ids=prompt, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return n / (time.perf_counter() - t)


@torch.inference_mode()
def compiled_decode(model, prompt: torch.Tensor, n: int, repeats: int) -> float:
    step = torch.compile(lambda t, c, p: model(input_ids=t, past_key_values=c, use_cache=True, cache_position=p))
    best = 0.0
    for _ in range(repeats + 1):  # the first run compiles
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + n + 1)
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(prompt.shape[1]))
        tok = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for i in range(n):
            tok = step(tok, cache, torch.tensor([prompt.shape[1] + i])).logits[:, -1:].argmax(-1)
        best = max(best, n / (time.perf_counter() - t))
    return best


def breakdown(model, prompt: torch.Tensor, n: int) -> dict:
    """Per weight shape of the batch-1 matmuls: ms per decoded token and GB/s; the rest of the time."""
    decode(model, prompt, n)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        decode(model, prompt, n)
    shapes: dict[str, dict] = collections.defaultdict(lambda: {"ms_per_token": 0.0, "calls_per_token": 0.0})
    total = matmul = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        total += e.self_cpu_time_total
        if e.key == "aten::mm" and e.input_shapes and len(e.input_shapes[0]) == 2 and e.input_shapes[0][0] == 1:
            k, m = e.input_shapes[1]
            s = shapes[f"{k}x{m}"]
            s["ms_per_token"] += e.self_cpu_time_total / 1e3 / n
            s["calls_per_token"] += e.count / n  # the prompt pass has M > 1: not counted
            s["mbytes"] = k * m * 4 / 1e6
            matmul += e.self_cpu_time_total
    for s in shapes.values():
        s["gb_per_s"] = s["mbytes"] * s["calls_per_token"] / s["ms_per_token"]
    return {"total_ms_per_token": total / 1e3 / n, "decode_matmul_ms_per_token": matmul / 1e3 / n,
            "shapes": dict(sorted(shapes.items(), key=lambda kv: -kv[1]["ms_per_token"]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="0.5")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="also time decode under torch.compile")
    a = p.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(100, 20000, (1, 32))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = api.convert(None, Path(tmp) / "ckpt", order="random", device="cpu", progress=False)
        export = api.export(ckpt, a.budget, Path(tmp) / "export")
        data = {"command": f"python benchmarks/decode_profile.py --budget {a.budget} --tokens {a.tokens}"
                           + (" --compile" if a.compile else ""),
                "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "models": {}}
        for name, path in (("full", default_model_dir()), (f"export {a.budget}", export)):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            row = breakdown(model, prompt, a.tokens)
            row["eager_tps"] = max(decode(model, prompt, a.tokens) for _ in range(3))
            if a.compile:
                row["compiled_tps"] = compiled_decode(model, prompt, a.tokens, 2)
            data["models"][name] = row
    write_json("decode_profile", data)
    report(data)


def report(data: dict) -> None:
    (full_name, full), (part_name, part) = data["models"].items()
    lines = ["## Where decode time goes (profile)", "",
             f"`{data['command']}` — {data['cpu']}, {data['threads']} threads, torch {data['torch']}, fp32, "
             "batch 1. Batch-1 matmuls per weight shape (K x N of x[1,K] @ W[K,N]; W is a Linear's transposed "
             "weight), in ms per decoded token and the weight bandwidth they reach:", "",
             "| model | weight shape | calls/token | ms/token | GB/s |", "|---|---|---|---|---|"]
    for name, m in data["models"].items():
        for shape, s in m["shapes"].items():
            lines.append(f"| {name} | {shape} | {s['calls_per_token']:.0f} | {s['ms_per_token']:.2f} | "
                         f"{s['gb_per_s']:.1f} |")
    rest = [m["total_ms_per_token"] - m["decode_matmul_ms_per_token"] for m in (full, part)]
    lines += ["", f"Matmuls: {full['decode_matmul_ms_per_token']:.1f} vs {part['decode_matmul_ms_per_token']:.1f} "
              f"ms/token ({full['decode_matmul_ms_per_token'] / part['decode_matmul_ms_per_token']:.2f}x); "
              f"everything else: {rest[0]:.1f} vs {rest[1]:.1f} ms/token. Eager decode {full['eager_tps']:.1f} vs "
              f"{part['eager_tps']:.1f} tok/s ({part['eager_tps'] / full['eager_tps']:.2f}x)."]
    if "compiled_tps" in full:
        lines[-1] += (f" torch.compile (static cache): {full['compiled_tps']:.1f} vs {part['compiled_tps']:.1f} tok/s "
                      f"({part['compiled_tps'] / full['compiled_tps']:.2f}x).")
    update_section("decode-profile", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
