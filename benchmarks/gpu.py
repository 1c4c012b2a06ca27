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
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from _results import ROOT, update_section, write_json
from flextron import api
from flextron.assets import cache_dir
from flextron.config import TrainConfig
from flextron.cost import subnet_cost
from flextron.elastic import ElasticModel
from flextron.latency import sync
from flextron.train.elastic import distill_step, sample_subnets

sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_tokenizer  # noqa: E402  (the tests' word-level tokenizer for random models)

SHAPES = {  # Llama-architecture shapes of real checkpoints, random weights
    "SmolLM2-135M": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity
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
    cfg = TrainConfig(max_steps=1, seq_len=a.seq_len, micro_batch=a.micro_batch, dtype="bf16")
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
    sync(device)
    t = time.perf_counter()
    model.generate(prompt, **kwargs)
    sync(device)
    return batch * new_tokens / (time.perf_counter() - t)


def decode_speedups(shape: dict, device: str, work: Path, a: argparse.Namespace, compiled: bool) -> list[dict]:
    """Exports at 75 % / 50 % of the parameters vs the full model (a random unit order: speed does not
    depend on it); the ideal speed-up is the ratio of weight bytes read per token."""
    torch.manual_seed(0)
    src = work / "hf"
    LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=512)).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    ckpt = api.convert(str(src), work / "ckpt", order="random", multiple=8 if a.tiny else 64, device=device,
                       overwrite=True, progress=False)
    dirs = {"1.0": ckpt} | {b: api.export(ckpt, b, work / f"export-{b}", overwrite=True) for b in ("0.75", "0.5")}
    rows, dtype = [], torch.bfloat16 if device == "cuda" else torch.float32
    for budget, path in dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for batch in (1, 8):
            for static in (False, True):
                if static and not (compiled and device == "cuda"):
                    continue  # compiling costs ~30 s a model and batch: only where asked, on CUDA
                rows.append({"budget": budget, "batch": batch, "static_compiled": static, "weight_bytes": weight_bytes,
                             "tokens_per_s": round(decode_tps(model, batch, a.new_tokens, static, device), 1)})
        del model
    for r in rows:
        full = next(f for f in rows if f["budget"] == "1.0" and f["batch"] == r["batch"]
                    and f["static_compiled"] == r["static_compiled"])
        r["speedup"] = round(r["tokens_per_s"] / full["tokens_per_s"], 2)
        r["bytes_ratio"] = round(full["weight_bytes"] / r["weight_bytes"], 2)
    return rows


def smollm2_run(device: str) -> dict:
    """A short elastic run of the packaged SmolLM2 when its converted weights are already cached here."""
    cached = cache_dir() / "models"
    if not any(cached.glob("**/model.safetensors")):
        return {"ran": False, "why": f"no converted SmolLM2 weights under {cached} (the GGUF does not travel)"}
    ckpt = api.convert(None, Path(tempfile.mkdtemp()) / "ckpt", device=device, dtype="bf16", progress=False)
    cfg = TrainConfig(max_steps=60, seq_len=512, micro_batch=8, lr=5e-5, eval_limit=16)
    summary = api.train(ckpt, Path(tempfile.mkdtemp()) / "run", cfg, device=device, progress=False)
    return {"ran": True, **{k: [r.to_dict() for r in summary[k]] for k in ("before", "after")}}


def markdown(result: dict) -> str:
    v = result["versions"]
    lines = [f"GPU: **{v.get('gpu', 'none')}** (CUDA {v.get('cuda')}), torch {v['torch']}, transformers "
             f"{v['transformers']}; CUDA tests: {result['cuda_tests']['summary']} (`python benchmarks/gpu.py`).\n",
             "| model | compiled | tokens/s | TFLOP/s | MFU | peak memory (GiB) |", "|---|---|---:|---:|---:|---:|"]
    for name, rows in result["training"].items():
        lines += [f"| {name} | {r['compiled']} | {r['tokens_per_s']:,} | {r['tflops']} | {r['mfu']} | "
                  f"{r['peak_memory_gib']} |" for r in rows]
    lines += ["", "| model | export | batch | static cache, compiled | tokens/s | speed-up | bytes ratio |",
              "|---|---|---:|---|---:|---:|---:|"]
    for name, rows in result["decode"].items():
        lines += [f"| {name} | {r['budget']} | {r['batch']} | {r['static_compiled']} | {r['tokens_per_s']} | "
                  f"{r['speedup']} | {r['bytes_ratio']} |" for r in rows]
    s = result["smollm2"]
    lines += ["", "SmolLM2 elastic run: " + (f"before {s['before']}, after {s['after']}" if s["ran"] else s["why"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and few steps: a dry run in seconds")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu.json)")
    a = ap.parse_args()
    a.seq_len, a.micro_batch, a.steps, a.new_tokens = (32, 2, 2, 4) if a.tiny else (2048, 4, 5, 128)
    shapes = {"tiny": TINY} if a.tiny else SHAPES
    result = {"versions": versions(a.device)}
    print(result["versions"], flush=True)
    result["cuda_tests"] = cuda_tests() if a.device == "cuda" else {"returncode": None, "summary": "not run (CPU)"}
    print(result["cuda_tests"], flush=True)
    result["training"], result["decode"] = {}, {}
    for name, shape in shapes.items():
        # Compiling is for CUDA (inductor); tracing the blocks on a CPU dry run would take minutes.
        result["training"][name] = [train_throughput(shape, a.device, c, a) for c in (False, a.device == "cuda")]
        print(name, result["training"][name], flush=True)
        with tempfile.TemporaryDirectory() as work:
            result["decode"][name] = decode_speedups(shape, a.device, Path(work), a, compiled=name != "SmolLM2-135M")
        print(name, result["decode"][name], flush=True)
    result["smollm2"] = smollm2_run(a.device) if not a.tiny else {"ran": False, "why": "--tiny"}
    print(result["smollm2"], flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    else:
        write_json("gpu", result)
        update_section("gpu", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
