"""One GPU run (about 8 minutes on an H100 / H200, no network): versions, the CUDA test subset, training
throughput and MFU of the bf16 sandwich step, decode speed-ups of exports, and (when the packaged
SmolLM2 weights are present) a short elastic training run.

- training: random models of the SmolLM2-135M and Llama-3.2-1B shapes, the real step of
  `flextron train` (`distill_step`: teacher pass, then the full, smallest and 2 random sub-networks
  with the chunked distillation loss, AdamW), bf16 autocast, eager and with each decoder block
  compiled; MFU = model FLOPs (3x the forward FLOPs of every student pass + the teacher's forward,
  `subnet_cost`) / time / the card's dense bf16 peak.
- decode: exports at 75 % and 50 % of the parameters vs the full model, greedy, batch 1 and 8, eager
  (dynamic cache) and, for the 1B shape, compiled (static cache, transformers' automatic compile);
  speed-ups against the ratio of weight bytes read.

    python benchmarks/gpu.py                         # on the GPU machine: JSON + a docs/results.md section
    python benchmarks/gpu.py --device cpu --tiny     # dry run in seconds (tests/test_benchmarks.py)

The packaged SmolLM2 GGUF (98 MB) is larger than what travels to a GPU machine in one call (64 MiB): it
travels in two halves in two calls, and `--gguf FILE` dequantizes it there. One call can run some of
the parts (`--parts`) into its own JSON (`--out`), bounded by `--deadline`; `--report A.json B.json`
merges such files into benchmarks/results/gpu.json and the docs/results.md section.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from _results import ROOT, update_section, write_json
from flextron import api
from flextron.assets import DEFAULT_MODEL, cache_dir, dequantize_gguf
from flextron.cost import subnet_cost
from flextron.elastic import ElasticModel
from flextron.latency import sync
from flextron.options import TrainOptions
from flextron.train.elastic import distill_step, sample_subnets

sys.path.insert(0, str(ROOT / "tests"))
from helpers import make_tokenizer  # noqa: E402  (the tests' word-level tokenizer for random models)

SHAPES = {  # Llama-architecture shapes of real checkpoints, random weights
    "SmolLM2-135M": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity
PARTS = ("tests", "train", "decode", "smollm2")
PACKAGES = ("torch", "transformers", "safetensors", "tokenizers", "tqdm", "rich", "matplotlib", "pytest")


def versions(device: str) -> dict:
    out = {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}}
    if device == "cuda":
        out |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return out


def _version(package: str) -> str:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "absent"


def attempt(fn: Callable, *args) -> object:
    """`fn(*args)`; a failure is recorded as the result (a GPU run is one shot: the rest goes on)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if all(w in name for w in k.split())), None)


def cuda_tests() -> dict:
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests")], capture_output=True, text=True, cwd=ROOT)
    return {"returncode": run.returncode, "summary": run.stdout.strip().splitlines()[-1] if run.stdout else ""}


def train_throughput(shape: dict, device: str, compiled: bool, a: argparse.Namespace) -> dict:
    """Tokens/s and MFU of the sandwich step, measured over steps whose sub-networks the warm-up saw."""
    torch.manual_seed(0)
    em = ElasticModel(LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=a.seq_len)).to(device))
    teacher = ElasticModel(LlamaForCausalLM(em.config).to(device, torch.bfloat16)).requires_grad_(False)
    teacher.model.load_state_dict(em.model.state_dict())
    em.train()
    if compiled:
        torch._dynamo.config.allow_unspec_int_on_nn_module = True  # widths are symbolic: one graph for all
        torch._dynamo.config.cache_size_limit = 64
        for block in em.family.blocks(em.model):
            block.compile(dynamic=True)
    cfg = TrainOptions(max_steps=1, seq_len=a.seq_len, micro_batch=a.micro_batch, dtype="bf16")
    optimizer = torch.optim.AdamW(em.parameters(), lr=1e-5, fused=device == "cuda")
    ids = torch.randint(0, shape["vocab_size"], (a.micro_batch, a.seq_len), device=device)
    steps = [sample_subnets(em, cfg, s) for s in range(a.steps)]

    def run_steps() -> float:
        sync(device)
        t = time.perf_counter()
        for subnets in steps:
            distill_step(em, em, teacher, [ids], subnets, cfg, torch.device(device))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t

    warmup = run_steps()
    seconds = run_steps()
    tokens = a.steps * a.micro_batch * a.seq_len
    ctx = a.seq_len // 2  # mean attended context of a causal sequence
    fwd = sum(subnet_cost(em, sub, context=ctx).flops_per_token for subnets in steps for sub in subnets)
    flops = (3 * fwd + a.steps * subnet_cost(em, None, context=ctx).flops_per_token) * a.micro_batch * a.seq_len
    peak = peak_flops(device)
    return {"compiled": compiled, "tokens_per_s": round(tokens / seconds), "warmup_s": round(warmup, 1),
            "tflops": round(flops / seconds / 1e12, 1),
            "mfu": None if peak is None else round(flops / seconds / peak, 3),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None}


@torch.inference_mode()
def decode_tps(model, batch: int, new_tokens: int, static: bool, device: str) -> float:
    prompt = torch.randint(0, model.config.vocab_size, (batch, 32), device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static" if static else None)
    model.generate(prompt, **kwargs)  # warm-up (and compilation with a static cache)
    times = []
    for _ in range(3):  # the median of 3: one run of launch-bound eager decoding varied up to 2x on an H200
        sync(device)
        t = time.perf_counter()
        model.generate(prompt, **kwargs)
        sync(device)
        times.append(time.perf_counter() - t)
    return batch * new_tokens / sorted(times)[1]


def decode_speedups(shape: dict, device: str, work: Path, a: argparse.Namespace, static: bool) -> list[dict]:
    """Exports at 75 % / 50 % of the parameters vs the full model (a random unit order: speed does not
    depend on it); the ideal speed-up is the ratio of weight bytes read per token. Eager at batch 1 and 8;
    with `static`, also a static cache compiled by transformers (batch 1: compiling costs ~30 s a model)."""
    torch.manual_seed(0)
    src = work / "hf"
    if not (work / "ckpt").is_dir():
        LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=512)).save_pretrained(src)
        make_tokenizer().save_pretrained(src)
        api.convert(str(src), work / "ckpt", order="random", multiple=8 if a.tiny else 64, device=device,
                    overwrite=True, progress=False)
        for b in ("0.75", "0.5"):
            api.export(work / "ckpt", b, work / f"export-{b}", overwrite=True)
    dirs = {"1.0": work / "ckpt"} | {b: work / f"export-{b}" for b in ("0.75", "0.5")}
    rows, dtype = [], torch.bfloat16 if device == "cuda" else torch.float32
    for budget, path in dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for batch in (1,) if static else (1, 8):
            rows.append({"budget": budget, "batch": batch, "static_compiled": static, "weight_bytes": weight_bytes,
                         "tokens_per_s": round(decode_tps(model, batch, a.new_tokens, static, device), 1)})
        del model
    for r in rows:
        full = next(f for f in rows if f["budget"] == "1.0" and f["batch"] == r["batch"])
        r["speedup"] = round(r["tokens_per_s"] / full["tokens_per_s"], 2)
        r["bytes_ratio"] = round(full["weight_bytes"] / r["weight_bytes"], 2)
    return rows


def smollm2_run(device: str, gguf: str | None, steps: int) -> dict:
    """A short elastic run of the packaged SmolLM2 (from `gguf`, or its converted weights cached here)."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if gguf:
        dequantize_gguf(Path(gguf), target)
    if not (target / "model.safetensors").is_file():
        return {"ran": False, "why": f"no converted SmolLM2 weights under {target} and no --gguf"}
    t = time.perf_counter()
    ckpt = api.convert(None, Path(tempfile.mkdtemp()) / "ckpt", device=device, dtype="bf16", progress=False)
    convert_s = time.perf_counter() - t
    cfg = TrainOptions(max_steps=steps, seq_len=512, micro_batch=8, lr=5e-5, eval_limit=16)
    t = time.perf_counter()
    summary = api.train(ckpt, Path(tempfile.mkdtemp()) / "run", cfg, device=device, progress=False)
    return {"ran": True, "steps": steps, "tokens": steps * 8 * 512, "convert_s": round(convert_s, 1),
            "train_s": round(time.perf_counter() - t, 1),
            **{k: [r.to_dict() for r in summary[k]] for k in ("before", "after")}}


def markdown(result: dict) -> str:
    v, tests = result["versions"], result.get("cuda_tests", {})
    lines = [f"GPU: **{v.get('gpu', 'none')}** (CUDA {v.get('cuda')}), torch {v['torch']}, transformers "
             f"{v['transformers']}; CUDA tests: {tests.get('summary', tests.get('error', 'not run'))} "
             "(`python benchmarks/gpu.py`).\n",
             "| model | compiled | tokens/s | TFLOP/s | MFU | peak memory (GiB) |", "|---|---|---:|---:|---:|---:|"]
    for name, rows in result.get("training", {}).items():
        lines += [f"| {name} | {r['compiled']} | {r['tokens_per_s']:,} | {r['tflops']} | {r['mfu']} | "
                  f"{r['peak_memory_gib']} |" if "error" not in r else f"| {name} | | {r['error']} | | | |"
                  for r in rows]
    lines += ["", "| model | export | batch | static cache, compiled | tokens/s | speed-up | bytes ratio |",
              "|---|---|---:|---|---:|---:|---:|"]
    for name, rows in result.get("decode", {}).items():
        rows = rows if isinstance(rows, list) else [rows]
        lines += [f"| {name} | {r['budget']} | {r['batch']} | {r['static_compiled']} | {r['tokens_per_s']} | "
                  f"{r['speedup']} | {r['bytes_ratio']} |" if "error" not in r else f"| {name} | {r['error']} |||||"
                  for r in rows]
    s = result.get("smollm2", {"ran": False, "why": "not run"})
    if s.get("ran"):
        lines += ["", f"SmolLM2 elastic run ({s['steps']} steps, {s['tokens']:,} tokens, {s['train_s']} s):", "",
                  "| budget | held-out ppl before | after |", "|---|---:|---:|"]
        lines += [f"| {b['budget']} | {b['ppl']:.2f} | {a['ppl']:.2f} |" for b, a in zip(s["before"], s["after"])]
    else:
        lines += ["", f"SmolLM2 elastic run: not run ({s.get('why', s.get('error'))})"]
    return "\n".join(lines) + "\n"


def measure(a: argparse.Namespace) -> dict:
    """The parts asked for, in order, each failure recorded; optional work stops at the deadline."""
    start, result = time.perf_counter(), {"versions": versions(a.device), "parts": a.parts}
    print(result["versions"], flush=True)
    late = lambda: time.perf_counter() - start > a.deadline  # noqa: E731
    shapes = {"tiny": TINY} if a.tiny else SHAPES

    def save() -> None:
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=1))

    def smollm2() -> object:
        return {"ran": False, "why": "--tiny"} if a.tiny else attempt(smollm2_run, a.device, a.gguf, a.smollm2_steps)

    if "tests" in a.parts:
        result["cuda_tests"] = attempt(cuda_tests) if a.device == "cuda" else {"summary": "not run (CPU)"}
        print(result["cuda_tests"], flush=True)
        save()
    if "train" in a.parts:
        # Compiling is for CUDA (inductor); tracing the blocks on a CPU dry run would take minutes.
        result["training"] = {name: [attempt(train_throughput, shape, a.device, False, a)]
                              for name, shape in shapes.items()}
        for name, shape in reversed(shapes.items()):  # the largest first: its MFU is the target
            compiled = a.device == "cuda" and not late()
            result["training"][name].append(attempt(train_throughput, shape, a.device, compiled, a))
            print(name, result["training"][name], flush=True)
            save()
    if "decode" in a.parts:
        result["decode"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, shape in shapes.items():
                (Path(tmp) / name).mkdir()
                result["decode"][name] = attempt(decode_speedups, shape, a.device, Path(tmp) / name, a, False)
                print(name, result["decode"][name], flush=True)
                save()
            if "smollm2" in a.parts:  # before the compiled rows, which the deadline may cut
                result["smollm2"] = smollm2()
                save()
            for name, shape in shapes.items():
                if a.device == "cuda" and not late() and isinstance(result["decode"][name], list):
                    rows = attempt(decode_speedups, shape, a.device, Path(tmp) / name, a, True)
                    result["decode"][name] += rows if isinstance(rows, list) else [rows]
                    print(name, rows, flush=True)
                    save()
    if "smollm2" in a.parts and "smollm2" not in result:
        result["smollm2"] = smollm2()
    print(result.get("smollm2"), flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    save()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and few steps: a dry run in seconds")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--deadline", type=float, default=420, help="seconds after which compiled runs are skipped")
    ap.add_argument("--gguf", default=None, help="the packaged SmolLM2 GGUF file, for the SmolLM2 run")
    ap.add_argument("--smollm2-steps", type=int, default=200, help="optimizer steps of the SmolLM2 run")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu.json)")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON",
                    help="merge the JSON of earlier runs into benchmarks/results/gpu.json and docs/results.md")
    a = ap.parse_args()
    if a.report:
        result = {}
        for path in a.report:
            result |= json.loads(Path(path).read_text())
    else:
        a.parts = [p for p in a.parts.split(",") if p]
        if unknown := set(a.parts) - set(PARTS):
            ap.error(f"unknown --parts {sorted(unknown)}; choose from {','.join(PARTS)}")
        a.seq_len, a.micro_batch, a.steps, a.new_tokens = (32, 2, 2, 4) if a.tiny else (2048, 4, 5, 64)
        result = measure(a)
    if not a.out:
        write_json("gpu", result)
        update_section("gpu", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
